"""Where the shared fixtures are: ``shared/`` beside the checkout (as CI lays it out), else $VIDEO_KTR_SHARED."""

from __future__ import annotations

import os
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]


def _find_shared() -> Path:
    env = os.environ.get("VIDEO_KTR_SHARED")
    candidates = [Path(env)] if env else []
    candidates += [_REPO.parent / "shared", Path("/work/shared")]
    for c in candidates:
        if (c / "fixtures").is_dir():
            return c
    return candidates[0]  # missing: the tests that need it fail with the path in the message


SHARED = _find_shared()
FIXTURES = SHARED / "fixtures"
REAL_VIDEO = FIXTURES / "real" / "video1.mp4"
BENCHMARK_FIXTURES = FIXTURES / "benchmarks"
