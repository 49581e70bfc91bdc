"""`video-ktr report`: HTML report of training runs."""

from video_ktr.analysis.report import main

__all__ = ["main"]
