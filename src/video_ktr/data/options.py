"""Options shared by the commands that read data and media (train, sft, eval, infer)."""

from __future__ import annotations

from dataclasses import dataclass

from video_ktr.data.media import FRAME_RULES, FrameSettings
from video_ktr.utils.config import field


@dataclass
class MediaArgs:
    video_fps: float = field(2.0, help="Frames sampled per second of video (when --nframes is not set), as qwen-vl-utils.")
    nframes: int | None = field(None, help="Sample exactly this many frames per video (rounded to an even number); overrides --video_fps.")
    min_frames: int = field(4, help="Fewest frames sampled from a video.")
    max_frames: int = field(16, help="Most frames sampled from a video (Video-KTR trained with 16; evaluation uses 16/32/64).")
    min_pixels: int = field(4 * 28 * 28, help="Fewest pixels per video frame after resizing (sides are multiples of 28).")
    max_pixels: int = field(128 * 28 * 28, help="Most pixels per video frame after resizing (Video-KTR training: 128x28x28).")
    total_pixels: int | None = field(None, help="Optional cap on the pixels of all frames of a video together.")
    image_min_pixels: int = field(4 * 28 * 28, help="Fewest pixels of an image after resizing.")
    image_max_pixels: int = field(256 * 28 * 28, help="Most pixels of an image after resizing.")
    frame_rule: str = field(
        "qwen-vl-utils", choices=list(FRAME_RULES),
        help="How frame counts and sizes are computed: 'qwen-vl-utils' exactly as qwen-vl-utils 0.0.14 (the code the "
        "published numbers used; its rounding may leave [min_pixels, max_pixels] when they are close, and it refuses "
        "fewer than 2 frames), or 'fit' (sizes kept inside the bounds, 1 frame padded to 2). See data/media.py.")

    def frame_settings(self) -> FrameSettings:
        s = FrameSettings(
            fps=self.video_fps, nframes=self.nframes, min_frames=self.min_frames, max_frames=self.max_frames,
            min_pixels=self.min_pixels, max_pixels=self.max_pixels, total_pixels=self.total_pixels,
            image_min_pixels=self.image_min_pixels, image_max_pixels=self.image_max_pixels, frame_rule=self.frame_rule,
        )
        s.validate()
        return s


@dataclass
class DataArgs(MediaArgs):
    media_root: str | None = field(None, help="Folder that the rows' 'path' fields are relative to (default: the data file's folder).")
    allow_outside_media_root: bool = field(False, help="Accept media paths that are absolute or lead outside --media_root.")
    on_bad_sample: str = field(
        "error", choices=["error", "skip"],
        help="A bad row or unreadable media file: 'error' stops with file, row and field; 'skip' counts it by reason and goes on.",
    )
    special_tokens: str = field(
        "refuse", choices=["refuse", "escape"],
        help="Control tokens such as <|im_start|> or <|video_pad|> written in a row's text: 'refuse' makes the row bad (see --on_bad_sample); 'escape' keeps it as plain text (a zero-width space after '<').",
    )
    prompt_layout: str = field(
        "train", choices=["train", "eval"],
        help="Multiple-choice layout of the released code: 'train' (newline after every option) or 'eval' (options joined by newlines).",
    )
    system_prompt: str | None = field(None, help="A system turn to add; by default the chat template's default system turn is used.")
    dataloader_prefetch: bool = field(True, help="Decode the next micro-step's media (and, in train, run the processor) in a background thread while this step computes (same batches).")
