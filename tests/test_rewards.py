"""Rewards and evaluation scores: the Video-R1 rules, their edge cases, and linear time on hostile text."""

from __future__ import annotations

import os
import re
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from video_ktr.core.rewards import (
    PROBLEM_TYPES,
    accuracy_reward,
    batch_accuracy_reward,
    batch_format_reward,
    eval_extract,
    eval_score,
    extract_answer,
    format_reward,
    length_bonus,
    load_reward_function,
    mean_relative_accuracy,
    normalize_problem_type,
    temporal_bonus,
)

ANSWER_RE = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL)
FORMAT_RE = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
MB = 1_000_000
TIME_BUDGET_S = 0.5  # the linear implementations take milliseconds; the regexes would take minutes


def ans(x: str) -> str:
    return f"<answer>{x}</answer>"


def completion(x: str) -> str:
    return f"<think>reasoning</think>\n<answer>{x}</answer>"


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


# ------------------------------------------------------------------------------------------------
# extract_answer / eval_extract
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<answer>B</answer>", "B"),
        ("<answer>  B \n</answer>", "B"),
        ("<think>x</think><answer>\n 12.5 \n</answer>", "12.5"),
        ("<answer>two words</answer>", "two words"),
        ("<answer>A</answer> then <answer>B</answer>", "A"),
        ("</answer><answer>A</answer>", "A"),
        ("<answer><answer>A</answer></answer>", "<answer>A"),
        ("<answer>multi\nline</answer>", "multi\nline"),
        ("<answer></answer>", ""),
        ("<answer>   </answer>", ""),
        ("no tags at all", ""),
        ("<answer>unclosed", ""),
        ("closed only</answer>", ""),
        ("</answer>B<answer>", ""),
        ("<ANSWER>B</ANSWER>", ""),
        ("", ""),
    ],
)
def test_extract_answer_takes_stripped_content_of_first_pair(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("value", [None, 3, b"<answer>B</answer>", ["<answer>B</answer>"]])
def test_extract_answer_of_non_string_is_empty(value):
    assert extract_answer(value) == ""


def test_extract_answer_strips_unicode_whitespace_like_regex_backslash_s():
    text = "<answer>\u3000\x85B\u2003\x1c</answer>"
    assert extract_answer(text) == "B" == ANSWER_RE.search(text).group(1)


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("<answer> C </answer>", "C"),
        ("  C\n", "C"),
        ("The answer is C.", "The answer is C."),
        ("<answer>C", "<answer>C"),
        ("<answer></answer> C", ""),
    ],
)
def test_eval_extract_falls_back_to_whole_output_only_without_a_pair(output, expected):
    assert eval_extract(output) == expected


# ------------------------------------------------------------------------------------------------
# format_reward
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "<think>a</think><answer>b</answer>",
        "<think>a</think>\n\n  <answer>b</answer>",
        "<think></think><answer></answer>",
        "<think>line 1\nline 2</think>\n<answer>\nB\n</answer>",
        "<think>x</think>y</think> <answer>z</answer>",  # the think body may hold a </think>
        "<think>a</think><answer>b</answer>c</answer>",  # the answer body may hold an </answer>
        "<think><think>a</think><answer>b</answer>",
    ],
)
def test_format_reward_accepts_think_then_answer(text):
    assert format_reward(text) == 1.0


@pytest.mark.parametrize(
    "text",
    [
        "hi <think>a</think><answer>b</answer>",  # text before <think>
        " <think>a</think><answer>b</answer>",  # even whitespace before
        "<think>a</think><answer>b</answer> ",  # or after </answer>
        "<think>a</think><answer>b</answer>\n",
        "<think>a</think>",  # answer missing
        "<answer>b</answer>",  # think missing
        "<think>a</think>so<answer>b</answer>",  # text between the blocks
        "<answer>b</answer><think>a</think>",  # reversed
        "<think>a<answer>b</answer>",  # think not closed
        "<think>a</think><answer>b",  # answer not closed
        "<think></answer>",
        "<think>a</think><answer></answer",
        "",
    ],
)
def test_format_reward_rejects_anything_else(text):
    assert format_reward(text) == 0.0


