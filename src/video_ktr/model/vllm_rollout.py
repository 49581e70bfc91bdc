"""Colocated vLLM rollouts for GRPO training (``video-ktr train --use_vllm``).

**Not exercised here.** vLLM needs a CUDA GPU and cannot be installed on the machines this package is
developed on; the contract below is tested with a stand-in engine (tests/test_vllm_rollout.py): which
calls are made, in which order, with which weights, requests and sampling parameters, and how the
returned tokens become :class:`video_ktr.model.rollout.Completions`. Written against the offline ``LLM``
API of vLLM 0.17 - 0.25 (the range TRL's colocated GRPO uses the same calls with):

* ``LLM(model, enable_sleep_mode=True, distributed_executor_backend="external_launcher",
  gpu_memory_utilization, max_model_len, seed, limit_mm_per_prompt)``: the engine lives in the training
  process on the policy's GPU (``external_launcher`` keeps it in process, so a weight push is a
  device-to-device copy and no pickling);
* ``sleep(level=1)`` after every rollout (weights offloaded to host memory, KV cache freed) so the update
  phase has the GPU; ``wake_up(tags=["weights"])``, the weight push, ``wake_up(tags=["kv_cache"])`` before
  the next. Level 1 rather than 2: level 2 discards the weights, and restoring them then depends on
  vLLM's ``reload_weights`` semantics (vLLM issue 29341); with level 1 the woken weights are the last
  pushed ones, and a push after every optimizer step replaces them;
* the push: ``apply_model(lambda m: m.load_weights(weights))`` with the policy's parameters under their
  transformers names (vLLM's Qwen2-VL / Qwen2.5-VL ``load_weights`` maps ``model.language_model.*``,
  ``model.visual.*`` and ``lm_head.*`` itself), then ``reset_prefix_cache()`` (cached prefixes were
  computed with the old weights);
* one request per completion: the prompt text (the chat template the transformers path applies), the
  same sampled and resized frames (or image) in ``multi_modal_data``, ``mm_processor_kwargs`` that keep
  vLLM's processor from resampling or resizing them (the bounds ``inputs.processor_call`` passes), and one
  ``SamplingParams(n=1, seed=row seed, ...)`` per row, so a row's sample depends on its own seed only.
  The G requests of a prompt share its prefix in vLLM's prefix cache.

vLLM's prompt tokens are checked against the transformers path's (the same placeholders expanded to the
same number of vision tokens): the policy, the probes and the loss score vLLM's completion tokens after
the trainer's own prompt encoding, as they score the transformers rollout's. What differs: vLLM's kernels
and sampler (its seeded stream is not sampling.GumbelSampler's), so the rollout is slightly off-policy
(no importance-sampling correction here), and the vision placeholder ids are held back by a logit bias
of -100 rather than an exact ban.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from video_ktr.model.adapters import video_size
from video_ktr.model.loading import unwrap
from video_ktr.model.rollout import Completions
from video_ktr.model.scoring import completion_mask
from video_ktr.model.vllm_engine import build_request, require_vllm

SLEEP_LEVEL = 1
SUPPRESS_BIAS = -100.0


class VLLMRolloutError(RuntimeError):
    """vLLM's rollout does not match what the trainer scores (prompt tokens, row count)."""


def policy_weights(model: torch.nn.Module) -> Iterator[tuple[str, Tensor]]:
    """The policy's parameters as (transformers name, tensor) for vLLM's ``load_weights``.

    Wrappers (DDP, accelerate, torch.compile) are taken off. A PEFT model must have its adapters merged
    by the caller (``push_weights`` does): the names lose PEFT's ``base_model.model.`` prefix and
    ``.base_layer`` infix, and the adapter tensors themselves are skipped (vLLM holds the merged base).
    """
    m = unwrap(model)
    peft_prefix = getattr(m, "prefix", None) if hasattr(m, "merge_adapter") else None
    for name, param in m.named_parameters():
        if peft_prefix and peft_prefix in name:
            continue
        if "original_module" in name:
            continue
        name = name.removeprefix("base_model.model.").replace(".base_layer", "").replace("modules_to_save.default.", "")
        yield name, param.detach()


def media_processor_kwargs(media: Any, processor: Any = None) -> dict[str, Any]:
    """``mm_processor_kwargs`` that keep vLLM's processor from resampling or resizing the frames / image.

    The same bounds inputs.processor_call gives the transformers processor: the item's own size as both
    the smallest and the largest allowed (the frames were resized by data.media already), in the terms of
    ``processor``'s family (adapters.video_size: one frame's area for Qwen2/2.5-VL, frames x height x width
    for Qwen3-VL, whose processor would otherwise shrink the frames).
    """
    if media is None or media.kind == "text":
        return {}
    if media.kind == "video":
        frames = media.video.frames  # (T, 3, H, W)
        shape = (int(frames.shape[0]), int(frames.shape[-2]), int(frames.shape[-1]))
        return {"fps": float(media.video.sampled_fps), "do_sample_frames": False, "cap_pixels_per_frame": False,
                "size": video_size(processor, [shape])}
    area = int(media.image.size[0]) * int(media.image.size[1])
    return {"size": {"shortest_edge": area, "longest_edge": area}}


