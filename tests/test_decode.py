"""The static decoder (model/decode.py) and counter noise (sampling.counter_uniform)."""

from __future__ import annotations

import pytest
import torch

from video_ktr.model.decode import StaticDecoder, resolve_decoder
from video_ktr.model.inputs import encode_prompts, select_prompts
from video_ktr.model.loading import special_tokens
from video_ktr.model.rollout import generate
from video_ktr.model.sampling import GumbelSampler, counter_uniform, row_seed, seed_keys


class StandInGraphs:
    """Stands in for CudaGraphs where CUDA is absent: capture records the step and runs nothing; a replay runs
    the recorded callable again with no argument, so it sees only what a CUDA graph would (tensors updated in
    place), never a Python value fixed at capture time."""

    def __init__(self):
        self.calls: list[str] = []

    def warm_up(self, fn):
        self.calls.append("warm_up")
        fn()

    def capture(self, fn):
        self.calls.append("capture")

        def replay():
            self.calls.append("replay")
            fn()

        return replay


class FailingGraphs(StandInGraphs):
    def capture(self, fn):
        self.calls.append("capture")
        raise RuntimeError("operation not permitted when stream is capturing")


@pytest.fixture(scope="module")
def prompts(tiny_setup, tiny_model):
    model, processor = tiny_model
    samples = tiny_setup.samples()
    picked = [next(s for s in samples if s.data_type == "video"), next(s for s in samples if s.data_type == "image"),
              [s for s in samples if s.data_type == "video"][3]]
    inputs = encode_prompts(processor, [s.messages() for s in picked], [tiny_setup.media(s) for s in picked])
    assert len(set(inputs["attention_mask"].sum(1).tolist())) > 1  # left padding
    return inputs, special_tokens(model.config, processor.tokenizer)


def _run(tiny_model, prompts, decoder, *, rows=(0, 1, 2), group_size=2, temperature=1.0, shared_prefill=True, **kw):
    model, processor = tiny_model
    inputs, special = prompts
    seeds = [row_seed(7, "rollout", 0, p, g) for p in rows for g in range(group_size)]
    args = dict(seeds=seeds, max_new_tokens=24, temperature=temperature, top_p=0.95, eos_ids=special.eos_ids,
                pad_id=special.pad_id, suppress_ids=special.vision_ids, group_size=group_size,
                shared_prefill=shared_prefill)
    args.update(kw)
    return generate(model, processor.tokenizer, select_prompts(inputs, list(rows)), decoder=decoder, **args)


def _ending_tokens(comps, prompts, first=4, count=2):
    """End-of-turn ids plus ``count`` tokens the rows draw only after column ``first`` (so rows end at different steps)."""
    _, special = prompts
    early = set(comps.ids[:, :first].flatten().tolist())
    late = [t for t in comps.ids[:, first:].flatten().tolist() if t not in early]
    picked = list(dict.fromkeys(late))[:count]
    assert len(picked) == count
    return (*special.eos_ids, *picked)


def _same(a, b):
    assert a.ids.shape == b.ids.shape, (a.ids.shape, b.ids.shape)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.valid, b.valid) and a.texts == b.texts


@pytest.mark.parametrize("temperature", [1.0, 0.0])
@pytest.mark.parametrize("shared_prefill", [True, False])
def test_static_decoder_samples_the_tokens_of_generate_on_cpu(tiny_model, prompts, temperature, shared_prefill):
    hf = _run(tiny_model, prompts, "hf", temperature=temperature, shared_prefill=shared_prefill)
    _same(hf, _run(tiny_model, prompts, "static", temperature=temperature, shared_prefill=shared_prefill))
    if temperature == 0:
        return  # greedy, the random model repeats one token: nothing to end rows with
    # the random model never ends a row by itself: make two of its tokens end-of-turn tokens, so rows end
    # at different steps (the pad-after-end, stop-check and trim logic all run)
    eos = _ending_tokens(hf, prompts)
    hf = _run(tiny_model, prompts, "hf", temperature=temperature, shared_prefill=shared_prefill, eos_ids=eos)
    assert not hf.valid.all() and 1 < hf.ids.shape[1]
    for every in (1, 5, 16):  # a stop check every step, every 5, every 16: the same tokens and trimmed shape
        _same(hf, _run(tiny_model, prompts, StaticDecoder(stop_every=every), temperature=temperature,
                       shared_prefill=shared_prefill, eos_ids=eos))


def test_static_decoder_honours_min_new_tokens(tiny_model, prompts):
    eos = _ending_tokens(_run(tiny_model, prompts, "hf"), prompts, first=2, count=3)
    assert int(_run(tiny_model, prompts, "hf", eos_ids=eos).lengths.min()) < 12  # rows would end before 12
    hf = _run(tiny_model, prompts, "hf", min_new_tokens=12, eos_ids=eos)
    _same(hf, _run(tiny_model, prompts, "static", min_new_tokens=12, eos_ids=eos))
    assert int(hf.lengths.min()) >= 12