def test_format_reward_of_non_string_is_zero():
    assert format_reward(None) == 0.0
    assert format_reward(12) == 0.0


# ------------------------------------------------------------------------------------------------
# accuracy_reward, per problem type
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pred", "gt", "expected"),
    [
        ("B", "B", 1.0),
        (" B\n", "B", 1.0),
        ("B", " B ", 1.0),
        ("b", "B", 0.0),  # case-sensitive, as Video-R1
        ("B.", "B", 0.0),
        ("(B)", "B", 0.0),
        ("C", "B", 0.0),
    ],
)
def test_multiple_choice_is_stripped_exact_equality(pred, gt, expected):
    assert accuracy_reward(completion(pred), ans(gt), "multiple choice") == expected


def test_multiple_choice_without_answer_tag_scores_zero():
    assert accuracy_reward("<think>B</think> B", ans("B"), "multiple choice") == 0.0


def test_empty_answer_scores_zero_even_against_empty_solution():
    for problem_type in PROBLEM_TYPES:
        assert accuracy_reward(completion(""), ans(""), problem_type) == 0.0
        assert accuracy_reward("no tags", ans(""), problem_type) == 0.0


def test_solution_without_tags_is_used_whole():
    assert accuracy_reward(completion("B"), " B\n", "multiple choice") == 1.0
    assert accuracy_reward(completion("B"), "<answer>B", "multiple choice") == 0.0


def test_first_answer_tag_wins_in_completion_and_solution():
    two = "<think>t</think><answer>A</answer><answer>B</answer>"
    assert accuracy_reward(two, ans("A"), "multiple choice") == 1.0
    assert accuracy_reward(two, ans("B"), "multiple choice") == 0.0
    assert accuracy_reward(completion("A"), ans("A") + ans("B"), "multiple choice") == 1.0


@pytest.mark.parametrize(
    ("pred", "gt", "expected"),
    [
        ("3", "3", 1.0),
        ("-2", "-2", 1.0),
        ("3.0", "3", 0.0),  # exactly one has '.'
        ("3", "3.0", 0.0),
        ("3.0", "3.00", 1.0),
        ("1,000", "1000", 0.0),  # exactly one has ','
        ("1000", "1,000", 0.0),
        ("1,000", "1,000.5", 0.0),  # both have a separator: 1000 vs 1000.5
        ("1,000", "1,000.00", 1.0),
        ("1000.5", "1,000.5", 1.0),
        ("1,000", "1.000", 0.0),  # 1000 vs 1.0
        ("3.14159", "3.14", 1.0),  # equal at 2 decimals
        ("3.146", "3.14", 0.0),  # 3.15 vs 3.14
        ("2.004", "2.0", 1.0),
        ("0.125", "0.12", 1.0),  # Python's round: 0.125 is exact in binary, ties go to even
        ("1e3", "1000", 1.0),  # no separator on either side; float() accepts the exponent
        ("3 apples", "3", 0.0),
        ("three", "3", 0.0),
        ("", "3", 0.0),
        ("3", "", 0.0),
    ],
)
def test_numerical_rule(pred, gt, expected):
    assert accuracy_reward(completion(pred), ans(gt), "numerical") == expected


@pytest.mark.parametrize(
    ("pred", "gt"), [("nan", "nan"), ("inf", "inf"), ("1e999", "1e999"), ("-inf", "-inf")]
)
def test_non_finite_numbers_score_zero(pred, gt):
    assert accuracy_reward(completion(pred), ans(gt), "numerical") == 0.0
    assert accuracy_reward(completion(pred), ans(gt), "regression") == 0.0
    assert accuracy_reward(completion(pred), ans("5"), "regression") == 0.0
    assert accuracy_reward(completion("5"), ans(gt), "regression") == 0.0
    assert eval_score(completion(pred), ans(gt), "regression") == 0.0


