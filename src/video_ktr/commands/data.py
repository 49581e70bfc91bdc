"""`video-ktr data`: data unpack / data check."""

from video_ktr.data.tools import main

__all__ = ["main"]
