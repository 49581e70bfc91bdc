"""The GRPO step's metrics: local token counts per micro-batch, reduced over the processes once per step.

Every number is the same with 1 or N processes: per-completion values are gathered; token fractions
and means are sums of counts reduced across processes (a process with more tokens weighs more, as in
a single process). The names a step reports depend on the settings only, so every line of
metrics.jsonl has the same keys.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from video_ktr.core.diagnostics import TokenRecord, overlap_counts, position_sums, token_records
from video_ktr.training.grpo_stages import ProbeScores, Rollout, probe_score


class Timer:
    """Seconds spent per phase of a step (for metrics and the step-breakdown benchmark)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - t0


@dataclass
class MetricSums:
    """name -> [numerator, denominator] of one micro-batch; a metric is the ratio of the reduced sums."""

    sums: dict[str, list[float]] = field(default_factory=dict)

    def add(self, name: str, numerator: float, denominator: float) -> None:
        acc = self.sums.setdefault(name, [0.0, 0.0])
        acc[0] += float(numerator)
        acc[1] += float(denominator)


@dataclass
class MicroRecord:
    """What a step's metrics need from one micro-batch besides its rollout (filled by the first pass)."""

    sums: MetricSums = field(default_factory=MetricSums)  # fractions of tokens, token means
    diag: MetricSums = field(default_factory=MetricSums)  # --diagnostics_steps; a zero denominator is left out
    seq_losses: Tensor | None = None  # (N,) per-sequence losses (loss variance)
    tokens: list[TokenRecord] | None = None  # --log_tokens_every (the first micro-batch, main process)


@dataclass(frozen=True)
class Collectives:
    """The cross-process reductions the metrics use (identity functions with one process)."""

    gather_rows: Callable[[Tensor], Tensor]  # per-row values of every process, concatenated
    reduce_sum: Callable[[Tensor], Tensor]  # element-wise sum over the processes


def record_selection(sums: MetricSums, masks: dict[str, Tensor], valid: Tensor, probes: ProbeScores,
                     entropy: Tensor | None, probing: bool, group_size: int) -> None:
    """Local token counts of each mask (fractions of the valid tokens; temporal: of the video rows').

    The fractions count the rows of probed groups only (all rows unless groups with advantage 0 were
    skipped, see grpo_stages.groups_to_probe): a skipped group has no visual or temporal picks to count.
    """
    probed = probes.probed_rows
    scored = valid & probed[:, None]
    for name, mask in masks.items():
        metric = "key_token_fraction" if name == "key" else f"{name}_fraction"
        pool = scored & probes.temporal_rows[:, None] if name == "temporal" else scored
        sums.add(metric, float((mask & pool).sum()), float(pool.sum()))
    if entropy is not None:
        sums.add("entropy", float(entropy.detach()[valid].float().sum()), float(valid.sum()))
    # rows that get no gradient at all because no token was selected (counted, never an error)
    sums.add("no_key_token_rows", float(((masks["key"] & valid).sum(1) == 0)[probed].sum()), float(probed.sum()))
    if probing:
        sums.add("probed_groups", float(probed.sum()) / group_size, valid.shape[0] / group_size)


def record_selection_diagnostics(diag: MetricSums, masks: dict[str, Tensor], valid: Tensor, probes: ProbeScores) -> None:
    """Jaccard overlaps of the signals' sets and mean relative positions (token counts, reduced later)."""
    for name, (inter, union) in overlap_counts(masks, valid, probes.temporal_rows).items():
        diag.add(name, inter, union)
    for name, (total, count) in position_sums(masks, valid).items():
        diag.add(name, total, count)


def record_loss_stats(sums: MetricSums, stats: dict[str, float], key: Tensor, valid: Tensor, *, kl_on_keys: bool,
                      has_reference: bool) -> None:
    """The pass's mean KL (over the KL tokens) and clip ratio (over the key tokens), as token sums."""
    key = key & valid
    n_kl = float((key if kl_on_keys else valid).sum()) if has_reference else 0.0
    sums.add("kl", float(stats.get("kl", 0.0)) * n_kl, n_kl)
    n_key = float(key.sum())
    sums.add("clip_ratio", float(stats.get("clip_ratio", 0.0)) * n_key, n_key)


