"""Video reasoning benchmarks: official annotation files and Video-R1-eval files -> one row schema,
and metrics with the breakdowns each leaderboard reports.

Every loader returns plain dicts in the Video-R1 training schema plus two keys::

    {"problem_id": int, "problem": str, "data_type": "video",
     "problem_type": "multiple choice" | "numerical" | "regression" | "free-form",
     "options": ["A. text", ...] | None, "solution": "<answer>X</answer>",
     "path": "./videos/x.mp4", "data_source": str,
     "meta": {breakdown fields, ids, ...}, "uid": "videoholmes:zzFAKEhol01:1"}

``uid`` is stable across runs of the same file (used to resume an evaluation). ``problem_id`` of an
official file is the 1-based position in load order.

Media paths and ``--media_root``
--------------------------------
Point the media root at the benchmark's *own* folder (the one the official release unpacks to).
``path`` is relative to it, Video-R1 style (``root + path[1:]``). Video-R1-eval paths start with
``./Evaluation/<Bench>/``; :func:`media_candidates` also tries them with ``./Evaluation/`` and with
``./Evaluation/<Bench>/`` removed, so one root serves both formats. For every candidate the extensions
``.mp4 .MP4 .mkv .webm .avi`` are tried too (Video-R1 converted everything to ``.mp4``).

==============  ==========================================  ===========================================
benchmark       ``path``                                    also tried (``meta["path_candidates"]``)
==============  ==========================================  ===========================================
videoholmes     ``./videos/{video ID}.mp4``                 ``./videos_cropped/…`` (lmms-eval unzip)
videomme        ``./data/{videoID}.mp4``                    ``./videos/…``, ``./{videoID}.mp4``
videommmu       ``./{Art|Business|Science|Medicine|``       ``./videos/{id}.mp4``, ``./{id}.mp4``;
                ``Humanities|Engineering}/{id}.mp4``        Adaptation: ``meta["question_only_path"]``
                (lmms-eval layout)                          = ``./question_only/{id}_image.mp4`` (never
                                                            substituted for the lecture video)
mmvu            ``./videos/{Subject_folder}/{n}.mp4``       ``./{Subject_folder}/{n}.mp4``
                (tail of the HF ``video`` URL)
mvbench         ``./{VideoChat2 folder}/{video}``, e.g.     ``./{task}/{video}``; lmms-eval's
                ``./star/Charades_v1_480/x.mp4`` (same as   ``ssv2_video_mp4``/``nturgbd_convert``.
                Video-R1-eval); unknown task:               Pre-cut ``*_segment`` folders are NOT tried
                ``./{task}/{video}``                        (the clip bounds would be applied twice)
tempcompass     ``./videos/{video_id}.mp4``                 ``./{video_id}.mp4``
vsibench        ``./{dataset}/{scene_name}.mp4``            —
==============  ==========================================  ===========================================

Conversion choices
------------------
* TempCompass yes/no questions become ``multiple choice`` rows with options ``["A. yes", "B. no"]`` so
  the same exact-letter scorer applies; ``meta["task_type"]`` records ``"yes_no"`` vs ``"multi-choice"``.
* VideoMMMU/MMVU open questions are ``numerical`` when the answer is a number, else ``free-form``.
  ``<image N>`` placeholders are removed from VideoMMMU questions (then stripped), as Video-R1-eval did.
* Video-R1-eval rows keep every extra key in ``meta`` (``process`` is dropped); breakdown fields that
  the file lacks are derived where the design says how, and flagged (``meta["track_inferred"]``, ...).
  VSI-Bench files carry no ``question_type``: use :func:`join_official_meta` with the official rows.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "BENCHMARKS",
    "BenchmarkDataError",
    "BenchmarkSpec",
    "compute_metrics",
    "detect_format",
    "format_table",
    "get_benchmark",
    "join_official_meta",
    "load_benchmark",
    "media_candidates",
    "resolve_media",
]

MISSING = "(missing)"  # breakdown bucket for rows without the field: counted, never dropped

VIDEO_R1_KEYS = ("problem", "problem_type", "solution")
_SCHEMA_KEYS = {
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
_VIDEOMMMU_R1_RANGES = (("Adaptation", 1, 300), ("Comprehension", 301, 600), ("Perception", 601, 900))
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
_MVBENCH_LMMS_FOLDERS = {"ssv2_video": "ssv2_video_mp4", "nturgbd": "nturgbd_convert"}

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
_VSI_REL_DIRECTION = VSI_MC_TYPES[:3]

_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_NUMBER_RE = re.compile(r"^[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:[eE][+-]?\d+)?$")
_OPTION_RE = re.compile(r"^([A-Z])\.\s?(.*)$", re.DOTALL)
_ANSWER_RE = re.compile(r"^<answer>(.*)</answer>$", re.DOTALL)
_IMAGE_PLACEHOLDER_RE = re.compile(r"<image \d+>")


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


def _read_file(path: Path) -> Any:
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
        rows = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise BenchmarkDataError(
                    path, lineno, None, f"line {lineno} is not valid JSON ({exc.msg})"
                ) from None
        return rows
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise BenchmarkDataError(
            path, None, None, f"not valid JSON at line {exc.lineno} column {exc.colno} ({exc.msg})"
        ) from None


def _is_video_r1(data: Any) -> bool:
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
    return "video_r1" if _is_video_r1(_read_file(p)) else "official"


# --------------------------------------------------------------------------------------------------
# small validated accessors


class _Ctx:
    """Where we are (file, row) so each check can raise an error naming the field."""

    def __init__(self, file: Path | str, row: int | str | None = None):
        self.file, self.row = file, row

    def at(self, row: int | str) -> _Ctx:
        return _Ctx(self.file, row)

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


def _is_number(text: str) -> bool:
    t = text.strip()
    return bool(t) and any(c.isdigit() for c in t) and bool(_NUMBER_RE.match(t))


def _letter_options(texts: list[str]) -> list[str]:
    return [f"{_LETTERS[i]}. {t}" for i, t in enumerate(texts)]


def _option_letters(ctx: _Ctx, options: list[str], field: str = "options") -> list[str]:
    """Check options read "A. text", "B. text", ... in order and return their letters."""
    letters = []
    for i, opt in enumerate(options):
        m = _OPTION_RE.match(opt)
        if not m or m.group(1) != _LETTERS[i]:
            raise ctx.fail(field, f"option {i} {opt!r} should start with '{_LETTERS[i]}. '")
        letters.append(m.group(1))
    return letters


def _check_letter(ctx: _Ctx, field: str, answer: str, letters: Iterable[str]) -> str:
    letters = list(letters)
    if answer not in letters:
        span = f"{letters[0]}-{letters[-1]}" if letters else "none"
        raise ctx.fail(field, f"answer {answer!r} is not one of the option letters ({span})")
    return answer


def _row(
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


def _check_unique_uids(file: Path, rows: list[dict]) -> list[dict]:
    seen: dict[str, int] = {}
    for i, r in enumerate(rows):
        if r["uid"] in seen:
            raise BenchmarkDataError(file, i, None, f"duplicate key {r['uid']!r} (also row {seen[r['uid']]})")
        seen[r["uid"]] = i
    return rows


def _as_list(ctx: _Ctx, data: Any, what: str) -> list:
    if not isinstance(data, list):
        raise ctx.fail(None, f"expected a JSON list of rows ({what}), got {type(data).__name__}")
    if not data:
        raise ctx.fail(None, "the file holds no rows")
    return data


# --------------------------------------------------------------------------------------------------
# official loaders (each: (data, file) -> rows)


def _load_holmes(data: Any, file: Path) -> list[dict]:
    ctx = _Ctx(file)
    rows = []
    for i, raw in enumerate(_as_list(ctx, data, "test_Video-Holmes.json")):
        c = ctx.at(i)
        r = c.row_dict(raw)
        vid = c.get(r, "video ID", str, nonempty=True)
        qid = c.get(r, "Question ID", (int, str))
        qtype = c.get(r, "Question Type", str)
        if qtype not in HOLMES_TYPES:
            raise c.fail("Question Type", f"{qtype!r} is not one of {', '.join(HOLMES_TYPES)}")
        question = c.get(r, "Question", str, nonempty=True)
        opts = c.get(r, "Options", dict)
        if not opts:
            raise c.fail("Options", "is empty")
        for k, v in opts.items():
            if not (isinstance(k, str) and len(k) == 1 and k in _LETTERS) or not isinstance(v, str):
                raise c.fail("Options", f"entry {k!r}: {v!r} should map a letter to a text")
        keys = sorted(opts)
        answer = _check_letter(c, "Answer", c.get(r, "Answer", str).strip(), keys)
        meta = {
            "question_type": qtype,
            "video_id": vid,
            "question_id": qid,
            "path_candidates": [f"./videos_cropped/{vid}.mp4"],
        }
        if isinstance(r.get("Explanation"), str):
            meta["explanation"] = r["Explanation"]
        rows.append(
            _row(
                problem_id=i + 1,
                problem=question,
                problem_type="multiple choice",
                options=[f"{k}. {opts[k]}" for k in keys],
                answer=answer,
                path=f"./videos/{vid}.mp4",
                data_source="Video-Holmes",
                meta=meta,
                uid=f"videoholmes:{vid}:{qid}",
            )
        )
    return _check_unique_uids(file, rows)


def _load_videomme(data: Any, file: Path) -> list[dict]:
    ctx = _Ctx(file)
    rows = []
    for i, raw in enumerate(_as_list(ctx, data, "Video-MME test parquet rows")):
        c = ctx.at(i)
        r = c.row_dict(raw)
        if "questions" in r and "videoID" not in r:
            raise c.fail(
                "questions",
                "this is the Video-MME results template (per-video rows with a 'questions' "
                "list and no 'videoID'); load videomme/test-00000-of-00001.parquet instead",
            )
        video_file = c.get(r, "videoID", str, nonempty=True)
        qid = c.get(r, "question_id", str, nonempty=True)
        meta: dict[str, Any] = {}
        for key in ("duration", "domain", "sub_category", "task_type"):
            meta[key] = c.get(r, key, str, nonempty=True)
        if meta["duration"] not in VIDEOMME_DURATIONS:
            raise c.fail("duration", f"{meta['duration']!r} is not one of {VIDEOMME_DURATIONS}")
        question = c.get(r, "question", str, nonempty=True)
        options = c.str_list(r, "options")
        letters = _option_letters(c, options)
        answer = _check_letter(c, "answer", c.get(r, "answer", str).strip(), letters)
        meta.update(
            video_id=r.get("video_id"),
            question_id=qid,
            videoID=video_file,
            url=r.get("url"),
            path_candidates=[f"./videos/{video_file}.mp4", f"./{video_file}.mp4"],
        )
        rows.append(
            _row(
                problem_id=i + 1,
                problem=question,
                problem_type="multiple choice",
                options=list(options),
                answer=answer,
                path=f"./data/{video_file}.mp4",
                data_source="Video-MME",
                meta=meta,
                uid=f"videomme:{qid}",
            )
        )
    return _check_unique_uids(file, rows)


def _videommmu_subject(vid: str) -> str:
    return "_".join(vid.split("_")[1:-1])


def _videommmu_discipline(subject: str) -> str | None:
    for discipline, subjects in VIDEOMMMU_DISCIPLINES.items():
        if subject in subjects:
            return discipline
    return None


def _videommmu_track_of(file: Path) -> str | None:
    for name in (file.parent.name, file.name.split(".")[0], file.name.split("_")[0]):
        for track in VIDEOMMMU_TRACKS:
            if name.lower() == track.lower():
                return track
    return None


def _videommmu_records(data: Any, file: Path) -> list[tuple[str, int | str, Any]]:
    """(track, row locator, raw row) from an HF track file (list) or a GitHub ``{"Track": {"0": row}}`` file."""
    ctx = _Ctx(file)
    if isinstance(data, dict):
        out = []
        for track, table in data.items():
            if track not in VIDEOMMMU_TRACKS:
                raise ctx.fail(
                    None, f"top-level key {track!r} is not a track ({', '.join(VIDEOMMMU_TRACKS)})"
                )
            if not isinstance(table, dict):
                raise ctx.fail(None, f"{track!r} should map row numbers to rows, got {type(table).__name__}")
            keys = sorted(table, key=lambda k: (0, int(k)) if str(k).isdigit() else (1, str(k)))
            out.extend((track, f"{track}/{k}", table[k]) for k in keys)
        if not out:
            raise ctx.fail(None, "the file holds no rows")
        return out
    track = _videommmu_track_of(file)
    if track is None:
        raise ctx.fail(
            None,
            "cannot tell the VideoMMMU track: keep the HF layout <Track>/test-00000-of-00001.parquet "
            f"(Track one of {', '.join(VIDEOMMMU_TRACKS)}) or pass the folder holding all three",
        )
    return [(track, i, r) for i, r in enumerate(_as_list(ctx, data, "VideoMMMU track rows"))]


def _convert_videommmu(
    records: list[tuple[str, int | str, Any]], file: Path, start_id: int = 1
) -> list[dict]:
    ctx = _Ctx(file)
    rows = []
    for n, (track, loc, raw) in enumerate(records):
        c = ctx.at(loc)
        r = c.row_dict(raw)
        vid = c.get(r, "id", str, nonempty=True)
        subject = _videommmu_subject(vid)
        discipline = _videommmu_discipline(subject)
        if discipline is None:
            raise c.fail(
                "id", f"subject {subject!r} (from id {vid!r}) is not in the VideoMMMU discipline map"
            )
        question = _IMAGE_PLACEHOLDER_RE.sub("", c.get(r, "question", str, nonempty=True)).strip()
        options = c.str_list(r, "options") if "options" in r else []
        answer = c.get(r, "answer", str).strip()
        qtype = r.get("question_type")
        if qtype is not None and qtype not in ("multiple-choice", "open"):
            raise c.fail("question_type", f"{qtype!r} should be 'multiple-choice', 'open' or null")
        meta: dict[str, Any] = {
            "track": track,
            "subject": subject,
            "discipline": discipline,
            "id": vid,
            "original_question_type": qtype,
        }
        if qtype is None:  # GitHub Perception/Comprehension rows and one Adaptation row carry none
            qtype = "multiple-choice" if options else "open"
            meta["question_type_inferred"] = True
        if qtype == "multiple-choice":
            if not options:
                raise c.fail("options", "a multiple-choice question has no options")
            _check_letter(c, "answer", answer, _LETTERS[: len(options)])
            problem_type, lettered = "multiple choice", _letter_options(options)
        else:
            if not answer:
                raise c.fail("answer", "is empty")
            problem_type, lettered = ("numerical" if _is_number(answer) else "free-form"), None
        folder = VIDEOMMMU_FOLDERS[discipline]
        meta["path_candidates"] = [f"./videos/{vid}.mp4", f"./{vid}.mp4"]
        if track == "Adaptation":
            meta["question_only_path"] = f"./question_only/{vid}_image.mp4"
        link = r.get("link_selected")
        rows.append(
            _row(
                problem_id=start_id + n,
                problem=question,
                problem_type=problem_type,
                options=lettered,
                answer=answer,
                path=f"./{folder}/{vid}.mp4",
                data_source=link if isinstance(link, str) and link else "VideoMMMU",
                meta=meta,
                uid=f"videommmu:{track}:{vid}",
            )
        )
    return rows


def _load_videommmu(data: Any, file: Path) -> list[dict]:
    return _check_unique_uids(file, _convert_videommmu(_videommmu_records(data, file), file))


def _load_videommmu_dir(folder: Path) -> list[dict]:
    """All tracks under an HF snapshot (<Track>/test-*.parquet[.rows.json]) or a GitHub ``data/`` folder."""
    records: list[tuple[str, int | str, Any, Path]] = []
    for track in ("Adaptation", "Comprehension", "Perception"):  # Video-R1-eval order
        hits = sorted((folder / track).glob("test-*.parquet.rows.json")) or sorted(
            (folder / track).glob("test-*.parquet")
        )
        if not hits:
            for cand in (
                folder / f"{track.lower()}_video.json",
                folder / "data" / f"{track.lower()}_video.json",
            ):
                if cand.is_file():
                    hits = [cand]
                    break
        for f in hits:
            records.extend((t, loc, r, f) for t, loc, r in _videommmu_records(_read_file(f), f))
    if not records:
        raise FileNotFoundError(
            f"{folder}: no VideoMMMU track files found (expected <Track>/test-00000-of-00001.parquet[.rows.json] "
            "or {adaptation,comprehension,perception}_video.json, optionally under data/)"
        )
    rows = []
    for t, loc, r, f in records:
        rows.extend(_convert_videommmu([(t, loc, r)], f, start_id=len(rows) + 1))
    return _check_unique_uids(folder, rows)


def _mmvu_discipline(subject: str) -> str | None:
    for discipline, subjects in MMVU_DISCIPLINES.items():
        if subject in subjects:
            return discipline
    return None


def _load_mmvu(data: Any, file: Path) -> list[dict]:
    ctx = _Ctx(file)
    rows = []
    for i, raw in enumerate(_as_list(ctx, data, "MMVU validation.json")):
        c = ctx.at(i)
        r = c.row_dict(raw)
        rid = c.get(r, "id", str, nonempty=True)
        video_key = "video" if "video" in r else "video_path"  # lmms-eval's HF copy has a relative video_path
        video = c.get(r, video_key, str, nonempty=True)
        parts = video.rstrip("/").split("/")
        if len(parts) < 2 or not parts[-1]:
            raise c.fail(video_key, f"{video!r} should end in <Subject>/<n>.mp4")
        subject, fname = parts[-2], parts[-1]
        discipline = _mmvu_discipline(subject)
        if discipline is None:
            raise c.fail(video_key, f"subject folder {subject!r} is not in the MMVU discipline map")
        qtype = c.get(r, "question_type", str)
        question = c.get(r, "question", str, nonempty=True)
        choices = c.get(r, "choices", dict)
        answer = c.get(r, "answer", str).strip()
        meta_in = r.get("metadata") if isinstance(r.get("metadata"), dict) else {}
        if qtype == "multiple-choice":
            keys = sorted(k for k, v in choices.items() if isinstance(v, str) and v.strip())
            if not keys:
                raise c.fail("choices", "a multiple-choice question has no non-empty choice")
            if any(k not in _LETTERS for k in keys):
                raise c.fail("choices", f"keys {keys} should be letters")
            _check_letter(c, "answer", answer, keys)
            problem_type, options = "multiple choice", [f"{k}. {choices[k]}" for k in keys]
        elif qtype == "open-ended":
            if not answer:
                raise c.fail("answer", "is empty")
            problem_type, options = ("numerical" if _is_number(answer) else "free-form"), None
        else:
            raise c.fail("question_type", f"{qtype!r} should be 'multiple-choice' or 'open-ended'")
        meta = {
            "subject": subject,
            "discipline": discipline,
            "question_type": qtype,
            "id": rid,
            "subject_name": meta_in.get("subject"),
            "path_candidates": [f"./{subject}/{fname}"],
        }
        rows.append(
            _row(
                problem_id=i + 1,
                problem=question,
                problem_type=problem_type,
                options=options,
                answer=answer,
                path=f"./videos/{subject}/{fname}",
                data_source=r.get("youtube_url") or "MMVU",
                meta=meta,
                uid=f"mmvu:{rid}",
            )
        )
    return _check_unique_uids(file, rows)


def _mvbench_paths(task: str, video: str) -> tuple[str, list[str]]:
    folder = MVBENCH_FOLDERS.get(task)
    if folder is None:
        return f"./{task}/{video}", []
    cands = [f"./{task}/{video}"]
    if folder in _MVBENCH_LMMS_FOLDERS:
        cands.append(f"./{_MVBENCH_LMMS_FOLDERS[folder]}/{video}")
    return f"./{folder}/{video}", cands


def _load_mvbench(data: Any, file: Path, start_id: int = 1) -> list[dict]:
    ctx = _Ctx(file)
    task = file.name.split(".")[0]
    rows = []
    for i, raw in enumerate(_as_list(ctx, data, "MVBench json/<task>.json")):
        c = ctx.at(i)
        r = c.row_dict(raw)
        video = c.get(r, "video", str, nonempty=True)
        question = c.get(r, "question", str, nonempty=True)
        candidates = c.str_list(r, "candidates")
        if not 2 <= len(candidates) <= len(_LETTERS):
            raise c.fail("candidates", f"expected at least 2 candidates, got {len(candidates)}")
        answer_text = c.get(r, "answer", str)
        if answer_text not in candidates:
            raise c.fail("answer", f"{answer_text!r} is not one of the candidates {candidates}")
        letter = _LETTERS[candidates.index(answer_text)]
        meta: dict[str, Any] = {"task": task, "video": video}
        if ("start" in r) != ("end" in r):
            raise c.fail("end" if "start" in r else "start", "clip bounds need both 'start' and 'end'")
        if "start" in r:
            start, end = c.get(r, "start", (int, float)), c.get(r, "end", (int, float))
            if end < start:
                raise c.fail("end", f"end {end} is before start {start}")
            meta.update(start=float(start), end=float(end))
        path, cands = _mvbench_paths(task, video)
        meta["path_candidates"] = cands
        rows.append(
            _row(
                problem_id=start_id + i,
                problem=question,
                problem_type="multiple choice",
                options=_letter_options(candidates),
                answer=letter,
                path=path,
                data_source=task,
                meta=meta,
                uid=f"mvbench:{task}:{i}",
            )
        )
    return rows


def _load_mvbench_file(data: Any, file: Path) -> list[dict]:
    return _check_unique_uids(file, _load_mvbench(data, file))


def _load_mvbench_dir(folder: Path) -> list[dict]:
    base = folder / "json" if (folder / "json").is_dir() else folder
    files = sorted(base.glob("*.json"))
    if not files:
        raise FileNotFoundError(f"{folder}: no MVBench json/<task>.json files found")
    rows: list[dict] = []
    for f in files:
        rows.extend(_load_mvbench(_read_file(f), f, start_id=len(rows) + 1))
    return _check_unique_uids(folder, rows)


def _tempcompass_mc(c: _Ctx, question: str, answer: str) -> tuple[str, list[str], str]:
    """Split "stem\\nA. x\\nB. y" into (stem, ["A. x", "B. y"]) and read the letter of "C. text"."""
    lines = question.split("\n")
    first = next((k for k, line in enumerate(lines) if line.startswith("A. ") or line == "A."), None)
    if first is None:
        raise c.fail("question", "no option lines ('A. ...') found in the question")
    stem = "\n".join(lines[:first]).strip()
    options = [line.strip() for line in lines[first:] if line.strip()]
    letters = _option_letters(c, options, field="question")
    m = re.match(r"^\(?([A-Z])(?:[.):]|$)", answer.strip())
    if not m:
        raise c.fail("answer", f"{answer!r} should start with an option letter ('C. text')")
    return stem, options, _check_letter(c, "answer", m.group(1), letters)


def _tempcompass_row(c: _Ctx, r: dict, video_id: str, dim: str, uid: str, problem_id: int) -> dict:
    question = c.get(r, "question", str, nonempty=True)
    answer = c.get(r, "answer", str, nonempty=True)
    if answer.strip().lower() in ("yes", "no"):
        task_type, stem, options = "yes_no", question.strip(), ["A. yes", "B. no"]
        letter = "A" if answer.strip().lower() == "yes" else "B"
    else:
        task_type = "multi-choice"
        stem, options, letter = _tempcompass_mc(c, question, answer)
    meta = {
        "dim": dim,
        "task_type": task_type,
        "video_id": video_id,
        "path_candidates": [f"./{video_id}.mp4"],
    }
    return _row(
        problem_id=problem_id,
        problem=stem,
        problem_type="multiple choice",
        options=options,
        answer=letter,
        path=f"./videos/{video_id}.mp4",
        data_source=dim,
        meta=meta,
        uid=f"tempcompass:{task_type}:{uid}",
    )


def _load_tempcompass(data: Any, file: Path) -> list[dict]:
    ctx = _Ctx(file)
    rows: list[dict] = []
    if isinstance(data, dict):  # questions/<task>.json: {video_id: {dim: [{question, answer}]}}
        for video_id, dims in data.items():
            if not isinstance(dims, dict):
                raise ctx.at(video_id).fail(None, f"expected {{dim: [questions]}}, got {type(dims).__name__}")
            for dim, items in dims.items():
                if not isinstance(items, list):
                    raise ctx.at(f"{video_id}/{dim}").fail(
                        None, f"expected a list of questions, got {type(items).__name__}"
                    )
                for k, raw in enumerate(items):
                    c = ctx.at(f"{video_id}/{dim}/{k}")
                    rows.append(
                        _tempcompass_row(
                            c, c.row_dict(raw), video_id, dim, f"{video_id}:{dim}:{k}", len(rows) + 1
                        )
                    )
        if not rows:
            raise ctx.fail(None, "the file holds no questions")
    else:  # lmms-lab/TempCompass flat rows
        for i, raw in enumerate(_as_list(ctx, data, "TempCompass rows")):
            c = ctx.at(i)
            r = c.row_dict(raw)
            video_id = str(c.get(r, "video_id", (str, int)))
            dim = c.get(r, "dim", str, nonempty=True)
            rows.append(_tempcompass_row(c, r, video_id, dim, f"{video_id}:{dim}:{i}", i + 1))
    return _check_unique_uids(file, rows)


def _load_vsibench(data: Any, file: Path) -> list[dict]:
    ctx = _Ctx(file)
    rows = []
    for i, raw in enumerate(_as_list(ctx, data, "VSI-Bench rows")):
        c = ctx.at(i)
        r = c.row_dict(raw)
        rid = c.get(r, "id", (int, str))
        dataset = c.get(r, "dataset", str, nonempty=True)
        scene = c.get(r, "scene_name", str, nonempty=True)
        qtype = c.get(r, "question_type", str, nonempty=True)
        question = c.get(r, "question", str, nonempty=True)
        gt = str(c.get(r, "ground_truth", (str, int, float))).strip()
        options = r.get("options")
        if options is not None:
            options = c.str_list(r, "options")
        if options:
            _check_letter(c, "ground_truth", gt, _option_letters(c, options))
            problem_type = "multiple choice"
        else:
            if not _is_number(gt):
                raise c.fail(
                    "ground_truth", f"{gt!r} is not a number (a question without options is numeric)"
                )
            problem_type, options = "regression", None
        meta = {"question_type": qtype, "dataset": dataset, "scene_name": scene, "id": rid}
        rows.append(
            _row(
                problem_id=i + 1,
                problem=question,
                problem_type=problem_type,
                options=options,
                answer=gt,
                path=f"./{dataset}/{scene}.mp4",
                data_source="VSI-Bench",
                meta=meta,
                uid=f"vsibench:{rid}",
            )
        )
    return _check_unique_uids(file, rows)


# --------------------------------------------------------------------------------------------------
# Video-R1-eval rows


def _load_video_r1(data: Any, file: Path, benchmark: str, display: str) -> list[dict]:
    ctx = _Ctx(file)
    rows = []
    for i, raw in enumerate(_as_list(ctx, data, "Video-R1 schema rows")):
        c = ctx.at(i)
        r = c.row_dict(raw)
        problem = c.get(r, "problem", str, nonempty=True)
        ptype = c.get(r, "problem_type", str)
        if ptype not in PROBLEM_TYPES:
            raise c.fail("problem_type", f"{ptype!r} is not one of {', '.join(PROBLEM_TYPES)}")
        solution = c.get(r, "solution", str)
        m = _ANSWER_RE.match(solution.strip())
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
            _check_letter(c, "solution", answer, _option_letters(c, options))
        elif options is not None:
            options = c.str_list(r, "options")
        if ptype in ("numerical", "regression") and not _is_number(answer):
            raise c.fail("solution", f"{answer!r} is not a number ({ptype} row)")
        ds = r.get("data_source")
        meta = {k: v for k, v in r.items() if k not in _SCHEMA_KEYS}
        rows.append(
            _row(
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
    _check_unique_uids(file, rows)
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
    subject = _videommmu_subject(stem)
    if subject and "subject" not in meta:
        meta["subject"] = subject
    discipline = _videommmu_discipline(meta.get("subject", ""))
    if discipline and "discipline" not in meta:
        meta["discipline"] = discipline
    pid = row["problem_id"]
    if "track" not in meta and isinstance(pid, int):
        for track, lo, hi in _VIDEOMMMU_R1_RANGES:
            if lo <= pid <= hi:
                meta["track"], meta["track_inferred"] = track, True  # from the problem_id range: verify


def _enrich_mmvu(row: dict) -> None:
    meta = row["meta"]
    subject = Path(row["path"]).parent.name
    if "subject" not in meta and _mmvu_discipline(subject):
        meta["subject"] = subject
    discipline = _mmvu_discipline(meta.get("subject", ""))
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


# --------------------------------------------------------------------------------------------------
# registry


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
            _load_holmes,
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
            _load_videomme,
            description="videomme/test-00000-of-00001.parquet (rows; no subtitles)",
        ),
        BenchmarkSpec(
            "videommmu",
            "VideoMMMU",
            (),
            (("by_track", "track"), ("by_discipline", "discipline"), ("by_subject", "subject")),
            _load_videommmu,
            _load_videommmu_dir,
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
            _load_mmvu,
            description="validation.json",
        ),
        BenchmarkSpec(
            "mvbench",
            "MVBench",
            (),
            (("by_task", "task"),),
            _load_mvbench_file,
            _load_mvbench_dir,
            description="json/<task>.json, or the json/ folder",
        ),
        BenchmarkSpec(
            "tempcompass",
            "TempCompass",
            (),
            (("by_dim", "dim"), ("by_task_type", "task_type")),
            _load_tempcompass,
            description="questions/{multi-choice,yes_no}.json or lmms-lab rows",
        ),
        BenchmarkSpec(
            "vsibench",
            "VSI-Bench",
            ("vsi",),
            (("by_question_type", "question_type"),),
            _load_vsibench,
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
    if key.startswith("videomme") and "sub" in key:
        raise ValueError(f"benchmark {name!r}: Video-MME with subtitles is not supported yet; use 'videomme'")
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
    data = _read_file(path)
    if _is_video_r1(data):
        return _load_video_r1(data, path, spec.name, spec.display_name)
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


# --------------------------------------------------------------------------------------------------
# metrics


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


_KNOWN_ORDER = {
    "question_type": HOLMES_TYPES + VSI_MC_TYPES + VSI_NA_TYPES,
    "duration": VIDEOMME_DURATIONS,
    "track": VIDEOMMMU_TRACKS,
    "dim": TEMPCOMPASS_DIMS,
}


def _group(results: list[tuple[dict, float | None]], field: str) -> dict[str, dict]:
    buckets: dict[str, tuple[list[float], list[int]]] = {}
    for res, score in results:
        meta = res.get("meta") or {}
        value = meta.get(field, res.get(field))
        key = MISSING if value is None or value == "" else str(value)
        scores, failed = buckets.setdefault(key, ([], [0]))
        if score is None:
            failed[0] += 1
        else:
            scores.append(score)
    order = _KNOWN_ORDER.get(field, ())

    def sort_key(k: str) -> tuple:
        return (k == MISSING, order.index(k) if k in order else len(order), k)

    return {
        k: {"accuracy": _mean(buckets[k][0]), "n": len(buckets[k][0]), "n_failed": buckets[k][1][0]}
        for k in sorted(buckets, key=sort_key)
    }


def _check_score(i: int, res: Any) -> float | None:
    if not isinstance(res, dict):
        raise ValueError(f"results[{i}]: expected a dict, got {type(res).__name__}")
    if "score" not in res:
        raise ValueError(
            f"results[{i}] ({res.get('uid')}): field 'score' missing (use None for a failed sample)"
        )
    if "problem_type" not in res:
        raise ValueError(f"results[{i}] ({res.get('uid')}): field 'problem_type' missing")
    s = res["score"]
    if s is None:
        return None
    if not isinstance(s, (int, float)) or not math.isfinite(s) or not 0.0 <= s <= 1.0:
        raise ValueError(
            f"results[{i}] ({res.get('uid')}): field 'score' = {s!r} should be a number in [0, 1] or None"
        )
    return float(s)


def _vsi_official(by_qtype: dict[str, dict]) -> tuple[dict[str, dict], float | None, list[str]]:
    tasks: dict[str, dict] = {}
    for t in VSI_OFFICIAL_TASKS:
        if t == "object_rel_direction":
            levels = [
                by_qtype[q]
                for q in _VSI_REL_DIRECTION
                if q in by_qtype and by_qtype[q]["accuracy"] is not None
            ]
            if levels:
                tasks[t] = {
                    "accuracy": sum(e["accuracy"] for e in levels) / len(levels),
                    "n": sum(e["n"] for e in levels),
                    "n_failed": sum(by_qtype[q]["n_failed"] for q in _VSI_REL_DIRECTION if q in by_qtype),
                }
        elif t in by_qtype and by_qtype[t]["accuracy"] is not None:
            tasks[t] = dict(by_qtype[t])
    missing = [t for t in VSI_OFFICIAL_TASKS if t not in tasks]
    overall = _mean([e["accuracy"] for e in tasks.values()])
    return tasks, overall, missing


def compute_metrics(benchmark: str, results: list[dict]) -> dict:
    """Headline numbers and breakdowns from scored rows.

    ``results``: rows of :func:`load_benchmark` plus ``score`` (float in [0, 1]; the MRA for regression
    rows) or ``None`` for a sample that failed (its reason in ``error``). All values are fractions.

    * ``overall`` = mean score over *scored* non-regression rows (Video-R1's ``mean_acc``);
      ``overall_all_rows`` counts failed non-regression rows as 0; ``overall_pct`` = 100 x overall.
    * ``mean_mra`` = mean score over scored regression rows (None without any); ``mean_mra_all_rows``.
    * ``by_*`` breakdowns: ``{value: {"accuracy": mean score of scored rows, "n": scored rows,
      "n_failed": failed rows}}``; rows without the field are counted under ``"(missing)"``.
    * VSI-Bench: ``by_official_task`` (the 8 tasks, rel_direction = mean of its 3 levels),
      ``overall_official`` = unweighted mean over those tasks (``official_tasks_missing`` lists absent ones),
      and ``video_r1_headline`` = (overall + mean_mra) / 2 (Video-R1 issue #121).
    * MVBench: ``task_mean`` = unweighted mean over tasks (the official headline).
    """
    spec = get_benchmark(benchmark)
    checked = [(res, _check_score(i, res)) for i, res in enumerate(results)]
    cls = [(res, s) for res, s in checked if res["problem_type"] != "regression"]
    reg = [(res, s) for res, s in checked if res["problem_type"] == "regression"]
    cls_scored = [s for _, s in cls if s is not None]
    reg_scored = [s for _, s in reg if s is not None]
    failures = [
        {
            "uid": res.get("uid", res.get("problem_id", i)),
            "reason": str(res.get("error") or "no reason given"),
        }
        for i, (res, s) in enumerate(checked)
        if s is None
    ]
    overall = _mean(cls_scored)
    m: dict[str, Any] = {
        "benchmark": spec.name,
        "overall": overall,
        "overall_pct": None if overall is None else 100.0 * overall,
        "overall_all_rows": _mean([0.0 if s is None else s for _, s in cls]),
        "mean_mra": _mean(reg_scored),
        "mean_mra_all_rows": _mean([0.0 if s is None else s for _, s in reg]),
        "num_samples": len(checked),
        "num_scored": len(cls_scored) + len(reg_scored),
        "num_failed": len(failures),
        "failures": failures,
        "denominator": "all scored rows (failed samples excluded; *_all_rows count them as 0)",
        "by_problem_type": _group(checked, "problem_type"),
    }
    for key, field in spec.breakdowns:
        m[key] = _group(checked, field)
    if spec.name == "vsibench":
        tasks, official, missing = _vsi_official(m["by_question_type"])
        m["by_official_task"] = tasks
        m["overall_official"] = official
        m["official_tasks_missing"] = missing
        m["video_r1_headline"] = (
            None if overall is None or m["mean_mra"] is None else (overall + m["mean_mra"]) / 2
        )
    if spec.name == "mvbench":
        m["task_mean"] = _mean(
            [e["accuracy"] for k, e in m["by_task"].items() if k != MISSING and e["accuracy"] is not None]
        )
    return m


def _pct(x: float | None) -> str:
    return "     -" if x is None else f"{100.0 * x:6.2f}"


def format_table(metrics: dict) -> str:
    """A plain-text table of the headline numbers and every breakdown (percent of scored rows)."""
    lines = [
        f"{metrics.get('benchmark', '?')}: {metrics['num_samples']} samples, {metrics['num_scored']} scored, "
        f"{metrics['num_failed']} failed   (% of scored rows; n = scored rows)"
    ]
    rows: list[tuple[str, float | None, str]] = [("overall (accuracy)", metrics["overall"], "")]
    if metrics["num_failed"]:
        rows.append(("overall, failures as 0", metrics["overall_all_rows"], ""))
    if metrics.get("mean_mra") is not None:
        rows.append(("mean MRA (regression)", metrics["mean_mra"], ""))
        if metrics["mean_mra_all_rows"] != metrics["mean_mra"]:
            rows.append(("mean MRA, failures as 0", metrics["mean_mra_all_rows"], ""))
    n_official = len(VSI_OFFICIAL_TASKS) - len(metrics.get("official_tasks_missing", []))
    for key, label in (
        ("overall_official", f"official overall ({n_official} of {len(VSI_OFFICIAL_TASKS)} tasks)"),
        ("video_r1_headline", "Video-R1 headline (acc+MRA)/2"),
        ("task_mean", "mean over tasks"),
    ):
        if key in metrics:
            rows.append((label, metrics[key], ""))
    width = max(
        [len(r[0]) for r in rows]
        + [
            len(k) + 2
            for key, b in metrics.items()
            if key.startswith("by_") and isinstance(b, dict)
            for k in b
        ]
    )
    for label, value, _ in rows:
        lines.append(f"{label.ljust(width)}  {_pct(value)}")
    for key, breakdown in metrics.items():
        if not key.startswith("by_") or not isinstance(breakdown, dict):
            continue
        lines.append("")
        lines.append(key)
        for k, e in breakdown.items():
            extra = f"  ({e['n_failed']} failed)" if e.get("n_failed") else ""
            lines.append(f"  {k.ljust(width - 2)}  {_pct(e['accuracy'])}  n={e['n']}{extra}")
    if metrics.get("official_tasks_missing"):
        lines.append("")
        lines.append("official tasks missing: " + ", ".join(metrics["official_tasks_missing"]))
    if metrics["failures"]:
        lines.append("")
        lines.append("failed samples:")
        for f in metrics["failures"][:20]:
            lines.append(f"  {f['uid']}: {f['reason']}")
        if len(metrics["failures"]) > 20:
            lines.append(f"  ... {len(metrics['failures']) - 20} more")
    return "\n".join(lines)
