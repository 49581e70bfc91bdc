"""Qwen2-VL: patch 14, merge 2, temporal patch 2, M-RoPE over (t, h, w) without per-video times."""

from __future__ import annotations

from typing import Any

from video_ktr.model.adapters.base import ModelAdapter, TinySizes


class Qwen2VLAdapter(ModelAdapter):
    model_types = ("qwen2_vl",)
    decoder_layer = "Qwen2VLDecoderLayer"
    vision_block = "Qwen2VLVisionBlock"

    def vision_sizes(self, vision: dict[str, Any], text_hidden: int) -> dict[str, Any]:
        embed = int(vision["embed_dim"])
        return {"vision_hidden_size": embed, "vision_intermediate_size": int(embed * vision.get("mlp_ratio", 4)),
                "vision_out_size": int(vision.get("hidden_size", text_hidden)), "window_size": 0, "fullatt_block_indexes": []}

    def _patch_and_attention(self, arch: Any) -> tuple[int, int, int]:
        hv = arch.vision_hidden_size
        patch = arch.in_channels * arch.temporal_patch_size * arch.patch_size**2 * hv
        attn = (hv * 3 * hv + 3 * hv) + (hv * hv + hv)  # qkv and proj with biases
        return patch, attn, hv * arch.spatial_merge_size**2

    def vision_params(self, arch: Any) -> int:
        """LayerNorm x2 and an fc1 / fc2 MLP with biases per block; the merger's LayerNorm and two Linears."""
        hv, iv = arch.vision_hidden_size, arch.vision_intermediate_size
        patch, attn, merged = self._patch_and_attention(arch)
        block = 4 * hv + attn + (hv * iv + iv) + (iv * hv + hv)
        merger = 2 * hv + (merged * merged + merged) + (merged * arch.vision_out_size + arch.vision_out_size)
        return patch + arch.vision_depth * block + merger

    def vision_activation_bytes(self, arch: Any, dtype_bytes: int, flash: bool) -> float:
        """LayerNorms, the qkv output (v a view of it), q and k after rope, attention out, proj input, fc1 / act / fc2."""
        b, hv = dtype_bytes, arch.vision_hidden_size
        return 2 * (2 * b) * hv + (6 if flash else 7) * b * hv + 3 * b * arch.vision_intermediate_size

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
