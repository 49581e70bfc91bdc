"""Rewards for training and scores for evaluation, with the rules of Video-R1 (whose data users bring).

Answers live in ``<answer>...</answer>``; a dataset's ``solution`` field holds ``<answer>X</answer>``.
Every function here is total on hostile text: extraction and the format check run in linear time
(``str.find`` scans, no backtracking regular expression), and a malformed completion scores 0 instead
of raising.

Training accuracy, per ``problem_type`` (see :func:`accuracy_reward`):

- multiple choice: 1 if the stripped answers are equal (case-sensitive), else 0;
- numerical: 0 if exactly one of the two contains '.' or ','; else both parse as floats after removing
  ','; 1 if they agree after ``round(x, 2)``, else 0;
- OCR: clip(1 - WER(gt, answer), 0, 1), word-level Levenshtein / max(1, #gt words);
- free-form: clip(mean of ROUGE-1, ROUGE-2, ROUGE-L F-measures with Porter stemming, 0, 1);
- regression: 1 - clip(|a - g| / |g|, 0, 1); when g == 0, 1 if a == 0 else 0;
- any other type: 0.

Two guards apply to every type: an empty predicted answer scores 0, and a non-finite number (``nan``,
``inf``, ``1e999``) scores 0 (Video-R1's regression reward gives ``nan`` a full reward).

Evaluation (:func:`eval_score`) uses the same rules, except that the whole output is the prediction
when it holds no ``<answer>`` pair and regression is scored by mean relative accuracy (MRA).

User reward functions, loaded by :func:`load_reward_function` from ``"package.module:function"``,
have the signature of the built-ins ``"accuracy"`` and ``"format"``::

    def my_reward(
        completions: list[str],      # decoded completions, G per prompt, in rollout order
        solutions: list[str],        # the matching dataset ``solution`` fields ("<answer>X</answer>")
        problem_types: list[str],    # the matching ``problem_type`` fields
        **kwargs,                    # other per-completion columns; accept and ignore unknown ones
    ) -> list[float]:                # one finite reward per completion, same order

It must not raise on malformed completions (score them 0) and must keep no state between calls.
A function in TRL's form (``f(completions, **kwargs)``, which Video-R1's rewards follow) is accepted as it is:
:mod:`video_ktr.core.reward_adapters` inspects its signature and passes the row's columns by keyword.
"""

from __future__ import annotations

import functools
import importlib
import math
import re
import types
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction
from typing import Any

import torch

from video_ktr.core.reward_adapters import adapt_reward_function

__all__ = [
    "PROBLEM_TYPES",
    "RewardFunction",
    "accuracy_reward",
    "batch_accuracy_reward",
    "batch_format_reward",
    "eval_extract",
    "eval_score",
    "extract_answer",
    "format_reward",
    "length_bonus",
    "load_reward_function",
    "mean_relative_accuracy",
    "mean_relative_accuracy_exact",
    "normalize_problem_type",
    "temporal_bonus",
]

PROBLEM_TYPES: tuple[str, ...] = ("multiple choice", "numerical", "OCR", "free-form", "regression")

RewardFunction = Callable[..., list[float]]

_ANSWER_OPEN = "<answer>"
_ANSWER_CLOSE = "</answer>"
_THINK_OPEN = "<think>"
_THINK_CLOSE = "</think>"

# Keys are lower case with "_" / "-" / runs of whitespace folded to one space.
_PROBLEM_TYPE_KEYS = {
    "multiple choice": "multiple choice",
    "numerical": "numerical",
    "ocr": "OCR",
    "free form": "free-form",
    "regression": "regression",
}

# A whitespace run, the same character class as ``\s`` in the reference regexes. Matching it once from a
# fixed position cannot backtrack: it is linear in the length of the run.
_WHITESPACE_RUN = re.compile(r"\s*")

# MRA thresholds theta = k / 20 for k = 10..19, i.e. 0.50, 0.55, ..., 0.95.
_MRA_STEPS = tuple(range(10, 20))
_MRA_EPSILON = Fraction(1, 10**8)


# --------------------------------------------------------------------------------------------------
# Problem types
# --------------------------------------------------------------------------------------------------


