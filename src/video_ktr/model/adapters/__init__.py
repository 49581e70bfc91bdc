"""Model adapters: one per family; :func:`adapter_for` is the only reader of ``model_type``."""

from __future__ import annotations

import dataclasses
from typing import Any

from video_ktr.model.adapters.base import (
    PIXEL_KEYS,
    VISUAL_KEYS,
    ModelAdapter,
    TinySizes,
    select_encoder_items,
)
from video_ktr.model.adapters.qwen2_5_vl import Qwen2_5_VLAdapter
from video_ktr.model.adapters.qwen2_vl import Qwen2VLAdapter
from video_ktr.model.adapters.qwen3_vl import Qwen3VLAdapter
from video_ktr.model.adapters.qwen3_vl_moe import Qwen3VLMoeAdapter

# processor_adapter takes the first adapter whose video processor matches: Qwen3-VL before its MoE variant
# (the same processor and geometry)
ADAPTERS: tuple[ModelAdapter, ...] = (Qwen2_5_VLAdapter(), Qwen2VLAdapter(), Qwen3VLAdapter(), Qwen3VLMoeAdapter())
FAMILIES: tuple[str, ...] = tuple(a.name for a in ADAPTERS)
DEFAULT_FAMILY = "qwen2_5_vl"  # what make-tiny-model and the demo build unless told otherwise

__all__ = ["ADAPTERS", "DEFAULT_FAMILY", "FAMILIES", "PIXEL_KEYS", "VISUAL_KEYS", "ModelAdapter", "TinySizes", "adapter_for", "frames_for",
           "patch_layout", "processor_adapter", "router_loss_for", "select_encoder_items", "video_size"]


def _model_type(obj: Any) -> str | None:
    if isinstance(obj, str):
        return obj
    config = getattr(obj, "config", obj)  # a model (possibly wrapped) or its config
    while hasattr(config, "module") and not hasattr(config, "model_type"):
        config = getattr(config.module, "config", config.module)
    return getattr(config, "model_type", None)


def adapter_for(obj: Any) -> ModelAdapter:
    """The adapter of a model, a config (or its dict) or a family name such as ``"qwen2_5_vl"``."""
    model_type = obj.get("model_type") if isinstance(obj, dict) else _model_type(obj)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise ValueError(f"model_type {model_type!r} has no adapter; supported: {', '.join(FAMILIES)} "
                     "(docs/models.md says how to add a family)")


def processor_adapter(processor: Any) -> ModelAdapter | None:
    """The adapter whose video processor class ``processor`` uses (subclasses included), else None."""
    vp = getattr(processor, "video_processor", None)
    for adapter in ADAPTERS:
        if isinstance(vp, adapter.video_processor_class()):
            return adapter
    return None


def video_size(processor: Any, shapes: list[tuple[int, int, int]]) -> dict[str, int]:
    """The video processor's ``size`` bounds that hold videos of these (frames, height, width) unresized."""
    return (processor_adapter(processor) or ModelAdapter()).video_size(shapes)


def frames_for(processor: Any, settings: Any) -> Any:
    """The frame settings (data.media.FrameSettings) with the side factor of ``processor``'s family
    (28 for Qwen2/2.5-VL, 32 for Qwen3-VL); unchanged for a processor no adapter knows."""
    adapter = processor_adapter(processor)
    if adapter is None or settings is None or settings.factor == adapter.frame_factor:
        return settings
    return dataclasses.replace(settings, factor=adapter.frame_factor)


def router_loss_for(model: Any) -> Any:
    """The router load-balancing loss of a mixture-of-experts ``model`` whose config asks for its router logits
    (adapters/router_loss.RouterLoss, hooked into the model), else None (dense families; MoE checkpoints as
    released)."""
    return adapter_for(model).router_loss(model)


def patch_layout(processor: Any) -> tuple[int, int] | None:
    """(temporal_patch_size, patch_size) of the processor's video processor when a family adapter knows
    its patch layout exactly, else None (the caller re-encodes with the processor)."""
    for adapter in ADAPTERS:
        layout = adapter.patch_layout(processor)
        if layout is not None:
            return layout
    return None
