"""Soft key-token weighting: the rank weights, their pools, the loss gradient, the config and the GRPO step."""

from __future__ import annotations

import math

import pytest
import torch

from video_ktr.core.loss import LossSpec, grpo_loss, sequence_losses
from video_ktr.core.weighting import WeightingSpec, curve, normalized_ranks, rank_weights, soft_token_weights

SIG = WeightingSpec("sigmoid", k=5.0, gamma=0.75)
LIN = WeightingSpec("linear", gamma=1.0)


def test_ranks_descend_ties_share_their_mean_and_non_finite_rank_last():
    assert normalized_ranks(torch.tensor([3.0, 1.0, 2.0, 2.0])).tolist() == [0.0, 1.0, 0.5, 0.5]
    assert normalized_ranks(torch.tensor([7.0])).tolist() == [0.5]
    assert normalized_ranks(torch.tensor([])).numel() == 0
    # NaN and -inf and +inf all rank below every finite score (they tie with each other)
    q = normalized_ranks(torch.tensor([float("nan"), 0.0, float("inf"), -5.0, float("-inf")]))
    # ranks: 0.0 -> 0, -5 -> 1, the three non-finite share ranks 2, 3, 4 -> 3; q = rank / 4
    assert q.tolist() == [0.75, 0.0, 0.75, 0.25, 0.75]
    # the rank does not depend on the order of the pool
    x = torch.tensor([0.3, -1.0, 0.3, 2.0, 0.0, 0.3])
    perm = torch.tensor([5, 2, 0, 4, 1, 3])
    assert torch.equal(normalized_ranks(x)[perm], normalized_ranks(x[perm]))


def test_sigmoid_weights_match_the_authors_curve_by_hand():
    # the authors' example: scores 1..100 in one pool, k = 20, gamma = 1.5; q = (100 - s) / 99
    scores = torch.arange(1, 101, dtype=torch.float32).view(1, 100)
    w = rank_weights(scores, torch.ones_like(scores, dtype=torch.bool), WeightingSpec("sigmoid", k=20, gamma=1.5))
    for s in (1, 20, 50, 51, 80, 100):
        q = (100 - s) / 99
        assert w[0, s - 1].item() == pytest.approx(1 + 1.5 * (1 / (1 + math.exp(-20 * (0.5 - q))) - 0.5), abs=1e-6)
    assert w[0, -1].item() == pytest.approx(1 + 1.5 * (1 / (1 + math.exp(-10)) - 0.5), abs=1e-6)  # the best token
    assert torch.all(w[0, 1:] >= w[0, :-1])  # higher score, no smaller weight


def test_linear_weights_by_hand_and_zero_off_the_pool():
    scores = torch.tensor([[0.9, 0.1, 0.5, -0.2, 0.3, 7.0]])
    pool = torch.tensor([[True, True, True, True, True, False]])
    w = rank_weights(scores, pool, LIN)
    # pool ranks: 0.9 -> 0, 0.5 -> 1, 0.3 -> 2, 0.1 -> 3, -0.2 -> 4; q = rank / 4; w = 1 + (0.5 - q)
    assert w.tolist() == [[pytest.approx(1.5), pytest.approx(0.75), pytest.approx(1.25), pytest.approx(0.5),
                           pytest.approx(1.0), 0.0]]
    assert curve(torch.tensor([0.0, 0.5, 1.0]), WeightingSpec("sigmoid", gamma=0.0)).tolist() == [1.0, 1.0, 1.0]


def test_groups_are_ranked_apart_signals_combine_by_max_and_temporal_skips_image_rows():
    valid = torch.tensor([[True, True, False], [True, True, True], [True, True, True], [True, False, False]])
    entropy = torch.tensor([[1.0, 2.0, 9.0], [3.0, 0.0, 4.0], [5.0, 6.0, 7.0], [8.0, 0.0, 0.0]])
    w = soft_token_weights({"entropy": entropy}, valid, 2, LIN, scope="group")
    # group 0 pool: 1, 2, 3, 0, 4 (5 tokens); group 1: 5, 6, 7, 8 (4 tokens)
    g0 = {4.0: 1.5, 3.0: 1.25, 2.0: 1.0, 1.0: 0.75, 0.0: 0.5}
    g1 = {8.0: 1.5, 7.0: 1.5 - 1 / 3, 6.0: 1.5 - 2 / 3, 5.0: 0.5}
    for i in range(4):
        for t in range(3):
            table = g0 if i < 2 else g1
            expected = table[entropy[i, t].item()] if valid[i, t] else 0.0
            assert w[i, t].item() == pytest.approx(expected), (i, t)
    batch = soft_token_weights({"entropy": entropy}, valid, 2, LIN, scope="batch")
    assert batch[3, 0].item() == pytest.approx(1.5) and batch[1, 1].item() == pytest.approx(0.5)
    # two signals: the larger weight wins; the temporal pool holds the video rows only
    temporal = -entropy
    rows = torch.tensor([True, False, True, True])
    both = soft_token_weights({"entropy": entropy, "temporal": temporal}, valid, 2, LIN, temporal_rows=rows)
    only_t = soft_token_weights({"temporal": temporal}, valid, 2, LIN, temporal_rows=rows)
    assert torch.equal(both, torch.maximum(w, only_t))
    assert torch.all(only_t[1] == 0) and torch.all(only_t[0, :2] > 0)
    # group 0's temporal pool is row 0 only: 1.0 is its best temporal score (-1 > -2)
    assert only_t[0, 0].item() == pytest.approx(1.5) and only_t[0, 1].item() == pytest.approx(0.5)


