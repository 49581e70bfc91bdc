"""`video-ktr eval`: evaluate a model on a benchmark (the loop: video_ktr.evaluation.evaluate.evaluate)."""

from __future__ import annotations

import shlex
import sys

from video_ktr.evaluation.eval_config import EvalConfig, EvalError
from video_ktr.evaluation.evaluate import evaluate
from video_ktr.evaluation.tasks.base import BenchmarkDataError
from video_ktr.model.vllm_engine import VLLMUnavailableError
from video_ktr.utils.config import parse_args

__all__ = ["main"]


def _error(prog: str, exc: BaseException) -> int:
    print(f"{prog}: error: {exc}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """``video-ktr eval``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse_args(EvalConfig, argv, prog="video-ktr eval")
    try:
        evaluate(cfg, command=shlex.join(["video-ktr", "eval", *argv]))
    except (EvalError, FileNotFoundError, BenchmarkDataError, VLLMUnavailableError) as exc:
        return _error("video-ktr eval", exc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
