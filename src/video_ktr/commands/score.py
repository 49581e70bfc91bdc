"""`video-ktr score`: recompute predictions and metrics of a saved evaluation."""

from video_ktr.evaluation.evaluate import score_main as main

__all__ = ["main"]
