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
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from video_ktr.utils.config import field, parse_args, to_dict

CELL = 28  # pixels per visual token side: 14-px patches merged 2x2
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
}
DATA_TYPE: dict[str, str] = {k: ("image" if k.startswith("image_") else "video") for k in KINDS}
ORDER_KINDS = frozenset({"color_first", "color_last", "direction"})  # answer changes if frames are shuffled
VIDEO_KINDS = tuple(k for k in KINDS if DATA_TYPE[k] == "video")
IMAGE_KINDS = tuple(k for k in KINDS if DATA_TYPE[k] == "image")


@dataclass
class SynthConfig:
    """Generate the synthetic video-reasoning data set (Video-R1 schema: train.json, test.json, videos/, images/)."""

    output_dir: str = field(help="Directory to write train.json, test.json, synth_config.json, videos/ and images/ into.")
    num_train: int = field(2000, help="Number of training rows.")
    num_test: int = field(300, help="Number of test rows (drawn from random streams disjoint from the training ones).")
    seed: int = field(0, help="Random seed; the same seed and options give byte-identical files.")
    frames: int = field(8, help="Frames per video (even, >= 4); content changes every 2 frames, i.e. frames // 2 steps.")
    size: int = field(56, help="Side of the square frames in pixels; a multiple of 28 (one visual token per 28x28 cell).")
    fps: float = field(4.0, help="Frame rate written into the mp4 (duration = frames / fps seconds).")
    kinds: list[str] = field(list(KINDS), help="Question kinds to generate (comma-separated).", choices=list(KINDS))
    image_fraction: float = field(0.0, help="Fraction of rows that are image questions (the image_* kinds, PNG under images/).")
    num_colors: int = field(4, help="Difficulty: how many palette colours are used (2-8; red, green, blue, yellow, magenta, cyan, orange, purple).")
    num_options: int = field(4, help="Difficulty: options per colour question (2..num_colors); direction and position questions always have 4.")
    shuffle_options: bool = field(False, help="Difficulty: shuffle the option order per row; by default options keep palette order, the answer letter is still balanced.")
    color_fill: str = field("frame", help="Difficulty: colour kinds fill the whole frame ('frame') or one random cell per step ('cell').", choices=["frame", "cell"])
    cot_error_rate: float = field(0.0, help="Imperfect cold-start data: also write train_cot.json, the training rows with this fraction's reasoning and answer replaced by a flawed teacher's (one plausible wrong strategy per kind: the wrong end of the video, frames read backwards, a miscount by one, a mirrored corner, another option's colour), marked 'cot_error': true. train.json keeps the ground truth for RL and evaluation.")
    overwrite: bool = field(False, help="Replace an existing data set in output_dir (only its own files are removed).")
    dry_run: bool = field(False, help="Build the rows and print the summary without writing anything.")

    @property
    def steps(self) -> int:
        return self.frames // STEP_FRAMES

    @property
    def grid(self) -> int:
        return self.size // CELL

    def validate(self) -> None:
        if self.frames < 4 or self.frames % STEP_FRAMES:
            raise ValueError(f"frames must be even and >= 4 (2 frames per visual token), got {self.frames}")
        if self.size < 2 * CELL or self.size % CELL:
            raise ValueError(f"size must be a multiple of {CELL} and >= {2 * CELL}, got {self.size}")
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

    def _kinds_of(self, data_type: str) -> list[str]:
        return [k for k in self.kinds if DATA_TYPE[k] == data_type]


@dataclass
class _Item:
    """What a kind function returns: the question and the content (cell colours per step)."""

    problem: str
    problem_type: str
    options: list[str] | None  # option texts without letters; None for non-MC
    answer: str  # the letter for MC, the number as text for numerical
    process: str  # the reasoning, without the <think> tags
    steps: np.ndarray  # uint8 (S, G, G, 3); S = 1 for images
    # a flawed teacher's (reasoning, answer) for the same question: a plausible wrong strategy
    mistake: tuple[str, str] | None = None


