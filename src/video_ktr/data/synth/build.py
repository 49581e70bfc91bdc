"""Building the splits: rows, the held-out check, the summary and the files."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from video_ktr.data.synth.config import (
    CELL,
    DATA_TYPE,
    KINDS,
    LEGACY_KINDS,
    LETTERS,
    SLOT_ORDER_KEY,
    SPLITS,
    SynthConfig,
)
from video_ktr.data.synth.kinds import _MAKERS, num_answers
from video_ktr.data.video import write_video
from video_ktr.utils.config import to_dict


@dataclass
class Sample:
    """One generated row and the content its media file shows."""

    row: dict[str, Any]
    steps: np.ndarray  # uint8 (S, G, G, 3), one colour per visual token
    mistake: tuple[str, str] | None = None  # the flawed teacher's (process, answer) if this row gets one

    def pixels(self, frames: int, cell: int = CELL) -> np.ndarray:
        """uint8 (frames, H, W, 3) for a video (each step held for frames // S frames), (H, W, 3) for an image;
        each visual token's colour fills a ``cell`` x ``cell`` square (the model family's frame factor)."""
        img = np.repeat(np.repeat(self.steps, cell, axis=1), cell, axis=2)
        if self.row["data_type"] == "image":
            return np.ascontiguousarray(img[0])
        return np.ascontiguousarray(np.repeat(img, frames // len(self.steps), axis=0))


class SynthSpaceError(ValueError):
    """A held-out row cannot be drawn: every draw of its kind and answer repeats a training row."""


# --------------------------------------------------------------------------- rows and files


def content_hash(kind: str, problem: str, options: list[str] | None, solution: str, steps: np.ndarray) -> str:
    """SHA-256 of what a row asks and shows: kind, question, options, answer, and the cell colours of
    every step (with their shape), so two rows hash alike exactly when a model sees the same thing."""
    h = hashlib.sha256(json.dumps([kind, problem, options, solution, list(steps.shape)]).encode())
    h.update(np.ascontiguousarray(steps, dtype=np.uint8).tobytes())
    return h.hexdigest()


def _row_hash(s: Sample) -> str:
    r = s.row
    return content_hash(r["kind"], r["problem"], r["options"], r["solution"], s.steps)


def make_split(cfg: SynthConfig, split: str, exclude: set[str] | None = None,
               redraws: Counter[str] | None = None) -> list[Sample]:
    """The rows of one split (no file is written). Kinds are spread evenly, answers cycle within a kind.

    ``exclude``: content hashes (:func:`content_hash`) a row must not have. A row that hits one is
    drawn again from the stream ``(seed, split, kind, j, attempt)`` with the same kind and answer, up
    to ``cfg.max_redraws`` times (then :class:`SynthSpaceError`); ``redraws`` counts the extra draws per
    kind. Rows that do not collide are the same as without ``exclude``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    split_code = SPLITS.index(split)
    n = cfg.num_train if split == "train" else cfg.num_test
    n_image = round(cfg.image_fraction * n)
    image_kinds, video_kinds = cfg._kinds_of("image"), cfg._kinds_of("video")
    slots = [image_kinds[i % len(image_kinds)] for i in range(n_image)]
    slots += [video_kinds[i % len(video_kinds)] for i in range(n - n_image)]
    order = np.random.default_rng([cfg.seed, split_code, SLOT_ORDER_KEY]).permutation(n)
    slots = [slots[i] for i in order]

    seen: Counter[str] = Counter()
    width = max(5, len(str(max(n - 1, 0))))
    samples = []
    for i, kind in enumerate(slots):
        j = seen[kind]
        seen[kind] += 1
        item = _draw(cfg, split_code, kind, j, exclude, redraws)
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


def _draw(cfg: SynthConfig, split_code: int, kind: str, j: int, exclude: set[str] | None,
          redraws: Counter[str] | None):
    """The ``j``-th item of ``kind``: the first draw whose content hash is not in ``exclude``."""
    answer = j % num_answers(kind, cfg)
    key = [cfg.seed, split_code, list(KINDS).index(kind), j]
    item = _MAKERS[kind](np.random.default_rng(key), answer, cfg)
    attempt = 0
    while exclude and _item_hash(kind, item) in exclude:
        attempt += 1
        if attempt > cfg.max_redraws:
            raise SynthSpaceError(
                f"synth: test item {j} of kind {kind!r} (answer {answer + 1} of {num_answers(kind, cfg)}): "
                f"{cfg.max_redraws} fresh draws all repeat a training row; the task space of this kind and "
                f"answer is too small for num_train={cfg.num_train} (grow frames, size or num_colors, use "
                f"color_fill cell, drop the kind, or use held_out mark)")
        item = _MAKERS[kind](np.random.default_rng([*key, attempt]), answer, cfg)
    if redraws is not None:
        redraws[kind] += attempt
    return item