@pytest.mark.parametrize(
    ("pred", "gt", "expected"),
    [
        ("the quick brown fox", "the quick brown fox", 1.0),
        ("the  quick\nbrown   fox", "the quick brown fox", 1.0),  # whitespace-split words
        ("the quick brown dog", "the quick brown fox", 0.75),  # 1 substitution / 4
        ("the quick fox", "the quick brown fox", 0.75),  # 1 deletion / 4
        ("the quick brown fox jumps", "the quick brown fox", 0.75),  # 1 insertion / 4
        ("The quick brown fox", "the quick brown fox", 0.75),  # case-sensitive
        ("fox brown quick the", "the quick brown fox", 0.0),  # 4 edits / 4
        ("a b c d e f g h", "the quick brown fox", 0.0),  # WER 2 clipped
        ("word", "", 0.0),  # gt empty: WER = 1 / max(1, 0)
        ("STOP", "STOP", 1.0),
    ],
)
def test_ocr_scores_one_minus_word_error_rate(pred, gt, expected):
    assert accuracy_reward(completion(pred), ans(gt), "OCR") == pytest.approx(expected)


def test_free_form_rouge_identical_disjoint_and_partial():
    gt = "the cat sat on the mat"
    assert accuracy_reward(completion(gt), ans(gt), "free-form") == pytest.approx(1.0)
    assert accuracy_reward(completion("quantum chromodynamics"), ans(gt), "free-form") == 0.0
    # R1: P=1, R=2/3 -> 0.8; R2: P=1, R=1/2 -> 2/3; RL: LCS 2 -> 0.8
    partial = accuracy_reward(completion("the cat"), ans("the cat sat"), "free-form")
    assert partial == pytest.approx((0.8 + 2 / 3 + 0.8) / 3)


def test_free_form_uses_stemming_and_ignores_case_and_punctuation():
    assert accuracy_reward(completion("Cats running!"), ans("cat runs"), "free-form") == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("pred", "gt", "expected"),
    [
        ("10", "10", 1.0),
        ("12", "10", 0.8),
        ("8", "10", 0.8),
        ("-5", "-10", 0.5),
        ("25", "10", 0.0),  # relative error 1.5 clipped to 1
        ("1,000", "1000", 1.0),  # commas removed; no separator rule for regression
        ("0", "0", 1.0),  # exact answer scores 1 also when g == 0
        ("0.0", "0", 1.0),
        ("0.5", "0", 0.0),
        ("ten", "10", 0.0),
        ("10", "", 0.0),
    ],
)
def test_regression_is_one_minus_clipped_relative_error(pred, gt, expected):
    assert accuracy_reward(completion(pred), ans(gt), "regression") == pytest.approx(expected)


@pytest.mark.parametrize("problem_type", ["multiple_choice", "Multiple-Choice", "  MULTIPLE   choice "])
def test_problem_type_is_read_loosely(problem_type):
    assert accuracy_reward(completion("B"), ans("B"), problem_type) == 1.0


@pytest.mark.parametrize("problem_type", ["essay", "", None, 3, "multiplechoice"])
def test_unknown_problem_type_scores_zero(problem_type):
    assert accuracy_reward(completion("B"), ans("B"), problem_type) == 0.0
    assert eval_score("B", ans("B"), problem_type) == 0.0


