"""The run scaffold SFT and GRPO share: accelerate, the schedule, the bad-step guard, logs, checkpoints, resume.

A recipe (``SFTTrainer``, ``KTRTrainer``) subclasses :class:`TrainingRun`, calls :meth:`_start_run` and
:meth:`_prepare` in its set-up, and defines ``train_step`` (one optimiser step, returning its
metrics); :meth:`train` is the loop:

    write the config, trim the logs to the resumed step -> [train_step -> after_step (evaluation)
    -> metrics.jsonl, progress line, trackers -> checkpoint every --save_steps] -> finish (final
    evaluation) -> final model -> summary

What a recipe adds to a checkpoint and takes back from it: :meth:`checkpoint_extra` and
:meth:`restore_extra`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from video_ktr.model.loading import grouped_kv_attention, load_model, use_grouped_kv_sdpa
from video_ktr.training import checkpoint as ckpt
from video_ktr.training.checkpoint_verify import check_finite_model, find_resumable, non_finite_parameters
from video_ktr.training.distributed import (
    accelerator_device_kwargs,
    check_backend,
    check_process_count,
    fill_deepspeed_batch_size,
    fsdp_reshard_after_forward,
    fsdp_wrap_classes,
    own_fsdp2,
    run_info,
)
from video_ktr.training.hub import finish_output
from video_ktr.training.options import RunOptions
from video_ktr.training.rollout_weights import init_fsdp2_root
from video_ktr.training.schedule import build_scheduler
from video_ktr.utils.jsonl import finite_or_null
from video_ktr.utils.logs import bars_disabled, get_logger, setup_logging
from video_ktr.utils.run_dir import claim_output_dir

logger = get_logger(__name__)


def _full(value: Any) -> Any:
    """A DTensor's whole value (the gradient norm of an FSDP2 model is one); anything else as it is."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


class BadStep(RuntimeError):
    """Too many optimiser steps had a non-finite loss or gradient (--max_bad_steps)."""


