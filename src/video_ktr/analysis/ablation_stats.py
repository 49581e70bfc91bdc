"""Statistics of the ablation: per-variant spread, confidence intervals and paired tests against GRPO.

Pure functions of numbers (no torch, no scipy):

- ``stats``: mean and sample standard deviation over seeds; ``pooled_std`` and ``reading``: the rough
  "does the difference exceed the seed spread" check;
- ``mean_ci``: Student-t interval of a mean over seeds; ``bootstrap_ci``: percentile bootstrap of a mean;
- ``paired_t_test``: two-sided paired t-test of two variants over matched seeds;
- ``mcnemar``: exact two-sided McNemar test on paired per-item correctness (same seed, same question);
- ``student_t_cdf`` / ``student_t_quantile``: the t distribution through the regularised incomplete beta.
"""

from __future__ import annotations

import math
import random
import statistics
from typing import Any

BASELINE = "grpo"
EXCEEDS, WITHIN = "exceeds the seed spread", "within the seed spread"


def finite(values: list[Any]) -> list[float]:
    """The finite numbers among ``values`` (bools, None and NaN left out)."""
    return [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]


def stats(values: list[Any]) -> dict[str, Any]:
    """Mean and sample standard deviation (n - 1) of the finite values; std is None below 2 values."""
    vals = finite(values)
    return {"values": list(values), "n": len(vals),
            "mean": statistics.fmean(vals) if vals else None,
            "std": statistics.stdev(vals) if len(vals) >= 2 else None}


def pooled_std(a: dict[str, Any], b: dict[str, Any]) -> float | None:
    """sqrt(((n_a - 1) s_a^2 + (n_b - 1) s_b^2) / (n_a + n_b - 2)): the seed-to-seed spread of both."""
    dof = a["n"] + b["n"] - 2
    if dof <= 0 or a["n"] == 0 or b["n"] == 0:
        return None
    ss = sum((x["n"] - 1) * (x["std"] or 0.0) ** 2 for x in (a, b))
    return math.sqrt(ss / dof)


def reading(variants: dict[str, dict[str, Any]], metric: str = "greedy_accuracy") -> list[dict[str, Any]]:
    """For each variant vs grpo: does the difference of the means exceed the pooled seed std?"""
    if BASELINE not in variants:
        return []
    base = variants[BASELINE]["metrics"][metric]
    out = []
    for name, v in variants.items():
        if name == BASELINE:
            continue
        st = v["metrics"][metric]
        entry: dict[str, Any] = {"variant": name, "baseline": BASELINE, "metric": metric, "mean": st["mean"],
                                 "baseline_mean": base["mean"], "difference": None, "pooled_std": None, "verdict": None}
        if st["mean"] is None or base["mean"] is None:
            entry["text"] = f"{name} vs {BASELINE}: no held-out accuracy to compare"
        else:
            diff = st["mean"] - base["mean"]
            pooled = pooled_std(st, base)
            entry.update(difference=diff, pooled_std=pooled)
            if pooled is None:
                entry["text"] = (f"{name} vs {BASELINE}: mean {metric} {st['mean']:.3f} vs {base['mean']:.3f} "
                                 f"(difference {diff:+.3f}); one seed each, no seed spread to compare with")
            else:
                entry["verdict"] = EXCEEDS if abs(diff) > pooled else WITHIN
                entry["text"] = (f"{name} vs {BASELINE}: mean {metric} {st['mean']:.3f} vs {base['mean']:.3f}, "
                                 f"difference {diff:+.3f}, pooled seed std {pooled:.3f}: {entry['verdict']}")
        out.append(entry)
    return out


