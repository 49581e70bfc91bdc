"""Shared-prefix scoring equals the plain full-sequence forward (so speed never changes results)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.family import SIDE, TEST_ARCH, F, px
from video_ktr.data import synth
from video_ktr.data.media import FrameSettings, load_image
from video_ktr.data.rows import load_dataset
from video_ktr.data.video import load_video
from video_ktr.model import tiny
from video_ktr.model.inputs import Media, encode_prompts, select_prompts, sequence_inputs
from video_ktr.model.loading import load_model, load_processor
from video_ktr.model.prefix import full_positions, group_positions, shared_prefix_logprobs
from video_ktr.model.probes import visual_masked_inputs
from video_ktr.model.rollout import encode_visual_once
from video_ktr.model.scoring import sequence_logprobs, width_buckets

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = FrameSettings(nframes=8, min_frames=2, max_frames=8, min_pixels=px(4), max_pixels=px(4),
                         image_min_pixels=px(4), image_max_pixels=px(4), factor=F)  # tests/family.py


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix")
    tiny.build_tiny_model(root / "model", seed=0, arch=TEST_ARCH)
    synth.generate(root / "data", num_train=12, num_test=2, seed=0, image_fraction=0.3, cell=F, size=SIDE)
    model = load_model(str(root / "model")).eval()
    processor = load_processor(str(root / "model"))
    samples = load_dataset(root / "data" / "train.json")
    return model, processor, samples


def _batch(processor, samples, G, Lc, seed=0):
    media = [Media(video=load_video(s.media_path, SETTINGS)) if s.data_type == "video" else Media(image=load_image(s.media_path, SETTINGS))
             for s in samples]
    prompts = encode_prompts(processor, [s.messages() for s in samples], media)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 400, (len(samples) * G, Lc), generator=g)
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[1, Lc - 3:] = False  # a shorter completion
    return prompts, ids, valid


def test_shared_prefix_equals_full_forward_on_mixed_video_and_image_rows(setup):
    model, processor, samples = setup
    kinds = {s.data_type for s in samples[:4]}
    picked = samples[:4] if kinds == {"video", "image"} else [next(s for s in samples if s.data_type == "video"),
                                                              next(s for s in samples if s.data_type == "image")]
    G, Lc = 3, 7
    prompts, ids, valid = _batch(processor, picked, G, Lc)
    seq = sequence_inputs(select_prompts(prompts, list(range(len(picked))), G), ids, valid)
    with torch.no_grad():
        full, full_h = sequence_logprobs(model, seq, ids, with_entropy=True)
    fast, fast_h = shared_prefix_logprobs(model, seq, ids, G, with_entropy=True)
    assert torch.allclose(full[valid], fast[valid], atol=1e-5), (full - fast).abs().max()
    assert torch.allclose(full_h[valid], fast_h[valid], atol=1e-4)


def test_shared_prefix_equals_full_forward_for_the_visual_mask_probe(setup):
    model, processor, samples = setup
    picked = samples[:3]
    G, Lc = 2, 5
    prompts, ids, valid = _batch(processor, picked, G, Lc, seed=1)
    seq = visual_masked_inputs(sequence_inputs(select_prompts(prompts, list(range(3)), G), ids, valid))
    with torch.no_grad():
        full, _ = sequence_logprobs(model, seq, ids)
    fast, _ = shared_prefix_logprobs(model, seq, ids, G, prompts_per_chunk=2)
    assert torch.allclose(full[valid], fast[valid], atol=1e-5)


def test_shared_prefix_accepts_visual_features_computed_once(setup):
    model, processor, samples = setup
    picked = [s for s in samples if s.data_type == "video"][:2]
    G, Lc = 2, 4
    prompts, ids, valid = _batch(processor, picked, G, Lc, seed=2)
    plain = sequence_inputs(select_prompts(prompts, [0, 1], G), ids, valid)
    once = sequence_inputs(encode_visual_once(model, prompts, [0, 1], G), ids, valid)
    with torch.no_grad():
        full, _ = sequence_logprobs(model, plain, ids)
    fast, _ = shared_prefix_logprobs(model, once, ids, G)
    assert torch.allclose(full[valid], fast[valid], atol=1e-5)
    assert json.dumps(fast.shape[0]) == str(len(picked) * G)


def test_shared_prefix_keeps_its_cache_under_gradient_checkpointing_without_grad(setup):
    """The probes run the policy in training mode without grad: with gradient checkpointing on, the prompt's
    cache is kept (one prefix call per chunk, not the full sequences) and the numbers are the full forward's."""
    model, processor, samples = setup
    picked = samples[:2]
    G, Lc = 2, 4
    prompts, ids, valid = _batch(processor, picked, G, Lc, seed=3)
    seq = sequence_inputs(select_prompts(prompts, [0, 1], G), ids, valid)
    lengths = []
    handle = model.register_forward_pre_hook(lambda m, a, kw: lengths.append(kw["input_ids"].shape[1]), with_kwargs=True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    try:
        with torch.no_grad():
            fast, _ = shared_prefix_logprobs(model, seq, ids, G)
    finally:
        handle.remove()
        model.gradient_checkpointing_disable()
        model.eval()
    assert lengths[0] == seq["input_ids"].shape[1] - Lc and max(lengths[1:]) <= Lc  # a prefix, then the completions
    with torch.no_grad():
        full, _ = sequence_logprobs(model, seq, ids)
    assert torch.allclose(full[valid], fast[valid], atol=1e-5)


@pytest.mark.parametrize("reentrant", [False, True])
def test_shared_prefix_with_gradient_checkpointing_gives_the_full_forwards_gradients(setup, reentrant):
    """The policy pass of the 7B recipe (gradient checkpointing on): the shared-prompt pass keeps its cache,
    checkpoints each decoder layer (the layers run again in the backward) and gives the gradients of the full
    forward without checkpointing (to 1e-5 of each tensor's scale), and exactly the numbers and gradients of the
    shared pass without checkpointing."""
    model, processor, samples = setup
    G, Lc = 3, 6
    prompts, ids, valid = _mixed_batch(processor, samples, G, Lc, seed=11)
    valid[2 * G, 2] = True
    weights = torch.randn(ids.shape, generator=torch.Generator().manual_seed(11)) * valid
    attention_calls = []
    attn = [m for n, m in model.named_modules() if n.endswith("language_model.layers.0.self_attn")][0]
    handle = attn.register_forward_pre_hook(lambda *a: attention_calls.append(1))

    def grads(shared: bool, checkpointing: bool):
        model.zero_grad(set_to_none=True)
        attention_calls.clear()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.train()
        try:
            inputs = sequence_inputs(encode_visual_once(model, prompts, [0, 1, 2], G, grad=True), ids, valid)
            if shared:
                logp, _ = shared_prefix_logprobs(model, inputs, ids, G, grad=True, bucket_overhead=0)
            else:
                logp, _ = sequence_logprobs(model, inputs, ids)
            forward_calls = len(attention_calls)
            (logp * weights).sum().backward()
        finally:
            model.gradient_checkpointing_disable()
            model.eval()
        assert not any("forward" in vars(m) for m in model.modules())  # the layers are as they were
        return logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, \
            (forward_calls, len(attention_calls))

    try:
        full, full_grads, _ = grads(shared=False, checkpointing=False)
        plain, plain_grads, (plain_fwd, plain_all) = grads(shared=True, checkpointing=False)
        fast, fast_grads, (fast_fwd, fast_all) = grads(shared=True, checkpointing=True)
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
    assert fast_fwd == plain_fwd > 1 and plain_all == plain_fwd  # the same calls: a prefix, then the buckets
    assert fast_all == 2 * fast_fwd  # each layer call ran again in the backward: it was checkpointed
    assert torch.equal(fast, plain)
    assert torch.allclose(full[valid], fast[valid], atol=1e-5)
    assert full_grads.keys() == fast_grads.keys() == plain_grads.keys() and any("visual" in n for n in full_grads)
    for name, g in full_grads.items():
        # the full forward sums in another order: equal to 1e-5 of each tensor's largest entry + 1e-7
        assert (g - fast_grads[name]).abs().max() <= 1e-5 * g.abs().max() + 1e-7, name
        assert torch.equal(plain_grads[name], fast_grads[name]), name  # checkpointing recomputes the same numbers


def _mixed_batch(processor, samples, G, Lc, seed):
    """A video, an image and a video prompt with ragged completions: a row with no
    valid token, a whole prompt group with none, a row with a gap, and no row using the last column."""
    picked = [s for s in samples if s.data_type == "video"][:1] + [s for s in samples if s.data_type == "image"][:1] \
        + [s for s in samples if s.data_type == "video"][1:2]
    assert [s.data_type for s in picked] == ["video", "image", "video"]
    prompts, ids, valid = _batch(processor, picked, G, Lc, seed=seed)
    valid[:, Lc - 1] = False  # no row reaches the last column
    valid[1] = False  # an empty completion in the first group
    valid[G:2 * G] = False  # the image prompt's completions are all empty
    valid[2 * G, 2] = False  # an unattended token between attended ones
    valid[2 * G + 1, 3:] = False
    return prompts, ids, valid


def test_group_positions_equal_full_positions_at_attended_tokens(setup):
    model, processor, samples = setup
    G, Lc = 3, 6
    prompts, ids, valid = _mixed_batch(processor, samples, G, Lc, seed=4)
    seq = sequence_inputs(select_prompts(prompts, [0, 1, 2], G), ids, valid)
    full = full_positions(model, seq)
    Lp = seq["input_ids"].shape[1] - Lc
    prefix, completion = group_positions(model, seq, Lc, G)
    assert prefix.shape == (3, 3, Lp) and completion.shape == (3, 3 * G, Lc)
    attended = seq["attention_mask"].bool()
    first_rows = attended[::G, :Lp]
    assert torch.equal(prefix[:, first_rows], full[:, ::G, :Lp][:, first_rows])
    assert torch.equal(completion, full[:, :, Lp:])  # unattended tokens too: a next token is predicted from them
    # the video rows really have 3-D positions (else this test would check text positions only)
    assert (full[0, 0] != full[1, 0]).any()


@pytest.mark.parametrize("prompts_per_chunk,bucket_overhead", [(None, 10**6), (None, 0), (1, 0), (2, 10**6)])
def test_shared_prefix_scores_ragged_completions_like_the_full_forward(setup, prompts_per_chunk, bucket_overhead):
    model, processor, samples = setup
    G, Lc = 3, 6
    prompts, ids, valid = _mixed_batch(processor, samples, G, Lc, seed=5)
    seq = sequence_inputs(select_prompts(prompts, [0, 1, 2], G), ids, valid)
    with torch.no_grad():
        full, full_h = sequence_logprobs(model, seq, ids, with_entropy=True)
    # bucket_overhead 0: every distinct width runs as its own bucket; 10**6: one bucket per chunk
    fast, fast_h = shared_prefix_logprobs(model, seq, ids, G, with_entropy=True, prompts_per_chunk=prompts_per_chunk,
                                          bucket_overhead=bucket_overhead)
    assert torch.allclose(full[valid], fast[valid], atol=1e-5), (full - fast)[valid].abs().max()
    assert torch.allclose(full_h[valid], fast_h[valid], atol=1e-4)
    # nothing is computed after a row's last valid token, nor for a row without one
    last = torch.arange(Lc)[None] > torch.where(valid.any(1), Lc - 1 - valid.flip(1).int().argmax(1), -1)[:, None]
    assert (fast[last] == 0).all() and (fast_h[last] == 0).all()
    assert (fast[G:2 * G] == 0).all() and (fast[1] == 0).all()


def test_shared_prefix_with_no_valid_token_runs_nothing(setup):
    model, processor, samples = setup
    prompts, ids, valid = _batch(processor, samples[:2], 2, 4, seed=6)
    seq = sequence_inputs(select_prompts(prompts, [0, 1], 2), ids, torch.zeros_like(valid))

    class NoForward(torch.nn.Module):
        def forward(self, **kwargs):
            raise AssertionError("no forward pass expected")

    logp, ent = shared_prefix_logprobs(NoForward(), seq, ids, 2, with_entropy=True)
    assert logp.shape == ids.shape and (logp == 0).all() and (ent == 0).all()


def test_width_buckets_split_where_padding_costs_more_than_a_call():
    # alike widths: one run whatever the overhead
    assert width_buckets([5, 5, 5, 5], overhead=0) == [(0, 4)]
    # two short rows and two long ones: apart when a call costs less than the padding it saves
    assert width_buckets([2, 2, 90, 96], overhead=10) == [(0, 2), (2, 4)]
    assert width_buckets([2, 2, 90, 96], overhead=1000) == [(0, 4)]
    # zero overhead: every distinct width on its own (runs of equal widths stay together)
    assert width_buckets([1, 3, 3, 7], overhead=0) == [(0, 1), (1, 3), (3, 4)]
    assert width_buckets([], overhead=5) == []
    # the split is the cheapest one: check against every split of a small case
    import itertools

    widths, overhead = [1, 4, 5, 9, 20, 21, 40], 12

    def cost(runs):
        return sum((b - a) * widths[b - 1] + overhead for a, b in runs)

    best = min(cost(list(zip((0,) + cuts, cuts + (len(widths),))))
               for k in range(len(widths)) for cuts in itertools.combinations(range(1, len(widths)), k))
    assert cost(width_buckets(widths, overhead)) == best
    with pytest.raises(ValueError, match="sorted"):
        width_buckets([3, 1])


@pytest.mark.parametrize("chunk_rows", [None, 2])
def test_length_buckets_give_the_policy_pass_the_same_logprobs_and_gradients(setup, chunk_rows):
    """The policy pass (with grad) in width buckets: the same log-probs, entropies and parameter gradients."""
    model, processor, samples = setup
    G, Lc = 3, 6
    prompts, ids, valid = _mixed_batch(processor, samples, G, Lc, seed=7)
    seq = sequence_inputs(select_prompts(prompts, [0, 1, 2], G), ids, valid)
    results = []
    for overhead in (None, 0):
        model.zero_grad()
        logp, ent = sequence_logprobs(model, seq, ids, with_entropy=True, chunk_rows=chunk_rows, bucket_overhead=overhead)
        (logp * valid).sum().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        results.append((logp.detach(), ent, grads))
    (plain, plain_h, plain_g), (bucketed, bucketed_h, bucketed_g) = results
    assert torch.allclose(plain[valid], bucketed[valid], atol=1e-5)
    assert torch.allclose(plain_h[valid], bucketed_h[valid], atol=1e-4)
    assert len(plain_g) == len(bucketed_g) > 0
    for a, b in zip(plain_g, bucketed_g):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    model.zero_grad()


@pytest.mark.parametrize("prompts_per_chunk", [None, 2])
def test_shared_prefix_with_grad_gives_the_full_forwards_gradients(setup, prompts_per_chunk):
    """The policy pass's form: log-probs with grad, visual features computed once per prompt with grad,
    ragged completions on video and image prompts: the parameter gradients equal the full forward's."""
    model, processor, samples = setup
    G, Lc = 3, 6
    prompts, ids, valid = _mixed_batch(processor, samples, G, Lc, seed=9)
    valid[2 * G, 2] = True  # sampled completions have no gaps
    weights = torch.randn(ids.shape, generator=torch.Generator().manual_seed(9)) * valid

    def grads(shared: bool):
        model.zero_grad(set_to_none=True)
        inputs = sequence_inputs(encode_visual_once(model, prompts, [0, 1, 2], G, grad=True), ids, valid)
        if shared:
            logp, ent = shared_prefix_logprobs(model, inputs, ids, G, with_entropy=True, grad=True,
                                               prompts_per_chunk=prompts_per_chunk)
        else:
            logp, ent = sequence_logprobs(model, inputs, ids, with_entropy=True)
        assert logp.requires_grad and not ent.requires_grad
        (logp * weights).sum().backward()
        return logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    full, full_grads = grads(False)
    fast, fast_grads = grads(True)
    model.zero_grad(set_to_none=True)
    assert torch.allclose(full[valid], fast[valid], atol=1e-5)
    assert full_grads.keys() == fast_grads.keys() and any("visual" in n for n in full_grads)
    for name, g in full_grads.items():
        # float32 noise grows with the gradient's scale (a tied embedding also holds the head's gradient: Qwen3-VL)
        assert torch.allclose(g, fast_grads[name], atol=1e-6 * max(1.0, float(g.abs().max())), rtol=1e-4), name
    # and without grad asked for, nothing is recorded
    inputs = sequence_inputs(select_prompts(prompts, [0, 1, 2], G), ids, valid)
    assert not shared_prefix_logprobs(model, inputs, ids, G)[0].requires_grad


def test_grouped_heads_under_a_mask_give_the_same_numbers_and_gradients(setup):
    """loading.use_grouped_kv_sdpa (the trainers' and the hf engine's setting on CPU): the kernel takes the grouped
    key/value heads instead of copies, with padding masks and a shared prompt's cache: the same log-probs,
    entropies and gradients as transformers' sdpa."""
    import copy

    from video_ktr.model.loading import GROUPED_KV_SDPA, use_grouped_kv_sdpa

    plain, processor, samples = setup
    grouped = copy.deepcopy(plain)
    assert use_grouped_kv_sdpa(grouped) and grouped.config._attn_implementation == GROUPED_KV_SDPA
    assert plain.config._attn_implementation == "sdpa"
    assert plain.config.text_config.num_key_value_heads < plain.config.text_config.num_attention_heads
    G, Lc = 3, 6
    prompts, ids, valid = _mixed_batch(processor, samples, G, Lc, seed=11)
    valid[2 * G, 2] = True
    weights = torch.randn(ids.shape, generator=torch.Generator().manual_seed(11)) * valid
    results = {}
    for flag, model in (("0", plain), ("1", grouped)):
        model.zero_grad(set_to_none=True)
        inputs = sequence_inputs(encode_visual_once(model, prompts, [0, 1, 2], G, grad=True), ids, valid)
        logp, ent = shared_prefix_logprobs(model, inputs, ids, G, with_entropy=True, grad=True)
        (logp * weights).sum().backward()
        with torch.no_grad():
            full, _ = sequence_logprobs(model, sequence_inputs(select_prompts(prompts, [0, 1, 2], G), ids, valid), ids)
        results[flag] = (logp.detach(), ent, full, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    model.zero_grad(set_to_none=True)
    (a, a_h, a_full, a_g), (b, b_h, b_full, b_g) = results["0"], results["1"]
    assert torch.allclose(a[valid], b[valid], atol=1e-6) and torch.allclose(a_h[valid], b_h[valid], atol=1e-5)
    assert torch.allclose(a_full[valid], b_full[valid], atol=1e-6)
    assert a_g.keys() == b_g.keys()
    for name, g in a_g.items():
        assert torch.allclose(g, b_g[name], atol=1e-6, rtol=1e-4), name


def test_grouped_heads_are_a_setting_of_the_model_on_cpu_only_and_no_environment_variable():
    import os

    from video_ktr.model.loading import grouped_kv_attention, use_grouped_kv_sdpa

    assert grouped_kv_attention("cpu") and grouped_kv_attention(torch.device("cpu")) and not grouped_kv_attention("cuda:0")
    eager = torch.nn.Linear(2, 2)
    eager.config = type("Config", (), {"_attn_implementation": "eager"})()
    assert not use_grouped_kv_sdpa(eager) and eager.config._attn_implementation == "eager"  # other kernels left alone
    assert "TRANSFORMERS_SDPA_FORCE_GQA" not in os.environ


def test_the_gradient_checkpointing_recipe_runs_the_shared_prompt_policy_pass(tiny_setup, tmp_path):
    """The 7B recipe's gradient checkpointing keeps the shared-prompt policy pass, and a run with it takes the
    steps of the run without (the same numbers to float tolerance: checkpointing recomputes, it does not change)."""
    from video_ktr.training.grpo import KTRTrainer
    from video_ktr.training.grpo_config import TrainConfig
    from video_ktr.training.grpo_stages import ForwardPlan
    from video_ktr.utils.config import parse_args

    recipe = parse_args(TrainConfig, ["--config", str(ROOT / "configs" / "qwen2_5_vl_7b_ktr.yaml")])
    assert recipe.gradient_checkpointing and ForwardPlan.for_run(recipe).policy_shared_prefix
    metrics = {}
    for ckpt in ("false", "true"):
        cfg = parse_args(TrainConfig, tiny_setup.train_args(
            tmp_path / ckpt, "--max_steps", "2", "--learning_rate", "1e-3", "--lr_scheduler_type", "constant",
            "--token_selection", "entropy", "--reward_funcs", "accuracy,format", "--gradient_checkpointing", ckpt))
        trainer = KTRTrainer(cfg)
        assert trainer.plan.policy_shared_prefix
        # the policy pass's forward calls: a prompt with a cache, then completions on it (no full sequences)
        cached: list[bool] = []

        def record(module, args, kwargs, cached=cached):
            if torch.is_grad_enabled():
                cached.append(bool(kwargs.get("use_cache")))

        trainer.model.register_forward_pre_hook(record, with_kwargs=True)
        trainer.train()
        assert cached and all(cached)
        metrics[ckpt] = [json.loads(line) for line in (tmp_path / ckpt / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(metrics["false"], metrics["true"], strict=True):
        for key in ("loss", "grad_norm", "kl", "entropy_fraction", "reward"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)
