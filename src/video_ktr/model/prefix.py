"""Shared-prefix scoring: the G completions of a prompt share its prompt, so encode the prompt once.

A pass over N = P x G sequences of length Lp + Lc (the probes and the reference without grad, the
policy pass with grad) costs N (Lp + Lc) token-forwards when run naively. Here the prompt (with its
video) runs once per prompt, its key/value cache is repeated G times, and only the completions run per
row: P Lp + N Lc token-forwards. With Video-R1's long prompt
and a video, Lp is several times Lc, so the probe and reference passes shrink by about that factor.

Positions are those of the full sequence (M-RoPE positions from ``get_rope_index`` on the prompts,
continued over the completions; or the caller's ``position_ids``), so the result equals the full
forward to float tolerance: tests pin it. Completion columns after a row's last attended token are
not scored (0), and rows without an attended completion token are not run at all.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from functools import partial
from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from video_ktr.model.inputs import PIXEL_KEYS, VISUAL_KEYS, select_prompts
from video_ktr.model.loading import unwrap
from video_ktr.model.scoring import (
    BUCKET_OVERHEAD_TOKENS,
    bucket_rows,
    completion_widths,
    sequence_logprobs,
    token_logprobs,
)

_PIXEL_KEYS = (*PIXEL_KEYS, "mm_encoder_outputs")


def _rope_fn(model: torch.nn.Module):
    m = unwrap(model)
    for cand in (m, getattr(m, "model", None), getattr(getattr(m, "base_model", None), "model", None)):
        inner = getattr(cand, "model", None) if cand is not None else None
        for obj in (cand, inner):
            fn = getattr(obj, "get_rope_index", None) if obj is not None else None
            if fn is not None:
                return fn
    return None


def _rope_index(model: torch.nn.Module, inputs: dict[str, Any]):
    """The model's M-RoPE index function when it applies to ``inputs`` (a visual grid), else None."""
    has_grid = "image_grid_thw" in inputs or "video_grid_thw" in inputs
    return _rope_fn(model) if has_grid else None


