"""The reserving key/value cache (kv_cache): the same keys, values and samples as transformers' concatenating one."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from video_ktr.model import kv_cache, rollout
from video_ktr.model.inputs import encode_prompts
from video_ktr.model.loading import special_tokens
from video_ktr.model.sampling import row_seed


def _filled(batch=3, heads=2, length=5, dim=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    cache = DynamicCache()
    cache.update(torch.randn(batch, heads, length, dim, generator=g), torch.randn(batch, heads, length, dim, generator=g), 0)
    return cache, g


def _steps(cache, g, count, batch=3, heads=2, dim=4, width=1):
    for _ in range(count):
        k, v = torch.randn(batch, heads, width, dim, generator=g), torch.randn(batch, heads, width, dim, generator=g)
        out = cache.update(k, v, 0)
    return out


@pytest.mark.parametrize("capacity", [0, 7, 64])
def test_reserved_updates_return_what_concatenation_returns(capacity):
    """Decoding steps, a multi-token update and growth past the reserved room (capacity 0 and 7 run out)."""
    plain, g1 = _filled()
    reserved, g2 = _filled()
    kv_cache.reserve(reserved, capacity)
    layer = reserved.layers[0]
    assert isinstance(layer, DynamicLayer) and type(layer) is not DynamicLayer
    for count, width in ((3, 1), (1, 4), (6, 1)):
        k1, v1 = _steps(plain, g1, count, width=width)
        k2, v2 = _steps(reserved, g2, count, width=width)
        assert torch.equal(k1, k2) and torch.equal(v1, v2)
        assert reserved.get_seq_length() == plain.get_seq_length()
    # inside the room no step allocates: the keys are views of one buffer
    roomy, g3 = _filled()
    kv_cache.reserve(roomy, 64)
    ptr = roomy.layers[0]._kbuf.data_ptr()
    _steps(roomy, g3, 5)
    assert roomy.layers[0]._kbuf.data_ptr() == ptr and roomy.layers[0].keys.data_ptr() == ptr


def test_room_is_reserved_a_step_ahead_not_to_the_end():
    """A long expected length reserves RESERVE_STEP tokens ahead at a time: memory follows what is filled."""
    step = kv_cache.RESERVE_STEP
    assert kv_cache.room_for(5, 64) == 64 and kv_cache.room_for(5, 10_000) == 5 + step
    assert kv_cache.room_for(64, 64) == 64 + step  # past the expected length: a step more each time
    cache, g = _filled()
    kv_cache.reserve(cache, 10_000)
    layer = cache.layers[0]
    sizes = [layer._kbuf.shape[-2]]
    for _ in range(step + 10):
        _steps(cache, g, 1)
        sizes.append(layer._kbuf.shape[-2])
    assert sorted(set(sizes)) == [5 + step, 5 + step + 1 + step]  # one growth in step + 10 tokens
    assert cache.get_seq_length() == 5 + step + 10


def test_reserved_layer_survives_selection_and_crop():
    """Beam-search style row selection and cropping replace or shorten the keys: later updates stay right."""
    plain, g1 = _filled()
    reserved, g2 = _filled()
    kv_cache.reserve(reserved, 32)
    for c, g in ((plain, g1), (reserved, g2)):
        _steps(c, g, 2)
        c.batch_select_indices(torch.tensor([2, 0, 0]))
        c.crop(-1)
    k1, v1 = _steps(plain, g1, 3)
    k2, v2 = _steps(reserved, g2, 3)
    assert torch.equal(k1, k2) and torch.equal(v1, v2)


def test_an_update_with_gradient_concatenates():
    """Keys that carry a gradient never go into a buffer written in place: the graph stays correct."""
    reserved, g = _filled()
    kv_cache.reserve(reserved, 32)
    w = torch.ones((), requires_grad=True)
    k = torch.randn(3, 2, 1, 4, generator=g) * w
    keys, values = reserved.update(k, torch.randn(3, 2, 1, 4, generator=g) * w, 0)
    (keys.sum() + values.sum()).backward()
    assert w.grad is not None and float(w.grad) != 0.0


def test_repeat_rows_equals_batch_repeat_interleave():
    plain, g1 = _filled(batch=2)
    reserved, g2 = _filled(batch=2)
    plain.batch_repeat_interleave(3)
    assert kv_cache.repeat_rows(reserved, 3, 16)
    assert torch.equal(plain.layers[0].keys, reserved.layers[0].keys)
    k1, v1 = _steps(plain, g1, 4, batch=6)
    k2, v2 = _steps(reserved, g2, 4, batch=6)
    assert torch.equal(k1, k2) and torch.equal(v1, v2)


def test_other_layer_kinds_are_left_alone():
    """A cache with a layer that is not a plain dynamic one (here a static one) is not touched."""
    from transformers.cache_utils import StaticLayer

    cache, _ = _filled()
    cache.layers.append(StaticLayer(max_cache_len=8))
    before = list(cache.layers)
    assert not kv_cache.repeat_rows(cache, 2, 16)
    kv_cache.reserve(cache, 16)
    assert cache.layers == before and all(type(layer) in (DynamicLayer, StaticLayer) for layer in cache.layers)


@pytest.mark.parametrize("shared_prefill", [True, False])
def test_rollouts_sample_the_same_tokens_with_reserved_room(tiny_setup, tiny_model, monkeypatch, shared_prefill):
    """The rollout (shared prefill or not) samples exactly what it sampled with transformers' own cache."""
    model, processor = tiny_model
    samples = tiny_setup.samples()
    picked = [next(s for s in samples if s.data_type == "video"), next(s for s in samples if s.data_type == "image")]
    inputs = encode_prompts(processor, [s.messages() for s in picked], [tiny_setup.media(s) for s in picked])
    special = special_tokens(model.config, processor.tokenizer)
    G = 3
    args = dict(seeds=[row_seed(2, "rollout", 0, p, g) for p in range(2) for g in range(G)], max_new_tokens=24,
                temperature=1.0, top_p=1.0, eos_ids=special.eos_ids, pad_id=special.pad_id,
                suppress_ids=special.vision_ids, group_size=G, shared_prefill=shared_prefill)
    calls = []
    real_repeat, real_new = kv_cache.repeat_rows, kv_cache.new_cache
    monkeypatch.setattr(rollout, "repeat_rows", lambda *a: calls.append("repeat") or real_repeat(*a))
    monkeypatch.setattr(rollout, "new_cache", lambda *a: calls.append("new") or real_new(*a))
    reserved = rollout.generate(model, processor.tokenizer, inputs, **args)
    assert calls == (["repeat"] if shared_prefill else ["new"])
    monkeypatch.setattr(rollout, "repeat_rows", lambda *a: False)
    monkeypatch.setattr(rollout, "new_cache", lambda *a: None)
    plain = rollout.generate(model, processor.tokenizer, inputs, **args)
    assert torch.equal(reserved.ids, plain.ids) and torch.equal(reserved.valid, plain.valid)
    assert int(plain.valid.sum()) > 2 * G  # the rows really decoded several tokens
