"""Loading a Qwen2.5-VL / Qwen2-VL policy and its processor: a local directory or a hub id.

Nothing here assumes a tiny model: the same call takes ``Qwen/Qwen2.5-VL-7B-Instruct`` on a GPU
machine. Special-token ids are read from the model config and tokenizer, never hard-coded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class SpecialTokens:
    eos_ids: tuple[int, ...]  # end-of-turn ids that stop a completion (<|im_end|>, <|endoftext|>)
    pad_id: int
    vision_ids: tuple[int, ...]  # ids a completion must never contain (placeholders and vision markers)
    image_token_id: int | None
    video_token_id: int | None


def special_tokens(model_config: Any, tokenizer: Any) -> SpecialTokens:
    def tok(name: str) -> int | None:
        ids = tokenizer.convert_tokens_to_ids(name)
        unk = getattr(tokenizer, "unk_token_id", None)
        return ids if isinstance(ids, int) and ids != unk and ids >= 0 else None

    eos = [i for i in (tok("<|im_end|>"), tok("<|endoftext|>")) if i is not None]
    if not eos and tokenizer.eos_token_id is not None:
        eos = [tokenizer.eos_token_id]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[-1]
    image_id = getattr(model_config, "image_token_id", None)
    video_id = getattr(model_config, "video_token_id", None)
    vision = {image_id, video_id, getattr(model_config, "vision_start_token_id", None),
              getattr(model_config, "vision_end_token_id", None), tok("<|vision_pad|>")}
    return SpecialTokens(
        eos_ids=tuple(eos), pad_id=int(pad), vision_ids=tuple(sorted(i for i in vision if i is not None)),
        image_token_id=image_id, video_token_id=video_id,
    )


def load_processor(name_or_path: str, *, trust_remote_code: bool = False) -> Any:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    processor.tokenizer.padding_side = "left"
    return processor


def load_model(name_or_path: str, *, dtype: str = "float32", attn_implementation: str | None = "sdpa",
               trust_remote_code: bool = False, device: str | torch.device | None = None) -> torch.nn.Module:
    """``AutoModelForImageTextToText.from_pretrained`` with safetensors only (no pickle)."""
    from transformers import AutoModelForImageTextToText

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    kwargs: dict[str, Any] = {"dtype": DTYPES[dtype], "trust_remote_code": trust_remote_code, "use_safetensors": True}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForImageTextToText.from_pretrained(name_or_path, **kwargs)
    if device is not None:
        model.to(device)
    return model


GROUPED_KV_SDPA = "sdpa_grouped_kv"  # the attention implementation use_grouped_kv_sdpa switches a model to


def grouped_kv_attention(device: str | torch.device) -> bool:
    """Whether sdpa should take grouped key/value heads as they are, also under an attention mask: on CPU.

    With a mask (left padding, a shared prompt's cache) transformers' sdpa copies each key/value head once
    per query head it serves, at every layer and call; torch's CPU kernel takes grouped heads with a mask
    (``enable_gqa``) and gives the same numbers without the copies (tests/test_prefix.py pins it). On CUDA
    the kernel that masks need takes no grouped heads and would fall back to the slow math kernel.
    """
    return torch.device(device).type == "cpu"


def _grouped_kv_sdpa_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                             is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention with ``enable_gqa`` whenever key/value heads are grouped (also under a mask)."""
    q_length, kv_length = query.shape[2], key.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = q_length > 1 and attention_mask is None and is_causal
    if is_causal and kv_length > q_length:  # prefill into an empty static cache, as transformers' sdpa does
        key, value = key[:, :, :q_length, :], value[:, :, :q_length, :]
    grouped = getattr(module, "num_key_value_groups", 1) > 1
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=is_causal,
        **({"enable_gqa": True} if grouped else {}))
    return out.transpose(1, 2).contiguous(), None


def use_grouped_kv_sdpa(model: torch.nn.Module) -> bool:
    """Switch a loaded model's sdpa attention to grouped key/value heads under masks (GROUPED_KV_SDPA).

    An explicit setting of this model, not an environment variable: call it where
    :func:`grouped_kv_attention` says so (the trainers and the hf engine do on CPU). Other attention
    implementations are left alone. Returns whether the model now uses it.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current == GROUPED_KV_SDPA:
        return True
    if current != "sdpa":
        return False
    AttentionInterface.register(GROUPED_KV_SDPA, _grouped_kv_sdpa_forward)
    AttentionMaskInterface.register(GROUPED_KV_SDPA, sdpa_mask)
    model.set_attn_implementation(GROUPED_KV_SDPA)
    return True


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module under DDP / accelerate / torch.compile wrappers (PEFT wrappers are kept)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


def vision_tower(model: torch.nn.Module) -> torch.nn.Module | None:
    """The vision encoder of a Qwen-VL model (also inside PEFT / accelerate wrappers)."""
    for name, module in model.named_modules():
        if name.endswith("visual") and hasattr(module, "blocks"):
            return module
    return None


def freeze_vision(model: torch.nn.Module) -> int:
    """Freeze the vision tower; returns the number of frozen parameters."""
    tower = vision_tower(model)
    if tower is None:
        raise ValueError("this model has no vision tower named 'visual' to freeze")
    n = 0
    for p in tower.parameters():
        p.requires_grad_(False)
        n += p.numel()
    return n
