"""`video-ktr score`: recompute predictions and metrics of a saved evaluation (video_ktr.evaluation.grading.rescore)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from video_ktr.evaluation.eval_config import EvalError
from video_ktr.evaluation.grading import rescore
from video_ktr.evaluation.protocol import write_json_atomic
from video_ktr.evaluation.results_table import collect, render
from video_ktr.evaluation.tasks.metrics import format_table

__all__ = ["main"]


def _error(prog: str, exc: BaseException) -> int:
    print(f"{prog}: error: {exc}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """``video-ktr score FILE.json [FILE.json ...]``: recompute predictions, scores and metrics."""
    parser = argparse.ArgumentParser(
        prog="video-ktr score",
        description="Recompute prediction and score of every saved output (failed rows stay failed) and the "
        "metrics of evaluation files written by `video-ktr eval`; rewrite them atomically and print the tables.",
    )
    parser.add_argument("files", nargs="+", metavar="FILE.json", help="Evaluation file(s) to re-score (with --table: eval output folders).")
    parser.add_argument("--table", action="store_true", help="Print the main-table layout (a row per model, a column per benchmark) of the eval output folders given, re-scoring nothing.")
    parser.add_argument("--format", default="markdown", choices=["markdown", "csv"], help="Table format with --table.")
    parser.add_argument("--benchmark", default=None, help="Benchmark whose metrics to compute (default: the file's protocol.benchmark).")
    parser.add_argument("--dry_run", action="store_true", help="Print the tables without rewriting the files.")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.table:
        try:
            print(render(collect(args.files), args.format), end="")
        except EvalError as exc:
            return _error("video-ktr score", exc)
        return 0
    for name in args.files:
        path = Path(name)
        try:
            if not path.is_file():
                raise EvalError(f"{path} does not exist")
            try:
                payload = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise EvalError(f"{path} is not valid JSON ({exc})") from None
            new = rescore(payload, args.benchmark)
        except (EvalError, ValueError) as exc:
            return _error("video-ktr score", exc)
        if not args.dry_run:
            write_json_atomic(path, new)
        if len(args.files) > 1:
            print(f"== {path}")
        print(format_table(new["metrics"]))
    return 0