@pytest.mark.parametrize("bad", [{"kind": "cosine"}, {"kind": "sigmoid", "k": 0.0}, {"kind": "linear", "gamma": 2.5},
                                 {"kind": "linear", "gamma": -0.1}, {"kind": "sigmoid", "k": float("nan")}])
def test_weighting_spec_refuses_bad_values(bad):
    with pytest.raises(ValueError):
        WeightingSpec(**bad)


def test_soft_weights_refuse_hard_global_and_no_signal():
    valid = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="hard"):
        soft_token_weights({"entropy": torch.zeros(2, 3)}, valid, 2, WeightingSpec("hard"))
    with pytest.raises(ValueError, match="scope"):
        soft_token_weights({"entropy": torch.zeros(2, 3)}, valid, 2, SIG, scope="global")
    with pytest.raises(ValueError, match="signal"):
        soft_token_weights({}, valid, 2, SIG)
    with pytest.raises(ValueError, match="groups"):
        soft_token_weights({"entropy": torch.zeros(2, 3)}, valid, 3, SIG)


def test_loss_gradient_is_the_weight_times_the_advantage():
    torch.manual_seed(0)
    logp = (-torch.rand(3, 4)).requires_grad_()
    valid = torch.tensor([[True, True, True, False], [True, True, False, False], [True, True, True, True]])
    adv = torch.tensor([1.0, -0.5, 2.0])
    w = torch.tensor([[1.5, 0.5, 1.0, 9.0], [1.2, 0.8, 9.0, 9.0], [0.6, 1.4, 1.1, 0.9]])
    spec = LossSpec(beta=0.0)
    loss = grpo_loss(logp, adv, valid, spec, valid=valid, weights=w)
    loss.backward()
    # single-step released form: d loss / d logp[i,t] = -A_i * W[i,t] / |C_i| / B on valid tokens, 0 elsewhere
    expected = torch.where(valid, -adv[:, None] * w / valid.sum(1, keepdim=True) / 3, torch.zeros(()))
    assert torch.allclose(logp.grad, expected, atol=1e-7)
    # weights of 1 give the unweighted loss exactly, and sequence_losses agrees with the mean
    plain = grpo_loss(logp.detach(), adv, valid, spec, valid=valid)
    ones = grpo_loss(logp.detach(), adv, valid, spec, valid=valid, weights=torch.ones(3, 4))
    assert torch.equal(plain, ones)
    seq = sequence_losses(logp.detach(), adv, valid, spec, valid=valid, weights=w)
    assert torch.allclose(seq.mean(), loss.detach())
    with pytest.raises(ValueError, match="weights"):
        grpo_loss(logp, adv, valid, spec, valid=valid, weights=torch.ones(3, 5))


def test_config_refuses_soft_weighting_without_scores_or_with_the_global_scope(tiny_setup, tmp_path, capsys):
    from video_ktr.training.grpo_config import TrainConfig
    from video_ktr.utils.config import parse_args

    def cfg(*extra):
        c = parse_args(TrainConfig, tiny_setup.train_args(tmp_path, *extra))
        c.validate()
        return c

    assert cfg("--token_weighting", "sigmoid").weighting_spec() == WeightingSpec("sigmoid", 5.0, 0.75)
    for extra, match in ((["--token_selection", "none"], "has none"), (["--token_selection", "random"], "has none"),
                         (["--selection_scope", "global"], "global"), (["--soft_gamma", "3"], "soft_gamma"),
                         (["--soft_k", "-1"], "soft_k")):
        with pytest.raises(SystemExit):  # the command line reports validate()'s ValueError
            cfg("--token_weighting", "linear", *extra)
        assert match in capsys.readouterr().err


def test_grpo_step_applies_the_soft_weights(tiny_setup, tmp_path, monkeypatch):
    import video_ktr.training.grpo as grpo
    from tests.grpo_steps import record_step
    from tests.test_trainer import make_trainer

    seen = []
    real = grpo.token_weights

    def spy(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(grpo, "token_weights", spy)
    trainer = make_trainer(tiny_setup, tmp_path, "--max_steps", "1", "--token_selection", "all", "--beta", "0",
                           "--max_grad_norm", "0", "--token_weighting", "sigmoid", "--soft_gamma", "1.0")
    step = record_step(trainer)
    (w,), ro, (logp,) = seen, step.rollout, step.logp
    valid = ro.completions.valid
    assert torch.all(w[~valid] == 0)
    lo, hi = 1 - 0.5, 1 + 1.0 * (1 / (1 + math.exp(-2.5)) - 0.5)
    assert torch.all((w[valid] >= lo - 1e-6) & (w[valid] <= hi + 1e-6))
    assert len(set(w[valid].tolist())) > 3
    # every valid token carries policy gradient, scaled by its weight: -A_i W[i,t] / |C_i| / N
    N = logp.shape[0]
    expected = -ro.advantages[:, None] * w / valid.sum(1, keepdim=True).clamp(min=1) / N
    assert ro.advantages.abs().max() > 0
    assert torch.allclose(logp.grad[valid], expected[valid], atol=1e-6)
    assert torch.all(logp.grad[~valid] == 0)


def test_soft_weighting_diagnostics_decompose_by_the_hard_mask(tiny_setup, tmp_path):
    from tests.test_trainer import make_trainer

    trainer = make_trainer(tiny_setup, tmp_path, "--max_steps", "1", "--token_selection", "all", "--beta", "0",
                           "--token_weighting", "linear", "--diagnostics_steps", "1")
    m = trainer.train_step()
    assert 0 < m["key_token_fraction"] < 1  # the hard mask's fraction, as for hard KTR
    assert m["grad_norm_masked"] > 0 and m["grad_norm_key"] > 0
