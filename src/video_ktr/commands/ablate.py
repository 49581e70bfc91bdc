"""`video-ktr ablate`: the ablation over variants and seeds (video_ktr.analysis.ablation.run_ablation)."""

from __future__ import annotations

import sys

from video_ktr.analysis.ablation import AblateError, parse_options, run_ablation

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = parse_options(argv)
    try:
        run_ablation(opts)
    except (AblateError, FileNotFoundError) as exc:
        print(f"video-ktr ablate: error: {exc}", file=sys.stderr)
        return 2
    return 0
