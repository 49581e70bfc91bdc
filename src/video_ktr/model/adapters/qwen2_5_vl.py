"""Qwen2.5-VL: Qwen2-VL's geometry and video processor, windowed vision attention, and absolute time
in M-RoPE (``second_per_grid_ts`` per video: seconds per temporal grid step)."""

from __future__ import annotations

from typing import Any

from video_ktr.model.adapters.base import TinySizes
from video_ktr.model.adapters.qwen2_vl import Qwen2VLAdapter


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    model_types = ("qwen2_5_vl",)
    decoder_layer = "Qwen2_5_VLDecoderLayer"
    vision_block = "Qwen2_5_VLVisionBlock"
    per_item_times = "second_per_grid_ts"

    def check_tiny_sizes(self, sizes: TinySizes) -> None:
        pass

    def tiny_config(self, text: dict[str, Any], common: dict[str, Any], sizes: TinySizes) -> Any:
        from transformers import Qwen2_5_VLConfig

        vision = {
            "depth": sizes.vision_depth, "hidden_size": sizes.vision_hidden_size,
            "intermediate_size": sizes.vision_intermediate_size, "num_heads": sizes.vision_num_heads,
            "hidden_act": "silu", "in_channels": 3, "patch_size": self.patch_size,
            "spatial_merge_size": self.merge_size, "temporal_patch_size": self.temporal_patch_size,
            "tokens_per_second": 2, "window_size": 56,
            "fullatt_block_indexes": [i for i in (1, 3, 5, 7) if i < sizes.vision_depth] or [sizes.vision_depth - 1],
            "out_hidden_size": sizes.hidden_size,
        }
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **common)

    def _processor_class(self) -> type:
        from transformers import Qwen2_5_VLProcessor

        return Qwen2_5_VLProcessor

    def model_class(self) -> type:
        from transformers import Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration
