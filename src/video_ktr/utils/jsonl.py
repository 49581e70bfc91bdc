"""JSON lines: strict metrics files, and data files read with the first bad line named."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file (blank lines skipped); [] when the file does not exist."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class JsonLineError(ValueError):
    """A line of JSON-lines text that is not valid JSON (``lineno`` counts from 1)."""

    def __init__(self, lineno: int, msg: str) -> None:
        self.lineno, self.msg = lineno, msg
        super().__init__(f"line {lineno} is not valid JSON ({msg})")


def parse_json_lines(text: str) -> list[Any]:
    """The value of every non-blank line of ``text``; raises JsonLineError naming the first bad line."""
    values = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            values.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise JsonLineError(lineno, exc.msg) from None
    return values


def finite_or_null(metrics: dict[str, Any]) -> dict[str, Any]:
    """NaN / inf (a skipped bad step) written as null, so metrics.jsonl stays strict JSON (jq reads it)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
