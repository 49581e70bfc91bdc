import math

import pytest
import torch

from video_ktr.core.loss import LossSpec, group_advantages, grpo_loss, kl_k3, sequence_losses

T, F = True, False
LN2 = math.log(2.0)
K_UP = 1 - LN2  # kl_k3 with d = +ln 2: 2 - ln 2 - 1
K_DOWN = LN2 - 0.5  # kl_k3 with d = -ln 2: 1/2 + ln 2 - 1
BETA = 0.1


def example():
    """B = 2, T = 4. Row 0: three valid tokens, key tokens 0 and 2, -inf padding at t = 3.
    Row 1: two valid tokens, key token 1. d = ref_logp - logp chosen so KL values are K_UP / K_DOWN / 0."""
    logp = torch.tensor([[-1.0, -2.0, -3.0, -math.inf], [-1.0, -1.5, -1.0, -1.0]], requires_grad=True)
    d = torch.tensor([[LN2, LN2, -LN2, 0.0], [LN2, LN2, 0.0, 0.0]])
    ref = logp.detach() + d
    valid = torch.tensor([[T, T, T, F], [T, T, F, F]])
    mask = torch.tensor([[T, F, T, F], [F, T, F, F]])
    adv = torch.tensor([1.0, -2.0])
    return logp, adv, mask, valid, ref


# Per-token losses by hand, l = -A + beta * KL on the tokens that carry each term.
ROW0_POLICY = -1.0 - 1.0  # key tokens 0, 2 with A = 1
ROW1_POLICY = 2.0  # key token 1 with A = -2
ROW0_KL_MASK = K_UP + K_DOWN  # KL on tokens 0, 2
ROW1_KL_MASK = K_UP  # KL on token 1
ROW0_KL_VALID = K_UP + K_UP + K_DOWN  # KL on tokens 0, 1, 2
ROW1_KL_VALID = K_UP + K_UP  # KL on tokens 0, 1


def test_group_advantages_match_manual_unbiased_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    std = math.sqrt(4 * 0.25 / 3)  # unbiased: divides by G - 1 = 3
    a = 0.5 / (std + 1e-4)
    expected = torch.tensor([a, -a, -a, a, 0.0, 0.0, 0.0, 0.0])
    assert torch.allclose(group_advantages(rewards, 4), expected)


def test_equal_rewards_give_zero_advantages():
    assert torch.equal(group_advantages(torch.full((6,), 0.7), 3), torch.zeros(6))


def test_group_size_one_gives_zero_advantages():
    assert torch.equal(group_advantages(torch.tensor([1.0, 0.0, 3.0]), 1), torch.zeros(3))


def test_group_advantages_rejects_indivisible_batch():
    with pytest.raises(ValueError, match=r"6 rewards.*group_size=4"):
        group_advantages(torch.zeros(6), 4)


def test_kl_k3_values():
    logp = torch.zeros(4)
    ref = torch.tensor([LN2, -LN2, 0.0, 50.0])
    expected = torch.tensor([K_UP, K_DOWN, 0.0, math.exp(10) - 10 - 1])  # d clamped at 10
    assert torch.allclose(kl_k3(logp, ref), expected)


