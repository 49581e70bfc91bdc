"""`video-ktr estimate`: memory and token estimate of a training config."""

from video_ktr.analysis.estimate import main

__all__ = ["main"]