class TrainingRun:
    """State and bookkeeping of one training run; the recipe's own step is ``train_step``."""

    config_file = "run_config.json"  # the options as JSON, in the output folder
    tracker_project = "video-ktr"
    bar_desc = "train"
    recipe = "run"  # the name of the method in the model card (training/hub.py)
    log_files: tuple[str, ...] = ("metrics.jsonl",)  # cut back to the resumed step when a run resumes
    save_at_last_step = True  # a checkpoint at the last step too (a finished run can then be extended)

    cfg: RunOptions
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    processor: Any
    total_steps: int

    # ------------------------------------------------------------------ set-up
    def _start_run(self, cfg: RunOptions, accelerator: Any = None, *, mixed_precision: str | None = None) -> None:
        """accelerate (one process, DDP, FSDP or DeepSpeed as launched), the output folder, the counters."""
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.cfg, self.out = cfg, Path(cfg.output_dir)
        kwargs = {"mixed_precision": mixed_precision} if mixed_precision is not None else {}
        self.acc = accelerator or Accelerator(log_with=cfg.trackers or None, project_dir=str(self.out), **kwargs,
                                              **accelerator_device_kwargs())
        setup_logging(cfg, main=self.acc.is_main_process)  # --log_level / --log_level_replica
        check_process_count(self.acc)
        check_backend(self.acc, cfg)
        self.run_lock = (claim_output_dir(self.out, resuming=bool(cfg.resume_from_checkpoint), overwrite=cfg.overwrite_output_dir)
                         if self.acc.is_main_process else None)  # one run per folder (utils/run_dir.py)
        set_seed(cfg.seed)
        self.state = ckpt.TrainState()
        self.bad_steps = 0

    def _load_model(self) -> torch.nn.Module:
        """The model of --model_name_or_path; on CPU its sdpa attention takes grouped key/value heads as they are
        (model.loading.use_grouped_kv_sdpa: the same numbers without per-head copies)."""
        cfg = self.cfg
        model = load_model(cfg.model_name_or_path, dtype=cfg.dtype, attn_implementation=cfg.attn_implementation,
                           trust_remote_code=cfg.trust_remote_code)
        if grouped_kv_attention(self.acc.device):
            use_grouped_kv_sdpa(model)
        return model

    def _prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """The schedule over ``self.total_steps`` and accelerate's wrapping of model and optimiser.

        The scheduler stays outside accelerate: accelerate's wrapper steps it once per process per step
        (it assumes the data loader's batch grew with the process count), so 2 processes would run the
        learning-rate schedule twice as fast as 1. Here it steps exactly once per optimiser step.
        """
        cfg = self.cfg
        self.scheduler = build_scheduler(optimizer, kind=cfg.lr_scheduler_type, total_steps=self.total_steps,
                                         warmup_ratio=cfg.warmup_ratio)
        fill_deepspeed_batch_size(self.acc, cfg.per_device_train_batch_size)  # no data loader for accelerate to read it from
        if own_fsdp2(self.acc):  # an FSDP launch on CPU processes: accelerate cannot shard, fully_shard does
            from video_ktr.training import distributed_fsdp as fsdp

            names = fsdp.parameter_names(model)
            self.fsdp_wrap(model)
            fsdp.rebind_optimizer(optimizer, names, model)
            self.model, self.optimizer = model, self.acc.prepare(optimizer)
            return
        plugin = getattr(self.acc.state, "fsdp_plugin", None) if getattr(self.acc, "is_fsdp2", False) else None
        if plugin is not None:  # accelerate's FSDP2 (GPUs): the vision tower a unit of its own, as on CPU
            from video_ktr.training import distributed_fsdp as fsdp

            fsdp.wrap_vision_towers_too(plugin, model)
        self.model, self.optimizer = self.acc.prepare(model, optimizer)
        if plugin is not None:
            init_fsdp2_root(self.acc.unwrap_model(self.model))  # the tower may run before the whole model does

    @property
    def fsdp_wrap(self) -> Callable[[torch.nn.Module], torch.nn.Module] | None:
        """The function that shards a model in place with FSDP2 when the trainers do it themselves (an FSDP launch
        on CPU processes; the reference model goes through it too), else None (accelerate wraps, or nothing does)."""
        if not own_fsdp2(self.acc):
            return None
        from video_ktr.training import distributed_fsdp as fsdp

        def wrap(model: torch.nn.Module) -> torch.nn.Module:
            fsdp.shard_model(model, reshard_after_forward=fsdp_reshard_after_forward(), wrap_classes=fsdp_wrap_classes())
            return model

        return wrap

    def _resume(self, spec: str) -> None:
        path, skipped = find_resumable(self.out, spec)  # verified; damaged newer ones skipped and named
        for line in skipped:
            logger.warning(line)
        extra = ckpt.load(path, self.acc, self.model, self.optimizer, self.scheduler, self.state)
        self.bad_steps = int(extra.get("bad_steps", 0))
        self.restore_extra(extra, path)
        logger.info(f"resumed from {path} at step {self.state.step}")

    # ------------------------------------------------------------------ what a recipe may add
    def checkpoint_extra(self) -> dict[str, Any]:
        return {}

    def restore_extra(self, extra: dict[str, Any], path: Path) -> None:
        pass

    def after_step(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Called after each step, before its metrics are written (SFT evaluates here)."""
        return metrics

    def console_lines(self, metrics: dict[str, Any]) -> list[str]:
        """Lines printed under the progress bar after a step."""
        return []

    def postfix(self, metrics: dict[str, Any]) -> dict[str, str]:
        return {}

    def on_start(self) -> None:
        """Main process, before the first step."""

    def finish(self, last: dict[str, Any], bar: Any) -> dict[str, Any]:
        """After the last step, before the final model is saved (SFT's final evaluation)."""
        return last

    def summary(self, last: dict[str, Any]) -> dict[str, Any]:
        """After the final model is saved: what train() returns."""
        return last

    def before_final_save(self) -> None:
        pass

    def close(self) -> None:
        """Stop background work (data prefetch). train() calls it at the end."""

    # ------------------------------------------------------------------ the step's shared parts
    def update(self, bad: bool) -> tuple[float, bool]:
        """Clip and step, or skip the step on every process when a loss or the gradient was not finite.

        Returns (gradient norm before clipping, whether the step was skipped). Every process takes the
        same decision, or their weights would drift apart; --max_bad_steps skipped steps stop the run.
        """
        cfg = self.cfg
        if cfg.max_grad_norm and cfg.max_grad_norm > 0:
            grad_norm = float(_full(self.acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)))
        else:
            grads = [_full(p.grad.detach().float().norm()) for p in self.model.parameters() if p.grad is not None]
            grad_norm = float(torch.stack(grads).norm() if grads else torch.tensor(0.0))
        bad = self.global_sum(float(bad or not math.isfinite(grad_norm))) > 0
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_steps += 1
            if self.bad_steps >= cfg.max_bad_steps:
                raise BadStep(f"{self.bad_steps} steps had a non-finite loss or gradient (--max_bad_steps "
                              f"{cfg.max_bad_steps}); lower the learning rate or check the data")
        else:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, bad

    def global_sum(self, value: float) -> float:
        """``value`` summed over the processes (itself with one process)."""
        if self.acc.num_processes == 1:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.acc.device)
        return float(self.acc.reduce(t, reduction="sum")[0])

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        cfg, acc = self.cfg, self.acc
        self.out.mkdir(parents=True, exist_ok=True)
        if acc.is_main_process:
            (self.out / self.config_file).write_text(json.dumps(cfg.record(), indent=2))
            (self.out / "run_info.json").write_text(json.dumps({"run_name": cfg.run_label, **run_info(self.acc, self.model)}, indent=2))
            self._trim_logs()
            self.on_start()
        if cfg.trackers and not acc.trackers:
            acc.init_trackers(self.tracker_project, config={**cfg.record(), "run_name": cfg.run_label},
                              init_kwargs=cfg.tracker_init_kwargs())
        bar = tqdm(total=self.total_steps, initial=self.state.step, disable=bars_disabled(cfg, main=acc.is_main_process),
                   desc=self.bar_desc)
        last: dict[str, Any] = {"step": self.state.step}
        self.model.train()
        try:
            while self.state.step < self.total_steps:
                last = self.after_step(self.train_step())
                self._log(last, bar)
                step = self.state.step
                if cfg.save_steps and step % cfg.save_steps == 0 and (self.save_at_last_step or step < self.total_steps):
                    self.save_checkpoint()
        finally:
            self.close()
        last = self.finish(last, bar)
        bar.close()
        self.save_final()
        finish_output(self, recipe=self.recipe)  # --merge_adapters, README.md, --push_to_hub (main process)
        result = self.summary(last)
        # every process leaves together: a process that tears its process group down while the main one is still
        # writing (or a gloo/FSDP2 transfer is still pending) aborts with SIGABRT and fails the launch
        acc.wait_for_everyone()
        acc.end_training()
        if self.run_lock is not None:
            self.run_lock.release()
        return result

    def _log(self, metrics: dict[str, Any], bar: Any) -> None:
        if self.acc.is_main_process:
            with (self.out / "metrics.jsonl").open("a") as fh:
                fh.write(json.dumps(finite_or_null(metrics)) + "\n")
            bar.update(1)
            bar.set_postfix(**self.postfix(metrics))
            for line in self.console_lines(metrics):
                bar.write(line)
        if self.cfg.trackers:
            self.acc.log(metrics, step=self.state.step)

    def _trim_logs(self) -> None:
        """The logs continue exactly where the resumed state is.

        A fresh run starts new files; a resumed run drops the lines of steps after its checkpoint (a run
        killed between a checkpoint and the next one wrote them, and they are run again).
        """
        for name in self.log_files:
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

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        path = ckpt.save(self.out, self.state.step, self.acc, self.model, self.processor, self.optimizer, self.scheduler,
                         self.state, extra={"bad_steps": self.bad_steps, **self.checkpoint_extra()},
                         model_only=self.cfg.save_only_model)
        if self.cfg.save_total_limit and self.acc.is_main_process:
            ckpt.prune(self.out, self.cfg.save_total_limit)
        return path

    def save_final(self) -> None:
        """The final model; every process enters (the weights are gathered under FSDP / ZeRO-3), the main one writes."""
        self.acc.wait_for_everyone()
        self.before_final_save()
        # never a NaN model as final: each process checks what it holds (its shards under FSDP2), all agree
        bad = non_finite_parameters(self.acc.unwrap_model(self.model))
        if self.global_sum(float(len(bad))) > 0:
            check_finite_model(self.acc.unwrap_model(self.model), bad or ["(on another process)"])
        ckpt.save_model(self.out, self.acc, self.model, self.processor)
