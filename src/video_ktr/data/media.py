"""Decoding, frame sampling and resizing of videos and images, with qwen-vl-utils semantics.

Every size is a setting (:class:`FrameSettings`); nothing here hard-codes the released numbers.

Sampling (``smart_nframes`` + ``sample_indices``)
    fps mode:    n = total_frames / video_fps * fps, clamped to
                 [ceil_by_factor(min_frames), floor_by_factor(min(max_frames, total_frames))],
                 then floored to a multiple of ``frame_factor``.
    nframes mode: n = round_by_factor(nframes, frame_factor) (at least ``frame_factor``).
    The result must lie in [frame_factor, total_frames].  The single exception is a video with
    fewer than ``frame_factor`` frames (e.g. a one-frame video): it gives exactly ``frame_factor``
    frames, padded by repeating the last source frame, as qwen-vl-utils does.
    Indices are uniform: ``round(linspace(0, total_frames - 1, n))``.

Resizing (``smart_resize``)
    Both sides become multiples of ``factor`` and the area lands in [min_pixels, max_pixels]
    while the aspect ratio is kept as well as the grid allows.  For videos the per-frame maximum is
    ``min(max_pixels, max(min(max_pixels, total_pixels / T * frame_factor), min_pixels * 1.05))``
    when ``total_pixels`` is set (T = number of sampled frames), else ``max_pixels``.

Time
    ``Video.duration`` is ``total_frames / source_fps`` (the quantity the fps rule uses), so
    ``Video.sampled_fps == T / duration == len(frame_indices) / total_frames * source_fps``, the
    same number transformers derives from ``Video.metadata()``.  Always pass that metadata to the
    processor: without it the processor assumes 24 fps and flattens temporal positions.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

__all__ = [
    "IMAGE_FACTOR",
    "FrameCache",
    "FrameSettings",
    "MediaError",
    "Video",
    "ceil_by_factor",
    "floor_by_factor",
    "load_image",
    "load_video",
    "round_by_factor",
    "sample_indices",
    "smart_nframes",
    "smart_resize",
    "write_video",
]

IMAGE_FACTOR = 28  # default resize factor (patch 14 x merge 2); a setting too, passed as `factor`

# FFmpeg demuxers that hold a still image rather than a video.
_IMAGE_DEMUXERS = {"image2", "image2pipe", "apng"}
_IMAGE_CODECS = {"png", "mjpeg", "bmp", "webp", "tiff", "jpeg2000", "ppm", "pgm", "pam", "qoi", "sgi", "dds"}

_DEFAULT_HINT = (
    "check that the file exists and is a complete file FFmpeg/Pillow can decode "
    "(e.g. `ffprobe FILE`), then re-create it or drop the row from the data set"
)


class MediaError(Exception):
    """A media file that cannot be used. ``.path`` is the file, ``.reason`` what is wrong with it."""

    def __init__(self, path: str | os.PathLike, reason: str, hint: str | None = None) -> None:
        super().__init__(path, reason, hint)
        self.path = str(path)
        self.reason = reason
        self.hint = hint or _DEFAULT_HINT

    def __str__(self) -> str:
        return f"cannot use media file {self.path!r}: {self.reason}; {self.hint}"


# --------------------------------------------------------------------------------------------------
# Settings


@dataclass
class FrameSettings:
    """How videos are sampled and how videos and images are resized (qwen-vl-utils semantics)."""

    fps: float = 2.0  # frames sampled per second of video when nframes is None
    nframes: int | None = None  # exact frame count (rounded to a multiple of frame_factor), overrides fps
    min_frames: int = 4
    max_frames: int = 16  # Video-KTR training used 16
    frame_factor: int = 2  # frame count is a multiple of this (temporal_patch_size)
    min_pixels: int = 4 * 28 * 28  # per video frame
    max_pixels: int = 128 * 28 * 28  # per video frame (Video-KTR training)
    # optional cap over all frames: per-frame max becomes
    # max(min(max_pixels, total_pixels / nframes * frame_factor), min_pixels * 1.05), never above max_pixels
    total_pixels: int | None = None
    image_min_pixels: int = 4 * 28 * 28
    image_max_pixels: int = 256 * 28 * 28
    factor: int = 28  # sides rounded to multiples of this
    max_aspect_ratio: float = 200.0

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field for values that cannot work."""

        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"FrameSettings.{name}={getattr(self, name)!r} is invalid: {why}")

        if not isinstance(self.factor, int) or self.factor < 1:
            raise bad("factor", "must be an integer >= 1")
        if not isinstance(self.frame_factor, int) or self.frame_factor < 1:
            raise bad("frame_factor", "must be an integer >= 1")
        if not (isinstance(self.fps, (int, float)) and math.isfinite(self.fps) and self.fps > 0):
            raise bad("fps", "must be a finite number > 0")
        if self.nframes is not None and (not isinstance(self.nframes, int) or self.nframes < 1):
            raise bad("nframes", "must be None or an integer >= 1")
        if not isinstance(self.min_frames, int) or self.min_frames < 1:
            raise bad("min_frames", "must be an integer >= 1")
        if not isinstance(self.max_frames, int) or self.max_frames < self.frame_factor:
            raise bad("max_frames", f"must be an integer >= frame_factor ({self.frame_factor})")
        if self.max_frames < self.min_frames:
            raise bad("max_frames", f"must be >= min_frames ({self.min_frames})")
        area = self.factor * self.factor
        for lo, hi in (("min_pixels", "max_pixels"), ("image_min_pixels", "image_max_pixels")):
            if getattr(self, lo) < 1:
                raise bad(lo, "must be >= 1")
            if getattr(self, hi) < area:
                raise bad(hi, f"must be >= factor * factor ({area}) so one patch fits")
            if getattr(self, hi) < getattr(self, lo):
                raise bad(hi, f"must be >= {lo} ({getattr(self, lo)})")
        if self.total_pixels is not None and self.total_pixels < 1:
            raise bad("total_pixels", "must be None or >= 1")
        if not (self.max_aspect_ratio >= 1):
            raise bad("max_aspect_ratio", "must be >= 1")

    def frame_max_pixels(self, nframes: int) -> int:
        """Per-frame pixel maximum for ``nframes`` sampled frames (applies the ``total_pixels`` rule)."""
        if self.total_pixels is None:
            return int(self.max_pixels)
        capped = max(
            min(self.max_pixels, self.total_pixels / nframes * self.frame_factor), self.min_pixels * 1.05
        )
        return int(min(self.max_pixels, capped))

    def key(self) -> tuple:
        """A hashable identity of these settings (used by :class:`FrameCache`)."""
        return dataclasses.astuple(self)


