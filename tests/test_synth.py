"""The synthetic data set: schema, balance, determinism, and that the videos carry the answers."""

from __future__ import annotations

import dataclasses
import inspect
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from video_ktr.commands import synth as synth_command
from video_ktr.data import synth
from video_ktr.data.synth import (
    DIRECTIONS,
    KINDS,
    LEGACY_KINDS,
    LEGACY_TASK,
    PALETTE,
    SynthConfig,
    answer_of,
    generate,
    kind_of,
    make_split,
)

NAMED = {**PALETTE, "black": (0, 0, 0), "white": (255, 255, 255)}
OPPOSITE = {"left to right": "right to left", "right to left": "left to right",
            "top to bottom": "bottom to top", "bottom to top": "top to bottom"}


# the tests of the kinds' content run on the small task of generate()'s defaults (8 frames, 4 colours, the first
# seven kinds, held_out mark), as before `video-ktr synth` switched to a held-out split by content
LEGACY = {**LEGACY_TASK, "kinds": list(LEGACY_KINDS)}


def _cfg(**kw) -> SynthConfig:
    base = {"output_dir": "unused", "num_train": 40, "num_test": 10, "dry_run": True, **LEGACY}
    base.update(kw)
    cfg = SynthConfig(**base)
    cfg.validate()
    return cfg


def _names(frames_thwc: np.ndarray) -> list[list[list[str]]]:
    """Colour name of each (step, row, col) cell, read at the cell centre of the first frame of each pair."""
    centres = frames_thwc[::2, 14::28, 14::28].astype(int)  # (S, G, G, 3)
    table = np.array(list(NAMED.values()))
    dist = ((centres[..., None, :] - table) ** 2).sum(-1)
    names = list(NAMED)
    return [[[names[i] for i in r] for r in step] for step in dist.argmin(-1)]


def _option_letter(row: dict, text: str) -> str:
    for opt in row["options"]:
        letter, _, body = opt.partition(". ")
        if body == text:
            return letter
    raise AssertionError(f"{text!r} is not among the options {row['options']}")


def _colour_answer(row: dict, frames_thwc: np.ndarray) -> str:
    """Recompute a color_first / color_last answer from pixels: the non-black colour of the first/last step."""
    steps = [[c for r in step for c in r if c != "black"] for step in _names(frames_thwc)]
    assert all(len(set(s)) == 1 for s in steps), steps
    colour = steps[0][0] if row["kind"] == "color_first" else steps[-1][0]
    return _option_letter(row, colour)


def _direction(frames_thwc: np.ndarray) -> str:
    """The direction of the one coloured cell, from its first and last positions."""
    pos = []
    for step in _names(frames_thwc):
        cells = [(r, c) for r, row in enumerate(step) for c, name in enumerate(row) if name != "black"]
        assert len(cells) == 1, step
        pos.append(cells[0])
    (r0, c0), (r1, c1) = pos[0], pos[-1]
    if r0 == r1:
        return "left to right" if c1 > c0 else "right to left"
    assert c0 == c1
    return "top to bottom" if r1 > r0 else "bottom to top"


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth")
    summary = generate(out, num_train=32, num_test=8, seed=3, image_fraction=0.25)
    return out, summary


