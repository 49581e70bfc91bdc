"""Learning-rate schedules shared by `train` and `sft`: linear warm-up, then cosine, linear or constant."""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, *, kind: str, total: int, warmup: int) -> float:
    """Multiplier of the peak learning rate at optimiser step ``step`` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "constant":
        return 1.0
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    raise ValueError(f"unknown lr_scheduler_type {kind!r}; choose cosine, linear or constant")


def build_scheduler(optimizer: torch.optim.Optimizer, *, kind: str, total_steps: int, warmup_ratio: float):
    total = max(1, total_steps)
    warmup = int(round(warmup_ratio * total))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, kind=kind, total=total, warmup=warmup))
