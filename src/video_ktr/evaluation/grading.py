"""Model answers -> scores and metrics: one row's prediction and score, a failed row's record, the
metrics with the synthetic set's ``by_kind``, and re-scoring a saved evaluation (``video-ktr score``).
"""

from __future__ import annotations

from video_ktr.core.rewards import eval_extract, eval_score
from video_ktr.evaluation.eval_config import EvalError
from video_ktr.evaluation.tasks.base import MISSING
from video_ktr.evaluation.tasks.metrics import compute_metrics

__all__ = ["eval_metrics", "rescore"]


def _breakdown(results: list[dict], key: str) -> dict[str, dict]:
    """``{value: {"accuracy", "n", "n_failed"}}`` by ``meta[key]`` (same shape as the benchmark breakdowns)."""
    buckets: dict[str, tuple[list[float], list[int]]] = {}
    for r in results:
        value = (r.get("meta") or {}).get(key, r.get(key))
        name = MISSING if value is None or value == "" else str(value)
        scores, failed = buckets.setdefault(name, ([], [0]))
        if r.get("score") is None:
            failed[0] += 1
        else:
            scores.append(float(r["score"]))
    return {
        k: {"accuracy": (sum(s) / len(s)) if s else None, "n": len(s), "n_failed": f[0]}
        for k, (s, f) in sorted(buckets.items(), key=lambda kv: (kv[0] == MISSING, kv[0]))
    }


def eval_metrics(benchmark: str, results: list[dict]) -> dict:
    """:func:`video_ktr.evaluation.tasks.metrics.compute_metrics` of the results, plus ``by_kind`` when any row's
    ``meta`` has a ``kind`` (the synthetic set). Failure reasons come from each row's ``failed``."""
    metrics = compute_metrics(benchmark, [{**r, "error": r.get("failed")} for r in results])
    if any("kind" in (r.get("meta") or {}) for r in results):
        metrics["by_kind"] = _breakdown(results, "kind")
    return metrics


def score_output(row: dict, output: str) -> tuple[str, float]:
    """(prediction, score) of one output for one row."""
    return eval_extract(output), float(eval_score(output, row["solution"], row["problem_type"]))


def failed_row(row: dict, reason: str, media_path: str | None = None) -> dict:
    """The result record of a row that could not be evaluated: no output, no score, the reason."""
    return {**row, "media_path": media_path, "output": None, "prediction": None, "score": None, "failed": reason}


def rescore(payload: dict, benchmark: str | None = None) -> dict:
    """Recompute predictions, scores and metrics of a saved evaluation (failed rows stay failed)."""
    if not isinstance(payload, dict) or not isinstance(payload.get("results"), list):
        raise EvalError("not an evaluation file: expected an object with a 'results' list")
    name = benchmark or (payload.get("protocol") or {}).get("benchmark") or (payload.get("metrics") or {}).get("benchmark")
    if not name:
        raise EvalError("the file names no benchmark (protocol.benchmark); pass --benchmark")
    results = []
    for i, r in enumerate(payload["results"]):
        if not isinstance(r, dict) or "solution" not in r or "problem_type" not in r:
            raise EvalError(f"results[{i}]: not a result row (needs solution and problem_type)")
        r = dict(r)
        if r.get("failed"):
            r.update(prediction=None, score=None)
        elif not isinstance(r.get("output"), str):
            r.update(prediction=None, score=None, failed="no output saved for this row")
        else:
            r["prediction"], r["score"] = score_output(r, r["output"])
            r["failed"] = None
        results.append(r)
    out = dict(payload)
    out["results"] = results
    out["metrics"] = eval_metrics(name, results)
    return out