# --------------------------------------------------------------------------------------------------
# Arithmetic


def round_by_factor(n: float, factor: int) -> int:
    """The multiple of ``factor`` closest to ``n``: ``round(n / factor) * factor`` (ties to even)."""
    return round(n / factor) * factor


def ceil_by_factor(n: float, factor: int) -> int:
    """The smallest multiple of ``factor`` >= ``n``: ``ceil(n / factor) * factor``."""
    return math.ceil(n / factor) * factor


def floor_by_factor(n: float, factor: int) -> int:
    """The largest multiple of ``factor`` <= ``n``: ``floor(n / factor) * factor``."""
    return math.floor(n / factor) * factor


def smart_resize(
    height: int,
    width: int,
    factor: int = IMAGE_FACTOR,
    min_pixels: int = 4 * 28 * 28,
    max_pixels: int = 128 * 28 * 28,
    max_aspect_ratio: float = 200.0,
) -> tuple[int, int]:
    """Target ``(height, width)``: both multiples of ``factor``, area in ``[min_pixels, max_pixels]``.

    As qwen-vl-utils: ``h = max(factor, round_by_factor(height))`` and likewise ``w``; if
    ``h * w > max_pixels`` then ``beta = sqrt(height * width / max_pixels)`` and
    ``h, w = floor_by_factor(height / beta), floor_by_factor(width / beta)`` (at least ``factor``);
    if ``h * w < min_pixels`` then ``beta = sqrt(min_pixels / (height * width))`` and
    ``h, w = ceil_by_factor(height * beta), ceil_by_factor(width * beta)``.
    Where that rule leaves the bounds (a side clamped to ``factor``, or bounds too close for the
    ceil step) the multiples of ``factor`` inside the bounds with the closest aspect ratio are used.
    Raises ``ValueError`` when ``max(h, w) / min(h, w) > max_aspect_ratio`` or no size fits.
    """
    if height < 1 or width < 1:
        raise ValueError(f"smart_resize: height and width must be >= 1, got {height}x{width}")
    if factor < 1 or min_pixels < 1 or max_pixels < max(min_pixels, factor * factor):
        raise ValueError(
            f"smart_resize: need factor >= 1 and max_pixels >= max(min_pixels, factor**2); got "
            f"factor={factor}, min_pixels={min_pixels}, max_pixels={max_pixels}"
        )
    ratio = max(height, width) / min(height, width)
    if ratio > max_aspect_ratio:
        raise ValueError(
            f"smart_resize: aspect ratio {ratio:.1f} of {height}x{width} exceeds max_aspect_ratio={max_aspect_ratio}"
        )
    h_bar = max(factor, round_by_factor(height, factor))
    w_bar = max(factor, round_by_factor(width, factor))
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, floor_by_factor(height / beta, factor))
        w_bar = max(factor, floor_by_factor(width / beta, factor))
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = ceil_by_factor(height * beta, factor)
        w_bar = ceil_by_factor(width * beta, factor)
    if min_pixels <= h_bar * w_bar <= max_pixels:
        return h_bar, w_bar
    return _closest_fitting_size(height, width, factor, min_pixels, max_pixels)