def test_captured_step_replays_to_the_same_tokens(tiny_model, prompts):
    """The capture path (StaticCache, 4-D mask, device counters) run through the stand-in: the replayed step
    gives the tokens of the same static buffers decoded eagerly, run after run, and warm-up / capture come once."""
    plain = _run(tiny_model, prompts, StaticDecoder(graphs=StandInGraphs(), noise="counter"))
    eos = _ending_tokens(plain, prompts)
    graphs = StandInGraphs()
    captured = _run(tiny_model, prompts, StaticDecoder(graphs=graphs, noise="counter"), eos_ids=eos)
    assert not captured.valid.all()
    assert graphs.calls[:2] == ["warm_up", "capture"] and set(graphs.calls[2:]) == {"replay"}
    assert len(graphs.calls) >= 3
    again = _run(tiny_model, prompts, StaticDecoder(graphs=StandInGraphs(), noise="counter"), eos_ids=eos)
    _same(captured, again)
    # eager decoding with the same counter noise (reserving dynamic cache, 2-D mask): the same tokens
    eager = _run(tiny_model, prompts, StaticDecoder(graphs=None, noise="counter"), eos_ids=eos)
    _same(captured, eager)
    # a failed capture decodes on eagerly: still the same tokens
    failing = FailingGraphs()
    _same(captured, _run(tiny_model, prompts, StaticDecoder(graphs=failing, noise="counter"), eos_ids=eos))
    assert failing.calls[:2] == ["warm_up", "capture"]


def test_captured_step_with_generator_noise_matches_generate(tiny_model, prompts):
    """With the per-row generators the capture path (StaticCache) also gives the transformers path's tokens."""
    hf = _run(tiny_model, prompts, "hf", shared_prefill=False)
    _same(hf, _run(tiny_model, prompts, StaticDecoder(graphs=StandInGraphs(), noise="generator"), shared_prefill=False))


def test_counter_noise_completions_do_not_depend_on_the_batch(tiny_model, prompts):
    decoder = StaticDecoder(graphs=StandInGraphs(), noise="counter")
    together = _run(tiny_model, prompts, decoder)
    for p in range(3):
        alone = _run(tiny_model, prompts, StaticDecoder(graphs=StandInGraphs(), noise="counter"), rows=(p,))
        seeds_match = [row_seed(7, "rollout", 0, p, g) for g in range(2)]
        assert seeds_match  # the same seeds as in the batch of three (row_seed(.., p, g))
        for g in range(2):
            n = int(alone.lengths[g])
            assert together.ids[2 * p + g, :n].tolist() == alone.ids[g, :n].tolist(), (p, g)


def test_counter_uniform_is_uniform_and_keyed_by_seed_and_step():
    keys = seed_keys([row_seed(i) for i in range(64)])
    u = counter_uniform(keys, 3, 4096)
    assert u.shape == (64, 4096) and u.dtype == torch.float32
    assert float(u.min()) > 0 and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.var()) - 1 / 12) < 0.002
    hist = torch.histc(u, bins=16, min=0, max=1) / u.numel()
    assert float((hist - 1 / 16).abs().max()) < 0.002
    # a row depends on its own key and the step only
    assert torch.equal(counter_uniform(keys[5:6], 3, 4096), u[5:6])
    assert torch.equal(counter_uniform(keys, torch.tensor(3), 4096), u)
    assert not torch.equal(counter_uniform(keys, 4, 4096), u)
    assert float((u[0] - u[1]).abs().mean()) > 0.2  # neighbouring seeds are not correlated
    # consecutive steps of one row are not correlated either
    a, b = counter_uniform(keys, 10, 4096), counter_uniform(keys, 11, 4096)
    assert abs(float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])) < 0.01


def test_counter_sampler_draws_from_the_tempered_distribution():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    n = 4000
    sampler = GumbelSampler([row_seed(i) for i in range(n)], temperature=0.5, noise="counter")
    picks = sampler(None, logits.expand(n, -1).clone()).argmax(-1)
    assert int(sampler.step) == 1  # the device counter advanced
    freq = torch.bincount(picks, minlength=4).float() / n
    assert torch.allclose(freq, torch.softmax(logits / 0.5, -1), atol=0.03), freq
    second = sampler(None, logits.expand(n, -1).clone()).argmax(-1)
    assert not torch.equal(picks, second)  # a new step, new noise


