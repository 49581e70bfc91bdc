"""`video-ktr report`: HTML report of training runs (video_ktr.analysis.report.write_report)."""

from __future__ import annotations

import argparse
import sys

from video_ktr.analysis.report import write_report

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """``video-ktr report RUN_DIR [RUN_DIR ...] [--output DIR]``."""
    parser = argparse.ArgumentParser(
        prog="video-ktr report",
        description="An HTML report of training runs (--output_dir folders of `video-ktr train`): curves, gradient "
        "diagnostics, token overlaps and positions, logged completions with highlighted key tokens, word clouds and "
        "word-class shares of selected vs masked tokens, and the runs side by side.",
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="Training output folder(s); several are overlaid.")
    parser.add_argument("--output", default=None, help="Folder for index.html and its PNGs (default: RUN_DIR/report of the first run).")
    parser.add_argument("--max_completions", type=int, default=8, help="Completions shown per run (from its last logged step).")
    parser.add_argument("--pos_method", default="auto", choices=["auto", "spacy", "function_words"],
                        help="Word classes: spaCy POS tags when an English model is installed (auto), or the built-in "
                        "function-word list.")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        path = write_report(args.runs, args.output, max_completions=args.max_completions, pos_method=args.pos_method)
    except (FileNotFoundError, ValueError) as exc:
        print(f"video-ktr report: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0
