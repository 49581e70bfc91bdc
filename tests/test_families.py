"""Each model family (one adapter each) on its own tiny random checkpoint: prompts with video and image
rows at the family's frame factor, a forward pass, sampling, and the probe equalities the Qwen2.5-VL
tests pin (mask probe == deleting the placeholders, permuted pixels == the processor's, chunked probe
passes == one pass)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from video_ktr.model.adapters import FAMILIES, adapter_for
from video_ktr.model.inputs import Media, encode_prompts, select_prompts, sequence_inputs
from video_ktr.model.loading import special_tokens
from video_ktr.model.probes import (
    frame_permutation,
    permuted_media,
    reencode_visual,
    shuffled_prompts,
    visual_masked_inputs,
    visual_probe_logprobs,
)
from video_ktr.model.rollout import encode_visual_once, generate
from video_ktr.model.scoring import sequence_logprobs

ATOL = 1e-5


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tiny_setup, tmp_path_factory):
    from video_ktr.data.media import FrameSettings, load_image
    from video_ktr.data.video import load_video
    from video_ktr.model.loading import load_model, load_processor
    from video_ktr.model.tiny import build_tiny_model

    name = request.param
    adapter = adapter_for(name)
    d = build_tiny_model(tmp_path_factory.mktemp(name) / "model", arch=name, seed=0)
    model = load_model(str(d), dtype="float32", attn_implementation="sdpa").eval()
    processor = load_processor(str(d))
    f = adapter.frame_factor
    samples = tiny_setup.samples()
    picked = [next(s for s in samples if s.data_type == "video"), next(s for s in samples if s.data_type == "image"),
              [s for s in samples if s.data_type == "video"][1]]
    media = []
    for i, s in enumerate(picked):
        fs = FrameSettings(fps=4.0, max_frames=8 if i == 0 else 4, min_pixels=f * f, max_pixels=4 * f * f,
                           image_min_pixels=f * f, image_max_pixels=4 * f * f, factor=f)
        media.append(Media(video=load_video(s.media_path, fs)) if s.data_type == "video" else Media(image=load_image(s.media_path, fs)))
    prompts = encode_prompts(processor, [s.messages() for s in picked], media)
    return dict(name=name, dir=d, adapter=adapter, model=model, processor=processor, media=media, prompts=prompts,
                special=special_tokens(model.config, processor.tokenizer))


def _logp(model, inputs, ids):
    with torch.no_grad():
        return sequence_logprobs(model, inputs, ids)[0]


def test_frames_at_the_family_factor_reach_the_tower_unchanged(family):
    f, prompts, media = family["adapter"].frame_factor, family["prompts"], family["media"]
    merge = family["adapter"].merge_size
    video = media[0].video.frames
    assert video.shape[-1] % f == 0 and video.shape[-2] % f == 0
    t, h, w = prompts["video_grid_thw"][0].tolist()
    assert (h * family["adapter"].patch_size, w * family["adapter"].patch_size) == tuple(video.shape[-2:])
    assert t == video.shape[0] // family["adapter"].temporal_patch_size
    n_video = int((prompts["input_ids"][0] == family["model"].config.video_token_id).sum())
    assert n_video == t * h * w // (merge * merge)
    assert ("second_per_grid_ts" in prompts) == ("second_per_grid_ts" in family["adapter"].visual_keys)


def test_eval_with_its_own_engine_cuts_frames_at_the_engines_processor_factor(family, tiny_setup):
    """`eval --engine vllm` passes no processor to evaluate_rows: the factor comes from the engine's processor."""
    from video_ktr.data.media import FrameSettings
    from video_ktr.evaluation.evaluate import evaluate_rows

    class Recording:  # the HFEngine generate signature, with the processor an engine such as VLLMEngine holds
        processor, seen = family["processor"], []

        def generate(self, messages, media, seeds, **kw):
            self.seen.extend(media)
            return ["<answer>A</answer>"] * len(messages)

    f = family["adapter"].frame_factor
    rows = [s for s in tiny_setup.samples("test") if s.data_type == "video"][:2]
    raw = [{"problem_id": s.problem_id, "problem": s.problem, "data_type": s.data_type, "problem_type": s.problem_type,
            "options": s.options, "solution": s.solution, "path": str(s.media_path.relative_to(tiny_setup.data_dir))}
           for s in rows]
    engine = Recording()
    results, _ = evaluate_rows(None, None, raw, tiny_setup.data_dir, FrameSettings(max_frames=4, min_pixels=f * f,
                               max_pixels=4 * f * f), engine=engine, prefetch=False)
    assert len(engine.seen) == 2 and not any(r.get("failed") for r in results)
    for m in engine.seen:
        assert m.video.frames.shape[-1] % f == 0 and m.video.frames.shape[-2] % f == 0, m.video.frames.shape


