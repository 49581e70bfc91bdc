"""`video-ktr score --table`: the main-table layout across benchmarks and models."""

from __future__ import annotations

import json

from video_ktr.commands.score import main as score_main
from video_ktr.evaluation.results_table import collect, render


def _eval_file(folder, bench, model, overall, mra=None):
    folder.mkdir(parents=True, exist_ok=True)
    metrics = {"benchmark": bench, "overall": overall, "mean_mra": mra}
    (folder / f"{bench}.json").write_text(json.dumps({"results": [], "metrics": metrics, "protocol": {"model": model}}))


def test_table_rows_per_model_columns_in_the_papers_order(tmp_path, capsys):
    _eval_file(tmp_path / "ktr", "mmvu", "/ckpt/runs/ktr", 0.659)
    _eval_file(tmp_path / "ktr", "videoholmes", "/ckpt/runs/ktr", 0.416)
    _eval_file(tmp_path / "ktr", "vsibench", "/ckpt/runs/ktr", 0.4, mra=0.2)
    _eval_file(tmp_path / "grpo", "videoholmes", "Qwen/Qwen2.5-VL-7B-Instruct", 0.388)
    table = collect([tmp_path / "ktr", tmp_path / "grpo"])
    assert abs(table["runs/ktr"]["vsibench"] - 30.0) < 1e-9  # VSI-Bench: (accuracy + MRA) / 2
    md = render(table)
    lines = md.splitlines()
    assert lines[0] == "| model | Video-Holmes | MMVU | VSI-Bench | mean |"
    assert lines[2] == "| runs/ktr | 41.6 | 65.9 | 30.0 | 45.8 |"
    assert lines[3] == "| Qwen/Qwen2.5-VL-7B-Instruct | 38.8 |  |  | 38.8 |"
    csv = render(table, "csv").splitlines()
    assert csv[0] == "model,Video-Holmes,MMVU,VSI-Bench,mean" and csv[2] == "Qwen/Qwen2.5-VL-7B-Instruct,38.8,,,38.8"
    assert score_main(["--table", str(tmp_path / "ktr"), str(tmp_path / "grpo")]) == 0
    assert capsys.readouterr().out == md
    assert score_main(["--table", "--format", "csv", str(tmp_path / "grpo")]) == 0
    assert capsys.readouterr().out.splitlines()[1] == "Qwen/Qwen2.5-VL-7B-Instruct,38.8,38.8"


def test_table_errors_name_the_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert score_main(["--table", str(tmp_path / "empty")]) == 2
    assert "holds no <benchmark>.json" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "mmvu.json").write_text("{}")
    assert score_main(["--table", str(tmp_path / "bad")]) == 2
    assert "mmvu.json: not an evaluation file" in capsys.readouterr().err
