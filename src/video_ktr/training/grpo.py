"""The GRPO trainer with key-token reinforcement, on accelerate.

One optimiser step, read top to bottom in :meth:`KTRTrainer.train_step`:

    rollout (G completions per prompt) -> rewards -> advantages -> probes (visual, temporal) and
    reference (no grad) -> policy log-probs and entropy (grad) -> key-token selection -> loss ->
    backward -> optimiser step

Each stage lives in its own module (rollout, rewards, loss, probes, selection, scoring); this file
only orchestrates them and keeps the books (metrics, checkpoints, resumption).
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from video_ktr.core.diagnostics import (
    LinearUses,
    TokenRecord,
    gradient_decomposition,
    last_decoder_layer,
    output_head,
    overlap_counts,
    position_sums,
    record_linear_calls,
    token_records,
    write_token_records,
)
from video_ktr.core.loss import group_advantages, grpo_loss, sequence_losses
from video_ktr.core.rewards import length_bonus, load_reward_function, temporal_bonus
from video_ktr.core.selection import (
    mask_at_threshold,
    quantile_threshold,
    random_mask_like,
    select_key_tokens_grouped,
)
from video_ktr.data.media import MediaError, load_image
from video_ktr.data.rows import DataError, Sample, SkipReport, load_dataset
from video_ktr.data.video import FrameCache
from video_ktr.model.inputs import Media, encode_prompts, select_prompts, sequence_inputs, to_device
from video_ktr.model.loading import (
    freeze_vision,
    load_model,
    load_processor,
    special_tokens,
    use_sdpa_gqa_on_cpu,
)
from video_ktr.model.prefix import shared_prefix_logprobs, strip_pixels
from video_ktr.model.probes import (
    frame_permutation,
    probe_logprobs,
    shuffled_prompts,
    temporal_probe_logprobs,
    visual_probe_logprobs,
)
from video_ktr.model.rollout import Completions, encode_visual_once, generate, unwrap
from video_ktr.model.sampling import row_seed
from video_ktr.model.scoring import BUCKET_OVERHEAD_TOKENS, sequence_logprobs
from video_ktr.training import checkpoint as ckpt
from video_ktr.training.distributed import accelerator_device_kwargs, check_process_count
from video_ktr.training.grpo_config import TrainConfig
from video_ktr.training.schedule import build_scheduler
from video_ktr.utils.jsonl import finite_or_null
from video_ktr.utils.prefetch import Prefetcher


class Timer:
    """Seconds spent per phase of a step (for metrics and the step-breakdown benchmark)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def phase(self, name: str):
        timer = self

        class _Phase:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.seconds[name] += time.perf_counter() - self.t0

        return _Phase()


@dataclass
class Rollout:
    """Everything about one micro-batch that does not change across ``num_iterations`` passes."""

    samples: list[Sample]
    indices: list[int]  # dataset index of each prompt
    micro_step: int  # the data position it was drawn at (seeds its random streams)
    seq_inputs: dict[str, Any]  # the N prompt+completion rows; from make_rollout without pixel tensors
    completions: Completions
    rewards: Tensor  # (N,)
    advantages: Tensor  # (N,)
    components: dict[str, Tensor]  # per reward function, (N,)
    vis_logp: Tensor | None = None  # (N, Lc)
    tmp_logp: Tensor | None = None  # (N, Lc)
    temporal_rows: Tensor | None = None  # (N,) bool
    probed_rows: Tensor | None = None  # (N,) bool: rows whose groups ran the probes (the others: advantage 0)
    ref_logp: Tensor | None = None  # (N, Lc)
    old_logp: Tensor | None = None  # (N, Lc), set at the first pass when num_iterations > 1
    mask: Tensor | None = None  # (N, Lc) key tokens, set at the first pass
    prompt_inputs: dict[str, Any] | None = None  # the P un-repeated prompts (for once-per-prompt vision)
    # local sums for the step's metrics, reduced across processes by the trainer:
    # name -> [numerator, denominator] (fractions of tokens, token means, per-iteration means)
    sums: dict[str, list[float]] = field(default_factory=dict)
    seq_losses: Tensor | None = None  # (N,) per-sequence losses at the first pass (loss variance)
    # diagnostics (--diagnostics_steps, --log_tokens_every), set by train_step for the step's micro-batches:
    diagnose: bool = False  # selection overlaps and positions of this micro-batch
    diagnose_gradient: bool = False  # gradient decomposition (the first micro-batch only)
    log_tokens: bool = False  # token records (the first micro-batch, main process only)
    # name -> [numerator, denominator], reduced like `sums`; a name whose denominator is 0 is left out
    diag: dict[str, list[float]] = field(default_factory=dict)
    token_records: list[TokenRecord] | None = None

    def add_diag(self, name: str, numerator: float, denominator: float) -> None:
        acc = self.diag.setdefault(name, [0.0, 0.0])
        acc[0] += float(numerator)
        acc[1] += float(denominator)

    def add(self, name: str, numerator: float, denominator: float) -> None:
        acc = self.sums.setdefault(name, [0.0, 0.0])
        acc[0] += float(numerator)
        acc[1] += float(denominator)


class BadStep(RuntimeError):
    pass


@dataclass
class PreparedBatch:
    """One micro-step's data, made on the CPU (in the prefetch thread or the step itself)."""

    picked: list[tuple[int, Sample]]  # (dataset row, sample) of each prompt, unreadable rows replaced
    media: list[Media]
    prompt_inputs: dict[str, Tensor]  # processor outputs, on the CPU
    unreadable: dict[int, DataError]  # rows found unreadable while preparing it (counted when the step takes it)