def test_sampling_and_mask_probe(family):
    model, processor, prompts, special = family["model"], family["processor"], family["prompts"], family["special"]
    G = 2
    out = generate(model, processor.tokenizer, prompts, seeds=list(range(3 * G)), max_new_tokens=6, temperature=1.0,
                   top_p=1.0, eos_ids=special.eos_ids, pad_id=special.pad_id, suppress_ids=special.vision_ids,
                   group_size=G)
    ids, valid = out.ids, out.valid
    assert ids.shape[0] == 3 * G and not set(ids[valid].unique().tolist()) & set(special.vision_ids)
    seq = sequence_inputs(select_prompts(prompts, [0, 1, 2], G), ids, valid)
    full = _logp(model, seq, ids)
    masked = _logp(model, visual_masked_inputs(seq), ids)
    assert torch.isfinite(full[valid]).all() and (full - masked)[valid].abs().max() > 1e-4
    # the mask probe equals each row with its placeholder tokens deleted (checked row by row, no padding)
    T, Lc = seq["input_ids"].shape[1], ids.shape[1]
    for r in range(seq["input_ids"].shape[0]):
        keep = (seq["mm_token_type_ids"][r, : T - Lc] == 0) & (seq["attention_mask"][r, : T - Lc] == 1)
        row_ids = torch.cat([seq["input_ids"][r, : T - Lc][keep], ids[r]])[None]
        row = {"input_ids": row_ids, "attention_mask": torch.ones_like(row_ids), "mm_token_type_ids": torch.zeros_like(row_ids)}
        alone = _logp(model, row, ids[r : r + 1])[0]
        assert torch.allclose(masked[r][valid[r]], alone[valid[r]], atol=ATOL)
    # features encoded once per prompt and repeated (DeepStack features too) == the pixels repeated G times
    once = sequence_inputs(encode_visual_once(model, prompts, [0, 1, 2], G), ids, valid)
    assert "pixel_values_videos" not in once
    assert torch.allclose(_logp(model, once, ids)[valid], full[valid], atol=ATOL)
    # chunked probe passes equal one pass
    kw = dict(seq_inputs=seq, completion_ids=ids, completion_valid=valid, group_size=G, processor=processor,
              prompt_inputs=prompts, media=family["media"])
    for mode in ("mask", "zero_features", "blank"):
        whole = visual_probe_logprobs(model, mode, **kw)
        chunked = visual_probe_logprobs(model, mode, chunk_rows=3, **kw)
        assert torch.allclose(whole[valid], chunked[valid], atol=ATOL), (family["name"], mode)


