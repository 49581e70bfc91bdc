"""`video-ktr make-tiny-model`: build a small random Qwen2.5-VL / Qwen2-VL checkpoint locally (video_ktr.model.tiny)."""

from __future__ import annotations

from video_ktr.model.tiny import MakeTinyModelArgs, write_tiny_model
from video_ktr.utils.config import parse_args

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(MakeTinyModelArgs, argv, prog="video-ktr make-tiny-model")
    print(write_tiny_model(args).summary())
    return 0