def full_positions(model: torch.nn.Module, inputs: dict[str, Any]) -> Tensor:
    """(3, N, L) M-RoPE positions of full sequences, as the model's own forward would compute them."""
    if "position_ids" in inputs:
        return inputs["position_ids"]
    fn = _rope_index(model, inputs)
    if fn is None:
        pos = (inputs["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
        return pos.unsqueeze(0).expand(3, -1, -1)
    pos, _ = fn(
        inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=inputs.get("image_grid_thw"),
        video_grid_thw=inputs.get("video_grid_thw"), second_per_grid_ts=inputs.get("second_per_grid_ts"),
        attention_mask=inputs["attention_mask"],
    )
    return pos


def group_positions(model: torch.nn.Module, seq_inputs: dict[str, Any], completion_width: int,
                    group_size: int) -> tuple[Tensor, Tensor]:
    """``full_positions`` of N = P x G rows in groups sharing a prompt: (3, P, Lp) prompts, (3, N, Lc) completions.

    The same numbers, but the rope index runs over the P prompts only (one row per group, plus one
    attended text column that gives where a completion starts), not over the N full sequences: a
    completion is text, so its k-th attended token sits k places after that start whatever the
    prompt holds. Unattended completion tokens get what ``full_positions`` gives them (0 with the
    rope index; the previous position with plain text positions).
    """
    G, Lc = group_size, completion_width
    Lp = seq_inputs["input_ids"].shape[1] - Lc
    if "position_ids" in seq_inputs:
        pos = seq_inputs["position_ids"]
        return pos[:, ::G, :Lp], pos[:, :, Lp:]
    N = seq_inputs["input_ids"].shape[0]
    first = select_prompts(strip_pixels(seq_inputs), list(range(0, N, G)))
    P = first["input_ids"].shape[0]
    one = torch.ones(P, 1, dtype=first["attention_mask"].dtype, device=first["attention_mask"].device)
    probe = dict(first)
    probe["input_ids"] = torch.cat([first["input_ids"][:, :Lp], first["input_ids"][:, Lp - 1:Lp]], dim=1)
    probe["attention_mask"] = torch.cat([first["attention_mask"][:, :Lp], one], dim=1)
    probe["mm_token_type_ids"] = torch.cat([first["mm_token_type_ids"][:, :Lp], torch.zeros_like(one).to(
        first["mm_token_type_ids"].dtype)], dim=1)
    pos = full_positions(model, probe)
    start = pos[:, :, Lp].repeat_interleave(G, dim=1)  # (3, N): position of a completion's first attended token
    attended = seq_inputs["attention_mask"][:, Lp:].bool()  # (N, Lc)
    completion = start[:, :, None] + attended.long().cumsum(-1)[None] - 1
    if _rope_index(model, probe) is not None:
        completion = completion.masked_fill(~attended[None], 0)
    else:
        completion = completion.clamp(min=0)
    return pos[:, :, :Lp], completion


def _token_logprobs(logits: Tensor, ids: Tensor, with_entropy: bool) -> tuple[Tensor, Tensor | None]:
    """log p of ``ids`` (R, T) under ``logits`` (R, T, V), and the entropy of each distribution (R, T)
    (scoring.token_logprobs: in chunks of positions when no gradient is kept)."""
    return token_logprobs(logits, ids, with_entropy=with_entropy)


def shared_prefix_logprobs(
    model: torch.nn.Module,
    seq_inputs: dict[str, Any],
    completion_ids: Tensor,
    group_size: int,
    *,
    with_entropy: bool = False,
    prompts_per_chunk: int | None = None,
    bucket_overhead: int | None = BUCKET_OVERHEAD_TOKENS,
    grad: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """log p of each completion token (and entropy), computing each prompt's prefix once.

    seq_inputs: forward kwargs of N = P x G prompt+completion rows laid out as consecutive groups of
    ``group_size`` rows sharing one prompt (identical prompt columns and visual input); the last Lc
    columns are ``completion_ids`` (N, Lc). Returns logp (N, Lc) and entropy (N, Lc) or None.

    Equal to the full forward to float tolerance up to each row's last attended completion token;
    after it (and in rows without one) the values are 0, where a full forward would give numbers that
    no caller reads. Rows without an attended completion token are not run, and the completions run
    in buckets of similar width (``bucket_rows``; ``bucket_overhead`` None: one bucket per chunk of
    prompts), each only up to its longest row.

    ``grad``: log p carries the gradient (when grad is enabled): the policy pass. The prompt's cache is
    then part of the graph and each prompt's gradient is the sum over its G completions, the same as
    the full forward's (tests pin it); the entropy never takes a gradient. Default: no grad.
    """
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()), checkpointed_cache(model):
        return _shared_prefix_logprobs(model, seq_inputs, completion_ids, group_size, with_entropy, prompts_per_chunk,
                                       bucket_overhead)


class _LayerCache:
    """One decoder layer's view of the key/value cache inside a checkpointed call: no side effect.

    ``update`` returns the cached keys and values before the call (snapshotted at the first call, so the
    backward's recomputation sees the same ones) followed by the new ones, as ``DynamicLayer.update`` does,
    and keeps the new ones for the caller, which writes them into the real cache outside the checkpoint.
    """

    def __init__(self, cache: Any, state: dict[str, Any]):
        self._cache, self._state = cache, state

    def update(self, keys: Tensor, values: Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        state = self._state
        if "past" not in state:  # the first call, before the real cache holds this call's keys
            layer = self._cache.layers[layer_idx]
            held = getattr(layer, "keys", None) is not None and getattr(layer, "is_initialized", True)
            state["past"] = (layer.keys, layer.values) if held and layer.keys.numel() else None
        state["new"] = (keys, values, layer_idx)
        if state["past"] is None:
            return keys, values
        past_k, past_v = state["past"]
        return torch.cat([past_k, keys], dim=-2), torch.cat([past_v, values], dim=-2)


def _cache_layer_forward(layer: torch.nn.Module) -> Any:
    """``layer``'s forward that keeps the key/value cache under gradient checkpointing (see checkpointed_cache)."""
    wrapped = type(layer).forward.__get__(layer)  # transformers' wrapper: it checkpoints when the layer's flag is on

    def forward(*args: Any, **kwargs: Any) -> Any:
        # the layer's own forward, also when the backward recomputes it (after checkpointed_cache turned the flag back on)
        flag, layer.gradient_checkpointing = layer.gradient_checkpointing, False
        try:
            return wrapped(*args, **kwargs)
        finally:
            layer.gradient_checkpointing = flag

    def run(*args: Any, **kwargs: Any) -> Any:
        cache = kwargs.get("past_key_values")
        if not (torch.is_grad_enabled() and layer.training):
            return forward(*args, **kwargs)  # no graph kept: nothing to recompute
        if cache is None or not hasattr(cache, "layers"):
            return layer._gradient_checkpointing_func(partial(forward, **kwargs), *args)  # as transformers does
        state: dict[str, Any] = {}

        def call(*a: Any) -> Any:
            return forward(*a, **{**kwargs, "past_key_values": _LayerCache(cache, state)})

        # non-reentrant whatever the model's setting: the keys and values leave the call through the cache, and
        # only this form keeps their graph (the reentrant one runs the call without grad)
        out = checkpoint(call, *args, use_reentrant=False)
        keys, values, layer_idx = state["new"]
        cache.update(keys, values, layer_idx)  # outside the checkpoint: the recomputation does not write it again
        return out

    return run


@contextlib.contextmanager
def checkpointed_cache(model: torch.nn.Module) -> Iterator[None]:
    """Gradient checkpointing with the key/value cache the shared-prefix pass needs.

    transformers drops the cache of a checkpointed layer in training mode (its recomputation in the backward
    would write the cache a second time), which left the pass without its prompt cache. Here each layer that
    checkpoints (``gradient_checkpointing`` on, training mode) is checkpointed the same way, per layer, but
    its cache write happens outside the checkpoint: inside, the layer reads the cache as it was before the
    call (``_LayerCache``) and the new keys and values come out, so the recomputation gives the same numbers
    and writes nothing. Gradients flow into the prompt's keys and values as without checkpointing (tests pin
    them against the full forward). Without a grad (the probes in training mode) a layer runs as without
    checkpointing. Nothing changes for a model that does not checkpoint.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    flagged = [m for m in unwrap(model).modules() if getattr(m, "gradient_checkpointing", False) is True and m.training]
    # the layers checkpoint; on the models around them the flag only turns use_cache off (transformers' defaults)
    layers = [m for m in flagged if isinstance(m, GradientCheckpointingLayer) and "forward" not in vars(m)]
    for module in flagged:
        module.gradient_checkpointing = False
    for layer in layers:
        layer.forward = _cache_layer_forward(layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward
        for module in flagged:
            module.gradient_checkpointing = True


def _shared_prefix_logprobs(model: torch.nn.Module, seq_inputs: dict[str, Any], completion_ids: Tensor, group_size: int,
                            with_entropy: bool, prompts_per_chunk: int | None,
                            bucket_overhead: int | None) -> tuple[Tensor, Tensor | None]:
    N, Lc = completion_ids.shape
    G = group_size
    if N % G:
        raise ValueError(f"{N} rows do not split into groups of {G}")
    Lp = seq_inputs["input_ids"].shape[1] - Lc
    P = N // G
    logp = torch.zeros(N, Lc, device=completion_ids.device)
    entropy = torch.zeros(N, Lc, device=completion_ids.device) if with_entropy else None
    if N == 0 or Lc == 0:
        return logp, entropy
    # columns to score per row: up to its last attended completion token (0: nothing to score)
    widths = completion_widths(seq_inputs["attention_mask"], Lc)
    if not bool((widths > 0).any()):
        return logp, entropy
    prefix_pos, completion_pos = group_positions(model, seq_inputs, Lc, G)
    prompt_inputs = {k: (v[:, :Lp] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v)
                     for k, v in seq_inputs.items() if k != "position_ids"}
    step = P if not prompts_per_chunk else max(1, prompts_per_chunk)
    for p0 in range(0, P, step):
        prompts = list(range(p0, min(P, p0 + step)))
        rows = torch.tensor([p * G + g for p in prompts for g in range(G)], device=completion_ids.device)
        rows = rows[widths[rows] > 0]
        if not len(rows):
            continue
        prefix = select_prompts(prompt_inputs, [p * G for p in prompts])
        prefix["position_ids"] = prefix_pos[:, prompts]
        out = model(**prefix, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        if cache is None:
            # the model refused a cache (a model whose layers drop it in a way checkpointed_cache does not
            # undo): score the full sequences instead, same numbers

            logp, entropy = sequence_logprobs(model, seq_inputs, completion_ids, with_entropy=with_entropy,
                                              bucket_overhead=bucket_overhead)
            break
        owner = torch.div(rows, G, rounding_mode="floor") - p0  # each row's prompt within the chunk
        # the prefix's last position predicts completion token 0
        first, first_h = _token_logprobs(out.logits[owner, -1:], completion_ids[rows, :1], with_entropy)
        logp[rows, :1] = first
        if with_entropy:
            entropy[rows, :1] = first_h
        # the rest of the completions in buckets of similar width, so that short rows do not run the
        # padding up to the longest row of the chunk (one bucket when the widths are alike)
        buckets = bucket_rows(rows, widths, bucket_overhead)
        for b, (brows, width) in enumerate(buckets):
            if width <= 1:
                continue
            bcache = cache if b == len(buckets) - 1 else _cache_view(cache)
            bcache.batch_select_indices(torch.div(brows, G, rounding_mode="floor") - p0)
            ids = completion_ids[brows, :width]
            suffix = {
                "input_ids": ids,
                "attention_mask": seq_inputs["attention_mask"][brows, :Lp + width],
                "position_ids": completion_pos[:, brows, :width],
                "past_key_values": bcache,
            }
            rest, rest_h = _token_logprobs(model(**suffix, use_cache=True).logits[:, :-1], ids[:, 1:], with_entropy)
            logp[brows, 1:width] = rest
            if with_entropy:
                entropy[brows, 1:width] = rest_h
            del bcache
        del out, cache
    # a bucket runs up to its longest row: clear what lies after each row's own last attended token
    unscored = torch.arange(Lc, device=completion_ids.device)[None] >= widths[:, None]
    return logp.masked_fill(unscored, 0.0), (entropy.masked_fill(unscored, 0.0) if with_entropy else None)


def _cache_view(cache: Any) -> Any:
    """A cache object whose batch selection leaves ``cache`` as it is (the tensors are shared, not copied)."""

    layers = getattr(cache, "layers", None)
    if layers is None:
        return copy.deepcopy(cache)
    view = copy.copy(cache)
    view.layers = [copy.copy(layer) for layer in layers]
    return view


def strip_visual(inputs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in inputs.items() if k not in VISUAL_KEYS}


def strip_pixels(inputs: dict[str, Any]) -> dict[str, Any]:
    """``inputs`` without pixel tensors and precomputed features (grids and times kept).

    For passes that never run the vision tower (the probes' token inputs). Not a model input as it
    is: the placeholders would get no features.
    """
    return {k: v for k, v in inputs.items() if k not in _PIXEL_KEYS}