def normalize_problem_type(s: str) -> str:
    """The canonical name in :data:`PROBLEM_TYPES` for ``s``.

    Case-insensitive; "_", "-" and runs of whitespace count as one space, so "Multiple_Choice",
    "multiple-choice" and "free form" are accepted. Raises ValueError for anything else (non-strings
    included).
    """
    if not isinstance(s, str):
        raise ValueError(f"problem_type must be a string, got {type(s).__name__}: {s!r}")
    key = " ".join(s.replace("_", " ").replace("-", " ").split()).lower()
    try:
        return _PROBLEM_TYPE_KEYS[key]
    except KeyError:
        raise ValueError(
            f"unknown problem_type {s!r}; expected one of: {', '.join(repr(t) for t in PROBLEM_TYPES)}"
        ) from None


# --------------------------------------------------------------------------------------------------
# Extraction and format
# --------------------------------------------------------------------------------------------------


def _find_answer(text: str) -> str | None:
    """Stripped content of the first ``<answer>...</answer>`` pair, or None when there is no pair.

    Same result as ``re.search(r'<answer>\\s*(.*?)\\s*</answer>', text, re.DOTALL)``: the leftmost
    ``<answer>`` that a ``</answer>`` follows is the first ``<answer>`` (if the first has no closing
    tag after it, no later one has), and the lazy group ends at the first ``</answer>`` after it.
    Two ``str.find`` scans: O(len(text)).
    """
    start = text.find(_ANSWER_OPEN)
    if start < 0:
        return None
    begin = start + len(_ANSWER_OPEN)
    end = text.find(_ANSWER_CLOSE, begin)
    if end < 0:
        return None
    return text[begin:end].strip()


def extract_answer(text: str) -> str:
    """The stripped content of the FIRST ``<answer>...</answer>`` in ``text``; "" if there is none.

    Equivalent to ``re.search(r'<answer>\\s*(.*?)\\s*</answer>', text, re.DOTALL).group(1)``, but
    linear-time on any input (thousands of unclosed tags included). Non-string input gives "".
    """
    if not isinstance(text, str):
        return ""
    found = _find_answer(text)
    return "" if found is None else found


def eval_extract(output: str) -> str:
    """Evaluation extraction: the first ``<answer>`` pair's stripped content if the output has a pair
    (even an empty one), else the whole output stripped. Non-string input gives ""."""
    if not isinstance(output, str):
        return ""
    found = _find_answer(output)
    return output.strip() if found is None else found


def format_reward(completion: str) -> float:
    """1.0 if the WHOLE completion matches ``<think>.*?</think>\\s*<answer>.*?</answer>`` (DOTALL,
    fullmatch), else 0.0.

    A full match exists iff the text starts with ``<think>``, ends with ``</answer>``, and somewhere
    between those two (not overlapping them) a ``</think>`` is followed by whitespace and ``<answer>``;
    the lazy ``.*?`` bodies may contain anything, tags included. Each ``</think>`` is found with
    ``str.find`` and the whitespace after it is scanned once; the runs after distinct ``</think>`` are
    disjoint (a run stops at the next '<'), so the check is O(len(completion)).
    """
    if not isinstance(completion, str):
        return 0.0
    if not (completion.startswith(_THINK_OPEN) and completion.endswith(_ANSWER_CLOSE)):
        return 0.0
    limit = len(completion) - len(_ANSWER_CLOSE)  # the "<answer>" must end at or before this index
    pos = completion.find(_THINK_CLOSE, len(_THINK_OPEN), limit)
    while pos >= 0:
        after = _WHITESPACE_RUN.match(completion, pos + len(_THINK_CLOSE)).end()
        if after + len(_ANSWER_OPEN) <= limit and completion.startswith(_ANSWER_OPEN, after):
            return 1.0
        pos = completion.find(_THINK_CLOSE, pos + len(_THINK_CLOSE), limit)
    return 0.0


# --------------------------------------------------------------------------------------------------
# Per-type scoring rules
# --------------------------------------------------------------------------------------------------


def _parse_number(text: str) -> float | None:
    """``float(text.replace(',', ''))`` if that parses to a finite number, else None."""
    try:
        value = float(text.replace(",", ""))
    except ValueError:  # the only way float() rejects a str
        return None
    return value if math.isfinite(value) else None


def _has_separator(text: str) -> bool:
    return "." in text or "," in text


def _numerical_score(pred: str, gt: str) -> float:
    if _has_separator(pred) != _has_separator(gt):
        return 0.0
    a, g = _parse_number(pred), _parse_number(gt)
    if a is None or g is None:
        return 0.0
    return 1.0 if round(a, 2) == round(g, 2) else 0.0


