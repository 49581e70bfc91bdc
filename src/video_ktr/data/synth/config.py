"""The synthetic set's constants, question-kind names and options (:class:`SynthConfig`)."""

from __future__ import annotations

from dataclasses import dataclass

from video_ktr.utils.config import field

CELL = 28  # default pixels per visual token side: 14-px patches merged 2x2 (Qwen2/2.5-VL; Qwen3-VL: 16 x 2 = 32)
STEP_FRAMES = 2  # frames per visual token in time: temporal_patch_size
LETTERS = "ABCDEFGH"
SPLITS = ("train", "test")

# Distinct, saturated colours; the first `num_colors` are used, in this order.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
    "orange": (255, 128, 0),
    "purple": (128, 0, 255),
}
BLACK = (0, 0, 0)
WHITE = (255, 255, 255)

DIRECTIONS = ("left to right", "right to left", "top to bottom", "bottom to top")
CORNERS = ("top left", "top right", "bottom left", "bottom right")

KINDS: dict[str, str] = {
    "color_first": "video; which colour is shown first (all option colours appear; needs frame order)",
    "color_last": "video; which colour is shown last (all option colours appear; needs frame order)",
    "direction": "video; a square moves across the grid: which direction (reversing the frames flips it)",
    "count": "video; numerical: in how many steps is the screen white (order-free)",
    "color_present": "video; which option colour appears at all (order-free control)",
    "image_color": "image; what colour is the square",
    "image_position": "image; which corner is the square in",
    # kinds added later (appended: a kind's position keys its random streams, so the rows above never change)
    "after_event": "video; which colour comes right after the white screen (every option colour may appear; needs that frame and the order)",
    "which_first": "video; which of two colours, both shown once among other colours, appears first (reversing the frames flips it)",
    "count_color": "video; numerical: in how many steps (1 to steps - 1) is a named colour shown, among other colours (order-free, needs every step)",
}
# the kinds of `video-ktr synth` (and `make demo`) unless --kinds says otherwise: the video kinds whose content
# space is large enough for a test split held out by content (--held_out redraw) beside 2,000 training rows at
# 12 frames and 6 colours. `direction`, `count` and the image kinds have a few dozen distinct contents per
# answer at the small sizes (count: one video for "all white"; image_color: one per cell), so a held-out split
# exhausts them; they stay available with --kinds (and --held_out mark, or few rows).
DEFAULT_KINDS = ("color_first", "color_last", "color_present", "after_event", "which_first", "count_color")
# the first seven kinds, the default before DEFAULT_KINDS above (and still the default of the Python helper
# generate(), whose keyword defaults are the small task the tests' fixtures are built on: their rows unchanged)
LEGACY_KINDS = ("color_first", "color_last", "direction", "count", "color_present", "image_color", "image_position")
# the seed of the slot order of make_split: the number of kinds when it was written, frozen so that adding
# a kind does not reorder existing data sets
SLOT_ORDER_KEY = 7
# the keyword defaults of the Python helper generate() that differ from SynthConfig's (the CLI's): the small
# task of the tests' fixtures and of the data sets made before the held-out split by content became the default
LEGACY_TASK = {"frames": 8, "num_colors": 4, "num_options": 4, "held_out": "mark"}
DATA_TYPE: dict[str, str] = {k: ("image" if k.startswith("image_") else "video") for k in KINDS}
ORDER_KINDS = frozenset({"color_first", "color_last", "direction", "after_event", "which_first"})  # answer changes if frames are shuffled
VIDEO_KINDS = tuple(k for k in KINDS if DATA_TYPE[k] == "video")
IMAGE_KINDS = tuple(k for k in KINDS if DATA_TYPE[k] == "image")