def _item_hash(kind: str, item) -> str:
    options = None if item.options is None else [f"{LETTERS[k]}. {o}" for k, o in enumerate(item.options)]
    return content_hash(kind, item.problem, options, f"<answer>{item.answer}</answer>", item.steps)


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


def _summarise(samples: list[Sample], train_sigs: set[str] | None = None) -> dict[str, Any]:
    """Rows and answer counts per kind; for the test split also how many rows repeat a train row exactly."""
    kinds: dict[str, dict[str, Any]] = {}
    for s in samples:
        k = kinds.setdefault(s.row["kind"], {"rows": 0, "answers": Counter(), "identical_to_train": 0})
        k["rows"] += 1
        k["answers"][answer_of(s.row)] += 1
        k["identical_to_train"] += train_sigs is not None and _row_hash(s) in train_sigs
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
    for s in samples:
        path = out / s.row["path"]
        path.parent.mkdir(exist_ok=True)
        if s.row["data_type"] == "video":
            write_video(path, s.pixels(cfg.frames, cfg.cell), cfg.fps, lossless=True)
        else:
            Image.fromarray(s.pixels(cfg.frames, cfg.cell)).save(path, format="PNG")


def synthesize(cfg: SynthConfig) -> dict[str, Any]:
    """Generate (and unless ``cfg.dry_run`` write) both splits; returns the summary."""
    cfg.validate()
    start = time.perf_counter()
    train = make_split(cfg, "train")
    train_sigs = {_row_hash(s) for s in train}
    redraws: Counter[str] = Counter()
    splits = {"train": train, "test": make_split(cfg, "test", train_sigs if cfg.held_out == "redraw" else None, redraws)}
    for s in splits["test"]:
        # marks the test rows that repeat a training row exactly (question, options, answer and video),
        # so that accuracy on truly unseen rows can be reported apart
        s.row["seen_in_train"] = _row_hash(s) in train_sigs
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
        "test_rows_identical_to_a_train_row": sum(_row_hash(s) in train_sigs for s in splits["test"]),
        "held_out": cfg.held_out,
        # with held_out redraw: how many extra draws the test rows needed to differ from every training row
        "test_redraws": sum(redraws.values()),
        "test_redraws_by_kind": dict(sorted(redraws.items())),
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
    held_out: str = "mark",
    max_redraws: int = 200,
    cell: int = CELL,
    overwrite: bool = False,
    dry_run: bool = False,
) -> dict[str, Any]:
    """Python entry point of `video-ktr synth` (same options as :class:`SynthConfig`); returns the summary.

    Its keyword defaults are the small task of the tests' fixtures and of every data set made before
    `video-ktr synth` switched to a held-out split by content: 8 frames, 4 colours, the first seven kinds
    (``LEGACY_KINDS``) and ``held_out="mark"`` (such small sets repeat training rows: a redraw would change
    their test rows, or find nothing unseen). Pass ``held_out="redraw"`` and a large enough task (the CLI's
    defaults: 12 frames, 6 colours and options, ``DEFAULT_KINDS``) for a split held out by content.
    """
    cfg = SynthConfig(
        output_dir=str(output_dir), num_train=num_train, num_test=num_test, seed=seed, frames=frames, size=size,
        fps=fps, kinds=list(LEGACY_KINDS) if kinds is None else list(kinds), image_fraction=image_fraction,
        num_colors=num_colors, num_options=num_options, shuffle_options=shuffle_options, color_fill=color_fill,
        cot_error_rate=cot_error_rate, held_out=held_out, max_redraws=max_redraws, cell=cell, overwrite=overwrite,
        dry_run=dry_run,
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
    if summary.get("held_out") == "redraw":
        by_kind = ", ".join(f"{k} {n}" for k, n in summary["test_redraws_by_kind"].items() if n)
        lines.append(f"test rows redrawn to differ from every train row: {summary['test_redraws']} draws"
                     + (f" ({by_kind})" if by_kind else ""))
    if summary.get("cot_rows_with_errors") is not None:
        lines.append(f"train_cot.json: {summary['cot_rows_with_errors']} of {summary['train']['rows']} rows carry the flawed teacher's reasoning and answer")
    return "\n".join(lines)
