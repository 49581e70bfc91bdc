"""Key-token selection: which completion tokens receive the policy gradient.

For each score S in {entropy H, visual V, temporal T} with ratio r_S:

    pool_S = {(i, t) : C[i, t] = 1}            (for T: video rows only)
    tau_S  = quantile(pool_S, 1 - r_S)          (linear interpolation, as torch.quantile)
    M_S    = C & (S >= tau_S)
    M      = M_H | M_V | M_T

All tensors are (B, T) = (completions, completion tokens) unless said otherwise; masks are bool.
Non-finite scores (NaN, +inf, -inf) are left out of the pool and are never selected: a NaN has no
rank, and an infinite value in the pool would make the interpolated threshold NaN
(lerp(-inf, x, w) = nan), which would silently select nothing for the whole pool.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

# torch.quantile refuses inputs above 2**24 elements in several releases (and on CUDA); past this size
# the threshold is computed with kthvalue and the same linear interpolation.
TORCH_QUANTILE_MAX_NUMEL = 2**24

SCOPES = ("group", "batch")
SIGNALS = ("entropy", "visual", "temporal")


@dataclass(frozen=True)
class SelectionSpec:
    """How key tokens are chosen: the signals, the ratio r_S each keeps, the pool and the tie rule.

    signals: any of SIGNALS (empty: every valid token is a key token, vanilla GRPO); scope: the pool of
    each threshold, "group" (one prompt's G completions, the paper), "batch" (the rows passed in) or
    "global" (the batch of every process, gathered by the caller: see signal_masks); positive_only:
    the visual / temporal masks also require S > 0 (the entropy is never negative).
    """

    signals: tuple[str, ...] = SIGNALS
    entropy_ratio: float = 0.2
    visual_ratio: float = 0.2
    temporal_ratio: float = 0.2
    scope: str = "group"
    positive_only: bool = False

    def __post_init__(self) -> None:
        unknown = [s for s in self.signals if s not in SIGNALS]
        if unknown:
            raise ValueError(f"unknown signal(s) {unknown}; choose from {SIGNALS}")
        if self.scope not in (*SCOPES, "global"):
            raise ValueError(f"unknown scope {self.scope!r}; choose one of {(*SCOPES, 'global')}")
        for signal in SIGNALS:
            _check_ratio(f"{signal}_ratio", self.ratio(signal))

    def ratio(self, signal: str) -> float:
        return {"entropy": self.entropy_ratio, "visual": self.visual_ratio, "temporal": self.temporal_ratio}[signal]


def _check_mask(name: str, mask: Tensor, shape: torch.Size | None = None) -> None:
    if mask.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool tensor, got dtype {mask.dtype}")
    if shape is not None and mask.shape != shape:
        raise ValueError(f"{name} has shape {tuple(mask.shape)}, expected {tuple(shape)}")


def _check_ratio(name: str, ratio: float) -> None:
    if math.isnan(ratio):
        raise ValueError(f"{name} is NaN; expected a fraction in [0, 1]")


def _quantile_by_kthvalue(pool: Tensor, q: float) -> Tensor:
    """The q-quantile of a 1-D pool with torch.quantile's linear interpolation, via kthvalue.

        rank = q * (n - 1)
        tau  = lerp(x_(floor rank), x_(ceil rank), rank - floor rank)

    x_(k) is the k-th smallest value (0-based). pool: (n,), n >= 1, finite. Returns a 0-dim tensor.
    Rounding mirrors torch.quantile on CPU bit for bit: q rounded to pool's dtype, the rank in
    float64, the weight back in pool's dtype.
    """
    n = pool.numel()
    rank = float(torch.tensor(q, dtype=pool.dtype)) * (n - 1)
    below = math.floor(rank)
    above = math.ceil(rank)
    weight = torch.tensor(rank - below, dtype=pool.dtype, device=pool.device)
    lo = pool.kthvalue(below + 1).values
    hi = lo if above == below else pool.kthvalue(above + 1).values
    return torch.lerp(lo, hi, weight)


def quantile_threshold(pool: Tensor, ratio: float) -> Tensor:
    """Threshold tau that keeps the top `ratio` of a pool of scores.

        tau = quantile(pool, 1 - ratio)     (linear interpolation, as torch.quantile)

    pool: any shape, flattened; non-finite entries are ignored. Half precision is computed in float32.
    Returns a 0-dim tensor on pool's device: +inf when the pool has no finite entry or ratio <= 0
    (selects nothing, since only finite scores are ever selected); the pool minimum when ratio >= 1.
    Meant also for the trainer's "global" scope: call it on the pool gathered from all processes.
    """
    _check_ratio("ratio", ratio)
    if not pool.is_floating_point() or pool.dtype not in (torch.float32, torch.float64):
        pool = pool.float()
    pool = pool.reshape(-1)
    pool = pool[torch.isfinite(pool)]
    if pool.numel() == 0 or ratio <= 0:
        return torch.tensor(math.inf, dtype=pool.dtype, device=pool.device)
    q = min(1.0, max(0.0, 1.0 - ratio))
    if pool.numel() > TORCH_QUANTILE_MAX_NUMEL:
        return _quantile_by_kthvalue(pool, q)
    return torch.quantile(pool, q)


def mask_at_threshold(
    scores: Tensor, valid: Tensor, tau: Tensor | float, *, positive_only: bool = False
) -> Tensor:
    """M = valid & isfinite(S) & (S >= tau) [& (S > 0) when positive_only].

    scores, valid: (B, T); tau: scalar. Returns (B, T) bool. Used with a threshold computed elsewhere
    (e.g. from a pool gathered across processes) so every scope applies the same rule.
    """
    _check_mask("valid", valid, scores.shape)
    s = scores.float()
    mask = valid & torch.isfinite(s) & (s >= tau)
    if positive_only:
        mask = mask & (s > 0)
    return mask


PAPER_SELECTION = SelectionSpec()  # all three signals, ratios 0.2, per prompt group


def top_ratio_mask(scores: Tensor, valid: Tensor, ratio: float, *, positive_only: bool = False) -> Tensor:
    """Tokens whose score is in the top `ratio` of the valid tokens.

        tau = quantile({S[i,t] : valid[i,t]}, 1 - ratio);   M = valid & (S >= tau)

    scores, valid: (B, T). Returns (B, T) bool.
    Ties at tau are all selected (the paper's `>=`): scores [1, 2, 2, 2, 3] with ratio 0.4 give
    tau = 2 and select four tokens; all-equal scores select every valid token.
    positive_only additionally requires S > 0 (for probes where most tokens score exactly 0).
    All False when no valid finite score exists or ratio <= 0; ratio >= 1 selects every valid token
    with a finite score (and S > 0 when positive_only). Non-finite scores are never selected.
    """
    _check_mask("valid", valid, scores.shape)
    _check_ratio("ratio", ratio)
    if ratio <= 0:
        return torch.zeros_like(valid)
    tau = quantile_threshold(scores[valid], ratio)
    return mask_at_threshold(scores, valid, tau, positive_only=positive_only)


def select_key_tokens(
    valid: Tensor,
    entropy: Tensor | None = None,
    visual: Tensor | None = None,
    temporal: Tensor | None = None,
    *,
    spec: SelectionSpec = PAPER_SELECTION,
    temporal_rows: Tensor | None = None,
) -> Tensor:
    """Key-token mask M = M_H | M_V | M_T over the rows passed in (one pool per signal).

        M_H = top_ratio_mask(H, C, r_H)
        M_V = top_ratio_mask(V, C, r_V, positive_only)
        M_T = top_ratio_mask(T, C & video_rows, r_T, positive_only)

    valid (C), entropy, visual, temporal: (B, T); temporal_rows: (B,) bool, the rows that have a
    temporal probe (videos); None means all rows. Rows outside temporal_rows are neither in the
    temporal pool nor selected by it. A signal given as None is skipped. With no signal at all every
    valid token is a key token (vanilla GRPO): returns `valid`. The ratios and positive_only come from
    spec (its signals and scope are not read here); positive_only does not apply to the entropy, which
    is never negative. Returns (B, T) bool.
    """
    _check_mask("valid", valid)
    if entropy is None and visual is None and temporal is None:
        return valid.clone()
    mask = torch.zeros_like(valid)
    if entropy is not None:
        mask |= top_ratio_mask(entropy, valid, spec.entropy_ratio)
    if visual is not None:
        mask |= top_ratio_mask(visual, valid, spec.visual_ratio, positive_only=spec.positive_only)
    if temporal is not None:
        temporal_valid = valid
        if temporal_rows is not None:
            _check_mask("temporal_rows", temporal_rows, valid.shape[:1])
            temporal_valid = valid & temporal_rows[:, None]
        mask |= top_ratio_mask(temporal, temporal_valid, spec.temporal_ratio, positive_only=spec.positive_only)
    return mask


def select_key_tokens_grouped(
    valid: Tensor,
    group_size: int,
    *,
    spec: SelectionSpec = PAPER_SELECTION,
    entropy: Tensor | None = None,
    visual: Tensor | None = None,
    temporal: Tensor | None = None,
    temporal_rows: Tensor | None = None,
) -> Tensor:
    """select_key_tokens with thresholds per prompt group (spec.scope "group") or over the batch ("batch").

    Rows are laid out as consecutive groups of `group_size` completions of one prompt, so with scope
    "group" rows [g*G, (g+1)*G) form one pool per signal (the paper's released behaviour); with
    "batch" all B rows form one pool. valid and signals: (B, T); temporal_rows: (B,).
    The "global" scope (pool gathered across processes) is signal_masks' with a gather function.
    Returns (B, T) bool.
    """
    scope = spec.scope
    if scope not in SCOPES:
        raise ValueError(
            f"unknown scope {scope!r}; choose one of {SCOPES} (the 'global' scope is signal_masks' with the "
            "gather function of the processes)"
        )
    n_rows = valid.shape[0]
    if group_size < 1 or n_rows % group_size != 0:
        raise ValueError(f"{n_rows} rows cannot be split into groups of group_size={group_size}")
    if scope == "batch" or n_rows == 0:
        return select_key_tokens(valid, entropy, visual, temporal, temporal_rows=temporal_rows, spec=spec)

    def rows(x: Tensor | None, start: int) -> Tensor | None:
        return None if x is None else x[start : start + group_size]

    blocks = [
        select_key_tokens(
            rows(valid, s),
            rows(entropy, s),
            rows(visual, s),
            rows(temporal, s),
            temporal_rows=rows(temporal_rows, s),
            spec=spec,
        )
        for s in range(0, n_rows, group_size)
    ]
    return torch.cat(blocks, dim=0)


def signal_masks(
    scores: Mapping[str, Tensor],
    valid: Tensor,
    group_size: int,
    spec: SelectionSpec,
    *,
    temporal_rows: Tensor | None = None,
    gather: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, Tensor]:
    """One mask per signal in ``scores`` (name -> (B, T) score), each M_S of the module docstring.

    The pool of each threshold follows spec.scope; with "global", ``gather`` takes this process's
    flat pool (invalid positions NaN, which are never in a pool) and returns every process's, and
    the one threshold of the gathered pool is applied to the local rows. temporal_rows: (B,) bool,
    the rows in the temporal pool (None: all). Returns name -> (B, T) bool.
    """
    masks = {}
    for name, score in scores.items():
        if spec.scope == "global":
            if gather is None:
                raise ValueError("the 'global' selection scope needs a gather function (the pools of every process)")
            pool_valid = valid & temporal_rows[:, None] if name == "temporal" and temporal_rows is not None else valid
            flat = score.detach().float().masked_fill(~pool_valid, float("nan")).flatten()
            tau = quantile_threshold(gather(flat), spec.ratio(name))
            positive = spec.positive_only and name != "entropy"
            masks[name] = mask_at_threshold(score, pool_valid, tau.to(score.device), positive_only=positive)
        else:
            extra = {"temporal_rows": temporal_rows} if name == "temporal" else {}
            masks[name] = select_key_tokens_grouped(valid, group_size, spec=spec, **{name: score}, **extra)
    return masks


def random_mask_like(valid: Tensor, fraction: float | Tensor, generator: torch.Generator) -> Tensor:
    """A uniformly random subset of the valid tokens keeping `fraction` of them (the random-mask control).

        k = round(fraction * n_valid)   over the whole tensor (Python round: halves go to even)

    The k positions are drawn without replacement with `generator` (on its own device, then moved), so
    the result is deterministic for a generator seed. valid: any shape, bool; fraction in [0, 1]
    (e.g. the kept fraction of a KTR mask). Returns a bool tensor shaped like valid.
    """
    _check_mask("valid", valid)
    frac = float(fraction)
    if not 0.0 <= frac <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {frac}")
    index = valid.reshape(-1).nonzero().squeeze(1)
    k = round(frac * index.numel())
    perm = torch.randperm(index.numel(), generator=generator, device=generator.device)
    chosen = index[perm[:k].to(index.device)]
    mask = torch.zeros(valid.numel(), dtype=torch.bool, device=valid.device)
    mask[chosen] = True
    return mask.view_as(valid)


def mask_stats(valid: Tensor, masks: dict[str, Tensor]) -> dict[str, float]:
    """Fraction of valid tokens selected by each mask: |M & C| / |C| (0.0 when no token is valid)."""
    _check_mask("valid", valid)
    n_valid = int(valid.sum())
    stats = {}
    for name, mask in masks.items():
        _check_mask(name, mask, valid.shape)
        stats[name] = int((mask & valid).sum()) / n_valid if n_valid else 0.0
    return stats


def jaccard(a: Tensor, b: Tensor) -> float:
    """|a & b| / |a | b| for two bool masks of one shape; 0.0 when both are empty (by convention here)."""
    _check_mask("b", b, a.shape)
    _check_mask("a", a)
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 0.0
