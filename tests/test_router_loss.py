"""The MoE router's load-balancing loss in GRPO (model/adapters/router_loss.py), on the tiny Qwen3-VL-MoE with
``output_router_logits`` switched on in its config (the released checkpoints leave it off):

- the policy pass's loss, its rows run in chunks and width buckets, equals transformers' own ``aux_loss`` of
  one forward of the rows, and its gradient reaches every layer's router;
- generation and the shared-prompt passes run with the flag on (transformers' forward fails in a call with a
  cache: its attention mask covers the cached positions);
- a GRPO step's loss is the policy loss + router_aux_loss_coef x the logged ``router_aux_loss``;
- dense families and MoE checkpoints with the flag off get no router loss (their losses as before).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from video_ktr.model.adapters import adapter_for, router_loss_for

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
             vision_depth=1, vision_hidden_size=32, vision_intermediate_size=64, vision_num_heads=2)


def _with_router_logits(model_dir: Path, coef: float) -> Path:
    path = model_dir / "config.json"
    cfg = json.loads(path.read_text())
    cfg["text_config"].update(output_router_logits=True, router_aux_loss_coef=coef)
    path.write_text(json.dumps(cfg, indent=2))
    return model_dir


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    from video_ktr.data import synth
    from video_ktr.model.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("router-loss")
    plain = build_tiny_model(root / "plain", arch="qwen3_vl_moe", seed=0, **SMALL)
    on = _with_router_logits(Path(shutil.copytree(plain, root / "on")), 0.5)
    synth.generate(root / "data", num_train=8, num_test=2, seed=0, image_fraction=0.25, cell=32, size=64)
    return {"plain": Path(plain), "on": on, "data": root / "data"}


def _rows(moe, G=2, Lc=6):
    """Three prompts (video and image rows), G random completions each, one shorter than the others."""
    from video_ktr.data.media import FrameSettings, load_image
    from video_ktr.data.rows import load_dataset
    from video_ktr.data.video import load_video
    from video_ktr.model.inputs import Media, encode_prompts, select_prompts, sequence_inputs
    from video_ktr.model.loading import load_processor

    processor = load_processor(str(moe["on"]))
    settings = FrameSettings(nframes=4, max_frames=4, min_pixels=32 * 32, max_pixels=4 * 32 * 32, factor=32,
                             image_min_pixels=32 * 32, image_max_pixels=4 * 32 * 32)
    samples = load_dataset(moe["data"] / "train.json")
    picked = [next(s for s in samples if s.data_type == "video"), next(s for s in samples if s.data_type == "image"),
              [s for s in samples if s.data_type == "video"][1]]
    media = [Media(video=load_video(s.media_path, settings)) if s.data_type == "video"
             else Media(image=load_image(s.media_path, settings)) for s in picked]
    prompts = encode_prompts(processor, [s.messages() for s in picked], media)
    ids = torch.randint(0, 400, (3 * G, Lc), generator=torch.Generator().manual_seed(0))
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[1, Lc - 3:] = False
    return prompts, sequence_inputs(select_prompts(prompts, [0, 1, 2], G), ids, valid), ids


def test_chunked_policy_pass_gives_transformers_aux_loss_and_its_gradient_reaches_the_routers(moe):
    from video_ktr.model.inputs import select_prompts
    from video_ktr.model.loading import load_model
    from video_ktr.model.prefix import shared_prefix_logprobs
    from video_ktr.model.scoring import sequence_logprobs

    prompts, seq, ids = _rows(moe)
    reference = load_model(str(moe["on"]), dtype="float32")  # no hook: transformers computes aux_loss itself
    with torch.no_grad():
        want = reference(**seq, use_cache=False).aux_loss
    assert want is not None and float(want) > 0

    model = load_model(str(moe["on"]), dtype="float32")
    router = router_loss_for(model)
    assert router is not None and router.coef == 0.5 and (router.num_experts, router.top_k) == (4, 2)
    with router.recording():  # rows in chunks of 2 and width buckets, as the policy pass may run them
        logp, _ = sequence_logprobs(model, seq, ids, chunk_rows=2, bucket_overhead=1)
    got = router.loss()
    assert logp.requires_grad and got.requires_grad
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert router.loss() is None  # taken once per pass
    got.backward()
    for layer in model.model.language_model.layers:
        assert layer.mlp.gate.weight.grad is not None and float(layer.mlp.gate.weight.grad.abs().sum()) > 0

    # outside a recording nothing is kept, and the passes with a cache run with the flag on
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        shared, _ = shared_prefix_logprobs(model, seq, ids, 2)
        full, _ = sequence_logprobs(model, seq, ids)
        first = select_prompts(prompts, [0])  # the video row
        gen = model.generate(**first, max_new_tokens=3, do_sample=False)
    valid = seq["attention_mask"][:, -ids.shape[1]:].bool()
    torch.testing.assert_close(shared[valid], full[valid], atol=1e-5, rtol=1e-5)
    assert gen.shape[1] == first["input_ids"].shape[1] + 3 and router.loss() is None
    router.remove()


def test_dense_families_and_moe_with_router_logits_off_get_no_router_loss(moe, tiny_model):
    from video_ktr.model.loading import load_model

    model, _ = tiny_model  # the session's family (Qwen2.5-VL by default)
    if adapter_for(model).name != "qwen3_vl_moe":
        assert router_loss_for(model) is None
    for name in ("qwen2_5_vl", "qwen2_vl", "qwen3_vl"):
        assert adapter_for(name).router_loss(model) is None
    assert router_loss_for(load_model(str(moe["plain"]))) is None  # as released: output_router_logits off


def _step(moe, model_dir: Path, out: Path) -> dict:
    from video_ktr.training.grpo import KTRTrainer
    from video_ktr.training.grpo_config import TrainConfig
    from video_ktr.utils.config import parse_args

    args = ["--model_name_or_path", str(model_dir), "--dataset", str(moe["data"] / "train.json"), "--output_dir", str(out),
            "--max_frames", "4", "--video_fps", "4", "--min_pixels", str(32 * 32), "--max_pixels", str(4 * 32 * 32),
            "--image_min_pixels", str(32 * 32), "--image_max_pixels", str(4 * 32 * 32), "--num_generations", "2",
            "--per_device_train_batch_size", "2", "--max_completion_length", "8", "--logging_steps", "0",
            "--token_selection", "entropy,visual", "--reward_funcs", "accuracy,format,tests.reward_fixtures:count_e",
            "--beta", "0.04", "--max_steps", "1"]
    trainer = KTRTrainer(parse_args(TrainConfig, args))
    try:
        assert not trainer.plan.policy_shared_prefix  # each row's prompt counts in the loss, as in TRL's forward
        return trainer.train_step()
    finally:
        trainer.close()


def test_a_grpo_step_adds_coef_times_the_router_loss(moe, tmp_path):
    """Two runs of one step from the same checkpoint, router_aux_loss_coef 0.5 and 0: the same rollouts and
    policy loss; the losses differ by 0.5 x the logged router_aux_loss. The reference (beta 0.04) runs its
    shared-prompt passes with the flag on."""
    zero = _with_router_logits(Path(shutil.copytree(moe["on"], tmp_path / "zero")), 0.0)
    half, none = _step(moe, moe["on"], tmp_path / "half"), _step(moe, zero, tmp_path / "none")
    assert half["reward"] == none["reward"] and half["kl"] == pytest.approx(none["kl"], abs=1e-7)
    aux = half["router_aux_loss"]
    assert aux > 0 and aux == pytest.approx(none["router_aux_loss"], rel=1e-6)
    assert half["loss"] - none["loss"] == pytest.approx(0.5 * aux, rel=1e-4, abs=1e-7)


def test_sft_adds_the_router_loss_and_generates_with_router_logits_on(moe, tmp_path):
    """SFT: the router loss joins the token cross-entropy (logged as router_aux_loss; loss stays the token mean
    cross-entropy) and moves the routers differently from coef 0; eval generation runs with the flag on."""
    from safetensors.torch import load_file

    from video_ktr.training.sft import SFTConfig, SFTTrainer
    from video_ktr.utils.config import parse_args

    zero = _with_router_logits(Path(shutil.copytree(moe["on"], tmp_path / "zero")), 0.0)
    runs = {}
    for name, model_dir in (("half", moe["on"]), ("none", zero)):
        out = tmp_path / name
        cfg = parse_args(SFTConfig, [
            "--model_name_or_path", str(model_dir), "--dataset", str(moe["data"] / "train.json"), "--output_dir", str(out),
            "--max_frames", "4", "--min_pixels", str(32 * 32), "--max_pixels", str(4 * 32 * 32), "--max_steps", "1",
            "--per_device_train_batch_size", "2", "--learning_rate", "1e-2", "--logging_steps", "0",
            "--eval_dataset", str(moe["data"] / "test.json"), "--eval_steps", "1", "--eval_generate", "true",
            "--eval_max_new_tokens", "4"])
        SFTTrainer(cfg).train()
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        runs[name] = (next(m for m in metrics if "router_aux_loss" in m), load_file(str(out / "model.safetensors")))
    (half, w_half), (none, w_none) = runs["half"], runs["none"]
    assert half["router_aux_loss"] > 0 and half["router_aux_loss"] == pytest.approx(none["router_aux_loss"], rel=1e-6)
    assert half["loss"] == pytest.approx(none["loss"], rel=1e-6)  # the same cross-entropy before the update
    gates = [k for k in w_half if k.endswith("mlp.gate.weight")]
    assert gates and all(not torch.equal(w_half[k], w_none[k]) for k in gates)
