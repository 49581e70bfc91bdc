"""`video-ktr demo`: the main job on the embedded default."""

from video_ktr.analysis.demo import main

__all__ = ["main"]
