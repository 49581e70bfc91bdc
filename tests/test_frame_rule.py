"""--frame_rule: qwen-vl-utils' frame counts and sizes (the default) checked against qwen-vl-utils 0.0.14 itself
(a test-only oracle, in the dev extra), and the earlier 'fit' rule kept as an option."""

from __future__ import annotations

import random

import pytest

from video_ktr.data.media import FrameSettings, smart_nframes, smart_resize


def _ours_or_error(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except ValueError:
        return "error"


def _bounds(rng: random.Random, factor: int) -> tuple[int, int]:
    """Pixel bounds, half of them close together (many frames sharing a total-pixel budget)."""
    area = factor * factor
    low = rng.randint(1, 300) * area + rng.randint(0, area - 1) * rng.randint(0, 1)
    high = int(low * rng.uniform(1.0, 1.4)) if rng.random() < 0.5 else rng.randint(low, 2000 * area)
    return low, max(high, area)


def test_smart_resize_equals_qwen_vl_utils_on_random_sizes_and_bounds():
    vp = pytest.importorskip("qwen_vl_utils.vision_process")
    rng = random.Random(0)
    outside = 0
    for _ in range(4000):
        factor = rng.choice([28, 32])
        height, width = rng.randint(1, 4000), rng.randint(1, 4000)
        low, high = _bounds(rng, factor)
        high = max(high, low)
        try:
            want = vp.smart_resize(height, width, factor=factor, min_pixels=low, max_pixels=high)
        except ValueError:  # the aspect ratio over 200
            want = "error"
        got = _ours_or_error(smart_resize, height, width, factor=factor, min_pixels=low, max_pixels=high)
        if want != "error" and min(want) < 1:  # a side rounded to 0: the reference returns it, ours says so
            assert got == "error", (height, width, factor, low, high)
            continue
        assert got == want, (height, width, factor, low, high)
        if want != "error" and not low <= want[0] * want[1] <= high:
            outside += 1
            fit = _ours_or_error(smart_resize, height, width, factor=factor, min_pixels=low, max_pixels=high, rule="fit")
            # the 'fit' rule stays inside, as before (or says no grid size fits such narrow bounds)
            assert fit == "error" or low <= fit[0] * fit[1] <= high
    assert outside > 100  # the cases that differ between the two rules were exercised


def test_smart_nframes_equals_qwen_vl_utils_including_its_refusals():
    vp = pytest.importorskip("qwen_vl_utils.vision_process")
    rng = random.Random(1)
    for _ in range(4000):
        total, source_fps = rng.randint(1, 3000), rng.uniform(1.0, 60.0)
        if rng.random() < 0.3:
            n = rng.randint(1, 40)
            ele, settings = {"nframes": n}, FrameSettings(nframes=n, max_frames=64)
        else:
            fps, min_frames = rng.choice([0.5, 1.0, 2.0, 4.0]), rng.randint(1, 8)
            max_frames = rng.randint(max(2, min_frames), 64)
            ele = {"fps": fps, "min_frames": min_frames, "max_frames": max_frames}
            settings = FrameSettings(fps=fps, min_frames=min_frames, max_frames=max_frames)
        try:
            want = vp.smart_nframes(ele, total_frames=total, video_fps=source_fps)
        except ValueError:
            want = "error"
        assert _ours_or_error(smart_nframes, total, source_fps, settings) == want, (total, source_fps, ele)


@pytest.mark.parametrize("size, frames, low, high, total", [
    ((336, 560), 16, 128 * 784, 256 * 784, None),  # the evaluation protocol's bounds, no total: max_pixels holds
    ((448, 784), 16, 4 * 784, 512 * 784, 16 * 64 * 784),  # a total-pixel budget of 64 tokens a frame
    ((336, 560), 32, 128 * 784, 256 * 784, 24000 * 784),  # the budget is under min_pixels x 1.05: that wins
    ((672, 1232), 8, 4 * 784, 1200 * 784, None),  # max_pixels above qwen-vl-utils' 768-token cap: the cap wins
])
def test_video_frame_size_equals_qwen_vl_utils_fetch_video(size, frames, low, high, total):
    """fetch_video on a list of frames resizes them with its per-frame maximum; ours gives the same size. (Its
    list path first resizes each frame as an image with a factor of 56, passing 28 as the patch size, so the frames
    here are multiples of 56 inside the bounds, which that step keeps as they are.)"""
    vp = pytest.importorskip("qwen_vl_utils.vision_process")
    from PIL import Image

    assert vp.smart_resize(*size, factor=56, min_pixels=low, max_pixels=high) == size
    images = [Image.new("RGB", (size[1], size[0]), (i * 10, 50, 90)) for i in range(frames)]
    ele = {"video": images, "min_pixels": low, "max_pixels": high}
    if total is not None:
        ele["total_pixels"] = total
    want = tuple(vp.fetch_video(ele).shape[-2:])
    settings = FrameSettings(min_pixels=low, max_pixels=high, total_pixels=total)
    got = smart_resize(*size, factor=28, min_pixels=low, max_pixels=settings.frame_max_pixels(frames))
    assert got == want


def test_known_values_without_the_oracle():
    """Pinned results of qwen-vl-utils 0.0.14 (read off it), so the rule is checked where it is not installed."""
    # bounds close together: the reference's floor step leaves min_pixels (7 x 13 = 91 cells < 100), its ceil step
    # max_pixels (13 x 24 = 312 cells > 310); 'fit' stays inside
    assert smart_resize(360, 640, factor=28, min_pixels=100 * 784, max_pixels=104 * 784) == (196, 364)
    assert smart_resize(360, 640, factor=28, min_pixels=300 * 784, max_pixels=310 * 784) == (364, 672)
    for low, high in ((100, 104), (300, 310)):
        fit = smart_resize(360, 640, factor=28, min_pixels=low * 784, max_pixels=high * 784, rule="fit")
        assert low * 784 <= fit[0] * fit[1] <= high * 784
    assert smart_resize(360, 640, factor=28, min_pixels=4 * 784, max_pixels=128 * 784) == (224, 420)
    assert smart_nframes(100, 25.0, FrameSettings(nframes=5)) == 4  # round(2.5) = 2 pairs, as Python rounds
    assert FrameSettings(max_pixels=1200 * 784).frame_max_pixels(8) == 768 * 784  # the reference's per-frame cap
    assert FrameSettings(max_pixels=1200 * 784, frame_rule="fit").frame_max_pixels(8) == 1200 * 784
    assert FrameSettings(total_pixels=1000 * 784).frame_max_pixels(16) == 125 * 784 and \
        FrameSettings(total_pixels=1001 * 784).frame_max_pixels(16) == 1001 * 784 / 16 * 2  # fractional, as there


def test_the_rule_is_an_option_and_recorded_in_the_eval_protocol(tmp_path):
    from video_ktr.evaluation.eval_config import EvalConfig
    from video_ktr.evaluation.protocol import build_protocol
    from video_ktr.training.grpo_config import TrainConfig
    from video_ktr.utils.config import parse_args

    req = ["--model_name_or_path", "m", "--dataset", "d.json", "--output_dir", "o"]
    assert parse_args(TrainConfig, req).frame_settings().frame_rule == "qwen-vl-utils"
    assert parse_args(TrainConfig, [*req, "--frame_rule", "fit"]).frame_settings().frame_rule == "fit"
    data = tmp_path / "rows.json"
    data.write_text("[]")
    cfg = parse_args(EvalConfig, ["--model_name_or_path", "m", "--benchmark", "videomme", "--data_file", str(data),
                                  "--output_dir", str(tmp_path / "o"), "--frame_rule", "fit"])
    assert build_protocol(cfg, num_rows=0)["frames"]["frame_rule"] == "fit"