def test_every_row_has_the_video_r1_schema():
    cfg = _cfg(num_train=70, num_test=14, image_fraction=0.2)
    for split in synth.SPLITS:
        rows = [s.row for s in make_split(cfg, split)]
        assert [r["problem_id"] for r in rows] == list(range(len(rows)))
        for r in rows:
            assert set(r) == {"problem_id", "problem", "data_type", "problem_type", "options", "process",
                              "solution", "path", "data_source", "kind"}
            assert isinstance(r["problem_id"], int) and isinstance(r["problem"], str) and r["problem"]
            assert r["kind"] in KINDS and kind_of(r) == r["kind"] and r["data_source"] == f"synthetic/{r['kind']}"
            assert r["data_type"] == ("image" if r["kind"].startswith("image_") else "video")
            ext = "png" if r["data_type"] == "image" else "mp4"
            folder = "images" if r["data_type"] == "image" else "videos"
            assert r["path"] == f"./{folder}/{split}_{r['problem_id']:05d}.{ext}"
            assert r["solution"].startswith("<answer>") and r["solution"].endswith("</answer>")
            assert r["process"].startswith("<think>") and r["process"].endswith("</think>")
            answer = answer_of(r)
            if r["kind"] == "count":
                assert r["problem_type"] == "numerical" and r["options"] is None
                assert 1 <= int(answer) <= cfg.steps
                assert f"{answer} of them are white" in r["process"]
            else:
                assert r["problem_type"] == "multiple choice"
                letters = [o.split(". ", 1)[0] for o in r["options"]]
                assert letters == list("ABCD")[: len(letters)] and answer in letters
                assert r["process"].endswith(f"which is option {answer}.</think>")


def test_kind_of_falls_back_to_data_source():
    assert kind_of({"data_source": "synthetic/count"}) == "count"
    assert kind_of({"data_source": "LLaVA-Video-178K", "problem_type": "numerical"}) == "LLaVA-Video-178K"
    assert kind_of({"problem_type": "OCR"}) == "OCR"


def test_frames_are_constant_within_pairs_and_28px_cells():
    cfg = _cfg(num_train=30, num_test=0, color_fill="cell", size=84)
    for s in make_split(cfg, "train"):
        px = s.pixels(cfg.frames)
        assert px.shape == (8, 84, 84, 3) and px.dtype == np.uint8
        assert np.array_equal(px[0::2], px[1::2])
        blocks = px.reshape(8, 3, 28, 3, 28, 3)
        assert (blocks == blocks[:, :, :1, :, :1]).all()


def test_cell_32_draws_the_same_rows_with_qwen3_vl_sized_cells(tmp_path):
    """--cell 32 --size 64 (Qwen3-VL's frame factor): the same rows and cell colours as the default 28-px set,
    each cell a 32x32 square in the written files; the default (28) files are unchanged by the option."""
    from video_ktr.data.media import FrameSettings
    from video_ktr.data.video import load_video

    a = generate(tmp_path / "28", num_train=12, num_test=4, seed=2, image_fraction=0.25)
    b = generate(tmp_path / "32", num_train=12, num_test=4, seed=2, image_fraction=0.25, size=64, cell=32)
    assert a["train"] == b["train"] and a["visual_tokens_per_item"] == b["visual_tokens_per_item"]
    for split in synth.SPLITS:
        assert (tmp_path / "28" / f"{split}.json").read_bytes() == (tmp_path / "32" / f"{split}.json").read_bytes()
    assert json.loads((tmp_path / "32" / "synth_config.json").read_text())["cell"] == 32
    cfg = SynthConfig(output_dir="unused", num_train=12, num_test=4, seed=2, image_fraction=0.25, size=64, cell=32, **LEGACY)
    for row, s in zip(json.loads((tmp_path / "32" / "train.json").read_text()), make_split(cfg, "train"), strict=True):
        path = tmp_path / "32" / row["path"]
        px = s.pixels(cfg.frames, cfg.cell)
        if row["data_type"] == "image":
            img = np.asarray(Image.open(path).convert("RGB"))
            assert img.shape == (64, 64, 3) and np.array_equal(img, px)
            continue
        frames = load_video(path, FrameSettings(nframes=8, min_pixels=64 * 64, max_pixels=64 * 64, factor=32))
        frames = frames.frames.numpy().transpose(0, 2, 3, 1)
        assert frames.shape == (8, 64, 64, 3) and np.abs(frames.astype(int) - px.astype(int)).max() <= 8
        assert np.array_equal(px[:, ::32, ::32], s.pixels(cfg.frames)[:, ::28, ::28])  # same colour per cell
    with pytest.raises(ValueError, match="multiple of cell=32"):
        SynthConfig(output_dir="x", size=56, cell=32).validate()


