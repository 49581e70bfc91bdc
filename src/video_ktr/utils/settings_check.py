"""Settings checked before anything loads: every number finite, and the known options in their ranges.

:func:`check_settings` runs on every options dataclass that :func:`video_ktr.utils.config.from_dict` builds
(``train``, ``sft``, ``eval``, ``infer``, ``data check``, ...), before the class's own ``validate()``. It
refuses a non-finite float anywhere (``--learning_rate inf`` made every weight NaN after one step,
``--max_grad_norm nan`` switched clipping off, ``--temperature nan`` gave identical rollouts), and checks the
options of :data:`RANGES` by name wherever a class has them. Each error names the flag, the accepted
range and the value given.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple


class Range(NamedTuple):
    low: float | None = None
    low_open: bool = False  # low itself refused
    high: float | None = None
    high_open: bool = False
    note: str = ""

    def holds(self, v: float) -> bool:
        if self.low is not None and (v < self.low or (self.low_open and v == self.low)):
            return False
        return not (self.high is not None and (v > self.high or (self.high_open and v == self.high)))

    def text(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        return " and ".join(parts)


_POSITIVE = Range(0, True)
_NON_NEGATIVE = Range(0)
_AT_LEAST_ONE = Range(1)
_PROBABILITY_OPEN_HIGH = Range(0, False, 1, True)

RANGES: dict[str, Range] = {
    "learning_rate": Range(0, note="0 measures without learning"), "vision_learning_rate": _NON_NEGATIVE,
    "sft_learning_rate": _NON_NEGATIVE, "rl_learning_rate": _NON_NEGATIVE, "adam_epsilon": _POSITIVE, "video_fps": _POSITIVE,
    "max_grad_norm": Range(0, note="0 turns clipping off"), "weight_decay": _NON_NEGATIVE,
    "adam_beta1": _PROBABILITY_OPEN_HIGH, "adam_beta2": _PROBABILITY_OPEN_HIGH, "lora_dropout": _PROBABILITY_OPEN_HIGH,
    "temperature": Range(0, note="0 is greedy"), "top_p": Range(0, True, 1), "gpu_memory_utilization": Range(0, True, 1),
    "beta": _NON_NEGATIVE, "epsilon": _NON_NEGATIVE, "epsilon_high": _NON_NEGATIVE,
    "max_steps": _AT_LEAST_ONE, "max_completion_length": _AT_LEAST_ONE, "max_prompt_length": _AT_LEAST_ONE,
    "max_new_tokens": _AT_LEAST_ONE, "eval_max_new_tokens": _AT_LEAST_ONE, "batch_size": _AT_LEAST_ONE,
    "per_device_eval_batch_size": _AT_LEAST_ONE, "save_total_limit": _AT_LEAST_ONE, "num_iterations": _AT_LEAST_ONE,
    "save_steps": Range(0, note="0: only the final model"), "logging_steps": _NON_NEGATIVE, "eval_steps": _NON_NEGATIVE,
    "max_bad_steps": _NON_NEGATIVE, "log_completions_every": _NON_NEGATIVE, "num_train_epochs": _NON_NEGATIVE,
}
# A sampled GRPO group needs randomness: temperature 0 makes every completion of a prompt the same.
_GRPO_TEMPERATURE = Range(0, True, note="GRPO compares several sampled completions; 0 would make them identical")


class SettingsError(ValueError):
    """A setting that cannot work; the message names the flag, the accepted range and the value."""


def check_settings(obj: Any) -> None:
    """Raise SettingsError for the first non-finite number or out-of-range option of the dataclass ``obj``."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                raise SettingsError(f"--{f.name} must be a finite number, got {v}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        rng = RANGES.get(f.name)
        if f.name == "temperature" and hasattr(obj, "num_generations"):
            rng = _GRPO_TEMPERATURE
        if f.name == "max_steps" and f.default in (-1, None) and value == -1:
            continue  # sft, train: -1 means "run --num_train_epochs"
        if rng is not None and not rng.holds(value):
            note = f" ({rng.note})" if rng.note else ""
            extra = " (or -1: run --num_train_epochs)" if f.name == "max_steps" and f.default in (-1, None) else ""
            raise SettingsError(f"--{f.name} must be {rng.text()}{extra}{note}, got {value}")
