"""What differs between vision-language model families, behind one interface.

A :class:`ModelAdapter` answers the questions the rest of the package would otherwise answer by
reading ``config.model_type``: the vision geometry (patch, spatial merge, temporal patch and the
frame-side factor they imply), which input keys carry the visual item, the layer classes a sharded
run wraps, how a processed video's pixel rows are laid out (for the temporal probe's permutation
without a second processor call), and how a small random checkpoint of the family is built
(``make-tiny-model --arch``). :func:`video_ktr.model.adapters.adapter_for` is the one place that
maps a model, config or family name to its adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Keys that carry one visual item's data (pixels, grids, per-item times) in a processed batch.
VISUAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
PIXEL_KEYS = ("pixel_values", "pixel_values_videos")


def select_encoder_items(encoded: Any, items: list[int]) -> Any:
    """The encoder output (``mm_encoder_outputs[modality]``) of the listed items, in that order: the
    per-item features and, where the family has them (Qwen3-VL), the per-layer DeepStack features."""
    out = type(encoded)(pooler_output=tuple(encoded.pooler_output[i] for i in items))
    deep = getattr(encoded, "deepstack_features", None)
    if deep is not None:
        out["deepstack_features"] = [tuple(layer[i] for i in items) for layer in deep]
    return out


@dataclass(frozen=True)
class TinySizes:
    """The sizes of a tiny random checkpoint (see model.tiny.TinyModelArgs)."""

    hidden_size: int
    vision_depth: int
    vision_hidden_size: int
    vision_intermediate_size: int
    vision_num_heads: int


class ModelAdapter:
    """One model family. Subclasses set the class attributes and the builders."""

    model_types: tuple[str, ...] = ()  # config.model_type values this adapter serves (first = its name)
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    decoder_layer: str = ""  # text decoder layer class name
    vision_block: str = ""  # vision tower block class name
    per_item_times: str | None = None  # per-video key with seconds per temporal grid step, if the family uses one
    timestamps_in_text: bool = False  # the processor writes each frame group's time into the prompt text

    @property
    def name(self) -> str:
        return self.model_types[0]

    @property
    def frame_factor(self) -> int:
        """Frame sides are multiples of this (patch x spatial merge)."""
        return self.patch_size * self.merge_size

    @property
    def visual_keys(self) -> tuple[str, ...]:
        keys = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
        return keys + ((self.per_item_times,) if self.per_item_times else ())

    def wrap_classes(self) -> tuple[str, str]:
        """The module class names FSDP wraps one by one (accelerate's TRANSFORMER_BASED_WRAP)."""
        return (self.decoder_layer, self.vision_block)

    def video_size(self, shapes: list[tuple[int, int, int]]) -> dict[str, int]:
        """The processor's ``size`` bounds that leave videos of these (frames, height, width) unresized:
        per-frame area bounds (Qwen2-VL's video processor bounds one frame)."""
        areas = [h * w for _, h, w in shapes]
        return {"shortest_edge": min(areas), "longest_edge": max(areas)}

    # -- precomputed visual features (mm_encoder_outputs) ------------------------------------------
    def deepstack_layers(self, config: Any) -> int:
        """How many decoder layers receive visual features besides the input embeddings (DeepStack)."""
        return 0

    def zero_features(self, config: Any, sizes: list[int], hidden: int, dtype: Any, device: Any) -> Any:
        """An encoder output whose features (and DeepStack features) are all zero, ``sizes`` rows per item."""
        import torch
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        def zeros() -> tuple:
            return tuple(torch.zeros(int(n), hidden, dtype=dtype, device=device) for n in sizes)

        out = BaseModelOutputWithPooling(pooler_output=zeros())
        layers = self.deepstack_layers(config)
        if layers:
            out["deepstack_features"] = [zeros() for _ in range(layers)]
        return out

    # -- the video processor's patch layout -------------------------------------------------------
    def video_processor_class(self) -> type:
        raise NotImplementedError

    def patch_layout(self, processor: Any) -> tuple[int, int] | None:
        """(temporal_patch_size, patch_size) when ``processor``'s video processor is this family's own
        (not a subclass that lays patches out its own way), else None."""
        cls = self.video_processor_class()
        vp = getattr(processor, "video_processor", None)
        if not isinstance(vp, cls):
            return None
        for name in ("patchify", "_preprocess"):
            if getattr(type(vp), name, None) is not getattr(cls, name, None):
                return None
        return int(vp.temporal_patch_size), int(vp.patch_size)

    # -- sizes for `video-ktr estimate` (analysis/model_size.py, analysis/estimate.py) --------------
    # ``arch`` is the estimate's architecture record (analysis.model_size.ModelArch): plain numbers.
    known_checkpoints: dict[str, dict[str, Any]] = {}  # public checkpoint name -> its config.json (no download)

    def _no_estimate(self) -> ValueError:
        return ValueError(f"`video-ktr estimate` does not know the sizes of the {self.name} family yet "
                          "(model/adapters: its vision_sizes and vision_params)")

    def vision_sizes(self, vision: dict[str, Any], text_hidden: int) -> dict[str, Any]:
        """The estimate's vision fields (hidden / intermediate size, window attention) from config.json's vision_config."""
        raise self._no_estimate()

    def text_sizes(self, text: dict[str, Any]) -> dict[str, Any]:
        """Family-specific text fields of the estimate's architecture from config.json's text part (none here)."""
        return {}

    def text_layer_params(self, arch: Any) -> int:
        """One decoder layer: q, k, v with biases, o, a SwiGLU MLP, two RMSNorms (Qwen2 text)."""
        h, d, nh, kv, inter = arch.hidden_size, arch.head_dim, arch.num_heads, arch.num_kv_heads, arch.intermediate_size
        return (h * nh * d + nh * d) + 2 * (h * kv * d + kv * d) + nh * d * h + 3 * h * inter + 2 * h

    def text_params(self, arch: Any) -> tuple[int, int]:
        """(all decoder layers, the largest one): every layer alike here."""
        layer = self.text_layer_params(arch)
        return arch.num_layers * layer, layer

    def text_lora_shapes(self, arch: Any) -> dict[str, tuple[int, int]]:
        h, d, nh, kv, inter = arch.hidden_size, arch.head_dim, arch.num_heads, arch.num_kv_heads, arch.intermediate_size
        return {"q_proj": (h, nh * d), "k_proj": (h, kv * d), "v_proj": (h, kv * d), "o_proj": (nh * d, h),
                "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}

    def text_lora_params(self, arch: Any, r: int, targets: Any) -> int:
        """LoRA's r x (in + out) over the decoder layers' Linears whose last name is a target (as PEFT matches)."""
        shapes = self.text_lora_shapes(arch)
        return sum(r * sum(shapes[t]) for t in targets if t in shapes) * arch.num_layers

    def mlp_width(self, arch: Any) -> float:
        """The MLP width a token's activations pass through, averaged over the decoder layers."""
        return float(arch.intermediate_size)

    def vision_params(self, arch: Any) -> int:
        """The vision tower: patch embedding, blocks, patch merger."""
        raise self._no_estimate()

    def vision_lora_shapes(self, arch: Any) -> dict[str, tuple[int, int]]:
        """(in, out) of the vision block's Linears whose names PEFT's LoRA targets match (per block)."""
        return {}

    def vision_activation_bytes(self, arch: Any, dtype_bytes: int, flash: bool) -> float:
        """Bytes a vision block keeps for backward per patch."""
        raise self._no_estimate()

    def full_attention_blocks(self, arch: Any) -> int:
        """Vision blocks that attend over a whole frame pair (the others use windows)."""
        return arch.vision_depth

    def known_config(self, model_id: str) -> tuple[str, dict[str, Any]] | None:
        """(name, config.json) of a public checkpoint a hub id names (``Video-R1/Qwen2.5-VL-7B-COT-SFT``), else None."""
        import re

        key = model_id.replace("_", ".").lower()
        for name, raw in self.known_checkpoints.items():
            if re.search(re.escape(name.lower()) + r"(?![0-9a-z.])", key):
                return name, raw
        return None

    # -- tiny random checkpoints ------------------------------------------------------------------
    def tiny_config(self, text: dict[str, Any], common: dict[str, Any], sizes: TinySizes) -> Any:
        raise NotImplementedError

    def tiny_processor(self, tokenizer: Any, size: dict[str, int], chat_template: str) -> Any:
        raise NotImplementedError

    def model_class(self) -> type:
        raise NotImplementedError

    def check_tiny_sizes(self, sizes: TinySizes) -> None:
        """Raise ValueError for sizes the family's config cannot express."""

    # -- mixture-of-experts routers -----------------------------------------------------------------
    def router_loss(self, model: Any) -> Any:
        """A router_loss.RouterLoss hooked into ``model`` when the family routes tokens to experts and the
        model's config asks for the router logits (``output_router_logits``), else None (dense families)."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
