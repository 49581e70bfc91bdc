"""GRPO loss with the policy gradient on key tokens only (Key-Token Reinforcement).

Shapes: B completions, T completion tokens. logp, old_logp, ref_logp: (B, T) log-probs of the sampled
tokens; advantages: (B,); mask (key tokens M) and valid (completion tokens C): (B, T) bool.

    r[i,t]   = exp(logp - stopgrad(logp))                        (released single-step form, r = 1)
             | exp(logp - old_logp)                              (num_iterations > 1)
    obj[i,t] = r * A_i                                           (released form)
             | min(r * A_i, clip(r, 1 - eps, 1 + eps_high) * A_i) (with old_logp)
    KL[i,t]  = exp(d) - d - 1,  d = clip(ref_logp - logp, -10, 10)
    l[i,t]   = -obj * W[i,t] * M[i,t] + beta * KL * K[i,t]       (K = M or C, per kl_on)
             W = 1 (hard key tokens) or the soft rank weights of core.weighting (with M = C)
    grpo:      loss = mean_i ( sum_t l[i,t] / max(1, sum_t D[i,t]) )   (D = M or C, per normalize_by)
    bnpo/dapo: loss = sum_{i,t} l / max(1, sum_{i,t} D)
    dr_grpo:   loss = sum_{i,t} l / (B * max_completion_length)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")
# "key_tokens" / "all_tokens" are the names used in the design document; "mask" / "valid" name the
# argument that provides the tokens. Both spellings are accepted.
TOKEN_SETS = {"mask": "mask", "key_tokens": "mask", "valid": "valid", "all_tokens": "valid"}


def _token_set(name: str, value: str) -> str:
    if value not in TOKEN_SETS:
        raise ValueError(f"unknown {name} {value!r}; choose one of {tuple(TOKEN_SETS)}")
    return TOKEN_SETS[value]


@dataclass(frozen=True)
class LossSpec:
    """The settings of the loss (the symbols of the module docstring), validated once.

    beta: weight of the k3 KL term (0: none); epsilon / epsilon_high: PPO clipping range (used with
    old_logp); loss_type: the reduction (LOSS_TYPES); max_completion_length: dr_grpo's divisor;
    kl_on / normalize_by: "mask" (key tokens, alias "key_tokens") or "valid" (alias "all_tokens").
    """

    beta: float = 0.04
    epsilon: float = 0.2
    epsilon_high: float | None = None
    loss_type: str = "grpo"
    max_completion_length: int | None = None
    kl_on: str = "mask"
    normalize_by: str = "mask"

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown loss_type {self.loss_type!r}; choose one of {LOSS_TYPES}")
        if self.loss_type == "dr_grpo" and (self.max_completion_length is None or self.max_completion_length < 1):
            raise ValueError(f"loss_type 'dr_grpo' needs max_completion_length >= 1, got {self.max_completion_length}")
        _token_set("kl_on", self.kl_on)
        _token_set("normalize_by", self.normalize_by)
        if self.epsilon < 0 or self.eps_high < 0:
            raise ValueError(f"epsilon and epsilon_high must be >= 0, got {self.epsilon} and {self.eps_high}")

    @property
    def eps_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    @property
    def kl_tokens(self) -> str:
        """"mask" or "valid": the tokens the KL term covers."""
        return TOKEN_SETS[self.kl_on]

    @property
    def denominator_tokens(self) -> str:
        """"mask" or "valid": the tokens a sequence's (or the batch's) loss is divided by."""
        return TOKEN_SETS[self.normalize_by]


PAPER_LOSS = LossSpec()  # the released form: beta 0.04, KL and normalisation on key tokens, per-sequence mean


def group_advantages(rewards: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    """Group-normalised advantages over consecutive groups of `group_size` completions.

        A_i = (R_i - mean_g R) / (std_g R + eps),   std unbiased (divides by G - 1)

    rewards: (N,), N a multiple of group_size. Returns (N,) float. With group_size 1 the unbiased std
    is undefined (0/0) and a lone completion has no baseline to compare with: returns zeros.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (N,), got shape {tuple(rewards.shape)}")
    n = rewards.numel()
    if group_size < 1 or n % group_size != 0:
        raise ValueError(f"{n} rewards cannot be split into groups of group_size={group_size}")
    rewards = rewards if rewards.is_floating_point() else rewards.float()
    if group_size == 1:
        return torch.zeros_like(rewards)
    # the group statistics in float64: a float32 mean of equal rewards can miss them by one ulp, and that
    # rounding divided by a std of the same size gave equal rewards advantages of about 1e-4, not 0
    grouped = rewards.view(-1, group_size).double()
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True, unbiased=True)
    return ((grouped - mean) / (std + eps)).reshape(n).to(rewards.dtype)


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Schulman's k3 estimator of KL(pi || pi_ref) per token, with the clamp of the released code.

        d = clamp(ref_logp - logp, -10, 10);   KL = exp(d) - d - 1   (>= 0)

    logp, ref_logp: (B, T). Returns (B, T).
    """
    d = torch.clamp(ref_logp - logp, -10.0, 10.0)
    return torch.exp(d) - d - 1


class _TokenTerms(NamedTuple):
    policy: Tensor  # (B, T) -obj on key tokens, exactly 0 elsewhere
    kl: Tensor  # (B, T) beta * KL on the KL tokens, exactly 0 elsewhere
    denom: Tensor  # (B, T) bool, tokens counted in the denominator
    kl_value: Tensor  # (B, T) detached KL (0 where not computed)
    kl_mask: Tensor  # (B, T) bool
    clipped: Tensor  # (B, T) bool, key tokens where the clipped branch is active
    mask: Tensor  # (B, T) bool, key tokens


def _check_same_shape(name: str, x: Tensor | None, shape: torch.Size) -> None:
    if x is not None and x.shape != shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(shape)} (the shape of logp)")


def _token_terms(
    logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    spec: LossSpec,
    ref_logp: Tensor | None,
    old_logp: Tensor | None,
    valid: Tensor | None,
    weights: Tensor | None = None,
) -> _TokenTerms:
    """Per-token policy and KL parts of the loss, masked with torch.where (see module docstring)."""
    if logp.dim() != 2:
        raise ValueError(f"logp must be (B, T), got shape {tuple(logp.shape)}")
    shape = logp.shape
    if advantages.shape != shape[:1]:
        raise ValueError(f"advantages has shape {tuple(advantages.shape)}, expected ({shape[0]},)")
    for name, x in (("mask", mask), ("valid", valid)):
        _check_same_shape(name, x, shape)
        if x is not None and x.dtype != torch.bool:
            raise ValueError(f"{name} must be a bool tensor, got dtype {x.dtype}")
    _check_same_shape("ref_logp", ref_logp, shape)
    _check_same_shape("old_logp", old_logp, shape)
    _check_same_shape("weights", weights, shape)
    kl_on, normalize_by, beta = spec.kl_tokens, spec.denominator_tokens, spec.beta
    eps_low, eps_high = spec.epsilon, spec.eps_high

    valid = mask if valid is None else valid
    mask = mask & valid
    kl_mask = mask if kl_on == "mask" else valid
    used = mask | kl_mask
    zero = logp.new_zeros(())
    # Padding may hold -inf log-probs: replace unused positions before any arithmetic, so that their
    # gradient is an exact 0 from torch.where rather than 0 * inf = nan.
    lp = torch.where(used, logp, zero)
    adv = advantages.to(lp.dtype)[:, None]

    if old_logp is None:
        ratio = torch.exp(lp - lp.detach())
        objective = ratio * adv
        clipped = torch.zeros_like(mask)
    else:
        old = torch.where(used, old_logp.detach().to(lp.dtype), zero)
        ratio = torch.exp(lp - old)
        clipped_ratio = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
        objective = torch.minimum(ratio * adv, clipped_ratio * adv)
        r = ratio.detach()
        clipped = mask & (((r < 1 - eps_low) & (adv < 0)) | ((r > 1 + eps_high) & (adv > 0)))
    if weights is not None:
        # soft key-token weighting: W scales each token's policy term (no gradient through W)
        objective = objective * weights.detach().to(lp.dtype)
    policy = torch.where(mask, -objective, zero)

    if ref_logp is not None:
        ref = torch.where(used, ref_logp.detach().to(lp.dtype), zero)
        kl_full = kl_k3(lp, ref)
        kl_value = torch.where(kl_mask, kl_full.detach(), zero)
        kl = torch.where(kl_mask, beta * kl_full, zero) if beta != 0 else torch.zeros_like(policy)
    else:
        kl_value = torch.zeros_like(policy).detach()
        kl = torch.zeros_like(policy)
    denom = mask if normalize_by == "mask" else valid
    return _TokenTerms(policy, kl, denom, kl_value, kl_mask, clipped, mask)


def _per_sequence(per_token: Tensor, denom: Tensor) -> Tensor:
    """L_i = sum_t l[i,t] / max(1, sum_t D[i,t]); (B, T) -> (B,)."""
    return per_token.sum(dim=1) / denom.sum(dim=1).clamp(min=1).to(per_token.dtype)


def _reduce(per_token: Tensor, denom: Tensor, loss_type: str, max_completion_length: int | None) -> Tensor:
    if loss_type == "grpo":
        return _per_sequence(per_token, denom).mean()
    if loss_type in ("bnpo", "dapo"):
        return per_token.sum() / denom.sum().clamp(min=1).to(per_token.dtype)
    # dr_grpo
    return per_token.sum() / (per_token.shape[0] * max_completion_length)


def sequence_losses(
    logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    spec: LossSpec = PAPER_LOSS,
    *,
    ref_logp: Tensor | None = None,
    old_logp: Tensor | None = None,
    valid: Tensor | None = None,
    weights: Tensor | None = None,
) -> Tensor:
    """Per-sequence losses L_i = sum_t l[i,t] / max(1, sum_t D[i,t]), shape (B,).

    Same arguments and per-token loss as grpo_loss (spec.loss_type and max_completion_length unused);
    grpo_loss with loss_type "grpo" == sequence_losses().mean(). Used for the loss-variance diagnostic.
    """
    terms = _token_terms(logp, advantages, mask, spec=spec, ref_logp=ref_logp, old_logp=old_logp, valid=valid,
                         weights=weights)
    return _per_sequence(terms.policy + terms.kl, terms.denom)


def grpo_loss(
    logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    spec: LossSpec = PAPER_LOSS,
    *,
    ref_logp: Tensor | None = None,
    old_logp: Tensor | None = None,
    valid: Tensor | None = None,
    weights: Tensor | None = None,
    return_stats: bool = False,
) -> Tensor | tuple[Tensor, dict[str, float]]:
    """The KTR GRPO loss (equations in the module docstring).

    logp: (B, T) with grad; advantages: (B,); mask: (B, T) bool key tokens (intersected with valid);
    valid: (B, T) bool completion tokens, defaults to mask. ref_logp, old_logp: (B, T), no grad.
    spec: the settings (LossSpec). old_logp None gives the released single-step form (ratio 1, no
    clipping); otherwise PPO clipping with epsilon / epsilon_high. weights: (B, T) soft key-token
    weights W >= 0 (core.weighting), multiplying the policy term on the tokens of mask (None: 1). The KL term is used only when
    ref_logp is given and beta != 0.
    The policy term is always on key tokens only; non-key tokens get exactly zero policy gradient, and
    a row with no key token contributes a finite value (0 unless kl_on="valid").

    Returns the scalar loss, or (loss, stats) when return_stats: "kl" (mean KL over the KL tokens),
    "clip_ratio" (fraction of key tokens where the clipped branch is active; 0 without old_logp),
    "policy_loss" and "kl_loss" (the two parts of the loss, reduced like it; they sum to the loss).
    """
    loss_type, max_completion_length = spec.loss_type, spec.max_completion_length
    terms = _token_terms(logp, advantages, mask, spec=spec, ref_logp=ref_logp, old_logp=old_logp, valid=valid,
                         weights=weights)
    loss = _reduce(terms.policy + terms.kl, terms.denom, loss_type, max_completion_length)
    if not return_stats:
        return loss
    with torch.no_grad():
        n_kl = int(terms.kl_mask.sum())
        n_key = int(terms.mask.sum())
        stats = {
            "kl": float(terms.kl_value.sum()) / n_kl if n_kl else 0.0,
            "clip_ratio": int(terms.clipped.sum()) / n_key if n_key else 0.0,
            "policy_loss": float(_reduce(terms.policy, terms.denom, loss_type, max_completion_length)),
            "kl_loss": float(_reduce(terms.kl, terms.denom, loss_type, max_completion_length)),
        }
    return loss, stats
