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

    # The public checkpoints' sizes, WRITTEN FROM MEMORY of their config.json (not downloaded, not checked
    # against the files here): `video-ktr estimate --model_config` reads the real file.
    known_checkpoints = {
        f"Qwen2.5-VL-{size}": {
            "model_type": "qwen2_5_vl", "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "intermediate_size": inter, "vocab_size": vocab, "tie_word_embeddings": tie,
            "torch_dtype": "bfloat16",
            "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": v_inter, "num_heads": 16,
                              "out_hidden_size": hidden, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
                              "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_chans": 3},
        }
        for size, hidden, layers, heads, kv, inter, vocab, tie, v_inter in (
            ("3B", 2048, 36, 16, 2, 11008, 151936, True, 3420),
            ("7B", 3584, 28, 28, 4, 18944, 152064, False, 3420),
            ("32B", 5120, 64, 40, 8, 27648, 152064, False, 3456),
            ("72B", 8192, 80, 64, 8, 29568, 152064, False, 3456),
        )
    }

    def vision_sizes(self, vision: dict[str, Any], text_hidden: int) -> dict[str, Any]:
        return {"vision_hidden_size": int(vision["hidden_size"]), "vision_intermediate_size": int(vision["intermediate_size"]),
                "vision_out_size": int(vision.get("out_hidden_size", text_hidden)), "window_size": int(vision.get("window_size", 112)),
                "fullatt_block_indexes": list(vision.get("fullatt_block_indexes", [7, 15, 23, 31]))}

    def vision_params(self, arch: Any) -> int:
        """RMSNorm x2 and a SwiGLU MLP with biases per block; the merger's RMSNorm and two Linears."""
        hv, iv = arch.vision_hidden_size, arch.vision_intermediate_size
        patch, attn, merged = self._patch_and_attention(arch)
        block = 2 * hv + attn + 2 * (hv * iv + iv) + (iv * hv + hv)
        merger = hv + (merged * merged + merged) + (merged * arch.vision_out_size + arch.vision_out_size)
        return patch + arch.vision_depth * block + merger

    def vision_lora_shapes(self, arch: Any) -> dict[str, tuple[int, int]]:
        """The vision MLP's gate_proj / up_proj / down_proj match the default LoRA targets (PEFT matches the last name)."""
        hv, iv = arch.vision_hidden_size, arch.vision_intermediate_size
        return {"gate_proj": (hv, iv), "up_proj": (hv, iv), "down_proj": (iv, hv)}

    def vision_activation_bytes(self, arch: Any, dtype_bytes: int, flash: bool) -> float:
        """RMSNorms (fp32 input copy + normalised + output), attention as Qwen2-VL's, SwiGLU: gate, act, up, product."""
        b, hv = dtype_bytes, arch.vision_hidden_size
        return 2 * (4 + 2 * b) * hv + (6 if flash else 7) * b * hv + 4 * b * arch.vision_intermediate_size

    def full_attention_blocks(self, arch: Any) -> int:
        return len([i for i in arch.fullatt_block_indexes if i < arch.vision_depth])

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
