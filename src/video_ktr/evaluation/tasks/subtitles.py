"""Video-MME with subtitles: the subtitle lines of the sampled frames go in the prompt (the published protocol).

Video-MME's release ships ``subtitle.zip`` with one ``<videoID>.srt`` per video that has speech (each text
line wrapped in ``<font color="white" size=".72c">...</font>``). Its "with subtitles" setting gives the
model, with the frames, the subtitles at the times of the frames it was given. As lmms-eval's
``videomme_w_subtitle`` task does, a cue belongs to a sampled frame ``i`` when
``int(start x fps) <= i < int(end x fps)`` (``fps`` the video's frame rate); here ``i`` runs over the frames
this evaluation actually sampled (``Video.frame_indices``), and the cues are listed in time order, each
once, with their markup removed. The prompt's question becomes::

    This video's subtitles are listed below:
    <the cues' text, one per line, or "No subtitles available">
    <the question>

The ``.srt`` is looked for under ``--media_root`` as ``subtitle/<videoID>.srt``, ``subtitles/<videoID>.srt``,
``<videoID>.srt`` and beside the video (same stem); a video without one gets "No subtitles available", as in
lmms-eval. A malformed file is a MediaError naming the file and the cue (the row fails, or stops the run
under --on_bad_sample error).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from video_ktr.data.media import MediaError

SUBTITLE_HEADER = "This video's subtitles are listed below:"
NO_SUBTITLES = "No subtitles available"
_TIME = re.compile(r"^\s*(\d+):(\d{1,2}):(\d{1,2})(?:[,.](\d{1,3}))?\s*$")
_TAG = re.compile(r"<[^>]*>")


@dataclass(frozen=True)
class Cue:
    number: int  # 1-based position in the file
    start: float  # seconds
    end: float
    text: str


def _seconds(stamp: str) -> float | None:
    m = _TIME.match(stamp)
    if not m:
        return None
    h, mi, s, ms = m.groups()
    return int(h) * 3600 + int(mi) * 60 + int(s) + (int(ms.ljust(3, "0")) / 1000 if ms else 0.0)


def parse_srt(path: str | os.PathLike) -> list[Cue]:
    """The cues of an SRT file, in file order; markup (``<font ...>``, ``<i>``) removed, lines joined by a space."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise MediaError(path, f"subtitle file is not UTF-8 ({exc})", "convert it to UTF-8") from exc
    except OSError as exc:
        raise MediaError(path, f"subtitle file cannot be read ({exc})") from exc
    cues = []
    for number, block in enumerate(re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n").strip()), 1):
        lines = [line for line in block.split("\n") if line.strip()]
        timing = next((k for k, line in enumerate(lines[:2]) if "-->" in line), None)
        if timing is None:
            if not lines:
                continue
            raise MediaError(path, f"subtitle cue {number}: no 'start --> end' line", "check the .srt file")
        start_text, _, end_text = lines[timing].partition("-->")
        start, end = _seconds(start_text), _seconds(end_text.split()[0] if end_text.split() else "")
        if start is None or end is None:
            raise MediaError(path, f"subtitle cue {number}: bad time line {lines[timing]!r} (HH:MM:SS,mmm --> HH:MM:SS,mmm)",
                             "check the .srt file")
        words = " ".join(_TAG.sub("", line).strip() for line in lines[timing + 1:]).strip()
        if words:
            cues.append(Cue(number, start, end, " ".join(words.split())))
    return cues


def cues_at_frames(cues: list[Cue], frame_indices: list[int], fps: float) -> list[Cue]:
    """The cues shown at any of the frames ``frame_indices`` of a video at ``fps``: int(start*fps) <= i < int(end*fps)."""
    frames = sorted(set(int(i) for i in frame_indices))
    out = []
    for cue in sorted(cues, key=lambda c: (c.start, c.number)):
        lo, hi = int(cue.start * fps), int(cue.end * fps)
        if any(lo <= i < hi for i in frames):
            out.append(cue)
    return out


def subtitle_file(row: dict, media_root: str | os.PathLike, video_path: str | os.PathLike) -> Path | None:
    """The row's ``.srt`` (see the module docstring), or None."""
    root, video = Path(media_root), Path(video_path)
    vid = str((row.get("meta") or {}).get("videoID") or video.stem)
    for candidate in (root / "subtitle" / f"{vid}.srt", root / "subtitles" / f"{vid}.srt", root / f"{vid}.srt",
                      video.with_suffix(".srt")):
        if candidate.is_file():
            return candidate
    return None


def with_subtitles(row: dict, video: Any, video_path: str | os.PathLike, media_root: str | os.PathLike) -> dict:
    """A copy of ``row`` whose ``problem`` carries the subtitles of ``video``'s sampled frames.

    ``meta["subtitles"]`` records the file (or None), the cue numbers used and the question as it was.
    """
    srt = subtitle_file(row, media_root, video_path)
    cues = cues_at_frames(parse_srt(srt), video.frame_indices, video.source_fps) if srt is not None else []
    body = "\n".join(c.text for c in cues) if srt is not None else NO_SUBTITLES
    meta = dict(row.get("meta") or {})
    meta["subtitles"] = {"file": str(srt) if srt is not None else None, "cues": [c.number for c in cues],
                         "question": row["problem"]}
    return {**row, "problem": f"{SUBTITLE_HEADER}\n{body}\n{row['problem']}", "meta": meta}
