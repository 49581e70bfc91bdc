"""SFT evaluation's bookkeeping: the rows answered with --eval_generate and their accuracies, summed over processes."""

from __future__ import annotations

from typing import Any

from video_ktr.data.rows import Sample


def generation_rows(samples: list[Sample]) -> list[dict[str, Any]]:
    """Rows for :func:`video_ktr.evaluation.evaluate.evaluate_rows` from loaded samples.

    ``path`` is the resolved media file; ``meta["kind"]`` is :attr:`Sample.kind` (the row's kind, else
    its data source, else its problem type), so the ``by_kind`` breakdown groups by it; ``uid`` is the
    position in ``samples`` (unique even when problem ids repeat).
    """
    return [
        {"problem_id": s.problem_id, "problem": s.problem, "data_type": s.data_type, "problem_type": s.problem_type,
         "options": s.options, "solution": s.solution, "path": str(s.media_path), "data_source": s.data_source,
         "meta": {"kind": s.kind}, "uid": f"sft-eval:{i}"}
        for i, s in enumerate(samples)
    ]


def accuracy_sums(results: list[dict[str, Any]], groups: list[str]) -> list[float]:
    """Flat sums of scored results, to be added over processes and turned into accuracies by :func:`accuracies`.

    ``[sum, n]`` of the scored non-regression rows (``evaluate``'s ``overall``), the number of failed
    rows, then ``[sum, n]`` of the scored rows of each group (``meta["kind"]``, as ``by_kind``; every
    problem type, the MRA for regression rows). The scores are those :func:`evaluate_rows` gave.
    """
    overall: list[float] = []
    by_group: dict[str, list[float]] = {g: [] for g in groups}
    failed = 0
    for r in results:
        if r.get("score") is None:
            failed += 1
            continue
        score = float(r["score"])
        by_group[str(r["meta"]["kind"])].append(score)
        if r["problem_type"] != "regression":
            overall.append(score)
    sums = [sum(overall), float(len(overall)), float(failed)]
    for g in groups:
        sums += [sum(by_group[g]), float(len(by_group[g]))]
    return sums


def accuracies(sums: list[float], groups: list[str]) -> dict[str, float | int]:
    """``eval_accuracy`` and ``eval_accuracy/<group>`` from (reduced) :func:`accuracy_sums`.

    A mean with no scored row is left out. ``eval_scored_rows`` counts the scored rows; rows whose media
    could not be read (``--on_bad_sample skip``) are not scored and are counted in ``eval_generate_failed``.
    """
    out: dict[str, float | int] = {}
    if sums[1]:
        out["eval_accuracy"] = sums[0] / sums[1]
    for j, g in enumerate(groups):
        total, n = sums[3 + 2 * j], sums[4 + 2 * j]
        if n:
            out[f"eval_accuracy/{g}"] = total / n
    out["eval_scored_rows"] = int(sum(sums[4::2]))  # every scored row is in exactly one group
    if sums[2]:
        out["eval_generate_failed"] = int(sums[2])
    return out


def accuracy_line(m: dict[str, Any]) -> str:
    """``step N: eval_accuracy=0.625 (kind_a=0.5 kind_b=0.75; 16 rows)`` for the console."""
    overall = f"{m['eval_accuracy']:.4f}" if "eval_accuracy" in m else "-"
    groups = " ".join(f"{k.split('/', 1)[1]}={v:.4f}" for k, v in m.items() if k.startswith("eval_accuracy/"))
    rows = f"{m['eval_scored_rows']} rows" + (f", {m['eval_generate_failed']} failed" if m.get("eval_generate_failed") else "")
    return f"step {int(m['step'])}: eval_accuracy={overall} ({groups + '; ' if groups else ''}{rows})"
