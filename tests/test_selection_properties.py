"""Property tests of the selection and advantage functions on arbitrary score tensors."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from video_ktr.core.loss import group_advantages
from video_ktr.core.selection import quantile_threshold, random_mask_like, select_key_tokens, top_ratio_mask

finite = st.floats(min_value=-50, max_value=50, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def scored_batch(draw):
    rows = draw(st.integers(1, 5))
    cols = draw(st.integers(1, 7))
    scores = torch.tensor(draw(st.lists(finite, min_size=rows * cols, max_size=rows * cols))).view(rows, cols)
    valid = torch.tensor(draw(st.lists(st.booleans(), min_size=rows * cols, max_size=rows * cols))).view(rows, cols)
    return scores, valid


@settings(max_examples=150, deadline=None)
@given(scored_batch(), st.floats(0.0, 1.0))
def test_top_ratio_mask_selects_only_valid_tokens_at_or_above_the_threshold(batch, ratio):
    scores, valid = batch
    mask = top_ratio_mask(scores, valid, ratio)
    assert not (mask & ~valid).any()
    if valid.any() and ratio > 0:
        tau = quantile_threshold(scores[valid], ratio)
        assert torch.equal(mask, valid & (scores >= tau))
        # at least the top ratio of the pool is kept (ties at the threshold may add more)
        assert int(mask.sum()) >= math.floor(ratio * int(valid.sum()) + 1e-9) - 1
    else:
        assert not mask.any()


@settings(max_examples=100, deadline=None)
@given(scored_batch(), st.floats(0.05, 0.5), st.floats(0.5, 1.0))
def test_a_larger_ratio_never_selects_fewer_tokens(batch, small, large):
    scores, valid = batch
    assert not (top_ratio_mask(scores, valid, small) & ~top_ratio_mask(scores, valid, large)).any()


@settings(max_examples=100, deadline=None)
@given(scored_batch(), st.data())
def test_the_key_mask_is_the_union_of_the_signal_masks(batch, data):
    scores, valid = batch
    other = torch.flip(scores, dims=[1])
    rows = torch.tensor(data.draw(st.lists(st.booleans(), min_size=scores.shape[0], max_size=scores.shape[0])))
    key = select_key_tokens(valid, entropy=scores.abs(), visual=other, temporal=scores, temporal_rows=rows)
    expected = (top_ratio_mask(scores.abs(), valid, 0.2) | top_ratio_mask(other, valid, 0.2)
                | top_ratio_mask(scores, valid & rows[:, None], 0.2))
    assert torch.equal(key, expected)
    assert not (key & ~valid).any()


@settings(max_examples=100, deadline=None)
@given(scored_batch(), st.floats(0.0, 1.0), st.integers(0, 2**31 - 1))
def test_random_mask_keeps_exactly_the_requested_count_of_valid_tokens(batch, fraction, seed):
    _, valid = batch
    mask = random_mask_like(valid, fraction, torch.Generator().manual_seed(seed))
    assert not (mask & ~valid).any()
    assert int(mask.sum()) == round(fraction * int(valid.sum()))
    again = random_mask_like(valid, fraction, torch.Generator().manual_seed(seed))
    assert torch.equal(mask, again)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 4), st.integers(2, 6), st.data())
def test_advantages_have_zero_mean_per_group_and_are_finite(groups, size, data):
    rewards = torch.tensor(data.draw(st.lists(st.floats(-5, 5, allow_nan=False, width=32),
                                              min_size=groups * size, max_size=groups * size)))
    adv = group_advantages(rewards, size)
    assert torch.isfinite(adv).all()
    assert torch.allclose(adv.view(groups, size).mean(1), torch.zeros(groups), atol=1e-4)
