"""The ablation's statistics against values computed by hand (or from closed forms)."""

from __future__ import annotations

import math

import pytest

from video_ktr.analysis.ablation_stats import (
    bootstrap_ci,
    item_bootstrap,
    mcnemar,
    mean_ci,
    paired_against_baseline,
    paired_items,
    paired_t_test,
    regularized_beta,
    student_t_cdf,
    student_t_quantile,
)


def test_t_distribution_matches_closed_forms_and_tables():
    assert student_t_cdf(1.0, 1) == pytest.approx(0.75, abs=1e-12)  # Cauchy: 1/2 + atan(t)/pi
    assert student_t_cdf(-3.0, 1) == pytest.approx(0.5 + math.atan(-3.0) / math.pi, abs=1e-12)
    for t in (0.3, 2.0, -1.7):  # df 2: 1/2 + t / (2 sqrt(2 + t^2))
        assert student_t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
    assert student_t_cdf(0.0, 7) == pytest.approx(0.5)
    # table values of t_{0.975, df}
    for df, t in ((2, 4.302653), (4, 2.776445), (10, 2.228139), (30, 2.042272)):
        assert student_t_quantile(0.975, df) == pytest.approx(t, abs=1e-6)
    assert regularized_beta(2.0, 3.0, 0.4) == pytest.approx(0.5248, abs=1e-12)  # 1 - sum_{k<2} C(4,k) .4^k .6^(4-k)


def test_mean_ci_by_hand():
    ci = mean_ci([1.0, 2.0, 3.0])
    half = 4.302653 * 1.0 / math.sqrt(3)  # t_{0.975,2} * s / sqrt(n), s = 1
    assert ci["mean"] == 2.0 and ci["low"] == pytest.approx(2 - half, abs=1e-5) and ci["high"] == pytest.approx(2 + half, abs=1e-5)
    assert mean_ci([0.4])["low"] is None and mean_ci([])["mean"] is None
    assert mean_ci([0.5, None, float("nan"), 0.5])["low"] == pytest.approx(0.5)


def test_bootstrap_ci_is_seeded_and_brackets_the_mean():
    vals = [0, 1, 1, 0, 1, 1, 1, 0, 1, 1] * 10  # 100 items, accuracy 0.7
    a, b = bootstrap_ci(vals, seed=3), bootstrap_ci(vals, seed=3)
    assert a == b and a["mean"] == pytest.approx(0.7)
    # normal approximation: 0.7 +- 1.96 sqrt(0.21 / 100) = [0.610, 0.790]; the bootstrap is close to it
    assert a["low"] == pytest.approx(0.610, abs=0.02) and a["high"] == pytest.approx(0.790, abs=0.02)
    assert bootstrap_ci([0.25] * 5) == {"n": 5, "mean": 0.25, "low": 0.25, "high": 0.25, "level": 0.95,
                                         "resamples": 10_000}
    assert bootstrap_ci([])["mean"] is None


def test_paired_t_test_by_hand():
    # differences 0.1, 0, 0.2: mean 0.1, sd 0.1, t = 0.1 / (0.1 / sqrt 3) = sqrt 3, df 2
    res = paired_t_test([0.5, 0.6, 0.7], [0.4, 0.6, 0.5])
    assert res["t"] == pytest.approx(math.sqrt(3)) and res["df"] == 2
    # df 2: p = 2 (1 - cdf) = 1 - t / sqrt(2 + t^2) = 1 - sqrt(3 / 5)
    assert res["p"] == pytest.approx(1 - math.sqrt(3 / 5), abs=1e-10)
    assert res["mean_difference"] == pytest.approx(0.1)
    assert paired_t_test([0.5, 0.6], [0.5, 0.6])["p"] == 1.0
    assert paired_t_test([0.6, 0.7], [0.5, 0.6])["t"] == math.inf
    assert paired_t_test([0.6, None, 0.9], [0.5, 0.5, None])["n"] == 1
    with pytest.raises(ValueError):
        paired_t_test([1.0], [1.0, 2.0])


def test_mcnemar_exact_by_hand():
    a = [True] * 5 + [True] + [False] * 6 + [False] * 3
    b = [True] * 5 + [False] + [True] * 6 + [False] * 3
    res = mcnemar(a, b)
    # discordant: a only 1, b only 6; p = 2 * (C(7,0) + C(7,1)) / 2^7 = 2 * 8 / 128
    assert (res["a_only"], res["b_only"], res["n"]) == (1, 6, 15)
    assert res["p"] == pytest.approx(0.125)
    assert mcnemar([True, False], [True, False])["p"] == 1.0
    assert mcnemar([True] * 3, [False] * 3)["p"] == pytest.approx(0.25)  # 2 * 1/8
    assert mcnemar([True, False], [False, True])["p"] == 1.0  # min(1, 2 * 3/4)


def _run(seed, greedy, items, unseen=()):
    return {"seed": seed, "summary": {"greedy_accuracy": greedy},
            "evaluation": {"greedy": {"items": items, "unseen_items": list(unseen)}}}


def test_paired_items_and_tests_against_the_baseline():
    grpo = [_run(0, 0.5, {"0": 1.0, "1": 0.0, "2": 0.0, "3": 1.0}, unseen=("2", "3")),
            _run(1, 0.25, {"0": 0.0, "1": 0.0, "2": 1.0, "3": 0.0}, unseen=("2", "3"))]
    ktr = [_run(0, 0.75, {"0": 1.0, "1": 1.0, "2": 1.0, "3": 0.0}, unseen=("2", "3")),
           _run(1, 0.5, {"0": 1.0, "1": 0.0, "2": 1.0, "3": None}, unseen=("2", "3")),
           _run(2, 0.9, {"0": 1.0})]  # a seed grpo did not run: left out of the pairs
    a, b = paired_items(ktr, grpo, "greedy_accuracy")
    assert (a, b) == ([True, True, True, False, True, False, True], [True, False, False, True, False, False, True])
    ua, ub = paired_items(ktr, grpo, "greedy_unseen_accuracy")
    assert (ua, ub) == ([True, False, True], [False, True, True])
    (entry,) = paired_against_baseline({"grpo": grpo, "ktr": ktr})
    assert entry["metric"] == "greedy_accuracy" and entry["seeds"] == [0, 1]
    assert entry["t_test"]["mean_difference"] == pytest.approx(0.25) and entry["t_test"]["t"] == math.inf
    assert (entry["mcnemar"]["a_only"], entry["mcnemar"]["b_only"]) == (3, 1)
    assert entry["mcnemar"]["p"] == pytest.approx(2 * 5 / 16)  # 2 * (C(4,0) + C(4,1)) / 2^4
    assert paired_against_baseline({"ktr": ktr}) == []
    boot = item_bootstrap(grpo, "greedy_unseen_accuracy")
    assert boot["n"] == 4 and boot["mean"] == pytest.approx(0.5)