def test_files_exist_and_decode_to_the_intended_pixels(written):
    from video_ktr.data.media import FrameSettings
    from video_ktr.data.video import load_video

    out, summary = written
    settings = FrameSettings(nframes=8, min_pixels=56 * 56, max_pixels=56 * 56)
    cfg = SynthConfig(output_dir=str(out), num_train=32, num_test=8, seed=3, image_fraction=0.25, **LEGACY)
    for split in synth.SPLITS:
        rows = json.loads((out / f"{split}.json").read_text())
        samples = make_split(cfg, split)
        assert [{k: v for k, v in r.items() if k != "seen_in_train"} for r in rows] == [
            {k: v for k, v in s.row.items() if k != "seen_in_train"} for s in samples]
        if split == "test":
            assert all(isinstance(r["seen_in_train"], bool) for r in rows)
        for row, s in zip(rows, samples, strict=True):
            path = out / row["path"]
            assert path.is_file()
            if row["data_type"] == "image":
                img = np.asarray(Image.open(path).convert("RGB"))
                assert np.array_equal(img, s.pixels(cfg.frames))
                continue
            frames = load_video(path, settings).frames.numpy().transpose(0, 2, 3, 1)  # (T, H, W, 3)
            assert frames.shape == (8, 56, 56, 3)
            assert np.abs(frames.astype(int) - s.pixels(cfg.frames).astype(int)).max() <= 8
            if row["kind"] in ("color_first", "color_last"):
                assert _colour_answer(row, frames) == answer_of(row)
            elif row["kind"] == "direction":
                assert _option_letter(row, _direction(frames)) == answer_of(row)
                # the same video played backwards answers the opposite direction
                assert _option_letter(row, _direction(frames[::-1])) != answer_of(row)
    assert json.loads((out / "synth_config.json").read_text())["image_fraction"] == 0.25
    assert summary["train"]["rows"] == 32 and summary["test"]["rows"] == 8


def test_reversing_frames_flips_the_direction_answer():
    cfg = _cfg(kinds=["direction"], num_train=48, num_test=0, size=84, frames=12)
    for s in make_split(cfg, "train"):
        px = s.pixels(cfg.frames)
        forward, backward = _direction(px), _direction(px[::-1])
        assert _option_letter(s.row, forward) == answer_of(s.row)
        assert backward == OPPOSITE[forward]


def test_order_kinds_show_every_option_colour():
    """color_first/last at the defaults: all option colours appear, so only their order tells the answer."""
    cfg = _cfg(kinds=["color_first", "color_last"], num_train=40, num_test=0)
    for s in make_split(cfg, "train"):
        shown = {c for step in _names(s.pixels(cfg.frames)) for r in step for c in r}
        assert shown == {o.split(". ", 1)[1] for o in s.row["options"]}
        assert _colour_answer(s.row, s.pixels(cfg.frames)) == answer_of(s.row)


def test_color_present_shows_exactly_one_option_colour():
    cfg = _cfg(kinds=["color_present"], num_train=40, num_test=0, num_colors=6)
    for s in make_split(cfg, "train"):
        shown = {c for step in _names(s.pixels(cfg.frames)) for r in step for c in r}
        options = {o.split(". ", 1)[1]: o.split(". ", 1)[0] for o in s.row["options"]}
        assert [options[c] for c in shown if c in options] == [answer_of(s.row)]


@pytest.mark.parametrize("kind", list(KINDS))
def test_answers_are_balanced(kind):
    cfg = _cfg(kinds=[kind], num_train=200, num_test=0, image_fraction=1.0 if kind.startswith("image_") else 0.0)
    counts = Counter(answer_of(s.row) for s in make_split(cfg, "train"))
    assert len(counts) == synth.num_answers(kind, cfg)
    assert max(counts.values()) - min(counts.values()) <= 1


def test_shuffled_options_keep_letters_and_colours_balanced():
    cfg = _cfg(kinds=["color_first"], num_train=400, num_test=0, num_colors=6, shuffle_options=True)
    rows = [s.row for s in make_split(cfg, "train")]
    letters = Counter(answer_of(r) for r in rows)
    assert max(letters.values()) - min(letters.values()) <= 1
    colours = Counter(next(o.split(". ", 1)[1] for o in r["options"] if o.startswith(answer_of(r))) for r in rows)
    assert set(colours) == set(list(PALETTE)[:6])
    expected, sd = 400 / 6, (400 * (1 / 6) * (5 / 6)) ** 0.5
    assert all(abs(c - expected) < 4 * sd for c in colours.values())
    assert len({tuple(r["options"]) for r in rows}) > 20


def test_fixed_option_order_follows_the_palette():
    cfg = _cfg(num_train=60, num_test=0, num_colors=6, kinds=["color_first", "image_color", "direction"],
               image_fraction=0.3)
    order = list(PALETTE)
    for s in make_split(cfg, "train"):
        texts = [o.split(". ", 1)[1] for o in s.row["options"]]
        if s.row["kind"] == "direction":
            assert texts == list(DIRECTIONS)
        else:
            assert texts == sorted(texts, key=order.index) and len(texts) == 4


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path):
    runs = {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        generate(tmp_path / name, num_train=12, num_test=4, seed=seed, image_fraction=0.25)
        runs[name] = {p.relative_to(tmp_path / name): p.read_bytes()
                      for p in sorted((tmp_path / name).rglob("*")) if p.is_file() and p.name != "synth_config.json"}
    assert runs["a"] == runs["b"]
    assert runs["a"][Path("train.json")] != runs["c"][Path("train.json")]


def test_train_and_test_use_different_streams():
    cfg = _cfg(kinds=["direction"], num_train=40, num_test=40, num_colors=8, size=112)
    train, test = make_split(cfg, "train"), make_split(cfg, "test")
    same = sum(np.array_equal(a.steps, b.steps) for a, b in zip(train, test, strict=True))
    assert same < 10


def test_image_rows_only_when_image_fraction_is_positive():
    with_images = [s.row for s in make_split(_cfg(num_train=40, image_fraction=0.25), "train")]
    images = [r for r in with_images if r["data_type"] == "image"]
    assert len(images) == 10 and {r["kind"] for r in images} == {"image_color", "image_position"}
    assert all(r["path"].endswith(".png") for r in images)
    without = [s.row for s in make_split(_cfg(num_train=40), "train")]
    assert all(r["data_type"] == "video" for r in without)


def test_count_video_shows_the_counted_white_scenes():
    cfg = _cfg(kinds=["count"], num_train=24, num_test=0)
    for s in make_split(cfg, "train"):
        names = _names(s.pixels(cfg.frames))
        whites = sum(all(c == "white" for r in step for c in r) for step in names)
        assert str(whites) == answer_of(s.row)


@pytest.mark.parametrize("bad", [{"size": 60}, {"frames": 7}, {"frames": 2}, {"kinds": ["nope"]},
                                 {"image_fraction": 0.5, "kinds": ["count"]}, {"num_options": 5},
                                 {"num_colors": 9}])
def test_invalid_options_are_rejected(bad):
    with pytest.raises(ValueError):
        _cfg(**bad)


def test_generate_defaults_match_the_config_dataclass_but_the_legacy_task():
    """generate() (the fixtures' helper) keeps the small task; every other default is the CLI's."""
    params = inspect.signature(generate).parameters
    for f in dataclasses.fields(SynthConfig):
        if f.name in ("output_dir", "kinds"):
            continue
        assert params[f.name].default == LEGACY_TASK.get(f.name, f.default), f.name
    assert SynthConfig(output_dir="x").held_out == "redraw" and LEGACY_TASK["held_out"] == "mark"
    assert params["kinds"].default is None and generate("x", num_train=7, num_test=0, dry_run=True)["train"]["kinds"].keys() <= set(LEGACY_KINDS)


def test_cli_writes_refuses_to_clobber_and_overwrites(tmp_path, capsys):
    out = tmp_path / "data"
    argv = ["--output_dir", str(out), "--num_train", "4", "--num_test", "2", "--kinds", "count,direction"]
    assert synth_command.main(argv) == 0
    assert "count" in capsys.readouterr().out
    rows = json.loads((out / "train.json").read_text())
    assert len(rows) == 4 and {r["kind"] for r in rows} == {"count", "direction"}
    assert synth_command.main(argv) == 2
    (out / "unrelated.txt").write_text("keep me")
    assert synth_command.main([*argv, "--overwrite", "true", "--num_train", "2"]) == 0
    assert len(json.loads((out / "train.json").read_text())) == 2
    assert len(list((out / "videos").iterdir())) == 4
    assert (out / "unrelated.txt").read_text() == "keep me"


def test_cot_errors_leave_train_rows_alone_and_flaw_the_chosen_fraction(tmp_path):
    """train_cot.json: the same rows as train.json, a seeded fraction with a wrong answer that follows
    the kind's wrong strategy; train.json and test.json are the same as without the option."""
    clean = make_split(_cfg(num_train=700), "train")
    cfg = _cfg(num_train=700, cot_error_rate=0.3)
    flawed = make_split(cfg, "train")
    assert [s.row for s in flawed] == [s.row for s in clean]
    cot = synth.cot_rows(flawed)
    marked = [c for c in cot if c["cot_error"]]
    assert 0.25 < len(marked) / len(cot) < 0.35
    for s, c in zip(flawed, cot):
        same = ("process", "solution", "cot_error")
        assert {k: v for k, v in c.items() if k not in same} == {k: v for k, v in s.row.items() if k not in same}
        if not c["cot_error"]:
            assert (c["process"], c["solution"]) == (s.row["process"], s.row["solution"])
            continue
        wrong, right = answer_of(c), answer_of(s.row)
        assert wrong != right and c["process"] != s.row["process"]
        kind = s.row["kind"]
        if kind == "count":
            assert abs(int(wrong) - int(right)) == 1 and 1 <= int(wrong) <= cfg.steps
            continue
        letters = [o.split(". ", 1)[0] for o in s.row["options"]]
        assert wrong in letters and f"which is option {wrong}." in c["process"]
        text = {o.split(". ", 1)[0]: o.split(". ", 1)[1] for o in s.row["options"]}
        if kind == "direction":
            assert text[wrong] == OPPOSITE[text[right]]
        elif kind == "image_position":
            assert text[wrong].split()[0] == text[right].split()[0] and text[wrong] != text[right]
        elif kind in ("color_first", "color_last"):
            shown = c["process"].split("The video shows ", 1)[1].split(". ", 1)[0].split(", then ")
            assert text[wrong] == (shown[-1] if kind == "color_first" else shown[0])
    # the same seed flaws the same rows; the written file matches
    assert synth.cot_rows(make_split(cfg, "train")) == cot
    generate(tmp_path / "d", num_train=60, num_test=6, cot_error_rate=0.5)
    rows = json.loads((tmp_path / "d" / "train_cot.json").read_text())
    assert len(rows) == 60 and any(r["cot_error"] for r in rows) and not (tmp_path / "e").exists()
    generate(tmp_path / "e", num_train=60, num_test=6)
    assert not (tmp_path / "e" / "train_cot.json").exists()


def test_cot_error_rate_is_validated():
    with pytest.raises(ValueError, match="cot_error_rate"):
        _cfg(cot_error_rate=1.5)
