"""Strict JSON lines for metrics files."""

from __future__ import annotations

import math
from typing import Any


def finite_or_null(metrics: dict[str, Any]) -> dict[str, Any]:
    """NaN / inf (a skipped bad step) written as null, so metrics.jsonl stays strict JSON (jq reads it)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
