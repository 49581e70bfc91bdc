"""`video-ktr infer`: answer one question about a video or an image."""

from video_ktr.evaluation.inference import main

__all__ = ["main"]
