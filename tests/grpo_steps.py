"""Run one GRPO step and keep what its stages returned (the recipe keeps nothing once the step is done)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest


@dataclass
class RecordedStep:
    rollouts: list = field(default_factory=list)  # grpo_stages.Rollout of each micro-batch
    masks: list[dict] = field(default_factory=list)  # select_tokens' masks of each micro-batch ("key": the union)
    logp: list = field(default_factory=list)  # the policy log-probs of each loss pass, gradient retained
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def rollout(self):
        (ro,) = self.rollouts
        return ro

    @property
    def key(self):
        return self.masks[0]["key"]


def record_step(trainer, *, edit_masks: Callable[[dict], dict] | None = None) -> RecordedStep:
    """``trainer.train_step()`` with its rollouts, selection masks and policy log-probs kept."""
    import video_ktr.training.grpo as grpo

    rec = RecordedStep()
    real_rollout, real_select, real_policy = grpo.Rollout, grpo.select_tokens, grpo.policy_logprobs

    def rollout(*args, **kwargs):
        rec.rollouts.append(real_rollout(*args, **kwargs))
        return rec.rollouts[-1]

    def select(*args, **kwargs):
        masks = real_select(*args, **kwargs)
        rec.masks.append(edit_masks(masks) if edit_masks else masks)
        return rec.masks[-1]

    def policy(*args, **kwargs):
        logp, entropy = real_policy(*args, **kwargs)
        if logp.requires_grad:
            logp.retain_grad()
            rec.logp.append(logp)
        return logp, entropy

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(grpo, "Rollout", rollout)
        mp.setattr(grpo, "select_tokens", select)
        mp.setattr(grpo, "policy_logprobs", policy)
        rec.metrics = trainer.train_step()
    return rec
