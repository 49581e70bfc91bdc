"""`video-ktr score --table DIR ...`: the paper's main-table layout across benchmarks and models.

Each DIR is an `eval --output_dir` (its ``<benchmark>.json`` files). A row per model (the protocol's
``model``, shortened to its last two path parts), a column per benchmark in the paper's order (Video-Holmes,
VideoMMMU, MMVU, Video-MME, then the others), and the mean over the columns a model has. The cell is the
headline accuracy in percent: ``overall`` (mean score of the scored rows), and for VSI-Bench
``(accuracy + MRA) / 2`` as Video-R1 reports it (its rows that are regression). Rendered as Markdown or CSV.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from video_ktr.evaluation.eval_config import EvalError
from video_ktr.evaluation.tasks.registry import BENCHMARKS

__all__ = ["PAPER_ORDER", "collect", "headline", "render"]

PAPER_ORDER = ("videoholmes", "videommmu", "mmvu", "videomme", "videomme_sub", "mvbench", "tempcompass", "vsibench", "video_r1")


def headline(metrics: dict[str, Any]) -> float | None:
    """The benchmark's reported number in percent (None when nothing was scored)."""
    acc, mra = metrics.get("overall"), metrics.get("mean_mra")
    if metrics.get("benchmark") == "vsibench" and acc is not None and mra is not None:
        return 100.0 * (acc + mra) / 2
    if acc is None:
        return None if mra is None else 100.0 * mra
    return 100.0 * acc


def _model_label(model: str) -> str:
    parts = Path(model).parts
    return "/".join(parts[-2:]) if len(parts) > 1 else model


def collect(dirs: list[str | Path]) -> dict[str, dict[str, float | None]]:
    """{model: {benchmark: headline}} from every ``<benchmark>.json`` in ``dirs``; EvalError names a bad file."""
    table: dict[str, dict[str, float | None]] = {}
    for d in dirs:
        folder = Path(d)
        if not folder.is_dir():
            raise EvalError(f"{folder} is not a folder (pass eval output folders)")
        files = [f for f in sorted(folder.glob("*.json")) if f.stem in BENCHMARKS]
        if not files:
            raise EvalError(f"{folder} holds no <benchmark>.json evaluation file ({', '.join(BENCHMARKS)})")
        for f in files:
            try:
                payload = json.loads(f.read_text(encoding="utf-8"))
                metrics, protocol = payload["metrics"], payload.get("protocol") or {}
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise EvalError(f"{f}: not an evaluation file ({type(exc).__name__}: {exc})") from None
            model = _model_label(str(protocol.get("model") or folder.name))
            bench = metrics.get("benchmark") or f.stem
            if bench in table.get(model, {}):
                raise EvalError(f"{f}: a second {bench} result for model {model}; pass one folder per model")
            table.setdefault(model, {})[bench] = headline(metrics)
    return table


def render(table: dict[str, dict[str, float | None]], fmt: str = "markdown") -> str:
    benches = [b for b in PAPER_ORDER if any(b in row for row in table.values())]
    header = ["model", *(BENCHMARKS[b].display_name for b in benches), "mean"]
    rows = []
    for model, cells in table.items():
        values = [cells.get(b) for b in benches]
        present = [v for v in values if v is not None]
        mean = sum(present) / len(present) if present else None
        rows.append([model, *("" if v is None else f"{v:.1f}" for v in values), "" if mean is None else f"{mean:.1f}"])
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
        return buf.getvalue()
    if fmt != "markdown":
        raise ValueError(f"table format must be markdown or csv, got {fmt!r}")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"