class KTRTrainer:
    def __init__(self, cfg: TrainConfig, accelerator: Any = None):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        cfg.validate()
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        log_with = [r for r in cfg.report_to if r != "none"] or None
        self.acc = accelerator or Accelerator(log_with=log_with, project_dir=str(self.out), **accelerator_device_kwargs())
        check_process_count(self.acc)
        use_sdpa_gqa_on_cpu(self.acc.device)
        if cfg.diagnostics_steps and sharded_parameters(self.acc):
            raise ValueError("--diagnostics_steps needs whole parameters on each process (one process or DDP): under "
                             "FSDP or DeepSpeed ZeRO-3 each process holds a shard, and the gradient diagnostics would "
                             "not measure the full gradient. Run them with DDP or ZeRO-2, or set --diagnostics_steps 0.")
        set_seed(cfg.seed)
        self.frames = cfg.frame_settings()
        self.cache = FrameCache(capacity=max(8, 4 * cfg.per_device_train_batch_size))
        self.skips = SkipReport()
        self.samples = load_dataset(
            cfg.dataset, cfg.media_root, on_bad_sample=cfg.on_bad_sample,
            allow_outside_media_root=cfg.allow_outside_media_root, report=self.skips,
        )
        self.processor = load_processor(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code)
        self.tokenizer = self.processor.tokenizer
        model = load_model(cfg.model_name_or_path, dtype=cfg.dtype, attn_implementation=cfg.attn_implementation,
                           trust_remote_code=cfg.trust_remote_code)
        self.special = special_tokens(model.config, self.tokenizer)
        if cfg.freeze_vision_tower:
            freeze_vision(model)
        self.ref_model = None
        if cfg.use_peft:
            model = self._apply_peft(model)
        elif cfg.beta != 0:
            self.ref_model = load_model(cfg.model_name_or_path, dtype=cfg.dtype, attn_implementation=cfg.attn_implementation,
                                        trust_remote_code=cfg.trust_remote_code)
            self.ref_model.eval().requires_grad_(False)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                      weight_decay=cfg.weight_decay)
        # The scheduler stays outside accelerate: accelerate's wrapper steps it once per process per step
        # (it assumes the data loader's batch grew with the process count), so 2 processes would run the
        # learning-rate schedule twice as fast as 1. Here it steps exactly once per optimiser step.
        self.scheduler = self._scheduler(optimizer)
        self.model, self.optimizer = self.acc.prepare(model, optimizer)
        if self.ref_model is not None:
            self.ref_model = self.acc.prepare_model(self.ref_model, evaluation_mode=True)
        self.reward_fns = [load_reward_function(s) for s in cfg.reward_funcs]
        self.reward_weights = cfg.reward_weights or [1.0] * len(self.reward_fns)
        self.state = ckpt.TrainState()
        self.bad_steps = 0
        self.bad_rows: set[int] = set()  # dataset rows whose media could not be read (skip mode)
        self._prefetcher = Prefetcher("video-ktr-data")  # the next micro-step's batch (--dataloader_prefetch)
        self._loader_processor: Any = None
        if cfg.resume_from_checkpoint:
            self._resume(cfg.resume_from_checkpoint)

    # ------------------------------------------------------------------ set-up helpers
    def _apply_peft(self, model: torch.nn.Module) -> torch.nn.Module:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as exc:
            raise ImportError("--use_peft needs the peft extra: pip install 'video-ktr[peft]'") from exc
        lora = LoraConfig(r=self.cfg.lora_r, lora_alpha=self.cfg.lora_alpha, lora_dropout=self.cfg.lora_dropout,
                          target_modules=self.cfg.lora_target_modules, task_type="CAUSAL_LM")
        return get_peft_model(model, lora)

    def _scheduler(self, optimizer: torch.optim.Optimizer):
        return build_scheduler(optimizer, kind=self.cfg.lr_scheduler_type, total_steps=self.cfg.max_steps,
                               warmup_ratio=self.cfg.warmup_ratio)

    # ------------------------------------------------------------------ data
    def _samples_at(self, micro_step: int) -> list[tuple[int, Sample]]:
        """This process's prompts of micro-step ``micro_step``: a slice of the global micro-batch.

        The order is a seeded permutation per epoch, so the position (micro-steps done) is all a
        resumed run needs, and every method run with one seed sees the same prompts in the same order.
        """
        P, world, rank = self.cfg.per_device_train_batch_size, self.acc.num_processes, self.acc.process_index
        n = len(self.samples)
        start = micro_step * P * world + rank * P
        picked = []
        for k in range(start, start + P):
            epoch, pos = divmod(k, n)
            g = torch.Generator().manual_seed(row_seed(self.cfg.seed, "order", epoch))
            perm = torch.randperm(n, generator=g)
            picked.append(int(perm[pos]))
        return [(i, self.samples[i]) for i in picked]

    def _load_media(self, index: int, sample: Sample) -> Media:
        if sample.data_type == "video":
            return Media(video=self.cache.get_or_load(sample.media_path, self.frames))
        return Media(image=load_image(sample.media_path, self.frames))

    def _decode_media(self, picked: list[tuple[int, Sample]]):
        """Decode each prompt's media; a failure stops the run, or (skip) is replaced by another row.

        Returns the prompts, their media and the rows newly found unreadable, which the caller counts
        (_count_unreadable). Safe in the prefetch thread: it reads ``bad_rows`` (written only by the main
        thread, which does not write it while a prefetch runs), so a skip is reported with the step that
        uses its batch.
        """
        out, media, unreadable = [], [], {}
        for index, sample in picked:
            tries = 0
            while True:
                try:
                    if index in self.bad_rows or index in unreadable:  # known unreadable: not decoded nor counted again
                        raise MediaError(sample.media_path, "was unreadable before")
                    media.append(self._load_media(index, sample))
                    out.append((index, sample))
                    break
                except MediaError as err:
                    if self.cfg.on_bad_sample == "error":
                        raise DataError(sample.source.rsplit(":", 1)[0], int(sample.source.rsplit(":", 1)[1]), "path",
                                        f"media could not be read: {err}", "media_unreadable") from err
                    if index not in self.bad_rows and index not in unreadable:
                        unreadable[index] = DataError(sample.source, None, "path", str(err), "media_unreadable")
                    tries += 1
                    if tries > 100:
                        raise RuntimeError("more than 100 unreadable media files in a row; check --media_root") from err
                    index = (index + 7919 * tries) % len(self.samples)
                    sample = self.samples[index]
        return out, media, unreadable

    def _count_unreadable(self, unreadable: dict[int, DataError]) -> None:
        for index, err in unreadable.items():
            if index not in self.bad_rows:
                self.bad_rows.add(index)
                self.skips.add(err)

    def _prepare_batch(self, micro_step: int, processor: Any) -> PreparedBatch:
        """Micro-step ``micro_step``'s data on the CPU: its prompts, decoded media and processor outputs."""
        cfg = self.cfg
        picked, media, unreadable = self._decode_media(self._samples_at(micro_step))
        samples = [s for _, s in picked]
        messages = [s.messages(cfg.prompt_layout, cfg.system_prompt) for s in samples]
        prompt_inputs = encode_prompts(processor, messages, media, max_prompt_length=cfg.max_prompt_length,
                                       source=[s.source for s in samples])
        return PreparedBatch(picked, media, prompt_inputs, unreadable)

    def _batch_for(self, micro_step: int) -> PreparedBatch:
        """Micro-step ``micro_step``'s data: the batch prefetched while the previous step computed, or made now.

        A prefetched batch raises here what preparing it raised (a bad file with --on_bad_sample error,
        a prompt over --max_prompt_length), so an error stops the step that needs the batch, never an
        earlier one; a prefetch of another micro-step is awaited and dropped (prefetch.Prefetcher.take).
        """
        batch = self._prefetcher.take(micro_step, self._prepare_batch, micro_step, self.processor)
        self._count_unreadable(batch.unreadable)
        return batch

    def _prefetch(self, micro_step: int) -> None:
        """Start preparing micro-step ``micro_step``'s data in the background (--dataloader_prefetch)."""
        cfg = self.cfg
        if not cfg.dataloader_prefetch or micro_step >= cfg.max_steps * cfg.gradient_accumulation_steps:
            return
        if self._loader_processor is None:
            # a processor of its own: a fast tokenizer refuses calls from two threads at once ("Already borrowed")
            self._loader_processor = copy.deepcopy(self.processor)
        self._prefetcher.start(micro_step, self._prepare_batch, micro_step, self._loader_processor)

    def close(self) -> None:
        """Stop the data prefetch thread (after the batch it is preparing). train() calls it at the end."""
        self._prefetcher.close()

    # ------------------------------------------------------------------ the step's stages
    def _rewards(self, samples: list[Sample], comps: Completions) -> tuple[Tensor, dict[str, Tensor]]:
        G = self.cfg.num_generations
        sols = [s.solution for s in samples for _ in range(G)]
        types = [s.problem_type for s in samples for _ in range(G)]
        components = {}
        total = torch.zeros(len(comps.texts))
        for spec, fn, w in zip(self.cfg.reward_funcs, self.reward_fns, self.reward_weights):
            values = torch.tensor([float(v) for v in fn(comps.texts, sols, types, samples=[s for s in samples for _ in range(G)])])
            if values.shape[0] != len(comps.texts) or not torch.isfinite(values).all():
                raise ValueError(f"reward function {spec!r} must return one finite float per completion")
            name = spec.split(":")[-1]
            components[name] = values
            total += w * values
        return total, components

    def _seeds(self, picked: list[tuple[int, Sample]], stream: str, count: int) -> list[int]:
        return [row_seed(self.cfg.seed, stream, self.state.micro_step, idx, g) for idx, _ in picked for g in range(count)]

    def _generate(self, prompt_inputs: dict[str, Tensor], picked, stream: str, count: int) -> Completions:
        return generate(
            self.model, self.tokenizer, prompt_inputs, seeds=self._seeds(picked, stream, count),
            max_new_tokens=self.cfg.max_completion_length, temperature=self.cfg.temperature, top_p=self.cfg.top_p,
            eos_ids=self.special.eos_ids, pad_id=self.special.pad_id, suppress_ids=self.special.vision_ids,
            group_size=count, shared_prefill=self.cfg.rollout_shared_prefill,
        )

    def _temporal_perms(self, picked, media: list[Media]) -> dict[int, list[int]]:
        perms = {}
        for p, ((idx, _), m) in enumerate(zip(picked, media)):
            if m.kind == "video":
                g = torch.Generator().manual_seed(row_seed(self.cfg.seed, "temporal", self.state.micro_step, idx))
                perm = frame_permutation(m.video.frames.shape[0], self.cfg.temporal_probe, g)
                if perm is not None:
                    perms[p] = perm
        return perms

    def make_rollout(self, timer: Timer) -> Rollout:
        cfg, G, dev = self.cfg, self.cfg.num_generations, self.acc.device
        with timer.phase("data"):
            batch = self._batch_for(self.state.micro_step)
            # the next micro-step's videos decode and go through the processor while this one computes
            self._prefetch(self.state.micro_step + 1)
            picked, media = batch.picked, batch.media
            samples = [s for _, s in picked]
            prompt_inputs = to_device(batch.prompt_inputs, dev)
        with timer.phase("rollout"):
            comps = self._generate(prompt_inputs, picked, "rollout", G)
        with timer.phase("rewards"):
            rewards, components = self._rewards(samples, comps)
            acc = components.get("accuracy", components.get("batch_accuracy_reward"))
            if cfg.length_bonus and acc is not None:
                bonus = [b for p in range(len(samples)) for b in length_bonus(
                    acc[p * G:(p + 1) * G].tolist(), comps.lengths[p * G:(p + 1) * G].tolist())]
                components["length_bonus"] = torch.tensor(bonus)
                rewards = rewards + components["length_bonus"]
        perms = self._temporal_perms(picked, media) if ("temporal" in cfg.signals or cfg.temporal_grpo) else {}
        if cfg.temporal_grpo and acc is not None:
            # the component exists at every step (zeros without a video), so that every process and
            # every micro-batch reports the same metric names
            bonus = torch.zeros_like(rewards)
            if perms:
                with timer.phase("rollout"):
                    rows, shuffled = shuffled_prompts(self.processor, prompt_inputs, media, perms)
                    half = max(1, G // 2)
                    s_comps = self._generate(shuffled, [picked[p] for p in rows], "tgrpo", half)
                with timer.phase("rewards"):
                    accuracy = load_reward_function("accuracy")
                    for j, p in enumerate(rows):
                        s_acc = accuracy(s_comps.texts[j * half:(j + 1) * half], [samples[p].solution] * half,
                                         [samples[p].problem_type] * half)
                        b = temporal_bonus(acc[p * G:(p + 1) * G].tolist(), [float(v) for v in s_acc])
                        bonus[p * G:(p + 1) * G] = torch.tensor(b, dtype=bonus.dtype)
            components["temporal_bonus"] = bonus
            rewards = rewards + bonus
        advantages = group_advantages(rewards, G)
        # the N rows' token inputs and grids, without G copies of the pixels: no probe reads pixels,
        # and the policy pass encodes the P prompts' own (_policy_inputs)
        seq = sequence_inputs(select_prompts(strip_pixels(prompt_inputs), list(range(len(samples))), G), comps.ids, comps.valid)
        ro = Rollout(samples=samples, indices=[i for i, _ in picked], micro_step=self.state.micro_step, seq_inputs=seq,
                     completions=comps, rewards=rewards, advantages=advantages, components=components,
                     prompt_inputs=prompt_inputs)
        chunk = cfg.forward_batch_size
        P = len(samples)
        probed = self._groups_to_probe(advantages, P) if {"visual", "temporal"} & set(cfg.signals) else list(range(P))
        ro.probed_rows = torch.zeros(P, dtype=torch.bool, device=comps.ids.device)
        ro.probed_rows[probed] = True
        ro.probed_rows = ro.probed_rows.repeat_interleave(G)
        if "visual" in cfg.signals:
            with timer.phase("probes"):
                ro.vis_logp = torch.zeros(comps.ids.shape, device=comps.ids.device)
                if probed:
                    rows = ro.probed_rows.nonzero().squeeze(1)
                    all_probed = len(probed) == P
                    ro.vis_logp[rows] = visual_probe_logprobs(
                        self.model, cfg.visual_probe, completion_ids=comps.ids[rows], completion_valid=comps.valid[rows],
                        seq_inputs=seq if all_probed else select_prompts(seq, rows.tolist()),
                        prompt_inputs=prompt_inputs if all_probed else select_prompts(prompt_inputs, probed),
                        media=[media[p] for p in probed], group_size=G, processor=self.processor, chunk_rows=chunk,
                        shared_prefix=cfg.shared_prefix, bucket_overhead=self._bucket_overhead,
                    )
        if "temporal" in cfg.signals:
            with timer.phase("probes"):
                ro.tmp_logp, ro.temporal_rows = temporal_probe_logprobs(
                    self.model, self.processor, prompt_inputs, media, {p: perms[p] for p in probed if p in perms},
                    comps.ids, comps.valid, G, chunk, shared_prefix=cfg.shared_prefix, bucket_overhead=self._bucket_overhead)
        if cfg.beta != 0:
            with timer.phase("reference"):
                ro.ref_logp = self._reference_logp(prompt_inputs, len(samples), comps)
        return ro

    def _groups_to_probe(self, advantages: Tensor, num_prompts: int) -> list[int]:
        """The prompt groups whose visual / temporal probes run: all of them, unless skipping is exact.

        A group whose advantages are all 0 (equal rewards) has no policy gradient; where its key tokens
        feed no other term (TrainConfig.zero_advantage_masks_matter) its probes cannot change the loss
        and are skipped. Steps that record diagnostics or token records probe every group, so those
        records describe whole batches.
        """
        everything = list(range(num_prompts))
        diagnose, log_tokens = self._diagnostics_at(self.state.step + 1)
        if self.cfg.probe_all_groups or self.cfg.zero_advantage_masks_matter or diagnose or log_tokens:
            return everything
        informative = (advantages.view(num_prompts, -1) != 0).any(1).tolist()
        return [p for p in everything if informative[p]]

    @torch.no_grad()
    def _reference_logp(self, prompt_inputs, num_prompts: int, comps: Completions) -> Tensor:
        G = self.cfg.num_generations
        if self.ref_model is not None:
            inputs = sequence_inputs(encode_visual_once(self.ref_model, prompt_inputs, list(range(num_prompts)), G),
                                     comps.ids, comps.valid)
            return probe_logprobs(self.ref_model, inputs, comps.ids, self.cfg.forward_batch_size, self._prefix_group,
                                  self._bucket_overhead)
        model = unwrap(self.model)  # PEFT: the base model is the adapters switched off
        with model.disable_adapter():
            inputs = sequence_inputs(encode_visual_once(model, prompt_inputs, list(range(num_prompts)), G),
                                     comps.ids, comps.valid)
            return probe_logprobs(model, inputs, comps.ids, self.cfg.forward_batch_size, self._prefix_group,
                                  self._bucket_overhead)

    @property
    def _bucket_overhead(self) -> int | None:
        return BUCKET_OVERHEAD_TOKENS if self.cfg.length_buckets else None

    @property
    def _prefix_group(self) -> int | None:
        return self.cfg.num_generations if self.cfg.shared_prefix else None

    def _policy_inputs(self, ro: Rollout) -> dict[str, Any]:
        """The policy pass's inputs: the vision tower runs once per prompt (with grad), not G times.

        With ``--encode_visual_once false`` the rows get the prompts' pixels repeated G times, built for
        this pass only (the rollout keeps no pixel copies, see make_rollout).
        """
        if ro.prompt_inputs is None:
            return ro.seq_inputs
        P, G = ro.prompt_inputs["input_ids"].shape[0], self.cfg.num_generations
        if not self.cfg.encode_visual_once:
            rows = select_prompts(ro.prompt_inputs, list(range(P)), G)
        else:
            rows = encode_visual_once(self.model, ro.prompt_inputs, list(range(P)), G, grad=True)
        return sequence_inputs(rows, ro.completions.ids, ro.completions.valid)

    def _policy_logprobs(self, ro: Rollout, with_entropy: bool) -> tuple[Tensor, Tensor | None]:
        """log p (with grad) and entropy of the rollout's completions under the policy.

        With --policy_shared_prefix each prompt runs once and its cache serves its G completions
        (prefix.shared_prefix_logprobs with grad: the same numbers and gradients; the gradient
        diagnostics sum the head's gradient over its calls, prompt and completion passes alike).
        Gradient checkpointing (no cache in training) takes the full sequences.
        """
        cfg = self.cfg
        inputs = self._policy_inputs(ro)
        if cfg.policy_shared_prefix and not cfg.gradient_checkpointing:
            G = cfg.num_generations
            per_chunk = max(1, cfg.policy_chunk_rows // G) if cfg.policy_chunk_rows else None
            return shared_prefix_logprobs(self.model, inputs, ro.completions.ids, G, with_entropy=with_entropy,
                                          prompts_per_chunk=per_chunk, bucket_overhead=self._bucket_overhead, grad=True)
        return sequence_logprobs(self.model, inputs, ro.completions.ids, with_entropy=with_entropy,
                                 chunk_rows=cfg.policy_chunk_rows, bucket_overhead=self._bucket_overhead)

    def _gather_pool(self, scores: Tensor, valid: Tensor) -> Tensor:
        """The valid scores of every process (the 'global' selection scope)."""
        flat = scores.detach().float().masked_fill(~valid, float("nan")).flatten()
        padded = self.acc.pad_across_processes(flat, dim=0, pad_index=float("nan"))
        return self.acc.gather(padded)

    def select(self, ro: Rollout, logp: Tensor, entropy: Tensor | None) -> dict[str, Tensor]:
        """Per-signal masks and their union, the key-token mask (vanilla GRPO: every valid token)."""
        cfg, valid = self.cfg, ro.completions.valid
        signals: dict[str, Tensor] = {}
        if "entropy" in cfg.signals:
            signals["entropy"] = entropy
        if "visual" in cfg.signals:
            signals["visual"] = probe_score(logp, ro.vis_logp, cfg.probe_score_tolerance)
        if "temporal" in cfg.signals:
            signals["temporal"] = torch.where(ro.temporal_rows[:, None], probe_score(logp, ro.tmp_logp, cfg.probe_score_tolerance),
                                              torch.zeros_like(logp))
        ratios = {"entropy": cfg.entropy_ratio, "visual": cfg.visual_ratio, "temporal": cfg.temporal_ratio}
        masks = {}
        for name, score in signals.items():
            pool_valid = valid & ro.temporal_rows[:, None] if name == "temporal" else valid
            positive = cfg.positive_probe_scores and name != "entropy"
            if cfg.selection_scope == "global":
                tau = quantile_threshold(self._gather_pool(score, pool_valid), ratios[name])
                masks[name] = mask_at_threshold(score, pool_valid, tau.to(score.device), positive_only=positive)
            else:
                kw = {f"{name}": score, f"{name}_ratio": ratios[name], "positive_only": positive}
                if name == "temporal":
                    kw["temporal_rows"] = ro.temporal_rows
                masks[name] = select_key_tokens_grouped(valid, cfg.num_generations, scope=cfg.selection_scope, **kw)
        if ro.probed_rows is not None:
            # a skipped group (advantage 0, see _groups_to_probe) has no probe scores: no visual / temporal picks
            for name in ("visual", "temporal"):
                if name in masks:
                    masks[name] = masks[name] & ro.probed_rows[:, None]
        if not masks:
            key = valid.clone()
        else:
            key = torch.stack(list(masks.values())).any(0)
        if "random" in cfg.token_selection:
            # the control: per prompt group, a uniformly random subset of its valid tokens of the size
            # KTR keeps in that group, from a stream seeded by (seed, data position, prompt): the same
            # whatever the batch size or process count
            G = cfg.num_generations
            rand = torch.zeros_like(valid)
            for p, idx in enumerate(ro.indices):
                rows = slice(p * G, (p + 1) * G)
                fraction = float(key[rows].sum()) / max(1, int(valid[rows].sum()))
                g = torch.Generator().manual_seed(row_seed(cfg.seed, "random-mask", ro.micro_step, idx))
                rand[rows] = random_mask_like(valid[rows].cpu(), fraction, g).to(valid.device)
            key = rand
        masks["key"] = key
        return masks

    def _record_selection(self, ro: Rollout, masks: dict[str, Tensor], entropy: Tensor | None) -> None:
        """Local token counts of each mask (fractions of the valid tokens; temporal: of the video rows').

        The fractions count the rows of probed groups only (all rows unless groups with advantage 0 were
        skipped, see _groups_to_probe): a skipped group has no visual or temporal picks to count.
        """
        valid = ro.completions.valid
        probed = ro.probed_rows if ro.probed_rows is not None else torch.ones_like(valid[:, 0])
        scored = valid & probed[:, None]
        for name, mask in masks.items():
            metric = "key_token_fraction" if name == "key" else f"{name}_fraction"
            pool = scored & ro.temporal_rows[:, None] if name == "temporal" else scored
            ro.add(metric, float((mask & pool).sum()), float(pool.sum()))
        if entropy is not None:
            ro.add("entropy", float(entropy.detach()[valid].float().sum()), float(valid.sum()))
        # rows that get no gradient at all because no token was selected (counted, never an error)
        ro.add("no_key_token_rows", float(((masks["key"] & valid).sum(1) == 0)[probed].sum()), float(probed.sum()))
        if {"visual", "temporal"} & set(self.cfg.signals):
            G = self.cfg.num_generations
            ro.add("probed_groups", float(probed.sum()) / G, valid.shape[0] / G)

    def _global_sum(self, value: float) -> float:
        if self.acc.num_processes == 1:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.acc.device)
        return float(self.acc.reduce(t, reduction="sum")[0])

    def loss_on(self, ro: Rollout, iteration: int, timer: Timer) -> Tensor:
        cfg = self.cfg
        need_entropy = iteration == 0 and ("entropy" in cfg.signals or ro.log_tokens)
        diagnose_gradient = iteration == 0 and ro.diagnose_gradient
        # on a diagnostics step the head's calls are recorded for the gradient decomposition
        head = output_head(unwrap(self.model)) if diagnose_gradient else None
        head = head if head is not None and head.weight.requires_grad else None  # a frozen head (LoRA) is not measured
        with timer.phase("policy"), record_linear_calls(head) as head_calls:
            logp, entropy = self._policy_logprobs(ro, need_entropy)
        valid = ro.completions.valid
        if iteration == 0:
            with timer.phase("selection"):
                masks = self.select(ro, logp, entropy)
            ro.mask = masks["key"]
            self._record_selection(ro, masks, entropy if "entropy" in cfg.signals else None)
            if ro.diagnose:
                self._record_selection_diagnostics(ro, masks)
            if ro.log_tokens:
                ro.token_records = self._token_records(ro, logp, entropy, masks)
            if cfg.num_iterations > 1:
                ro.old_logp = logp.detach()
        advantages = ro.advantages.to(logp.device)
        with timer.phase("loss"):
            loss, stats = grpo_loss(
                logp, advantages, ro.mask, ref_logp=ro.ref_logp, old_logp=ro.old_logp,
                beta=cfg.beta, epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high, loss_type=cfg.loss_type,
                max_completion_length=cfg.max_completion_length, kl_on=cfg.kl_on, normalize_by=cfg.normalize_by,
                valid=valid, return_stats=True,
            )
            if cfg.loss_type == "dapo" and self.acc.num_processes > 1:
                # DAPO's token mean is over the tokens of every process: rescale the local token mean so
                # that the average of the processes' gradients (DDP) is the gradient of the global mean
                denom_tokens = (ro.mask & valid) if cfg.normalize_by in ("mask", "key_tokens") else valid
                local = float(denom_tokens.sum())
                total = self._global_sum(local)
                loss = loss * (max(1.0, local) * self.acc.num_processes / max(1.0, total))
            if iteration == 0:
                ro.seq_losses = sequence_losses(
                    logp.detach(), advantages, ro.mask, ref_logp=ro.ref_logp, beta=cfg.beta,
                    kl_on=cfg.kl_on, normalize_by=cfg.normalize_by, valid=valid,
                ).float()
        if diagnose_gradient:
            with timer.phase("diagnostics"):
                self._gradient_diagnostics(ro, logp, advantages, head, head_calls)
            del head_calls  # the head's logits are no longer needed
        key = ro.mask & valid
        n_kl = float((key if cfg.kl_on in ("mask", "key_tokens") else valid).sum()) if ro.ref_logp is not None else 0.0
        ro.add("kl", float(stats.get("kl", 0.0)) * n_kl, n_kl)
        n_key = float(key.sum())
        ro.add("clip_ratio", float(stats.get("clip_ratio", 0.0)) * n_key, n_key)
        return loss

    def train_step(self) -> dict[str, float]:
        """One optimiser step: gradient_accumulation_steps micro-batches, num_iterations passes."""
        cfg, timer = self.cfg, Timer()
        t0 = time.perf_counter()
        rollouts = []
        for _ in range(cfg.gradient_accumulation_steps):
            rollouts.append(self.make_rollout(timer))
            self.state.micro_step += 1
        self._plan_diagnostics(rollouts, self.state.step + 1)
        lr = float(self.optimizer.param_groups[0]["lr"])  # the rate this step uses
        losses, any_bad, grad_norm = [], False, 0.0
        for it in range(cfg.num_iterations):
            bad = False
            for j, ro in enumerate(rollouts):
                loss = self.loss_on(ro, it, timer) / cfg.gradient_accumulation_steps
                if not torch.isfinite(loss):
                    bad = True
                with timer.phase("backward"):
                    last = j == len(rollouts) - 1
                    ctx = self.acc.no_sync(self.model) if not last else _nullcontext()
                    with ctx:
                        self.acc.backward(torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0) if bad else loss)
                losses.append(float(loss.detach()) * cfg.gradient_accumulation_steps)
            with timer.phase("optimizer"):
                grad_norm = self._clip()
                # every process takes the same decision, or their weights would drift apart
                bad = self._global_sum(float(bad or not math.isfinite(grad_norm))) > 0
                if bad:
                    self.optimizer.zero_grad(set_to_none=True)
                    self.bad_steps += 1
                    if self.bad_steps >= cfg.max_bad_steps:
                        raise BadStep(f"{self.bad_steps} steps had a non-finite loss or gradient (--max_bad_steps "
                                      f"{cfg.max_bad_steps}); lower the learning rate or check the data")
                else:
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
            any_bad = any_bad or bad
        self.scheduler.step()
        self.state.step += 1
        return self._metrics(rollouts, losses, grad_norm, any_bad, lr, timer, time.perf_counter() - t0)

    # ------------------------------------------------------------------ diagnostics (--diagnostics_steps, --log_tokens_every)
    def _plan_diagnostics(self, rollouts: list[Rollout], step: int) -> None:
        """Mark what the step measures: every process takes the same decisions (the sums are reduced)."""
        diagnose, log_tokens = self._diagnostics_at(step)
        for ro in rollouts:
            ro.diagnose = diagnose
        rollouts[0].diagnose_gradient = diagnose
        rollouts[0].log_tokens = log_tokens

    def _diagnostics_at(self, step: int) -> tuple[bool, bool]:
        """(selection and gradient diagnostics, token records) for optimiser step ``step`` (1-based)."""
        cfg = self.cfg
        diagnose = bool(cfg.diagnostics_steps) and step % cfg.diagnostics_steps == 0
        log_tokens = bool(cfg.log_tokens_every) and step % cfg.log_tokens_every == 0 and self.acc.is_main_process
        return diagnose, log_tokens

    def _record_selection_diagnostics(self, ro: Rollout, masks: dict[str, Tensor]) -> None:
        """Jaccard overlaps of the signals' sets and mean relative positions (token counts, reduced later)."""
        valid = ro.completions.valid
        for name, (inter, union) in overlap_counts(masks, valid, ro.temporal_rows).items():
            ro.add_diag(name, inter, union)
        for name, (total, count) in position_sums(masks, valid).items():
            ro.add_diag(name, total, count)

    def _gradient_diagnostics(self, ro: Rollout, logp: Tensor, advantages: Tensor, head: torch.nn.Linear | None,
                              head_calls: LinearUses) -> None:
        """Norms and cosines of the key / masked / full-token loss gradients on this micro-batch.

        torch.autograd.grad on the policy pass's own graph (retained): nothing reaches .grad, so the
        training backward that follows is unchanged. The loss is the local one, before the division by
        gradient_accumulation_steps; with several processes each process measures its own first
        micro-batch and the metrics are the mean over processes.
        """
        cfg = self.cfg
        model = unwrap(self.model)
        groups: dict[str, list] = {}
        layer = last_decoder_layer(model)
        params = [p for p in layer.parameters() if p.requires_grad] if layer is not None else []
        if params:
            groups["last_layer"] = params
        if head is not None and head_calls.calls:
            groups["lm_head"] = [head_calls]
        if not groups:
            return
        values = gradient_decomposition(
            logp, advantages, ro.mask, ro.completions.valid, groups, ref_logp=ro.ref_logp, old_logp=ro.old_logp,
            beta=cfg.beta, epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high, loss_type=cfg.loss_type,
            max_completion_length=cfg.max_completion_length, kl_on=cfg.kl_on, normalize_by=cfg.normalize_by,
        )
        for name, value in values.items():
            ro.add_diag(name, value, 1.0)

    def _token_records(self, ro: Rollout, logp: Tensor, entropy: Tensor | None, masks: dict[str, Tensor]) -> list[TokenRecord]:
        cfg, G = self.cfg, self.cfg.num_generations
        rows = [ro.samples[i // G] for i in range(len(ro.completions.texts))]
        visual = probe_score(logp, ro.vis_logp, cfg.probe_score_tolerance) if ro.vis_logp is not None else None
        temporal = probe_score(logp, ro.tmp_logp, cfg.probe_score_tolerance) if ro.tmp_logp is not None else None
        return token_records(
            step=self.state.step + 1, problem_ids=[s.problem_id for s in rows], kinds=[s.kind for s in rows],
            data_types=[s.data_type for s in rows], tokenizer=self.tokenizer, completion_ids=ro.completions.ids,
            valid=ro.completions.valid, rewards=ro.rewards, advantages=ro.advantages, masks=masks, entropy=entropy,
            visual=visual, temporal=temporal, temporal_rows=ro.temporal_rows,
        )

    def _diagnostic_values(self, rollouts: list[Rollout]) -> dict[str, float]:
        """The step's diagnostics, reduced across processes; a set with no token (denominator 0) is left out."""
        names = sorted({n for r in rollouts for n in r.diag})
        if not names:
            return {}
        local = torch.tensor([[sum(r.diag.get(n, [0.0, 0.0])[k] for r in rollouts) for k in (0, 1)] for n in names],
                             dtype=torch.float64, device=self.acc.device)
        total = self.acc.reduce(local, reduction="sum") if self.acc.num_processes > 1 else local
        return {n: num / den for n, (num, den) in zip(names, total.tolist()) if den > 0}

    def _clip(self) -> float:
        if self.cfg.max_grad_norm and self.cfg.max_grad_norm > 0:
            norm = self.acc.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        else:
            grads = [p.grad.detach().float().norm() for p in self.model.parameters() if p.grad is not None]
            norm = torch.stack(grads).norm() if grads else torch.tensor(0.0)
        return float(norm)

    def _gather_rows(self, values: Tensor) -> Tensor:
        """Per-completion values of every process (all hold the same number of rows)."""
        values = values.detach().float().to(self.acc.device).contiguous()
        return self.acc.gather(values) if self.acc.num_processes > 1 else values

    def _metrics(self, rollouts: list[Rollout], losses, grad_norm, bad, lr: float, timer: Timer,
                 seconds: float) -> dict[str, float]:
        """The step's metrics over the whole global batch: the same numbers with 1 or N processes.

        Per-completion values are gathered; token fractions and means are sums of counts reduced across
        processes (so a process with more tokens weighs more, as in a single process).
        """
        rewards = self._gather_rows(torch.cat([r.rewards for r in rollouts]))
        lengths = self._gather_rows(torch.cat([r.completions.lengths for r in rollouts]))
        seq_losses = self._gather_rows(torch.cat([r.seq_losses for r in rollouts]))
        values: dict[str, float] = {
            "reward": float(rewards.mean()),
            "reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
            "completion_length": float(lengths.mean()),
            "num_completions": float(lengths.numel()),
            # completions with no text (the model ended the turn at once) and prompt groups whose
            # rewards are all equal (advantage 0: no policy gradient), as fractions
            "empty_completions": float(self._gather_rows(torch.tensor(
                [float(not t.strip()) for r in rollouts for t in r.completions.texts])).mean()),
            "zero_advantage_groups": float(self._gather_rows(torch.cat(
                [(r.rewards.view(-1, self.cfg.num_generations).std(1) == 0).float() for r in rollouts])).mean()),
            "loss_variance": float(seq_losses.var()) if seq_losses.numel() > 1 else 0.0,
        }
        for name in rollouts[0].components:
            key = f"{name}_reward" if not name.endswith("bonus") else name
            values[key] = float(self._gather_rows(torch.cat([r.components[name] for r in rollouts])).mean())
        # token-weighted sums: the names are the same in every process (they depend on the settings only)
        names = sorted({n for r in rollouts for n in r.sums})
        local = torch.tensor([[sum(r.sums.get(n, [0.0, 0.0])[k] for r in rollouts) for k in (0, 1)] for n in names]
                             + [[sum(losses), float(len(losses))]], dtype=torch.float64, device=self.acc.device)
        total = self.acc.reduce(local, reduction="sum") if self.acc.num_processes > 1 else local
        for n, (num, den) in zip(names, total[:-1].tolist()):
            # an empty pool (no video row in the step: temporal_fraction; no reference: kl) reports 0, so
            # that every line of metrics.jsonl has the same keys
            values[n] = num / den if den > 0 else 0.0
        num, den = total[-1].tolist()
        values["loss"] = num / max(1.0, den)
        values.update(self._diagnostic_values(rollouts))
        metrics = {"step": self.state.step, **dict(sorted(values.items()))}
        metrics.update({
            "grad_norm": grad_norm, "learning_rate": lr, "bad_step": int(bad),
            "bad_steps_total": self.bad_steps, "skipped_samples": self.skips.total, "step_seconds": seconds,
            **{f"time_{k}": v for k, v in timer.seconds.items()},
        })
        if self.cfg.log_completions_every and self.state.step % self.cfg.log_completions_every == 0 and self.acc.is_main_process:
            self._log_completions(rollouts[0])
        if rollouts[0].token_records:
            self.out.mkdir(parents=True, exist_ok=True)
            write_token_records(self.out / "tokens.jsonl", rollouts[0].token_records)
            rollouts[0].token_records = None
        return metrics

    def _log_completions(self, ro: Rollout) -> None:
        G = self.cfg.num_generations
        with (self.out / "completions.jsonl").open("a") as fh:
            for i, text in enumerate(ro.completions.texts):
                s = ro.samples[i // G]
                fh.write(json.dumps({"step": self.state.step, "problem_id": s.problem_id, "completion": text,
                                     "solution": s.solution, "reward": float(ro.rewards[i]),
                                     "advantage": float(ro.advantages[i])}) + "\n")

    # ------------------------------------------------------------------ loop, checkpoints
    def train(self) -> dict[str, float]:
        from tqdm.auto import tqdm

        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        if self.acc.is_main_process:
            (self.out / "train_config.json").write_text(json.dumps(_asdict(cfg), indent=2))
        if self.acc.trackers:
            pass
        elif [r for r in cfg.report_to if r != "none"]:
            self.acc.init_trackers("video-ktr", config=_asdict(cfg))
        if self.acc.is_main_process:
            self._trim_logs()
        bar = tqdm(total=cfg.max_steps, initial=self.state.step, disable=not self.acc.is_main_process, desc="train")
        last: dict[str, float] = {}
        model = self.model
        model.train()
        try:
            while self.state.step < cfg.max_steps:
                last = self.train_step()
                if self.acc.is_main_process:
                    with (self.out / "metrics.jsonl").open("a") as fh:
                        fh.write(json.dumps(finite_or_null(last)) + "\n")
                    bar.update(1)
                    bar.set_postfix(reward=f"{last['reward']:.3f}", key=f"{last.get('key_token_fraction', 1.0):.2f}")
                    if cfg.logging_steps and self.state.step % cfg.logging_steps == 0:
                        bar.write(_progress_line(last))
                if [r for r in cfg.report_to if r != "none"]:
                    self.acc.log(last, step=self.state.step)
                # also at the last step: a finished run can then be resumed to a larger --max_steps
                if cfg.save_steps and self.state.step % cfg.save_steps == 0:
                    self.save_checkpoint()
        finally:
            self.close()
        bar.close()
        self.save_final()
        if self.skips.total and self.acc.is_main_process:
            print(f"skipped samples: {self.skips.summary()}")
        self.acc.end_training()
        return last

    def _trim_logs(self) -> None:
        """metrics.jsonl / completions.jsonl continue exactly where the resumed state is.

        A fresh run starts new files (tokens.jsonl too); a resumed run drops the lines of steps after its checkpoint (a
        run killed between a checkpoint and the next one wrote them, and they are run again).
        """
        for name in ("metrics.jsonl", "completions.jsonl", "tokens.jsonl"):
            path = self.out / name
            if not path.exists():
                continue
            kept = []
            if self.state.step > 0:
                for line in path.read_text().splitlines():
                    try:
                        if int(json.loads(line)["step"]) <= self.state.step:
                            kept.append(line)
                    except (ValueError, KeyError, TypeError):
                        continue
            path.write_text("".join(line + "\n" for line in kept))

    def save_checkpoint(self) -> Path:
        path = ckpt.save(self.out, self.state.step, self.acc, self.model, self.processor, self.optimizer, self.scheduler,
                         self.state, extra={"bad_steps": self.bad_steps, "skipped": dict(self.skips.counts),
                                            "bad_rows": sorted(self.bad_rows)})
        if self.cfg.save_total_limit and self.acc.is_main_process:
            ckpt.prune(self.out, self.cfg.save_total_limit)
        return path

    def save_final(self) -> None:
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            ckpt.save_model(self.out, self.acc, self.model, self.processor)

    def _resume(self, spec: str) -> None:
        path = ckpt.find(self.out, spec)
        extra = ckpt.load(path, self.acc, self.model, self.optimizer, self.scheduler, self.state)
        self.bad_steps = int(extra.get("bad_steps", 0))
        self.bad_rows = {int(i) for i in extra.get("bad_rows", [])}
        self.skips.counts.update({str(k): int(v) for k, v in (extra.get("skipped") or {}).items()})
        if self.acc.is_main_process:
            print(f"resumed from {path} at step {self.state.step}")


def sharded_parameters(acc: Any) -> bool:
    """True under FSDP or DeepSpeed ZeRO-3, where a process holds shards of the parameters."""
    kind = str(getattr(acc, "distributed_type", ""))
    if kind.endswith("FSDP"):
        return True
    if kind.endswith("DEEPSPEED"):
        plugin = getattr(getattr(acc, "state", None), "deepspeed_plugin", None)
        return getattr(plugin, "zero_stage", 0) == 3
    return False


def probe_score(logp: Tensor, probe_logp: Tensor, tolerance: float) -> Tensor:
    """S = log p - log p_probe, with |S| < tolerance set to exactly 0.

    When a probe leaves the input unchanged (a permutation of identical frames) S is 0 up to float
    rounding, and the rounding depends on how the passes were batched; without the tolerance the
    `>=` threshold would pick tokens by rounding noise, different on 1 and on N processes.
    """
    score = logp.detach() - probe_logp
    return score.masked_fill(score.abs() < tolerance, 0.0) if tolerance > 0 else score


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _asdict(cfg: TrainConfig) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(cfg)


def _progress_line(m: dict[str, float]) -> str:
    keys = ("reward", "accuracy_reward", "format_reward", "loss", "kl", "key_token_fraction", "completion_length", "step_seconds")
    return f"step {int(m['step'])}: " + " ".join(f"{k}={m[k]:.4g}" for k in keys if k in m)