@pytest.mark.parametrize(
    ("loss_type", "kl_on", "normalize_by", "expected"),
    [
        ("grpo", "mask", "mask",
         ((ROW0_POLICY + BETA * ROW0_KL_MASK) / 2 + (ROW1_POLICY + BETA * ROW1_KL_MASK) / 1) / 2),
        ("grpo", "mask", "valid",
         ((ROW0_POLICY + BETA * ROW0_KL_MASK) / 3 + (ROW1_POLICY + BETA * ROW1_KL_MASK) / 2) / 2),
        ("grpo", "valid", "mask",
         ((ROW0_POLICY + BETA * ROW0_KL_VALID) / 2 + (ROW1_POLICY + BETA * ROW1_KL_VALID) / 1) / 2),
        ("grpo", "all_tokens", "all_tokens",
         ((ROW0_POLICY + BETA * ROW0_KL_VALID) / 3 + (ROW1_POLICY + BETA * ROW1_KL_VALID) / 2) / 2),
        ("bnpo", "mask", "mask",
         (ROW0_POLICY + ROW1_POLICY + BETA * (ROW0_KL_MASK + ROW1_KL_MASK)) / 3),
        ("dapo", "mask", "valid",
         (ROW0_POLICY + ROW1_POLICY + BETA * (ROW0_KL_MASK + ROW1_KL_MASK)) / 5),
        ("dapo", "valid", "valid",
         (ROW0_POLICY + ROW1_POLICY + BETA * (ROW0_KL_VALID + ROW1_KL_VALID)) / 5),
        ("dr_grpo", "mask", "mask",
         (ROW0_POLICY + ROW1_POLICY + BETA * (ROW0_KL_MASK + ROW1_KL_MASK)) / (2 * 4)),
    ],
)  # fmt: skip
def test_loss_value_by_type_and_mode(loss_type, kl_on, normalize_by, expected):
    logp, adv, mask, valid, ref = example()
    loss = grpo_loss(
        logp, adv, mask, ref_logp=ref,
        valid=valid, spec=LossSpec(beta=BETA, loss_type=loss_type, max_completion_length=4, kl_on=kl_on, normalize_by=normalize_by))  # fmt: skip
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_without_reference_or_beta_zero_there_is_no_kl_term():
    logp, adv, mask, valid, ref = example()
    expected = (ROW0_POLICY / 2 + ROW1_POLICY / 1) / 2
    assert grpo_loss(logp, adv, mask, valid=valid).item() == pytest.approx(expected)
    assert grpo_loss(logp, adv, mask, ref_logp=ref, valid=valid, spec=LossSpec(beta=0.0)).item() == pytest.approx(expected)


def test_gradient_is_exactly_zero_on_non_key_tokens():
    logp, adv, mask, valid, ref = example()
    grpo_loss(logp, adv, mask, ref_logp=ref, valid=valid, spec=LossSpec(beta=BETA)).backward()
    assert torch.isfinite(logp.grad).all()
    assert (logp.grad[~mask] == 0).all()
    # key token (0, 0): d/dlogp [-A + beta * KL] / |K_0| / B, with dKL/dlogp = 1 - exp(d) = -1
    assert logp.grad[0, 0].item() == pytest.approx((-1.0 + BETA * (1 - 2.0)) / 2 / 2)
    assert logp.grad[1, 1].item() == pytest.approx((2.0 + BETA * (1 - 2.0)) / 1 / 2)


def test_kl_on_valid_puts_only_kl_gradient_on_valid_non_key_tokens():
    logp, adv, mask, valid, ref = example()
    grpo_loss(logp, adv, mask, ref_logp=ref, valid=valid, spec=LossSpec(beta=BETA, kl_on="valid")).backward()
    assert (logp.grad[~valid] == 0).all()
    # (0, 1) is valid, not key: only the KL gradient beta * (1 - exp(ln 2)) / |K_0| / B
    assert logp.grad[0, 1].item() == pytest.approx(BETA * (1 - 2.0) / 2 / 2)


def test_zero_key_tokens_gives_finite_loss_and_zero_gradient():
    logp, adv, _, valid, ref = example()
    mask = torch.tensor([[T, F, F, F], [F, F, F, F]])
    loss = grpo_loss(logp, adv, mask, ref_logp=ref, valid=valid, spec=LossSpec(beta=BETA))
    loss.backward()
    assert loss.item() == pytest.approx(((-1.0 + BETA * K_UP) / 1 + 0.0) / 2)
    assert torch.isfinite(logp.grad).all()
    assert (logp.grad[1] == 0).all()
    nothing = torch.zeros(2, 4, dtype=torch.bool)
    for loss_type in ("grpo", "bnpo", "dr_grpo"):
        value = grpo_loss(logp, adv, nothing, ref_logp=ref, spec=LossSpec(loss_type=loss_type, max_completion_length=4))
        assert value.item() == 0.0


def test_released_form_equals_clipped_form_at_old_equal_current():
    logp, adv, mask, valid, ref = example()
    kwargs = dict(ref_logp=ref, spec=LossSpec(beta=BETA), valid=valid)
    released = grpo_loss(logp, adv, mask, **kwargs)
    (g_released,) = torch.autograd.grad(released, logp)
    clipped = grpo_loss(logp, adv, mask, old_logp=logp.detach(), **kwargs)
    (g_clipped,) = torch.autograd.grad(clipped, logp)
    assert torch.allclose(released, clipped)
    assert torch.allclose(g_released, g_clipped)


