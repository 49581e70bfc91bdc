"""Video-R1-schema data: load, validate and resolve media paths, with errors naming file, row and field.

A row::

    {"problem_id": 1, "problem": "...", "data_type": "video" | "image",
     "problem_type": "multiple choice" | "numerical" | "OCR" | "free-form" | "regression",
     "options": ["A. ...", ...] (multiple choice only), "solution": "<answer>X</answer>",
     "path": "./videos/x.mp4" (relative to the media root), "data_source": "...",
     "process": "<think>...</think>" (SFT rows only)}

Files are JSON lists or JSONL. Media paths are resolved under ``media_root`` (default: the data file's
folder) the way Video-R1 does (``root + path[1:]`` for ``./`` paths) and must stay inside it: ``..``,
absolute paths and symlinks that lead outside are refused unless the user allows it.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from video_ktr.data.prompts import build_messages
from video_ktr.data.sources import SourceError, default_media_root, read_source
from video_ktr.data.text_checks import (
    DEFAULT_MAX_TEXT_CHARS,
    SPECIAL_TOKEN_POLICIES,
    clean_text,
    text_problem,
)
from video_ktr.utils.jsonl import JsonLineError, parse_json_lines

PROBLEM_TYPES = ("multiple choice", "numerical", "OCR", "free-form", "regression")
DATA_TYPES = ("video", "image")
BAD_SAMPLE_POLICIES = ("error", "skip")

_TYPE_ALIASES = {t.lower().replace("-", " ").replace("_", " "): t for t in PROBLEM_TYPES}


class DataError(ValueError):
    """A problem with one row of a data file; says where and what to do."""

    def __init__(self, file: str | os.PathLike, row: int | None, field: str | None, message: str, reason: str):
        self.file, self.row, self.field, self.reason = str(file), row, field, reason
        where = f"{file}"
        if row is not None:
            where += f", row {row}"
        if field is not None:
            where += f", field '{field}'"
        super().__init__(f"{where}: {message}")


@dataclass
class Sample:
    """One validated row. ``media_path`` is absolute; ``meta`` keeps every extra key of the row."""

    problem_id: str
    problem: str
    data_type: str
    problem_type: str
    solution: str
    options: list[str] | None = None
    media_path: Path | None = None
    data_source: str = ""
    process: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # "file:row", for messages

    def messages(self, layout: str = "train", system_prompt: str | None = None) -> list[dict[str, Any]]:
        return build_messages(
            self.problem, self.problem_type, self.options, self.data_type, layout=layout, system_prompt=system_prompt
        )

    @property
    def kind(self) -> str:
        """The breakdown key for per-kind accuracy: ``kind`` if the row has it, else the data source."""
        return str(self.meta.get("kind") or self.data_source or self.problem_type)


@dataclass
class SkipReport:
    """Rows skipped under ``on_bad_sample=skip``, counted by reason (never dropped silently)."""

    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def add(self, err: DataError) -> None:
        self.counts[err.reason] += 1
        if len(self.examples) < 20:
            self.examples.append(str(err))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.total:
            return "no rows skipped"
        parts = ", ".join(f"{reason}: {n}" for reason, n in self.counts.most_common())
        return f"{self.total} row(s) skipped ({parts})"


def normalize_problem_type(value: str) -> str | None:
    return _TYPE_ALIASES.get(str(value).strip().lower().replace("-", " ").replace("_", " "))


def _is_one_json_object(text: str) -> bool:
    """True for a pretty-printed (multi-line) JSON object, which would otherwise be read as broken JSONL."""
    if not text.startswith("{") or "\n" not in text.strip():
        return False
    try:
        return isinstance(json.loads(text), dict)
    except (json.JSONDecodeError, RecursionError):
        return False


def read_data_text(path: Path) -> tuple[str, bool]:
    """The text of a JSON or JSONL data file and whether it is JSONL (a ``.jsonl`` name, or text that starts
    with ``{``); a missing file, text that is not UTF-8 or one pretty-printed JSON object raise DataError."""
    if not path.is_file():
        raise DataError(path, None, None, "data file does not exist", "missing_file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(path, None, None, f"not UTF-8 text (byte {exc.start}); data files must be UTF-8 JSON or JSONL", "bad_json") from None
    stripped = text.lstrip()
    if path.suffix != ".jsonl" and _is_one_json_object(stripped):
        raise DataError(path, None, None, "holds one JSON object; a data file must be a JSON list of rows "
                        "([{...}, {...}]) or JSONL (one row object per line)", "bad_json")
    return text, path.suffix == ".jsonl" or bool(stripped and stripped[0] == "{")


def parse_json_list(path: Path, text: str) -> list[Any]:
    """The rows of a data file that holds one JSON list; anything else raises DataError."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(path, None, None, f"not valid JSON at line {exc.lineno} column {exc.colno} ({exc.msg})", "bad_json") from None
    except RecursionError:
        raise DataError(path, None, None, "JSON nested too deeply", "bad_json") from None
    if not isinstance(data, list):
        raise DataError(path, None, None, "a data file must hold a JSON list of rows (or be JSONL)", "bad_json")
    return data


def read_rows(path: str | os.PathLike) -> list[Any]:
    """Read a JSON list or a JSONL file; malformed JSON raises DataError with the line."""
    path = Path(path)
    text, jsonl = read_data_text(path)
    if jsonl:
        try:
            return parse_json_lines(text)
        except JsonLineError as exc:
            raise DataError(path, exc.lineno, None, str(exc), "bad_json") from None
    return parse_json_list(path, text)


def resolve_media(
    path_value: str, media_root: Path, *, allow_outside: bool = False, file: str = "", row: int | None = None
) -> Path:
    """Resolve a row's ``path`` under ``media_root``; refuse paths that escape it."""
    raw = str(path_value)
    if not raw.strip():
        raise DataError(file, row, "path", "empty media path", "bad_path")
    candidate = Path(raw)
    if candidate.is_absolute():
        if not allow_outside:
            raise DataError(
                file, row, "path",
                f"absolute path {raw!r} refused: paths are relative to --media_root (allow with --allow_outside_media_root)",
                "path_outside_root",
            )
        return candidate
    try:
        root = media_root.resolve()
        resolved = (root / candidate).resolve()
    except (OSError, ValueError) as exc:
        raise DataError(file, row, "path", f"unusable media path {raw[:200]!r} ({exc})", "bad_path") from None
    if not allow_outside and not resolved.is_relative_to(root):
        raise DataError(
            file, row, "path",
            f"path {raw!r} leads outside the media root {root} (via '..' or a symlink); refused",
            "path_outside_root",
        )
    return resolved


def validate_row(
    row: Any,
    *,
    file: str,
    index: int,
    media_root: Path,
    check_media_exists: bool = True,
    allow_outside: bool = False,
    require_process: bool = False,
    special_tokens: str = "refuse",
    max_text_chars: int | None = DEFAULT_MAX_TEXT_CHARS,
) -> Sample:
    """Validate one row against the Video-R1 schema and return a Sample (or raise DataError).

    The free text (problem, options, solution, process) goes through :mod:`video_ktr.data.text_checks`:
    length (``max_text_chars``), invalid Unicode, and control tokens (``special_tokens``: refuse or escape).
    """
    if not isinstance(row, dict):
        raise DataError(file, index, None, f"a row must be a JSON object, got {type(row).__name__}", "bad_row")

    def need_str(name: str, *, allow_empty: bool = False) -> str:
        if name not in row or row[name] is None:
            raise DataError(file, index, name, "missing required field", f"missing_{name}")
        value = row[name]
        if not isinstance(value, str):
            raise DataError(file, index, name, f"expected a string, got {type(value).__name__}", f"bad_{name}")
        if not allow_empty and not value.strip():
            raise DataError(file, index, name, "must not be empty", f"empty_{name}")
        return value

    problem = need_str("problem")
    data_type = need_str("data_type").strip().lower()
    if data_type not in DATA_TYPES:
        raise DataError(file, index, "data_type", f"must be one of {DATA_TYPES}, got {row['data_type']!r}", "bad_data_type")
    ptype_raw = need_str("problem_type")
    problem_type = normalize_problem_type(ptype_raw)
    if problem_type is None:
        raise DataError(
            file, index, "problem_type", f"unknown problem type {ptype_raw!r}; expected one of {PROBLEM_TYPES}",
            "unknown_problem_type",
        )
    solution = need_str("solution")
    start = solution.find("<answer>")
    if start < 0 or solution.find("</answer>", start) < 0:
        raise DataError(file, index, "solution", "must hold the answer as <answer>X</answer>", "solution_without_answer_tag")

    options = row.get("options")
    if problem_type == "multiple choice":
        if not isinstance(options, list) or not options:
            raise DataError(file, index, "options", "multiple-choice rows need a non-empty list of options", "missing_options")
        for k, op in enumerate(options):
            if not isinstance(op, str) or not op.strip():
                raise DataError(file, index, "options", f"option {k} must be a non-empty string", "bad_options")
    elif options is not None and not isinstance(options, list):
        raise DataError(file, index, "options", f"expected a list or null, got {type(options).__name__}", "bad_options")
    else:
        options = None if not options else [str(o) for o in options]

    process = row.get("process")
    if process is not None and not isinstance(process, str):
        raise DataError(file, index, "process", f"expected a string, got {type(process).__name__}", "bad_process")
    if require_process and not (process or "").strip():
        raise DataError(file, index, "process", "SFT rows need the reasoning in 'process' (<think>...</think>)", "missing_process")

    path_value = need_str("path")
    media_path = resolve_media(path_value, media_root, allow_outside=allow_outside, file=file, row=index)
    try:
        exists = media_path.is_file()
    except (OSError, ValueError) as exc:
        raise DataError(file, index, "path", f"unusable media path ({exc})", "bad_path") from None
    if check_media_exists and not exists:
        raise DataError(file, index, "path", f"media file {media_path} does not exist", "media_missing")

    def text(name: str, value: str, label: str | None = None) -> str:
        problem = text_problem(value, special_tokens=special_tokens, max_chars=max_text_chars)
        if problem is not None:
            reason, message = problem
            raise DataError(file, index, name, f"{label + ': ' if label else ''}{message}", reason)
        return clean_text(value, special_tokens)

    problem = text("problem", problem)
    solution = text("solution", solution)
    if options is not None:
        options = [text("options", op, f"option {k}") for k, op in enumerate(options)]
    if process is not None:
        process = text("process", process)

    pid = row.get("problem_id", index)
    known = {"problem_id", "problem", "data_type", "problem_type", "options", "solution", "path", "data_source", "process"}
    meta = {k: v for k, v in row.items() if k not in known}
    return Sample(
        problem_id=str(pid),
        problem=problem,
        data_type=data_type,
        problem_type=problem_type,
        solution=solution,
        options=options,
        media_path=media_path,
        data_source=str(row.get("data_source") or ""),
        process=process,
        meta=meta,
        source=f"{file}:{index}",
    )


def load_dataset(
    path: str | os.PathLike,
    media_root: str | os.PathLike | None = None,
    *,
    on_bad_sample: str = "error",
    check_media_exists: bool = True,
    allow_outside_media_root: bool = False,
    require_process: bool = False,
    report: SkipReport | None = None,
    special_tokens: str = "refuse",
    max_text_chars: int | None = DEFAULT_MAX_TEXT_CHARS,
    config: str | None = None,
    split: str | None = None,
) -> list[Sample]:
    """Load and validate a data source (JSON/JSONL/parquet file, `datasets` folder or hub id: data.sources).
    ``on_bad_sample='skip'`` counts bad rows in ``report``."""
    if on_bad_sample not in BAD_SAMPLE_POLICIES:
        raise ValueError(f"on_bad_sample must be one of {BAD_SAMPLE_POLICIES}, got {on_bad_sample!r}")
    if special_tokens not in SPECIAL_TOKEN_POLICIES:
        raise ValueError(f"special_tokens must be one of {SPECIAL_TOKEN_POLICIES}, got {special_tokens!r}")
    root = Path(media_root) if media_root is not None else default_media_root(path)
    if root is None:
        raise DataError(path, None, "media_root", "a hub dataset needs --media_root (the folder its videos and images "
                        "were unpacked to)", "missing_file")
    report = report if report is not None else SkipReport()
    try:
        rows, label = read_source(path, read_rows=read_rows, config=config, split=split)
    except SourceError as exc:
        raise DataError(exc.source, None, None, exc.detail, "missing_file") from None
    path = label
    samples = []
    for index, row in enumerate(rows):
        try:
            samples.append(
                validate_row(
                    row, file=str(path), index=index, media_root=root, check_media_exists=check_media_exists,
                    allow_outside=allow_outside_media_root, require_process=require_process,
                    special_tokens=special_tokens, max_text_chars=max_text_chars,
                )
            )
        except DataError as err:
            if on_bad_sample == "error":
                raise
            report.add(err)
    if not samples:
        raise DataError(path, None, None, f"no usable rows ({report.summary()})", "empty_dataset")
    return samples
