"""Scores -> the metrics and breakdowns each leaderboard reports, and the table printed after a run."""

from __future__ import annotations

import math
from typing import Any

from video_ktr.evaluation.tasks.base import (
    HOLMES_TYPES,
    MISSING,
    TEMPCOMPASS_DIMS,
    VIDEOMME_DURATIONS,
    VIDEOMMMU_TRACKS,
    VSI_MC_TYPES,
    VSI_NA_TYPES,
    VSI_OFFICIAL_TASKS,
    VSI_REL_DIRECTION,
)
from video_ktr.evaluation.tasks.registry import get_benchmark

__all__ = ["compute_metrics", "format_table"]


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


_KNOWN_ORDER = {
    "question_type": HOLMES_TYPES + VSI_MC_TYPES + VSI_NA_TYPES,
    "duration": VIDEOMME_DURATIONS,
    "track": VIDEOMMMU_TRACKS,
    "dim": TEMPCOMPASS_DIMS,
}


def _group(results: list[tuple[dict, float | None]], field: str) -> dict[str, dict]:
    buckets: dict[str, tuple[list[float], list[int]]] = {}
    for res, score in results:
        meta = res.get("meta") or {}
        value = meta.get(field, res.get(field))
        key = MISSING if value is None or value == "" else str(value)
        scores, failed = buckets.setdefault(key, ([], [0]))
        if score is None:
            failed[0] += 1
        else:
            scores.append(score)
    order = _KNOWN_ORDER.get(field, ())

    def sort_key(k: str) -> tuple:
        return (k == MISSING, order.index(k) if k in order else len(order), k)

    return {
        k: {"accuracy": _mean(buckets[k][0]), "n": len(buckets[k][0]), "n_failed": buckets[k][1][0]}
        for k in sorted(buckets, key=sort_key)
    }


def _check_score(i: int, res: Any) -> float | None:
    if not isinstance(res, dict):
        raise ValueError(f"results[{i}]: expected a dict, got {type(res).__name__}")
    if "score" not in res:
        raise ValueError(
            f"results[{i}] ({res.get('uid')}): field 'score' missing (use None for a failed sample)"
        )
    if "problem_type" not in res:
        raise ValueError(f"results[{i}] ({res.get('uid')}): field 'problem_type' missing")
    s = res["score"]
    if s is None:
        return None
    if not isinstance(s, (int, float)) or not math.isfinite(s) or not 0.0 <= s <= 1.0:
        raise ValueError(
            f"results[{i}] ({res.get('uid')}): field 'score' = {s!r} should be a number in [0, 1] or None"
        )
    return float(s)


def _vsi_official(by_qtype: dict[str, dict]) -> tuple[dict[str, dict], float | None, list[str]]:
    tasks: dict[str, dict] = {}
    for t in VSI_OFFICIAL_TASKS:
        if t == "object_rel_direction":
            levels = [
                by_qtype[q]
                for q in VSI_REL_DIRECTION
                if q in by_qtype and by_qtype[q]["accuracy"] is not None
            ]
            if levels:
                tasks[t] = {
                    "accuracy": sum(e["accuracy"] for e in levels) / len(levels),
                    "n": sum(e["n"] for e in levels),
                    "n_failed": sum(by_qtype[q]["n_failed"] for q in VSI_REL_DIRECTION if q in by_qtype),
                }
        elif t in by_qtype and by_qtype[t]["accuracy"] is not None:
            tasks[t] = dict(by_qtype[t])
    missing = [t for t in VSI_OFFICIAL_TASKS if t not in tasks]
    overall = _mean([e["accuracy"] for e in tasks.values()])
    return tasks, overall, missing