def test_normalize_problem_type_returns_canonical_names():
    assert PROBLEM_TYPES == ("multiple choice", "numerical", "OCR", "free-form", "regression")
    assert normalize_problem_type("ocr") == "OCR"
    assert normalize_problem_type("free_form") == "free-form"
    assert normalize_problem_type("Free Form") == "free-form"
    assert normalize_problem_type("multiple-choice") == "multiple choice"
    assert [normalize_problem_type(t) for t in PROBLEM_TYPES] == list(PROBLEM_TYPES)
    with pytest.raises(ValueError, match="essay"):
        normalize_problem_type("essay")
    with pytest.raises(ValueError):
        normalize_problem_type(None)


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pred", "gt", "expected"),
    [
        (1.0, 1.0, 1.0),
        (1.04, 1.0, 1.0),  # 0.04 < 1 - 0.95
        (1.3, 1.0, 0.5),  # float32 as the reference: 1.3f - 1 = 0.29999995 < 1 - 0.70
        (0.7, 1.0, 0.4),
        (1.25, 1.0, 0.5),  # exactly 0.25: theta 0.75 fails the strict <
        (13.0, 10.0, 0.4),
        (1.49, 1.0, 0.1),
        (1.5, 1.0, 0.0),  # exactly 0.5: strict < fails at theta 0.50
        (3.0, 1.0, 0.0),
        (-1.0, -1.0, 1.0),
        (0.0, 0.0, 1.0),
        (1.0, 0.0, 0.0),
        (float("nan"), 1.0, 0.0),
        (1.0, float("nan"), 0.0),
        (float("inf"), 1.0, 0.0),
        (1.0, float("-inf"), 0.0),
    ],
)
def test_mean_relative_accuracy_at_thresholds(pred, gt, expected):
    assert mean_relative_accuracy(pred, gt) == pytest.approx(expected)


@pytest.mark.parametrize("pred, gt, reference, exact", [
    (9.0, 10.0, 0.9, 0.8),     # relative error 0.1: float32 1 - 0.9 is above float32 0.1, so theta 0.90 counts
    (11.0, 10.0, 0.9, 0.8),
    (10.5, 10.0, 1.0, 0.9),    # 0.05 against 1 - 0.95
    (1.3, 1.0, 0.5, 0.4),      # float32 1.3 - 1 = 0.29999995 < 0.3
    (1e-9, 0.0, 0.9, 0.8),     # the reference's + 1e-8 in the denominator
])
def test_mra_at_a_threshold_scores_as_the_reference_float32_code(pred, gt, reference, exact):
    """The reference (eval_bench.py) computes MRA in float32 torch; rows exactly at a threshold follow it."""
    from video_ktr.core.rewards import mean_relative_accuracy_exact

    rel = torch.abs(torch.tensor(pred, dtype=torch.float32) - torch.tensor(gt, dtype=torch.float32)) / (
        torch.abs(torch.tensor(gt, dtype=torch.float32)) + 1e-8)
    ref = (rel < (1 - torch.arange(0.5, 0.95 + 0.025, 0.05))).float().mean().item()  # the reference's formula
    assert ref == pytest.approx(reference) and mean_relative_accuracy(pred, gt) == reference
    assert mean_relative_accuracy_exact(pred, gt) == exact


def test_eval_score_uses_whole_output_when_no_answer_tag():
    assert eval_score("B", ans("B"), "multiple choice") == 1.0
    assert eval_score("  B\n", ans("B"), "multiple choice") == 1.0
    assert eval_score("The answer is B", ans("B"), "multiple choice") == 0.0
    assert eval_score("42\n", ans("42"), "numerical") == 1.0
    assert eval_score("<think>B</think><answer>C</answer>", ans("B"), "multiple choice") == 0.0
    # training extraction would give "" and score 0
    assert accuracy_reward("B", ans("B"), "multiple choice") == 0.0


def test_eval_score_regression_is_mra():
    assert eval_score(completion("1.3"), ans("1"), "regression") == pytest.approx(0.5)  # float32, as the reference
    assert eval_score("13", ans("10"), "regression") == pytest.approx(0.4)
    assert eval_score("10", ans("10"), "regression") == 1.0
    assert eval_score("about ten", ans("10"), "regression") == 0.0
    assert accuracy_reward(completion("13"), ans("10"), "regression") == pytest.approx(0.7)


def test_eval_score_scores_ocr_and_free_form():
    assert eval_score("the quick brown dog", ans("the quick brown fox"), "OCR") == pytest.approx(0.75)
    assert eval_score("the cat sat", ans("the cat sat"), "free-form") == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------
# Group bonuses
# ------------------------------------------------------------------------------------------------


