"""The sizes that an estimate starts from: a model's architecture (from its config.json or the public
checkpoints its family's adapter knows), its parameter counts (with LoRA adapters), and a video's token geometry.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from video_ktr.data.media import smart_nframes, smart_resize
from video_ktr.model.adapters import ADAPTERS, ModelAdapter, adapter_for

GiB = float(2**30)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ASSUMED_SOURCE_FPS = 30.0  # frame rate assumed for a video of --video_seconds (only matters for very short videos)
PIXEL_VALUE_BYTES = 4  # the processor returns float32 pixel patches; the trainer keeps them in float32


# --------------------------------------------------------------------------------------------------
# Architecture


@dataclass
class ModelArch:
    """The numbers of a checkpoint that memory depends on; what differs by family comes from its adapter
    (model/adapters: vision_sizes, text_layer_params, vision_params, ...)."""

    family: str  # the model adapter's name (adapters.adapter_for)
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    vision_depth: int
    vision_hidden_size: int
    vision_intermediate_size: int
    vision_num_heads: int
    vision_out_size: int  # output of the patch merger = text hidden size
    head_dim: int | None = None
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    window_size: int = 112  # windowed vision attention (pixels; 0: none)
    fullatt_block_indexes: list[int] = field(default_factory=lambda: [7, 15, 23, 31])
    attention_bias: bool | None = None  # config.json's, where the family has the switch (Qwen3-VL)
    num_experts: int = 0  # mixture-of-experts text MLPs (0: dense)
    moe_intermediate_size: int = 0  # one expert's MLP width
    experts_per_token: int = 0  # experts a token is routed through
    sparse_layers: int = 0  # decoder layers whose MLP is the experts
    num_position_embeddings: int = 0  # learned vision position table (Qwen3-VL)
    deepstack_layers: int = 0  # extra patch mergers feeding decoder layers (Qwen3-VL DeepStack)
    dtype: str = "bfloat16"  # the checkpoint's dtype (used for --dtype auto)
    source: str = ""

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_heads
        self.family = adapter_for(self.family).name  # refuses a family no adapter knows

    @property
    def adapter(self) -> ModelAdapter:
        return adapter_for(self.family)

    @property
    def vision_head_dim(self) -> int:
        return self.vision_hidden_size // self.vision_num_heads


def arch_from_config(raw: dict[str, Any], source: str = "config.json") -> ModelArch:
    """A :class:`ModelArch` from a parsed config.json (text fields at the top level or under text_config)."""
    try:
        adapter = adapter_for(raw)
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None
    text = raw.get("text_config") or {}
    vision = raw.get("vision_config") or {}

    def t(key: str, default: Any = None) -> Any:
        value = text.get(key, raw.get(key, default))
        return default if value is None else value

    if not vision:
        raise ValueError(f"{source}: no vision_config; is this a vision-language checkpoint?")
    tie = raw.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    hidden = int(t("hidden_size"))
    fields: dict[str, Any] = dict(
        family=adapter.name, hidden_size=hidden, num_layers=int(t("num_hidden_layers")),
        num_heads=int(t("num_attention_heads")), num_kv_heads=int(t("num_key_value_heads", t("num_attention_heads"))),
        intermediate_size=int(t("intermediate_size")), vocab_size=int(t("vocab_size")), tie_word_embeddings=bool(tie),
        head_dim=t("head_dim"), patch_size=int(vision.get("patch_size", adapter.patch_size)),
        temporal_patch_size=int(vision.get("temporal_patch_size", adapter.temporal_patch_size)),
        spatial_merge_size=int(vision.get("spatial_merge_size", adapter.merge_size)),
        in_channels=int(vision.get("in_channels", vision.get("in_chans", 3))),
        vision_depth=int(vision["depth"]), vision_num_heads=int(vision["num_heads"]),
        dtype=str(raw.get("dtype") or raw.get("torch_dtype") or t("dtype") or t("torch_dtype") or "bfloat16"),
        attention_bias=t("attention_bias"), num_experts=int(t("num_experts", t("num_local_experts", 0)) or 0),
        source=source,
    )
    fields.update(adapter.text_sizes({**raw, **text}))  # what differs by family comes from its adapter
    fields.update(adapter.vision_sizes(vision, hidden))
    return ModelArch(**fields)


# The public checkpoints the families' adapters know by name (their config.json written from memory, not
# downloaded): name -> architecture. A hub id containing the name (Video-R1/Qwen2.5-VL-7B-COT-SFT) uses it.
KNOWN_MODELS: dict[str, ModelArch] = {
    name: arch_from_config(raw, source=f"built-in table: {name} (values written from memory of the public "
                           f"Qwen/{name}-Instruct config.json, not read from a file; pass --model_config to use the real one)")
    for adapter in ADAPTERS for name, raw in adapter.known_checkpoints.items()
}


def resolve_arch(model_name_or_path: str, model_config: str | None = None) -> ModelArch:
    """--model_config (a directory or a JSON file), else the local model directory, else the built-in table."""
    for candidate in ([model_config] if model_config else []) + [model_name_or_path]:
        p = Path(candidate)
        file = p / "config.json" if p.is_dir() else p
        if file.is_file() and file.suffix == ".json":
            return arch_from_config(json.loads(file.read_text()), source=str(file))
        if candidate == model_config:
            raise FileNotFoundError(f"--model_config {model_config}: no config.json there")
    for adapter in ADAPTERS:
        known = adapter.known_config(model_name_or_path)
        if known:
            return dataclasses.replace(KNOWN_MODELS[known[0]])
    raise ValueError(
        f"cannot tell the architecture of {model_name_or_path!r}: it is not a local directory with a config.json "
        f"and not a hub id naming one of {', '.join(KNOWN_MODELS)}; pass --model_config DIR_OR_JSON"
    )


# --------------------------------------------------------------------------------------------------
# Parameters


def count_params(arch: ModelArch, lora_r: int = 0, lora_targets: list[str] | tuple[str, ...] = ()) -> dict[str, int]:
    """Exact parameter counts of the transformers implementation (checked against the tiny model in tests);
    the per-family parts come from the model's adapter.

    LoRA counts r x (in + out) per adapted Linear, matching module names by their last component as PEFT
    does: in Qwen2.5-VL the vision blocks' gate_proj / up_proj / down_proj match the default targets too.
    """
    adapter = arch.adapter
    h, V = arch.hidden_size, arch.vocab_size
    layers, layer = adapter.text_params(arch)
    text = V * h + layers + h + (0 if arch.tie_word_embeddings else V * h)
    vision = adapter.vision_params(arch)
    lora_text = adapter.text_lora_params(arch, lora_r, lora_targets)
    vshapes = adapter.vision_lora_shapes(arch)
    lora_vision = sum(lora_r * sum(vshapes[t]) for t in lora_targets if t in vshapes) * arch.vision_depth
    return {"text": text, "vision": vision, "total": text + vision, "lora": lora_text + lora_vision,
            "lora_vision": lora_vision, "text_layer": layer, "embedding": V * h}


# --------------------------------------------------------------------------------------------------
# Tokens


def video_geometry(cfg: Any, video_seconds: float, video_size: tuple[int, int] | None = None,
                   arch: ModelArch | None = None) -> dict[str, Any]:
    """Frames, frame size and visual tokens of one video under the config's frame settings.

    Frames: ``smart_nframes`` of a video of ``video_seconds`` at an assumed 30 fps source rate. Frame size:
    ``smart_resize`` of ``video_size`` (H, W) when given, else the worst case: the largest multiple of
    28 x 28 within the per-frame pixel budget.
    """

    settings = cfg.frame_settings()
    patch = arch.patch_size if arch else 14
    merge = arch.spatial_merge_size if arch else 2
    tps = arch.temporal_patch_size if arch else 2
    factor = patch * merge
    total = max(1, round(video_seconds * ASSUMED_SOURCE_FPS))
    nframes = smart_nframes(total, ASSUMED_SOURCE_FPS, settings)
    max_px = settings.frame_max_pixels(nframes)
    if video_size:
        fh, fw = smart_resize(video_size[0], video_size[1], factor, settings.min_pixels, max_px, rule=settings.frame_rule)
        per_pair = (fh // factor) * (fw // factor)
        size = f"{fh}x{fw}"
    else:
        per_pair = max(math.ceil(settings.min_pixels / factor**2), int(max_px) // factor**2)
        size = f"worst case: {per_pair} cells of {factor}x{factor} px (<= max_pixels {max_px})"
    grid_t = math.ceil(nframes / tps)
    tokens = grid_t * per_pair
    return {"nframes": nframes, "frame_size": size, "tokens_per_frame_pair": per_pair, "grid_t": grid_t,
            "visual_tokens": tokens, "patches": tokens * merge**2, "patches_per_frame_pair": per_pair * merge**2}