# ---------------------------------------------------------------------------------------- the t distribution


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz), to 1e-15."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((a + m2 - 1.0) * (a + m2)), -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1.0))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularised incomplete beta function, for a, b > 0 and x in [0, 1]."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x must be in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` > 0 degrees of freedom."""
    if df <= 0:
        raise ValueError(f"df must be > 0, got {df}")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * regularized_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def student_t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p (bisection on student_t_cdf to 1e-12)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    lo, hi = -1.0, 1.0
    while student_t_cdf(lo, df) > p:
        lo *= 2
    while student_t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if student_t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return (lo + hi) / 2


# ---------------------------------------------------------------------------------------- intervals and tests


def mean_ci(values: list[Any], level: float = 0.95) -> dict[str, Any]:
    """Student-t interval of the mean: mean +- t_{(1+level)/2, n-1} * s / sqrt(n); None bounds below 2 values."""
    vals = finite(values)
    n = len(vals)
    if n < 2:
        return {"n": n, "mean": vals[0] if vals else None, "low": None, "high": None, "level": level}
    mean, sd = statistics.fmean(vals), statistics.stdev(vals)
    half = student_t_quantile((1 + level) / 2, n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "low": mean - half, "high": mean + half, "level": level}


def bootstrap_ci(values: list[Any], level: float = 0.95, resamples: int = 10_000, seed: int = 0) -> dict[str, Any]:
    """Percentile bootstrap interval of the mean: resample with replacement ``resamples`` times (seeded),
    take the (1 - level)/2 and (1 + level)/2 quantiles of the resampled means (linear interpolation)."""
    vals = finite(values)
    n = len(vals)
    if n == 0:
        return {"n": 0, "mean": None, "low": None, "high": None, "level": level, "resamples": resamples}
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(vals, k=n)) for _ in range(resamples))

    def quantile(q: float) -> float:
        pos = q * (len(means) - 1)
        i = math.floor(pos)
        j = min(i + 1, len(means) - 1)
        return means[i] + (means[j] - means[i]) * (pos - i)

    return {"n": n, "mean": statistics.fmean(vals), "low": quantile((1 - level) / 2), "high": quantile((1 + level) / 2),
            "level": level, "resamples": resamples}


def paired_t_test(a: list[Any], b: list[Any]) -> dict[str, Any]:
    """Two-sided paired t-test of a - b over pairs where both are finite numbers (e.g. matched seeds).

    t = mean(d) / (sd(d) / sqrt(n)), df = n - 1, p = 2 * P(T > |t|). With fewer than 2 pairs t and p are
    None; with sd(d) = 0, t is +-inf and p 0 (or t 0 and p 1 when every difference is 0).
    """
    if len(a) != len(b):
        raise ValueError(f"paired values need equal lengths, got {len(a)} and {len(b)}")
    diffs = [x - y for x, y in zip(a, b, strict=True) if finite([x]) and finite([y])]
    n = len(diffs)
    out: dict[str, Any] = {"n": n, "mean_difference": statistics.fmean(diffs) if diffs else None,
                           "t": None, "df": n - 1 if n >= 2 else None, "p": None}
    if n < 2:
        return out
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    if sd == 0:
        out.update(t=0.0 if mean == 0 else math.copysign(math.inf, mean), p=1.0 if mean == 0 else 0.0)
        return out
    t = mean / (sd / math.sqrt(n))
    out.update(t=t, p=min(1.0, 2.0 * (1.0 - student_t_cdf(abs(t), n - 1))))
    return out


def mcnemar(a_correct: list[bool], b_correct: list[bool]) -> dict[str, Any]:
    """Exact two-sided McNemar test on paired per-item correctness.

    Only the discordant pairs count: a_only (a right, b wrong) and b_only. Under the null each is
    Binomial(a_only + b_only, 1/2): p = min(1, 2 * P(X <= min(a_only, b_only))); p = 1 with no discordant pair.
    """
    if len(a_correct) != len(b_correct):
        raise ValueError(f"paired items need equal lengths, got {len(a_correct)} and {len(b_correct)}")
    a_only = sum(1 for x, y in zip(a_correct, b_correct, strict=True) if x and not y)
    b_only = sum(1 for x, y in zip(a_correct, b_correct, strict=True) if y and not x)
    m = a_only + b_only
    tail = sum(math.comb(m, k) for k in range(min(a_only, b_only) + 1)) / 2**m if m else 1.0
    return {"n": len(a_correct), "a_only": a_only, "b_only": b_only, "p": min(1.0, 2.0 * tail) if m else 1.0}


# ---------------------------------------------------------------------------------------- the ablation's runs

ACCURACIES = ("greedy_accuracy", "greedy_unseen_accuracy", "sampled_accuracy", "sampled_unseen_accuracy")


def _decoding(metric: str) -> tuple[str, bool]:
    """("greedy" | "sampled", unseen rows only?) of an accuracy metric name."""
    return metric.split("_", 1)[0], "_unseen_" in metric


def paired_items(a_runs: list[dict[str, Any]], b_runs: list[dict[str, Any]], metric: str) -> tuple[list[bool], list[bool]]:
    """Per-item correctness (score >= 0.5) of two variants' runs of the same seed on the same questions.

    Runs are done.json records (seed, evaluation[decoding].items: problem_id -> score, unseen_items);
    pairs are pooled over the seeds both variants ran; an item scored in one run only is left out.
    """
    decoding, unseen_only = _decoding(metric)
    by_seed = {r["seed"]: r for r in b_runs}
    a_ok: list[bool] = []
    b_ok: list[bool] = []
    for ra in a_runs:
        rb = by_seed.get(ra["seed"])
        ea = ((ra.get("evaluation") or {}).get(decoding)) or {}
        eb = ((rb or {}).get("evaluation") or {}).get(decoding) or {}
        items_a, items_b = ea.get("items") or {}, eb.get("items") or {}
        keep = set(ea.get("unseen_items") or []) if unseen_only else set(items_a)
        for item in sorted(keep & set(items_a) & set(items_b)):
            sa, sb = items_a[item], items_b[item]
            if sa is None or sb is None:
                continue
            a_ok.append(float(sa) >= 0.5)
            b_ok.append(float(sb) >= 0.5)
    return a_ok, b_ok


def paired_against_baseline(runs: dict[str, list[dict[str, Any]]], baseline: str = BASELINE) -> list[dict[str, Any]]:
    """For each variant and accuracy metric: the paired t-test over matched seeds and McNemar over the
    per-item correctness pooled over those seeds, both against ``baseline``'s runs."""
    if baseline not in runs:
        return []
    base = runs[baseline]
    out = []
    for name, rs in runs.items():
        if name == baseline:
            continue
        for metric in ACCURACIES:
            seeds = sorted({r["seed"] for r in rs} & {r["seed"] for r in base})
            value = {(n, r["seed"]): (r.get("summary") or {}).get(metric) for n, group in ((name, rs), (baseline, base))
                     for r in group}
            a = [value[(name, s)] for s in seeds]
            b = [value[(baseline, s)] for s in seeds]
            if not finite(a) or not finite(b):
                continue
            a_ok, b_ok = paired_items(rs, base, metric)
            out.append({"variant": name, "baseline": baseline, "metric": metric, "seeds": seeds,
                        "t_test": paired_t_test(a, b), "mcnemar": mcnemar(a_ok, b_ok)})
    return out


def item_bootstrap(runs: list[dict[str, Any]], metric: str, seed: int = 0) -> dict[str, Any]:
    """bootstrap_ci of a variant's accuracy over its items pooled across seeds (score per item)."""
    decoding, unseen_only = _decoding(metric)
    scores = []
    for r in runs:
        ev = ((r.get("evaluation") or {}).get(decoding)) or {}
        keep = set(ev.get("unseen_items") or []) if unseen_only else None
        scores += [v for k, v in (ev.get("items") or {}).items() if v is not None and (keep is None or k in keep)]
    return bootstrap_ci(scores, seed=seed)