def test_clipping_zeroes_gradient_of_clipped_token():
    old = torch.zeros(1, 2)
    logp = torch.tensor([[math.log(1.5), 0.0]], requires_grad=True)  # ratios 1.5 and 1.0
    adv = torch.tensor([1.0])
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, stats = grpo_loss(logp, adv, mask, old_logp=old, return_stats=True, spec=LossSpec(beta=0.0, epsilon=0.2))
    loss.backward()
    assert loss.item() == pytest.approx(-(1.2 + 1.0) / 2)
    assert logp.grad[0, 0].item() == 0.0
    assert logp.grad[0, 1].item() == pytest.approx(-1.0 / 2)
    assert stats["clip_ratio"] == 0.5
    # a wider upper bound leaves the same token unclipped: gradient -ratio * A / |K|
    logp.grad = None
    grpo_loss(logp, adv, mask, old_logp=old, spec=LossSpec(beta=0.0, epsilon=0.2, epsilon_high=0.6)).backward()
    assert logp.grad[0, 0].item() == pytest.approx(-1.5 / 2)


def test_clipping_with_negative_advantage():
    old = torch.zeros(1, 1)
    logp = torch.tensor([[math.log(0.5)]], requires_grad=True)
    loss = grpo_loss(logp, torch.tensor([-1.0]), torch.ones(1, 1, dtype=torch.bool), old_logp=old, spec=LossSpec(beta=0.0))
    loss.backward()
    assert loss.item() == pytest.approx(0.8)  # -min(0.5 * -1, 0.8 * -1)
    assert logp.grad.item() == 0.0


def test_stats_report_kl_and_parts_that_sum_to_loss():
    logp, adv, mask, valid, ref = example()
    loss, stats = grpo_loss(logp, adv, mask, ref_logp=ref, valid=valid, return_stats=True, spec=LossSpec(beta=BETA))
    assert stats["kl"] == pytest.approx((ROW0_KL_MASK + ROW1_KL_MASK) / 3)
    assert stats["clip_ratio"] == 0.0
    assert stats["policy_loss"] == pytest.approx((ROW0_POLICY / 2 + ROW1_POLICY) / 2)
    assert stats["kl_loss"] == pytest.approx(BETA * (ROW0_KL_MASK / 2 + ROW1_KL_MASK) / 2)
    assert stats["policy_loss"] + stats["kl_loss"] == pytest.approx(loss.item())


def test_sequence_losses_mean_is_grpo_loss():
    logp, adv, mask, valid, ref = example()
    per_seq = sequence_losses(logp, adv, mask, ref_logp=ref, valid=valid, spec=LossSpec(beta=BETA))
    expected = torch.tensor([(ROW0_POLICY + BETA * ROW0_KL_MASK) / 2, ROW1_POLICY + BETA * ROW1_KL_MASK])
    assert torch.allclose(per_seq, expected)
    assert torch.allclose(per_seq.mean(), grpo_loss(logp, adv, mask, ref_logp=ref, valid=valid, spec=LossSpec(beta=BETA)))


def test_dr_grpo_requires_max_completion_length():
    logp, adv, mask, _, _ = example()
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(logp, adv, mask, spec=LossSpec(loss_type="dr_grpo"))


def test_bad_arguments_raise_with_choices_and_shapes():
    logp, adv, mask, _, _ = example()
    with pytest.raises(ValueError, match="grpo.*bnpo.*dapo.*dr_grpo"):
        grpo_loss(logp, adv, mask, spec=LossSpec(loss_type="ppo"))
    with pytest.raises(ValueError, match="kl_on.*mask.*valid"):
        grpo_loss(logp, adv, mask, spec=LossSpec(kl_on="everything"))
    with pytest.raises(ValueError, match="normalize_by"):
        grpo_loss(logp, adv, mask, spec=LossSpec(normalize_by="tokens"))
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        grpo_loss(logp, adv, mask[:, :3])
    with pytest.raises(ValueError, match=r"advantages.*\(3,\)"):
        grpo_loss(logp, torch.zeros(3), mask)
    with pytest.raises(ValueError, match="bool"):
        grpo_loss(logp, adv, mask.float())
