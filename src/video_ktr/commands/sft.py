"""`video-ktr sft`: supervised fine-tuning cold start."""

from video_ktr.training.sft import main

__all__ = ["main"]
