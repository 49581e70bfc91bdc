"""Video-R1-eval files (the Video-R1 schema) -> common-schema rows, with the breakdown fields each
benchmark's leaderboard needs derived where the file lacks them, and the join with official rows.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from video_ktr.evaluation.tasks.base import (
    ANSWER_RE,
    HOLMES_TYPES,
    MVBENCH_FOLDERS,
    PROBLEM_TYPES,
    SCHEMA_KEYS,
    TEMPCOMPASS_DIMS,
    VIDEOMMMU_R1_RANGES,
    VSI_DATASETS,
    build_row,
    check_letter,
    check_unique_uids,
    each_row,
    is_number,
    option_letters,
)
from video_ktr.evaluation.tasks.official import mmvu_discipline, videommmu_discipline, videommmu_subject

__all__ = ["join_official_meta"]


def load_video_r1(data: Any, file: Path, benchmark: str, display: str) -> list[dict]:
    rows = []
    for i, c, r in each_row(file, data, "Video-R1 schema rows"):
        problem = c.get(r, "problem", str, nonempty=True)
        ptype = c.get(r, "problem_type", str)
        if ptype not in PROBLEM_TYPES:
            raise c.fail("problem_type", f"{ptype!r} is not one of {', '.join(PROBLEM_TYPES)}")
        solution = c.get(r, "solution", str)
        m = ANSWER_RE.match(solution.strip())
        if not m or not m.group(1).strip():
            raise c.fail("solution", f"{solution!r} should be '<answer>X</answer>'")
        answer = m.group(1).strip()
        path = c.get(r, "path", str, nonempty=True)
        pid = r.get("problem_id", i + 1)
        if isinstance(pid, bool) or not isinstance(pid, (int, str)):
            raise c.fail("problem_id", f"expected int or str, got {type(pid).__name__}")
        data_type = r.get("data_type", "video")
        if data_type not in ("video", "image"):
            raise c.fail("data_type", f"{data_type!r} should be 'video' or 'image'")
        options = r.get("options")
        if ptype == "multiple choice":
            if options is None:
                raise c.fail("options", "a multiple choice row needs a list of 'A. text' options")
            options = c.str_list(r, "options")
            check_letter(c, "solution", answer, option_letters(c, options))
        elif options is not None:
            options = c.str_list(r, "options")
        if ptype in ("numerical", "regression") and not is_number(answer):
            raise c.fail("solution", f"{answer!r} is not a number ({ptype} row)")
        ds = r.get("data_source")
        meta = {k: v for k, v in r.items() if k not in SCHEMA_KEYS}
        rows.append(
            build_row(
                problem_id=pid,
                problem=problem,
                problem_type=ptype,
                options=options,
                answer=answer,
                path=path,
                data_source=ds if isinstance(ds, str) and ds else display,
                meta=meta,
                uid=f"{benchmark}:{pid}",
                data_type=data_type,
            )
        )
    check_unique_uids(file, rows)
    enrich = _ENRICHERS.get(benchmark)
    if enrich is not None:
        for row in rows:
            enrich(row)
    return rows


def _enrich_holmes(row: dict) -> None:
    meta = row["meta"]
    if "question_type" not in meta and meta.get("original_question_type") in HOLMES_TYPES:
        meta["question_type"] = meta["original_question_type"]
    meta.setdefault("video_id", Path(row["path"]).stem)


def _enrich_videomme(row: dict) -> None:
    meta = row["meta"]
    if "task_type" not in meta and isinstance(meta.get("original_question_type"), str):
        meta["task_type"] = meta["original_question_type"]


def _enrich_videommmu(row: dict) -> None:
    meta = row["meta"]
    stem = Path(row["path"]).stem
    if "/question_only/" in row["path"] and stem.endswith("_image"):
        stem = stem[: -len("_image")]
        meta["question_only"] = True
    meta.setdefault("id", stem)
    subject = videommmu_subject(stem)
    if subject and "subject" not in meta:
        meta["subject"] = subject
    discipline = videommmu_discipline(meta.get("subject", ""))
    if discipline and "discipline" not in meta:
        meta["discipline"] = discipline
    pid = row["problem_id"]
    if "track" not in meta and isinstance(pid, int):
        for track, lo, hi in VIDEOMMMU_R1_RANGES:
            if lo <= pid <= hi:
                meta["track"], meta["track_inferred"] = track, True  # from the problem_id range: verify


def _enrich_mmvu(row: dict) -> None:
    meta = row["meta"]
    subject = Path(row["path"]).parent.name
    if "subject" not in meta and mmvu_discipline(subject):
        meta["subject"] = subject
    discipline = mmvu_discipline(meta.get("subject", ""))
    if discipline and "discipline" not in meta:
        meta["discipline"] = discipline
    if "question_type" not in meta and isinstance(meta.get("original_question_type"), str):
        meta["question_type"] = meta["original_question_type"]


_MVBENCH_FOLDER_TO_TASK = {
    folder: task
    for task, folder in MVBENCH_FOLDERS.items()
    if list(MVBENCH_FOLDERS.values()).count(folder) == 1
}


def _enrich_mvbench(row: dict) -> None:
    meta = row["meta"]
    if "task" in meta:
        return
    if row["data_source"] in MVBENCH_FOLDERS:
        meta["task"] = row["data_source"]
        return
    for folder, task in _MVBENCH_FOLDER_TO_TASK.items():  # folders that hold exactly one task
        if f"/{folder}/" in row["path"]:
            meta["task"], meta["task_inferred"] = task, True


def _enrich_tempcompass(row: dict) -> None:
    meta = row["meta"]
    if "dim" not in meta and row["data_source"] in TEMPCOMPASS_DIMS:
        meta["dim"] = row["data_source"]
    meta.setdefault("video_id", Path(row["path"]).stem)


def _enrich_vsibench(row: dict) -> None:
    meta = row["meta"]
    p = Path(row["path"])
    if p.parent.name in VSI_DATASETS:
        meta.setdefault("dataset", p.parent.name)
        meta.setdefault("scene_name", p.stem)


_ENRICHERS: dict[str, Callable[[dict], None]] = {
    "videoholmes": _enrich_holmes,
    "videomme": _enrich_videomme,
    "videomme_sub": _enrich_videomme,
    "videommmu": _enrich_videommmu,
    "mmvu": _enrich_mmvu,
    "mvbench": _enrich_mvbench,
    "tempcompass": _enrich_tempcompass,
    "vsibench": _enrich_vsibench,
}


def _join_key(row: dict) -> tuple[str, str]:
    stem = Path(str(row["path"])).stem
    if stem.endswith("_image"):  # VideoMMMU question-only clip of <id>
        stem = stem[: -len("_image")]
    return stem, " ".join(str(row["problem"]).split())


def join_official_meta(rows: list[dict], official_rows: list[dict]) -> list[dict]:
    """Copy breakdown fields from official rows onto Video-R1-eval rows, matched by (video stem, problem).

    benchmarks.md: VSI-Bench, MVBench and TempCompass eval files lack question_type / task / dim, and
    VideoMMMU's track is only inferred. Official values overwrite inferred ones (the ``*_inferred`` flag is
    removed). Matched rows get ``meta["official_uid"]``; unmatched or ambiguous rows are returned unchanged.
    """
    index: dict[tuple[str, str], dict | None] = {}
    for off in official_rows:
        key = _join_key(off)
        index[key] = None if key in index else off  # ambiguous keys are not joined
    out = []
    for row in rows:
        new = dict(row, meta=dict(row.get("meta") or {}))
        off = index.get(_join_key(row))
        if off is not None:
            for k, v in off["meta"].items():
                if k == "path_candidates":
                    continue
                if k not in new["meta"] or new["meta"].pop(f"{k}_inferred", False):
                    new["meta"][k] = v
            new["meta"]["official_uid"] = off["uid"]
        out.append(new)
    return out
