"""Rollout: G completions per prompt, each from its own random stream, vision tokens never sampled.

Also the "encode the visual input once per prompt" helper used by the no-grad passes: the vision tower
runs once per prompt and its features are repeated for the G completions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from video_ktr.model.decode import StaticDecoder, decode_from, resolve_decoder
from video_ktr.model.inputs import PIXEL_KEYS, select_encoder_items, select_prompts
from video_ktr.model.kv_cache import new_cache, repeat_rows, static_cache
from video_ktr.model.loading import unwrap
from video_ktr.model.lockstep import Lockstep, agree_vision_calls, visual_padding_inputs
from video_ktr.model.prefix import _rope_fn
from video_ktr.model.sampling import GumbelSampler
from video_ktr.model.scoring import completion_mask


@dataclass
class Completions:
    ids: Tensor  # (N, Lc) sampled ids, right-padded with pad
    valid: Tensor  # (N, Lc) bool: up to and including the first end-of-turn token
    texts: list[str]  # decoded, special tokens skipped

    @property
    def lengths(self) -> Tensor:
        return self.valid.sum(1)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt_inputs: dict[str, Tensor],
    *,
    seeds: list[int],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    eos_ids: tuple[int, ...],
    pad_id: int,
    suppress_ids: tuple[int, ...] = (),
    group_size: int = 1,
    shared_prefill: bool = True,
    min_new_tokens: int = 0,
    decoder: str | StaticDecoder = "auto",
    synced_gpus: bool = False,
) -> Completions:
    """Sample one completion per row of ``prompt_inputs`` x ``group_size`` (each prompt's G rows in a row).

    ``seeds`` has one seed per row (see sampling.GumbelSampler); temperature 0 is greedy decoding;
    ``min_new_tokens`` > 0 holds the end-of-turn tokens back until then (benchmarks).

    With ``group_size`` > 1 and ``shared_prefill``, each prompt (and its vision tower) runs once and its
    key/value cache is repeated for its G rows before decoding starts (_shared_prefill); the logits are
    those of G separate prompt rows to float tolerance, and the sampled tokens the same (tests pin it).
    Otherwise the prompt rows are repeated and ``generate`` prefills every one of them.

    ``decoder``: ``"hf"`` decodes with transformers' ``generate``; ``"static"`` (or a
    decode.StaticDecoder) prefills the same way and decodes the rest with decode.decode_from (static
    buffers, a captured step on CUDA, counter noise on CUDA); ``"auto"`` is static on CUDA, hf elsewhere.

    ``synced_gpus``: every process keeps decoding until all are done (transformers' ``synced_gpus``), for a
    sharded model whose every forward is a collective (ZeRO-3 / FSDP2 without a gather for the rollout).
    """
    device = prompt_inputs["input_ids"].device
    static = resolve_decoder(decoder, device) == "static" and max_new_tokens > 1
    if static and synced_gpus:
        raise ValueError("the static decoder stops when this process's rows are done: it cannot keep processes in step "
                         "(synced_gpus); use the hf decoder")
    settings = decoder if isinstance(decoder, StaticDecoder) else StaticDecoder()
    graphs = settings.graphs_for(device) if static else None
    capacity = settings.capacity(prompt_inputs["input_ids"].shape[1], max_new_tokens, graphs)
    cache = None
    # a kept decode step's cache to prefill into (decode.GraphStore): no second cache during the rollout
    rows_n = prompt_inputs["input_ids"].shape[0] * group_size
    kept = settings.store.cache_for(rows_n, capacity, device) if graphs is not None and settings.store else None
    if group_size > 1 and shared_prefill:
        cache = _shared_prefill(model, prompt_inputs, group_size, capacity, static=graphs is not None, into=kept)
    if cache is not None:  # the token columns only: the pixels went into the cache
        rows = {k: prompt_inputs[k].repeat_interleave(group_size, dim=0)
                for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    else:
        rows = select_prompts(prompt_inputs, list(range(prompt_inputs["input_ids"].shape[0])), group_size)
    if cache is None and graphs is not None:
        cache = static_cache(unwrap(model), capacity, into=kept)
        if cache is None:  # no static layout for this model: decode eagerly into the reserving cache
            graphs = None
    args = dict(seeds=seeds, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, eos_ids=eos_ids,
                pad_id=pad_id, suppress_ids=suppress_ids, cache=cache, min_new_tokens=min_new_tokens)
    if static:
        return _generate_static(model, tokenizer, rows, graphs=graphs, noise=settings.noise_for(device),
                                stop_every=settings.stop_every, store=settings.store, **args)
    return _generate(model, tokenizer, rows, synced_gpus=synced_gpus, **args)


def _rope_owner(model: torch.nn.Module) -> Any:
    """The module that holds ``rope_deltas`` and ``get_rope_index`` (Qwen2-VL / Qwen2.5-VL), or None."""

    owner = getattr(_rope_fn(model), "__self__", None)
    return owner if hasattr(owner, "rope_deltas") else None


@torch.no_grad()
def _shared_prefill(model: torch.nn.Module, prompt_inputs: dict[str, Tensor], group_size: int, capacity: int = 0,
                    static: bool = False, into: Any = None):
    """Each prompt's cache up to its last token, computed once and repeated ``group_size`` times.

    The prompts (left-padded, so every row's last column is a real token) run once without their last
    column, with their pixels; the cache is repeated per row of the group, and generate() then feeds
    only the last prompt column before it decodes. The M-RoPE offsets (``rope_deltas``) the model stored
    for the P prompts are repeated the same way and left on the model, which is where generate() reads
    them for positions after a cached prefix. Returns the cache, or None where this does not apply (the
    last prompt column is a vision token, a model without M-RoPE offsets, or one that returns no cache),
    and then the caller prefills every row. The repeated cache reserves room for ``capacity`` tokens
    (kv_cache.repeat_rows: decoding then writes in place instead of concatenating); with ``static`` the
    rows are repeated into a ``StaticCache`` of ``capacity`` columns instead (kv_cache.static_cache; ``into``:
    an existing one to reuse).
    """
    owner = _rope_owner(model)
    mm = prompt_inputs["mm_token_type_ids"]
    if owner is None or prompt_inputs["input_ids"].shape[1] < 2 or bool(mm[:, -1].any()):
        return None
    if not bool(prompt_inputs["attention_mask"][:, -1].all()):
        return None  # right padding: the last column is not every row's last token
    gen_model = unwrap(model)
    was_training = gen_model.training
    gen_model.eval()
    try:
        owner.rope_deltas = None
        head = {k: (v[:, :-1] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v)
                for k, v in prompt_inputs.items()}
        out = gen_model(**head, use_cache=True, logits_to_keep=1)
    finally:
        gen_model.train(was_training)
    cache, deltas = out.past_key_values, owner.rope_deltas
    if cache is None or deltas is None or not hasattr(cache, "batch_repeat_interleave"):
        return None
    if static:
        cache = static_cache(gen_model, capacity, prefix=cache, repeats=group_size, into=into)
        if cache is None:
            return None
    elif not repeat_rows(cache, group_size, capacity):
        cache.batch_repeat_interleave(group_size)
    owner.rope_deltas = deltas.repeat_interleave(group_size, dim=0)
    return cache


def _generate(model: torch.nn.Module, tokenizer: Any, prompt_inputs: dict[str, Tensor], *, seeds: list[int],
              max_new_tokens: int, temperature: float, top_p: float, eos_ids: tuple[int, ...], pad_id: int,
              suppress_ids: tuple[int, ...], cache: Any = None, min_new_tokens: int = 0,
              synced_gpus: bool = False) -> Completions:
    n = prompt_inputs["input_ids"].shape[0]
    if len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} rows")
    device = prompt_inputs["input_ids"].device
    sampler = GumbelSampler(seeds, temperature=temperature, top_p=top_p, suppress_ids=list(suppress_ids), device=device)
    out = _hf_generate(model, prompt_inputs, sampler, cache=cache, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                       pad_id=pad_id, min_new_tokens=min_new_tokens, synced_gpus=synced_gpus)
    return _completions(tokenizer, out[:, prompt_inputs["input_ids"].shape[1]:], eos_ids, pad_id)


def _generate_static(model: torch.nn.Module, tokenizer: Any, prompt_inputs: dict[str, Tensor], *, seeds: list[int],
                     max_new_tokens: int, temperature: float, top_p: float, eos_ids: tuple[int, ...], pad_id: int,
                     suppress_ids: tuple[int, ...], cache: Any, min_new_tokens: int, graphs: Any, noise: str,
                     stop_every: int, store: Any = None) -> Completions:
    """The prompt's prefill and first token through ``generate`` (the same numbers as the hf path), the rest
    through decode.decode_from."""
    n = prompt_inputs["input_ids"].shape[0]
    if len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} rows")
    device = prompt_inputs["input_ids"].device
    sampler = GumbelSampler(seeds, temperature=temperature, top_p=top_p, suppress_ids=list(suppress_ids), device=device,
                            noise=noise)
    gen_model = unwrap(model)
    if cache is None:
        cache = new_cache(gen_model, prompt_inputs["input_ids"].shape[1] + max_new_tokens)
    out = _hf_generate(model, prompt_inputs, sampler, cache=cache, max_new_tokens=1, eos_ids=eos_ids, pad_id=pad_id,
                       min_new_tokens=min(min_new_tokens, 1))
    length = prompt_inputs["input_ids"].shape[1]
    owner = _rope_owner(model)
    deltas = getattr(owner, "rope_deltas", None) if owner is not None else None
    was_training = gen_model.training
    gen_model.eval()
    try:
        result = decode_from(gen_model, cache, out[:, length], prompt_inputs["attention_mask"], sampler=sampler,
                             max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=pad_id,
                             min_new_tokens=min_new_tokens, rope_deltas=deltas, graphs=graphs, stop_every=stop_every,
                             store=store)
    finally:
        gen_model.train(was_training)
    comps = _completions(tokenizer, result.ids, eos_ids, pad_id)
    # the columns up to the longest completion: what generate() returns when it stops as the last row ends
    keep = max(1, int(comps.lengths.max())) if comps.ids.shape[1] else 1
    return Completions(ids=comps.ids[:, :keep], valid=comps.valid[:, :keep], texts=comps.texts)


def _hf_generate(model: torch.nn.Module, prompt_inputs: dict[str, Tensor], sampler: GumbelSampler, *, cache: Any,
                 max_new_tokens: int, eos_ids: tuple[int, ...], pad_id: int, min_new_tokens: int,
                 synced_gpus: bool = False) -> Tensor:
    """``generate`` greedy over the sampler's scores (prompt + new tokens), with neutral generation settings."""
    from transformers import GenerationConfig, LogitsProcessorList

    config = GenerationConfig(
        do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=list(eos_ids), pad_token_id=pad_id,
        num_beams=1, use_cache=True, **({"min_new_tokens": min_new_tokens} if min_new_tokens else {}),
    )
    gen_model = unwrap(model)
    was_training = gen_model.training
    # generate() fills every setting left None with the checkpoint's generation_config.json, and
    # applies several of them even in greedy mode (Qwen2.5-VL-Instruct ships repetition_penalty 1.05;
    # others carry no_repeat_ngram_size, bad_words_ids, min_new_tokens, ...). Rollouts must be drawn
    # from the policy's own distribution, which the loss scores: neutral defaults only.
    saved_config = gen_model.generation_config
    gen_model.generation_config = GenerationConfig()
    gen_model.eval()
    # continuing from a shared prefill, generate() feeds the uncached last column and takes positions after
    # the cache from the offsets _shared_prefill left on the model (no grids: no vision token is left)
    if cache is None:  # decoding writes into room reserved for the whole completion (kv_cache)
        cache = new_cache(gen_model, prompt_inputs["input_ids"].shape[1] + max_new_tokens)
    extra = {"past_key_values": cache} if cache is not None else {}
    try:
        return gen_model.generate(**prompt_inputs, **extra, generation_config=config,
                                  logits_processor=LogitsProcessorList([sampler]), **({"synced_gpus": True} if synced_gpus else {}))
    finally:
        gen_model.train(was_training)
        gen_model.generation_config = saved_config


def _completions(tokenizer: Any, ids: Tensor, eos_ids: tuple[int, ...], pad_id: int) -> Completions:
    """Completions from the generated columns: valid up to the first end-of-turn token, pad after, decoded."""
    n = ids.shape[0]
    if ids.shape[1] == 0:  # nothing generated at all: keep one pad column so shapes stay valid
        ids = torch.full((n, 1), pad_id, dtype=ids.dtype, device=ids.device)
    valid = completion_mask(ids, eos_ids)
    ids = ids.masked_fill(~valid, pad_id)
    texts = tokenizer.batch_decode([row[m] for row, m in zip(ids, valid)], skip_special_tokens=True)
    return Completions(ids=ids, valid=valid, texts=texts)


def _feature_fn(model: torch.nn.Module, name: str):
    m = unwrap(model)
    for candidate in (m, getattr(m, "model", None), getattr(getattr(m, "base_model", None), "model", None)):
        fn = getattr(candidate, name, None) if candidate is not None else None
        if fn is not None:
            return fn
    raise AttributeError(f"{type(m).__name__} has no {name}")


def encode_visual_once(model: torch.nn.Module, prompt_inputs: dict[str, Tensor], rows: list[int], repeats: int,
                       *, grad: bool = False, lockstep: Lockstep | None = None) -> dict[str, Any]:
    """Inputs for ``rows`` x ``repeats`` with the visual features computed once per prompt.

    Returns forward kwargs without pixel tensors and with ``mm_encoder_outputs`` holding each
    prompt's features repeated ``repeats`` times (what the model would compute from repeated pixels).
    With ``grad`` the vision tower runs with autograd on (the policy pass): the repeated features
    send the G completions' gradients back into one vision forward per prompt.

    With a ``lockstep`` (several processes) the vision tower runs as many times on every process: one
    call per modality present, then padding calls up to the largest count of any process (model/lockstep.py).
    """
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        return _encode_visual_once(model, prompt_inputs, rows, repeats, lockstep)


def _encode_visual_once(model: torch.nn.Module, prompt_inputs: dict[str, Tensor], rows: list[int], repeats: int,
                        lockstep: Lockstep | None = None) -> dict[str, Any]:
    once = select_prompts(prompt_inputs, rows, 1)
    expanded = select_prompts(prompt_inputs, rows, repeats)
    out: dict[str, Any] = {k: v for k, v in expanded.items() if k not in PIXEL_KEYS}
    encoded = {}
    modalities = (("image", "pixel_values", "image_grid_thw"), ("video", "pixel_values_videos", "video_grid_thw"))
    padding = agree_vision_calls(lockstep, [name for name, pix, _ in modalities if pix in once])  # before any call
    for name, pix, grid in modalities:
        if pix in once:
            feats = _feature_fn(model, f"get_{name}_features")(once[pix], once[grid], return_dict=True)
            n = len(feats.pooler_output)
            encoded[name] = select_encoder_items(feats, [i for i in range(n) for _ in range(repeats)])
    pad_encoder_calls(model, lockstep, padding=padding)
    out["mm_encoder_outputs"] = encoded
    return out


def pad_encoder_calls(model: torch.nn.Module, lockstep: Lockstep | None, *, padding: int | None = None) -> None:
    """The padding vision-tower calls of this process: ``padding`` (agreed by the caller before its own calls),
    else agreed here for a process with nothing to encode in a pass the others run. Outputs made with gradient
    are held for ``Lockstep.fold``.
    """
    for _ in range(agree_vision_calls(lockstep, ()) if padding is None else padding):
        pixels, grid = visual_padding_inputs(model)
        feats = _feature_fn(model, "get_image_features")(pixels, grid, return_dict=True)
        lockstep.hold(torch.cat(list(feats.pooler_output)))
        lockstep.padding_calls += 1
