"""The model family the test suite runs on, and media sizes in units of its frame factor.

``VK_TEST_ARCH=qwen3_vl`` (or any adapter's name; default ``qwen2_5_vl``) makes every test that builds a
tiny model build that family's, and every test that writes frame sizes write them in cells of the family's
frame factor F (patch x spatial merge, from its adapter: 28 for Qwen2/2.5-VL, 32 for Qwen3-VL), so that the
frames reach the vision tower as the family needs them (`make test-arch ARCH=...`, docs/models.md).
Imported by conftest.py and by the test files (``from tests.family import F, px``).
"""

from __future__ import annotations

import os

from video_ktr.model.adapters import adapter_for

TEST_ARCH = os.environ.get("VK_TEST_ARCH", "qwen2_5_vl")
ADAPTER = adapter_for(TEST_ARCH)  # a ValueError naming the families for an unknown name
F = ADAPTER.frame_factor
# the synthetic sets' frames: 2 x 2 cells of F pixels (56x56 by default, 64x64 for Qwen3-VL)
SIDE = 2 * F


def px(cells: int) -> int:
    """The area of ``cells`` F x F cells: px(1) = 784 and px(4) = 3136 by default (1024, 4096 for Qwen3-VL)."""
    return cells * F * F


# Small media settings used by the trainer tests: the synthetic videos' 8 frames (4 fps, 2 s) of
# FxF..2Fx2F pixels (28x28..56x56 by default), i.e. a (4, 4, 4) grid and 16 visual tokens per video.
SMALL_MEDIA = ["--max_frames", "8", "--video_fps", "4", "--min_pixels", str(px(1)), "--max_pixels", str(px(4))]


def frame_settings(**overrides):
    """data.media.FrameSettings at the family's factor: 8 frames at 4 fps, F x F .. 2F x 2F videos and images
    (``overrides`` win; sizes given by the caller should be written with px())."""
    from video_ktr.data.media import FrameSettings

    kw = dict(fps=4.0, max_frames=8, min_pixels=px(1), max_pixels=px(4), image_min_pixels=px(1),
              image_max_pixels=px(4), factor=F)
    kw.update(overrides)
    return FrameSettings(**kw)


def skip_unless_family(*families: str, why: str):
    """pytest's skip mark for a test about something only these families have (``why`` says what)."""
    import pytest

    return pytest.mark.skipif(TEST_ARCH not in families,
                              reason=f"{why}: {', '.join(families)} only (VK_TEST_ARCH={TEST_ARCH})")
