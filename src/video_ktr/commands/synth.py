"""`video-ktr synth`: generate the synthetic video-reasoning data set (video_ktr.data.synth)."""

from __future__ import annotations

import sys

from video_ktr.data.synth import SynthConfig, SynthSpaceError, format_summary, synthesize
from video_ktr.utils.config import parse_args

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(SynthConfig, argv, prog="video-ktr synth")
    try:
        summary = synthesize(cfg)
    except (FileExistsError, SynthSpaceError) as exc:
        print(f"video-ktr synth: {exc}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0