def _closest_fitting_size(
    height: int, width: int, factor: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """Fallback of :func:`smart_resize`: best aspect among grid sizes inside the bounds."""
    target = math.log(width / height)
    best: tuple[float, float, int, int] | None = None
    for h in range(factor, max_pixels // factor + 1, factor):
        w_lo = max(factor, ceil_by_factor(min_pixels / h, factor))
        w_hi = floor_by_factor(max_pixels / h, factor)
        if w_lo > w_hi:
            continue
        w = min(max(round_by_factor(h * width / height, factor), w_lo), w_hi)
        score = (abs(math.log(w / h) - target), abs(h * w - height * width))
        if best is None or score < best[:2]:
            best = (*score, h, w)
    if best is None:
        raise ValueError(
            f"smart_resize: no size with sides multiple of {factor} has area in [{min_pixels}, {max_pixels}]"
        )
    return best[2], best[3]


def smart_nframes(total_frames: int, video_fps: float, settings: FrameSettings) -> int:
    """Number of frames to sample, a multiple of ``settings.frame_factor``.

    nframes mode (``settings.nframes`` set): ``max(frame_factor, round_by_factor(nframes, frame_factor))``.
    fps mode: ``total_frames / video_fps * fps`` clamped to
    ``[ceil_by_factor(min_frames, ff), floor_by_factor(min(max_frames, total_frames), ff)]``, then
    ``floor_by_factor(., ff)``.  The result must lie in ``[ff, total_frames]`` (else ``ValueError``),
    except that a video with ``total_frames < ff`` (e.g. one frame) gives ``ff``: its frames are then
    padded by repeating the last one (see :func:`sample_indices`).
    """
    settings.validate()
    ff = settings.frame_factor
    if total_frames < 1:
        raise ValueError(f"smart_nframes: total_frames must be >= 1, got {total_frames}")
    if total_frames < ff:
        return ff
    if settings.nframes is not None:
        n = max(ff, round_by_factor(settings.nframes, ff))
    else:
        if not (video_fps > 0 and math.isfinite(video_fps)):
            raise ValueError(f"smart_nframes: video_fps must be > 0 in fps mode, got {video_fps}")
        min_frames = ceil_by_factor(settings.min_frames, ff)
        max_frames = floor_by_factor(min(settings.max_frames, total_frames), ff)
        n = total_frames / video_fps * settings.fps
        n = min(max(n, min_frames), max_frames, total_frames)
        n = floor_by_factor(n, ff)
    if not ff <= n <= total_frames:
        raise ValueError(
            f"smart_nframes: {n} frames requested but the video has {total_frames} "
            f"(need {ff} <= nframes <= total_frames); lower FrameSettings.nframes or use fps mode"
        )
    return int(n)


def sample_indices(total_frames: int, nframes: int) -> list[int]:
    """Uniform frame indices: ``round(linspace(0, total_frames - 1, nframes))`` (round half to even).

    If ``nframes > total_frames`` (only for videos shorter than ``frame_factor``) the indices are
    ``0 .. total_frames - 1`` followed by the last index repeated until there are ``nframes``.
    """
    if total_frames < 1 or nframes < 1:
        raise ValueError(
            f"sample_indices: need total_frames >= 1 and nframes >= 1, got {total_frames}, {nframes}"
        )
    if nframes > total_frames:
        return list(range(total_frames)) + [total_frames - 1] * (nframes - total_frames)
    return [int(i) for i in np.linspace(0, total_frames - 1, nframes).round()]


# --------------------------------------------------------------------------------------------------
# Video


@dataclass
class Video:
    """Sampled, resized frames of one video and where they came from."""

    frames: torch.Tensor  # uint8, (T, 3, H, W), already resized, T multiple of frame_factor
    frame_indices: list[int]  # indices into the source video
    source_fps: float
    total_frames: int  # frames in the source
    duration: float  # seconds (total_frames / source_fps)
    source_width: int = 0
    source_height: int = 0

    @property
    def sampled_fps(self) -> float:
        """Rate the sampled frames represent: ``T / duration`` (``source_fps`` if duration is 0)."""
        if self.duration <= 0:
            return float(self.source_fps)
        return self.frames.shape[0] / self.duration

    def metadata(self) -> dict[str, Any]:
        """``video_metadata`` for transformers' processors (width/height: the source size, as there)."""
        return {
            "total_num_frames": int(self.total_frames),
            "fps": float(self.source_fps),
            "frames_indices": list(self.frame_indices),
            "duration": float(self.duration),
            "width": int(self.source_width or self.frames.shape[-1]),
            "height": int(self.source_height or self.frames.shape[-2]),
        }


def _check_file(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise MediaError(p, "file does not exist", "check the media root and the row's `path`")
    if not p.is_file():
        raise MediaError(p, "is not a regular file", "point the row's `path` at a media file")
    if p.stat().st_size == 0:
        raise MediaError(p, "file is empty (0 bytes)", "re-create or re-download it")
    return p


def _is_image_container(container: Any) -> bool:
    names = set(container.format.name.split(","))
    if names & _IMAGE_DEMUXERS or any(n.endswith("_pipe") for n in names):
        return True
    streams = container.streams.video
    codec = getattr(streams[0], "codec_context", None) if streams else None
    if codec is None:  # a damaged container: no decoder for its stream
        return False
    return codec.name in _IMAGE_CODECS and (streams[0].frames or 0) <= 1


def _stream_fps(stream: Any) -> float | None:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate is not None and rate > 0:
            return float(rate)
    return None


def _probe(p: Path) -> tuple[int | None, float | None, float | None, int, int]:
    """(frames from metadata, fps, duration from metadata, width, height); raises MediaError."""
    try:
        container = av.open(str(p))
    except (av.FFmpegError, OSError, ValueError) as e:
        raise MediaError(p, f"FFmpeg cannot open it as a video ({e})") from e
    with container:
        if _is_image_container(container):
            raise MediaError(
                p, "is a still image, not a video", "load it with load_image (data_type 'image')"
            )
        if not container.streams.video:
            raise MediaError(p, "has no video stream", "give a file with a video track")
        stream = container.streams.video[0]
        frames = int(stream.frames or 0) or None
        duration = None
        if stream.duration and stream.time_base:
            duration = float(stream.duration * stream.time_base)
        elif container.duration:
            duration = container.duration / av.time_base
        cc = stream.codec_context
        return frames, _stream_fps(stream), duration, int(cc.width or 0), int(cc.height or 0)


SEEK_GAP_FRAMES = 300  # seek, instead of decoding through, when the next sampled frame is this far ahead


def _rgb(frame: Any, size: tuple[int, int]) -> np.ndarray:
    if (frame.width, frame.height) != size:
        return frame.to_ndarray(format="rgb24", width=size[0], height=size[1])
    return frame.to_ndarray(format="rgb24")


def _decode_seeking(p: Path, wanted: list[int], total: int) -> dict[int, np.ndarray] | None:
    """The frames at the sorted indices ``wanted`` of a long video, seeking over the long gaps.

    Frame k is the k-th frame in display order, as the sequential decode counts them: its presentation
    timestamp is the k-th smallest packet timestamp of the stream (read by demuxing, without decoding).
    Far-apart frames are reached by seeking to the key frame before them and decoding forward to that
    timestamp; near ones by decoding on. Returns None (the caller decodes sequentially) whenever that
    identity cannot be trusted: a packet without a timestamp, a packet count that is not ``total``, a first
    decoded frame that is not the first packet's, a seek that lands after its target, or a target
    timestamp that never comes out of the decoder.
    """
    with av.open(str(p)) as container:
        stream = container.streams.video[0]
        stamps = []
        for packet in container.demux(stream):
            if packet.size == 0:  # the demuxer's flush packet
                continue
            if packet.pts is None:
                return None
            stamps.append(int(packet.pts))
        stamps.sort()
        if len(stamps) != total or len(set(stamps)) != total or wanted[-1] >= total:
            return None
        stream.thread_type = "AUTO"
        # the in-order decode must start at the first packet's frame (a stream cut inside a group of
        # pictures can drop its leading frames, and then the counts would shift): check it
        container.seek(stamps[0], stream=stream, backward=True, any_frame=False)
        first = next(iter(container.decode(stream)), None)
        if first is None or first.pts != stamps[0]:
            return None
        kept: dict[int, np.ndarray] = {}
        size: tuple[int, int] | None = None
        frames = None
        position = -1  # index of the last frame taken from ``frames``
        for target in wanted:
            goal = stamps[target]
            if frames is None or target - position > SEEK_GAP_FRAMES:
                container.seek(goal, stream=stream, backward=True, any_frame=False)
                frames = container.decode(stream)
                position = -1
                fresh = True
            else:
                fresh = False
            for frame in frames:
                if frame.pts is None:
                    return None
                if fresh and frame.pts > goal:
                    return None  # the seek landed after the frame
                fresh = False
                if frame.pts == goal:
                    size = size or (frame.width, frame.height)
                    kept[target] = _rgb(frame, size)
                    position = target
                    break
                if frame.pts > goal:
                    return None
            else:
                return None  # the stream ended first
    return kept


def _decode(p: Path, wanted: set[int], total: int | None = None) -> tuple[dict[int, np.ndarray], int]:
    """Decode in order, keep RGB arrays of ``wanted`` indices; stop after the last wanted one.

    Returns the kept arrays and the number of frames decoded (the true frame count when the stream
    ended before ``max(wanted)``; pass an empty set to count every frame).

    With ``total`` (the stream's frame count) and sampled frames more than SEEK_GAP_FRAMES apart (a long
    video), the frames are reached by seeking (_decode_seeking: the same frames, identified by their
    timestamps); anything that makes that unsafe falls back to decoding in order.
    """
    order = sorted(wanted)
    if total and order and max(b - a for a, b in zip([-1, *order], order)) > SEEK_GAP_FRAMES:
        try:
            kept = _decode_seeking(p, order, total)
        except (av.FFmpegError, OSError, ValueError):
            kept = None  # decoding in order below gives the real error, if there is one
        if kept is not None:
            return kept, order[-1] + 1
    last = max(wanted) if wanted else None
    kept: dict[int, np.ndarray] = {}
    count = 0
    size: tuple[int, int] | None = None
    try:
        with av.open(str(p)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                if count in wanted:
                    size = size or (frame.width, frame.height)
                    kept[count] = _rgb(frame, size)
                count += 1
                if last is not None and count > last:
                    break
    except (av.FFmpegError, OSError, ValueError) as e:
        raise MediaError(p, f"decoding failed after {count} frames ({e}); the file is corrupt") from e
    return kept, count


def load_video(path: str | os.PathLike, settings: FrameSettings) -> Video:
    """Decode, sample and resize a video (anything FFmpeg reads).

    Frame count, fps and duration come from the container when present and consistent; otherwise
    frames are counted by decoding.  Decoding is sequential and stops after the last sampled index.
    Frames are resized with torchvision (bicubic, antialias) to ``smart_resize`` of the source size
    with bounds ``[min_pixels, settings.frame_max_pixels(T)]``.
    Raises :class:`MediaError` for missing, empty, unreadable, corrupt, zero-frame or image files.
    """
    settings.validate()
    p = _check_file(path)
    total, fps, meta_duration, src_w, src_h = _probe(p)
    if total is not None and fps is not None and meta_duration:
        expected = meta_duration * fps
        if abs(total - expected) > max(2.0, 0.05 * expected):
            total = None  # container metadata disagree: count instead
    if total is None:
        total = _decode(p, set())[1]
    if total == 0:
        raise MediaError(p, "contains no decodable video frames", "re-encode or drop it")
    if fps is None:
        if not meta_duration:
            raise MediaError(p, "has neither a frame rate nor a duration", "re-encode it with a frame rate")
        fps = total / meta_duration

    for _attempt in range(2):
        try:
            n = smart_nframes(total, fps, settings)
        except ValueError as e:
            raise MediaError(p, str(e), "adjust FrameSettings for this video") from e
        indices = sample_indices(total, n)
        kept, decoded = _decode(p, set(indices), total)
        if decoded > max(indices):
            break
        if decoded == 0:
            raise MediaError(p, "contains no decodable video frames", "re-encode or drop it")
        total = decoded  # the container over-stated the frame count; sample again from the true count
    else:  # pragma: no cover - a second shortfall would mean the file changed while reading
        raise MediaError(p, "frame count changed between two decodes")

    array = np.stack([kept[i] for i in indices])  # (T, H, W, 3)
    frames = torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()
    h, w = frames.shape[-2:]
    src_w, src_h = src_w or w, src_h or h
    try:
        new_h, new_w = smart_resize(
            h,
            w,
            factor=settings.factor,
            min_pixels=settings.min_pixels,
            max_pixels=settings.frame_max_pixels(len(indices)),
            max_aspect_ratio=settings.max_aspect_ratio,
        )
    except ValueError as e:
        raise MediaError(p, str(e), "crop the video or raise FrameSettings.max_aspect_ratio") from e
    if (new_h, new_w) != (h, w):
        frames = TF.resize(frames, [new_h, new_w], interpolation=InterpolationMode.BICUBIC, antialias=True)
    return Video(
        frames=frames,
        frame_indices=indices,
        source_fps=float(fps),
        total_frames=int(total),
        duration=total / fps,
        source_width=src_w,
        source_height=src_h,
    )


# --------------------------------------------------------------------------------------------------
# Image


def _looks_like_video(p: Path) -> bool:
    try:
        with av.open(str(p)) as container:
            return bool(container.streams.video) and not _is_image_container(container)
    except (av.FFmpegError, OSError, ValueError):
        return False


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB; transparent pixels become white (as qwen-vl-utils)."""
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return im.convert("RGB")


def load_image(path: str | os.PathLike, settings: FrameSettings) -> Image.Image:
    """RGB image resized (bicubic) to ``smart_resize`` with ``image_min_pixels``/``image_max_pixels``.

    Raises :class:`MediaError` for missing, empty, corrupt files and for videos.
    """
    settings.validate()
    p = _check_file(path)
    try:
        with Image.open(p) as im:
            im.load()
            rgb = _to_rgb(im)
    except UnidentifiedImageError as e:
        if _looks_like_video(p):
            raise MediaError(
                p, "is a video, not an image", "load it with load_video (data_type 'video')"
            ) from e
        raise MediaError(p, "Pillow cannot identify it as an image") from e
    except Image.DecompressionBombError as e:  # not an OSError: it escaped as a crash before
        raise MediaError(p, f"image is too large to decode safely ({e})", "downscale it or drop the row") from e
    except (OSError, ValueError, SyntaxError) as e:
        raise MediaError(p, f"image is corrupt or truncated ({e})") from e
    try:
        new_h, new_w = smart_resize(
            rgb.height,
            rgb.width,
            factor=settings.factor,
            min_pixels=settings.image_min_pixels,
            max_pixels=settings.image_max_pixels,
            max_aspect_ratio=settings.max_aspect_ratio,
        )
    except ValueError as e:
        raise MediaError(p, str(e), "crop the image or raise FrameSettings.max_aspect_ratio") from e
    if (new_w, new_h) != rgb.size:
        rgb = rgb.resize((new_w, new_h), Image.Resampling.BICUBIC)
    return rgb


# --------------------------------------------------------------------------------------------------
# Writing


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float, *, lossless: bool = True) -> None:
    """Write uint8 frames ``(T, H, W, 3)`` (RGB, H and W even) as H.264 at ``fps``.

    lossless=True: ``libx264rgb`` with ``crf 0`` (RGB, bit-exact for flat colours); if that encoder
    is missing, ``libx264`` ``yuv444p`` ``qp 0`` (within a few units).  lossless=False: ``libx264``
    ``yuv420p`` ``crf 18``.  The container follows the extension (.mp4, .mkv, ...).  The file is
    written next to ``path`` and renamed into place, so a crash never leaves a partial file.
    """
    arr = np.asarray(frames)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[0] < 1:
        raise ValueError(f"write_video: need uint8 frames of shape (T, H, W, 3), got {arr.dtype} {arr.shape}")
    t, h, w, _ = arr.shape
    if h % 2 or w % 2:
        raise ValueError(f"write_video: height and width must be even, got {h}x{w}")
    if not (fps > 0 and math.isfinite(fps)):
        raise ValueError(f"write_video: fps must be > 0, got {fps}")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.partial{out.suffix}")
    rate = Fraction(fps).limit_denominator(1001)
    if lossless:
        choices = [("libx264rgb", "rgb24", {"crf": "0"}), ("libx264", "yuv444p", {"qp": "0"})]
    else:
        choices = [("libx264", "yuv420p", {"crf": "18"})]
    usable = [c for c in choices if c[0] in av.codecs_available]
    if not usable:
        raise ValueError(f"write_video: this FFmpeg build has none of the encoders {[c[0] for c in choices]}")
    codec, pix_fmt, options = usable[0]
    try:
        try:
            container = av.open(str(tmp), mode="w")
        except (av.FFmpegError, OSError, ValueError) as e:
            raise ValueError(f"write_video: cannot create {out} ({e})") from e
        with container:
            stream = container.add_stream(codec, rate=rate)
            stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
            stream.options = {"preset": "veryfast", **options}
            for k in range(t):
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(arr[k]), format="rgb24")
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


# --------------------------------------------------------------------------------------------------
# Cache


class FrameCache:
    """Thread-safe LRU cache of decoded :class:`Video` objects.

    Keyed by ``(realpath, mtime_ns, size, settings)``, so an edited file or other settings decode
    again.  Concurrent requests for the same key decode once.  ``capacity`` counts videos.  The
    cached tensors are shared: callers must not modify them in place.
    """

    def __init__(self, capacity: int = 16) -> None:
        if capacity < 1:
            raise ValueError(f"FrameCache: capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[tuple, Video] = OrderedDict()
        self._pending: dict[tuple, threading.Lock] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def _lookup(self, key: tuple) -> Video | None:
        video = self._items.get(key)
        if video is not None:
            self._items.move_to_end(key)
            self.hits += 1
        return video

    def get_or_load(self, path: str | os.PathLike, settings: FrameSettings) -> Video:
        """The cached video for ``(path, settings)``, decoding it with :func:`load_video` if needed."""
        p = _check_file(path)
        st = p.stat()
        key = (os.path.realpath(p), st.st_mtime_ns, st.st_size, settings.key())
        with self._lock:
            video = self._lookup(key)
            if video is not None:
                return video
            key_lock = self._pending.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                video = self._lookup(key)
                if video is not None:
                    return video
            try:
                video = load_video(p, settings)
            except BaseException:
                with self._lock:
                    self._pending.pop(key, None)
                raise
            with self._lock:
                self._pending.pop(key, None)
                self.misses += 1
                self._items[key] = video
                while len(self._items) > self.capacity:
                    self._items.popitem(last=False)
            return video
