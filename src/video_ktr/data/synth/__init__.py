"""The synthetic video-reasoning data set (`video-ktr synth`), in the Video-R1 schema.

Designed so that a ~1 M-parameter Qwen2.5-VL can learn it on a CPU, and so that it needs the video
(and, for some kinds, the order of the frames):

- Qwen2.5-VL cuts frames into 14-px patches, merges 2x2 of them and pairs frames in time
  (``temporal_patch_size`` 2): one visual token per 28x28 cell per pair of frames. Every object here
  fills whole cells of the 28-px grid and the content of frames 2k and 2k+1 is identical, so each
  visual token sees exactly one colour. 8 frames at 56x56 give 4 *steps* x 2x2 cells = 16 tokens.
- Saturated colours on black; options in a fixed (palette) order by default; every answer letter and
  every count equally frequent within a kind, so a text-only model is at chance.
- Deterministic: each row draws from its own ``numpy`` stream keyed by (seed, split, kind, index),
  so train and test never share a stream and adding a kind does not change the other kinds' rows.

Each kind is a small function ``(rng, answer_index, config) -> _Item``; the video is described by its
*steps*, a uint8 array (S, G, G, 3) of cell colours (S = frames // 2 steps, G = size // 28 cells).
For another family's frame factor (Qwen3-VL: 16-px patches merged 2x2, 32 px) ``--cell 32 --size 64`` draws
the same rows and colours with 32-px cells.
"""

from video_ktr.data.synth.build import (
    Sample,
    SynthSpaceError,
    answer_of,
    content_hash,
    cot_rows,
    format_summary,
    generate,
    make_split,
    synthesize,
)
from video_ktr.data.synth.config import (
    CORNERS,
    DATA_TYPE,
    DEFAULT_KINDS,
    DIRECTIONS,
    IMAGE_KINDS,
    KINDS,
    LEGACY_KINDS,
    LEGACY_TASK,
    LETTERS,
    ORDER_KINDS,
    PALETTE,
    SPLITS,
    VIDEO_KINDS,
    SynthConfig,
)
from video_ktr.data.synth.kinds import kind_of, num_answers

__all__ = [
    "CORNERS", "DATA_TYPE", "DEFAULT_KINDS", "DIRECTIONS", "IMAGE_KINDS", "KINDS", "LEGACY_KINDS", "LEGACY_TASK", "LETTERS", "ORDER_KINDS", "PALETTE", "SPLITS",
    "VIDEO_KINDS", "Sample", "SynthConfig", "SynthSpaceError", "content_hash", "answer_of", "cot_rows", "format_summary", "generate", "kind_of",
    "make_split", "num_answers", "synthesize",
]
