"""eval's frame defaults are the published protocol's (Video-R1 / Video-KTR eval_bench.py)."""

from __future__ import annotations

from video_ktr.evaluation.eval_config import PROTOCOL_VIDEO_MIN_PIXELS, EvalConfig


def test_video_min_pixels_is_the_published_128x28x28():
    cfg = EvalConfig(model_name_or_path="m", output_dir="o")
    assert PROTOCOL_VIDEO_MIN_PIXELS == 128 * 28 * 28
    assert (cfg.min_pixels, cfg.max_pixels, cfg.max_frames) == (128 * 28 * 28, 256 * 28 * 28, 16)
    assert cfg.frame_settings().min_pixels == 128 * 28 * 28


def test_a_smaller_max_pixels_caps_the_default_and_an_explicit_value_wins():
    assert EvalConfig(model_name_or_path="m", output_dir="o", max_pixels=4 * 28 * 28).min_pixels == 4 * 28 * 28
    assert EvalConfig(model_name_or_path="m", output_dir="o", min_pixels=4 * 28 * 28).min_pixels == 4 * 28 * 28