def rollout_token_records(ro: Rollout, *, step: int, tokenizer: Any, logp: Tensor, entropy: Tensor | None,
                          masks: dict[str, Tensor], tolerance: float, group_size: int) -> list[TokenRecord]:
    """The micro-batch's completions token by token (--log_tokens_every): scores and the sets that chose each."""
    rows = [ro.samples[i // group_size] for i in range(len(ro.completions.texts))]
    probes = ro.probes
    visual = probe_score(logp, probes.visual, tolerance) if probes.visual is not None else None
    temporal = probe_score(logp, probes.temporal, tolerance) if probes.temporal is not None else None
    return token_records(
        step=step, problem_ids=[s.problem_id for s in rows], kinds=[s.kind for s in rows],
        data_types=[s.data_type for s in rows], tokenizer=tokenizer, completion_ids=ro.completions.ids,
        valid=ro.completions.valid, rewards=ro.rewards, advantages=ro.advantages, masks=masks, entropy=entropy,
        visual=visual, temporal=temporal, temporal_rows=probes.temporal_rows,
    )


def _reduced_ratios(parts: Sequence[MetricSums], reduce_sum: Callable[[Tensor], Tensor], device: Any,
                    extra: list[list[float]] | None = None) -> tuple[dict[str, tuple[float, float]], list[list[float]]]:
    names = sorted({n for p in parts for n in p.sums})
    rows = [[sum(p.sums.get(n, [0.0, 0.0])[k] for p in parts) for k in (0, 1)] for n in names] + (extra or [])
    if not rows:
        return {}, []
    total = reduce_sum(torch.tensor(rows, dtype=torch.float64, device=device)).tolist()
    return dict(zip(names, total[:len(names)])), total[len(names):]


def step_metrics(rollouts: Sequence[Rollout], records: Sequence[MicroRecord], losses: Sequence[float], *,
                 group_size: int, comm: Collectives, device: Any) -> dict[str, float]:
    """The step's values over the whole global batch (rewards, lengths, token fractions, loss, diagnostics)."""
    def gathered(values: list[Tensor]) -> Tensor:
        return comm.gather_rows(torch.cat(values).detach().float().to(device).contiguous())

    rewards = gathered([r.rewards for r in rollouts])
    lengths = gathered([r.completions.lengths for r in rollouts])
    seq_losses = gathered([m.seq_losses for m in records])
    values: dict[str, float] = {
        "reward": float(rewards.mean()),
        "reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
        "completion_length": float(lengths.mean()),
        "num_completions": float(lengths.numel()),
        # completions with no text (the model ended the turn at once) and prompt groups whose rewards are
        # all equal (advantage 0: no policy gradient), as fractions
        "empty_completions": float(gathered([torch.tensor([float(not t.strip()) for r in rollouts
                                                           for t in r.completions.texts])]).mean()),
        "zero_advantage_groups": float(gathered([(r.rewards.view(-1, group_size).std(1) == 0).float()
                                                 for r in rollouts]).mean()),
        "loss_variance": float(seq_losses.var()) if seq_losses.numel() > 1 else 0.0,
    }
    for name in rollouts[0].components:
        key = f"{name}_reward" if not name.endswith("bonus") else name
        values[key] = float(gathered([r.components[name] for r in rollouts]).mean())
    sums, (loss_sum,) = _reduced_ratios([m.sums for m in records], comm.reduce_sum, device,
                                        extra=[[sum(losses), float(len(losses))]])
    for name, (num, den) in sums.items():
        # an empty pool (no video row in the step: temporal_fraction; no reference: kl) reports 0
        values[name] = num / den if den > 0 else 0.0
    values["loss"] = loss_sum[0] / max(1.0, loss_sum[1])
    diag, _ = _reduced_ratios([m.diag for m in records], comm.reduce_sum, device)
    values.update({name: num / den for name, (num, den) in diag.items() if den > 0})
    return values


def log_completions(path: Path, ro: Rollout, step: int, group_size: int) -> None:
    """Append the micro-batch's completions with rewards and advantages to ``path`` (completions.jsonl)."""
    with path.open("a") as fh:
        for i, text in enumerate(ro.completions.texts):
            s = ro.samples[i // group_size]
            fh.write(json.dumps({"step": step, "problem_id": s.problem_id, "completion": text, "solution": s.solution,
                                 "reward": float(ro.rewards[i]), "advantage": float(ro.advantages[i])}) + "\n")


def progress_line(m: dict[str, float]) -> str:
    keys = ("reward", "accuracy_reward", "format_reward", "loss", "kl", "key_token_fraction", "completion_length",
            "step_seconds")
    return f"step {int(m['step'])}: " + " ".join(f"{k}={m[k]:.4g}" for k in keys if k in m)
