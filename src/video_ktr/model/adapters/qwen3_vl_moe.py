"""Qwen3-VL-MoE (``qwen3_vl_moe``): Qwen3-VL's vision tower, processor, inputs, M-RoPE and DeepStack, with
sparse mixture-of-experts MLPs in the text decoder. Everything the trainers, probes and rollout ask of a
family is Qwen3-VL's; what differs is the model and config classes, the decoder layer FSDP wraps and the
tiny checkpoint's experts.

The router's load-balancing loss is added to the GRPO loss when the checkpoint's text config has
``output_router_logits`` on (``router_aux_loss_coef`` x transformers' load-balancing loss, as TRL adds it;
adapters/router_loss.py); the released checkpoints leave it off, and then the policy gradient flows through
the routed experts only.
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

    # -- sizes for `video-ktr estimate` -----------------------------------------------------------------
    def text_sizes(self, text: dict[str, Any]) -> dict[str, Any]:
        """Experts, their width, how many a token goes through, and which layers are sparse (every
        decoder_sparse_step-th one not in mlp_only_layers, as the decoder layer decides)."""
        experts = int(text.get("num_experts", text.get("num_local_experts", 0)) or 0)
        layers, step = int(text["num_hidden_layers"]), int(text.get("decoder_sparse_step", 1) or 1)
        dense_only = set(text.get("mlp_only_layers") or ())
        sparse = sum(1 for i in range(layers) if i not in dense_only and experts > 0 and (i + 1) % step == 0)
        return {"num_experts": experts, "moe_intermediate_size": int(text.get("moe_intermediate_size", 0) or 0),
                "experts_per_token": int(text.get("num_experts_per_tok", 0) or 0), "sparse_layers": sparse}

    def text_layer_params(self, arch: Any) -> int:
        return self.text_params(arch)[1]

    def _sparse_mlp(self, arch: Any) -> int:
        """The experts (gate_up_proj and down_proj as 3-D parameters) and the router."""
        h, experts = arch.hidden_size, arch.num_experts
        return experts * 3 * h * arch.moe_intermediate_size + experts * h

    def text_params(self, arch: Any) -> tuple[int, int]:
        dense = arch.num_layers - arch.sparse_layers
        base, dense_mlp = self._attention_and_norms(arch), 3 * arch.hidden_size * arch.intermediate_size
        total = arch.num_layers * base + dense * dense_mlp + arch.sparse_layers * self._sparse_mlp(arch)
        largest = base + max(dense_mlp if dense else 0, self._sparse_mlp(arch) if arch.sparse_layers else 0)
        return total, largest

    def text_lora_params(self, arch: Any, r: int, targets: Any) -> int:
        """The attention's Linears in every layer; gate/up/down_proj only in the dense layers (the experts are
        3-D parameters, not Linears, and PEFT's target_modules does not match them)."""
        shapes = self.text_lora_shapes(arch)
        attn = sum(r * sum(shapes[t]) for t in targets if t in ("q_proj", "k_proj", "v_proj", "o_proj"))
        mlp = sum(r * sum(shapes[t]) for t in targets if t in ("gate_proj", "up_proj", "down_proj"))
        return arch.num_layers * attn + (arch.num_layers - arch.sparse_layers) * mlp

    def mlp_width(self, arch: Any) -> float:
        """A token in a sparse layer passes through experts_per_token experts of moe_intermediate_size (its
        activations are kept once per routed expert); averaged with the dense layers' width. An approximation:
        the router's logits and the routed copies of the hidden state are not counted."""
        dense = arch.num_layers - arch.sparse_layers
        routed = arch.experts_per_token * arch.moe_intermediate_size
        return (dense * arch.intermediate_size + arch.sparse_layers * routed) / arch.num_layers

    def make_config(self, text: dict[str, Any], vision: dict[str, Any], common: dict[str, Any]) -> Any:
        from transformers import Qwen3VLMoeConfig

        moe = {"num_experts": TINY_EXPERTS, "num_experts_per_tok": TINY_EXPERTS_PER_TOKEN,
               "moe_intermediate_size": max(8, text["intermediate_size"] // 2), "decoder_sparse_step": 1,
               "mlp_only_layers": [], "router_aux_loss_coef": 0.001, "output_router_logits": False}
        return Qwen3VLMoeConfig(text_config={**text, **moe}, vision_config=vision, **common)

    def model_class(self) -> type:
        from transformers import Qwen3VLMoeForConditionalGeneration

        return Qwen3VLMoeForConditionalGeneration

    def router_loss(self, model: Any) -> Any:
        """Hooks Qwen3VLMoeModel (its forward returns the text decoder's router logits to the top-level one)
        when ``text_config.output_router_logits`` is on; the loss is transformers' own load_balancing_loss_func
        with the config's experts, experts per token and ``router_aux_loss_coef``."""
        from transformers import Qwen3VLMoeModel
        from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import load_balancing_loss_func

        from video_ktr.model.adapters.router_loss import RouterLoss

        text = model.config.text_config
        if not getattr(text, "output_router_logits", False):
            return None
        inner = [m for m in model.modules() if isinstance(m, Qwen3VLMoeModel)]
        if not inner:
            raise ValueError(f"{type(model).__name__} holds no Qwen3VLMoeModel: the router loss cannot be taken")
        return RouterLoss(inner, coef=text.router_aux_loss_coef, num_experts=text.num_experts,
                          top_k=text.num_experts_per_tok, loss_fn=load_balancing_loss_func)