@dataclass
class SynthConfig:
    """Generate the synthetic video-reasoning data set (Video-R1 schema: train.json, test.json, videos/, images/)."""

    output_dir: str = field(help="Directory to write train.json, test.json, synth_config.json, videos/ and images/ into.")
    num_train: int = field(2000, help="Number of training rows.")
    num_test: int = field(300, help="Number of test rows (drawn from random streams disjoint from the training ones).")
    seed: int = field(0, help="Random seed; the same seed and options give byte-identical files.")
    frames: int = field(12, help="Frames per video (even, >= 4); content changes every 2 frames, i.e. frames // 2 steps (12: 6 steps, enough distinct videos per answer for the default held-out split; 8 was the default before --held_out redraw).")
    size: int = field(56, help="Side of the square frames in pixels; a multiple of --cell (one visual token per cell).")
    fps: float = field(4.0, help="Frame rate written into the mp4 (duration = frames / fps seconds).")
    kinds: list[str] = field(list(DEFAULT_KINDS), help=f"Question kinds to generate (comma-separated); default: {', '.join(DEFAULT_KINDS)}.", choices=list(KINDS))
    image_fraction: float = field(0.0, help="Fraction of rows that are image questions (the image_* kinds, PNG under images/).")
    num_colors: int = field(6, help="Difficulty: how many palette colours are used (2-8; red, green, blue, yellow, magenta, cyan, orange, purple; 4 before --held_out redraw became the default).")
    num_options: int = field(6, help="Difficulty: options per colour question (2..num_colors); direction and position questions always have 4 (4 before --held_out redraw became the default).")
    shuffle_options: bool = field(False, help="Difficulty: shuffle the option order per row; by default options keep palette order, the answer letter is still balanced.")
    color_fill: str = field("frame", help="Difficulty: colour kinds fill the whole frame ('frame') or one random cell per step ('cell').", choices=["frame", "cell"])
    cot_error_rate: float = field(0.0, help="Imperfect cold-start data: also write train_cot.json, the training rows with this fraction's reasoning and answer replaced by a flawed teacher's (one plausible wrong strategy per kind: the wrong end of the video, frames read backwards, a miscount by one, a mirrored corner, another option's colour), marked 'cot_error': true. train.json keeps the ground truth for RL and evaluation.")
    held_out: str = field("redraw", help="How test rows are kept apart from training rows, compared by content hash (kind, question, options, answer and the cell colours of every step): 'redraw' (the default) redraws a test row whose content equals a training row's from a fresh random stream (same kind and answer) until it is unseen, reports the count, and fails naming the kind and answer when max_redraws draws find nothing unseen (the task space is too small: grow frames, size or num_colors, use color_fill cell, or drop the kind); 'mark' keeps such rows and marks them seen_in_train: true (the behaviour before 'redraw' existed, opt-in).", choices=["mark", "redraw"])
    max_redraws: int = field(200, help="With held_out redraw: how many fresh draws a test row gets before synth gives up on its kind and answer.")
    cell: int = field(CELL, help="Pixels per side of one visual token's cell: the model family's frame factor, 28 for Qwen2/2.5-VL (14-px patches merged 2x2), 32 for Qwen3-VL (16 x 2); --size must be a multiple of it (Qwen3-VL: --cell 32 --size 64). The rows and cell colours do not depend on it.")
    overwrite: bool = field(False, help="Replace an existing data set in output_dir (only its own files are removed).")
    dry_run: bool = field(False, help="Build the rows and print the summary without writing anything.")

    @property
    def steps(self) -> int:
        return self.frames // STEP_FRAMES

    @property
    def grid(self) -> int:
        return self.size // self.cell

    def validate(self) -> None:
        if self.frames < 4 or self.frames % STEP_FRAMES:
            raise ValueError(f"frames must be even and >= 4 (2 frames per visual token), got {self.frames}")
        if self.cell < 1:
            raise ValueError(f"cell must be >= 1 pixel, got {self.cell}")
        if self.size < 2 * self.cell or self.size % self.cell:
            raise ValueError(f"size must be a multiple of cell={self.cell} and >= {2 * self.cell}, got {self.size}")
        if not self.fps > 0:
            raise ValueError(f"fps must be positive, got {self.fps}")
        if self.num_train < 0 or self.num_test < 0:
            raise ValueError(f"num_train and num_test must be >= 0, got {self.num_train} and {self.num_test}")
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown or not self.kinds:
            raise ValueError(f"kinds must be a non-empty subset of {list(KINDS)}, got {self.kinds}")
        if len(set(self.kinds)) != len(self.kinds):
            raise ValueError(f"kinds lists a kind twice: {self.kinds}")
        if not 0.0 <= self.image_fraction <= 1.0:
            raise ValueError(f"image_fraction must be in [0, 1], got {self.image_fraction}")
        if self.image_fraction > 0 and not self._kinds_of("image"):
            raise ValueError(f"image_fraction is {self.image_fraction} but kinds has no image kind ({list(IMAGE_KINDS)})")
        if self.image_fraction < 1 and not self._kinds_of("video"):
            raise ValueError(f"kinds has no video kind ({list(VIDEO_KINDS)}); add one or set image_fraction to 1")
        if not 2 <= self.num_colors <= len(PALETTE):
            raise ValueError(f"num_colors must be in [2, {len(PALETTE)}], got {self.num_colors}")
        if not 2 <= self.num_options <= self.num_colors:
            raise ValueError(f"num_options must be in [2, num_colors={self.num_colors}], got {self.num_options}")
        if not 0.0 <= self.cot_error_rate <= 1.0:
            raise ValueError(f"cot_error_rate must be in [0, 1], got {self.cot_error_rate}")
        if self.color_fill not in ("frame", "cell"):
            raise ValueError(f"color_fill must be 'frame' or 'cell', got {self.color_fill!r}")
        if self.held_out not in ("mark", "redraw"):
            raise ValueError(f"held_out must be 'mark' or 'redraw', got {self.held_out!r}")
        if self.max_redraws < 1:
            raise ValueError(f"max_redraws must be >= 1, got {self.max_redraws}")

    def _kinds_of(self, data_type: str) -> list[str]:
        return [k for k in self.kinds if DATA_TYPE[k] == data_type]
