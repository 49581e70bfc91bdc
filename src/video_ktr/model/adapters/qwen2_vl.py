"""Qwen2-VL: patch 14, merge 2, temporal patch 2, M-RoPE over (t, h, w) without per-video times."""

from __future__ import annotations

from typing import Any

from video_ktr.model.adapters.base import ModelAdapter, TinySizes


class Qwen2VLAdapter(ModelAdapter):
    model_types = ("qwen2_vl",)
    decoder_layer = "Qwen2VLDecoderLayer"
    vision_block = "Qwen2VLVisionBlock"

    def video_processor_class(self) -> type:
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

        return Qwen2VLVideoProcessor

    def check_tiny_sizes(self, sizes: TinySizes) -> None:
        if sizes.vision_intermediate_size % sizes.vision_hidden_size:
            raise ValueError("qwen2_vl needs vision_intermediate_size to be a multiple of vision_hidden_size (mlp_ratio)")

    def _vision(self, sizes: TinySizes) -> dict[str, Any]:
        return {
            "depth": sizes.vision_depth, "embed_dim": sizes.vision_hidden_size,
            "mlp_ratio": sizes.vision_intermediate_size // sizes.vision_hidden_size,
            "num_heads": sizes.vision_num_heads, "hidden_act": "quick_gelu", "in_channels": 3,
            "patch_size": self.patch_size, "spatial_merge_size": self.merge_size,
            "temporal_patch_size": self.temporal_patch_size,
            "hidden_size": sizes.hidden_size,  # output size of the merger = text hidden size
        }

    def tiny_config(self, text: dict[str, Any], common: dict[str, Any], sizes: TinySizes) -> Any:
        from transformers import Qwen2VLConfig

        return Qwen2VLConfig(text_config=text, vision_config=self._vision(sizes), **common)

    def _processor_class(self) -> type:
        from transformers import Qwen2VLProcessor

        return Qwen2VLProcessor

    def tiny_processor(self, tokenizer: Any, size: dict[str, int], chat_template: str) -> Any:
        from transformers import Qwen2VLImageProcessor

        geometry = {"patch_size": self.patch_size, "merge_size": self.merge_size,
                    "temporal_patch_size": self.temporal_patch_size}
        image_processor = Qwen2VLImageProcessor(size=dict(size), **geometry)
        video_processor = self.video_processor_class()(
            size=dict(size), do_sample_frames=False, cap_pixels_per_frame=False, **geometry)
        return self._processor_class()(image_processor=image_processor, tokenizer=tokenizer,
                                       video_processor=video_processor, chat_template=chat_template)

    def model_class(self) -> type:
        from transformers import Qwen2VLForConditionalGeneration

        return Qwen2VLForConditionalGeneration
