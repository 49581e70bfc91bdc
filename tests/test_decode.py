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
