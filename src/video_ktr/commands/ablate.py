"""`video-ktr ablate`: the ablation over variants and seeds."""

from video_ktr.analysis.ablation import main

__all__ = ["main"]
