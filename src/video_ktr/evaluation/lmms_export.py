"""`video-ktr eval` results in lmms-eval's output layout, beside our own file (which keeps the protocol).

lmms-eval writes, like lm-evaluation-harness whose EvaluationTracker it inherits, per model:

    OUT/lmms_eval/<model name, '/' -> '__'>/<date_id>_results.json
    OUT/lmms_eval/<model name, '/' -> '__'>/<date_id>_samples_<task>.jsonl

``results.json`` has ``results`` (per task: ``alias`` and ``"<metric>,<filter>"`` keys with their
``"<metric>_stderr,<filter>"``), ``group_subtasks``, ``configs``, ``versions``, ``n-shot``,
``higher_is_better``, ``n-samples`` ({original, effective}), ``config`` (model, model_args, batch_size,
...), ``date`` and ``model_name``. Each samples line has ``doc_id``, ``doc``, ``target``, ``arguments``,
``resps``, ``filtered_resps`` and the per-sample metric values. The filter here is ``none`` (our answer
extraction is part of the metric). Metrics: ``accuracy`` (mean score of the scored non-regression rows,
0-1), ``accuracy_all_rows`` (failed rows as 0) and, for regression rows, ``mra``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
from pathlib import Path
from typing import Any

__all__ = ["lmms_model_dir", "write_lmms_eval"]

_FILTER = "none"


def lmms_model_dir(output_dir: str | Path, model_name: str) -> Path:
    return Path(output_dir) / "lmms_eval" / model_name.replace("/", "__")


def _stderr(values: list[float]) -> float | str:
    n = len(values)
    if n < 2:
        return "N/A"
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return math.sqrt(var / n)


def _hash(text: Any) -> str:
    return hashlib.sha256(str(text).encode("utf-8")).hexdigest()


def write_lmms_eval(output_dir: str | Path, task: str, results: list[dict], metrics: dict, protocol: dict,
                    *, model_name: str, date_id: str | None = None) -> tuple[Path, Path]:
    """Write the lmms-eval results file and samples file of one benchmark; returns their paths."""
    date_id = date_id or _dt.datetime.now().strftime("%Y%m%d_%H%M%S")
    folder = lmms_model_dir(output_dir, model_name)
    folder.mkdir(parents=True, exist_ok=True)
    cls = [r for r in results if r.get("problem_type") != "regression"]
    reg = [r for r in results if r.get("problem_type") == "regression"]
    cls_scored = [float(r["score"]) for r in cls if r.get("score") is not None]
    task_result: dict[str, Any] = {"alias": task}
    higher: dict[str, bool] = {}
    if cls:
        task_result[f"accuracy,{_FILTER}"] = metrics.get("overall")
        task_result[f"accuracy_stderr,{_FILTER}"] = _stderr(cls_scored)
        task_result[f"accuracy_all_rows,{_FILTER}"] = metrics.get("overall_all_rows")
        task_result[f"accuracy_all_rows_stderr,{_FILTER}"] = _stderr(
            [0.0 if r.get("score") is None else float(r["score"]) for r in cls])
        higher.update(accuracy=True, accuracy_all_rows=True)
    if reg:
        task_result[f"mra,{_FILTER}"] = metrics.get("mean_mra")
        task_result[f"mra_stderr,{_FILTER}"] = _stderr([float(r["score"]) for r in reg if r.get("score") is not None])
        higher["mra"] = True
    decoding = protocol.get("decoding") or {}
    payload = {
        "results": {task: task_result},
        "group_subtasks": {task: []},
        "configs": {task: {"task": task, "output_type": "generate_until", "generation_kwargs": decoding,
                           "metadata": {"video_ktr_protocol": protocol}}},
        "versions": {task: "video-ktr"},
        "n-shot": {task: 0},
        "higher_is_better": {task: higher},
        "n-samples": {task: {"original": protocol.get("num_rows", len(results)), "effective": len(results)}},
        "config": {"model": "video-ktr", "model_args": f"pretrained={model_name}",
                   "batch_size": (protocol.get("runtime") or {}).get("batch_size"), "limit": protocol.get("limit"),
                   "gen_kwargs": decoding},
        "date": date_id,
        "model_name": model_name,
        "model_name_sanitized": model_name.replace("/", "__"),
    }
    results_file = folder / f"{date_id}_results.json"
    results_file.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    samples_file = folder / f"{date_id}_samples_{task}.jsonl"
    with samples_file.open("w", encoding="utf-8") as fh:
        for i, r in enumerate(results):
            metric = "mra" if r.get("problem_type") == "regression" else "accuracy"
            output = r.get("output")
            doc = {k: v for k, v in r.items() if k not in ("output", "prediction", "score", "failed")}
            line = {
                "doc_id": i, "doc": doc, "target": r.get("solution"),
                "arguments": {"question": r.get("problem"), "gen_kwargs": decoding},
                "resps": [[output]] if output is not None else [[]],
                "filtered_resps": [r.get("prediction")],
                "doc_hash": _hash(r.get("uid", i)), "prompt_hash": _hash(r.get("problem")),
                "target_hash": _hash(r.get("solution")),
                metric: r.get("score"),
            }
            if r.get("failed"):
                line["failed"] = r["failed"]
            fh.write(json.dumps(line, default=str) + "\n")
    return results_file, samples_file
