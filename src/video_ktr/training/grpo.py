"""The GRPO trainer with key-token reinforcement (Video-KTR), on accelerate.

One optimiser step is the recipe :meth:`KTRTrainer.train_step`, read top to bottom:

    batch -> rollout (G completions per prompt) -> rewards -> advantages -> probes (visual, temporal)
    and reference, no grad -> policy log-probs and entropy (grad) -> key-token selection -> loss ->
    backward -> update -> metrics

Each stage is a function in :mod:`video_ktr.training.grpo_stages` over plain values (a frozen
:class:`Rollout`, masks and statistics as return values, a ``LossSpec`` and a ``SelectionSpec``);
the data order lives in :mod:`video_ktr.training.grpo_data`, the metrics in
:mod:`video_ktr.training.grpo_metrics`. This class holds the state (model, optimiser, position) and
keeps the books (metrics, checkpoints, resumption).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from video_ktr.core.diagnostics import (
    LinearUses,
    gradient_decomposition,
    last_decoder_layer,
    output_head,
    record_linear_calls,
    write_token_records,
)
from video_ktr.core.loss import group_advantages
from video_ktr.core.rewards import load_reward_function
from video_ktr.data.rows import SkipReport, load_dataset
from video_ktr.data.text_checks import text_char_limit
from video_ktr.model.adapters import frames_for, router_loss_for
from video_ktr.model.decode import rollout_decoder
from video_ktr.model.inputs import select_prompts, sequence_inputs, to_device
from video_ktr.model.loading import freeze_vision, load_processor, special_tokens, unwrap
from video_ktr.model.lockstep import Lockstep
from video_ktr.model.prefix import strip_pixels
from video_ktr.model.vllm_rollout import VLLMRollout
from video_ktr.training.distributed import sharded_parameters
from video_ktr.training.distributed_fsdp import gradients_unsynced
from video_ktr.training.grpo_config import TrainConfig
from video_ktr.training.grpo_data import GRPOData
from video_ktr.training.grpo_metrics import (
    Collectives,
    MicroRecord,
    Timer,
    log_completions,
    progress_line,
    record_loss_stats,
    record_selection,
    record_selection_diagnostics,
    rollout_token_records,
    step_metrics,
)
from video_ktr.training.grpo_stages import (
    ForwardPlan,
    RandomControl,
    Rewards,
    Rollout,
    SamplingSpec,
    groups_to_probe,
    micro_loss,
    per_sequence_losses,
    policy_logprobs,
    probe_scores,
    reference_logprobs,
    rollout_seeds,
    sample_completions,
    score_rewards,
    select_tokens,
    signal_scores,
    temporal_permutations,
    tgrpo_bonus,
    token_weights,
)
from video_ktr.training.reference import prepare_reference
from video_ktr.training.rollout_weights import rollout_weights, synced_rollout
from video_ktr.training.run import TrainingRun
from video_ktr.utils.logs import get_logger

logger = get_logger(__name__)


class KTRTrainer(TrainingRun):
    """GRPO with key-token reinforcement: set-up, the step (train_step), and what a checkpoint carries."""

    config_file = "train_config.json"
    recipe = "grpo"
    log_files = ("metrics.jsonl", "completions.jsonl", "tokens.jsonl")

    def __init__(self, cfg: TrainConfig, accelerator: Any = None):
        cfg.validate()
        self._start_run(cfg, accelerator)
        if cfg.diagnostics_steps and sharded_parameters(self.acc):
            raise ValueError("--diagnostics_steps needs whole parameters on each process (one process or DDP): under "
                             "FSDP or DeepSpeed ZeRO-3 each process holds a shard, and the gradient diagnostics would "
                             "not measure the full gradient. Run them with DDP or ZeRO-2, or set --diagnostics_steps 0.")
        self.skips = SkipReport()
        samples = load_dataset(cfg.dataset, cfg.media_root, on_bad_sample=cfg.on_bad_sample,
                               allow_outside_media_root=cfg.allow_outside_media_root, report=self.skips,
                               special_tokens=cfg.special_tokens, max_text_chars=text_char_limit(cfg.max_prompt_length),
                               config=cfg.dataset_config, split=cfg.dataset_split)
        self.processor = load_processor(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code)
        self.tokenizer = self.processor.tokenizer
        self.data = GRPOData(samples, cfg=cfg, frames=frames_for(self.processor, cfg.frame_settings()), processor=self.processor,
                             rank=self.acc.process_index, world=self.acc.num_processes, skips=self.skips)
        model = self._load_model()
        # a mixture-of-experts checkpoint whose config asks for its router logits: the policy loss gets
        # router_aux_loss_coef x the load-balancing loss, as in TRL (model/adapters/router_loss.py); else None
        self.router_loss = router_loss_for(model)
        self.special = special_tokens(model.config, self.tokenizer)
        if cfg.freeze_vision_tower:
            freeze_vision(model)
        self.ref_model = None
        if cfg.use_peft:
            model = self._apply_peft(model)
        elif cfg.beta != 0:
            self.ref_model = self._load_model()
            self.ref_model.eval().requires_grad_(False)
            if self.router_loss is not None:  # its passes compute no router loss (and cached passes do not fail)
                router_loss_for(self.ref_model)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                      weight_decay=cfg.weight_decay)
        self.total_steps = cfg.optimizer_steps(len(samples), cfg.per_device_train_batch_size * self.acc.num_processes
                                               * cfg.gradient_accumulation_steps)  # --max_steps or --num_train_epochs
        self.data.total_micro_steps = self.total_steps * cfg.gradient_accumulation_steps
        self._prepare(model, optimizer)
        if self.ref_model is not None:  # held like the policy: a ZeRO-3 engine, FSDP2 units, or whole (training/reference.py)
            self.ref_model = prepare_reference(self.ref_model, self.acc, fsdp_wrap=self.fsdp_wrap)
        self.reward_fns = [(spec, load_reward_function(spec, cfg.reward_completion_format), w)
                           for spec, w in zip(cfg.reward_funcs, cfg.reward_weights or [1.0] * len(cfg.reward_funcs))]
        self.loss_spec, self.selection = cfg.loss_spec(), cfg.selection_spec()
        self.weighting = cfg.weighting_spec()
        # the static decoder keeps its captured CUDA graphs across steps (decode.GraphStore); 'hf' on CPU for 'auto'
        self.sampling = self._sampling_spec()
        self.vllm = self._start_vllm() if cfg.use_vllm else None
        self.plan = ForwardPlan.for_run(cfg)
        if self.router_loss is not None:  # the loss counts each row's prompt tokens, as one forward of the rows does
            self.plan = dataclasses.replace(self.plan, policy_shared_prefix=False)
        self.comm = Collectives(gather_rows=self._gather_rows, reduce_sum=self._reduce_sum)
        # several processes: every pass makes as many forward calls on each (model/lockstep.py); one: nothing changes
        self.lockstep = (Lockstep(self._all_max, sharded=sharded_parameters(self.acc)) if self.acc.num_processes > 1
                         else None)
        if sharded_parameters(self.acc) and not self.plan.encode_visual_once:
            raise ValueError("--plain_forwards runs the vision tower inside each policy forward, as many times as the "
                             "rows' modalities: under FSDP or DeepSpeed ZeRO-3 every process must make the same calls, "
                             "which that path cannot agree. Leave --plain_forwards false.")
        if cfg.resume_from_checkpoint:
            self._resume(cfg.resume_from_checkpoint)

    def _start_vllm(self):
        """The colocated vLLM engine of --use_vllm (model/vllm_rollout.py), on this process's GPU."""
        cfg = self.cfg
        if self.acc.num_processes > 1:
            raise ValueError("--use_vllm runs one colocated engine in a single training process; several processes "
                             "(one engine each, or tensor-parallel groups) are not written yet: use one GPU or drop --use_vllm")
        if sharded_parameters(self.acc):
            raise ValueError("--use_vllm needs the whole parameters on the process (no ZeRO-3 / FSDP sharding)")
        if self.acc.device.type != "cuda":
            raise ValueError("--use_vllm needs a CUDA GPU (vLLM does not run on this device)")
        return VLLMRollout.start(cfg.model_name_or_path, self.processor, gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                                 max_model_len=cfg.vllm_max_model_length, seed=cfg.seed, dtype=cfg.dtype,
                                 enable_sleep_mode=cfg.vllm_enable_sleep_mode, trust_remote_code=cfg.trust_remote_code)

    def _sampling_spec(self) -> SamplingSpec:
        """The rollout's settings; a rollout whose forwards stay collectives (sharded, not gathered) keeps every
        process decoding until all are done, which only transformers' generate does (synced_gpus)."""
        cfg = self.cfg
        synced, decoder = synced_rollout(self.model, cfg.gather_for_generation), cfg.rollout_decoder
        if synced and decoder == "static":
            raise ValueError("--rollout_decoder static with --gather_for_generation false under ZeRO-3 / FSDP: every "
                             "token's forward gathers parameters from all processes, and the static decoder stops when "
                             "this process's rows are done. Use --rollout_decoder hf (or auto), or gather for generation.")
        if synced and cfg.temporal_grpo:
            raise ValueError("--temporal_grpo with --gather_for_generation false under ZeRO-3 / FSDP: the shuffled-frame "
                             "rollouts run only on processes with videos in their batch, and their sharded forwards "
                             "would wait for the others forever. Gather for generation, or drop --temporal_grpo.")
        return SamplingSpec(cfg.max_completion_length, cfg.temperature, cfg.top_p,
                            "hf" if synced else rollout_decoder(decoder, self.acc.device), synced=synced)

    def _apply_peft(self, model: torch.nn.Module) -> torch.nn.Module:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as exc:
            raise ImportError("--use_peft needs the peft extra: pip install 'video-ktr[peft]'") from exc
        lora = LoraConfig(r=self.cfg.lora_r, lora_alpha=self.cfg.lora_alpha, lora_dropout=self.cfg.lora_dropout,
                          target_modules=self.cfg.lora_target_modules, task_type="CAUSAL_LM")
        return get_peft_model(model, lora)

    # ------------------------------------------------------------------ the step
    def train_step(self) -> dict[str, float]:
        """One optimiser step: gradient_accumulation_steps micro-batches, num_iterations passes over them."""
        cfg, G, timer, t0 = self.cfg, self.cfg.num_generations, Timer(), time.perf_counter()
        signals, probing = cfg.signals, bool({"visual", "temporal"} & set(cfg.signals))
        diagnose, log_tokens = self._diagnostics_at(self.state.step + 1)
        rollouts: list[Rollout] = []
        for _ in range(cfg.gradient_accumulation_steps):
            micro = self.state.micro_step
            with timer.phase("data"):  # batch: P prompts, their media and processor outputs
                batch = self.data.batch_for(micro)
                samples, indices, P = batch.samples, [i for i, _ in batch.picked], len(batch.picked)
                prompts = to_device(batch.prompt_inputs, self.acc.device)
            with timer.phase("rollout"):  # rollout: G completions per prompt
                comps = self._sample(samples, batch.media, prompts, rollout_seeds(cfg.seed, "rollout", micro, indices, G))
            with timer.phase("rewards"):  # rewards
                rewards = score_rewards(samples, comps, self.reward_fns, G, with_length_bonus=cfg.length_bonus)
            perms = (temporal_permutations(cfg.seed, micro, batch.picked, batch.media, cfg.temporal_probe)
                     if "temporal" in signals or cfg.temporal_grpo else {})
            if cfg.temporal_grpo:  # T-GRPO: a rollout on shuffled frames, a bonus to groups that need the order
                with timer.phase("rollout"):
                    rewards = self._tgrpo(rewards, batch, prompts, perms, micro)
            advantages = group_advantages(rewards.total, G)  # advantages, per prompt group
            # the N rows' token inputs and grids without G copies of the pixels (no probe reads pixels)
            seq = sequence_inputs(select_prompts(strip_pixels(prompts), list(range(P)), G), comps.ids, comps.valid)
            probed = (groups_to_probe(advantages, P, every_group=cfg.probe_all_groups or cfg.zero_advantage_masks_matter
                                      or diagnose or log_tokens) if probing else list(range(P)))
            with timer.phase("probes"):  # probes: visual and temporal log-probs, no grad
                probes = probe_scores(self.model, self.processor, signals=signals, visual_probe=cfg.visual_probe,
                                      prompt_inputs=prompts, seq_inputs=seq, media=batch.media, comps=comps, perms=perms,
                                      probed=probed, group_size=G, plan=self.plan, lockstep=self.lockstep)
            with timer.phase("reference"):  # reference log-probs, no grad
                ref_logp = self._reference_logp(prompts, comps) if cfg.beta != 0 else None
            rollouts.append(Rollout(samples, indices, micro, batch.media, prompts, seq, comps, rewards.total, rewards.components,
                                    advantages, probes, ref_logp))
            self.state.micro_step += 1
        lr = float(self.optimizer.param_groups[0]["lr"])  # the rate this step uses
        records = [MicroRecord() for _ in rollouts]
        keys: list[Tensor | None] = [None] * len(rollouts)
        olds: list[Tensor | None] = [None] * len(rollouts)
        weights: list[Tensor | None] = [None] * len(rollouts)  # soft key-token weights (None: hard mask)
        losses, any_bad, grad_norm = [], False, 0.0
        router_losses: list[float] = []  # the load-balancing loss of each policy pass (MoE with router logits on)
        for it in range(cfg.num_iterations):
            bad = False
            for j, ro in enumerate(rollouts):
                first, valid = it == 0, ro.completions.valid
                grad_diagnostics = first and diagnose and j == 0
                head = self._measured_head() if grad_diagnostics else None
                # no gradient all-reduce before the last micro-batch: forward and backward both inside no_sync
                with self._accumulating(j < len(rollouts) - 1):
                    with timer.phase("policy"), record_linear_calls(head) as head_calls, self._routing():  # grad
                        logp, entropy = policy_logprobs(self.model, ro, G, self.plan, with_entropy=first and (
                            "entropy" in signals or (log_tokens and j == 0)), lockstep=self.lockstep)
                    if first:
                        with timer.phase("selection"):  # key-token selection (and soft weights)
                            masks, keys[j], weights[j] = self._select(ro, logp, entropy)
                        olds[j] = logp.detach() if cfg.num_iterations > 1 else None
                        self._record_first_pass(records[j], ro, masks, logp, entropy, diagnose,
                                                log_tokens and j == 0 and self.acc.is_main_process)
                    with timer.phase("loss"):  # loss
                        loss, stats = micro_loss(logp, ro, keys[j], olds[j], self.loss_spec, global_sum=self.global_sum,
                                                 num_processes=self.acc.num_processes, weights=weights[j])
                        if first:
                            records[j].seq_losses = per_sequence_losses(logp, ro, keys[j], self.loss_spec, weights[j])
                        loss = self._with_router_loss(loss, router_losses)
                    if grad_diagnostics:
                        with timer.phase("diagnostics"):
                            # with a soft weighting: decomposed by the hard mask of the same signals (unweighted)
                            self._gradient_diagnostics(records[j], ro, logp, masks["key"] if self.weighting.soft
                                                       else keys[j], olds[j], head, head_calls)
                    del head_calls  # the head's logits are no longer needed
                    record_loss_stats(records[j].sums, stats, keys[j], valid, kl_on_keys=self.loss_spec.kl_tokens == "mask",
                                      has_reference=ro.ref_logp is not None)
                    loss = loss / cfg.gradient_accumulation_steps
                    bad = bad or not torch.isfinite(loss)
                    with timer.phase("backward"):
                        self.acc.backward(torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0) if bad else loss)
                losses.append(float(loss.detach()) * cfg.gradient_accumulation_steps)
            with timer.phase("optimizer"):  # update (or skip a non-finite step on every process)
                grad_norm, bad = self.update(bad)
            any_bad = any_bad or bad
        self.scheduler.step()
        self.state.step += 1
        values = step_metrics(rollouts, records, losses, group_size=G, comm=self.comm, device=self.acc.device)
        if router_losses:  # this process's mean over its policy passes (TRL logs it as aux_loss)
            values["router_aux_loss"] = sum(router_losses) / len(router_losses)
        self._write_logs(rollouts[0], records[0])
        return {"step": self.state.step, **dict(sorted(values.items())), "grad_norm": grad_norm, "learning_rate": lr,
                **self._step_counts(any_bad, timer, t0)}

    # ------------------------------------------------------------------ the step's helpers
    def _sample(self, samples: list[Any], media: list[Any], prompts: dict[str, Tensor], seeds: list[int]) -> Any:
        """The rollout stage: G completions per prompt, from vLLM (with this step's weights, pushed once per step)
        or from the policy itself (its whole weights gathered once under ZeRO-3 / FSDP2, released before the update)."""
        cfg, G = self.cfg, self.cfg.num_generations
        if self.vllm is not None:
            return self.vllm.generate(
                self.model, self.state.step, [s.messages(cfg.prompt_layout, cfg.system_prompt) for s in samples],
                media, prompts, self.tokenizer, seeds=seeds, group_size=G,
                max_new_tokens=cfg.max_completion_length, temperature=cfg.temperature, top_p=cfg.top_p,
                eos_ids=self.special.eos_ids, pad_id=self.special.pad_id, suppress_ids=self.special.vision_ids)
        with rollout_weights(self.model, gather=cfg.gather_for_generation) as policy:
            return sample_completions(policy, self.tokenizer, prompts, seeds, group_size=G,
                                      sampling=self.sampling, special=self.special, plan=self.plan)

    def _tgrpo(self, rewards: Rewards, batch: Any, prompts: dict[str, Tensor], perms: dict[int, Any], micro: int
               ) -> Rewards:
        """T-GRPO's bonus (grpo_stages.tgrpo_bonus), its rollout with the policy's whole weights gathered once."""
        cfg, indices = self.cfg, [i for i, _ in batch.picked]
        with rollout_weights(self.model, gather=cfg.gather_for_generation) as policy:
            return tgrpo_bonus(policy, self.tokenizer, self.processor, rewards, batch.samples, prompts, batch.media,
                               perms, seed=cfg.seed, micro_step=micro, indices=indices, group_size=cfg.num_generations,
                               sampling=self.sampling, special=self.special, plan=self.plan)

    def _select(self, ro: Rollout, logp: Tensor, entropy: Tensor | None
                ) -> tuple[dict[str, Tensor], Tensor, Tensor | None]:
        """The selection stage of the first pass: (the signals' masks, the tokens the loss reads, their soft
        weights or None). Hard selection: the key mask; soft (--token_weighting): every valid token, weighted by
        its scores' ranks."""
        cfg, G, valid = self.cfg, self.cfg.num_generations, ro.completions.valid
        scores = signal_scores(logp, entropy, ro.probes, cfg.signals, cfg.probe_score_tolerance)
        masks = select_tokens(scores, valid, ro.probes, self.selection, G, gather=self._gather_pool,
                              random_control=RandomControl(cfg.seed, ro.micro_step, ro.indices)
                              if "random" in cfg.token_selection else None)
        if not self.weighting.soft:
            return masks, masks["key"], None
        return masks, valid, token_weights(scores, valid, ro.probes, self.weighting, self.selection, G)

    def _step_counts(self, any_bad: bool, timer: Timer, t0: float) -> dict[str, float]:
        """The step record's bookkeeping: bad steps, skipped rows, seconds per phase."""
        return {"bad_step": int(any_bad), "bad_steps_total": self.bad_steps, "skipped_samples": self.skips.total,
                "step_seconds": time.perf_counter() - t0, **{f"time_{k}": v for k, v in timer.seconds.items()}}

    def _reference_logp(self, prompts: dict[str, Tensor], comps: Any) -> Tensor:
        """log p_ref: the frozen reference model, or (LoRA) the policy with its adapters disabled."""
        G = self.cfg.num_generations
        if self.ref_model is not None:
            return reference_logprobs(self.ref_model, prompts, comps, G, self.plan, self.lockstep)
        model = unwrap(self.model)
        with model.disable_adapter():
            return reference_logprobs(model, prompts, comps, G, self.plan, self.lockstep)

    def _routing(self) -> Any:
        """The policy pass records its router logits when the router loss is on (else nothing happens)."""
        return self.router_loss.recording() if self.router_loss is not None else contextlib.nullcontext()

    def _with_router_loss(self, loss: Tensor, seen: list[float]) -> Tensor:
        """The micro-batch's loss + router_aux_loss_coef x the policy pass's load-balancing loss (TRL's sum; both
        are then divided by gradient_accumulation_steps). Dense models and MoE checkpoints with
        output_router_logits off: ``loss`` itself."""
        if self.router_loss is None:
            return loss
        aux = self.router_loss.loss()
        if aux is None:
            return loss
        seen.append(float(aux.detach()))
        return loss + self.router_loss.coef * aux.to(loss.device, loss.dtype)

    @contextlib.contextmanager
    def _accumulating(self, accumulate: bool):
        with gradients_unsynced(self.acc, self.model, accumulate):  # DDP's no_sync, FSDP2's gradient sync off
            yield

    def _record_first_pass(self, record: MicroRecord, ro: Rollout, masks: dict[str, Tensor], logp: Tensor,
                           entropy: Tensor | None, diagnose: bool, log_tokens: bool) -> None:
        """The selection's token counts, and on a diagnostics step its overlaps and the token records."""
        cfg, valid = self.cfg, ro.completions.valid
        record_selection(record.sums, masks, valid, ro.probes, entropy if "entropy" in cfg.signals else None,
                         bool({"visual", "temporal"} & set(cfg.signals)), cfg.num_generations)
        if diagnose:
            record_selection_diagnostics(record.diag, masks, valid, ro.probes)
        if log_tokens:
            record.tokens = rollout_token_records(ro, step=self.state.step + 1, tokenizer=self.tokenizer, logp=logp,
                                                  entropy=entropy, masks=masks, tolerance=cfg.probe_score_tolerance,
                                                  group_size=cfg.num_generations)

    def _diagnostics_at(self, step: int) -> tuple[bool, bool]:
        """(selection and gradient diagnostics, token records) for optimiser step ``step`` (1-based).

        The same on every process (token records are written by the main process only): what a step
        probes and the forward passes it makes must not depend on the rank, or a sharded run (FSDP,
        ZeRO-3), where every forward is a collective, would wait forever.
        """
        cfg = self.cfg
        diagnose = bool(cfg.diagnostics_steps) and step % cfg.diagnostics_steps == 0
        log_tokens = bool(cfg.log_tokens_every) and step % cfg.log_tokens_every == 0
        return diagnose, log_tokens

    def _measured_head(self) -> torch.nn.Linear | None:
        """The output head whose calls the gradient diagnostics record (None when frozen, as under LoRA)."""
        head = output_head(unwrap(self.model))
        return head if head is not None and head.weight.requires_grad else None

    def _gradient_diagnostics(self, record: MicroRecord, ro: Rollout, logp: Tensor, key: Tensor, old_logp: Tensor | None,
                              head: torch.nn.Linear | None, head_calls: LinearUses) -> None:
        """Norms and cosines of the key / masked / full-token loss gradients on this micro-batch.

        torch.autograd.grad on the policy pass's own graph (retained): nothing reaches .grad, so the
        training backward that follows is unchanged. The loss is the local one, before the division by
        gradient_accumulation_steps; with several processes each process measures its own first
        micro-batch and the metrics are the mean over processes.
        """
        groups: dict[str, list] = {}
        layer = last_decoder_layer(unwrap(self.model))
        params = [p for p in layer.parameters() if p.requires_grad] if layer is not None else []
        if params:
            groups["last_layer"] = params
        if head is not None and head_calls.calls:
            groups["lm_head"] = [head_calls]
        if not groups:
            return
        values = gradient_decomposition(logp, ro.advantages.to(logp.device), key, ro.completions.valid, groups,
                                        self.loss_spec, ref_logp=ro.ref_logp, old_logp=old_logp)
        for name, value in values.items():
            record.diag.add(name, value, 1.0)

    def _write_logs(self, ro: Rollout, record: MicroRecord) -> None:
        """completions.jsonl (--log_completions_every) and tokens.jsonl (--log_tokens_every), main process."""
        cfg, step = self.cfg, self.state.step
        if cfg.log_completions_every and step % cfg.log_completions_every == 0 and self.acc.is_main_process:
            log_completions(self.out / "completions.jsonl", ro, step, cfg.num_generations)
        if record.tokens:
            self.out.mkdir(parents=True, exist_ok=True)
            write_token_records(self.out / "tokens.jsonl", record.tokens)

    # ------------------------------------------------------------------ collectives (identities on one process)
    def _gather_rows(self, values: Tensor) -> Tensor:
        """Per-completion values of every process (all hold the same number of rows)."""
        return self.acc.gather(values) if self.acc.num_processes > 1 else values

    def _all_max(self, values: Tensor) -> Tensor:
        """The element-wise max over the processes (Lockstep's agreement of forward-call counts)."""
        import torch.distributed as dist

        values = values.to(self.acc.device)
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
        return values.cpu()

    def _reduce_sum(self, values: Tensor) -> Tensor:
        return self.acc.reduce(values, reduction="sum") if self.acc.num_processes > 1 else values

    def _gather_pool(self, flat: Tensor) -> Tensor:
        """The selection pools of every process (the 'global' scope; NaN marks what is not in a pool)."""
        return self.acc.gather(self.acc.pad_across_processes(flat, dim=0, pad_index=float("nan")))

    def close(self) -> None:
        """Stop the data prefetch thread (after the batch it is preparing). train() calls it at the end."""
        self.data.close()

    # ------------------------------------------------------------------ what the run scaffold asks of the recipe
    def postfix(self, m: dict[str, Any]) -> dict[str, str]:
        return {"reward": f"{m['reward']:.3f}", "key": f"{m.get('key_token_fraction', 1.0):.2f}"}

    def console_lines(self, m: dict[str, Any]) -> list[str]:
        every = self.cfg.logging_steps
        return [progress_line(m)] if every and self.state.step % every == 0 else []

    def checkpoint_extra(self) -> dict[str, Any]:
        return {"skipped": dict(self.skips.counts), "bad_rows": sorted(self.data.bad_rows)}

    def restore_extra(self, extra: dict[str, Any], path: Path) -> None:
        self.data.bad_rows = {int(i) for i in extra.get("bad_rows", [])}
        self.skips.counts.update({str(k): int(v) for k, v in (extra.get("skipped") or {}).items()})

    def summary(self, last: dict[str, Any]) -> dict[str, Any]:
        if self.skips.total:
            logger.warning(f"skipped samples: {self.skips.summary()}")
        return last
