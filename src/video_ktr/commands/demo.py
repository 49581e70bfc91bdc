"""`video-ktr demo`: the main job on the embedded default (video_ktr.analysis.demo.run_demo)."""

from __future__ import annotations

from video_ktr.analysis.demo import DemoConfig, run_demo
from video_ktr.utils.config import parse_args

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(DemoConfig, argv, prog="video-ktr demo")
    run_demo(cfg)
    return 0