def _word_edit_distance(ref: Sequence[str], hyp: Sequence[str]) -> int:
    """Levenshtein distance between two word sequences (unit cost insert/delete/substitute)."""
    previous = list(range(len(hyp) + 1))
    for i, ref_word in enumerate(ref, start=1):
        current = [i] + [0] * len(hyp)
        for j, hyp_word in enumerate(hyp, start=1):
            current[j] = min(
                previous[j] + 1,  # delete ref_word
                current[j - 1] + 1,  # insert hyp_word
                previous[j - 1] + (ref_word != hyp_word),  # substitute or keep
            )
        previous = current
    return previous[-1]


def _ocr_score(pred: str, gt: str) -> float:
    """clip(1 - WER, 0, 1), WER = word edit distance / max(1, #gt words)."""
    ref, hyp = gt.split(), pred.split()
    denominator = max(1, len(ref))
    # The edit distance is at least the difference in word counts: when that alone makes WER >= 1 the
    # score is 0, and skipping the O(|ref| x |hyp|) table keeps a huge answer cheap.
    if abs(len(hyp) - len(ref)) >= denominator:
        return 0.0
    wer = _word_edit_distance(ref, hyp) / denominator
    return min(1.0, max(0.0, 1.0 - wer))


@functools.lru_cache(maxsize=1)
def _rouge_scorer() -> Any:
    # Imported on first use: rouge_score pulls in nltk, which most callers of this module never need.
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)


# The free-form scorer reads at most this many ROUGE tokens of each text: the ROUGE-L table costs
# O(|gt| x |pred|), and a 100k-character answer against a 2,000-word solution took 6.5 s; capped, any input
# costs at most a 1,000 x 1,000 table. Texts within the cap score exactly as before.
FREE_FORM_MAX_TOKENS = 1000
_ROUGE_SPLIT = re.compile(r"[^a-z0-9]+")  # rouge_score's tokenizer: lower case, runs of other characters split


def _cap_rouge_tokens(text: str) -> str:
    tokens = _ROUGE_SPLIT.sub(" ", text.lower()).split()
    return " ".join(tokens[:FREE_FORM_MAX_TOKENS]) if len(tokens) > FREE_FORM_MAX_TOKENS else text


def _free_form_score(pred: str, gt: str) -> float:
    """clip(mean of ROUGE-1/2/L F-measures (Porter stemming), 0, 1), on the first FREE_FORM_MAX_TOKENS
    ROUGE tokens of each text (bounded time on any input)."""
    scores = _rouge_scorer().score(_cap_rouge_tokens(gt), _cap_rouge_tokens(pred))
    mean = (scores["rouge1"].fmeasure + scores["rouge2"].fmeasure + scores["rougeL"].fmeasure) / 3.0
    return min(1.0, max(0.0, mean))


def _regression_score(pred: str, gt: str) -> float:
    """1 - clip(|a - g| / |g|, 0, 1); when g == 0: 1 if a == 0 else 0."""
    a, g = _parse_number(pred), _parse_number(gt)
    if a is None or g is None:
        return 0.0
    if g == 0:
        return 1.0 if a == 0 else 0.0
    relative = abs(a - g) / abs(g)  # may overflow to inf for extreme finite values: clipped below
    return 1.0 - min(1.0, relative)


def mean_relative_accuracy(pred: float, gt: float) -> float:
    """MRA as the reference evaluation code computes it (Video-R1 / Video-KTR ``eval_bench.py``): in float32,
    thresholds ``arange(0.5, 0.95 + 0.025, 0.05)`` (10 values), relative error ``|p - g| / (|g| + 1e-8)``,
    score = mean over theta of ``[rel < 1 - theta]``. Float32 decides the rows at a threshold: 9 for 10
    (relative error 0.1) and 10.5 for 10 (0.05) score as they do there. Non-finite inputs score 0 (the
    reference would give nan). :func:`mean_relative_accuracy_exact` is the same rule in exact arithmetic.
    """
    if not (math.isfinite(pred) and math.isfinite(gt)):
        return 0.0
    p, g = torch.tensor(pred, dtype=torch.float32), torch.tensor(gt, dtype=torch.float32)
    if not (torch.isfinite(p) and torch.isfinite(g)):  # finite doubles beyond float32's range
        return 0.0
    relative = torch.abs(p - g) / (torch.abs(g) + 1e-8)
    hits = int((relative < (1 - _mra_thresholds())).sum())  # each threshold decided as the reference does
    return hits / len(_MRA_STEPS)  # k / 10 as a double (the reference's float32 mean gives 0.89999998 for 0.9)


