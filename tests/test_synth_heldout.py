"""The held-out split: with held_out redraw no test row equals a training row in content."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from tests.test_synth import LEGACY
from video_ktr.commands import synth as synth_command
from video_ktr.data import synth
from video_ktr.data.synth import SynthConfig, SynthSpaceError, content_hash, generate, make_split

COLOUR_KINDS = ["color_first", "color_last", "color_present"]


def _cfg(**kw) -> SynthConfig:
    base = {"output_dir": "unused", "num_train": 40, "num_test": 10, "dry_run": True, **LEGACY}
    base.update(kw)
    cfg = SynthConfig(**base)
    cfg.validate()
    return cfg


def _hashes(samples) -> list[str]:
    return [content_hash(s.row["kind"], s.row["problem"], s.row["options"], s.row["solution"], s.steps)
            for s in samples]


def _independent_key(s) -> tuple:
    """The content compared without content_hash: what a model is shown and asked, and the answer."""
    r = s.row
    return (r["kind"], r["problem"], tuple(r["options"] or ()), r["solution"], s.steps.shape, s.steps.tobytes())


@pytest.mark.parametrize(("seed", "num_train", "num_test", "extra"), [
    (0, 600, 200, {"num_colors": 6, "color_fill": "cell", "kinds": COLOUR_KINDS}),
    (1, 1500, 300, {"num_colors": 6, "color_fill": "cell", "kinds": COLOUR_KINDS}),
    (7, 400, 150, {"num_colors": 5, "frames": 12, "kinds": ["color_first", "color_last"]}),
    (3, 2000, 300, {"num_colors": 8, "frames": 16, "shuffle_options": True, "kinds": COLOUR_KINDS}),
])
def test_redraw_leaves_no_test_row_equal_to_a_training_row(seed, num_train, num_test, extra):
    cfg = _cfg(seed=seed, num_train=num_train, num_test=num_test, held_out="redraw", **extra)
    summary = synth.synthesize(cfg)
    train = {_independent_key(s) for s in make_split(cfg, "train")}
    redraws: Counter[str] = Counter()
    test = make_split(cfg, "test", set(_hashes(make_split(cfg, "train"))), redraws)
    assert len(test) == num_test
    assert not [s.row["problem_id"] for s in test if _independent_key(s) in train]
    assert summary["test_rows_identical_to_a_train_row"] == 0
    assert summary["test_redraws"] == sum(redraws.values())
    # the kinds and answers stay balanced: a redraw keeps its row's kind and answer
    plain = make_split(cfg, "test")
    assert [(s.row["kind"], synth.answer_of(s.row)) for s in test] == [
        (s.row["kind"], synth.answer_of(s.row)) for s in plain]


@pytest.mark.parametrize(("seed", "num_train", "num_test"), [(0, 2000, 300), (1, 2000, 300), (5, 3000, 400), (2, 500, 100)])
def test_the_cli_defaults_hold_out_by_content(seed, num_train, num_test):
    """`video-ktr synth` with its defaults (held_out redraw, 12 frames, 6 colours, the default kinds): every
    test row differs in content from every training row, the redraws are counted, kinds and answers balanced."""
    cfg = SynthConfig(output_dir="unused", num_train=num_train, num_test=num_test, seed=seed, dry_run=True)
    assert cfg.held_out == "redraw"
    summary = synth.synthesize(cfg)
    train = {_independent_key(s) for s in make_split(cfg, "train")}
    test = make_split(cfg, "test", set(_hashes(make_split(cfg, "train"))))
    assert len(test) == num_test and not [s for s in test if _independent_key(s) in train]
    assert summary["test_rows_identical_to_a_train_row"] == 0 and summary["test_redraws"] > 0
    assert summary["test_redraws"] == sum(summary["test_redraws_by_kind"].values())
    assert set(summary["test"]["kinds"]) == set(synth.DEFAULT_KINDS)
    assert "test rows redrawn to differ from every train row" in synth.format_summary(summary)


def test_redraw_counts_and_changes_only_the_colliding_rows():
    cfg = _cfg(seed=0, num_train=300, num_test=120, num_colors=4, frames=12, kinds=["color_first", "color_present"],
               held_out="redraw")
    train_hashes = set(_hashes(make_split(cfg, "train")))
    plain = make_split(cfg, "test")
    collided = [h in train_hashes for h in _hashes(plain)]
    assert sum(collided) > 5  # the setting is small enough that collisions happen
    summary = synth.synthesize(cfg)
    assert summary["test_redraws"] >= sum(collided)
    assert set(summary["test_redraws_by_kind"]) <= {"color_first", "color_present"}
    redrawn = make_split(cfg, "test", train_hashes)
    for hit, a, b in zip(collided, plain, redrawn, strict=True):
        if hit:
            assert _independent_key(a) != _independent_key(b)
        else:
            assert a.row == b.row and np.array_equal(a.steps, b.steps)
    # mark mode (the opt-in old behaviour) keeps the collisions and reports them
    marked = synth.synthesize(_cfg(seed=0, num_train=300, num_test=120, num_colors=4, frames=12,
                                   kinds=["color_first", "color_present"]))
    assert marked["test_rows_identical_to_a_train_row"] == sum(collided) and marked["test_redraws"] == 0


def test_written_test_file_holds_no_training_content(tmp_path):
    out = tmp_path / "d"
    summary = generate(out, num_train=200, num_test=60, seed=2, num_colors=6, color_fill="cell",
                       kinds=COLOUR_KINDS, held_out="redraw")
    assert summary["test"]["rows"] == 60
    test_rows = json.loads((out / "test.json").read_text())
    assert all(r["seen_in_train"] is False for r in test_rows)
    train_rows = json.loads((out / "train.json").read_text())
    # the text of a test row may repeat (same question), but then its video differs: compare the frames read back
    from video_ktr.data.media import FrameSettings
    from video_ktr.data.video import load_video

    settings = FrameSettings(nframes=8, min_pixels=56 * 56, max_pixels=56 * 56)

    def key(row):
        frames = load_video(out / row["path"], settings).frames.numpy()
        cells = (frames[::2, :, 14::28, 14::28].astype(int) // 64).tobytes()  # coarse colour per cell, codec-proof
        return (row["problem"], tuple(row["options"]), row["solution"], cells)

    train_keys = {key(r) for r in train_rows}
    assert not [r["problem_id"] for r in test_rows if key(r) in train_keys]


def test_an_exhausted_space_fails_naming_the_kind_and_answer(tmp_path, capsys):
    # count with 4 steps: "4 white scenes" is one video, so one training row covers that answer
    cfg = _cfg(kinds=["count"], num_train=40, num_test=8, held_out="redraw", max_redraws=20)
    with pytest.raises(SynthSpaceError, match=r"kind 'count' \(answer \d of 4\): 20 fresh draws"):
        synth.synthesize(cfg)
    argv = ["--output_dir", str(tmp_path / "x"), "--num_train", "40", "--num_test", "8", "--kinds", "count",
            "--frames", "8"]  # redraw is the CLI's default
    assert synth_command.main(argv) == 2
    assert "too small" in capsys.readouterr().err
    assert not (tmp_path / "x" / "test.json").exists()


@pytest.mark.parametrize("bad", [{"held_out": "drop"}, {"max_redraws": 0}])
def test_held_out_options_are_validated(bad):
    with pytest.raises(ValueError):
        _cfg(**bad)


def test_content_hash_sees_every_part():
    steps = np.zeros((4, 2, 2, 3), np.uint8)
    base = content_hash("color_first", "Q?", ["A. red"], "<answer>A</answer>", steps)
    changed = steps.copy()
    changed[3, 1, 1, 0] = 1
    others = [
        content_hash("color_last", "Q?", ["A. red"], "<answer>A</answer>", steps),
        content_hash("color_first", "Q!", ["A. red"], "<answer>A</answer>", steps),
        content_hash("color_first", "Q?", ["A. blue"], "<answer>A</answer>", steps),
        content_hash("color_first", "Q?", ["A. red"], "<answer>B</answer>", steps),
        content_hash("color_first", "Q?", ["A. red"], "<answer>A</answer>", changed),
        content_hash("color_first", "Q?", ["A. red"], "<answer>A</answer>", steps.reshape(2, 2, 4, 3)),
    ]
    assert len({base, *others}) == 7
    assert base == content_hash("color_first", "Q?", ["A. red"], "<answer>A</answer>", steps.copy())