def test_length_bonus_rewards_correct_completions_in_length_window():
    accuracies = [1.0, 1.0, 0.0, 1.0, 1.0, 1.0]
    lengths = [400, 100, 400, 320, 512, 513]
    assert length_bonus(accuracies, lengths) == [0.2, 0.0, 0.0, 0.2, 0.2, 0.0]
    assert length_bonus([1.0, 1.0], [319, 320]) == [0.0, 0.2]


def test_length_bonus_needs_min_correct_in_group():
    assert length_bonus([1.0, 0.0, 0.0], [400, 400, 400]) == [0.0, 0.0, 0.0]
    # accuracy must exceed the threshold strictly
    assert length_bonus([0.1, 0.1, 1.0], [400, 400, 400]) == [0.0, 0.0, 0.0]
    assert length_bonus([0.11, 0.1, 1.0], [400, 400, 400]) == [0.2, 0.0, 0.2]
    assert length_bonus([1.0, 1.0], [400, 400], min_correct=3) == [0.0, 0.0]


def test_length_bonus_settings_and_edge_cases():
    assert length_bonus([1.0, 1.0], [10, 30], bonus=0.5, min_len=5, max_len=20) == [0.5, 0.0]
    assert length_bonus([], []) == []
    with pytest.raises(ValueError, match="lengths"):
        length_bonus([1.0, 1.0], [400])


def test_temporal_bonus_when_ordered_beats_shuffled():
    # ordered mean 0.5 >= 0.8 * shuffled mean 0.5
    assert temporal_bonus([1.0, 0.0, 1.0, 0.05], [1.0, 0.0]) == [0.3, 0.0, 0.3, 0.0]
    # ordered mean 0.4 == 0.8 * 0.5: the >= is inclusive
    assert temporal_bonus([1.0, 0.0, 0.0, 0.0, 1.0], [0.5, 0.5]) == [0.3, 0.0, 0.0, 0.0, 0.3]


def test_temporal_bonus_zero_when_shuffled_does_as_well():
    assert temporal_bonus([1.0, 0.0, 1.0, 0.0], [1.0, 1.0]) == [0.0, 0.0, 0.0, 0.0]  # 0.5 < 0.8
    assert temporal_bonus([1.0, 0.0], []) == [0.0, 0.0]
    assert temporal_bonus([], [1.0]) == []
    assert temporal_bonus([0.0, 0.0], [0.0, 0.0]) == [0.0, 0.0]
    assert temporal_bonus([1.0, 0.0], [1.0], bonus=1.0, ratio=0.5) == [1.0, 0.0]
    assert temporal_bonus([1.0, float("nan")], [0.5]) == [0.0, 0.0]


# ------------------------------------------------------------------------------------------------
# Reward-function registry
# ------------------------------------------------------------------------------------------------


def test_builtin_reward_functions():
    acc = load_reward_function("accuracy")
    fmt = load_reward_function(" Format ")
    completions = [completion("B"), "B", completion("C")]
    solutions = [ans("B")] * 3
    types_ = ["multiple choice"] * 3
    assert acc is batch_accuracy_reward and fmt is batch_format_reward
    assert acc(completions, solutions, types_, problem_id=[1, 2, 3]) == [1.0, 0.0, 0.0]
    assert fmt(completions, solutions, types_) == [1.0, 0.0, 1.0]
    with pytest.raises(ValueError):
        acc(completions, solutions[:2], types_)


def test_load_reward_function_imports_module_attribute():
    assert load_reward_function("os.path:join") is os.path.join


@pytest.mark.parametrize(
    ("spec", "error"),
    [
        ("accuracyy", ValueError),
        ("", ValueError),
        ("os.path:", ValueError),
        (":join", ValueError),
        ("no_such_module_for_video_ktr:fn", ImportError),
        ("os.path:no_such_function", ImportError),
        ("math:pi", TypeError),
    ],
)
def test_load_reward_function_errors_name_the_spec(spec, error):
    with pytest.raises(error, match=re.escape(repr(spec))):
        load_reward_function(spec)


