"""Strict JSON lines for metrics files."""

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


def finite_or_null(metrics: dict[str, Any]) -> dict[str, Any]:
    """NaN / inf (a skipped bad step) written as null, so metrics.jsonl stays strict JSON (jq reads it)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
