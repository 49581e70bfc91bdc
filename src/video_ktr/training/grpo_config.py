"""`video-ktr train` options: one dataclass, used for the command line, YAML configs and the docs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from video_ktr.core.loss import LossSpec
from video_ktr.core.selection import SIGNALS, SelectionSpec
from video_ktr.core.weighting import WEIGHTINGS, WeightingSpec
from video_ktr.training.options import RunOptions
from video_ktr.utils.config import field

SELECTIONS = ("all", "none", "random", *SIGNALS)
DEFAULT_MAX_STEPS = 100  # --max_steps when neither it nor --num_train_epochs is given


@dataclass
class TrainConfig(RunOptions):
    """GRPO training with key-token reinforcement (Video-KTR) on Video-R1-schema data."""

    # speed-only switches the trainer now decides at set-up (ForwardPlan.for_run); a YAML that still sets one is told so
    REMOVED_OPTIONS: ClassVar[dict[str, str]] = dict.fromkeys(
        ["shared_prefix", "length_buckets", "policy_shared_prefix", "rollout_shared_prefill", "encode_visual_once"],
        "the trainer takes this fast path whenever the set-up allows it (training/grpo_stages.ForwardPlan; same "
        "losses); drop it, or give --plain_forwards true to run every pass the plain way")

    model_name_or_path: str = field("", help="Policy to train: a local directory or a hub id (e.g. Qwen/Qwen2.5-VL-7B-Instruct). [required]")

    # schedule
    per_device_train_batch_size: int = field(
        1, help="PROMPTS per device per micro-step (as in Video-R1); each is sampled --num_generations times, so a "
        "micro-step trains on per_device_train_batch_size x num_generations completions.")
    seed: int = field(42, help="Seed of the data order, sampling streams, probe permutations and random masks.")
    max_steps: int | None = field(
        None, help="Optimiser steps to run. As in TRL / transformers, -1 runs --num_train_epochs passes over the prompts "
        "instead; left out, it is -1 when --num_train_epochs is given and 100 otherwise. A positive value overrides "
        "--num_train_epochs.")
    num_train_epochs: float | None = field(
        None, help="Passes over the training prompts (may be fractional: ceil(epochs x rows / prompts per optimiser "
        "step) steps, prompts per step = per_device_train_batch_size x processes x gradient_accumulation_steps); used "
        "when --max_steps is -1 or left out (TRL / transformers' semantics).")

    # GRPO
    num_generations: int = field(8, help="Completions sampled per prompt (the group size G).")
    temperature: float = field(1.0, help="Sampling temperature of the rollouts.")
    top_p: float = field(0.95, help="Nucleus sampling mass of the rollouts.")
    max_prompt_length: int | None = field(None, help="Refuse prompts longer than this many tokens (visual tokens included).")
    max_completion_length: int = field(768, help="Most tokens sampled per completion.")
    beta: float = field(0.04, help="Weight of the k3 KL penalty to the frozen reference model (0: no reference model).")
    epsilon: float = field(0.2, help="PPO clipping range (used when --num_iterations > 1).")
    epsilon_high: float | None = field(None, help="Upper clipping range (DAPO clip-higher); defaults to --epsilon.")
    num_iterations: int = field(1, help="Optimiser passes over each batch of rollouts; > 1 uses the clipped ratio against the sampling policy.")
    loss_type: str = field("grpo", choices=["grpo", "bnpo", "dapo", "dr_grpo"], help="Loss normalisation: per sequence (grpo), token mean over the batch (bnpo/dapo), or by max_completion_length (dr_grpo).")
    kl_on: str = field("mask", choices=["mask", "valid"], help="Apply the KL term on key tokens only (the paper) or on every completion token (TRL's entropy mask).")
    normalize_by: str = field("mask", choices=["mask", "valid"], help="Divide by the number of key tokens (the paper's amplification) or by all completion tokens.")
    reward_funcs: list[str] = field(["accuracy", "format"], help="Rewards to sum: 'accuracy', 'format', or 'package.module:function' for your own (see the README).")
    reward_weights: list[float] | None = field(None, help="One weight per reward function (default: all 1).")
    reward_completion_format: str = field("auto", choices=["auto", "conversational", "text"], help="How TRL-form reward functions (f(completions, **kwargs)) get completions: conversational ([{'role': 'assistant', 'content': ...}], as TRL for chat data), text, or auto (text when annotated list[str]). The built-ins and the native form always get text.")
    length_bonus: bool = field(False, help="Add Video-R1's length bonus (+0.2 for correct completions of 320-512 tokens), counting real tokens.")
    temporal_grpo: bool = field(False, help="Add Video-R1's T-GRPO bonus: also sample G/2 completions on shuffled frames and reward ordered-frame accuracy above 0.8x the shuffled one.")

    # key-token selection
    token_selection: list[str] = field(
        ["all"], choices=list(SELECTIONS),
        help="Key-token signals: any of entropy, visual, temporal; 'all' = KTR (their union); 'none' = vanilla GRPO; "
        "'random' = a random mask keeping the fraction KTR would keep (the honest control).")
    entropy_ratio: float = field(0.2, help="Fraction of tokens kept by the entropy signal (top quantile).")
    visual_ratio: float = field(0.2, help="Fraction of tokens kept by the visual probe signal.")
    temporal_ratio: float = field(0.2, help="Fraction of tokens kept by the temporal probe signal (video rows only).")
    selection_scope: str = field("group", choices=["group", "batch", "global"], help="Pool for each threshold: one prompt's G completions (the paper), the local batch, or the batch gathered across processes.")
    positive_probe_scores: bool = field(False, help="Keep only tokens whose visual / temporal score is > 0 (avoids random picks among ties at 0).")
    token_weighting: str = field(
        "hard", choices=list(WEIGHTINGS),
        help="How the selection's signals weight the policy gradient: 'hard' = the key-token mask (weight 1 on "
        "the selected tokens, 0 elsewhere; the paper's method); 'sigmoid' / 'linear' = every completion token "
        "weighted by its score's rank q in the pool (0 = highest): 1 + gamma * (sigmoid(k * (0.5 - q)) - 0.5) or "
        "1 + gamma * (0.5 - q), the largest over the signals (the authors' soft variants; docs/algorithm.md). "
        "Needs at least one signal and the group or batch scope.")
    soft_k: float = field(5.0, help="Steepness k of the sigmoid weighting (the authors' best: 5).")
    soft_gamma: float = field(0.75, help="Spread gamma of the soft weights, 1 - gamma/2 .. 1 + gamma/2, in [0, 2] (the authors' best: 0.75).")
    probe_score_tolerance: float = field(1e-5, help="Visual / temporal scores smaller than this (in nats) count as exactly 0, so float rounding never decides a selection.")
    visual_probe: str = field("mask", choices=["mask", "zero_features", "blank"], help="How the visual input is taken away: placeholders masked from attention, zeroed visual features, or black frames.")
    temporal_probe: str = field("shuffle", choices=["shuffle", "reverse", "segments"], help="How frames are disordered: random non-identity permutation, reversal, or shuffled segments.")
    probe_dtype: str = field("weights", choices=["weights", "bfloat16"], help="Precision of the visual / temporal probe passes: 'weights' as the weights are; 'bfloat16' bf16 autocast where the weights are float32 (faster on a GPU; not exact: a token can change selection only within 2 eps of its threshold, eps the bf16 rounding of the probe log-probs, docs/performance.md). 16-bit weights run as they are either way.")

    # model
    use_peft: bool = field(False, help="Train LoRA adapters (needs the peft extra); the reference model is then the base with adapters disabled.")
    merge_adapters: bool = field(False, help="--use_peft: after training, merge the LoRA adapter into the base model and save the merged model in --output_dir in safetensors (from_pretrained and vLLM load it without peft; the adapter moves to OUTPUT_DIR/adapter). Loads the base once more on the CPU.")
    lora_r: int = field(64, help="LoRA rank.")
    lora_alpha: int = field(128, help="LoRA alpha.")
    lora_dropout: float = field(0.05, help="LoRA dropout.")
    lora_target_modules: list[str] = field(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], help="Modules that get LoRA adapters (language model only unless --freeze_vision_tower false and the names match the vision tower).")
    forward_batch_size: int | None = field(None, help="Rows per forward pass in the probe and reference passes (default: all rows at once).")
    policy_chunk_rows: int | None = field(None, help="Rows whose full-vocabulary logits exist at once in the policy pass (default: all).")
    plain_forwards: bool = field(
        False, help="Run every forward pass the plain way, for checking the fast paths that are otherwise always "
        "taken (training/grpo_stages.ForwardPlan): every completion row carries its prompt and video through the "
        "rollout's prefill, the policy pass (and its vision tower), the probe and the reference passes, and every "
        "row is padded to the longest of the batch. The same losses and gradients (the rollout's logits to float "
        "tolerance), more compute. Not under FSDP / DeepSpeed ZeRO-3.")
    probe_all_groups: bool = field(
        False, help="Run the visual and temporal probes on every prompt group. Off (default): a group whose G "
        "completions got equal rewards has advantage 0, and where no loss term reads its key tokens (beta 0 or "
        "--kl_on valid, a per-sequence loss or dr_grpo, --selection_scope group) its probes are skipped: the loss "
        "and its gradient are the same, and the key-token metrics count the probed groups only. Diagnostics and "
        "token-record steps probe every group.")
    rollout_decoder: str = field("auto", choices=["auto", "hf", "static"], help="How the rollout decodes: 'hf' transformers' generate with the batch-invariant sampler; 'static' the static decoder (model/decode.py: preallocated buffers, a captured CUDA graph per step, counter-based sampling noise on CUDA); 'auto' static on CUDA, hf elsewhere (CPU tokens unchanged).")
    gather_for_generation: bool = field(
        True, help="Under DeepSpeed ZeRO-3 or FSDP2: gather the policy's whole weights once per rollout and release "
        "them before the update (TRL's ds3_gather_for_generation), instead of gathering every layer for every sampled "
        "token. Set false when the whole model does not fit on one GPU beside the rollout's cache: generation then "
        "stays sharded, much slower, with every process decoding until all are done (the hf decoder).")
    use_vllm: bool = field(False, help="Sample the rollouts with a colocated vLLM engine on the policy's GPU (model/vllm_rollout.py; needs the vllm extra and CUDA; one process). The policy's weights are pushed after every optimizer step; probes, selection and loss score vLLM's tokens as they score ours. Written against vLLM 0.17-0.25, not run in this package's tests (a stand-in engine is).")
    vllm_gpu_memory_utilization: float = field(0.3, help="--use_vllm: the fraction of GPU memory vLLM takes for its weights and KV cache (the policy, reference and optimizer share the rest).")
    vllm_max_model_length: int | None = field(None, help="--use_vllm: vLLM's context length (default: the model's; prompt + completion must fit).")
    vllm_enable_sleep_mode: bool = field(True, help="--use_vllm: the engine sleeps (weights to host memory, KV cache freed) between rollouts, so the update phase has the GPU.")

    # bookkeeping
    log_completions_every: int = field(0, help="Write sampled completions with rewards to completions.jsonl every this many steps (0: never).")
    diagnostics_steps: int = field(
        0, help="Every this many steps add diagnostics to that step's metrics.jsonl line (0: never): the norms and "
        "cosines of the gradients of the loss on key tokens, on masked (valid non-key) tokens and on all tokens at the "
        "last decoder layer and the LM head (first micro-batch; grad_norm_key, cos_key_full, ...), the Jaccard overlaps "
        "of the signals' token sets and the mean relative position of each set's tokens. Cost on such a step: three "
        "extra backward passes through the LM head and the last decoder layer (no extra forward), measured +0.2 s on a "
        "0.7-1.0 s step of the tiny CPU model (about +20 percent); memory: the first micro-batch's head logits kept until done "
        "and two float32 head and last-layer gradients (7B, 8 x 768 tokens: about 9 GB more at peak, estimated). "
        "See docs/diagnostics.md.")
    log_tokens_every: int = field(
        0, help="Write the first micro-batch's completions token by token (text, entropy, visual and temporal scores, "
        "the sets that selected each token) to tokens.jsonl every this many steps (0: never); `video-ktr report` shows "
        "them. Computes the entropy on those steps also when the entropy signal is off (no effect on training).")

    def validate(self) -> None:
        super().validate()
        if self.merge_adapters and not self.use_peft:
            raise ValueError("--merge_adapters merges LoRA adapters: it needs --use_peft true")
        if self.max_steps is None:  # left out: TRL's -1 when epochs are asked for, this project's 100 otherwise
            self.max_steps = -1 if self.num_train_epochs is not None else DEFAULT_MAX_STEPS
        if self.max_steps == -1 and self.num_train_epochs is None:
            raise ValueError("--max_steps -1 runs --num_train_epochs passes over the prompts: give --num_train_epochs "
                             "(e.g. 1), or a positive --max_steps")
        if self.max_steps == -1 and not self.num_train_epochs > 0:
            raise ValueError(f"--num_train_epochs must be > 0 with --max_steps -1, got {self.num_train_epochs}")
        if self.max_steps < 1 and self.max_steps != -1:
            raise ValueError(f"--max_steps must be >= 1 (or -1: run --num_train_epochs), got {self.max_steps}")
        if self.use_vllm and self.temporal_grpo:
            raise ValueError("--use_vllm with --temporal_grpo: the shuffled-frame rollouts are not written for vLLM; "
                             "drop one of the two")
        if not 0 < self.vllm_gpu_memory_utilization < 1:
            raise ValueError(f"--vllm_gpu_memory_utilization must be in (0, 1), got {self.vllm_gpu_memory_utilization}")
        if self.num_generations < 2:
            raise ValueError("--num_generations must be >= 2: GRPO compares completions within a group")
        if self.num_iterations < 1:
            raise ValueError("--num_iterations must be >= 1")
        sel = set(self.token_selection)
        exclusive = sel & {"all", "none", "random"}
        if exclusive and len(sel) > 1:
            raise ValueError(f"--token_selection {sorted(exclusive)[0]!r} cannot be combined with other values: {self.token_selection}")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(f"--reward_weights has {len(self.reward_weights)} values for {len(self.reward_funcs)} reward functions")
        for name in ("entropy_ratio", "visual_ratio", "temporal_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"--{name} must be in [0, 1]")
        self.weighting_spec()  # the weighting's own ranges
        if self.token_weighting != "hard":
            if not self.signals or "random" in self.token_selection:
                raise ValueError(f"--token_weighting {self.token_weighting} weights tokens by their entropy / visual / "
                                 f"temporal scores; --token_selection {','.join(self.token_selection)} has none "
                                 "(use --token_weighting hard)")
            if self.selection_scope == "global":
                raise ValueError(f"--token_weighting {self.token_weighting} ranks scores within a prompt group or the "
                                 "local batch; --selection_scope global is not supported with it (use group or batch)")
        for name in ("diagnostics_steps", "log_tokens_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0 (0 turns it off), got {getattr(self, name)}")

    def optimizer_steps(self, rows: int, prompts_per_step: int) -> int:
        """The run's optimiser steps: --max_steps, or --num_train_epochs passes over ``rows`` prompts (after validate())."""
        if self.max_steps is None:
            raise ValueError("TrainConfig.optimizer_steps before validate(): --max_steps is not resolved yet")
        if self.max_steps > 0:
            return self.max_steps
        return self.steps_for_epochs(float(self.num_train_epochs or 0), rows, prompts_per_step)

    @property
    def zero_advantage_masks_matter(self) -> bool:
        """Whether the key tokens of a group whose advantages are all 0 can change the loss or another group's mask.

        Such a group's policy term is 0 on every token; its mask still counts through the KL term on key
        tokens (beta != 0, --kl_on mask), the batch token count of bnpo / dapo with --normalize_by mask, or
        a threshold pooled over more than one group (--selection_scope batch / global).
        """
        kl_on_keys = self.beta != 0 and self.kl_on == "mask"
        batch_count = self.loss_type in ("bnpo", "dapo") and self.normalize_by == "mask"
        return kl_on_keys or batch_count or self.selection_scope != "group"

    def loss_spec(self) -> LossSpec:
        return LossSpec(beta=self.beta, epsilon=self.epsilon, epsilon_high=self.epsilon_high, loss_type=self.loss_type,
                        max_completion_length=self.max_completion_length, kl_on=self.kl_on, normalize_by=self.normalize_by)

    def weighting_spec(self) -> WeightingSpec:
        return WeightingSpec(kind=self.token_weighting, k=self.soft_k, gamma=self.soft_gamma)

    def selection_spec(self) -> SelectionSpec:
        return SelectionSpec(signals=self.signals, entropy_ratio=self.entropy_ratio, visual_ratio=self.visual_ratio,
                             temporal_ratio=self.temporal_ratio, scope=self.selection_scope,
                             positive_only=self.positive_probe_scores)

    @property
    def signals(self) -> tuple[str, ...]:
        """The signals whose union is the key-token mask (empty: vanilla GRPO)."""
        sel = set(self.token_selection)
        if sel & {"all", "random"}:
            return SIGNALS
        if "none" in sel:
            return ()
        return tuple(s for s in SIGNALS if s in sel)