@functools.cache
def _mra_thresholds() -> torch.Tensor:
    return torch.arange(0.5, 0.95 + 0.05 / 2, 0.05, dtype=torch.float32)


def mean_relative_accuracy_exact(pred: float, gt: float) -> float:
    """MRA in exact arithmetic: mean over theta in {0.50, ..., 0.95} of [ |p - g| / |g| < 1 - theta ].

    The thresholds are compared exactly (rational arithmetic on the given floats); the 1e-8 is applied only
    when g == 0 (then any |p| >= 5e-9 scores 0, p == 0 scores 1). Non-finite inputs score 0.
    """
    if not (math.isfinite(pred) and math.isfinite(gt)):
        return 0.0
    error = abs(Fraction(pred) - Fraction(gt))
    scale = abs(Fraction(gt)) if gt != 0 else _MRA_EPSILON
    # error / scale < 1 - k/20   <=>   20 * error < (20 - k) * scale
    hits = sum(1 for k in _MRA_STEPS if 20 * error < (20 - k) * scale)
    return hits / len(_MRA_STEPS)


def _mra_score(pred: str, gt: str) -> float:
    a, g = _parse_number(pred), _parse_number(gt)
    if a is None or g is None:
        return 0.0
    return mean_relative_accuracy(a, g)


_TRAIN_RULES: Mapping[str, Callable[[str, str], float]] = types.MappingProxyType(
    {
        "multiple choice": lambda pred, gt: 1.0 if pred == gt else 0.0,
        "numerical": _numerical_score,
        "OCR": _ocr_score,
        "free-form": _free_form_score,
        "regression": _regression_score,
    }
)
_EVAL_RULES: Mapping[str, Callable[[str, str], float]] = types.MappingProxyType(
    {**_TRAIN_RULES, "regression": _mra_score}
)


def _solution_answer(solution: str) -> str:
    """The ground truth: the solution's first answer pair, else the whole solution (Video-R1 data
    always has the tags; hand-made rows often hold just "B")."""
    if not isinstance(solution, str):
        return ""
    found = _find_answer(solution)
    return solution.strip() if found is None else found


def _score(
    pred: str, solution: str, problem_type: str, rules: Mapping[str, Callable[[str, str], float]]
) -> float:
    try:
        kind = normalize_problem_type(problem_type)
    except ValueError:
        return 0.0
    if not pred:  # no answer is never right, even against a malformed empty solution
        return 0.0
    return float(rules[kind](pred, _solution_answer(solution)))


def accuracy_reward(completion: str, solution: str, problem_type: str) -> float:
    """Training accuracy in [0, 1] of one completion, by problem type (rules in the module docstring).

    The prediction is :func:`extract_answer` of the completion ("" when it has no answer pair, which
    scores 0); the ground truth is the first answer pair of ``solution`` (or the whole solution when it
    has no tags). ``problem_type`` is read by :func:`normalize_problem_type`; an unknown type scores 0.
    Never raises on any input.
    """
    return _score(extract_answer(completion), solution, problem_type, _TRAIN_RULES)


def eval_score(output: str, solution: str, problem_type: str) -> float:
    """Evaluation score in [0, 1]: the rules of :func:`accuracy_reward` applied to
    :func:`eval_extract` (the whole output when there is no answer pair), except that regression is
    :func:`mean_relative_accuracy` of the parsed numbers (0 if either is not a finite number).
    OCR and free-form rows are scored (Video-R1's evaluation scores them 0). Never raises."""
    return _score(eval_extract(output), solution, problem_type, _EVAL_RULES)


# --------------------------------------------------------------------------------------------------
# Group bonuses
# --------------------------------------------------------------------------------------------------


