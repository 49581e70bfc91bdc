"""What every benchmark loader shares: the row schema's constants, the error that names file, row and field,
reading a file (JSON, JSONL, parquet) and the small validated accessors the loaders build rows with.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from video_ktr.utils.jsonl import JsonLineError, parse_json_lines

__all__ = ["BenchmarkDataError", "detect_format"]

MISSING = "(missing)"  # breakdown bucket for rows without the field: counted, never dropped

VIDEO_R1_KEYS = ("problem", "problem_type", "solution")
SCHEMA_KEYS = {
    "problem_id",
    "problem",
    "data_type",
    "problem_type",
    "options",
    "solution",
    "path",
    "data_source",
    "process",
}
PROBLEM_TYPES = ("multiple choice", "numerical", "regression", "free-form", "OCR")
MEDIA_EXTENSIONS = (".mp4", ".MP4", ".mkv", ".webm", ".avi")

HOLMES_TYPES = ("SR", "IMC", "TCI", "TA", "MHR", "PAR", "CTI")

VIDEOMME_DURATIONS = ("short", "medium", "long")

VIDEOMMMU_TRACKS = ("Perception", "Comprehension", "Adaptation")
# Video-R1-eval's eval_videommmu.json order (problem_id ranges), [I] in benchmarks.md §3.3.
VIDEOMMMU_R1_RANGES = (("Adaptation", 1, 300), ("Comprehension", 301, 600), ("Perception", 601, 900))
VIDEOMMMU_DISCIPLINES: dict[str, tuple[str, ...]] = {
    "Art and Design": ("Art", "Art_Theory", "Design", "Music"),
    "Business": ("Accounting", "Economics", "Finance", "Manage", "Marketing"),
    "Science": ("Biology", "Chemistry", "Geography", "Math", "Physics"),
    "Health and Medicine": (
        "Basic_Medical_Science",
        "Clinical_Medicine",
        "Diagnostics_and_Laboratory_Medicine",
        "Pharmacy",
        "Public_Health",
    ),
    "Humanities and Social Science": ("History", "Literature", "Sociology", "Psychology"),
    "Tech and Engineering": (
        "Agriculture",
        "Architecture_and_Engineering",
        "Computer_Science",
        "Electronics",
        "Energy_and_Power",
        "Materials",
        "Mechanical_Engineering",
    ),
}
# lmms-eval's cache folder per discipline
VIDEOMMMU_FOLDERS = {
    "Art and Design": "Art",
    "Business": "Business",
    "Science": "Science",
    "Health and Medicine": "Medicine",
    "Humanities and Social Science": "Humanities",
    "Tech and Engineering": "Engineering",
}

MMVU_DISCIPLINES: dict[str, tuple[str, ...]] = {
    "Science": (
        "Biology",
        "Chemistry",
        "Modern_Physics",
        "Astronomy",
        "Geography",
        "Materials_Science",
        "Neurobiology",
        "Electromagnetism",
        "Thermodynamics",
        "Mechanics",
    ),
    "Engineering": (
        "Civil_Engineering",
        "Electrical_Engineering",
        "Mechanical_Engineering",
        "Biomedical_Engineering",
        "Electronics_and_Communication",
        "Computer_Science",
    ),
    "Healthcare": ("Clinical_Medicine", "Basic_Medicine", "Preventive_Medicine", "Pharmacy", "Dentistry"),
    "Humanities_and_Social_Science": ("Art", "Literature", "History", "Law", "Economics", "Management"),
}

# VideoChat2 data_list: task -> video folder (benchmarks.md §6.1)
MVBENCH_FOLDERS = {
    "action_sequence": "star/Charades_v1_480",
    "action_prediction": "star/Charades_v1_480",
    "object_interaction": "star/Charades_v1_480",
    "action_antonym": "ssv2_video",
    "fine_grained_action": "Moments_in_Time_Raw/videos",
    "unexpected_action": "FunQA_test/test",
    "object_existence": "clevrer/video_validation",
    "moving_direction": "clevrer/video_validation",
    "moving_count": "clevrer/video_validation",
    "moving_attribute": "clevrer/video_validation",
    "counterfactual_inference": "clevrer/video_validation",
    "object_shuffle": "perception/videos",
    "action_count": "perception/videos",
    "state_change": "perception/videos",
    "character_order": "perception/videos",
    "action_localization": "sta/sta_video",
    "scene_transition": "scene_qa/video",
    "fine_grained_pose": "nturgbd",
    "egocentric_navigation": "vlnqa",
    "episodic_reasoning": "tvqa/frames_fps3_hq",
}
# lmms-eval folder names that hold the same (format-converted, not pre-cut) videos
MVBENCH_LMMS_FOLDERS = {"ssv2_video": "ssv2_video_mp4", "nturgbd": "nturgbd_convert"}

TEMPCOMPASS_DIMS = ("action", "speed", "direction", "order", "attribute_change")

VSI_MC_TYPES = (
    "object_rel_direction_easy",
    "object_rel_direction_medium",
    "object_rel_direction_hard",
    "object_rel_distance",
    "route_planning",
    "obj_appearance_order",
)
VSI_NA_TYPES = ("object_counting", "object_abs_distance", "object_size_estimation", "room_size_estimation")
VSI_DATASETS = ("arkitscenes", "scannet", "scannetpp")
# the 8 reported tasks (rel_direction's 3 levels averaged into one), official order
VSI_OFFICIAL_TASKS = (
    "obj_appearance_order",
    "object_abs_distance",
    "object_counting",
    "object_rel_distance",
    "object_size_estimation",
    "room_size_estimation",
    "route_planning",
    "object_rel_direction",
)
VSI_REL_DIRECTION = VSI_MC_TYPES[:3]

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_NUMBER_RE = re.compile(r"^[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:[eE][+-]?\d+)?$")
_OPTION_RE = re.compile(r"^([A-Z])\.\s?(.*)$", re.DOTALL)
ANSWER_RE = re.compile(r"^<answer>(.*)</answer>$", re.DOTALL)
IMAGE_PLACEHOLDER_RE = re.compile(r"<image \d+>")


class BenchmarkDataError(ValueError):
    """A problem in a benchmark file, naming the file, the row and the field."""

    def __init__(self, file: str | os.PathLike, row: int | str | None, field: str | None, message: str):
        self.file, self.row, self.field = str(file), row, field
        where = str(file)
        if row is not None:
            where += f", row {row}"
        if field is not None:
            where += f", field '{field}'"
        super().__init__(f"{where}: {message}")


# --------------------------------------------------------------------------------------------------
# reading files


def read_file(path: Path) -> Any:
    """JSON, JSONL (``*.jsonl``) or parquet (needs pyarrow). ``*.rows.json`` is plain JSON."""
    if not path.is_file():
        raise FileNotFoundError(f"benchmark file not found: {path}")
    name = path.name.lower()
    if name.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(
                f"{path}: reading .parquet needs pyarrow: `pip install pyarrow` "
                "(or export the table to JSON rows and pass that file)"
            ) from None
        return pq.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8")
    if name.endswith(".jsonl"):
        try:
            return parse_json_lines(text)
        except JsonLineError as exc:
            raise BenchmarkDataError(path, exc.lineno, None, str(exc)) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise BenchmarkDataError(
            path, None, None, f"not valid JSON at line {exc.lineno} column {exc.colno} ({exc.msg})"
        ) from None


def is_video_r1(data: Any) -> bool:
    return (
        isinstance(data, list)
        and bool(data)
        and isinstance(data[0], dict)
        and all(k in data[0] for k in VIDEO_R1_KEYS)
    )


def detect_format(path: str | os.PathLike) -> str:
    """``"video_r1"`` if the file's rows carry problem/problem_type/solution, else ``"official"``.

    A directory is always official (VideoMMMU tracks, MVBench ``json/``). Which official schema is
    meant is decided by the benchmark's loader, which validates it field by field.
    """
    p = Path(path)
    if p.is_dir():
        return "official"
    return "video_r1" if is_video_r1(read_file(p)) else "official"


# --------------------------------------------------------------------------------------------------
# small validated accessors


class Ctx:
    """Where we are (file, row) so each check can raise an error naming the field."""

    def __init__(self, file: Path | str, row: int | str | None = None):
        self.file, self.row = file, row

    def at(self, row: int | str) -> Ctx:
        return Ctx(self.file, row)

    def fail(self, field: str | None, message: str) -> BenchmarkDataError:
        return BenchmarkDataError(self.file, self.row, field, message)

    def row_dict(self, obj: Any) -> dict:
        if not isinstance(obj, dict):
            raise self.fail(None, f"expected an object (dict), got {type(obj).__name__}")
        return obj

    def get(self, row: dict, key: str, types: type | tuple[type, ...], *, nonempty: bool = False) -> Any:
        if key not in row:
            raise self.fail(key, f"missing (row keys: {sorted(row)})")
        value = row[key]
        if isinstance(value, bool) or not isinstance(value, types):
            want = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
            raise self.fail(key, f"expected {want}, got {type(value).__name__} {value!r}")
        if nonempty and isinstance(value, str) and not value.strip():
            raise self.fail(key, "is empty")
        return value

    def str_list(self, row: dict, key: str) -> list[str]:
        value = self.get(row, key, list)
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise self.fail(key, f"item {i} should be a string, got {type(item).__name__}")
        return value


def is_number(text: str) -> bool:
    t = text.strip()
    return bool(t) and any(c.isdigit() for c in t) and bool(_NUMBER_RE.match(t))


def letter_options(texts: list[str]) -> list[str]:
    return [f"{LETTERS[i]}. {t}" for i, t in enumerate(texts)]


def option_letters(ctx: Ctx, options: list[str], field: str = "options") -> list[str]:
    """Check options read "A. text", "B. text", ... in order and return their letters."""
    letters = []
    for i, opt in enumerate(options):
        m = _OPTION_RE.match(opt)
        if not m or m.group(1) != LETTERS[i]:
            raise ctx.fail(field, f"option {i} {opt!r} should start with '{LETTERS[i]}. '")
        letters.append(m.group(1))
    return letters


def check_letter(ctx: Ctx, field: str, answer: str, letters: Iterable[str]) -> str:
    letters = list(letters)
    if answer not in letters:
        span = f"{letters[0]}-{letters[-1]}" if letters else "none"
        raise ctx.fail(field, f"answer {answer!r} is not one of the option letters ({span})")
    return answer


def build_row(
    *,
    problem_id: int,
    problem: str,
    problem_type: str,
    options: list[str] | None,
    answer: str,
    path: str,
    data_source: str,
    meta: dict,
    uid: str,
    data_type: str = "video",
) -> dict:
    return {
        "problem_id": problem_id,
        "problem": problem,
        "data_type": data_type,
        "problem_type": problem_type,
        "options": options,
        "solution": f"<answer>{answer}</answer>",
        "path": path,
        "data_source": data_source,
        "meta": meta,
        "uid": uid,
    }


def each_row(file: Path, data: Any, what: str) -> Iterator[tuple[int, Ctx, dict]]:
    """(position, row context, row) for every row of a list-shaped file; a non-list or a non-object row is a
    BenchmarkDataError naming the file and row."""
    ctx = Ctx(file)
    for i, raw in enumerate(as_list(ctx, data, what)):
        c = ctx.at(i)
        yield i, c, c.row_dict(raw)


def check_unique_uids(file: Path, rows: list[dict]) -> list[dict]:
    seen: dict[str, int] = {}
    for i, r in enumerate(rows):
        if r["uid"] in seen:
            raise BenchmarkDataError(file, i, None, f"duplicate key {r['uid']!r} (also row {seen[r['uid']]})")
        seen[r["uid"]] = i
    return rows


def as_list(ctx: Ctx, data: Any, what: str) -> list:
    if not isinstance(data, list):
        raise ctx.fail(None, f"expected a JSON list of rows ({what}), got {type(data).__name__}")
    if not data:
        raise ctx.fail(None, "the file holds no rows")
    return data
