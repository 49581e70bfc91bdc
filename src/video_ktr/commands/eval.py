"""`video-ktr eval`: evaluate a model on a benchmark."""

from video_ktr.evaluation.evaluate import main

__all__ = ["main"]
