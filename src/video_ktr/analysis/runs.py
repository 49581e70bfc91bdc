"""A training run as the report reads it: its logged metrics and token records (:class:`Run`), the
metrics and token sets the report shows, and short names for several runs.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from video_ktr.core.diagnostics import SIGNAL_NAMES, TokenRecord, read_token_records

CURVES = (  # metric, axis label, title
    ("reward", "mean reward of the step's completions", "Reward"),
    ("accuracy_reward", "mean accuracy reward", "Accuracy reward"),
    ("loss", "loss", "Training loss"),
    ("key_token_fraction", "fraction of completion tokens", "Key-token fraction"),
    ("loss_variance", "variance of the per-sequence losses", "Loss variance"),
)
SETS = ("key", "masked", *SIGNAL_NAMES)  # token sets of the word statistics ("masked": valid, not key)
SET_COLOURS = {"entropy": "#f5a623", "visual": "#1f77b4", "temporal": "#2ca02c", "key": "#111111", "masked": "#7f7f7f"}
PAIRS = ("jaccard_entropy_visual", "jaccard_entropy_temporal", "jaccard_visual_temporal")
POSITIONS = ("position_key", "position_nonkey", "position_entropy", "position_visual", "position_temporal", "position_valid")


@dataclass
class Run:
    name: str
    path: Path
    metrics: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)
    tokens: list[TokenRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        steps, values = [], []
        for m in self.metrics:
            v = m.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                steps.append(int(m.get("step", len(steps) + 1)))
                values.append(float(v))
        return steps, values

    def has(self, key: str) -> bool:
        return any(key in m for m in self.metrics)

    @property
    def selection(self) -> str:
        sel = self.config.get("token_selection")
        return ",".join(sel) if isinstance(sel, list) else str(sel or "?")


def _read_jsonl(path: Path, notes: list[str]) -> list[dict[str, Any]]:
    rows = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError as exc:
            if n == len(lines):  # a run still writing, or killed mid-line
                notes.append(f"{path.name}: the last line ({n}) is incomplete and was skipped")
                continue
            raise ValueError(f"{path}:{n}: not a JSON line ({exc})") from exc
    return rows


def load_run(path: str | Path, name: str | None = None) -> Run:
    path = Path(path)
    metrics_path = path / "metrics.jsonl"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{path} has no metrics.jsonl: is it the --output_dir of a `video-ktr train` run?")
    notes: list[str] = []
    run = Run(name=name or path.resolve().name, path=path, metrics=_read_jsonl(metrics_path, notes), notes=notes)
    if (path / "train_config.json").is_file():
        run.config = json.loads((path / "train_config.json").read_text())
    if (path / "tokens.jsonl").is_file():
        run.tokens = read_token_records(path / "tokens.jsonl")
    return run


def run_names(paths: Sequence[str | Path]) -> list[str]:
    """A distinct label per run: the folder name, with its parent when names repeat, then #n."""
    resolved = [Path(p).resolve() for p in paths]
    names = [p.name for p in resolved]
    counts = Counter(names)
    names = [f"{p.parent.name}/{p.name}" if counts[n] > 1 else n for p, n in zip(resolved, names)]
    seen: Counter[str] = Counter()
    out = []
    for n in names:
        seen[n] += 1
        out.append(n if seen[n] == 1 else f"{n} #{seen[n]}")
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "run"


def _mean(values: Sequence[float]) -> float | None:
    vals = [v for v in values if math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None