def test_decoder_setting_is_checked_and_auto_means_cpu_hf():
    assert resolve_decoder("auto", torch.device("cpu")) == "hf"
    assert resolve_decoder("auto", torch.device("cuda")) == "static"
    assert resolve_decoder("hf", torch.device("cuda")) == "hf"
    with pytest.raises(ValueError, match="rollout decoder"):
        resolve_decoder("vllm", torch.device("cpu"))
    with pytest.raises(ValueError, match="noise"):
        GumbelSampler([0], noise="philox")



def test_trainer_steps_are_the_same_with_the_static_decoder_on_cpu(tiny_setup, tmp_path):
    """--rollout_decoder static in the GRPO step: on CPU the same completions, rewards and losses as hf (auto's CPU choice)."""
    from video_ktr.training.grpo import KTRTrainer
    from video_ktr.training.grpo_config import TrainConfig
    from video_ktr.utils.config import parse_args

    runs = {}
    for decoder in ("hf", "static"):
        cfg = parse_args(TrainConfig, tiny_setup.train_args(tmp_path / decoder, "--max_steps", "2", "--token_selection",
                                                            "all", "--rollout_decoder", decoder))
        trainer = KTRTrainer(cfg)
        runs[decoder] = [trainer.train_step() for _ in range(2)]
    for a, b in zip(runs["hf"], runs["static"]):
        assert "loss" in a and "completion_length" in a
        for key in ("loss", "completion_length", "reward", "grad_norm"):
            if key in a:
                assert a[key] == b[key], (key, a[key], b[key])


def test_graph_store_replays_a_kept_step_for_later_calls_of_the_same_shapes(tiny_model, prompts):
    """A GraphStore keeps the captured step: a later call with the same rows and cache columns (other prompts, other
    prompt lengths, other seeds, weights changed in place) loads its values into the kept buffers and replays,
    with no warm-up or capture, and gets the tokens of decoding it afresh; other shapes or re-allocated weights
    capture again."""
    from video_ktr.model.decode import GraphStore

    model, _ = tiny_model
    inputs, _ = prompts
    store, graphs = GraphStore(), StandInGraphs()
    kept = StaticDecoder(graphs=graphs, noise="counter", store=store, capacity_multiple=256)

    def eager(**kw):
        return _run(tiny_model, prompts, StaticDecoder(graphs=None, noise="counter"), **kw)

    first = _run(tiny_model, prompts, kept, rows=(0,))
    assert graphs.calls[:2] == ["warm_up", "capture"] and store.captures == 1 and len(store.entries) == 1
    _same(first, eager(rows=(0,)))
    lengths = [int(inputs["attention_mask"][r].sum()) for r in range(3)]
    other = next(r for r in (1, 2) if lengths[r] != lengths[0])  # a prompt of another length, the same rounded columns
    before = len(graphs.calls)
    second = _run(tiny_model, prompts, kept, rows=(other,), seeds=[row_seed(9, "rollout", 1, other, g) for g in range(2)])
    assert set(graphs.calls[before:]) == {"replay"} and store.hits == 1 and store.captures == 1
    _same(second, eager(rows=(other,), seeds=[row_seed(9, "rollout", 1, other, g) for g in range(2)]))
    _same(first, eager(rows=(0,)))  # the first call's tokens were handed out as a copy of the kept buffers
    # weights updated in place (as an optimizer step does): the kept step reads them
    weight = model.lm_head.weight
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.mul_(1.5)
        before = len(graphs.calls)
        moved = _run(tiny_model, prompts, kept, rows=(0,))
        assert set(graphs.calls[before:]) == {"replay"} and store.hits == 2
        _same(moved, eager(rows=(0,)))
        assert not torch.equal(moved.ids, first.ids)
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    # another batch size: a second kept step
    before = len(graphs.calls)
    _same(_run(tiny_model, prompts, kept, rows=(0, 1)), eager(rows=(0, 1)))
    assert graphs.calls[before:before + 2] == ["warm_up", "capture"] and len(store.entries) == 2
    # a weight re-allocated (a new tensor, not updated in place): the kept steps read the old one, capture again
    data = weight.data
    try:
        weight.data = data.clone()
        before = len(graphs.calls)
        _same(_run(tiny_model, prompts, kept, rows=(0,)), eager(rows=(0,)))
        assert graphs.calls[before:before + 2] == ["warm_up", "capture"] and len(store.entries) == 2  # oldest dropped
    finally:
        weight.data = data
    store.clear()
    assert not store.entries


