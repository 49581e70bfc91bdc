"""The question kinds: each a function ``(rng, answer_index, config) -> _Item`` that draws one question
and its content (the cell colours per step), from its own random stream."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from video_ktr.data.synth.config import (
    CORNERS,
    DIRECTIONS,
    LETTERS,
    PALETTE,
    WHITE,
    SynthConfig,
)


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


def _choice(problem: str, options: list[str], answer: str, wrong: str, steps: np.ndarray,
            reasoning: Callable[[str], str]) -> _Item:
    """A multiple-choice item: the reasoning for ``answer`` and its letter, and the flawed teacher's
    reasoning for the option ``wrong`` (the same words, the other option) and that option's letter."""
    return _Item(problem=problem, problem_type="multiple choice", options=options, answer=_letter(options, answer),
                 process=reasoning(answer), steps=steps, mistake=(reasoning(wrong), _letter(options, wrong)))


def _palette(cfg: SynthConfig) -> list[str]:
    return list(PALETTE)[: cfg.num_colors]


def _count_item(rng: np.random.Generator, problem: str, n: int, top: int, steps: np.ndarray,
                reasoning: Callable[[int], str]) -> _Item:
    """A numerical item whose answer is the count ``n``; the flawed teacher miscounts by one (within 1..top)."""
    wrong = n + (1 if n == 1 else -1 if n == top else int(rng.choice([-1, 1])))
    return _Item(problem=problem, problem_type="numerical", options=None, answer=str(n), process=reasoning(n),
                 steps=steps, mistake=(reasoning(wrong), str(wrong)))


# --------------------------------------------------------------------------- the kinds


def _color_first(rng: np.random.Generator, index: int, cfg: SynthConfig) -> _Item:
    answer, options = _options_for(_palette(cfg), cfg.num_options, index, rng, cfg.shuffle_options)
    seq = [answer] + _spread(rng, [o for o in options if o != answer], cfg.steps - 1)
    steps = _colour_steps(seq, cfg, rng)
    wrong = seq[-1]  # the mistake: reads the wrong end of the video
    return _choice("Which colour appears first in the video?", options, answer, wrong, steps,
                   lambda c: f"The video shows {_then(seq)}. The first colour is {c}, which is option {_letter(options, c)}.")


def _color_last(rng: np.random.Generator, index: int, cfg: SynthConfig) -> _Item:
    answer, options = _options_for(_palette(cfg), cfg.num_options, index, rng, cfg.shuffle_options)
    seq = _spread(rng, [o for o in options if o != answer], cfg.steps - 1) + [answer]
    steps = _colour_steps(seq, cfg, rng)
    wrong = seq[0]  # the mistake: reads the wrong end of the video
    return _choice("Which colour appears last in the video?", options, answer, wrong, steps,
                   lambda c: f"The video shows {_then(seq)}. The last colour is {c}, which is option {_letter(options, c)}.")


def _color_present(rng: np.random.Generator, index: int, cfg: SynthConfig) -> _Item:
    pool = _palette(cfg)
    answer, options = _options_for(pool, cfg.num_options, index, rng, cfg.shuffle_options)
    extras = [c for c in pool if c not in options]  # colours that may also appear: none of the options
    shown = [answer] + [extras[i] for i in rng.permutation(len(extras))[: int(rng.integers(len(extras) + 1))]]
    choices: list[str | None] = [*shown, None]
    seq = [choices[i] for i in rng.integers(len(choices), size=cfg.steps)]
    seq[int(rng.integers(cfg.steps))] = answer
    steps = _colour_steps(seq, cfg, rng)
    wrong = _other_option(rng, options, answer)  # the mistake: names a colour that is not shown
    return _choice("Which of these colours appears in the video?", options, answer, wrong, steps,
                   lambda c: f"The video shows {_then(seq)}. Of the options only {c} appears, which is option {_letter(options, c)}.")


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

    def reasoning(direction: str) -> str:
        start, end = direction.split(" to ")
        where = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
        return (f"The {colour} square is {where[start]} in the first frames and {where[end]} in the last frames, "
                f"so it moves from {direction}, which is option {_letter(options, direction)}.")

    wrong = " to ".join(reversed(answer.split(" to ")))  # the mistake: reads the frames backwards
    return _choice("In which direction does the square move?", options, answer, wrong, steps, reasoning)


def _count(rng: np.random.Generator, index: int, cfg: SynthConfig) -> _Item:
    s = cfg.steps
    n_white = index + 1  # 1 .. s
    white = set(rng.permutation(s)[:n_white].tolist())
    seq = ["white" if t in white else "black" for t in range(s)]
    steps = np.zeros((s, cfg.grid, cfg.grid, 3), np.uint8)
    steps[sorted(white)] = WHITE
    return _count_item(rng, f"The video shows {s} scenes in a row. How many of them are white?", n_white, s, steps,
                       lambda k: f"The scenes are {', '.join(seq)}. {k} of them are white.")


