"""Shared-prefix scoring equals the plain full-sequence forward (so speed never changes results)."""

from __future__ import annotations

import json

import pytest
import torch

from video_ktr import synth, tiny
from video_ktr.data import load_dataset
from video_ktr.media import FrameSettings, load_image, load_video
from video_ktr.model_inputs import Media, encode_prompts, select_prompts, sequence_inputs
from video_ktr.modeling import load_model, load_processor
from video_ktr.prefix import shared_prefix_logprobs
from video_ktr.probes import visual_masked_inputs
from video_ktr.rollout import encode_visual_once
from video_ktr.scoring import sequence_logprobs

SETTINGS = FrameSettings(nframes=8, min_frames=2, max_frames=8, min_pixels=3136, max_pixels=3136,
                         image_min_pixels=3136, image_max_pixels=3136)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix")
    tiny.build_tiny_model(root / "model", seed=0)
    synth.generate(root / "data", num_train=12, num_test=2, seed=0, image_fraction=0.3)
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


def test_shared_prefix_falls_back_when_the_model_gives_no_cache(setup):
    model, processor, samples = setup
    picked = samples[:2]
    G, Lc = 2, 4
    prompts, ids, valid = _batch(processor, picked, G, Lc, seed=3)
    seq = sequence_inputs(select_prompts(prompts, [0, 1], G), ids, valid)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    try:
        fast, _ = shared_prefix_logprobs(model, seq, ids, G)
    finally:
        model.gradient_checkpointing_disable()
        model.eval()
    with torch.no_grad():
        full, _ = sequence_logprobs(model, seq, ids)
    assert torch.allclose(full[valid], fast[valid], atol=1e-5)
