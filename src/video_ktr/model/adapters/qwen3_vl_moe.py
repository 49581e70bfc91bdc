"""Qwen3-VL-MoE (``qwen3_vl_moe``): Qwen3-VL's vision tower, processor, inputs, M-RoPE and DeepStack, with
sparse mixture-of-experts MLPs in the text decoder. Everything the trainers, probes and rollout ask of a
family is Qwen3-VL's; what differs is the model and config classes, the decoder layer FSDP wraps and the
tiny checkpoint's experts.

The router's load-balancing loss is not added to the training loss (the config's ``output_router_logits`` is
left off, as the checkpoints ship it); the policy gradient flows through the routed experts only.
"""

from __future__ import annotations

from typing import Any

from video_ktr.model.adapters.qwen3_vl import Qwen3VLAdapter

# the tiny checkpoint's experts: 4 of half the dense MLP width, 2 routed per token (Qwen3-VL-30B-A3B: 128, 8)
TINY_EXPERTS, TINY_EXPERTS_PER_TOKEN = 4, 2


class Qwen3VLMoeAdapter(Qwen3VLAdapter):
    model_types = ("qwen3_vl_moe",)
    decoder_layer = "Qwen3VLMoeTextDecoderLayer"
    vision_block = "Qwen3VLMoeVisionBlock"

    def make_config(self, text: dict[str, Any], vision: dict[str, Any], common: dict[str, Any]) -> Any:
        from transformers import Qwen3VLMoeConfig

        moe = {"num_experts": TINY_EXPERTS, "num_experts_per_tok": TINY_EXPERTS_PER_TOKEN,
               "moe_intermediate_size": max(8, text["intermediate_size"] // 2), "decoder_sparse_step": 1,
               "mlp_only_layers": [], "router_aux_loss_coef": 0.001, "output_router_logits": False}
        return Qwen3VLMoeConfig(text_config={**text, **moe}, vision_config=vision, **common)

    def model_class(self) -> type:
        from transformers import Qwen3VLMoeForConditionalGeneration

        return Qwen3VLMoeForConditionalGeneration
