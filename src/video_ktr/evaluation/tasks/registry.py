"""The benchmark registry (name, aliases, breakdowns, loaders), :func:`load_benchmark`, and where a row's
media file lies under ``--media_root``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from video_ktr.evaluation.tasks.base import (
    MEDIA_EXTENSIONS,
    VIDEO_R1_KEYS,
    BenchmarkDataError,
    is_video_r1,
    read_file,
)
from video_ktr.evaluation.tasks.official import (
    load_holmes,
    load_mmvu,
    load_mvbench_dir,
    load_mvbench_file,
    load_tempcompass,
    load_videomme,
    load_videommmu,
    load_videommmu_dir,
    load_vsibench,
)
from video_ktr.evaluation.tasks.video_r1 import load_video_r1


def mark_subtitled(rows: list[dict]) -> list[dict]:
    """Video-MME rows that take the subtitles of their sampled frames (tasks/subtitles.py; engine.load_batch)."""
    for row in rows:
        row["meta"]["with_subtitles"] = True
        row["uid"] = "videomme_sub:" + row["uid"].split(":", 1)[-1]
    return rows


def load_videomme_sub(data: Any, file: Path) -> list[dict]:
    return mark_subtitled(load_videomme(data, file))

__all__ = [
    "BENCHMARKS",
    "BenchmarkSpec",
    "get_benchmark",
    "load_benchmark",
    "media_candidates",
    "resolve_media",
]


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str
    display_name: str
    aliases: tuple[str, ...]
    breakdowns: tuple[tuple[str, str], ...]  # (metrics key, meta field)
    load_official: Callable[[Any, Path], list[dict]] | None
    load_dir: Callable[[Path], list[dict]] | None = None
    description: str = ""


BENCHMARKS: dict[str, BenchmarkSpec] = {
    s.name: s
    for s in (
        BenchmarkSpec(
            "videoholmes",
            "Video-Holmes",
            ("holmes",),
            (("by_question_type", "question_type"),),
            load_holmes,
            description="test_Video-Holmes.json (list; 'video ID', 'Options' A-F)",
        ),
        BenchmarkSpec(
            "videomme",
            "Video-MME",
            (),
            (
                ("by_duration", "duration"),
                ("by_domain", "domain"),
                ("by_task_type", "task_type"),
                ("by_sub_category", "sub_category"),
            ),
            load_videomme,
            description="videomme/test-00000-of-00001.parquet (rows; no subtitles)",
        ),
        BenchmarkSpec(
            "videomme_sub",
            "Video-MME (w/ subs)",
            ("videomme_w_subtitle", "videomme_subtitles", "videommewsub", "videomme_with_subtitles"),
            (
                ("by_duration", "duration"),
                ("by_domain", "domain"),
                ("by_task_type", "task_type"),
                ("by_sub_category", "sub_category"),
            ),
            load_videomme_sub,
            description="the Video-MME rows, with subtitle/<videoID>.srt under --media_root (subtitle.zip): the "
                        "subtitles of the sampled frames go in the prompt",
        ),
        BenchmarkSpec(
            "videommmu",
            "VideoMMMU",
            (),
            (("by_track", "track"), ("by_discipline", "discipline"), ("by_subject", "subject")),
            load_videommmu,
            load_videommmu_dir,
            description="<Track>/test-*.parquet, data/*_video.json, or a folder with all tracks",
        ),
        BenchmarkSpec(
            "mmvu",
            "MMVU",
            ("mmvumc", "mmvuval"),
            (
                ("by_discipline", "discipline"),
                ("by_subject", "subject"),
                ("by_question_type", "question_type"),
            ),
            load_mmvu,
            description="validation.json",
        ),
        BenchmarkSpec(
            "mvbench",
            "MVBench",
            (),
            (("by_task", "task"),),
            load_mvbench_file,
            load_mvbench_dir,
            description="json/<task>.json, or the json/ folder",
        ),
        BenchmarkSpec(
            "tempcompass",
            "TempCompass",
            (),
            (("by_dim", "dim"), ("by_task_type", "task_type")),
            load_tempcompass,
            description="questions/{multi-choice,yes_no}.json or lmms-lab rows",
        ),
        BenchmarkSpec(
            "vsibench",
            "VSI-Bench",
            ("vsi",),
            (("by_question_type", "question_type"),),
            load_vsibench,
            description="test-00000-of-00001.parquet or test.jsonl",
        ),
        BenchmarkSpec(
            "video_r1",
            "Video-R1",
            ("videor1eval", "generic"),
            (("by_data_source", "data_source"),),
            None,
            description="any file in the Video-R1 schema (synthetic test set, eval_*.json)",
        ),
    )
}


def _norm_name(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_ALIASES = {_norm_name(a): s.name for s in BENCHMARKS.values() for a in (s.name, s.display_name, *s.aliases)}


def get_benchmark(name: str) -> BenchmarkSpec:
    """Look a benchmark up by name or alias, case- and punctuation-insensitively ("Video-Holmes")."""
    key = _norm_name(str(name))
    if key in _ALIASES:
        return BENCHMARKS[_ALIASES[key]]
    raise ValueError(f"unknown benchmark {name!r}; valid names: {', '.join(BENCHMARKS)}")


def load_benchmark(name: str, data_file: str | os.PathLike) -> list[dict]:
    """Load an official annotation file (or folder) or a Video-R1-schema file into common-schema rows.

    Raises FileNotFoundError for a missing file, BenchmarkDataError (a ValueError) naming the file, row
    and field for any schema problem, ImportError for parquet without pyarrow.
    """
    spec = get_benchmark(name)
    path = Path(data_file)
    if path.is_dir():
        if spec.load_dir is None:
            raise ValueError(f"{path}: {spec.name} expects a file, not a folder ({spec.description})")
        return spec.load_dir(path)
    data = read_file(path)
    if is_video_r1(data):
        rows = load_video_r1(data, path, spec.name, spec.display_name)
        return mark_subtitled(rows) if spec.name == "videomme_sub" else rows
    if spec.load_official is None:
        raise BenchmarkDataError(
            path,
            0 if isinstance(data, list) else None,
            None,
            f"not a Video-R1-schema file (rows need {', '.join(VIDEO_R1_KEYS)}); "
            f"for an official file pass its benchmark name ({', '.join(BENCHMARKS)})",
        )
    return spec.load_official(data, path)


# --------------------------------------------------------------------------------------------------
# media


def _path_variants(path: str) -> list[str]:
    out = [path]
    prefix = "./Evaluation/"
    if path.startswith(prefix):
        rest = path[len(prefix) :]
        out.append("./" + rest)
        if "/" in rest:
            out.append("./" + rest.split("/", 1)[1])
    return out


def media_candidates(row: dict, media_root: str | os.PathLike) -> list[Path]:
    """Every file :func:`resolve_media` would try, in order (see the module docstring)."""
    root = Path(media_root)
    rels = _path_variants(str(row["path"]))
    for alt in (row.get("meta") or {}).get("path_candidates", []):
        rels.extend(_path_variants(alt))
    out: list[Path] = []
    for rel in rels:
        p = Path(rel)
        base = p if p.is_absolute() else root / (rel[2:] if rel.startswith("./") else rel)
        for cand in (base, *(base.with_suffix(ext) for ext in MEDIA_EXTENSIONS)):
            if cand not in out:
                out.append(cand)
    return out


def resolve_media(row: dict, media_root: str | os.PathLike) -> Path:
    """The first existing candidate of :func:`media_candidates` (a frame folder counts too).

    Raises FileNotFoundError listing what was tried.
    """
    cands = media_candidates(row, media_root)
    for cand in cands:
        if cand.exists():
            return cand
    shown = "\n  ".join(str(c) for c in cands[:12])
    raise FileNotFoundError(
        f"media for {row.get('uid', row.get('problem_id'))} not found under {media_root}; tried:\n  {shown}\n"
        "point --media_root at the folder the benchmark's videos were unpacked to"
    )
