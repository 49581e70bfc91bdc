"""eval's lmms-eval export: the results file and per-sample JSONL in lmms-eval's layout."""

from __future__ import annotations

import json

import pytest

from video_ktr.evaluation.grading import eval_metrics
from video_ktr.evaluation.lmms_export import write_lmms_eval

ROWS = [
    {"uid": "a", "problem": "q1", "problem_type": "multiple choice", "solution": "<answer>A</answer>",
     "output": "<answer>A</answer>", "prediction": "A", "score": 1.0, "failed": None},
    {"uid": "b", "problem": "q2", "problem_type": "multiple choice", "solution": "<answer>B</answer>",
     "output": "<answer>C</answer>", "prediction": "C", "score": 0.0, "failed": None},
    {"uid": "c", "problem": "q3", "problem_type": "multiple choice", "solution": "<answer>B</answer>",
     "output": None, "prediction": None, "score": None, "failed": "media unreadable"},
    {"uid": "d", "problem": "q4", "problem_type": "regression", "solution": "<answer>10</answer>",
     "output": "<answer>9</answer>", "prediction": "9", "score": 0.9, "failed": None},
]


def test_results_and_samples_read_back_in_lmms_evals_layout(tmp_path):
    metrics = eval_metrics("vsibench", ROWS)
    protocol = {"benchmark": "vsibench", "num_rows": 4, "decoding": {"max_new_tokens": 8, "do_sample": False}}
    res_file, samples_file = write_lmms_eval(tmp_path, "vsibench", ROWS, metrics, protocol,
                                             model_name="Video-KTR/Video-KTR-7B", date_id="20261205_070000")
    assert res_file == tmp_path / "lmms_eval" / "Video-KTR__Video-KTR-7B" / "20261205_070000_results.json"
    assert samples_file.name == "20261205_070000_samples_vsibench.jsonl"
    out = json.loads(res_file.read_text())
    for key in ("results", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples",
                "config", "date", "model_name"):
        assert key in out, key
    task = out["results"]["vsibench"]
    assert task["alias"] == "vsibench"
    assert task["accuracy,none"] == pytest.approx(0.5)  # scored rows only
    assert task["accuracy_all_rows,none"] == pytest.approx(1 / 3)
    assert task["mra,none"] == pytest.approx(0.9) and task["mra_stderr,none"] == "N/A"
    assert task["accuracy_stderr,none"] == pytest.approx(0.5)  # sample std 0.7071 / sqrt(2)
    assert out["n-samples"]["vsibench"] == {"original": 4, "effective": 4}
    assert out["higher_is_better"]["vsibench"] == {"accuracy": True, "accuracy_all_rows": True, "mra": True}
    assert out["config"]["model_args"] == "pretrained=Video-KTR/Video-KTR-7B"
    # the metric names split as lmms-eval's readers split them: "<metric>,<filter>"
    assert {k.split(",")[1] for k in task if "," in k} == {"none"}
    lines = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert [s["doc_id"] for s in lines] == [0, 1, 2, 3]
    for s in lines:
        assert {"doc_id", "doc", "target", "arguments", "resps", "filtered_resps", "doc_hash", "target_hash"} <= set(s)
    assert lines[0]["resps"] == [["<answer>A</answer>"]] and lines[0]["filtered_resps"] == ["A"]
    assert lines[0]["accuracy"] == 1.0 and lines[3]["mra"] == 0.9 and lines[2]["failed"] == "media unreadable"
    assert lines[0]["doc"]["uid"] == "a" and "output" not in lines[0]["doc"]
