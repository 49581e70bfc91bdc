"""`video-ktr sft`: supervised fine-tuning (the cold start) on chain-of-thought rows.

Each row of a Video-R1-COT-schema file holds the reasoning in ``process`` (``<think>...</think>``) and
the answer in ``solution`` (``<answer>X</answer>``). The model learns to write

    target = process + target_separator + solution, followed by the end-of-turn token (<|im_end|>)

after the same prompt that ``train`` and ``eval`` use (chat template with the generation prompt).

How a batch is built: :func:`video_ktr.training.sft_batches.build_sft_batch` (the prompt/target
boundary is exact by construction). The options: :mod:`video_ktr.training.sft_config`; the run scaffold
(accelerate, schedule, bad-step guard, logs, checkpoints, resume): :mod:`video_ktr.training.run`.

Loss: the mean token cross-entropy over all label tokens of an optimiser step, i.e. summed over the
rows of every micro-batch of every process and divided by the number of label tokens of the whole
step (gradient accumulation and the number of processes do not change what is averaged). Only the
logits of the target columns are formed (``logits_to_keep``).

Evaluation: ``--eval_dataset`` rows give ``eval_loss`` (teacher-forced, no generation); with
``--eval_generate`` the model also answers them greedily (:func:`video_ktr.evaluation.evaluate.evaluate_rows`, the
training prompt and frames) and ``eval_accuracy`` / ``eval_accuracy/<group>`` are logged (groups:
:attr:`video_ktr.data.rows.Sample.kind`). Both run every ``--eval_steps`` and after the last step.

Data order: a seeded permutation per epoch; the position (micro-batches consumed) is the only state a
resumed run needs, so ``N`` steps equal ``k`` steps plus ``N - k`` resumed steps.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from video_ktr.data.media import MediaError, load_image
from video_ktr.data.rows import DataError, Sample, SkipReport, load_dataset
from video_ktr.data.video import FrameCache
from video_ktr.evaluation.evaluate import evaluate_rows
from video_ktr.model.adapters import frames_for, router_loss_for
from video_ktr.model.inputs import Media, to_device
from video_ktr.model.loading import freeze_vision, load_processor, vision_tower
from video_ktr.model.sampling import row_seed
from video_ktr.training.distributed import sharded_parameters
from video_ktr.training.distributed_fsdp import gradients_unsynced
from video_ktr.training.rollout_weights import rollout_weights
from video_ktr.training.run import TrainingRun
from video_ktr.training.sft_batches import (
    IGNORE_INDEX,
    answer_token_mask,
    build_sft_batch,
    end_of_turn_id,
    token_ce,
    token_ce_sum,
)
from video_ktr.training.sft_config import SFTConfig
from video_ktr.training.sft_eval import accuracies, accuracy_line, accuracy_sums, generation_rows
from video_ktr.utils.jsonl import finite_or_null
from video_ktr.utils.logs import get_logger
from video_ktr.utils.prefetch import Prefetcher

logger = get_logger(__name__)


# ---------------------------------------------------------------------------------------------- trainer
class SFTTrainer(TrainingRun):
    """The SFT recipe: set-up, the step, evaluation; the loop, logs and checkpoints are the run scaffold's."""

    config_file = "sft_config.json"
    tracker_project = "video-ktr-sft"
    bar_desc = "sft"
    recipe = "sft"
    save_at_last_step = False  # the final model is saved anyway

    def __init__(self, cfg: SFTConfig, accelerator: Any = None):
        cfg.validate()
        self._start_run(cfg, accelerator, mixed_precision="bf16" if cfg.bf16 else "no")
        if cfg.eval_generate and sharded_parameters(self.acc):
            raise ValueError("--eval_generate needs whole parameters on each process (one process, DDP or ZeRO-2): "
                             "under FSDP or DeepSpeed ZeRO-3 each process would generate a different number of "
                             "tokens with sharded weights. Evaluate the saved model with `video-ktr eval` instead.")
        self.frames = cfg.frame_settings()
        self.cache = FrameCache(capacity=cfg.frame_cache_size or max(8, 4 * cfg.per_device_train_batch_size))
        self.skips = SkipReport()
        load_kw = dict(on_bad_sample=cfg.on_bad_sample, allow_outside_media_root=cfg.allow_outside_media_root, require_process=True,
                       special_tokens=cfg.special_tokens)
        self.samples = load_dataset(cfg.dataset, cfg.media_root, report=self.skips, config=cfg.dataset_config,
                                    split=cfg.dataset_split, **load_kw)
        self.eval_skips = SkipReport()
        self.eval_samples = (load_dataset(cfg.eval_dataset, cfg.media_root, report=self.eval_skips, **load_kw)
                             if cfg.eval_dataset else None)
        self.bad_rows: dict[int, str] = {}  # training rows whose media could not be read (skip policy)
        self._prefetcher = Prefetcher("video-ktr-sft-data")  # the next micro-step's rows (--dataloader_prefetch)
        # --eval_generate: the rows answered at each eval point and their groups (the same on every process)
        self.generation_rows = (generation_rows(self.eval_samples[:cfg.eval_generate_rows])
                                if cfg.eval_generate and self.eval_samples else [])
        self.generation_groups = sorted({r["meta"]["kind"] for r in self.generation_rows})

        self.processor = load_processor(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code)
        self.frames = frames_for(self.processor, self.frames)  # the family's frame-side factor
        self.end_id = end_of_turn_id(self.processor.tokenizer)
        model = self._load_model()
        self.router_loss = router_loss_for(model)  # MoE with output_router_logits on: + coef x load balancing (TRL)
        if cfg.freeze_vision_tower:
            freeze_vision(model)
        if cfg.gradient_checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", None)  # the name from transformers 5.x on
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        tower = vision_tower(model)
        vision_ids = {id(p) for p in tower.parameters()} if tower is not None else set()
        trainable = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in trainable if id(p) not in vision_ids], "lr": cfg.learning_rate}]
        vision_params = [p for p in trainable if id(p) in vision_ids]
        if vision_params:
            groups.append({"params": vision_params, "lr": cfg.learning_rate if cfg.vision_learning_rate is None else cfg.vision_learning_rate})
        optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                      eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
        self.total_steps = self._total_steps()
        self._prepare(model, optimizer)
        self._perms: dict[int, Tensor] = {}
        self._eval_point = False  # whether the step just done evaluated (after_step)
        if cfg.resume_from_checkpoint:
            self._resume(cfg.resume_from_checkpoint)

    # ------------------------------------------------------------------ set-up helpers
    @property
    def rows_per_micro_step(self) -> int:
        """Rows of one micro-step over all processes."""
        return self.cfg.per_device_train_batch_size * self.acc.num_processes

    def _total_steps(self) -> int:
        if self.cfg.max_steps > 0:
            return self.cfg.max_steps
        rows_per_step = self.rows_per_micro_step * self.cfg.gradient_accumulation_steps
        return max(1, math.ceil(self.cfg.num_train_epochs * len(self.samples) / rows_per_step))

    # ------------------------------------------------------------------ data
    def _perm(self, epoch: int) -> Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(row_seed(self.cfg.seed, "sft-order", epoch))
            self._perms = {epoch: torch.randperm(len(self.samples), generator=g)}  # keep one epoch's order
        return self._perms[epoch]

    def _load_media(self, sample: Sample) -> Media:
        if sample.data_type == "video":
            return Media(video=self.cache.get_or_load(sample.media_path, self.frames))
        return Media(image=load_image(sample.media_path, self.frames))

    def _media_error(self, sample: Sample, err: MediaError) -> DataError:
        file, _, row = sample.source.rpartition(":")
        return DataError(file, int(row) if row.isdigit() else None, "path", f"media could not be read: {err}", "media_unreadable")

    def _next_rows(self) -> tuple[list[Sample], list[Media]]:
        """This process's rows of the next micro-step, with decoded media (prefetched while the last step ran).

        A prefetch of another micro-step (the state was moved) is awaited and dropped; an error raised while
        prefetching is raised here, by the step that needs the rows.
        """
        micro = self.state.micro_step
        samples, media, unreadable = self._prefetcher.take(micro, self._rows_at, micro)
        for index, derr in unreadable.items():
            if index not in self.bad_rows:
                self.bad_rows[index] = str(derr)
                self.skips.add(derr)
        self.state.micro_step += 1
        if self.cfg.dataloader_prefetch and self.state.micro_step < self.total_steps * self.cfg.gradient_accumulation_steps:
            self._prefetcher.start(self.state.micro_step, self._rows_at, self.state.micro_step)
        return samples, media

    def _rows_at(self, micro_step: int) -> tuple[list[Sample], list[Media], dict[int, DataError]]:
        """The rows of micro-step ``micro_step`` with decoded media, and the rows found unreadable on the way.

        Global position k = micro_step x rows_per_micro_step + rank x batch + j; epoch and place in the
        epoch's permutation follow from k. A row whose media cannot be read stops the run ('error') or
        is replaced by the next row of the same epoch's order and counted once ('skip', by _next_rows: this
        runs in the prefetch thread and only reads the trainer's state).
        """
        P, n = self.cfg.per_device_train_batch_size, len(self.samples)
        start = micro_step * self.rows_per_micro_step + self.acc.process_index * P
        samples, media, unreadable = [], [], {}
        for k in range(start, start + P):
            epoch, pos = divmod(k, n)
            perm = self._perm(epoch)
            for offset in range(n):
                index = int(perm[(pos + offset) % n])
                if index in self.bad_rows or index in unreadable:
                    continue
                sample = self.samples[index]
                try:
                    media.append(self._load_media(sample))
                except MediaError as err:
                    derr = self._media_error(sample, err)
                    if self.cfg.on_bad_sample == "error":
                        raise derr from err
                    unreadable[index] = derr
                    continue
                samples.append(sample)
                break
            else:
                raise RuntimeError(f"no training row has readable media ({len(self.bad_rows) + len(unreadable)} unreadable "
                                   f"rows; {self.skips.summary()}); check --media_root")
        return samples, media, unreadable

    def close(self) -> None:
        """Stop the data prefetch thread (after the rows it is decoding). train() calls it at the end."""
        self._prefetcher.close()

    def _batch(self, samples: list[Sample], media: list[Media]) -> tuple[dict[str, Tensor], Tensor]:
        inputs, labels = build_sft_batch(self.processor, samples, media, layout=self.cfg.prompt_layout,
                                         system_prompt=self.cfg.system_prompt, separator=self.cfg.target_separator,
                                         end_id=self.end_id)
        dtype = next(self.acc.unwrap_model(self.model).parameters()).dtype
        return to_device(inputs, self.acc.device, dtype=dtype), labels.to(self.acc.device)

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict[str, float]:
        """One optimiser step over gradient_accumulation_steps micro-batches (token-mean loss of the step)."""
        cfg, acc = self.cfg, self.acc
        t0 = time.perf_counter()
        micro = [self._batch(*self._next_rows()) for _ in range(cfg.gradient_accumulation_steps)]
        local_tokens = sum(int((labels != IGNORE_INDEX).sum()) for _, labels in micro)
        total_tokens = int(acc.reduce(torch.tensor(local_tokens, device=acc.device), reduction="sum"))
        # DDP averages gradients over processes: multiply by their number so the result is sum / total
        scale = acc.num_processes / max(1, total_tokens)
        ce_local, bad, routed = 0.0, False, []
        for j, (inputs, labels) in enumerate(micro):
            last = j == len(micro) - 1
            with gradients_unsynced(acc, self.model, not last):  # DDP no_sync, FSDP2 gradient sync off
                with acc.autocast(), (self.router_loss.recording() if self.router_loss is not None
                                      else contextlib.nullcontext()):
                    ce, _ = token_ce_sum(self.model, inputs, labels)
                loss = ce * scale
                aux = self.router_loss.loss() if self.router_loss is not None else None
                if aux is not None:  # as TRL: + coef x the micro-batch's load-balancing loss / accumulation steps
                    routed.append(float(aux.detach()))
                    loss = loss + self.router_loss.coef * aux.to(loss.device, loss.dtype) / len(micro)
                if not torch.isfinite(loss):
                    bad = True
                    loss = torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0)
                acc.backward(loss)
            ce_local += float(ce.detach())
        grad_norm, bad = self.update(bad)  # or skip the step on every process
        lr = self.scheduler.get_last_lr()[0]  # the rate this step used
        self.scheduler.step()
        self.state.step += 1
        ce_total = float(acc.reduce(torch.tensor(ce_local, device=acc.device, dtype=torch.float64), reduction="sum"))
        return {
            "step": self.state.step,
            "loss": ce_total / max(1, total_tokens),
            "learning_rate": lr,
            "grad_norm": grad_norm,
            "tokens": total_tokens,
            "step_seconds": time.perf_counter() - t0,
            "epoch": self.state.micro_step * self.rows_per_micro_step / len(self.samples),
            "bad_step": int(bad),
            "bad_steps_total": self.bad_steps,
            "skipped_samples": self.skips.total,
            **({"router_aux_loss": sum(routed) / len(routed)} if routed else {}),  # this process's mean
        }

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean token loss over --eval_dataset (rows split across processes, sums reduced).

        ``eval_loss`` averages over every target token; ``eval_answer_loss`` over the tokens inside
        <answer>...</answer> only (the few tokens that need the video; chance for a one-token answer
        among k options is about ln k).
        """
        if not self.eval_samples:
            return {}
        acc, cfg = self.acc, self.cfg
        mine = self.eval_samples[acc.process_index::acc.num_processes]
        was_training = self.model.training
        self.model.eval()
        ce_sum, tokens, unreadable, ans_sum, ans_tokens = 0.0, 0, 0, 0.0, 0
        try:
            # the whole weights once under ZeRO-3 / FSDP2 (training/rollout_weights.py), on the unwrapped model: no
            # forward here is a collective, so the processes' shares of the rows may take different numbers of batches
            with rollout_weights(self.model) as whole:
                model = acc.unwrap_model(whole)
                for start in range(0, len(mine), cfg.per_device_eval_batch_size):
                    samples, media = [], []
                    for s in mine[start:start + cfg.per_device_eval_batch_size]:
                        try:
                            media.append(self._load_media(s))
                            samples.append(s)
                        except MediaError as err:
                            if cfg.on_bad_sample == "error":
                                raise self._media_error(s, err) from err
                            unreadable += 1
                    if not samples:
                        continue
                    inputs, labels = self._batch(samples, media)
                    with acc.autocast():
                        ce, tail = token_ce(model, inputs, labels)
                    ce_sum += float(ce.sum())
                    tokens += int((tail != IGNORE_INDEX).sum())
                    answer = answer_token_mask(self.processor.tokenizer, samples, cfg.target_separator, tail.shape[1]).to(ce.device)
                    ans_sum += float(ce[answer].sum())
                    ans_tokens += int(answer.sum())
        finally:
            self.model.train(was_training)
        totals = acc.reduce(torch.tensor([ce_sum, float(tokens), float(unreadable), ans_sum, float(ans_tokens)],
                                         device=acc.device, dtype=torch.float64), reduction="sum").tolist()
        out = {"eval_loss": totals[0] / max(1.0, totals[1]), "eval_tokens": int(totals[1]),
               "eval_answer_loss": totals[3] / max(1.0, totals[4])}
        if totals[2]:
            out["eval_unreadable_media"] = int(totals[2])
        return out

    @torch.no_grad()
    def evaluate_accuracy(self) -> dict[str, float | int]:
        """Greedy answers to the --eval_dataset rows (``--eval_generate``): ``eval_accuracy`` and per group.

        The rows are split across processes as in :meth:`evaluate`; each process answers and scores its
        share with :func:`video_ktr.evaluation.evaluate.evaluate_rows` (the training prompt layout, system prompt and
        frame settings; greedy), and the score sums and counts are added over processes
        (:func:`accuracy_sums`, :func:`accuracies`), so every process returns the same numbers.
        """
        if not self.generation_rows:
            return {}
        acc, cfg = self.acc, self.cfg
        mine = self.generation_rows[acc.process_index::acc.num_processes]
        results: list[dict[str, Any]] = []
        was_training = self.model.training
        self.model.eval()
        try:
            if mine:
                with acc.autocast():
                    results, _ = evaluate_rows(
                        acc.unwrap_model(self.model), self.processor, mine, cfg.media_root or Path(cfg.eval_dataset).parent,
                        self.frames, greedy=True, max_new_tokens=cfg.eval_max_new_tokens,
                        batch_size=cfg.per_device_eval_batch_size, seed=cfg.seed, prompt_layout=cfg.prompt_layout,
                        system_prompt=cfg.system_prompt, on_bad_sample=cfg.on_bad_sample)
        finally:
            self.model.train(was_training)
        local = torch.tensor(accuracy_sums(results, self.generation_groups), device=acc.device, dtype=torch.float64)
        return accuracies(acc.reduce(local, reduction="sum").tolist(), self.generation_groups)

    def _evaluate_all(self) -> dict[str, float | int]:
        """One eval point: :meth:`evaluate` (eval_loss) and, with --eval_generate, :meth:`evaluate_accuracy`."""
        out = self.evaluate()
        if self.cfg.eval_generate:
            out.update(self.evaluate_accuracy())
        return out

    # ------------------------------------------------------------------ what the run scaffold asks of the recipe
    def on_start(self) -> None:
        if self.skips.total:
            logger.warning(f"training data: {self.skips.summary()}")
        if self.eval_skips.total:
            logger.warning(f"eval data: {self.eval_skips.summary()}")

    def after_step(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """An eval point every --eval_steps (the last step's is in finish)."""
        step, every = self.state.step, self.cfg.eval_steps
        self._eval_point = bool(every and step % every == 0 and step < self.total_steps)
        if self._eval_point:
            metrics.update(self._evaluate_all())
        return metrics

    def postfix(self, m: dict[str, Any]) -> dict[str, str]:
        return {"loss": f"{m['loss']:.4f}", "lr": f"{m['learning_rate']:.2e}"}

    def console_lines(self, m: dict[str, Any]) -> list[str]:
        every = self.cfg.logging_steps
        lines = [progress_line(m)] if every and self.state.step % every == 0 else []
        return lines + ([accuracy_line(m)] if self._eval_point and "eval_scored_rows" in m else [])

    def finish(self, last: dict[str, Any], bar: Any) -> dict[str, Any]:
        """The final evaluation, written onto the last step's line of metrics.jsonl."""
        if not self.eval_samples:
            return last
        final_eval = self._evaluate_all()
        last.update(final_eval)
        if self.acc.is_main_process and last:
            self._rewrite_last(last)
            bar.write(f"eval_loss={final_eval['eval_loss']:.4f} ({final_eval['eval_tokens']} tokens)")
            if "eval_scored_rows" in final_eval:
                bar.write(accuracy_line(last))
        if self.cfg.trackers:
            self.acc.log(final_eval, step=self.state.step)
        return last

    def summary(self, last: dict[str, Any]) -> dict[str, Any]:
        counts = self._skip_counts()
        if sum(counts.values()) or self.eval_skips.total:
            logger.warning("skipped rows: " + (", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "none")
                  + (f"; eval data: {self.eval_skips.summary()}" if self.eval_skips.total else ""))
        result = dict(last)
        result["skipped_samples"] = sum(counts.values())
        result.update({f"skipped/{k}": v for k, v in counts.items()})
        result["steps"] = self.state.step
        return result

    def _rewrite_last(self, metrics: dict[str, Any]) -> None:
        """Put the final eval_loss (and eval_accuracy) on the last step's line of metrics.jsonl."""
        path = self.out / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.is_file() else []
        if lines and json.loads(lines[-1]).get("step") == metrics.get("step"):
            lines[-1] = json.dumps(finite_or_null(metrics))
        else:
            lines.append(json.dumps(finite_or_null(metrics)))
        path.write_text("\n".join(lines) + "\n")

    def _skip_counts(self) -> dict[str, int]:
        """Skipped training rows by reason, summed over processes."""
        local = dict(self.skips.counts)
        if self.acc.num_processes == 1:
            return local
        from accelerate.utils import gather_object

        merged: dict[str, int] = {}
        for part in gather_object([local]):
            for k, v in part.items():
                merged[k] = merged.get(k, 0) + v
        return merged

    def checkpoint_extra(self) -> dict[str, Any]:
        return {"bad_rows": self.bad_rows, "total_steps": self.total_steps, "rows_per_micro_step": self.rows_per_micro_step}

    def restore_extra(self, extra: dict[str, Any], path: Path) -> None:
        for index, message in extra.get("bad_rows", {}).items():
            self.bad_rows[int(index)] = message
            self.skips.counts["media_unreadable"] += 1
        if extra.get("rows_per_micro_step") not in (None, self.rows_per_micro_step):
            raise ValueError(
                f"{path} was written with {extra['rows_per_micro_step']} rows per micro-step (batch x processes); this "
                f"run has {self.rows_per_micro_step}: the data position would not carry over. Resume with the same "
                "--per_device_train_batch_size and number of processes.")
        if extra.get("total_steps") not in (None, self.total_steps):
            logger.warning(f"note: the checkpoint was written by a run of {extra['total_steps']} steps; this run has "
                  f"{self.total_steps}, so the learning-rate schedule differs from the original run")

    def before_final_save(self) -> None:
        if self.cfg.gradient_checkpointing:
            self.acc.unwrap_model(self.model).config.use_cache = True  # generation after SFT wants the cache back


def progress_line(m: dict[str, Any]) -> str:
    keys = ("loss", "eval_loss", "eval_answer_loss", "eval_accuracy", "learning_rate", "grad_norm", "tokens", "epoch",
            "step_seconds")
    return f"step {int(m['step'])}: " + " ".join(f"{k}={m[k]:.4g}" for k in keys if k in m)


def run_sft(cfg: SFTConfig) -> dict[str, Any]:
    """Run SFT with ``cfg``; returns the last step's metrics (with eval_loss, eval_accuracy and skip counts)."""
    return SFTTrainer(cfg).train()