def compute_metrics(benchmark: str, results: list[dict]) -> dict:
    """Headline numbers and breakdowns from scored rows.

    ``results``: rows of :func:`load_benchmark` plus ``score`` (float in [0, 1]; the MRA for regression
    rows) or ``None`` for a sample that failed (its reason in ``error``). All values are fractions.

    * ``overall`` = mean score over *scored* non-regression rows (Video-R1's ``mean_acc``);
      ``overall_all_rows`` counts failed non-regression rows as 0; ``overall_pct`` = 100 x overall.
    * ``mean_mra`` = mean score over scored regression rows (None without any); ``mean_mra_all_rows``.
    * ``by_*`` breakdowns: ``{value: {"accuracy": mean score of scored rows, "n": scored rows,
      "n_failed": failed rows}}``; rows without the field are counted under ``"(missing)"``.
    * VSI-Bench: ``by_official_task`` (the 8 tasks, rel_direction = mean of its 3 levels),
      ``overall_official`` = unweighted mean over those tasks (``official_tasks_missing`` lists absent ones),
      and ``video_r1_headline`` = (overall + mean_mra) / 2 (Video-R1 issue #121).
    * MVBench: ``task_mean`` = unweighted mean over tasks (the official headline).
    """
    spec = get_benchmark(benchmark)
    checked = [(res, _check_score(i, res)) for i, res in enumerate(results)]
    cls = [(res, s) for res, s in checked if res["problem_type"] != "regression"]
    reg = [(res, s) for res, s in checked if res["problem_type"] == "regression"]
    cls_scored = [s for _, s in cls if s is not None]
    reg_scored = [s for _, s in reg if s is not None]
    failures = [
        {
            "uid": res.get("uid", res.get("problem_id", i)),
            "reason": str(res.get("error") or "no reason given"),
        }
        for i, (res, s) in enumerate(checked)
        if s is None
    ]
    overall = _mean(cls_scored)
    m: dict[str, Any] = {
        "benchmark": spec.name,
        "overall": overall,
        "overall_pct": None if overall is None else 100.0 * overall,
        "overall_all_rows": _mean([0.0 if s is None else s for _, s in cls]),
        "mean_mra": _mean(reg_scored),
        "mean_mra_all_rows": _mean([0.0 if s is None else s for _, s in reg]),
        "num_samples": len(checked),
        "num_scored": len(cls_scored) + len(reg_scored),
        "num_failed": len(failures),
        "failures": failures,
        "denominator": "all scored rows (failed samples excluded; *_all_rows count them as 0)",
        "by_problem_type": _group(checked, "problem_type"),
    }
    for key, field in spec.breakdowns:
        m[key] = _group(checked, field)
    if spec.name == "vsibench":
        tasks, official, missing = _vsi_official(m["by_question_type"])
        m["by_official_task"] = tasks
        m["overall_official"] = official
        m["official_tasks_missing"] = missing
        m["video_r1_headline"] = (
            None if overall is None or m["mean_mra"] is None else (overall + m["mean_mra"]) / 2
        )
    if spec.name == "mvbench":
        m["task_mean"] = _mean(
            [e["accuracy"] for k, e in m["by_task"].items() if k != MISSING and e["accuracy"] is not None]
        )
    return m


def _pct(x: float | None) -> str:
    return "     -" if x is None else f"{100.0 * x:6.2f}"


def format_table(metrics: dict) -> str:
    """A plain-text table of the headline numbers and every breakdown (percent of scored rows)."""
    lines = [
        f"{metrics.get('benchmark', '?')}: {metrics['num_samples']} samples, {metrics['num_scored']} scored, "
        f"{metrics['num_failed']} failed   (% of scored rows; n = scored rows)"
    ]
    rows: list[tuple[str, float | None, str]] = [("overall (accuracy)", metrics["overall"], "")]
    if metrics["num_failed"]:
        rows.append(("overall, failures as 0", metrics["overall_all_rows"], ""))
    if metrics.get("mean_mra") is not None:
        rows.append(("mean MRA (regression)", metrics["mean_mra"], ""))
        if metrics["mean_mra_all_rows"] != metrics["mean_mra"]:
            rows.append(("mean MRA, failures as 0", metrics["mean_mra_all_rows"], ""))
    n_official = len(VSI_OFFICIAL_TASKS) - len(metrics.get("official_tasks_missing", []))
    for key, label in (
        ("overall_official", f"official overall ({n_official} of {len(VSI_OFFICIAL_TASKS)} tasks)"),
        ("video_r1_headline", "Video-R1 headline (acc+MRA)/2"),
        ("task_mean", "mean over tasks"),
    ):
        if key in metrics:
            rows.append((label, metrics[key], ""))
    width = max(
        [len(r[0]) for r in rows]
        + [
            len(k) + 2
            for key, b in metrics.items()
            if key.startswith("by_") and isinstance(b, dict)
            for k in b
        ]
    )
    for label, value, _ in rows:
        lines.append(f"{label.ljust(width)}  {_pct(value)}")
    for key, breakdown in metrics.items():
        if not key.startswith("by_") or not isinstance(breakdown, dict):
            continue
        lines.append("")
        lines.append(key)
        for k, e in breakdown.items():
            extra = f"  ({e['n_failed']} failed)" if e.get("n_failed") else ""
            lines.append(f"  {k.ljust(width - 2)}  {_pct(e['accuracy'])}  n={e['n']}{extra}")
    if metrics.get("official_tasks_missing"):
        lines.append("")
        lines.append("official tasks missing: " + ", ".join(metrics["official_tasks_missing"]))
    if metrics["failures"]:
        lines.append("")
        lines.append("failed samples:")
        for f in metrics["failures"][:20]:
            lines.append(f"  {f['uid']}: {f['reason']}")
        if len(metrics["failures"]) > 20:
            lines.append(f"  ... {len(metrics['failures']) - 20} more")
    return "\n".join(lines)
