"""`video-ktr demo --quick`: every stage runs and the report is written from what was measured."""

from __future__ import annotations

import json

from PIL import Image

from video_ktr.analysis.demo import DemoConfig, run_demo
from video_ktr.analysis.demo_report import sft_accuracy_curves
from video_ktr.utils.jsonl import read_jsonl


def test_quick_demo_runs_every_stage_and_reports(tmp_path):
    out = tmp_path / "demo"
    results = run_demo(DemoConfig(output_dir=str(out), quick=True))
    for name in ("summary.md", "results.json", "sft_loss.png", "sft_accuracy.png", "rl_reward.png", "accuracy.png"):
        assert (out / name).is_file(), name
    for png in out.glob("*.png"):
        with Image.open(png) as im:
            assert im.size[0] > 100 and im.size[1] > 100
    saved = json.loads((out / "results.json").read_text())
    assert saved["before"] == results["before"] and set(saved["timings_seconds"]) == {"synth", "model", "sft", "eval_sft", "rl"}
    # SFT ran on the flawed-teacher rows, RL on the ground truth
    cot = json.loads((out / "data" / "train_cot.json").read_text())
    assert any(r["cot_error"] for r in cot)
    assert json.loads((out / "sft" / "sft_config.json").read_text())["dataset"].endswith("train_cot.json")
    assert json.loads((out / "ktr" / "train_config.json").read_text())["dataset"].endswith("train.json")
    # the accuracies in the summary are the evaluation files' own numbers
    greedy = json.loads((out / "eval_sft" / "greedy.json").read_text())
    assert results["before"]["greedy"]["accuracy"] == greedy["metrics"]["overall"]
    summary = (out / "summary.md").read_text()
    assert f"| greedy overall | {results['before']['greedy']['accuracy']:.3f} | {results['after']['greedy']['accuracy']:.3f}" in summary
    # the sampled row is the mean of the sampled evaluations, each from its own file
    k = DemoConfig().eval_samples
    sampled = [json.loads((out / "eval_ktr" / f"sampled_{i}.json").read_text())["metrics"]["overall"] for i in range(k)]
    assert k > 1 and abs(results["after"]["sampled"]["accuracy"] - sum(sampled) / k) < 1e-12
    assert f"| sampled (mean of {k}) overall | {results['before']['sampled']['accuracy']:.3f} |" in summary
    assert "| sampled_0 overall" not in summary
    curves = sft_accuracy_curves(read_jsonl(out / "sft" / "metrics.jsonl"))
    assert [s for s, _ in curves["overall"]] == [10, 20] and "count_color" in curves
    assert "| SFT step | overall |" in summary
    # the test split is held out by content (synth --held_out redraw): the headline says so, no separate unseen row
    assert saved["held_out"]["held_out"] == "redraw" and saved["held_out"]["test_rows_identical_to_a_train_row"] == 0
    assert results["before"]["greedy"]["unseen_rows"] == 16 and "Held out by content" in summary
    assert "unseen rows only" not in summary
    # a second run reuses every stage
    again = run_demo(DemoConfig(output_dir=str(out), quick=True))
    assert again["before"] == results["before"] and again["after"] == results["after"]


def test_demo_arch_sets_the_family_frame_size_and_refuses_another_familys_folder(tmp_path):
    """--arch qwen3_vl: synthetic frames of 2x2 cells of 32 px (64x64) in the data, SFT, RL and eval settings;
    the default stays 56x56. A demo folder made for one family is not reused for another. (The whole quick
    demo on qwen3_vl ran by hand: docs/models.md; it takes ~100 s here, too long for the suite.)"""
    import pytest

    from video_ktr.analysis import demo
    from video_ktr.data import synth
    from video_ktr.model.tiny import build_tiny_model

    qwen3 = DemoConfig(arch="qwen3_vl")
    rl = demo.rl_config(qwen3, tmp_path / "sft", tmp_path / "train.json", tmp_path / "rl")
    assert (rl.min_pixels, rl.max_pixels, rl.image_max_pixels) == (64 * 64, 64 * 64, 64 * 64)
    default = demo.rl_config(DemoConfig(), tmp_path / "sft", tmp_path / "train.json", tmp_path / "rl")
    assert (default.min_pixels, default.max_pixels, default.image_max_pixels) == (56 * 56, 56 * 56, 56 * 56)

    out = tmp_path / "demo"
    synth.generate(out / "data", num_train=4, num_test=2)  # a Qwen2.5-VL demo's data (28-px cells)
    with pytest.raises(ValueError, match="28-px cells, not the 32-px cells --arch qwen3_vl needs"):
        demo.run_demo(DemoConfig(output_dir=str(out), arch="qwen3_vl", quick=True))
    build_tiny_model(out / "base", arch="qwen2_vl", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=1, intermediate_size=64)
    with pytest.raises(ValueError, match="another family than --arch qwen2_5_vl"):
        demo.run_demo(DemoConfig(output_dir=str(out), quick=True))