def test_permuted_pixels_equal_the_processors(family):
    processor, prompts, media = family["processor"], family["prompts"], family["media"]
    odd = Media(video=replace(media[0].video, frames=media[0].video.frames[:7]))
    items = [media, [odd]]
    for inputs, ms in ((prompts, media), (None, [odd])):
        if inputs is None:
            inputs = encode_prompts(processor, [[{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "q"}]}]], ms)
        videos = [p for p, m in enumerate(ms) if m.kind == "video"]
        perms = {p: frame_permutation(ms[p].video.frames.shape[0], "shuffle", torch.Generator().manual_seed(p + 1)) for p in videos}
        rows, fast = shuffled_prompts(processor, inputs, ms, perms)
        assert rows == videos
        want = reencode_visual(processor, select_prompts(inputs, rows), [permuted_media(ms[p], perms[p]) for p in rows])
        assert torch.equal(fast["pixel_values_videos"], want["pixel_values_videos"]), family["name"]
        assert torch.equal(fast["video_grid_thw"], want["video_grid_thw"])
    assert items


def test_grpo_with_all_probes_sft_and_eval(family, tiny_setup, tmp_path):
    """Two GRPO steps selecting by all three probes, one SFT step, an eval and an infer on the family's tiny model
    (the media are cut at the family's frame factor by the trainers themselves: adapters.frames_for)."""
    import json

    from video_ktr.commands.eval import main as eval_main
    from video_ktr.training.grpo import KTRTrainer
    from video_ktr.training.grpo_config import TrainConfig
    from video_ktr.training.sft import SFTTrainer
    from video_ktr.training.sft_config import SFTConfig
    from video_ktr.utils.config import parse_args

    d, f = str(family["dir"]), family["adapter"].frame_factor
    media = ["--max_frames", "4", "--video_fps", "4", "--min_pixels", str(f * f), "--max_pixels", str(4 * f * f),
             "--image_min_pixels", str(f * f), "--image_max_pixels", str(4 * f * f)]
    cfg = parse_args(TrainConfig, ["--model_name_or_path", d, "--dataset", str(tiny_setup.train_json),
                                   "--output_dir", str(tmp_path / "grpo"), *media, "--num_generations", "2",
                                   "--per_device_train_batch_size", "2", "--max_completion_length", "8",
                                   "--logging_steps", "0", "--max_steps", "2", "--learning_rate", "1e-3",
                                   "--token_selection", "entropy,visual,temporal",
                                   "--reward_funcs", "accuracy,format,tests.reward_fixtures:count_e"])
    KTRTrainer(cfg).train()
    rows = [json.loads(x) for x in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["loss"] == r["loss"] for r in rows)
    assert all(0 <= r["visual_fraction"] <= 1 and 0 <= r["temporal_fraction"] <= 1 for r in rows)
    sft = SFTTrainer(SFTConfig(model_name_or_path=d, dataset=str(tiny_setup.train_json), output_dir=str(tmp_path / "sft"),
                               per_device_train_batch_size=2, max_steps=1, logging_steps=0, learning_rate=1e-3,
                               max_frames=4, min_pixels=f * f, max_pixels=4 * f * f, image_min_pixels=f * f,
                               image_max_pixels=4 * f * f))
    sft.train()
    assert (tmp_path / "sft" / "metrics.jsonl").exists()
    rc = eval_main(["--model_name_or_path", d, "--benchmark", "video_r1", "--data_file", str(tiny_setup.test_json),
                    "--output_dir", str(tmp_path / "eval"), "--max_new_tokens", "4", "--max_frames", "4",
                    "--max_pixels", str(4 * f * f), "--min_pixels", str(f * f), "--progress", "false"])
    assert rc == 0
    # infer on one real video, its frames cut at the family's factor (evaluation/inference asks frames_for)
    from tests.paths import REAL_VIDEO
    from video_ktr.evaluation import inference

    cfg = inference.parse_infer_args(["--model_name_or_path", d, "--video", str(REAL_VIDEO), "--question", "What moves?",
                                      "--max_new_tokens", "4", "--max_frames", "4", "--min_frames", "4",
                                      "--max_pixels", str(4 * f * f), "--min_pixels", str(f * f)])
    assert isinstance(inference.run(cfg)["output"], str)
