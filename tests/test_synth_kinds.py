"""The later question kinds (after_event, which_first, count_color): the pixels carry the answer, the
frame order matters where it should; they are among `video-ktr synth`'s default kinds, generate() keeps the
first seven."""

from __future__ import annotations

from collections import Counter

import pytest

from tests.test_synth import _cfg, _names, _option_letter
from video_ktr.data import synth
from video_ktr.data.synth import DEFAULT_KINDS, KINDS, LEGACY_KINDS, ORDER_KINDS, answer_of, make_split

NEW = ["after_event", "which_first", "count_color"]


def _step_colours(px) -> list[str]:
    """The one colour of each step (black when the step is empty); cells of a step never mix colours."""
    out = []
    for step in _names(px):
        shown = {c for row in step for c in row if c != "black"}
        assert len(shown) <= 1, step
        out.append(shown.pop() if shown else "black")
    return out


def _after_event(row, colours) -> str:
    (t,) = [i for i, c in enumerate(colours) if c == "white"]
    return _option_letter(row, colours[t + 1])


def _which_first(row, colours) -> str:
    a, b = (o.split(". ", 1)[1] for o in row["options"])
    return _option_letter(row, a if colours.index(a) < colours.index(b) else b)


@pytest.mark.parametrize("fill", ["frame", "cell"])
@pytest.mark.parametrize("frames", [8, 16])
def test_the_video_carries_the_answer(fill, frames):
    cfg = _cfg(kinds=NEW, num_train=90, num_test=0, num_colors=6, frames=frames, color_fill=fill)
    for s in make_split(cfg, "train"):
        px, row = s.pixels(cfg.frames), s.row
        colours = _step_colours(px)
        if row["kind"] == "after_event":
            assert colours.count("white") == 1 and colours[-1] != "white"
            assert _after_event(row, colours) == answer_of(row)
        elif row["kind"] == "which_first":
            texts = [o.split(". ", 1)[1] for o in row["options"]]
            assert len(texts) == 2 and all(colours.count(t) == 1 for t in texts)
            assert _which_first(row, colours) == answer_of(row)
            # the same video played backwards answers the other colour
            assert _which_first(row, _step_colours(px[::-1])) != answer_of(row)
        else:
            target = row["problem"].split("is ")[-1].removesuffix(" shown?")
            assert str(colours.count(target)) == answer_of(row)


def test_after_event_options_are_not_answered_by_presence():
    """At 8 steps every option colour is shown, so knowing which colours appear does not tell the answer."""
    cfg = _cfg(kinds=["after_event"], num_train=60, num_test=0, frames=16)
    for s in make_split(cfg, "train"):
        colours = set(_step_colours(s.pixels(cfg.frames)))
        assert {o.split(". ", 1)[1] for o in s.row["options"]} <= colours


def test_new_kinds_are_balanced_order_kinds_and_in_the_cli_defaults():
    assert list(KINDS)[:7] == list(LEGACY_KINDS) and list(KINDS)[7:] == NEW
    assert {"after_event", "which_first"} <= ORDER_KINDS and "count_color" not in ORDER_KINDS
    assert synth.SynthConfig(output_dir="x").kinds == list(DEFAULT_KINDS)
    assert list(DEFAULT_KINDS) == ["color_first", "color_last", "color_present", *NEW]
    cfg = _cfg(kinds=NEW, num_train=240, num_test=0, frames=12)
    by_kind: dict[str, Counter] = {}
    for s in make_split(cfg, "train"):
        by_kind.setdefault(s.row["kind"], Counter())[answer_of(s.row)] += 1
    assert len(by_kind["which_first"]) == 2 and len(by_kind["count_color"]) == cfg.steps - 1
    assert len(by_kind["after_event"]) == cfg.num_options


def test_flawed_teacher_of_the_new_kinds():
    cfg = _cfg(kinds=NEW, num_train=300, num_test=0, cot_error_rate=1.0, num_colors=6)
    samples = make_split(cfg, "train")
    for s, c in zip(samples, synth.cot_rows(samples), strict=True):
        wrong, right = answer_of(c), answer_of(s.row)
        assert c["cot_error"] and wrong != right
        if s.row["kind"] == "count_color":
            assert abs(int(wrong) - int(right)) == 1 and 1 <= int(wrong) < cfg.steps
        elif s.row["kind"] == "which_first":
            assert {wrong, right} == {"A", "B"}


def test_new_kinds_have_room_for_a_held_out_split():
    """With more steps and colours the later kinds leave unseen questions for a held-out split."""
    summary = synth.synthesize(_cfg(kinds=NEW, num_train=1500, num_test=300, frames=16, num_colors=6,
                                    held_out="redraw"))
    assert summary["test_rows_identical_to_a_train_row"] == 0