def length_bonus(
    accuracies: list[float],
    lengths: list[int],
    *,
    bonus: float = 0.2,
    min_len: int = 320,
    max_len: int = 512,
    threshold: float = 0.1,
    min_correct: int = 2,
) -> list[float]:
    """Length bonus for the completions of ONE prompt group.

    bonus_i = ``bonus`` if acc_i > threshold and min_len <= len_i <= max_len and at least
    ``min_correct`` completions of the group have acc > threshold; else 0. ``lengths`` are the true
    completion lengths in tokens (the released code counted key tokens instead).
    """
    if len(accuracies) != len(lengths):
        raise ValueError(f"length_bonus: {len(accuracies)} accuracies but {len(lengths)} lengths")
    correct = [acc > threshold for acc in accuracies]
    if sum(correct) < min_correct:
        return [0.0] * len(accuracies)
    return [
        float(bonus) if ok and min_len <= length <= max_len else 0.0
        for ok, length in zip(correct, lengths, strict=True)
    ]


def temporal_bonus(
    ordered_acc: list[float],
    shuffled_acc: list[float],
    *,
    bonus: float = 0.3,
    ratio: float = 0.8,
    threshold: float = 0.1,
) -> list[float]:
    """T-GRPO bonus for the ordered-frame completions of ONE prompt group.

    If mean(ordered_acc) >= ratio * mean(shuffled_acc), each ordered completion with accuracy >
    ``threshold`` gets ``bonus``; otherwise (and when ``shuffled_acc`` or ``ordered_acc`` is empty)
    every bonus is 0. Returns one bonus per ordered completion.
    """
    zeros = [0.0] * len(ordered_acc)
    if not ordered_acc or not shuffled_acc:
        return zeros
    ordered_mean = sum(ordered_acc) / len(ordered_acc)
    shuffled_mean = sum(shuffled_acc) / len(shuffled_acc)
    if not ordered_mean >= ratio * shuffled_mean:  # written so that a NaN mean gives no bonus
        return zeros
    return [float(bonus) if acc > threshold else 0.0 for acc in ordered_acc]


# --------------------------------------------------------------------------------------------------
# Reward-function registry
# --------------------------------------------------------------------------------------------------


def batch_accuracy_reward(
    completions: list[str], solutions: list[str], problem_types: list[str], **kwargs: Any
) -> list[float]:
    """:func:`accuracy_reward` for each (completion, solution, problem_type); lists of equal length."""
    return [
        accuracy_reward(completion, solution, problem_type)
        for completion, solution, problem_type in zip(completions, solutions, problem_types, strict=True)
    ]


def batch_format_reward(
    completions: list[str],
    solutions: list[str] | None = None,
    problem_types: list[str] | None = None,
    **kwargs: Any,
) -> list[float]:
    """:func:`format_reward` for each completion (solutions and problem types are not used)."""
    return [format_reward(completion) for completion in completions]


_BUILTIN_REWARDS: Mapping[str, RewardFunction] = types.MappingProxyType(
    {"accuracy": batch_accuracy_reward, "format": batch_format_reward}
)


def load_reward_function(spec: str, completion_format: str = "auto") -> RewardFunction:
    """The reward function named by ``spec``: a built-in ("accuracy", "format") or
    "package.module:function" (a dotted attribute path after the colon is allowed), imported with
    importlib. The signature expected of a user function is in the module docstring; a function in TRL's
    or Video-R1's form is wrapped (:func:`video_ktr.core.reward_adapters.adapt_reward_function`, which
    ``completion_format`` is passed to).

    Raises ValueError for a malformed spec, ImportError when the module cannot be imported or lacks
    the attribute, TypeError when the attribute is not callable; each message names the spec.
    """
    name = spec.strip() if isinstance(spec, str) else ""
    if name.lower() in _BUILTIN_REWARDS:
        return _BUILTIN_REWARDS[name.lower()]
    module_name, colon, attribute = name.partition(":")
    if not (colon and module_name and attribute):
        raise ValueError(
            f"reward function {spec!r}: expected a built-in ({', '.join(sorted(_BUILTIN_REWARDS))}) "
            "or 'package.module:function'"
        )
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:  # a user module may fail to import in any way: say which spec did
        raise ImportError(f"reward function {spec!r}: cannot import module {module_name!r}: {exc}") from exc
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ImportError(
                f"reward function {spec!r}: module {module_name!r} has no attribute {attribute!r}"
            ) from None
    if not callable(target):
        raise TypeError(
            f"reward function {spec!r}: {attribute!r} is a {type(target).__name__}, not a callable"
        )
    return adapt_reward_function(target, spec, completion_format)
