"""Where the test fixtures are: ``tests/fixtures`` inside the checkout (no test reads outside the repository;
``tests/test_self_contained.py`` checks that)."""

from __future__ import annotations

from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures"
REAL_VIDEO = FIXTURES / "real" / "video1.mp4"
BENCHMARK_FIXTURES = FIXTURES / "benchmarks"
