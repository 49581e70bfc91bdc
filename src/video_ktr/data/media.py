"""Frame settings, frame sampling and resizing (qwen-vl-utils semantics), and loading images.

Videos are probed, decoded, written and cached in :mod:`video_ktr.data.video` with these rules.

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
    Both sides become multiples of ``factor``, the area is brought towards [min_pixels, max_pixels]
    and the aspect ratio kept as well as the grid allows.

The rule (``FrameSettings.frame_rule``, ``--frame_rule``)
    ``qwen-vl-utils`` (default): exactly qwen-vl-utils 0.0.14's ``smart_resize``, ``smart_nframes`` and
    per-frame maximum of ``fetch_video``, the code the published numbers used.  Its rounding can leave
    the bounds (when they are close together, as when many frames share ``total_pixels``); a side that
    rounds to 0 and a count below ``frame_factor`` (``nframes`` 1, a one-frame video) are refused, as
    there.  The per-frame maximum for T sampled frames is
    ``min(max_pixels, max(min(768 * factor**2, total / T * frame_factor), int(min_pixels * 1.05)))`` with
    ``total`` = ``total_pixels``, or qwen-vl-utils' default of 128000 x 0.9 tokens of ``factor**2`` pixels.
    ``fit`` (this project's earlier rule): the same where the reference stays inside the bounds; where
    it does not, the multiples of ``factor`` inside [min_pixels, max_pixels] with the closest aspect
    ratio; counts below ``frame_factor`` become ``frame_factor`` (frames padded by repeating the last);
    the per-frame maximum is ``min(max_pixels, max(min(max_pixels, total_pixels / T * frame_factor),
    min_pixels * 1.05))`` when ``total_pixels`` is set, else ``max_pixels``.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np
from PIL import Image, UnidentifiedImageError

FRAME_RULES = ("qwen-vl-utils", "fit")
# qwen-vl-utils 0.0.14 (vision_process.py): VIDEO_MAX_TOKEN_NUM and the default MODEL_SEQ_LEN of fetch_video
REFERENCE_VIDEO_MAX_TOKENS = 768
REFERENCE_SEQ_LEN = 128000

__all__ = ["FRAME_RULES", "FrameSettings", "IMAGE_FACTOR", "MediaError", "ceil_by_factor", "floor_by_factor", "load_image", "round_by_factor", "sample_indices", "smart_nframes", "smart_resize"]


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
    frame_rule: str = "qwen-vl-utils"  # how counts and sizes are computed: FRAME_RULES (module docstring)

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
        if self.frame_rule not in FRAME_RULES:
            raise bad("frame_rule", f"must be one of {', '.join(FRAME_RULES)}")
        if not (self.max_aspect_ratio >= 1):
            raise bad("max_aspect_ratio", "must be >= 1")

    def frame_max_pixels(self, nframes: int) -> int | float:
        """Per-frame pixel maximum for ``nframes`` sampled frames (the ``total_pixels`` rule of ``frame_rule``).

        Under qwen-vl-utils' rule the value may be fractional (``total / T * frame_factor``), as there.
        """
        if self.frame_rule == "qwen-vl-utils":
            area = self.factor * self.factor
            total = self.total_pixels if self.total_pixels is not None else REFERENCE_SEQ_LEN * area * 0.9
            cap = max(min(REFERENCE_VIDEO_MAX_TOKENS * area, total / nframes * self.frame_factor), int(self.min_pixels * 1.05))
            value = min(self.max_pixels, cap)
            return int(value) if float(value).is_integer() else value
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
    rule: str = "qwen-vl-utils",
) -> tuple[int, int]:
    """Target ``(height, width)``: both multiples of ``factor``, area in ``[min_pixels, max_pixels]``.

    As qwen-vl-utils: ``h = max(factor, round_by_factor(height))`` and likewise ``w``; if
    ``h * w > max_pixels`` then ``beta = sqrt(height * width / max_pixels)`` and
    ``h, w = floor_by_factor(height / beta), floor_by_factor(width / beta)`` (at least ``factor``);
    if ``h * w < min_pixels`` then ``beta = sqrt(min_pixels / (height * width))`` and
    ``h, w = ceil_by_factor(height * beta), ceil_by_factor(width * beta)``.
    ``rule`` "qwen-vl-utils" returns that as it is (it may leave the bounds) and refuses a side that
    rounds to 0. ``rule`` "fit": where the reference leaves the bounds (a side clamped to ``factor``, or
    bounds too close for the ceil step) the multiples of ``factor`` inside the bounds with the closest
    aspect ratio are used.
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
    if rule not in FRAME_RULES:
        raise ValueError(f"smart_resize: rule must be one of {', '.join(FRAME_RULES)}, got {rule!r}")
    h_bar = max(factor, round_by_factor(height, factor))
    w_bar = max(factor, round_by_factor(width, factor))
    if rule == "qwen-vl-utils":
        if h_bar * w_bar > max_pixels:
            beta = math.sqrt(height * width / max_pixels)
            h_bar, w_bar = floor_by_factor(height / beta, factor), floor_by_factor(width / beta, factor)
        elif h_bar * w_bar < min_pixels:
            beta = math.sqrt(min_pixels / (height * width))
            h_bar, w_bar = ceil_by_factor(height * beta, factor), ceil_by_factor(width * beta, factor)
        if h_bar < 1 or w_bar < 1:
            raise ValueError(
                f"smart_resize: qwen-vl-utils' rule gives {h_bar}x{w_bar} for {height}x{width} with max_pixels "
                f"{max_pixels} (a side rounds to 0); raise the pixel bounds or use --frame_rule fit"
            )
        return h_bar, w_bar
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
    reference = settings.frame_rule == "qwen-vl-utils"
    if total_frames < 1:
        raise ValueError(f"smart_nframes: total_frames must be >= 1, got {total_frames}")
    if total_frames < ff:
        if reference:
            raise ValueError(f"smart_nframes: the video has {total_frames} frame(s), fewer than {ff} (qwen-vl-utils "
                             "refuses it); --frame_rule fit pads it by repeating the last frame")
        return ff
    if settings.nframes is not None:
        n = round_by_factor(settings.nframes, ff)
        if reference and n < ff:
            raise ValueError(f"smart_nframes: nframes {settings.nframes} rounds to {n} frames (qwen-vl-utils refuses "
                             f"it; it needs {ff} <= nframes); ask for {ff} or more, or use --frame_rule fit")
        n = max(ff, n)
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
            rule=settings.frame_rule,
        )
    except ValueError as e:
        raise MediaError(p, str(e), "crop the image or raise FrameSettings.max_aspect_ratio") from e
    if (new_w, new_h) != rgb.size:
        rgb = rgb.resize((new_w, new_h), Image.Resampling.BICUBIC)
    return rgb
