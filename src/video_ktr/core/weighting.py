"""Soft key-token weighting: every completion token gets a policy-gradient weight from its score's rank.

The hard selection (core.selection) keeps the top r_S of each signal's pool with weight 1 and gives the
rest weight 0. The soft forms, as in the Video-KTR authors' repository (``soft_weight_curve.py``), weight
every token of the pool by the rank of its score instead:

    q[i,t]  = rank of S[i,t] in its pool, highest score first, divided by (n - 1)      (q in [0, 1])
    sigmoid: w = 1 + gamma * (sigmoid(k * (0.5 - q)) - 0.5)
    linear:  w = 1 + gamma * (0.5 - q)

so the best-ranked token gets 1 + gamma/2 (sigmoid: 1 + gamma * (sigmoid(k/2) - 0.5)), the median token
1 and the worst 1 - gamma/2; gamma in [0, 2] keeps every weight >= 0. The authors' best sigmoid setting
was k = 5, gamma = 0.75 (the defaults here). Their repository shows the sigmoid form only; "linear" is
this project's reading of their "linear" variant: the same family with the sigmoid replaced by its
argument's straight line, weights linear in rank.

Details the authors' sketch leaves open, decided here:
- ties share their mean rank (the sketch's argsort breaks ties by position), so equal scores get equal
  weights and the weights do not depend on the order of the rows;
- a pool of one token has q = 0.5 (weight 1); non-finite scores rank below every finite one;
- the pools are those of the hard selection: one prompt's G completions ("group") or all rows
  ("batch"), the temporal pool holding the video rows only;
- with several signals a token's weight is the largest of its signals' weights (the soft analogue of
  the hard union M_H | M_V | M_T); a valid token in no pool (a temporal-only selection on an image row)
  gets weight 0, as the hard selection gives it no gradient either.

Shapes: (B, T) = (completions, completion tokens); masks are bool.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

WEIGHTINGS = ("hard", "sigmoid", "linear")
WEIGHTING_SCOPES = ("group", "batch")


@dataclass(frozen=True)
class WeightingSpec:
    """How key tokens are weighted: "hard" (the 0/1 mask of core.selection) or a soft rank curve.

    k: the sigmoid's steepness (sigmoid only); gamma: the spread of the weights, 1 - gamma/2 .. 1 + gamma/2.
    """

    kind: str = "hard"
    k: float = 5.0
    gamma: float = 0.75

    def __post_init__(self) -> None:
        if self.kind not in WEIGHTINGS:
            raise ValueError(f"unknown token weighting {self.kind!r}; choose one of {WEIGHTINGS}")
        if not (math.isfinite(self.k) and self.k > 0):
            raise ValueError(f"soft_k must be a positive number, got {self.k}")
        if not 0.0 <= self.gamma <= 2.0:
            raise ValueError(f"soft_gamma must be in [0, 2] (weights 1 - gamma/2 .. 1 + gamma/2 stay >= 0), got {self.gamma}")

    @property
    def soft(self) -> bool:
        return self.kind != "hard"


def normalized_ranks(scores: Tensor) -> Tensor:
    """q = (descending rank with ties at their mean rank) / (n - 1) for a 1-D pool; (n,) -> (n,) float64.

    Non-finite scores count as lower than every finite one. n == 1 gives q = 0.5; n == 0 an empty tensor.
    Example: scores [3, 1, 2, 2] -> ranks [0, 3, 1.5, 1.5] -> q [0, 1, 0.5, 0.5].
    """
    x = scores.detach().double().reshape(-1)
    n = x.numel()
    if n <= 1:
        return torch.full_like(x, 0.5)
    x = torch.where(torch.isfinite(x), x, torch.full_like(x, -math.inf))
    ordered = torch.sort(x).values
    at_or_below = torch.searchsorted(ordered, x, right=True)
    below = torch.searchsorted(ordered, x, right=False)
    higher = n - at_or_below  # scores strictly above
    ties = at_or_below - below  # this score's count, itself included
    rank = higher.double() + (ties.double() - 1) / 2
    return rank / (n - 1)


def curve(q: Tensor, spec: WeightingSpec) -> Tensor:
    """The weight of normalised rank q (module docstring): sigmoid or linear."""
    if spec.kind == "sigmoid":
        return 1 + spec.gamma * (torch.sigmoid(spec.k * (0.5 - q)) - 0.5)
    if spec.kind == "linear":
        return 1 + spec.gamma * (0.5 - q)
    raise ValueError(f"curve() is for the soft weightings, got {spec.kind!r}")


def rank_weights(scores: Tensor, pool: Tensor, spec: WeightingSpec) -> Tensor:
    """w[i,t] = curve(q) for the tokens in ``pool`` (one pool), 0 elsewhere. scores, pool: (B, T); float32."""
    if pool.dtype != torch.bool or pool.shape != scores.shape:
        raise ValueError(f"pool must be a bool tensor shaped like scores {tuple(scores.shape)}, got {pool.dtype} "
                         f"{tuple(pool.shape)}")
    out = torch.zeros(scores.shape, dtype=torch.float64, device=scores.device)
    out[pool] = curve(normalized_ranks(scores[pool]), spec)
    return out.float()


def soft_token_weights(scores: Mapping[str, Tensor], valid: Tensor, group_size: int, spec: WeightingSpec, *,
                       scope: str = "group", temporal_rows: Tensor | None = None) -> Tensor:
    """The policy-gradient weight of every token: the largest of its signals' rank weights, 0 off ``valid``.

    scores: signal name -> (B, T) score (as for core.selection.signal_masks); valid: (B, T) bool;
    rows are consecutive groups of ``group_size`` completions; scope "group" ranks within each group,
    "batch" over all rows; temporal_rows: (B,) bool, the rows in the temporal pool (None: all).
    Returns (B, T) float32, no grad.
    """
    if not spec.soft:
        raise ValueError("soft_token_weights is for token_weighting sigmoid / linear; hard uses the key-token mask")
    if scope not in WEIGHTING_SCOPES:
        raise ValueError(f"soft token weighting supports the scopes {WEIGHTING_SCOPES}, got {scope!r}")
    if not scores:
        raise ValueError("soft token weighting needs at least one signal (entropy, visual or temporal)")
    if valid.dtype != torch.bool or valid.dim() != 2:
        raise ValueError(f"valid must be a (B, T) bool tensor, got {valid.dtype} {tuple(valid.shape)}")
    n_rows = valid.shape[0]
    if group_size < 1 or n_rows % group_size:
        raise ValueError(f"{n_rows} rows cannot be split into groups of group_size={group_size}")
    step = group_size if scope == "group" else max(n_rows, 1)
    weights = torch.zeros(valid.shape, dtype=torch.float32, device=valid.device)
    for name, score in scores.items():
        if score.shape != valid.shape:
            raise ValueError(f"{name} scores have shape {tuple(score.shape)}, expected {tuple(valid.shape)}")
        pool = valid
        if name == "temporal" and temporal_rows is not None:
            pool = valid & temporal_rows.to(valid.device)[:, None]
        for start in range(0, n_rows, step):
            rows = slice(start, start + step)
            weights[rows] = torch.maximum(weights[rows], rank_weights(score[rows], pool[rows], spec))
    return weights


PAPER_WEIGHTING = WeightingSpec()  # hard: the paper's main method