def test_generator_noise_is_never_captured():
    """Per-row generators draw their noise in Python-chosen blocks, which a replayed graph would freeze: that
    noise decodes eagerly on the static buffers, and says why."""
    from types import SimpleNamespace

    from video_ktr.model.decode import decode_from

    class Model(torch.nn.Module):
        def forward(self, input_ids, **kw):
            return SimpleNamespace(logits=torch.zeros(input_ids.shape[0], 1, 16))

    graphs = StandInGraphs()
    result = decode_from(Model(), None, torch.tensor([3, 4]), torch.ones(2, 3, dtype=torch.long),
                         sampler=GumbelSampler([1, 2], noise="generator"), max_new_tokens=6, eos_ids=(15,), pad_id=0,
                         graphs=graphs)
    assert result.steps == 6 and not result.captured and graphs.calls == []
    assert "generator noise" in result.fallback
    # the counter noise is captured on the same path
    counter = decode_from(Model(), None, torch.tensor([3, 4]), torch.ones(2, 3, dtype=torch.long),
                          sampler=GumbelSampler([1, 2], noise="counter"), max_new_tokens=6, eos_ids=(15,), pad_id=0,
                          graphs=graphs)
    assert counter.captured and graphs.calls[:2] == ["warm_up", "capture"] and counter.fallback is None


def test_rollout_decoder_keeps_graphs_only_for_the_static_decoder():
    from video_ktr.model.decode import GraphStore, rollout_decoder

    assert rollout_decoder("auto", "cpu") == "hf" and rollout_decoder("hf", "cuda") == "hf"
    for setting, device in (("auto", "cuda"), ("static", "cpu")):
        decoder = rollout_decoder(setting, device)
        assert isinstance(decoder, StaticDecoder) and isinstance(decoder.store, GraphStore)
    assert rollout_decoder("static", "cpu").store is not rollout_decoder("static", "cpu").store
    d = StaticDecoder(store=GraphStore(), capacity_multiple=64)
    assert d.capacity(100, 28, graphs=object()) == 128 and d.capacity(100, 29, graphs=object()) == 192
    assert d.capacity(100, 29, graphs=None) == 129 and StaticDecoder().capacity(100, 29, graphs=object()) == 129


def test_trainer_steps_replay_the_kept_graph_with_the_updated_weights(tiny_setup, tmp_path):
    """Two GRPO-KTR steps whose rollouts replay one kept graph (the optimizer updates the weights in place between
    them) take the steps of rollouts that capture afresh every time: same completions, rewards, losses, gradients."""
    from dataclasses import replace

    from video_ktr.model.decode import GraphStore
    from video_ktr.training.grpo import KTRTrainer
    from video_ktr.training.grpo_config import TrainConfig
    from video_ktr.utils.config import parse_args

    runs, stores = {}, {}
    for name in ("fresh", "kept"):
        cfg = parse_args(TrainConfig, tiny_setup.train_args(tmp_path / name, "--max_steps", "2", "--token_selection",
                                                            "all", "--learning_rate", "1e-3"))
        trainer = KTRTrainer(cfg)
        stores[name] = GraphStore() if name == "kept" else None
        decoder = StaticDecoder(graphs=StandInGraphs(), noise="counter", store=stores[name])
        trainer.sampling = replace(trainer.sampling, decoder=decoder)
        runs[name] = [trainer.train_step() for _ in range(2)]
    assert stores["kept"].captures >= 1 and stores["kept"].hits >= 1
    for a, b in zip(runs["fresh"], runs["kept"]):
        for key in ("loss", "completion_length", "reward", "grad_norm"):
            if key in a:
                assert a[key] == b[key], (key, a[key], b[key])


@pytest.mark.parametrize("shared_prefill", [True, False])
def test_a_kept_steps_cache_takes_the_next_prefill(tiny_model, prompts, monkeypatch, shared_prefill):
    """A later rollout of the kept shapes prefills straight into the kept step's static cache (no second cache),
    and still decodes the tokens of a fresh eager decode."""
    import video_ktr.model.rollout as rollout_module
    from video_ktr.model.decode import GraphStore

    caches = []
    original = rollout_module.decode_from
    monkeypatch.setattr(rollout_module, "decode_from", lambda model, cache, *a, **kw: caches.append(cache)
                        or original(model, cache, *a, **kw))
    store = GraphStore()
    kept = StaticDecoder(graphs=StandInGraphs(), noise="counter", store=store, capacity_multiple=256)
    eager = StaticDecoder(graphs=None, noise="counter")
    for rows in ((0,), (2,), (1,)):
        got = _run(tiny_model, prompts, kept, rows=rows, shared_prefill=shared_prefill)
        _same(got, _run(tiny_model, prompts, eager, rows=rows, shared_prefill=shared_prefill))
    kept_caches = caches[0::2]  # the eager runs' caches in between are their own
    assert store.hits == 2 and kept_caches[1] is kept_caches[0] and kept_caches[2] is kept_caches[0]
