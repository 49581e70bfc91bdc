import math

import pytest
import torch

from video_ktr.core import selection
from video_ktr.core.selection import (
    SelectionSpec,
    jaccard,
    mask_at_threshold,
    mask_stats,
    quantile_threshold,
    random_mask_like,
    select_key_tokens,
    select_key_tokens_grouped,
    top_ratio_mask,
)

T, F = True, False


def b(rows):
    return torch.tensor(rows, dtype=torch.bool)


def f(rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_ties_at_threshold_are_all_selected():
    # q = 0.6, rank 2.4 between sorted[2] = 2 and sorted[3] = 2 -> tau = 2: four of five tokens.
    scores = f([[1, 2, 2, 2, 3]])
    valid = b([[T, T, T, T, T]])
    assert top_ratio_mask(scores, valid, 0.4).tolist() == [[F, T, T, T, T]]
    # q = 0.8, rank 3.2 -> tau = 2 + 0.2 * (3 - 2) = 2.2: only the 3.
    assert top_ratio_mask(scores, valid, 0.2).tolist() == [[F, F, F, F, T]]


def test_all_equal_scores_select_every_valid_token():
    # The paper's `>=` rule: a probe that changes nothing selects everything (fault 8 in the spec).
    scores = torch.zeros(2, 3)
    valid = b([[T, T, F], [T, T, T]])
    assert torch.equal(top_ratio_mask(scores, valid, 0.2), valid)


def test_linear_interpolation_threshold():
    scores = f([[0, 1, 2, 3, 4]])
    valid = torch.ones(1, 5, dtype=torch.bool)
    # q = 0.5, rank 2 -> tau = 2.
    assert top_ratio_mask(scores, valid, 0.5).tolist() == [[F, F, T, T, T]]
    assert quantile_threshold(scores, 0.5).item() == 2.0
    assert quantile_threshold(scores, 0.3).item() == pytest.approx(2.8)


def test_invalid_positions_are_never_selected_nor_pooled():
    scores = f([[100, 1, 2, 3, 4]])
    valid = b([[F, T, T, T, T]])
    # pool [1, 2, 3, 4], q = 0.5 -> tau = 2.5
    assert top_ratio_mask(scores, valid, 0.5).tolist() == [[F, F, F, T, T]]
    assert not top_ratio_mask(scores, valid, 1.0)[0, 0]


def test_nothing_valid_selects_nothing():
    scores = f([[1, 2], [3, 4]])
    valid = torch.zeros(2, 2, dtype=torch.bool)
    assert not top_ratio_mask(scores, valid, 0.5).any()
    assert not select_key_tokens(valid, entropy=scores, visual=scores).any()
    assert quantile_threshold(torch.empty(0), 0.2).item() == math.inf


def test_empty_row_gets_nothing_others_are_selected():
    scores = f([[1, 2, 3, 4], [9, 9, 9, 9]])
    valid = b([[T, T, T, T], [F, F, F, F]])
    assert top_ratio_mask(scores, valid, 0.5).tolist() == [[F, F, T, T], [F, F, F, F]]


def test_ratio_zero_and_one():
    scores = f([[3, 1, 2, 5]])
    valid = b([[T, T, T, F]])
    assert not top_ratio_mask(scores, valid, 0.0).any()
    assert not top_ratio_mask(scores, valid, -0.1).any()
    assert torch.equal(top_ratio_mask(scores, valid, 1.0), valid)
    assert torch.equal(top_ratio_mask(scores, valid, 1.5), valid)


def test_non_finite_scores_are_not_selectable_nor_pooled():
    scores = f([[math.nan, 1, 2, 3, 4, math.inf, -math.inf]])
    valid = torch.ones(1, 7, dtype=torch.bool)
    # pool [1, 2, 3, 4], q = 0.5 -> tau = 2.5
    assert top_ratio_mask(scores, valid, 0.5).tolist() == [[F, F, F, T, T, F, F]]
    assert top_ratio_mask(scores, valid, 1.0).tolist() == [[F, T, T, T, T, F, F]]


def test_positive_only_drops_zero_scores():
    # Six zeros and two positives, ratio 0.5: rank 3.5 lands on zeros -> tau = 0 selects all eight.
    scores = f([[0, 0, 0, 0, 0, 0, 1, 2]])
    valid = torch.ones(1, 8, dtype=torch.bool)
    assert top_ratio_mask(scores, valid, 0.5).all()
    kept = top_ratio_mask(scores, valid, 0.5, positive_only=True)
    assert kept.tolist() == [[F, F, F, F, F, F, T, T]]
    assert torch.equal(select_key_tokens(valid, visual=scores, spec=SelectionSpec(visual_ratio=0.5, positive_only=True)), kept)
    assert torch.equal(
        select_key_tokens(valid, temporal=scores, spec=SelectionSpec(temporal_ratio=0.5, positive_only=True)), kept
    )
    # Entropy ignores positive_only (it is never negative; zero entropy is a legitimate score).
    assert select_key_tokens(valid, entropy=scores, spec=SelectionSpec(entropy_ratio=0.5, positive_only=True)).all()


def test_union_of_signals():
    valid = torch.ones(1, 5, dtype=torch.bool)
    entropy = f([[5, 1, 1, 1, 1]])
    visual = f([[1, 5, 1, 1, 1]])
    temporal = f([[1, 1, 1, 1, 5]])
    # each ratio 0.2 -> q 0.8, rank 3.2 -> tau = 1 + 0.2 * 4 = 1.8: only the 5 of each signal.
    got = select_key_tokens(valid, entropy, visual, temporal)
    assert got.tolist() == [[T, T, F, F, T]]
    assert select_key_tokens(valid, entropy, None, temporal).tolist() == [[T, F, F, F, T]]


def test_no_signal_is_vanilla_grpo():
    valid = b([[T, T, F], [T, F, F]])
    assert torch.equal(select_key_tokens(valid), valid)


def test_temporal_rows_restrict_pool_and_selection():
    valid = torch.ones(2, 5, dtype=torch.bool)
    temporal = f([[1, 2, 3, 4, 5], [100, 100, 100, 100, 100]])
    rows = b([T, F])
    # pool = row 0 only, q 0.6, rank 2.4 -> tau = 3.4
    got = select_key_tokens(valid, temporal=temporal, temporal_rows=rows, spec=SelectionSpec(temporal_ratio=0.4))
    assert got.tolist() == [[F, F, F, T, T], [F, F, F, F, F]]
    # without the restriction the image row (100s) takes the whole selection: tau = sorted[5] = 100
    got_all = select_key_tokens(valid, temporal=temporal, spec=SelectionSpec(temporal_ratio=0.4))
    assert got_all.tolist() == [[F, F, F, F, F], [T, T, T, T, T]]
    # temporal_rows never limits the other signals
    entropy = f([[0, 0, 0, 0, 0], [0, 0, 0, 0, 9]])
    both = select_key_tokens(
        valid, entropy, temporal=temporal, temporal_rows=rows, spec=SelectionSpec(entropy_ratio=0.1, temporal_ratio=0.4))
    assert both.tolist() == [[F, F, F, T, T], [F, F, F, F, T]]


def test_group_scope_equals_per_group_calls_and_differs_from_batch():
    valid = torch.ones(4, 2, dtype=torch.bool)
    entropy = f([[1, 2], [3, 4], [10, 20], [30, 40]])
    grouped = select_key_tokens_grouped(valid, 2, entropy=entropy, spec=SelectionSpec(scope="group", entropy_ratio=0.5))
    # group 0 pool [1, 2, 3, 4] -> tau 2.5; group 1 pool [10, 20, 30, 40] -> tau 25
    assert grouped.tolist() == [[F, F], [T, T], [F, F], [T, T]]
    per_group = torch.cat(
        [select_key_tokens(valid[s : s + 2], entropy[s : s + 2], spec=SelectionSpec(entropy_ratio=0.5)) for s in (0, 2)]
    )
    assert torch.equal(grouped, per_group)
    # batch pool of eight -> rank 3.5, tau = 7: all of group 1, none of group 0
    batch = select_key_tokens_grouped(valid, 2, entropy=entropy, spec=SelectionSpec(scope="batch", entropy_ratio=0.5))
    assert batch.tolist() == [[F, F], [F, F], [T, T], [T, T]]


def test_group_scope_slices_temporal_rows():
    valid = torch.ones(4, 2, dtype=torch.bool)
    temporal = f([[1, 2], [3, 4], [10, 20], [30, 40]])
    rows = b([T, T, F, F])
    got = select_key_tokens_grouped(valid, 2, temporal=temporal, temporal_rows=rows, spec=SelectionSpec(temporal_ratio=0.5))
    assert got.tolist() == [[F, F], [T, T], [F, F], [F, F]]


def test_grouped_rejects_bad_scope_and_group_size():
    valid = torch.ones(3, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="global"):
        select_key_tokens_grouped(valid, 3, spec=SelectionSpec(scope="global"))
    with pytest.raises(ValueError, match="3 rows.*group_size=2"):
        select_key_tokens_grouped(valid, 2)


def test_mask_at_threshold_matches_top_ratio_mask():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 6, generator=gen)
    valid = torch.rand(3, 6, generator=gen) > 0.3
    tau = quantile_threshold(scores[valid], 0.3)
    assert torch.equal(mask_at_threshold(scores, valid, tau), top_ratio_mask(scores, valid, 0.3))


