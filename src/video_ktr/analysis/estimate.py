"""`video-ktr estimate`: a dry-run estimate of the GPU memory and tokens of one training step, per GPU.

Nothing is downloaded and no model is built: the architecture comes from a local ``config.json`` (the
training config's model directory, or ``--model_config``) or, for a hub id, from a built-in table of the
public Qwen2.5-VL sizes. The estimate counts *live tensor bytes* phase by phase; the formulas and the
assumptions behind every number are in docs/estimate.md.

A training step (see trainer.py) goes through these phases, one after the other:

    rollout   generation of P x G completions with a KV cache (no grad)
    probes    visual / temporal probe passes and the reference pass (no grad, text forward over P x G rows)
    policy    the forward with grad over prompt + completion, then the start of the backward
    backward  the end of the backward: all gradients, the vision tower's activations still held
    optimizer the AdamW step

Peak per GPU = static memory (weights, reference model, optimizer states, buffers) + the largest phase.

``measure_peak`` runs real training steps of the tiny CPU model in a subprocess and measures the peak
RSS increase; the tests compare it with this estimate (docs/estimate.md has the numbers).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from video_ktr.analysis.estimate_launch import Launch
from video_ktr.analysis.model_size import (
    DTYPE_BYTES,
    PIXEL_VALUE_BYTES,
    GiB,
    ModelArch,
    count_params,
    video_geometry,
)
from video_ktr.model.scoring import LOGPROB_CHUNK_ELEMENTS
from video_ktr.training.grpo_config import TrainConfig
from video_ktr.training.grpo_stages import ForwardPlan
from video_ktr.training.reference import reference_deepspeed_config
from video_ktr.utils.config import from_dict, load_yaml


@dataclass
class Component:
    name: str
    phase: str
    bytes: float
    note: str = ""


# static components that exist as soon as the model is loaded (the baseline of measure_peak)
LOADED = ("policy weights", "LoRA adapters", "reference model weights", "DDP gradient buckets")
PHASES = ("static", "rollout", "probes", "policy", "backward", "optimizer")
PHASE_TITLES = {
    "static": "static (held for the whole run)",
    "rollout": "rollout: generation with KV cache, no grad",
    "probes": "probe and reference passes, no grad (one pass at a time)",
    "policy": "policy forward with grad + start of the backward",
    "backward": "end of the backward",
    "optimizer": "optimizer step",
}


def _attention_kind(name: str | None) -> str:
    name = (name or "sdpa").lower()
    if "flash" in name:
        return "flash"
    return "eager" if name == "eager" else "sdpa"


def estimate(
    cfg: Any,
    arch: ModelArch,
    *,
    gpu_memory_gb: float = 80.0,
    num_gpus: int = 8,
    zero_stage: int = 0,
    launch: Launch | None = None,
    video_seconds: float = 60.0,
    prompt_text_tokens: int = 200,
    headroom: float = 0.10,
    mixed_precision: str = "auto",
    video_size: tuple[int, int] | None = None,
    completion_tokens: int | None = None,
    suggest: bool = True,
    grouped_heads: bool = False,
) -> dict[str, Any]:
    """Per-GPU memory (bytes, by component and phase) and tokens of one training step of ``cfg`` (a TrainConfig).

    ``completion_tokens`` overrides the completion length (default: max_completion_length, the worst case).
    ``grouped_heads``: sdpa takes the grouped key/value heads as they are under a mask (on CPU, where the
    trainer switches the model to it: model.loading.use_grouped_kv_sdpa); on GPUs sdpa with a mask
    expands them to all heads, the default here.
    """
    launch = launch if launch is not None else Launch.for_zero_stage(zero_stage)  # validates the stage
    z, fsdp = launch.zero_stage, launch.backend == "FSDP"
    if num_gpus < 1:
        raise ValueError(f"num_gpus must be >= 1, got {num_gpus}")
    dtype = arch.dtype if cfg.dtype == "auto" else cfg.dtype
    dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(dtype, dtype)
    b = DTYPE_BYTES.get(dtype, 2)
    N = num_gpus
    h, L, nh, kv, d, V = arch.hidden_size, arch.num_layers, arch.num_heads, arch.num_kv_heads, arch.head_dim, arch.vocab_size
    inter = arch.adapter.mlp_width(arch)  # the MLP width a token's activations pass through (MoE: routed experts)
    hv, iv, Lv_depth = arch.vision_hidden_size, arch.vision_intermediate_size, arch.vision_depth
    attn = _attention_kind(cfg.attn_implementation)
    ckpt = bool(cfg.gradient_checkpointing)
    peft = bool(cfg.use_peft)
    signals = cfg.signals

    # ---------------------------------------------------------------- tokens
    geo = video_geometry(cfg, video_seconds, video_size, arch)
    P, G = cfg.per_device_train_batch_size, cfg.num_generations
    R = P * G
    Lvis = geo["visual_tokens"]
    Lp = prompt_text_tokens + Lvis
    Lc = cfg.max_completion_length if completion_tokens is None else completion_tokens
    S = Lp + Lc
    T = R * S
    patches_video = geo["patches"]
    # the passes as the trainer runs them (decided at set-up; --plain_forwards: every row carries its prompt)
    plan = ForwardPlan.for_run(cfg)
    # the policy pass runs the vision tower once per prompt, or on every row's copy with --plain_forwards
    Rv = P if plan.encode_visual_once else R
    Np = Rv * patches_video
    tokens = {
        **geo, "prompt_text_tokens": prompt_text_tokens, "prompt_tokens": Lp, "completion_tokens": Lc,
        "sequence_tokens": S, "prompts_per_gpu": P, "rows_per_gpu": R, "policy_tokens_per_gpu": T,
        "generated_tokens_per_gpu": R * Lc, "vision_patches_per_gpu": Np,
        "policy_tokens_per_optimizer_step": T * cfg.gradient_accumulation_steps * N,
        "generated_tokens_per_optimizer_step": R * Lc * cfg.gradient_accumulation_steps * N,
    }

    # ---------------------------------------------------------------- parameters and their states
    counts = count_params(arch, cfg.lora_r if peft else 0, cfg.lora_target_modules if peft else ())
    total = counts["total"]
    if peft:
        trainable = counts["lora"]
    else:
        trainable = counts["text"] + (0 if cfg.freeze_vision_tower else counts["vision"])
    vision_trains = (not cfg.freeze_vision_tower) if not peft else counts["lora_vision"] > 0
    # bf16 mixed precision. DeepSpeed (the configs/accelerate/zero*.yaml setting): 16-bit weights, fp32 master copy
    # + fp32 m and v. accelerate's FSDP2: the trainable weights upcast to fp32 (the master), their gradients and
    # m and v in fp32, bf16 copies all-gathered per unit for compute. Without either (DDP, autocast) the trainer's
    # torch AdamW keeps m and v in the weights' dtype. --zero_stage alone: bf16 as in our DeepSpeed configs.
    if mixed_precision == "auto":
        if launch.mixed_precision is None:
            mixed = z >= 1 and b == 2
        else:
            mixed = launch.mixed_precision in ("bf16", "fp16") and launch.backend != "DDP"
    else:
        mixed = mixed_precision in ("yes", "true", True)
    train_b = 4 if peft else b  # PEFT keeps LoRA adapters in fp32 (autocast_adapter_dtype)
    fsdp_master = fsdp and mixed and train_b == 2
    weight_b = 4 if fsdp_master else train_b  # bytes of a trainable weight as held
    grad_b = weight_b
    compute_b = 2 if mixed else b  # the dtype forwards run in (gathered / unsharded weights)
    opt_per_param = 8 if fsdp_master else 12 if (mixed and train_b == 2) else 2 * train_b
    shard_opt = N if z >= 1 else 1
    shard_grad = N if z >= 2 else 1
    shard_par = N if launch.sharded_weights else 1
    on_gpu_opt = 0.0 if launch.offload_optimizer else 1.0
    on_gpu_par = 0.0 if launch.offload_params else 1.0
    off_opt = " (in CPU memory: offloaded)" if launch.offload_optimizer else ""
    off_par = " (in CPU memory: offloaded)" if launch.offload_params else ""

    comps: list[Component] = []

    def add(name: str, phase: str, nbytes: float, note: str = "") -> None:
        comps.append(Component(name, phase, float(nbytes), note))

    sh = f" / {N} GPUs" if shard_par > 1 else ""
    if fsdp_master and not peft:
        add("policy weights", "static", on_gpu_par * (trainable * 4 + (total - trainable) * b) / shard_par,
            f"{_count(trainable)} trainable x 4 B (fp32 master)"
            + (f" + {_count(total - trainable)} frozen x {b} B" if total > trainable else "") + f"{sh}{off_par}")
    else:
        add("policy weights", "static", on_gpu_par * total * b / shard_par,
            f"{_count(total)} params x {b} B ({dtype}){sh}{off_par}")
    if peft:
        add("LoRA adapters", "static", on_gpu_par * trainable * 4 / shard_par, f"{_count(trainable)} params x 4 B (fp32){sh}")
    ref = cfg.beta != 0 and not peft
    if ref:  # held as training/reference.py holds it under this launch
        ref_sharded = fsdp or reference_deepspeed_config({"zero_optimization": {"stage": z}})["zero_optimization"]["stage"] == 3
        how = (f" / {N} GPUs ({'FSDP2 units' if fsdp else 'its own ZeRO-3 engine'})" if ref_sharded and N > 1 else
               "" if ref_sharded else " (whole on each GPU" + (f": a ZeRO-{z} run's reference is a stage-0 engine)" if z else ")"))
        add("reference model weights", "static", on_gpu_par * total * b / (N if ref_sharded else 1),
            f"beta={cfg.beta}: a frozen copy{how}{off_par}")
    opt_note = ("fp32 master + m + v = 12 B/param" if opt_per_param == 12 else f"m + v in {'fp32' if train_b == 4 else dtype} "
                f"= {opt_per_param} B/param (no master copy)")
    if fsdp_master:
        opt_note = "fp32 m + v = 8 B/param (the fp32 master is the weights)"
    add("AdamW states", "static", on_gpu_opt * trainable * opt_per_param / shard_opt,
        f"{_count(trainable)} trainable, {opt_note}" + (f" / {N} GPUs ({launch.label})" if shard_opt > 1 else "") + off_opt)
    if z == 0 and N > 1:
        add("DDP gradient buckets", "static", trainable * grad_b, "DDP keeps a bucket copy of the gradients (gradient_as_bucket_view=False)")
    if z == 3:
        working = max(counts["embedding"], 2 * counts["text_layer"]) * compute_b
        add("ZeRO-3 gathered parameters" if not fsdp else "FSDP2 unsharded units", "static", working,
            "largest of the embedding / two decoder layers, gathered during forward")
    pixel_bytes = Np * arch.in_channels * arch.temporal_patch_size * arch.patch_size**2 * PIXEL_VALUE_BYTES
    add("batch inputs (pixel patches)", "static", pixel_bytes * cfg.gradient_accumulation_steps,
        f"{Np} patches x {arch.in_channels * arch.temporal_patch_size * arch.patch_size**2} values x 4 B, kept per micro-step")

    # ---------------------------------------------------------------- per-token activation factors (bytes)
    norm = 4 + 2 * b  # RMSNorm keeps its fp32 input copy, the normalised value and the output (the next matmul's input)
    kv_unexpanded = attn == "flash" or (attn == "sdpa" and grouped_heads)
    if kv_unexpanded:
        attn_tok = 2 * b * h + 2 * b * kv * d  # q, out; k and v unexpanded (GQA in the kernel)
    else:
        attn_tok = 4 * b * h  # q, k and v expanded to all heads (repeat_kv), out
    a_text = 2 * norm * h + attn_tok + 4 * b * inter  # + MLP: gate, act(gate), up, act*up
    if peft:  # each adapted Linear keeps its own dropout output (+ mask) and the r-wide LoRA A output
        ins = {"q_proj": h, "k_proj": h, "v_proj": h, "o_proj": nh * d, "gate_proj": h, "up_proj": h, "down_proj": inter}
        per = (b + 1) if cfg.lora_dropout > 0 else 0
        a_text += sum(ins[t] * per + cfg.lora_r * b for t in cfg.lora_target_modules if t in ins)
    mask_layer = 0.0
    quad_layer = 0.0
    if attn == "sdpa":
        mask_layer = R * S * S * b  # the padding mask converted to an additive bias, saved per layer
    elif attn == "eager":
        quad_layer = R * nh * S * S * (4 + b)  # fp32 softmax + its cast, per layer

    def once_per_pass(tokens: int, mask_cells: int) -> float:
        """Embeddings, M-RoPE cos/sin, final norm, and the 4-D mask (bool; eager: also additive)."""
        mask = 0 if attn == "flash" else mask_cells * (1 + (b if attn == "eager" else 0))
        return tokens * h * b + 2 * tokens * d * b + tokens * norm * h + mask

    once_text = once_per_pass(T, R * S * S)

    # vision blocks: norms, qkv output (v is a view of it), q and k after rope, attention out, proj input, MLP (per family)
    a_vis = arch.adapter.vision_activation_bytes(arch, b, flash=attn == "flash")
    vis_quad = 0.0
    if attn == "eager":
        ppf = geo["patches_per_frame_pair"]
        win = (arch.window_size // arch.patch_size) ** 2 if arch.window_size else ppf
        n_full = arch.adapter.full_attention_blocks(arch)
        per_row = arch.vision_num_heads * (4 + b) * geo["grid_t"] * (n_full * ppf**2 + (Lv_depth - n_full) * ppf * min(win, ppf))
        vis_quad = Rv * per_row
    vis_once = Np * (arch.in_channels * arch.temporal_patch_size * arch.patch_size**2) * b + Np * hv * (4 + 2 * b + 3 * b) \
        + 2 * Np * arch.vision_head_dim * 4

    # ---------------------------------------------------------------- rollout
    kv_tok = L * 2 * kv * d * b
    add("KV cache (prompt + completion)", "rollout", R * S * kv_tok,
        f"{R} rows x {S} tokens x {L} layers x 2 x {kv} kv heads x {d} x {b} B")
    # the static decoder (rollout_decoder auto/static on a GPU) keeps each captured decode step with its static
    # cache between rollouts (model/decode.GraphStore): columns rounded up to 64; T-GRPO's half-size rollout too
    if getattr(cfg, "rollout_decoder", "auto") != "hf" and not getattr(cfg, "use_vllm", False):
        cols = -(-S // 64) * 64
        rows_kept = R + (R // 2 if getattr(cfg, "temporal_grpo", False) else 0)
        add("static decode cache kept between rollouts", "static", rows_kept * cols * kv_tok,
            f"{rows_kept} rows x {cols} columns x {L} layers x 2 x {kv} kv heads x {d} x {b} B (decode.GraphStore)")
    # each prompt (and its video) is prefilled once, its cache then repeated G times (not with --plain_forwards)
    Rp = P if plan.rollout_shared_prefill else R
    Tp = Rp * Lp
    prefill_layer = Tp * b * (3 * inter + 4 * h) + (Rp * Lp * Lp * (1 + b) if attn == "sdpa" else 0) \
        + (Rp * nh * Lp * Lp * (4 + b) if attn == "eager" else 0)
    prefill_vis = Rp * patches_video * b * (5 * hv + 3 * iv) + Rp * Lvis * h * b
    prefill = prefill_layer + prefill_vis + Rp * V * 4
    add("prefill working set (one layer + vision tower, no grad)", "rollout", prefill,
        f"{Tp} prompt tokens ({Rp} rows); counted with the KV cache of the prompt only")
    kv_prompt = R * Lp * kv_tok
    gathered = 0.0
    if launch.sharded_weights and cfg.gather_for_generation:  # training/rollout_weights.py: one gather per rollout
        gathered = total * compute_b + (trainable * 4 if peft else 0)
        add("whole policy gathered for the rollout", "rollout", gathered,
            f"{_count(total)} params x {compute_b} B, gathered once per rollout (gather_for_generation)")

    # ---------------------------------------------------------------- probes / reference
    passes = []
    if "visual" in signals:
        passes.append("visual")
    if "temporal" in signals:
        passes.append("temporal")
    if cfg.beta != 0:
        passes.append("reference")
    rows_c = min(R, cfg.forward_batch_size or R)
    Tc = rows_c * S
    if passes:
        layer_ng = Tc * b * (3 * inter + 4 * h) + 2 * Tc * h * b + (rows_c * S * S * (1 + b) if attn == "sdpa" else 0) \
            + (rows_c * nh * S * S * (4 + b) if attn == "eager" else 0)
        vis_once_ng = P * patches_video * b * (5 * hv + 3 * iv) + R * Lvis * h * b
        add("no-grad forward working set (one layer + visual features)", "probes", layer_ng + vis_once_ng,
            f"passes: {', '.join(passes)}; {rows_c} rows at a time (forward_batch_size)")
        # the model's logits in its own dtype, then float32 logits + log-softmax for at most
        # LOGPROB_CHUNK_ELEMENTS positions x vocabulary at a time (model/scoring.token_logprobs)
        chunk = min(rows_c * Lc * V, LOGPROB_CHUNK_ELEMENTS)
        add("probe logits + a log-softmax chunk", "probes", rows_c * (Lc + 1) * V * b + chunk * 8,
            f"{rows_c} rows x {Lc + 1} x {V} x {b} B logits + {chunk:,} x 8 B: fp32 logits + log-softmax per chunk")

    # ---------------------------------------------------------------- policy forward / backward
    if ckpt and plan.policy_shared_prefix:
        # model/prefix.checkpointed_cache: the prompts' pass and the completions' pass checkpoint each layer; kept
        # for the backward: each layer's input (P x Lp + R x Lc tokens) and each row's copy of the prompt's keys
        # and values (the cache the completion layer read, kv heads, to recompute it) plus the completion's own
        kv_cache = 2 * b * kv * d
        kv_key = 2 * b * (kv * d if kv_unexpanded else h)
        Tpol = P * Lp + R * Lc
        text_act = L * (Tpol * h * b + R * S * kv_cache) + once_per_pass(Tpol, P * Lp * Lp + R * Lc * S)
        text_note = (f"checkpointed, shared prompts: {L} layer inputs x ({P} x {Lp} + {R} x {Lc}) tokens x {h} x {b} B "
                     f"+ {R} rows' cached keys and values of {S} tokens")
        vis_act = (Lv_depth * Np * hv * b + vis_once) if vision_trains else 0.0

        def cells(n: float) -> float:  # a recomputed layer's attention mask (sdpa) or scores (eager)
            return n * b if attn == "sdpa" else n * nh * (4 + b) if attn == "eager" else 0.0

        grads = b * (2 * inter + 4 * h)
        layer_ws = max(P * Lp * (a_text + grads) + cells(P * Lp * Lp),
                       R * Lc * (a_text - kv_key + grads) + R * S * kv_key + cells(R * Lc * S))
        ws_note = "one layer recomputed (the prompts' or the completions' pass) + its gradient buffers"
    elif ckpt:
        text_act = L * T * h * b + once_text
        text_note = f"checkpointed: {L} layer inputs x {T} tokens x {h} x {b} B"
        vis_act = (Lv_depth * Np * hv * b + vis_once) if vision_trains else 0.0
        layer_ws = T * a_text + mask_layer + quad_layer + T * b * (2 * inter + 4 * h)
        ws_note = "one layer recomputed + its gradient buffers"
    else:
        if plan.policy_shared_prefix:
            # each prompt runs once (P x Lp tokens); each completion token (R x Lc) attends over its row's copy of
            # the prompt's keys and values, which the attention keeps for backward (expanded to all heads unless
            # the kernel takes grouped heads); masks over R x Lc queries only
            kv_key = 2 * b * (kv * d if kv_unexpanded else h)
            Tpol = P * Lp + R * Lc
            mask_cells = P * Lp * Lp + R * Lc * S
            if attn == "sdpa":
                mask_layer = mask_cells * b
            elif attn == "eager":
                quad_layer = mask_cells * nh * (4 + b)
            text_act = L * (P * Lp * a_text + R * Lc * (a_text - kv_key) + R * S * kv_key) + once_per_pass(Tpol, mask_cells)
            text_note = (f"shared prompts: {L} layers x ({P} x {Lp} prompt + {R} x {Lc} completion tokens) x {a_text:.0f} "
                         f"B/token + {R} rows' copies of {S} keys")
        else:
            Tpol = T
            text_act = L * T * a_text + once_text
            text_note = f"{L} layers x {T} tokens x {a_text:.0f} B/token ({a_text / h:.1f} x hidden)"
        vis_act = (Lv_depth * Np * a_vis + vis_once + vis_quad) if vision_trains else 0.0
        layer_ws = Tpol * b * (2 * inter + 4 * h)
        ws_note = "gradient buffers of one layer"
    add("text activations", "policy", text_act, text_note)
    if (mask_layer or quad_layer) and not ckpt:  # under checkpointing: in the recomputed layer's working set
        add("attention " + ("masks (sdpa bias per layer)" if attn == "sdpa" else "scores (eager)"), "policy",
            L * (mask_layer + quad_layer), f"{L} layers x {R} rows x {S}^2" + (f" x {nh} heads" if attn == "eager" else "")
            + f" x {4 + b if attn == 'eager' else b} B")
    add("vision tower activations", "policy", vis_act,
        f"{Np} patches ({Rv} {'prompt' if Rv == P else 'row'}{'s' if Rv > 1 else ''} x {patches_video}) x {Lv_depth} blocks" + (" (frozen: none)" if not vision_trains else ""))
    # the policy pass's log-probs (model/scoring.token_logprobs): the logits in the model's dtype are kept for the
    # backward, which adds their gradient; the float32 work runs a chunk of positions at a time, forward and backward
    # (input, log-softmax, exp and product / scattered gradient and its result: 16 B per element of a chunk)
    chunk_p = min(R * Lc * V, LOGPROB_CHUNK_ELEMENTS)
    logits = R * Lc * V * 2 * b + 16 * chunk_p
    add("logits of the completion positions", "policy", logits,
        f"{R} x {Lc} x {V} x {2 * b} B: logits kept for the backward + their gradient; {chunk_p:,} x 16 B: one "
        "float32 chunk of log-softmax work")
    add("backward working set", "policy", layer_ws, ws_note + " (counted only if larger than the logits)")
    if fsdp and z == 2:  # reshard_after_forward false: every unit stays whole from its forward to its backward
        add("weights unsharded from forward to backward", "policy", total * compute_b,
            "FSDP reshard_after_forward false (fsdp_reshard_after_forward: true shards them again after each forward)")
    head_grad = counts["embedding"] * grad_b / shard_grad if not peft else 0.0
    accum_grads = trainable * grad_b / shard_grad if cfg.gradient_accumulation_steps > 1 else 0.0
    add("first gradients (lm_head)" if not accum_grads else "gradients (accumulating)", "policy",
        accum_grads or head_grad, "" if not accum_grads else "gradient_accumulation_steps > 1")

    grads = trainable * grad_b / shard_grad * (on_gpu_opt if fsdp else 1.0)  # FSDP's CPU offload takes the gradients too
    add("gradients", "backward", grads, f"{_count(trainable)} x {grad_b} B" + (f" / {N} GPUs" if shard_grad > 1 else "")
        + (off_opt if fsdp else ""))
    vis_ws = (Np * a_vis if ckpt else Np * b * (2 * iv + 4 * hv)) if vision_trains else 0.0
    add("vision activations + working set", "backward", (vis_act + vis_ws) if vision_trains else 0.0,
        "the vision tower is back-propagated last")
    add("gradients", "optimizer", grads, "")
    if opt_per_param == 12:
        step_tmp = trainable * 4 / shard_opt
        step_note = "fp32 gradient partition"
    elif fsdp_master:
        step_tmp = trainable * 4 / shard_opt
        step_note = "foreach AdamW temporary (sqrt of v), fp32, sharded"
    else:
        step_tmp = trainable * train_b
        step_note = "foreach AdamW temporary (sqrt of v)"
    add("optimizer step temporaries", "optimizer", on_gpu_opt * step_tmp, step_note + off_opt)

    # ---------------------------------------------------------------- phase peaks
    def phase_sum(ph: str) -> float:
        return sum(c.bytes for c in comps if c.phase == ph)

    by = {c.name: c.bytes for c in comps if c.phase in ("rollout", "policy")}
    peaks = {
        "static": phase_sum("static"),
        "rollout": gathered + max(by["KV cache (prompt + completion)"],
                                  kv_prompt + by["prefill working set (one layer + vision tower, no grad)"]),
        "probes": phase_sum("probes"),
        "policy": phase_sum("policy") - min(logits, layer_ws),
        "backward": phase_sum("backward"),
        "optimizer": phase_sum("optimizer"),
    }
    dynamic = {k: v for k, v in peaks.items() if k != "static"}
    top = max(dynamic, key=dynamic.get)
    peak = peaks["static"] + dynamic[top]
    usable = gpu_memory_gb * GiB * (1 - headroom)
    result: dict[str, Any] = {
        "model": {"name": cfg.model_name_or_path, "source": arch.source, "family": arch.family,
                  "arch": dataclasses.asdict(arch)},
        "params": {**counts, "trainable": trainable},
        "setup": {"dtype": dtype, "num_gpus": N, "zero_stage": z, "launch": launch.label, "launch_source": launch.source,
                  "offload_optimizer": launch.offload_optimizer, "offload_params": launch.offload_params,
                  "gather_for_generation": bool(cfg.gather_for_generation), "mixed_precision_optimizer": opt_per_param == 12 or fsdp_master,
                  "gradient_checkpointing": ckpt, "use_peft": peft, "attention": attn, "reference_model": ref,
                  "gpu_memory_gb": gpu_memory_gb, "headroom": headroom, "video_seconds": video_seconds},
        "tokens": tokens,
        "components": [dataclasses.asdict(c) | {"gb": c.bytes / GiB} for c in comps],
        "phases_gb": {k: v / GiB for k, v in peaks.items()},
        "largest_phase": top,
        "peak_gb": peak / GiB,
        "step_dependent_gb": (peak - sum(c.bytes for c in comps if c.name in LOADED)) / GiB,
        "usable_gb": usable / GiB,
        "fits": peak <= usable,
    }
    if suggest:
        result["suggestions"] = suggestions(cfg, arch, result, gpu_memory_gb=gpu_memory_gb, num_gpus=num_gpus,
                                            zero_stage=z, launch=launch, video_seconds=video_seconds,
                                            prompt_text_tokens=prompt_text_tokens, headroom=headroom,
                                            mixed_precision=mixed_precision, video_size=video_size,
                                            completion_tokens=completion_tokens)
    return result


def _options(cfg: Any, kw: dict[str, Any], nframes: int) -> list[tuple[str, str, dict[str, Any], dict[str, Any]]]:
    """Candidate single changes: (kind, label, TrainConfig changes, estimate() argument changes)."""
    options: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = []
    if not cfg.gradient_checkpointing:
        options.append(("ckpt", "gradient_checkpointing: true", {"gradient_checkpointing": True}, {}))
    launch = kw["launch"]
    if launch.backend == "FSDP" and launch.zero_stage == 2:
        options.append(("zero", "fsdp_reshard_after_forward: true (full sharding)", {},
                        {"launch": dataclasses.replace(launch, zero_stage=3)}))
    elif not launch.sharded_weights and kw["num_gpus"] > 1:
        options.append(("zero", "ZeRO-3 (configs/accelerate/zero3.yaml)", {},
                        {"launch": Launch(backend="DeepSpeed", zero_stage=3, mixed_precision=launch.mixed_precision,
                                          offload_optimizer=launch.offload_optimizer, source="suggestion")}))
    if launch.sharded_weights and cfg.gather_for_generation:
        options.append(("gather", "gather_for_generation: false (no whole weights in the rollout; a much slower rollout)",
                        {"gather_for_generation": False}, {}))
    if cfg.nframes is not None and cfg.nframes >= 4:
        options.append(("frames", f"nframes: {cfg.nframes // 2}", {"nframes": cfg.nframes // 2}, {}))
    elif cfg.nframes is None and nframes >= 4 and max(cfg.min_frames, nframes // 2) < nframes:
        half = max(cfg.min_frames, nframes // 2)
        options.append(("frames", f"max_frames: {half}", {"max_frames": half}, {}))
    if cfg.max_pixels // 2 >= max(cfg.min_pixels, 28 * 28):
        options.append(("pixels", f"max_pixels: {cfg.max_pixels // 2}", {"max_pixels": cfg.max_pixels // 2}, {}))
    if cfg.max_completion_length >= 2:
        ct = kw.get("completion_tokens")
        options.append(("completion", f"max_completion_length: {cfg.max_completion_length // 2}",
                        {"max_completion_length": cfg.max_completion_length // 2},
                        {"completion_tokens": None if ct is None else max(1, ct // 2)}))
    if cfg.per_device_train_batch_size > 1:
        p = cfg.per_device_train_batch_size // 2
        options.append(("batch", f"per_device_train_batch_size: {p} (raise gradient_accumulation_steps to keep the batch)",
                        {"per_device_train_batch_size": p}, {}))
    rows = cfg.per_device_train_batch_size * cfg.num_generations
    if (cfg.forward_batch_size is None or cfg.forward_batch_size > cfg.num_generations) and rows > cfg.num_generations:
        options.append(("chunk", f"forward_batch_size: {cfg.num_generations} (probe/reference rows at a time)",
                        {"forward_batch_size": cfg.num_generations}, {}))
    if not cfg.use_peft:
        options.append(("peft", "use_peft: true (LoRA; the reference model becomes the adapter-less base)", {"use_peft": True}, {}))
    return options


def _apply(cfg: Any, arch: ModelArch, kw: dict[str, Any], changes: dict[str, Any], extra: dict[str, Any]):
    new_cfg = dataclasses.replace(cfg, **changes)
    new_kw = {**kw, **extra}
    try:
        return new_cfg, new_kw, estimate(new_cfg, arch, **new_kw, suggest=False)
    except ValueError:
        return None


def suggestions(cfg: Any, arch: ModelArch, base: dict[str, Any], **kw: Any) -> dict[str, Any]:
    """What to lower first: single changes ordered by the bytes each saves (largest first), and a combined
    plan that applies the best remaining change until the estimate fits (each kind of change once)."""
    single = []
    for _, label, changes, extra in _options(cfg, kw, base["tokens"]["nframes"]):
        done = _apply(cfg, arch, kw, changes, extra)
        if done and base["peak_gb"] - done[2]["peak_gb"] > 1e-6:
            single.append({"change": label, "saves_gb": base["peak_gb"] - done[2]["peak_gb"],
                           "peak_gb": done[2]["peak_gb"], "fits": done[2]["fits"]})
    single.sort(key=lambda x: -x["saves_gb"])
    plan: list[dict[str, Any]] = []
    cur_cfg, cur_kw, cur = cfg, dict(kw), base
    used: set[str] = set()
    while not cur["fits"]:
        best = None
        for kind, label, changes, extra in _options(cur_cfg, cur_kw, cur["tokens"]["nframes"]):
            if kind in used:
                continue
            done = _apply(cur_cfg, arch, cur_kw, changes, extra)
            if done and cur["peak_gb"] - done[2]["peak_gb"] > 1e-6 and (best is None or done[2]["peak_gb"] < best[1][2]["peak_gb"]):
                best = ((kind, label), done)
        if best is None:
            break
        (kind, label), (cur_cfg, cur_kw, cur) = best
        used.add(kind)
        plan.append({"change": label, "peak_gb": cur["peak_gb"], "fits": cur["fits"]})
    return {"single": single, "plan": plan}


# --------------------------------------------------------------------------------------------------
# Report


def _count(n: float) -> str:
    """A parameter count: 8.292 B, 161.5 M, 923,072."""
    if n >= 1e9:
        return f"{n / 1e9:.3f} B"
    if n >= 1e6:
        return f"{n / 1e6:.1f} M"
    return f"{int(n):,}"


def _gb(x: float) -> str:
    return f"{x:8.2f}" if x >= 0.01 or x == 0 else f"{x:8.4f}"


def format_report(r: dict[str, Any], config_path: str = "") -> str:
    t, s, p = r["tokens"], r["setup"], r["params"]
    lines = [f"video-ktr estimate{': ' + config_path if config_path else ''}  (per GPU; GiB = 2^30 bytes)", ""]
    lines.append(f"model    {r['model']['name']}")
    lines.append(f"         {r['model']['source']}")
    lines.append(f"         {_count(p['text'])} text + {_count(p['vision'])} vision = {_count(p['total'])} parameters; "
                 f"trainable {_count(p['trainable'])}; weights {s['dtype']}")
    opt = "bf16 mixed precision (fp32 master + m + v)" if s["mixed_precision_optimizer"] else "AdamW states in the weights' dtype"
    lines.append(f"launch   {s['launch']} (from {s['launch_source']})")
    lines.append(f"setup    {s['num_gpus']} GPU(s) x {s['gpu_memory_gb']:g} GiB, {opt}, "
                 f"attention {s['attention']}, gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}")
    lines.append(f"tokens   video of {s['video_seconds']:g} s -> {t['nframes']} frames, {t['frame_size']}, "
                 f"{t['tokens_per_frame_pair']} tokens per frame pair -> {t['visual_tokens']} visual tokens")
    lines.append(f"         prompt {t['prompt_tokens']} ({t['prompt_text_tokens']} text + {t['visual_tokens']} visual) + completion "
                 f"{t['completion_tokens']} = {t['sequence_tokens']} tokens x {t['rows_per_gpu']} rows "
                 f"({t['prompts_per_gpu']} prompts x {t['rows_per_gpu'] // max(1, t['prompts_per_gpu'])} generations)")
    lines.append(f"         {t['policy_tokens_per_gpu']:,} policy tokens and {t['generated_tokens_per_gpu']:,} generated tokens per GPU "
                 f"per micro-step; {t['policy_tokens_per_optimizer_step']:,} / {t['generated_tokens_per_optimizer_step']:,} per "
                 f"optimizer step on all GPUs; {t['vision_patches_per_gpu']:,} vision patches per GPU")
    lines.append("")
    width = 62
    lines.append(f"{'component':<{width}} {'GiB':>8}  note")
    for ph in PHASES:
        items = [c for c in r["components"] if c["phase"] == ph]
        if not items:
            continue
        mark = "  <- largest" if ph == r["largest_phase"] else ""
        lines.append(f"{PHASE_TITLES[ph]:<{width}} {_gb(r['phases_gb'][ph])}  (phase peak){mark}")
        for c in items:
            lines.append(f"  {c['name']:<{width - 2}} {_gb(c['gb'])}  {c['note']}")
    lines.append("")
    lines.append(f"peak     static {r['phases_gb']['static']:.2f} + {r['largest_phase']} {r['phases_gb'][r['largest_phase']]:.2f} "
                 f"= {r['peak_gb']:.2f} GiB per GPU")
    used = r["peak_gb"] / max(r["usable_gb"], 1e-9)
    verdict = "FITS" if r["fits"] else "DOES NOT FIT"
    lines.append(f"budget   {s['gpu_memory_gb']:g} GiB - {s['headroom']:.0%} headroom (CUDA context, fragmentation) = "
                 f"{r['usable_gb']:.2f} GiB -> {verdict} ({used:.0%} of the usable memory)")
    sugg = r.get("suggestions") or {}
    if sugg.get("single"):
        lines.append("")
        lines.append("what to lower first (each change alone, largest saving first):" if not r["fits"] else
                     "ways to lower the peak (each change alone, largest saving first):")
        for sgg in sugg["single"]:
            lines.append(f"  - {sgg['change']}: saves {sgg['saves_gb']:.2f} GiB -> {sgg['peak_gb']:.2f} GiB "
                         f"({'fits' if sgg['fits'] else 'still does not fit'})")
    if sugg.get("plan"):
        lines.append("combined, in this order until it fits:")
        for i, step in enumerate(sugg["plan"], 1):
            lines.append(f"  {i}. {step['change']} -> {step['peak_gb']:.2f} GiB{' (fits)' if step['fits'] else ''}")
        if not sugg["plan"][-1]["fits"]:
            lines.append("  still does not fit: more GPUs (with ZeRO-3), a larger card, or a smaller model")
    lines.append("")
    lines.append("An estimate of live tensors from formulas (docs/estimate.md); not measured on a GPU.")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# The training config an estimate is for


def load_train_config(path: str, overrides: dict[str, Any] | None = None) -> Any:
    """The ``TrainConfig`` of a training YAML, with ``overrides`` (option name -> value) applied."""
    values = load_yaml(path)
    values.update(overrides or {})
    return from_dict(TrainConfig, values, source=path)
