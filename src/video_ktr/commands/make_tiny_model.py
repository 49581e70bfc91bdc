"""`video-ktr make-tiny-model`: build a small random Qwen2.5-VL / Qwen2-VL checkpoint locally."""

from video_ktr.model.tiny import main

__all__ = ["main"]