def test_random_mask_exact_count_subset_and_determinism():
    valid = torch.zeros(3, 7, dtype=torch.bool)
    valid[0, :4] = True
    valid[1, :5] = True
    valid[2, :1] = True  # 10 valid tokens
    m1 = random_mask_like(valid, 0.3, torch.Generator().manual_seed(7))
    m2 = random_mask_like(valid, torch.tensor(0.3), torch.Generator().manual_seed(7))
    assert int(m1.sum()) == 3
    assert not (m1 & ~valid).any()
    assert torch.equal(m1, m2)
    others = [random_mask_like(valid, 0.3, torch.Generator().manual_seed(s)) for s in range(8, 14)]
    assert any(not torch.equal(m1, o) for o in others)
    assert torch.equal(random_mask_like(valid, 1.0, torch.Generator()), valid)
    assert not random_mask_like(valid, 0.0, torch.Generator()).any()
    with pytest.raises(ValueError):
        random_mask_like(valid, 1.5, torch.Generator())


def test_quantile_kthvalue_equals_torch_quantile_small():
    pool = f([1, 2, 2, 2, 3, 0.5, 7])
    for q in (0.0, 0.1, 0.25, 0.5, 0.6, 0.8, 0.95, 1.0):
        assert torch.equal(selection._quantile_by_kthvalue(pool, q), torch.quantile(pool, q))


