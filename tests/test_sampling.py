"""Batch-invariant sampling (GumbelSampler + rollout.generate): a completion depends on its own seed only."""

from __future__ import annotations

import math

import pytest
import torch

from video_ktr.model.inputs import encode_prompts, select_prompts
from video_ktr.model.loading import special_tokens
from video_ktr.model.rollout import generate
from video_ktr.model.sampling import GumbelSampler, row_seed, top_p_filter


@pytest.fixture(scope="module")
def prompts(tiny_setup, tiny_model):
    """Three prompts: a video, an image and another video (different prompt lengths: left padding)."""
    model, processor = tiny_model
    samples = tiny_setup.samples()
    picked = [next(s for s in samples if s.data_type == "video"), next(s for s in samples if s.data_type == "image"),
              [s for s in samples if s.data_type == "video"][3]]
    media = [tiny_setup.media(s) for s in picked]
    inputs = encode_prompts(processor, [s.messages() for s in picked], media)
    assert len(set(inputs["attention_mask"].sum(1).tolist())) > 1
    return inputs, special_tokens(model.config, processor.tokenizer)


def _generate(model, processor, inputs, special, rows, seeds, **kw):
    args = dict(max_new_tokens=16, temperature=1.0, top_p=0.95, eos_ids=special.eos_ids, pad_id=special.pad_id,
                suppress_ids=special.vision_ids)
    args.update(kw)
    return generate(model, processor.tokenizer, select_prompts(inputs, rows), seeds=seeds, **args)


def _row(comps, r):
    return comps.ids[r][comps.valid[r]].tolist()


def test_completions_do_not_depend_on_the_batch(tiny_model, prompts):
    model, processor = tiny_model
    inputs, special = prompts
    seeds = [row_seed(0, "rollout", 0, p, g) for p in range(3) for g in range(2)]
    rows = [0, 0, 1, 1, 2, 2]
    together = _generate(model, processor, inputs, special, rows, seeds)
    alone = [_generate(model, processor, inputs, special, [p, p], seeds[2 * p:2 * p + 2]) for p in range(3)]
    # Left padding changes the floating-point sums by ~1e-6, which could flip a sample only at an
    # exact near-tie of (logit + Gumbel noise); with these seeds every token is identical.
    for p in range(3):
        for g in range(2):
            assert _row(together, 2 * p + g) == _row(alone[p], g), (p, g)
    # the two completions of one prompt differ (their own streams), and so do two prompts' first tokens
    assert _row(together, 0) != _row(together, 1)
    # the same prompt in another position of the batch, with the same seed: the same tokens
    swapped = _generate(model, processor, inputs, special, [2, 0], [seeds[4], seeds[0]])
    assert _row(swapped, 0) == _row(together, 4) and _row(swapped, 1) == _row(together, 0)
    # and the text is decoded from the valid tokens only
    assert together.texts[0] == processor.tokenizer.decode(_row(together, 0), skip_special_tokens=True)