def _image_color(rng: np.random.Generator, index: int, cfg: SynthConfig) -> _Item:
    answer, options = _options_for(_palette(cfg), cfg.num_options, index, rng, cfg.shuffle_options)
    g = cfg.grid
    steps = np.zeros((1, g, g, 3), np.uint8)
    steps[0, rng.integers(g), rng.integers(g)] = PALETTE[answer]
    wrong = _other_option(rng, options, answer)  # the mistake: names another option's colour
    return _choice("What colour is the square in the image?", options, answer, wrong, steps,
                   lambda c: f"The square is {c}, which is option {_letter(options, c)}.")


def _image_position(rng: np.random.Generator, index: int, cfg: SynthConfig) -> _Item:
    answer, options = _options_for(list(CORNERS), 4, index, rng, cfg.shuffle_options)
    g = cfg.grid
    row = 0 if answer.startswith("top") else g - 1
    col = 0 if answer.endswith("left") else g - 1
    colour = _palette(cfg)[int(rng.integers(cfg.num_colors))]
    steps = np.zeros((1, g, g, 3), np.uint8)
    steps[0, row, col] = PALETTE[colour]
    vertical, horizontal = answer.split(" ")
    wrong = f"{vertical} {'right' if horizontal == 'left' else 'left'}"  # the mistake: mirrors left and right
    return _choice("Where is the square in the image?", options, answer, wrong, steps,
                   lambda c: f"The {colour} square is in the {c} corner, which is option {_letter(options, c)}.")


def _after_event(rng: np.random.Generator, index: int, cfg: SynthConfig) -> _Item:
    answer, options = _options_for(_palette(cfg), cfg.num_options, index, rng, cfg.shuffle_options)
    s = cfg.steps
    t = int(rng.integers(s - 1))  # the white screen; the answer follows it
    fill = _spread(rng, [o for o in options if o != answer], s - 2) if s > 2 else []
    seq: list[str | None] = []
    for step in range(s):
        seq.append("white" if step == t else answer if step == t + 1 else fill.pop())
    before = seq[t - 1] if t > 0 else None
    # the mistake: the colour right before the white screen (or another option when nothing precedes it)
    wrong = before if before in options and before != answer else _other_option(rng, options, answer)
    steps = _colour_steps(seq, cfg, rng)

    def reasoning(colour: str) -> str:
        return (f"The video shows {_then(seq)}. Right after the white screen comes {colour}, "
                f"which is option {_letter(options, colour)}.")

    return _choice("Which colour appears right after the white screen?", options, answer, wrong, steps, reasoning)


def _which_first(rng: np.random.Generator, index: int, cfg: SynthConfig) -> _Item:
    pool = _palette(cfg)
    answer, options = _options_for(pool, 2, index, rng, cfg.shuffle_options)
    other = options[1 - index]
    s = cfg.steps
    first, second = sorted(rng.choice(s, size=2, replace=False).tolist())
    fillers: list[str | None] = [c for c in pool if c not in options] or [None]
    seq: list[str | None] = [fillers[int(rng.integers(len(fillers)))] for _ in range(s)]
    seq[first], seq[second] = answer, other
    steps = _colour_steps(seq, cfg, rng)

    def reasoning(a: str) -> str:
        b = other if a == answer else answer
        return f"The video shows {_then(seq)}. {a.capitalize()} comes before {b}, which is option {_letter(options, a)}."

    # the mistake: reads the frames backwards
    return _choice(f"Which colour appears first in the video, {options[0]} or {options[1]}?", options, answer, other,
                   steps, reasoning)


def _count_color(rng: np.random.Generator, index: int, cfg: SynthConfig) -> _Item:
    pool = _palette(cfg)
    s = cfg.steps
    n = index + 1  # 1 .. s - 1: at least one step shows something else, so no count is a single video
    target = pool[int(rng.integers(len(pool)))]
    shown = set(rng.permutation(s)[:n].tolist())
    others: list[str | None] = [c for c in pool if c != target] + [None]
    seq = [target if t in shown else others[int(rng.integers(len(others)))] for t in range(s)]
    steps = _colour_steps(seq, cfg, rng)
    scenes = _then(seq).replace(", then ", ", ")
    return _count_item(rng, f"The video shows {s} scenes in a row. In how many of them is {target} shown?", n, s - 1,
                       steps, lambda k: f"The scenes are {scenes}. {target.capitalize()} is shown in {k} of them.")


_MAKERS: dict[str, Callable[[np.random.Generator, int, SynthConfig], _Item]] = {
    "color_first": _color_first,
    "color_last": _color_last,
    "direction": _direction,
    "count": _count,
    "color_present": _color_present,
    "image_color": _image_color,
    "image_position": _image_position,
    "after_event": _after_event,
    "which_first": _which_first,
    "count_color": _count_color,
}


def num_answers(kind: str, cfg: SynthConfig) -> int:
    """How many distinct answers a kind has (answers cycle over them, so each is equally frequent)."""
    if kind == "count":
        return cfg.steps
    if kind == "count_color":
        return cfg.steps - 1
    if kind == "which_first":
        return 2
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
