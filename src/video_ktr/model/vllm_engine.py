"""Generation with vLLM's offline ``LLM`` API (``video-ktr eval --engine vllm``, ``video-ktr infer --engine vllm``).

**Not exercised here.** vLLM is not installed in the environment this package was developed in (no
CUDA GPU). Only the request building is unit-tested, against a fake engine object
(``tests/test_evaluate.py``). The code is written against the offline API of vLLM >= 0.10:

* ``LLM(model=..., limit_mm_per_prompt={"video": 1, "image": 1}, dtype=..., seed=..., ...)``;
* one request per prompt: ``{"prompt": text, "multi_modal_data": {"video": [(frames, metadata)]}}``
  (or ``{"image": PIL.Image}``), where ``text`` is the processor's chat template applied to the same
  messages the ``hf`` engine uses (one ``<|vision_start|><|video_pad|><|vision_end|>`` placeholder,
  which vLLM expands), ``frames`` a ``(T, H, W, 3)`` uint8 array of the frames this package already
  sampled and resized, and ``metadata`` the dict transformers' ``VideoMetadata`` takes;
* ``mm_processor_kwargs = {"fps": sampled fps, "do_sample_frames": False}`` per video request: vLLM
  drops the metadata for models that do not declare ``video_needs_metadata`` (Qwen2/2.5-VL), and
  Qwen2.5-VL derives its temporal positions (``second_per_grid_ts``) from ``fps``;
* one ``SamplingParams(temperature, top_p, max_tokens, seed, stop_token_ids)`` per request, the seed
  being the row's seed, so a row's sample does not depend on the other rows of the batch.

Known differences to the ``hf`` engine: vLLM's own kernels and sampler (numbers differ slightly, and
its seeded sampling is a different random stream than :class:`video_ktr.model.sampling.GumbelSampler`); the
model's processor may resize frames again if its own ``min_pixels``/``max_pixels`` exclude the frame
size chosen by the frame settings.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from video_ktr.model.loading import load_processor, special_tokens

__all__ = [
    "VLLMEngine",
    "VLLMUnavailableError",
    "build_request",
    "require_vllm",
    "video_payload",
]

INSTALL_HINT = (
    "--engine vllm needs vLLM, which is not installed: `pip install 'video-ktr[vllm]'` on a CUDA machine "
    "(or use --engine hf)"
)


class VLLMUnavailableError(ImportError):
    """vLLM cannot be imported."""


def require_vllm() -> Any:
    """The ``vllm`` module, or :class:`VLLMUnavailableError` saying how to install it."""
    try:
        import vllm
    except ImportError as exc:
        raise VLLMUnavailableError(f"{INSTALL_HINT} ({exc})") from exc
    return vllm


def video_payload(video: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """``(frames, metadata)`` of a :class:`video_ktr.data.media.Video` for ``multi_modal_data["video"]``.

    ``frames``: ``(T, H, W, 3)`` uint8 (already sampled and resized); ``metadata``: the source's frame
    count and rate, the sampled indices and ``do_sample_frames=False`` so vLLM does not sample again.
    """
    frames = video.frames.permute(0, 2, 3, 1).contiguous().cpu().numpy()
    metadata = dict(video.metadata())
    metadata["do_sample_frames"] = False
    metadata["video_backend"] = "pyav"
    return frames, metadata


def build_request(prompt: str, media: Any) -> dict[str, Any]:
    """One vLLM request for a prompt text and its :class:`video_ktr.model.inputs.Media`."""
    request: dict[str, Any] = {"prompt": prompt}
    if media is None or media.kind == "text":
        return request
    if media.kind == "video":
        frames, metadata = video_payload(media.video)
        request["multi_modal_data"] = {"video": [(frames, metadata)]}
        request["mm_processor_kwargs"] = {"fps": float(media.video.sampled_fps), "do_sample_frames": False}
    else:
        request["multi_modal_data"] = {"image": media.image}
    return request


class VLLMEngine:
    """Batched generation through a ``vllm.LLM``; same ``generate`` signature as the ``hf`` engine.

    ``llm`` is a ``vllm.LLM`` (or any object with ``generate(requests, sampling_params=..., use_tqdm=...)``
    returning objects with ``.outputs[0].text``); ``processor`` supplies the chat template;
    ``sampling_params_cls`` defaults to ``vllm.SamplingParams``.
    """

    name = "vllm"

    def __init__(self, llm: Any, processor: Any, *, stop_token_ids: Sequence[int] = (),
                 sampling_params_cls: Any = None) -> None:
        self.llm = llm
        self.processor = processor
        self.stop_token_ids = [int(i) for i in stop_token_ids]
        if sampling_params_cls is None:
            sampling_params_cls = require_vllm().SamplingParams
        self.sampling_params_cls = sampling_params_cls

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        *,
        processor: Any = None,
        dtype: str = "auto",
        seed: int = 0,
        trust_remote_code: bool = False,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        **llm_kwargs: Any,
    ) -> VLLMEngine:
        """Start ``vllm.LLM`` for ``model`` (one video and one image per prompt at most)."""
        vllm = require_vllm()
        from transformers import AutoConfig

        if processor is None:
            processor = load_processor(model, trust_remote_code=trust_remote_code)
        config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
        stop = special_tokens(config, processor.tokenizer).eos_ids
        kwargs: dict[str, Any] = {
            "model": model,
            "dtype": dtype,
            "seed": seed,
            "trust_remote_code": trust_remote_code,
            "tensor_parallel_size": tensor_parallel_size,
            "gpu_memory_utilization": gpu_memory_utilization,
            "limit_mm_per_prompt": {"video": 1, "image": 1},
            **llm_kwargs,
        }
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        llm = vllm.LLM(**kwargs)
        return cls(llm, processor, stop_token_ids=stop, sampling_params_cls=vllm.SamplingParams)

    def prompt_texts(self, messages: list[list[dict]]) -> list[str]:
        return [self.processor.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in messages]

    def build_requests(self, messages: list[list[dict]], media: list[Any]) -> list[dict[str, Any]]:
        if len(messages) != len(media):
            raise ValueError(f"{len(messages)} prompts but {len(media)} media items")
        return [build_request(text, m) for text, m in zip(self.prompt_texts(messages), media)]

    def sampling_params(self, seeds: Sequence[int], *, max_new_tokens: int, temperature: float,
                        top_p: float) -> list[Any]:
        """One ``SamplingParams`` per request (temperature 0 is greedy in vLLM too)."""
        return [
            self.sampling_params_cls(
                temperature=float(temperature),
                top_p=float(top_p) if temperature > 0 else 1.0,
                max_tokens=int(max_new_tokens),
                seed=int(seed) % (2**63),
                stop_token_ids=list(self.stop_token_ids),
            )
            for seed in seeds
        ]

    def generate(self, messages: list[list[dict]], media: list[Any], seeds: Sequence[int], *,
                 max_new_tokens: int, temperature: float, top_p: float) -> list[str]:
        if len(seeds) != len(messages):
            raise ValueError(f"{len(seeds)} seeds for {len(messages)} prompts")
        requests = self.build_requests(messages, media)
        params = self.sampling_params(seeds, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
        outputs = self.llm.generate(requests, sampling_params=params, use_tqdm=False)
        if len(outputs) != len(requests):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(requests)} requests")
        return [out.outputs[0].text for out in outputs]