@dataclass
class Sample:
    """One generated row and the content its media file shows."""

    row: dict[str, Any]
    steps: np.ndarray  # uint8 (S, G, G, 3), one colour per visual token
    mistake: tuple[str, str] | None = None  # the flawed teacher's (process, answer) if this row gets one

    def pixels(self, frames: int) -> np.ndarray:
        """uint8 (frames, H, W, 3) for a video (each step held for frames // S frames), (H, W, 3) for an image."""
        img = np.repeat(np.repeat(self.steps, CELL, axis=1), CELL, axis=2)
        if self.row["data_type"] == "image":
            return np.ascontiguousarray(img[0])
        return np.ascontiguousarray(np.repeat(img, frames // len(self.steps), axis=0))


# --------------------------------------------------------------------------- small helpers


def _options_for(pool: list[str], n: int, index: int, rng: np.random.Generator, shuffle: bool) -> tuple[str, list[str]]:
    """Pick an answer from ``pool`` and ``n`` options with the answer at position ``index``.

    Unshuffled, the options keep pool order: the answer is drawn among the pool items with at least
    ``index`` items before and ``n - 1 - index`` after it, and the distractors are drawn on each side.
    """
    if shuffle:
        answer = pool[int(rng.integers(len(pool)))]
        others = [p for p in pool if p != answer]
        distractors = [others[i] for i in rng.permutation(len(others))[: n - 1]]
        return answer, distractors[:index] + [answer] + distractors[index:]
    feasible = [i for i in range(len(pool)) if i >= index and len(pool) - 1 - i >= n - 1 - index]
    a = feasible[int(rng.integers(len(feasible)))]
    before = sorted(rng.choice(a, size=index, replace=False).tolist()) if index else []
    after_pool = np.arange(a + 1, len(pool))
    after = sorted(rng.choice(after_pool, size=n - 1 - index, replace=False).tolist()) if n - 1 - index else []
    return pool[a], [pool[i] for i in before] + [pool[a]] + [pool[i] for i in after]


def _spread(rng: np.random.Generator, items: list[str], k: int) -> list[str]:
    """``k`` items in random order: all distinct if possible, else every item at least once."""
    if k <= len(items):
        return [items[i] for i in rng.permutation(len(items))[:k]]
    extra = [items[i] for i in rng.integers(len(items), size=k - len(items))]
    seq = items + extra
    return [seq[i] for i in rng.permutation(len(seq))]


def _colour_steps(names: list[str | None], cfg: SynthConfig, rng: np.random.Generator) -> np.ndarray:
    """One colour per step (None = black): the whole frame, or one random cell, per ``cfg.color_fill``."""
    g = cfg.grid
    steps = np.zeros((len(names), g, g, 3), np.uint8)
    for t, name in enumerate(names):
        if name is None:
            continue
        rgb = WHITE if name == "white" else PALETTE[name]
        if cfg.color_fill == "frame":
            steps[t] = rgb
        else:
            steps[t, rng.integers(g), rng.integers(g)] = rgb
    return steps


def _then(names: list[str | None]) -> str:
    names = [n or "black" for n in names]
    return ", then ".join(names)


def _letter(options: list[str], text: str) -> str:
    return LETTERS[options.index(text)]


def _other_option(rng: np.random.Generator, options: list[str], answer: str) -> str:
    others = [o for o in options if o != answer]
    return others[int(rng.integers(len(others)))]


def _palette(cfg: SynthConfig) -> list[str]:
    return list(PALETTE)[: cfg.num_colors]


# --------------------------------------------------------------------------- the kinds


def _color_first(rng: np.random.Generator, index: int, cfg: SynthConfig) -> _Item:
    answer, options = _options_for(_palette(cfg), cfg.num_options, index, rng, cfg.shuffle_options)
    seq = [answer] + _spread(rng, [o for o in options if o != answer], cfg.steps - 1)
    letter = LETTERS[index]
    steps = _colour_steps(seq, cfg, rng)
    wrong = seq[-1]  # the mistake: reads the wrong end of the video
    return _Item(
        problem="Which colour appears first in the video?",
        problem_type="multiple choice",
        options=options,
        answer=letter,
        process=f"The video shows {_then(seq)}. The first colour is {answer}, which is option {letter}.",
        steps=steps,
        mistake=(f"The video shows {_then(seq)}. The first colour is {wrong}, which is option {_letter(options, wrong)}.",
                 _letter(options, wrong)),
    )


def _color_last(rng: np.random.Generator, index: int, cfg: SynthConfig) -> _Item:
    answer, options = _options_for(_palette(cfg), cfg.num_options, index, rng, cfg.shuffle_options)
    seq = _spread(rng, [o for o in options if o != answer], cfg.steps - 1) + [answer]
    letter = LETTERS[index]
    steps = _colour_steps(seq, cfg, rng)
    wrong = seq[0]  # the mistake: reads the wrong end of the video
    return _Item(
        problem="Which colour appears last in the video?",
        problem_type="multiple choice",
        options=options,
        answer=letter,
        process=f"The video shows {_then(seq)}. The last colour is {answer}, which is option {letter}.",
        steps=steps,
        mistake=(f"The video shows {_then(seq)}. The last colour is {wrong}, which is option {_letter(options, wrong)}.",
                 _letter(options, wrong)),
    )


def _color_present(rng: np.random.Generator, index: int, cfg: SynthConfig) -> _Item:
    pool = _palette(cfg)
    answer, options = _options_for(pool, cfg.num_options, index, rng, cfg.shuffle_options)
    extras = [c for c in pool if c not in options]  # colours that may also appear: none of the options
    shown = [answer] + [extras[i] for i in rng.permutation(len(extras))[: int(rng.integers(len(extras) + 1))]]
    choices: list[str | None] = [*shown, None]
    seq = [choices[i] for i in rng.integers(len(choices), size=cfg.steps)]
    seq[int(rng.integers(cfg.steps))] = answer
    letter = LETTERS[index]
    steps = _colour_steps(seq, cfg, rng)
    wrong = _other_option(rng, options, answer)  # the mistake: names a colour that is not shown
    return _Item(
        problem="Which of these colours appears in the video?",
        problem_type="multiple choice",
        options=options,
        answer=letter,
        process=f"The video shows {_then(seq)}. Of the options only {answer} appears, which is option {letter}.",
        steps=steps,
        mistake=(f"The video shows {_then(seq)}. Of the options only {wrong} appears, which is option {_letter(options, wrong)}.",
                 _letter(options, wrong)),
    )


def _direction(rng: np.random.Generator, index: int, cfg: SynthConfig) -> _Item:
    answer, options = _options_for(list(DIRECTIONS), 4, index, rng, cfg.shuffle_options)
    colour = _palette(cfg)[int(rng.integers(cfg.num_colors))]
    s, g = cfg.steps, cfg.grid
    forward = [t * g // s for t in range(s)]  # 0 .. g-1, non-decreasing; e.g. 0 0 1 1
    # the reverse directions are the time-reversed forward ones, so reversing a video flips its answer
    pos = forward if answer in ("left to right", "top to bottom") else forward[::-1]
    other = int(rng.integers(g))
    steps = np.zeros((s, g, g, 3), np.uint8)
    horizontal = answer in ("left to right", "right to left")
    for t, p in enumerate(pos):
        row, col = (other, p) if horizontal else (p, other)
        steps[t, row, col] = PALETTE[colour]
    letter = LETTERS[index]

    def reasoning(direction: str) -> str:
        start, end = direction.split(" to ")
        where = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
        return (f"The {colour} square is {where[start]} in the first frames and {where[end]} in the last frames, "
                f"so it moves from {direction}, which is option {_letter(options, direction)}.")

    wrong = " to ".join(reversed(answer.split(" to ")))  # the mistake: reads the frames backwards
    return _Item(
        problem="In which direction does the square move?",
        problem_type="multiple choice",
        options=options,
        answer=letter,
        process=reasoning(answer),
        steps=steps,
        mistake=(reasoning(wrong), _letter(options, wrong)),
    )


def _count(rng: np.random.Generator, index: int, cfg: SynthConfig) -> _Item:
    s = cfg.steps
    n_white = index + 1  # 1 .. s
    white = set(rng.permutation(s)[:n_white].tolist())
    seq = ["white" if t in white else "black" for t in range(s)]
    steps = np.zeros((s, cfg.grid, cfg.grid, 3), np.uint8)
    steps[sorted(white)] = WHITE
    # the mistake: miscounts by one (always within 1..s)
    wrong = n_white + (1 if n_white == 1 else -1 if n_white == s else int(rng.choice([-1, 1])))
    return _Item(
        problem=f"The video shows {s} scenes in a row. How many of them are white?",
        problem_type="numerical",
        options=None,
        answer=str(n_white),
        process=f"The scenes are {', '.join(seq)}. {n_white} of them are white.",
        steps=steps,
        mistake=(f"The scenes are {', '.join(seq)}. {wrong} of them are white.", str(wrong)),
    )


def _image_color(rng: np.random.Generator, index: int, cfg: SynthConfig) -> _Item:
    answer, options = _options_for(_palette(cfg), cfg.num_options, index, rng, cfg.shuffle_options)
    g = cfg.grid
    steps = np.zeros((1, g, g, 3), np.uint8)
    steps[0, rng.integers(g), rng.integers(g)] = PALETTE[answer]
    letter = LETTERS[index]
    wrong = _other_option(rng, options, answer)  # the mistake: names another option's colour
    return _Item(
        problem="What colour is the square in the image?",
        problem_type="multiple choice",
        options=options,
        answer=letter,
        process=f"The square is {answer}, which is option {letter}.",
        steps=steps,
        mistake=(f"The square is {wrong}, which is option {_letter(options, wrong)}.", _letter(options, wrong)),
    )


def _image_position(rng: np.random.Generator, index: int, cfg: SynthConfig) -> _Item:
    answer, options = _options_for(list(CORNERS), 4, index, rng, cfg.shuffle_options)
    g = cfg.grid
    row = 0 if answer.startswith("top") else g - 1
    col = 0 if answer.endswith("left") else g - 1
    colour = _palette(cfg)[int(rng.integers(cfg.num_colors))]
    steps = np.zeros((1, g, g, 3), np.uint8)
    steps[0, row, col] = PALETTE[colour]
    letter = LETTERS[index]
    vertical, horizontal = answer.split(" ")
    wrong = f"{vertical} {'right' if horizontal == 'left' else 'left'}"  # the mistake: mirrors left and right
    return _Item(
        problem="Where is the square in the image?",
        problem_type="multiple choice",
        options=options,
        answer=letter,
        process=f"The {colour} square is in the {answer} corner, which is option {letter}.",
        steps=steps,
        mistake=(f"The {colour} square is in the {wrong} corner, which is option {_letter(options, wrong)}.",
                 _letter(options, wrong)),
    )


_MAKERS: dict[str, Callable[[np.random.Generator, int, SynthConfig], _Item]] = {
    "color_first": _color_first,
    "color_last": _color_last,
    "direction": _direction,
    "count": _count,
    "color_present": _color_present,
    "image_color": _image_color,
    "image_position": _image_position,
}


def num_answers(kind: str, cfg: SynthConfig) -> int:
    """How many distinct answers a kind has (answers cycle over them, so each is equally frequent)."""
    if kind == "count":
        return cfg.steps
    if kind in ("direction", "image_position"):
        return 4
    return cfg.num_options


def kind_of(row: dict[str, Any]) -> str:
    """The question kind of a row: its ``kind`` key, else its ``data_source`` (for Video-R1 rows), else its type."""
    if row.get("kind"):
        return str(row["kind"])
    source = str(row.get("data_source") or "")
    if source.startswith("synthetic/"):
        return source[len("synthetic/"):]
    return source or str(row.get("problem_type") or "unknown")


# --------------------------------------------------------------------------- rows and files


def make_split(cfg: SynthConfig, split: str) -> list[Sample]:
    """The rows of one split (no file is written). Kinds are spread evenly, answers cycle within a kind."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    split_code = SPLITS.index(split)
    n = cfg.num_train if split == "train" else cfg.num_test
    n_image = round(cfg.image_fraction * n)
    image_kinds, video_kinds = cfg._kinds_of("image"), cfg._kinds_of("video")
    slots = [image_kinds[i % len(image_kinds)] for i in range(n_image)]
    slots += [video_kinds[i % len(video_kinds)] for i in range(n - n_image)]
    order = np.random.default_rng([cfg.seed, split_code, len(KINDS)]).permutation(n)
    slots = [slots[i] for i in order]

    seen: Counter[str] = Counter()
    width = max(5, len(str(max(n - 1, 0))))
    samples = []
    for i, kind in enumerate(slots):
        j = seen[kind]
        seen[kind] += 1
        rng = np.random.default_rng([cfg.seed, split_code, list(KINDS).index(kind), j])
        item = _MAKERS[kind](rng, j % num_answers(kind, cfg), cfg)
        video = DATA_TYPE[kind] == "video"
        row = {
            "problem_id": i,
            "problem": item.problem,
            "data_type": DATA_TYPE[kind],
            "problem_type": item.problem_type,
            "options": None if item.options is None else [f"{LETTERS[k]}. {o}" for k, o in enumerate(item.options)],
            "process": f"<think>{item.process}</think>",
            "solution": f"<answer>{item.answer}</answer>",
            "path": f"./{'videos' if video else 'images'}/{split}_{i:0{width}d}.{'mp4' if video else 'png'}",
            "data_source": f"synthetic/{kind}",
            "kind": kind,
        }
        # the flawed-teacher draw has its own stream (split code 2), so it never changes a row
        flawed = split == "train" and cfg.cot_error_rate > 0 and item.mistake is not None and (
            np.random.default_rng([cfg.seed, 2, list(KINDS).index(kind), j]).random() < cfg.cot_error_rate)
        samples.append(Sample(row=row, steps=item.steps, mistake=item.mistake if flawed else None))
    return samples


def cot_rows(samples: list[Sample]) -> list[dict[str, Any]]:
    """The chain-of-thought (SFT) rows: each training row, with the flawed teacher's reasoning and
    answer where the row drew one (``cot_error``: true), else the ground truth (``cot_error``: false)."""
    rows = []
    for s in samples:
        row = dict(s.row)
        if s.mistake is not None:
            row["process"] = f"<think>{s.mistake[0]}</think>"
            row["solution"] = f"<answer>{s.mistake[1]}</answer>"
        row["cot_error"] = s.mistake is not None
        rows.append(row)
    return rows


def answer_of(row: dict[str, Any]) -> str:
    """The text inside ``<answer>...</answer>`` of a row's solution."""
    sol = row["solution"]
    return sol[len("<answer>"): -len("</answer>")]


def _signature(s: Sample) -> bytes:
    r = s.row
    return json.dumps([r["kind"], r["problem"], r["options"], r["solution"]]).encode() + s.steps.tobytes()


def _summarise(samples: list[Sample], train_sigs: set[bytes] | None = None) -> dict[str, Any]:
    """Rows and answer counts per kind; for the test split also how many rows repeat a train row exactly."""
    kinds: dict[str, dict[str, Any]] = {}
    for s in samples:
        k = kinds.setdefault(s.row["kind"], {"rows": 0, "answers": Counter(), "identical_to_train": 0})
        k["rows"] += 1
        k["answers"][answer_of(s.row)] += 1
        k["identical_to_train"] += train_sigs is not None and _signature(s) in train_sigs
    out = {}
    for name, v in sorted(kinds.items()):
        out[name] = {"rows": v["rows"], "answers": dict(sorted(v["answers"].items()))}
        if train_sigs is not None:
            out[name]["identical_to_train"] = int(v["identical_to_train"])
    return {"rows": len(samples), "kinds": out}


_OWN_FILES = ("train.json", "train_cot.json", "test.json", "synth_config.json")
_OWN_DIRS = ("videos", "images")


def _prepare_dir(out: Path, overwrite: bool) -> None:
    existing = [name for name in _OWN_FILES + _OWN_DIRS if (out / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds a data set ({', '.join(existing)}); pass --overwrite true to replace it")
    for name in existing:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _write_media(out: Path, samples: list[Sample], cfg: SynthConfig) -> None:
    from PIL import Image

    from video_ktr.data.video import write_video

    for s in samples:
        path = out / s.row["path"]
        path.parent.mkdir(exist_ok=True)
        if s.row["data_type"] == "video":
            write_video(path, s.pixels(cfg.frames), cfg.fps, lossless=True)
        else:
            Image.fromarray(s.pixels(cfg.frames)).save(path, format="PNG")


def synthesize(cfg: SynthConfig) -> dict[str, Any]:
    """Generate (and unless ``cfg.dry_run`` write) both splits; returns the summary."""
    cfg.validate()
    start = time.perf_counter()
    splits = {split: make_split(cfg, split) for split in SPLITS}
    train_sigs = {_signature(s) for s in splits["train"]}
    for s in splits["test"]:
        # marks the test rows that repeat a training row exactly (question, options, answer and video),
        # so that accuracy on truly unseen rows can be reported apart
        s.row["seen_in_train"] = _signature(s) in train_sigs
    out = Path(cfg.output_dir)
    if not cfg.dry_run:
        _prepare_dir(out, cfg.overwrite)
        for split, samples in splits.items():
            _write_media(out, samples, cfg)
            with (out / f"{split}.json").open("w") as fh:
                json.dump([s.row for s in samples], fh, indent=1)
                fh.write("\n")
        if cfg.cot_error_rate > 0:
            with (out / "train_cot.json").open("w") as fh:
                json.dump(cot_rows(splits["train"]), fh, indent=1)
                fh.write("\n")
        with (out / "synth_config.json").open("w") as fh:
            json.dump(to_dict(cfg), fh, indent=1)
            fh.write("\n")
    return {
        "output_dir": str(out),
        "written": not cfg.dry_run,
        "seconds": round(time.perf_counter() - start, 3),
        "visual_tokens_per_item": {"steps": cfg.steps, "cells": cfg.grid**2},
        "train": _summarise(splits["train"]),
        "test": _summarise(splits["test"], train_sigs),
        # with few colours and steps the space of distinct videos is small: test items repeat train items
        "test_rows_identical_to_a_train_row": sum(_signature(s) in train_sigs for s in splits["test"]),
        "cot_rows_with_errors": sum(s.mistake is not None for s in splits["train"]) if cfg.cot_error_rate > 0 else None,
    }


def generate(
    output_dir: str | Path,
    *,
    num_train: int = 2000,
    num_test: int = 300,
    seed: int = 0,
    frames: int = 8,
    size: int = 56,
    fps: float = 4.0,
    kinds: list[str] | None = None,
    image_fraction: float = 0.0,
    num_colors: int = 4,
    num_options: int = 4,
    shuffle_options: bool = False,
    color_fill: str = "frame",
    cot_error_rate: float = 0.0,
    overwrite: bool = False,
    dry_run: bool = False,
) -> dict[str, Any]:
    """Python entry point of `video-ktr synth` (same options as :class:`SynthConfig`); returns the summary."""
    cfg = SynthConfig(
        output_dir=str(output_dir), num_train=num_train, num_test=num_test, seed=seed, frames=frames, size=size,
        fps=fps, kinds=list(KINDS) if kinds is None else list(kinds), image_fraction=image_fraction,
        num_colors=num_colors, num_options=num_options, shuffle_options=shuffle_options, color_fill=color_fill,
        cot_error_rate=cot_error_rate, overwrite=overwrite, dry_run=dry_run,
    )
    return synthesize(cfg)


def format_summary(summary: dict[str, Any]) -> str:
    lines = [
        f"{'dry run, nothing written' if not summary['written'] else 'wrote ' + summary['output_dir']} "
        f"in {summary['seconds']:.2f} s; {summary['visual_tokens_per_item']['steps']} steps x "
        f"{summary['visual_tokens_per_item']['cells']} cells per video"
    ]
    for split in SPLITS:
        lines.append(f"{split}: {summary[split]['rows']} rows")
        for kind, info in summary[split]["kinds"].items():
            answers = " ".join(f"{a}:{c}" for a, c in info["answers"].items())
            seen = f"  ({info['identical_to_train']} identical to a train row)" if "identical_to_train" in info else ""
            lines.append(f"  {kind:<15} {info['rows']:>6}  {answers}{seen}")
    lines.append(f"test rows identical to a train row: {summary['test_rows_identical_to_a_train_row']}")
    if summary.get("cot_rows_with_errors") is not None:
        lines.append(f"train_cot.json: {summary['cot_rows_with_errors']} of {summary['train']['rows']} rows carry the flawed teacher's reasoning and answer")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(SynthConfig, argv, prog="video-ktr synth")
    try:
        summary = synthesize(cfg)
    except FileExistsError as exc:
        print(f"video-ktr synth: {exc}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0


__all__ = [
    "KINDS", "ORDER_KINDS", "PALETTE", "DIRECTIONS", "CORNERS", "Sample", "SynthConfig",
    "answer_of", "format_summary", "generate", "kind_of", "main", "make_split", "num_answers", "synthesize",
]