def test_large_pool_fallback_equals_torch_quantile(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    pools = [torch.randn(1001, generator=gen), torch.randint(0, 7, (500,), generator=gen).float()]
    monkeypatch.setattr(selection, "TORCH_QUANTILE_MAX_NUMEL", 10)
    for pool in pools:
        for ratio in (0.05, 0.2, 0.37, 0.5, 0.8, 1.0):
            expected = torch.quantile(pool, 1 - ratio)
            assert torch.equal(quantile_threshold(pool, ratio), expected), ratio


def test_mask_stats_fractions_of_valid_tokens():
    valid = b([[T, T, T, F], [T, F, F, F]])
    masks = {"entropy": b([[T, F, F, T], [F, F, F, F]]), "all": valid}
    assert mask_stats(valid, masks) == {"entropy": 0.25, "all": 1.0}
    assert mask_stats(torch.zeros(1, 2, dtype=torch.bool), {"x": b([[T, T]])}) == {"x": 0.0}


def test_jaccard():
    a = b([[T, T, F, F]])
    c = b([[F, T, T, F]])
    assert jaccard(a, c) == pytest.approx(1 / 3)
    assert jaccard(a, a) == 1.0
    empty = torch.zeros(1, 4, dtype=torch.bool)
    assert jaccard(empty, empty) == 0.0


def test_signal_masks_global_scope_on_one_process_is_the_batch_scope():
    """'global' gathers the pools of every process; with one process (gather = identity) it is 'batch'."""
    from video_ktr.core.selection import signal_masks

    g = torch.Generator().manual_seed(0)
    valid = torch.rand(4, 6, generator=g) > 0.2
    scores = {"entropy": torch.rand(4, 6, generator=g), "visual": torch.randn(4, 6, generator=g),
              "temporal": torch.randn(4, 6, generator=g)}
    rows = torch.tensor([True, True, False, False])
    spec = SelectionSpec(scope="batch", entropy_ratio=0.3, visual_ratio=0.4, temporal_ratio=0.5, positive_only=True)
    batch = signal_masks(scores, valid, 2, spec, temporal_rows=rows)
    seen = []
    glob = signal_masks(scores, valid, 2, SelectionSpec(**{**spec.__dict__, "scope": "global"}), temporal_rows=rows,
                        gather=lambda pool: seen.append(pool) or pool)
    assert len(seen) == 3 and torch.isnan(seen[2][~(valid & rows[:, None]).flatten()]).all()
    for name in scores:
        assert torch.equal(batch[name], glob[name]), name
    assert not glob["temporal"][2:].any() and glob["temporal"][:2].any()
    with pytest.raises(ValueError, match="gather"):
        signal_masks(scores, valid, 2, SelectionSpec(scope="global"))
