"""`video-ktr synth`: generate the synthetic video-reasoning data set."""

from video_ktr.data.synth import main

__all__ = ["main"]
