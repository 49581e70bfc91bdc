"""Reward functions in TRL's and Video-R1's form are called as they are (core/reward_adapters.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from video_ktr.core.reward_adapters import adapt_reward_function, is_native_form
from video_ktr.core.rewards import batch_accuracy_reward, load_reward_function
from video_ktr.data.rows import Sample

ROWS = [
    Sample("1", "How many red cells?", "video", "numerical", "<answer>3</answer>", media_path=Path("/v/a.mp4"),
           data_source="synth", meta={"kind": "count"}),
    Sample("2", "Which colour?", "image", "multiple choice", "<answer>B</answer>", options=["A. red", "B. blue"],
           media_path=Path("/v/b.png"), data_source="synth"),
]
TEXTS = ["<think>x</think> <answer>3</answer>", "<think>y</think> <answer>A</answer>"]


def _call(fn, texts=TEXTS, rows=ROWS):
    return fn(list(texts), [r.solution for r in rows], [r.problem_type for r in rows], samples=list(rows))


def test_native_functions_pass_through_unchanged():
    assert load_reward_function("accuracy") is batch_accuracy_reward
    from tests.reward_fixtures import count_e
    assert load_reward_function("tests.reward_fixtures:count_e") is count_e
    assert is_native_form(count_e) and not is_native_form(lambda completions, **kw: [])
    assert is_native_form(lambda texts, sols, types, **kw: [])  # no 'completions': called by position, as before


def test_trl_form_gets_conversational_completions_and_the_row_columns():
    seen = {}

    def trl(completions, prompts, solution, problem_type, path, kind, **kwargs):
        seen.update(completions=completions, prompts=prompts, solution=solution, problem_type=problem_type,
                    path=path, kind=kind, **kwargs)
        return [1.0, None]

    assert _call(adapt_reward_function(trl, "m:trl")) == [1.0, 0.0]  # None: not applicable -> 0, as TRL's nansum
    assert seen["completions"] == [[{"role": "assistant", "content": t}] for t in TEXTS]
    assert seen["solution"] == ["<answer>3</answer>", "<answer>B</answer>"]
    assert seen["problem_type"] == ["numerical", "multiple choice"]
    assert seen["path"] == ["/v/a.mp4", "/v/b.png"]
    assert seen["kind"] == ["count", None]  # an extra key only one row has is padded with None
    assert seen["options"] == [None, ["A. red", "B. blue"]] and seen["data_type"] == ["video", "image"]
    assert seen["prompts"][0][-1]["role"] == "user"
    assert any("How many red cells?" in part["text"] for part in seen["prompts"][0][-1]["content"])


def test_only_named_parameters_are_passed_without_kwargs():
    def narrow(completions, solution):
        return [float(s in c[0]["content"]) for c, s in zip(completions, solution)]

    assert _call(adapt_reward_function(narrow, "m:narrow")) == [1.0, 0.0]
    assert _call(adapt_reward_function(narrow, "m:narrow"), texts=["no answer", "<answer>B</answer>"]) == [0.0, 1.0]


def test_text_completions_by_annotation_or_by_choice():
    def annotated(completions: list[str], **kwargs) -> list[float]:
        return [float(len(c)) for c in completions]

    def plain(completions, **kwargs):
        return [float(isinstance(c, str)) for c in completions]

    assert _call(adapt_reward_function(annotated, "m:a")) == [float(len(t)) for t in TEXTS]
    assert _call(adapt_reward_function(plain, "m:p")) == [0.0, 0.0]
    assert _call(adapt_reward_function(plain, "m:p", "text")) == [1.0, 1.0]
    assert _call(adapt_reward_function(annotated, "m:a", "conversational")) == [1.0, 1.0]  # one message each


def test_the_example_file_works_in_each_form():
    acc = load_reward_function("examples.reward_functions:video_r1_accuracy_reward")
    fmt = load_reward_function("examples.reward_functions:think_format_reward")
    length = load_reward_function("examples.reward_functions:answer_length_reward")
    native = load_reward_function("examples.reward_functions:video_only_length_penalty")
    assert _call(acc) == [1.0, 0.0] == _call(batch_accuracy_reward)
    assert _call(fmt) == [1.0, 1.0]
    assert _call(length) == [0.0, 0.0]  # neither row is free-form: both None -> 0
    assert _call(native, texts=["x" * 500, "y" * 500]) == [pytest.approx(-0.1), 0.0]


def test_unsuppliable_parameters_and_bad_values_name_the_function():
    def needs_ids(completions, completion_ids, **kwargs):
        return [0.0] * len(completions)

    with pytest.raises(TypeError, match=r"'m:ids'.*completion_ids"):
        adapt_reward_function(needs_ids, "m:ids")

    def needs_column(completions, difficulty):
        return [0.0] * len(completions)

    with pytest.raises(TypeError, match=r"'m:col': needs \['difficulty'\]"):
        _call(adapt_reward_function(needs_column, "m:col"))

    def bad(completions, **kwargs):
        return ["high", 1.0]

    with pytest.raises(TypeError, match=r"'m:bad': value 0 is str"):
        _call(adapt_reward_function(bad, "m:bad"))
    with pytest.raises(TypeError, match="completion format"):
        adapt_reward_function(bad, "m:bad", "markdown")


@pytest.mark.slow
def test_a_trl_form_reward_trains_like_the_same_reward_in_our_form(tiny_setup, tmp_path):
    """Two GRPO steps with count_e in TRL's form give the native count_e run's metrics exactly."""
    from video_ktr.training.grpo import KTRTrainer
    from video_ktr.training.grpo_config import TrainConfig
    from video_ktr.utils.config import parse_args

    def run(name, fn):
        out = tmp_path / name
        cfg = parse_args(TrainConfig, tiny_setup.train_args(out, "--reward_funcs", f"accuracy,format,tests.reward_fixtures:{fn}",
                                                             "--max_steps", "2"))
        KTRTrainer(cfg).train()
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    native, trl = run("native", "count_e"), run("trl", "trl_count_e")
    assert len(native) == len(trl) == 2
    for a, b in zip(native, trl):
        assert a["count_e_reward"] == b.pop("trl_count_e_reward") and a.pop("count_e_reward") > 0
        timing = [k for k in a if "second" in k or "time" in k]
        assert {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}


def test_the_completion_format_flag_reaches_the_adapter():
    from video_ktr.training.grpo_config import TrainConfig
    from video_ktr.utils.config import parse_args

    cfg = parse_args(TrainConfig, ["--model_name_or_path", "m", "--dataset", "d.json", "--output_dir", "o",
                                   "--reward_completion_format", "text"])
    fn = load_reward_function("tests.reward_fixtures:trl_count_e", cfg.reward_completion_format)
    with pytest.raises(TypeError):  # trl_count_e reads c[0]["content"]: plain text cannot be indexed so
        _call(fn)
    assert _call(load_reward_function("tests.reward_fixtures:trl_text_count_e", "text")) == \
        [t.count("e") / len(t) for t in TEXTS]