def test_temperature_zero_is_greedy(tiny_model, prompts):
    model, processor = tiny_model
    inputs, special = prompts
    a = _generate(model, processor, inputs, special, [0, 1], [1, 2], temperature=0.0)
    b = _generate(model, processor, inputs, special, [0, 1], [3, 4], temperature=0.0)
    assert torch.equal(a.ids, b.ids)
    # greedy = arg-max of the model's next-token logits (vision ids suppressed) at every step
    sub = select_prompts(inputs, [0])
    ids, att, mm = sub["input_ids"], sub["attention_mask"], sub["mm_token_type_ids"]
    visual = {k: v for k, v in sub.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    with torch.no_grad():
        for t in range(4):
            logits = model(input_ids=ids, attention_mask=att, mm_token_type_ids=mm, **visual).logits[0, -1]
            logits[list(special.vision_ids)] = -math.inf
            nxt = int(logits.argmax())
            assert nxt == int(a.ids[0, t])
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
            att = torch.cat([att, torch.ones(1, 1, dtype=att.dtype)], 1)
            mm = torch.cat([mm, torch.zeros(1, 1, dtype=mm.dtype)], 1)


def test_sampler_draws_from_the_tempered_distribution():
    # rows with the same seed get the same noise; the empirical frequencies follow softmax(logits / T)
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    n = 4000
    sampler = GumbelSampler(list(range(n)), temperature=0.5, top_p=1.0)
    picks = sampler(None, logits.expand(n, -1).clone()).argmax(-1)
    freq = torch.bincount(picks, minlength=4).float() / n
    expected = torch.softmax(logits / 0.5, -1)
    assert torch.allclose(freq, expected, atol=0.03), (freq, expected)
    again = GumbelSampler(list(range(n)), temperature=0.5, top_p=1.0)(None, logits.expand(n, -1).clone()).argmax(-1)
    assert torch.equal(picks, again)


def test_top_p_keeps_the_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    kept = torch.isfinite(top_p_filter(logits, 0.7))
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 < 0.7, 0.8 >= 0.7: two tokens
    assert torch.isfinite(top_p_filter(logits, 0.8)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(top_p_filter(logits, 0.81)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(top_p_filter(logits, 0.1)).tolist() == [[True, False, False, False]]  # never empty
    assert torch.equal(top_p_filter(logits, 1.0), logits)
    # a permuted vocabulary keeps the same tokens
    perm = torch.tensor([2, 0, 3, 1])
    assert torch.equal(torch.isfinite(top_p_filter(logits[:, perm], 0.7)), kept[:, perm])
    # sampling never leaves the nucleus
    n = 2000
    out = GumbelSampler(list(range(n)), temperature=1.0, top_p=0.7)(None, logits.expand(n, -1).clone()).argmax(-1)
    assert set(out.tolist()) == {0, 1}


def test_vision_ids_are_never_sampled(tiny_model, prompts):
    model, processor = tiny_model
    inputs, special = prompts
    # make the vision ids the most likely tokens: the sampler must still never produce them
    n = 64
    logits = torch.zeros(n, 600)
    logits[:, list(special.vision_ids)] = 50.0
    out = GumbelSampler(list(range(n)), temperature=1.0, top_p=0.95, suppress_ids=list(special.vision_ids))(None, logits)
    assert not set(out.argmax(-1).tolist()) & set(special.vision_ids)
    assert (logits[:, list(special.vision_ids)] == 50.0).all()  # the caller's scores are not modified
    comps = _generate(model, processor, inputs, special, [0, 1, 2] * 3, list(range(9)), max_new_tokens=16, temperature=2.0,
                      top_p=1.0)
    assert not set(comps.ids[comps.valid].tolist()) & set(special.vision_ids)


def test_sampler_checks_its_arguments():
    with pytest.raises(ValueError):
        GumbelSampler([0], temperature=-1)
    with pytest.raises(ValueError):
        GumbelSampler([0], top_p=0)
    with pytest.raises(RuntimeError):
        GumbelSampler([0, 1])(None, torch.zeros(3, 5))
    assert row_seed(1, "a", 2) == row_seed(1, "a", 2) != row_seed(1, "a", 3)


def test_checkpoint_generation_settings_do_not_bias_rollouts(tiny_model, prompts):
    """generate() would apply a checkpoint's repetition penalty and bans even when decoding greedily:
    the rollouts must come from the policy's own distribution (the one the loss scores)."""
    model, processor = tiny_model
    inputs, special = prompts
    plain = _generate(model, processor, inputs, special, [0, 1], [5, 6])
    saved = model.generation_config
    try:
        cfg = saved.__class__.from_dict(saved.to_dict())
        cfg.repetition_penalty = 100.0
        cfg.no_repeat_ngram_size = 1
        cfg.min_new_tokens = 16
        cfg.bad_words_ids = [[int(t)] for t in plain.ids[0, :3]]
        model.generation_config = cfg
        biased = _generate(model, processor, inputs, special, [0, 1], [5, 6])
    finally:
        model.generation_config = saved
    assert model.generation_config is saved
    assert torch.equal(plain.ids, biased.ids)


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_shared_prefill_samples_what_repeated_prompts_sample(tiny_model, prompts, temperature):
    """The rollout's prompts run once and their caches are repeated per completion (group_size, shared_prefill):
    the same tokens as prefilling G copies of each prompt, on video and image prompts of different lengths."""
    from video_ktr.model.rollout import _shared_prefill

    model, processor = tiny_model
    inputs, special = prompts
    G = 3
    seeds = [row_seed(1, "rollout", 0, p, g) for p in range(3) for g in range(G)]
    args = dict(seeds=seeds, max_new_tokens=16, temperature=temperature, top_p=0.95, eos_ids=special.eos_ids,
                pad_id=special.pad_id, suppress_ids=special.vision_ids, group_size=G)
    assert _shared_prefill(model, inputs, G) is not None  # the shared path is taken here
    shared = generate(model, processor.tokenizer, inputs, shared_prefill=True, **args)
    repeated = generate(model, processor.tokenizer, inputs, shared_prefill=False, **args)
    assert torch.equal(shared.ids, repeated.ids) and torch.equal(shared.valid, repeated.valid)
    assert shared.texts == repeated.texts
    if temperature:
        assert _row(shared, 0) != _row(shared, 1)  # each row still has its own stream
    # the one-row-per-prompt call is the same as before: group_size 1 repeats nothing
    single = generate(model, processor.tokenizer, select_prompts(inputs, [p for p in range(3) for _ in range(G)]),
                      **{**args, "group_size": 1})
    assert torch.equal(single.ids, repeated.ids)


def test_shared_prefill_steps_aside_where_it_cannot_apply(tiny_model, prompts):
    """A prompt ending in a vision token (the cut would split its item) or right-padded: every row is prefilled."""
    from video_ktr.model.rollout import _shared_prefill

    model, _ = tiny_model
    inputs, _ = prompts
    ends_in_vision = dict(inputs, mm_token_type_ids=inputs["mm_token_type_ids"].clone())
    ends_in_vision["mm_token_type_ids"][0, -1] = 2
    assert _shared_prefill(model, ends_in_vision, 2) is None
    right_padded = dict(inputs, attention_mask=inputs["attention_mask"].clone())
    right_padded["attention_mask"][1, -1] = 0
    assert _shared_prefill(model, right_padded, 2) is None


@pytest.mark.parametrize("vocab", [50, 640, 151_936])
def test_sampler_noise_blocks_are_the_per_step_stream(vocab):
    """Drawing a block of steps per row gives the noise of one draw per row per step (on CPU), so the same tokens."""
    from video_ktr.model.sampling import noise_block_steps

    seeds = [row_seed(3, "rollout", 0, p, 0) for p in range(3)]
    steps = noise_block_steps(vocab) * 2 + 3  # past two block boundaries
    g = torch.Generator().manual_seed(0)
    scores = [torch.randn(3, vocab, generator=g) for _ in range(steps)]
    blocked = GumbelSampler(seeds, temperature=0.7)
    streams = [torch.Generator().manual_seed(s) for s in seeds]
    for logits in scores:
        noise = torch.stack([torch.rand(vocab, generator=s) for s in streams]).clamp(1e-10, 1.0 - 1e-7)
        expected = logits / 0.7 - torch.log(-torch.log(noise))
        assert torch.equal(blocked(None, logits), expected)
    assert noise_block_steps(640) > 1 and noise_block_steps(151_936) == 1