# ------------------------------------------------------------------------------------------------
# Hostile input: linear time
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "<answer>" * (MB // 8),  # thousands of unclosed tags
        "<answer> x " * (MB // 11),
        "<answer>" + " " * MB,
        "x" * MB + "<answer>B</answer>",
    ],
)
def test_extraction_is_linear_on_megabyte_input(text):
    for fn in (extract_answer, eval_extract):
        _, seconds = timed(fn, text)
        assert seconds < TIME_BUDGET_S
    _, seconds = timed(accuracy_reward, text, ans("B"), "multiple choice")
    assert seconds < TIME_BUDGET_S


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>" + "</think><answer>" * (MB // 16), 0.0),  # never closed
        ("<think>" + "</think> <answer " * (MB // 17) + "</answer>", 0.0),  # near-misses everywhere
        ("<think>" + "<think></think>x" * (MB // 16) + "</answer>", 0.0),
        ("<think>" + "</think>" + " " * MB + "x<answer></answer>", 0.0),
        ("<think>" + "</think>x" * (MB // 9) + "</think><answer></answer>", 1.0),  # match at the end
        ("<think>" + "<answer></answer>" * (MB // 17) + "</think><answer>" + "</answer>" * (MB // 9), 1.0),
    ],
)
def test_format_reward_is_linear_on_megabyte_input(text, expected):
    result, seconds = timed(format_reward, text)
    assert result == expected
    assert seconds < TIME_BUDGET_S


def test_numerical_and_ocr_are_fast_on_megabyte_answers():
    huge_number = completion("1" * MB)
    result, seconds = timed(accuracy_reward, huge_number, ans("1"), "numerical")
    assert result == 0.0 and seconds < TIME_BUDGET_S
    huge_text = completion("word " * (MB // 5))
    result, seconds = timed(accuracy_reward, huge_text, ans("the quick brown fox"), "OCR")
    assert result == 0.0 and seconds < TIME_BUDGET_S


# ------------------------------------------------------------------------------------------------
# Properties
# ------------------------------------------------------------------------------------------------

FRAGMENTS = [
    "<answer>",
    "</answer>",
    "<think>",
    "</think>",
    "<answer",
    "answer>",
    "<",
    ">",
    "/",
    " ",
    "\n",
    "\t",
    "\u3000",
    "\x85",
    "B",
    "b",
    "1",
    "0",
    ".",
    ",",
    "-",
    "e",
    "3.5",
    "1,000",
    "nan",
    "inf",
    "1e999",
    "word",
    "cats",
]
tagged_text = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=4)), max_size=24).map("".join)
loose_type = st.sampled_from([*PROBLEM_TYPES, "Multiple_Choice", "ocr", "free form", "bogus", ""])
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(tagged_text)
def test_extract_answer_matches_reference_regex(text):
    match = ANSWER_RE.search(text)
    assert extract_answer(text) == (match.group(1).strip() if match else "")
    assert eval_extract(text) == (match.group(1).strip() if match else text.strip())


@FAST
@given(tagged_text)
def test_format_reward_matches_reference_regex(text):
    assert format_reward(text) == (1.0 if FORMAT_RE.fullmatch(text) else 0.0)


@FAST
@given(tagged_text, tagged_text, loose_type)
def test_rewards_never_raise_and_stay_in_unit_interval(output, solution, problem_type):
    for fn in (accuracy_reward, eval_score):
        value = fn(output, solution, problem_type)
        assert type(value) is float and 0.0 <= value <= 1.0
    assert format_reward(output) in (0.0, 1.0)


@FAST
@given(
    st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(10**6), 10**6)),
    st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(10**6), 10**6)),
)
def test_mean_relative_accuracy_is_a_multiple_of_a_tenth_in_unit_interval(pred, gt):
    value = mean_relative_accuracy(pred, gt)
    assert 0.0 <= value <= 1.0
    assert round(value * 10) == pytest.approx(value * 10)