def rollout_request(prompt: str, media: Any, processor: Any = None) -> dict[str, Any]:
    """One vLLM request: the prompt text, its media and the processor bounds (vllm_engine.build_request + bounds)."""
    request = build_request(prompt, media)
    kwargs = media_processor_kwargs(media, processor)
    if kwargs:
        request["mm_processor_kwargs"] = {**request.get("mm_processor_kwargs", {}), **kwargs}
    return request


def _distributed_env(process_index: int, local_process_index: int, num_processes: int) -> None:
    """The torch.distributed variables vLLM's ``external_launcher`` reads (already set under accelerate/torchrun)."""
    os.environ.setdefault("RANK", str(process_index))
    os.environ.setdefault("LOCAL_RANK", str(local_process_index))
    os.environ.setdefault("WORLD_SIZE", str(num_processes))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")


class VLLMRollout:
    """A colocated vLLM engine that samples the trainer's completions (see the module docstring).

    ``llm`` is a ``vllm.LLM`` (or a stand-in with ``generate``, ``sleep``, ``wake_up``, ``apply_model``,
    ``reset_prefix_cache``); ``processor`` the policy's processor (chat template); ``sleep_mode`` whether
    the engine was started with ``enable_sleep_mode`` (then it sleeps between rollouts).
    """

    def __init__(self, llm: Any, processor: Any, *, sampling_params_cls: Any = None, sleep_mode: bool = True):
        self.llm = llm
        self.processor = processor
        self.sampling_params_cls = sampling_params_cls or require_vllm().SamplingParams
        self.sleep_mode = sleep_mode
        self.synced_version: int | None = None  # the policy version whose weights the engine holds
        self.awake: set[str] = {"weights", "kv_cache"}  # what is on the GPU now

    @classmethod
    def start(cls, model_name_or_path: str, processor: Any, *, gpu_memory_utilization: float,
              max_model_len: int | None, seed: int = 0, dtype: str = "auto", enable_sleep_mode: bool = True,
              trust_remote_code: bool = False, process_index: int = 0, local_process_index: int = 0,
              num_processes: int = 1, **llm_kwargs: Any) -> VLLMRollout:
        """Start ``vllm.LLM`` on this process's GPU beside the policy (one engine per process, no tensor parallelism)."""
        vllm = require_vllm()
        _distributed_env(process_index, local_process_index, num_processes)
        kwargs: dict[str, Any] = {
            "model": model_name_or_path, "dtype": dtype, "seed": int(seed) + process_index,
            "trust_remote_code": trust_remote_code, "tensor_parallel_size": 1,
            "gpu_memory_utilization": float(gpu_memory_utilization), "enable_sleep_mode": enable_sleep_mode,
            "distributed_executor_backend": "external_launcher", "limit_mm_per_prompt": {"video": 1, "image": 1},
            "enable_prefix_caching": True, **llm_kwargs,
        }
        if max_model_len is not None:
            kwargs["max_model_len"] = int(max_model_len)
        engine = cls(vllm.LLM(**kwargs), processor, sampling_params_cls=vllm.SamplingParams,
                     sleep_mode=enable_sleep_mode)
        engine.sleep()
        return engine

    # -- the engine's memory --------------------------------------------------------------------------
    def sleep(self) -> None:
        """Free the GPU for the update phase (weights to host memory, KV cache dropped)."""
        if self.sleep_mode and self.awake:
            self.llm.sleep(level=SLEEP_LEVEL)
            self.awake = set()

    def _wake(self, tag: str) -> None:
        if self.sleep_mode and tag not in self.awake:
            self.llm.wake_up(tags=[tag])
            self.awake.add(tag)

    def push_weights(self, model: torch.nn.Module, version: int) -> None:
        """Copy the policy's weights into the engine if it holds an older ``version`` (after an optimizer step)."""
        self._wake("weights")
        if self.synced_version == version:
            return
        m = unwrap(model)
        merged = hasattr(m, "merge_adapter")
        if merged:
            m.merge_adapter()
        try:
            weights = list(policy_weights(model))
            self.llm.apply_model(lambda vllm_model: vllm_model.load_weights(weights))
        finally:
            if merged:
                m.unmerge_adapter()
        self.llm.reset_prefix_cache()
        self.synced_version = version

    # -- requests -------------------------------------------------------------------------------------
    def sampling_params(self, seeds: Sequence[int], *, max_new_tokens: int, temperature: float, top_p: float,
                        eos_ids: Sequence[int], suppress_ids: Sequence[int] = (), min_new_tokens: int = 0) -> list[Any]:
        """One ``SamplingParams`` per row: its own seed, the trainer's temperature / top-p / length, end-of-turn ids."""
        bias = {int(i): SUPPRESS_BIAS for i in suppress_ids} or None
        return [
            self.sampling_params_cls(
                n=1, temperature=float(temperature), top_p=float(top_p) if temperature > 0 else 1.0,
                max_tokens=int(max_new_tokens), min_tokens=int(min_new_tokens), seed=int(seed) % (2**63),
                stop_token_ids=[int(i) for i in eos_ids], logit_bias=bias, skip_special_tokens=True,
            )
            for seed in seeds
        ]

    def requests(self, messages: list[list[dict]], media: list[Any], group_size: int) -> list[dict[str, Any]]:
        """Each prompt's request ``group_size`` times in a row (the trainer's row order)."""
        if len(messages) != len(media):
            raise ValueError(f"{len(messages)} prompts but {len(media)} media items")
        texts = [self.processor.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in messages]
        once = [rollout_request(t, m, self.processor) for t, m in zip(texts, media)]  # the frames converted once per prompt
        return [request for request in once for _ in range(group_size)]

    # -- the rollout ----------------------------------------------------------------------------------
    def generate(self, model: torch.nn.Module, version: int, messages: list[list[dict]], media: list[Any],
                 prompt_inputs: dict[str, Tensor], tokenizer: Any, *, seeds: list[int], group_size: int,
                 max_new_tokens: int, temperature: float, top_p: float, eos_ids: tuple[int, ...], pad_id: int,
                 suppress_ids: tuple[int, ...] = (), min_new_tokens: int = 0) -> Completions:
        """G completions per prompt sampled by vLLM with the policy's current weights, as Completions.

        ``prompt_inputs`` is the trainer's encoding of the same prompts (P rows, left-padded): vLLM's
        prompt tokens must be its unpadded rows, or VLLMRolloutError says which prompt differs where.
        """
        rows = len(messages) * group_size
        if len(seeds) != rows:
            raise ValueError(f"{len(seeds)} seeds for {rows} rows")
        requests = self.requests(messages, media, group_size)
        params = self.sampling_params(seeds, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                      eos_ids=eos_ids, suppress_ids=suppress_ids, min_new_tokens=min_new_tokens)
        self.push_weights(model, version)
        self._wake("kv_cache")
        try:
            outputs = self.llm.generate(requests, sampling_params=params, use_tqdm=False)
        finally:
            self.sleep()
        if len(outputs) != rows:
            raise VLLMRolloutError(f"vLLM returned {len(outputs)} outputs for {rows} requests")
        self._check_prompts(outputs, prompt_inputs, group_size)
        token_rows = [list(out.outputs[0].token_ids)[:max_new_tokens] for out in outputs]
        return completions_from_tokens(token_rows, tokenizer, eos_ids=eos_ids, pad_id=pad_id,
                                       device=prompt_inputs["input_ids"].device)

    @staticmethod
    def _check_prompts(outputs: list[Any], prompt_inputs: dict[str, Tensor], group_size: int) -> None:
        ids, mask = prompt_inputs["input_ids"], prompt_inputs["attention_mask"].bool()
        for p in range(ids.shape[0]):
            ours = ids[p][mask[p]].tolist()
            theirs = list(outputs[p * group_size].prompt_token_ids or [])
            if ours != theirs:
                at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
                raise VLLMRolloutError(
                    f"vLLM's prompt {p} differs from the trainer's at token {at} ({len(theirs)} vs {len(ours)} tokens): "
                    "its processor expanded the visual input differently (frame size, frame count or processor "
                    "version); the policy would score completions of another prompt. Check that vLLM loads the "
                    "same processor as --model_name_or_path and that the frame settings give sides that are "
                    "multiples of the model's frame factor (patch x merge size: 28 for Qwen2/2.5-VL, 32 for Qwen3-VL)."
                )


def completions_from_tokens(token_rows: list[list[int]], tokenizer: Any, *, eos_ids: tuple[int, ...], pad_id: int,
                            device: torch.device | str = "cpu") -> Completions:
    """Completions from per-row token lists: right-padded, valid up to the first end-of-turn token, decoded."""
    width = max(1, max((len(r) for r in token_rows), default=0))
    ids = torch.full((len(token_rows), width), pad_id, dtype=torch.long)
    for i, row in enumerate(token_rows):
        if row:
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    ids = ids.to(device)
    lengths = torch.tensor([len(r) for r in token_rows], device=device)
    # up to the first end-of-turn token, and never into the padding (the pad id may be an end-of-turn id)
    valid = completion_mask(ids, eos_ids) & (torch.arange(width, device=device)[None, :] < lengths[:, None])
    ids = ids.masked_fill(~valid, pad_id)
    texts = tokenizer.batch_decode([row[m] for row, m in zip(ids, valid)], skip_special_tokens=True)
    return Completions(ids=ids, valid=valid, texts=texts)
