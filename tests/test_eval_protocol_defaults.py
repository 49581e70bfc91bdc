"""eval's frame defaults are the published protocol's (Video-R1 / Video-KTR eval_bench.py)."""

from __future__ import annotations

import pytest

from video_ktr.evaluation.eval_config import PROTOCOL_VIDEO_MIN_PIXELS, EvalConfig
from video_ktr.evaluation.protocol import build_protocol
from video_ktr.evaluation.tasks.registry import BENCHMARKS


def test_video_min_pixels_is_the_published_128x28x28():
    cfg = EvalConfig(model_name_or_path="m", output_dir="o")
    assert PROTOCOL_VIDEO_MIN_PIXELS == 128 * 28 * 28
    assert (cfg.min_pixels, cfg.max_pixels, cfg.max_frames) == (128 * 28 * 28, 256 * 28 * 28, 16)
    assert cfg.frame_settings().min_pixels == 128 * 28 * 28


def test_a_smaller_max_pixels_caps_the_default_and_an_explicit_value_wins():
    assert EvalConfig(model_name_or_path="m", output_dir="o", max_pixels=4 * 28 * 28).min_pixels == 4 * 28 * 28
    assert EvalConfig(model_name_or_path="m", output_dir="o", min_pixels=4 * 28 * 28).min_pixels == 4 * 28 * 28


@pytest.mark.parametrize("benchmark", list(BENCHMARKS))
def test_each_benchmark_records_the_published_protocol_by_default(benchmark, tmp_path):
    """The Video-R1 / Video-KTR evaluation code runs every benchmark with one setting, which EvalConfig's
    defaults follow (see its field help): at most 16 frames (2 fps) of 128x28x28 to 256x28x28 pixels, sized by
    qwen-vl-utils' rule, their prompt layout, temperature 0.1 and top_p 0.001 with 1024 new tokens. Each
    benchmark's default protocol, as written into OUT/<benchmark>.json, records exactly that."""
    data = tmp_path / "rows.json"
    data.write_text("[]")
    p = build_protocol(EvalConfig(model_name_or_path="m", output_dir="o", benchmark=benchmark, data_file=str(data)),
                       num_rows=0)
    assert p["benchmark"] == benchmark
    f = p["frames"]
    assert (f["fps"], f["max_frames"], f["nframes"]) == (2.0, 16, None)
    assert (f["min_pixels"], f["max_pixels"], f["frame_rule"]) == (128 * 28 * 28, 256 * 28 * 28, "qwen-vl-utils")
    assert (p["prompt"]["layout"], p["prompt"]["system_prompt"]) == ("eval", None)
    d = p["decoding"]
    assert (d["temperature"], d["top_p"], d["max_new_tokens"], d["greedy"]) == (0.1, 0.001, 1024, False)
