"""Tests of video/image decoding, frame sampling and resizing (qwen-vl-utils semantics)."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.paths import REAL_VIDEO  # noqa: E402
from video_ktr.data import video as video_module
from video_ktr.data.media import (
    FrameSettings,
    MediaError,
    load_image,
    sample_indices,
    smart_nframes,
    smart_resize,
)
from video_ktr.data.video import FrameCache, Video, load_video, write_video

COLOURS = [
    (255, 0, 0),
    (0, 255, 0),
    (0, 0, 255),
    (255, 255, 0),
    (0, 255, 255),
    (255, 0, 255),
    (128, 64, 32),
    (20, 200, 120),
]


@pytest.fixture(scope="module")
def real_video() -> Path:
    assert REAL_VIDEO.is_file(), (
        f"fixture {REAL_VIDEO} is missing: it is part of the repository (tests/fixtures/real) and must be present "
        "(640x360 h264, 22 s); restore it instead of skipping this test"
    )
    return REAL_VIDEO


@pytest.fixture(scope="module")
def coloured_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    frames = np.zeros((8, 56, 56, 3), np.uint8)
    for i, c in enumerate(COLOURS):
        frames[i] = c
    path = tmp_path_factory.mktemp("vid") / "colours.mp4"
    write_video(path, frames, fps=4.0)
    return path


# ---------------------------------------------------------------------------------------------- resize


def test_smart_resize_caps_360x640_at_max_pixels_with_multiples_of_28():
    h, w = smart_resize(360, 640, factor=28, min_pixels=4 * 28 * 28, max_pixels=128 * 28 * 28)
    assert (h, w) == (224, 420)  # beta = sqrt(360*640/100352) ~ 1.515; 237.6 -> 224, 422.4 -> 420
    assert h % 28 == 0 and w % 28 == 0 and h * w <= 128 * 28 * 28


def test_smart_resize_rounds_sizes_already_in_bounds():
    assert smart_resize(224, 224, min_pixels=4 * 784, max_pixels=128 * 784) == (224, 224)
    assert smart_resize(100, 200, min_pixels=4 * 784, max_pixels=128 * 784) == (112, 196)


def test_smart_resize_upscales_tiny_image_to_min_pixels():
    h, w = smart_resize(10, 10, factor=28, min_pixels=4 * 28 * 28, max_pixels=128 * 28 * 28)
    assert (h, w) == (56, 56)
    assert h * w >= 4 * 28 * 28


def test_smart_resize_uses_factor_setting():
    h, w = smart_resize(100, 100, factor=14, min_pixels=14 * 14, max_pixels=64 * 14 * 14)
    assert (h, w) == (98, 98)


def test_smart_resize_rejects_extreme_aspect_ratio():
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 3000, max_aspect_ratio=200)


def test_smart_resize_keeps_area_in_bounds_when_one_side_hits_factor():
    h, w = smart_resize(20, 3000, factor=28, min_pixels=784, max_pixels=16 * 784, rule="fit")
    assert h == 28 and w % 28 == 0 and 784 <= h * w <= 16 * 784
    with pytest.raises(ValueError, match="a side rounds to 0"):  # qwen-vl-utils' rule floors the height to 0
        smart_resize(20, 3000, factor=28, min_pixels=784, max_pixels=16 * 784)


# ---------------------------------------------------------------------------------------------- nframes


def test_smart_nframes_fps_mode_uses_duration_times_fps():
    # 10 s at 30 fps, 1 frame per second -> 10 frames
    assert smart_nframes(300, 30.0, FrameSettings(fps=1.0, max_frames=64)) == 10


def test_smart_nframes_fps_mode_floors_to_frame_factor():
    # 5.5 s at 2 fps -> 11 -> 10
    assert smart_nframes(55, 10.0, FrameSettings(fps=2.0, max_frames=64)) == 10


def test_smart_nframes_clamps_to_max_frames_and_min_frames():
    assert smart_nframes(491, 22.29, FrameSettings()) == 16  # 44 wanted, 16 allowed
    assert smart_nframes(30, 30.0, FrameSettings(fps=2.0, min_frames=4)) == 4  # 2 wanted, 4 minimum
    assert smart_nframes(30, 30.0, FrameSettings(fps=2.0, min_frames=5)) == 6  # min rounded up to even


def test_smart_nframes_nframes_mode_rounds_odd_to_even():
    assert smart_nframes(100, 25.0, FrameSettings(nframes=8)) == 8
    assert smart_nframes(100, 25.0, FrameSettings(nframes=7)) == 8
    assert smart_nframes(100, 25.0, FrameSettings(nframes=1, frame_rule="fit")) == 2
    with pytest.raises(ValueError, match="nframes 1 rounds to 0 frames"):  # refused, as qwen-vl-utils does
        smart_nframes(100, 25.0, FrameSettings(nframes=1))


def test_smart_nframes_short_video_is_capped_by_total_frames():
    assert smart_nframes(5, 25.0, FrameSettings(fps=2.0, min_frames=4)) == 4
    assert smart_nframes(3, 25.0, FrameSettings(fps=2.0, min_frames=4)) == 2


def test_smart_nframes_one_frame_video_gives_frame_factor():
    assert smart_nframes(1, 25.0, FrameSettings(frame_rule="fit")) == 2
    assert smart_nframes(1, 25.0, FrameSettings(nframes=8, frame_rule="fit")) == 2
    assert smart_nframes(3, 25.0, FrameSettings(frame_factor=4, max_frames=16, frame_rule="fit")) == 4
    with pytest.raises(ValueError, match="the video has 1 frame"):  # qwen-vl-utils refuses it
        smart_nframes(1, 25.0, FrameSettings())


def test_smart_nframes_more_frames_than_video_is_an_error():
    with pytest.raises(ValueError, match="video has 6"):
        smart_nframes(6, 25.0, FrameSettings(nframes=8))


def test_settings_validate_names_the_field():
    with pytest.raises(ValueError, match="max_frames"):
        FrameSettings(min_frames=8, max_frames=4).validate()
    with pytest.raises(ValueError, match="fps"):
        FrameSettings(fps=0).validate()
    with pytest.raises(ValueError, match="max_pixels"):
        FrameSettings(min_pixels=1000, max_pixels=900).validate()


def test_total_pixels_lowers_per_frame_max_but_not_below_min():
    s = FrameSettings(total_pixels=16 * 64 * 28 * 28)
    assert s.frame_max_pixels(16) == 2 * 64 * 28 * 28  # min(128*784, 16*64*784 / 16 * 2)
    s = FrameSettings(total_pixels=8 * 28 * 28)
    assert s.frame_max_pixels(16) == int(4 * 28 * 28 * 1.05)
    assert FrameSettings().frame_max_pixels(16) == 128 * 28 * 28


# ---------------------------------------------------------------------------------------------- indices


def test_sample_indices_uniform_and_within_range():
    assert sample_indices(491, 16)[0] == 0 and sample_indices(491, 16)[-1] == 490
    assert sample_indices(10, 4) == [0, 3, 6, 9]
    idx = sample_indices(100, 16)
    assert len(idx) == 16 and all(0 <= i < 100 for i in idx) and idx == sorted(idx)
    gaps = np.diff(idx)
    assert gaps.max() - gaps.min() <= 1


def test_sample_indices_pads_by_repeating_last_frame():
    assert sample_indices(1, 2) == [0, 0]
    assert sample_indices(3, 4) == [0, 1, 2, 2]


# ---------------------------------------------------------------------------------------------- real video


def test_real_video_default_settings_gives_16_frames(real_video: Path):
    video = load_video(real_video, FrameSettings())
    t, c, h, w = video.frames.shape
    assert (t, c) == (16, 3)
    assert video.frames.dtype.is_floating_point is False and str(video.frames.dtype) == "torch.uint8"
    assert h % 28 == 0 and w % 28 == 0 and h * w <= 128 * 28 * 28
    assert (h, w) == (224, 420)
    assert video.frame_indices[0] == 0 and video.frame_indices[-1] >= video.total_frames - 2
    assert (np.diff(video.frame_indices) > 0).all()
    assert video.total_frames == 491
    assert video.source_fps == pytest.approx(22.29, abs=0.05)
    assert video.duration == pytest.approx(22.03, abs=0.1)
    assert video.sampled_fps == pytest.approx(16 / 22.03, rel=0.01)
    meta = video.metadata()
    assert {"total_num_frames", "fps", "frames_indices", "duration", "width", "height"} <= set(meta)
    assert meta["frames_indices"] == video.frame_indices and (meta["width"], meta["height"]) == (640, 360)


def test_real_video_frames_differ_over_time(real_video: Path):
    video = load_video(real_video, FrameSettings(nframes=4, max_pixels=16 * 28 * 28))
    first, last = video.frames[0].float(), video.frames[-1].float()
    assert (first - last).abs().mean() > 1.0
    assert video.frames.shape[-2] * video.frames.shape[-1] <= 16 * 28 * 28


def test_real_video_truncated_to_1kb_raises_media_error(real_video: Path, tmp_path: Path):
    bad = tmp_path / "truncated.mp4"
    bad.write_bytes(real_video.read_bytes()[:1024])
    with pytest.raises(MediaError) as info:
        load_video(bad, FrameSettings())
    assert info.value.path == str(bad)


# ---------------------------------------------------------------------------------------------- round trip


def test_write_video_round_trip_keeps_colours_and_count(coloured_video: Path):
    video = load_video(coloured_video, FrameSettings(nframes=8))
    assert video.frames.shape == (8, 3, 56, 56)
    assert video.frame_indices == list(range(8))
    assert video.total_frames == 8 and video.source_fps == pytest.approx(4.0)
    assert video.duration == pytest.approx(2.0)
    means = video.frames.float().mean(dim=(2, 3)).numpy()
    np.testing.assert_allclose(means, np.array(COLOURS, dtype=np.float32), atol=3)


def test_write_video_lossy_mode_is_close(tmp_path: Path):
    frames = np.zeros((4, 56, 56, 3), np.uint8)
    frames[...] = (200, 40, 90)
    path = tmp_path / "lossy.mp4"
    write_video(path, frames, fps=2.0, lossless=False)
    video = load_video(path, FrameSettings(nframes=4))
    np.testing.assert_allclose(video.frames.float().mean(dim=(0, 2, 3)).numpy(), [200, 40, 90], atol=6)


def test_write_video_rejects_odd_sizes(tmp_path: Path):
    with pytest.raises(ValueError, match="even"):
        write_video(tmp_path / "odd.mp4", np.zeros((2, 55, 56, 3), np.uint8), fps=2.0)


def test_one_frame_video_gives_multiple_of_frame_factor(tmp_path: Path):
    path = tmp_path / "one.mp4"
    write_video(path, np.full((1, 56, 56, 3), 100, np.uint8), fps=4.0)
    video = load_video(path, FrameSettings(frame_rule="fit"))
    assert video.frames.shape[0] == 2
    assert video.frame_indices == [0, 0]
    assert video.total_frames == 1
    with pytest.raises(MediaError, match="the video has 1 frame"):  # the default, qwen-vl-utils' rule, refuses it
        load_video(path, FrameSettings())


def test_overstated_frame_count_is_corrected_by_decoding(
    coloured_video: Path, monkeypatch: pytest.MonkeyPatch
):
    real_probe = video_module._probe

    def lying_probe(p):
        _total, fps, _duration, w, h = real_probe(p)
        return 40, fps, None, w, h  # container claims 40 frames, the file has 8

    monkeypatch.setattr(video_module, "_probe", lying_probe)
    video = load_video(coloured_video, FrameSettings(fps=4.0))
    assert video.total_frames == 8 and video.frame_indices == list(range(8))
    assert video.duration == pytest.approx(2.0)


def test_mkv_without_frame_count_is_counted_by_decoding(tmp_path: Path):
    path = tmp_path / "count.mkv"
    write_video(path, np.zeros((6, 28, 28, 3), np.uint8), fps=3.0)
    video = load_video(path, FrameSettings(nframes=6))
    assert video.total_frames == 6 and video.frame_indices == list(range(6))


# ---------------------------------------------------------------------------------------------- errors


def test_missing_file_raises_media_error(tmp_path: Path):
    with pytest.raises(MediaError, match="does not exist") as info:
        load_video(tmp_path / "nope.mp4", FrameSettings())
    assert info.value.reason == "file does not exist"
    assert "nope.mp4" in str(info.value)


def test_zero_byte_file_raises_media_error(tmp_path: Path):
    empty = tmp_path / "empty.mp4"
    empty.touch()
    with pytest.raises(MediaError, match="empty"):
        load_video(empty, FrameSettings())


def test_text_file_named_mp4_raises_media_error(tmp_path: Path):
    fake = tmp_path / "fake.mp4"
    fake.write_text("this is not a video\n" * 20)
    with pytest.raises(MediaError, match="cannot open"):
        load_video(fake, FrameSettings())


def test_image_given_to_load_video_raises_media_error(tmp_path: Path):
    for name in ("still.png", "still.jpg"):
        img = tmp_path / name
        Image.new("RGB", (64, 48), (10, 20, 30)).save(img)
        with pytest.raises(MediaError, match="still image"):
            load_video(img, FrameSettings())


def test_video_given_to_load_image_raises_media_error(coloured_video: Path):
    with pytest.raises(MediaError, match="is a video"):
        load_image(coloured_video, FrameSettings())


def test_corrupt_image_raises_media_error(tmp_path: Path):
    img = tmp_path / "img.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(img)
    bad = tmp_path / "bad.png"
    bad.write_bytes(img.read_bytes()[:60])
    with pytest.raises(MediaError):
        load_image(bad, FrameSettings())
    with pytest.raises(MediaError, match="does not exist"):
        load_image(tmp_path / "missing.png", FrameSettings())


def test_media_error_pickles_and_names_path_reason_and_action():
    import pickle

    err = pickle.loads(pickle.dumps(MediaError("/x/a.mp4", "file is empty (0 bytes)")))
    assert err.path == "/x/a.mp4" and err.reason == "file is empty (0 bytes)"
    assert "/x/a.mp4" in str(err) and "empty" in str(err) and "re-create" in str(err)


# ---------------------------------------------------------------------------------------------- image


def test_load_image_resizes_to_smart_resize_and_rgb(tmp_path: Path):
    img = tmp_path / "rgba.png"
    Image.new("RGBA", (640, 360), (255, 0, 0, 0)).save(img)
    out = load_image(img, FrameSettings(image_max_pixels=128 * 28 * 28))
    assert out.mode == "RGB" and out.size == (420, 224)
    assert out.getpixel((10, 10)) == (255, 255, 255)  # transparent -> white
    small = tmp_path / "small.jpg"
    Image.new("RGB", (10, 10), (0, 0, 200)).save(small)
    assert load_image(small, FrameSettings()).size == (56, 56)


# ---------------------------------------------------------------------------------------------- cache


def test_frame_cache_returns_same_object_and_decodes_once(
    coloured_video: Path, monkeypatch: pytest.MonkeyPatch
):
    calls: list[Path] = []
    real_load = video_module.load_video

    def counting_load(path, settings) -> Video:
        calls.append(Path(path))
        return real_load(path, settings)

    monkeypatch.setattr(video_module, "load_video", counting_load)
    cache = FrameCache(capacity=2)
    settings = FrameSettings(nframes=4)
    first = cache.get_or_load(coloured_video, settings)
    second = cache.get_or_load(str(coloured_video), FrameSettings(nframes=4))
    assert first is second and len(calls) == 1
    assert cache.hits == 1 and cache.misses == 1
    other = cache.get_or_load(coloured_video, FrameSettings(nframes=8))
    assert other is not first and len(calls) == 2


def test_frame_cache_evicts_least_recently_used(
    tmp_path: Path, coloured_video: Path, monkeypatch: pytest.MonkeyPatch
):
    copies = []
    for i in range(3):
        dst = tmp_path / f"c{i}.mp4"
        shutil.copy(coloured_video, dst)
        copies.append(dst)
    calls: list[str] = []
    real_load = video_module.load_video
    monkeypatch.setattr(video_module, "load_video", lambda p, s: calls.append(str(p)) or real_load(p, s))
    cache = FrameCache(capacity=2)
    s = FrameSettings(nframes=2)
    cache.get_or_load(copies[0], s)
    cache.get_or_load(copies[1], s)
    cache.get_or_load(copies[0], s)  # 0 is now most recent
    cache.get_or_load(copies[2], s)  # evicts 1
    assert len(cache) == 2 and len(calls) == 3
    cache.get_or_load(copies[0], s)
    assert len(calls) == 3
    cache.get_or_load(copies[1], s)
    assert len(calls) == 4


def test_frame_cache_concurrent_requests_decode_once(coloured_video: Path, monkeypatch: pytest.MonkeyPatch):
    calls: list[int] = []
    real_load = video_module.load_video
    monkeypatch.setattr(video_module, "load_video", lambda p, s: calls.append(1) or real_load(p, s))
    cache = FrameCache(capacity=4)
    results: list[Video] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(cache.get_or_load(coloured_video, FrameSettings(nframes=2)))
        )
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 4 and all(r is results[0] for r in results)


# ---------------------------------------------------------------------------------------------- long videos


@pytest.fixture(scope="module")
def long_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1,000 frames, each with its own pattern (x264's key frames every 250 frames by default)."""
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(1000, 16, 24, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("long") / "long.mp4"
    write_video(path, frames, fps=25.0, lossless=False)
    return path


def _sequential(path: Path, wanted: set[int]) -> dict[int, np.ndarray]:
    kept, _ = video_module._decode(path, wanted)  # no frame count: always in order
    return kept


@pytest.mark.parametrize("wanted", [{3, 420, 421, 999}, {0, 310, 620, 930}, {640, 998}])
def test_seeking_over_long_gaps_gives_the_frames_decoding_in_order_gives(long_video: Path, wanted, monkeypatch):
    seeks = []
    real_seek = video_module._decode_seeking
    monkeypatch.setattr(video_module, "_decode_seeking", lambda *a: seeks.append(a) or real_seek(*a))
    kept, count = video_module._decode(long_video, wanted, total=1000)
    assert seeks and real_seek(long_video, sorted(wanted), 1000) is not None  # the seeking path answered
    expected = _sequential(long_video, wanted)
    assert sorted(kept) == sorted(expected) and count == max(wanted) + 1
    for i in wanted:
        np.testing.assert_array_equal(kept[i], expected[i])


def test_seeking_on_the_real_video_gives_the_same_frames(real_video: Path):
    wanted = [5, 330, 331, 480]
    kept = video_module._decode_seeking(real_video, wanted, 491)
    assert kept is not None
    expected = _sequential(real_video, set(wanted))
    for i in wanted:
        np.testing.assert_array_equal(kept[i], expected[i])


def test_seeking_steps_aside_when_frame_identity_is_not_certain(long_video: Path):
    """A frame count that is not the stream's packet count: decode in order instead (None)."""
    assert video_module._decode_seeking(long_video, [0, 500], 999) is None
    assert video_module._decode_seeking(long_video, [0, 1000], 1000) is None
    # and load_video on the long file samples the same frames either way
    settings = FrameSettings(nframes=4, min_frames=2, max_frames=4, min_pixels=16 * 28, max_pixels=16 * 28 * 4)
    fast = load_video(long_video, settings)
    old_gap = video_module.SEEK_GAP_FRAMES
    try:
        video_module.SEEK_GAP_FRAMES = 10**9
        slow = load_video(long_video, settings)
    finally:
        video_module.SEEK_GAP_FRAMES = old_gap
    assert fast.frame_indices == slow.frame_indices and max(b - a for a, b in zip(fast.frame_indices, fast.frame_indices[1:])) > 300
    assert torch.equal(fast.frames, slow.frames)
