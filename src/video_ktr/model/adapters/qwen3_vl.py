"""Qwen3-VL (dense; the MoE variant, with the same inputs, is :mod:`.qwen3_vl_moe`): patch 16, merge 2
(frame sides multiples of 32), temporal patch 2; interleaved M-RoPE whose temporal index is the frame group (time is written into
the prompt as ``<t seconds>`` before each frame group, so no ``second_per_grid_ts``); DeepStack visual
features injected into the first decoder layers (the model computes them from the pixels it is given).

The video processor bounds the area of the whole video (frames x height x width), not of one frame,
so the bounds that leave our own frames untouched are per video.
"""

from __future__ import annotations

from typing import Any

from video_ktr.model.adapters.base import ModelAdapter, TinySizes


class Qwen3VLAdapter(ModelAdapter):
    model_types = ("qwen3_vl",)
    patch_size = 16
    decoder_layer = "Qwen3VLTextDecoderLayer"
    vision_block = "Qwen3VLVisionBlock"
    timestamps_in_text = True

    def video_processor_class(self) -> type:
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

        return Qwen3VLVideoProcessor

    def video_size(self, shapes: list[tuple[int, int, int]]) -> dict[str, int]:
        """Bounds over frames x height x width (the temporal count rounded as the processor rounds it)."""
        tp = self.temporal_patch_size
        areas = [round(t / tp) * tp * h * w for t, h, w in shapes]
        return {"shortest_edge": min(areas), "longest_edge": max(areas)}

    # -- sizes for `video-ktr estimate` (no public checkpoint table: pass --model_config) ------------
    def vision_sizes(self, vision: dict[str, Any], text_hidden: int) -> dict[str, Any]:
        return {"vision_hidden_size": int(vision["hidden_size"]), "vision_intermediate_size": int(vision["intermediate_size"]),
                "vision_out_size": int(vision.get("out_hidden_size", text_hidden)), "window_size": 0,
                "fullatt_block_indexes": [], "num_position_embeddings": int(vision.get("num_position_embeddings", 0)),
                "deepstack_layers": len(vision.get("deepstack_visual_indexes") or ())}

    def text_layer_params(self, arch: Any) -> int:
        """Qwen3 text: q, k, v, o (biases only with attention_bias), RMSNorms over the head dim on q and k,
        a SwiGLU MLP, two RMSNorms. The MoE variant's experts are not counted: refused."""
        if arch.num_experts:
            raise ValueError(f"`video-ktr estimate` does not count mixture-of-experts text layers ({arch.num_experts} "
                             "experts per layer): the Qwen3-VL MoE variant is not modelled")
        return self._attention_and_norms(arch) + 3 * arch.hidden_size * arch.intermediate_size

    def _attention_and_norms(self, arch: Any) -> int:
        h, d, nh, kv = arch.hidden_size, arch.head_dim, arch.num_heads, arch.num_kv_heads
        bias = bool(arch.attention_bias)
        attn = h * nh * d + 2 * h * kv * d + nh * d * h + (nh * d + 2 * kv * d + h if bias else 0)
        return attn + 2 * d + 2 * h

    def vision_params(self, arch: Any) -> int:
        """Conv3d patch embedding with bias, the learned position table, LayerNorm x2 + qkv / proj + fc1 / fc2 (all
        with biases) per block, the merger (LayerNorm over the hidden size) and one DeepStack merger per
        tapped block (LayerNorm over the merged width)."""
        hv, iv = arch.vision_hidden_size, arch.vision_intermediate_size
        patch = arch.in_channels * arch.temporal_patch_size * arch.patch_size**2 * hv + hv
        attn = (hv * 3 * hv + 3 * hv) + (hv * hv + hv)
        block = 4 * hv + attn + (hv * iv + iv) + (iv * hv + hv)
        merged = hv * arch.spatial_merge_size**2
        linears = (merged * merged + merged) + (merged * arch.vision_out_size + arch.vision_out_size)
        mergers = (2 * hv + linears) + arch.deepstack_layers * (2 * merged + linears)
        return patch + arch.num_position_embeddings * hv + arch.vision_depth * block + mergers

    def vision_activation_bytes(self, arch: Any, dtype_bytes: int, flash: bool) -> float:
        """As Qwen2-VL's blocks: LayerNorms, attention, fc1 / act / fc2 (the DeepStack mergers not counted)."""
        b, hv = dtype_bytes, arch.vision_hidden_size
        return 2 * (2 * b) * hv + (6 if flash else 7) * b * hv + 3 * b * arch.vision_intermediate_size

    def deepstack_layers(self, config: Any) -> int:
        return len(getattr(getattr(config, "vision_config", None), "deepstack_visual_indexes", ()) or ())

    def check_tiny_sizes(self, sizes: TinySizes) -> None:
        pass

    def tiny_config(self, text: dict[str, Any], common: dict[str, Any], sizes: TinySizes) -> Any:
        keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "bos_token_id",
                "eos_token_id", "pad_token_id")
        text = {k: v for k, v in text.items() if k in keep}
        head_dim = text["hidden_size"] // text["num_attention_heads"]
        text["head_dim"] = head_dim
        half = head_dim // 2  # Qwen3-VL's [24, 20, 20] for 128: h and w equal, t takes the rest
        hw = (half * 5 // 16) // 2 * 2 or 2
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 5000000.0,
                                   "mrope_section": [half - 2 * hw, hw, hw], "mrope_interleaved": True}
        depth = sizes.vision_depth
        vision = {
            "depth": depth, "hidden_size": sizes.vision_hidden_size,
            "intermediate_size": sizes.vision_intermediate_size, "num_heads": sizes.vision_num_heads,
            "hidden_act": "gelu_pytorch_tanh", "in_channels": 3, "patch_size": self.patch_size,
            "spatial_merge_size": self.merge_size, "temporal_patch_size": self.temporal_patch_size,
            "out_hidden_size": sizes.hidden_size, "num_position_embeddings": 64,
            "deepstack_visual_indexes": list(range(min(depth, 3))) if depth > 1 else [0],
        }
        return self.make_config(text, vision, common)

    def make_config(self, text: dict[str, Any], vision: dict[str, Any], common: dict[str, Any]) -> Any:
        """The family's config from the tiny text, vision and shared settings (the MoE variant adds its experts)."""
        from transformers import Qwen3VLConfig

        return Qwen3VLConfig(text_config=text, vision_config=vision, **common)

    def tiny_processor(self, tokenizer: Any, size: dict[str, int], chat_template: str) -> Any:
        from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor

        geometry = {"patch_size": self.patch_size, "merge_size": self.merge_size,
                    "temporal_patch_size": self.temporal_patch_size}
        image_processor = Qwen2VLImageProcessor(size=dict(size), **geometry)
        video_size = {"shortest_edge": size["shortest_edge"], "longest_edge": size["longest_edge"] * 64}
        video_processor = self.video_processor_class()(size=video_size, do_sample_frames=False, **geometry)
        return Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                video_processor=video_processor, chat_template=chat_template)

    def model_class(self) -> type:
        from transformers import Qwen3VLForConditionalGeneration

        return Qwen3VLForConditionalGeneration
