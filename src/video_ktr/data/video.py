"""Videos: probing and decoding the sampled frames (in order, or by seeking in a long video), writing a
video, and the thread-safe cache of decoded videos. Frame counts and sizes follow :mod:`video_ktr.data.media`.
"""

from __future__ import annotations

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
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from video_ktr.data.media import (
    FrameSettings,
    MediaError,
    _check_file,
    _is_image_container,
    sample_indices,
    smart_nframes,
    smart_resize,
)

__all__ = ["FrameCache", "Video", "load_video", "write_video"]


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
            rule=settings.frame_rule,
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
