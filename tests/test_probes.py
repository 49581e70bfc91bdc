"""The counterfactual probes on the tiny Qwen2.5-VL: what they compute equals what they claim to.

- visual ``mask`` probe == the sequence with its visual placeholder tokens deleted (the vision
  start/end markers stay), with left padding and rows of different prompt lengths;
- masking only SOME rows leaves the other rows exactly as without the probe (their grids stay paired
  with their rows);
- features encoded once per prompt and repeated == the pixels repeated G times;
- M-RoPE temporal positions differ across frames (the sampling metadata reaches the processor);
- frame permutations and the temporal probe's identity sanity check;
- the optimised probes (shared prefixes in chunks, pixel-free token inputs, permuted pixels instead of a
  second processor call) == the straightforward computation, on video and image rows with empty and
  short completions; the trainer's fallback paths give the same numbers.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tests.family import F
from video_ktr.model.inputs import Media, encode_prompts, processor_call, select_prompts, sequence_inputs
from video_ktr.model.loading import special_tokens
from video_ktr.model.prefix import strip_pixels
from video_ktr.model.probes import (
    frame_permutation,
    permuted_media,
    reencode_visual,
    shuffled_prompts,
    temporal_probe_logprobs,
    visual_masked_inputs,
    visual_probe_logprobs,
    zero_feature_inputs,
)
from video_ktr.model.rollout import encode_visual_once
from video_ktr.model.scoring import sequence_logprobs

ATOL = 1e-5


def _pick(samples, kinds):
    """The first samples of the requested data types, in that order (e.g. video, image, video)."""
    out, used = [], set()
    for kind in kinds:
        i = next(i for i, s in enumerate(samples) if s.data_type == kind and i not in used)
        used.add(i)
        out.append(samples[i])
    return out


@pytest.fixture(scope="module")
def batch(tiny_setup, tiny_model):
    """Prompts of 4 samples (video, image, video, video) with different lengths, and random completions."""
    model, processor = tiny_model
    samples = _pick(tiny_setup.samples(), ["video", "image", "video", "video"])
    # three different video grids, so that a grid paired with the wrong row shows in the log-probs
    overrides = [dict(nframes=4), {}, {}, dict(max_pixels=F * F, min_pixels=F * F)]  # F: the family's frame factor
    media = [tiny_setup.media(s, **o) for s, o in zip(samples, overrides)]
    prompts = encode_prompts(processor, [s.messages() for s in samples], media)
    assert prompts["video_grid_thw"].tolist() == [[2, 4, 4], [4, 4, 4], [4, 2, 2]]
    lengths = prompts["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) > 1, "the test needs rows of different prompt lengths (left padding)"
    G, Lc = 2, 9
    special = special_tokens(model.config, processor.tokenizer)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 400, (len(samples) * G, Lc), generator=g)
    assert not set(ids.unique().tolist()) & set(special.vision_ids)
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[1, 5:] = False  # a shorter completion, right-padded
    ids[1, 5:] = special.pad_id
    seq = sequence_inputs(select_prompts(prompts, list(range(len(samples))), G), ids, valid)
    full = _logp(model, seq, ids)
    all_masked = _logp(model, visual_masked_inputs(seq), ids)
    return dict(samples=samples, media=media, prompts=prompts, ids=ids, valid=valid, seq=seq, G=G, special=special,
                full=full, all_masked=all_masked)


def _logp(model, inputs, ids):
    with torch.no_grad():
        return sequence_logprobs(model, inputs, ids)[0]


def _delete_visual(seq, completion_width, pad_id):
    """Every row with its visual placeholder tokens deleted, re-left-padded to a common width."""
    rows_ids, rows_att = [], []
    T = seq["input_ids"].shape[1]
    for r in range(seq["input_ids"].shape[0]):
        prompt_keep = (seq["mm_token_type_ids"][r, : T - completion_width] == 0) & (seq["attention_mask"][r, : T - completion_width] == 1)
        ids = torch.cat([seq["input_ids"][r, : T - completion_width][prompt_keep], seq["input_ids"][r, T - completion_width:]])
        att = torch.cat([torch.ones(int(prompt_keep.sum()), dtype=torch.long), seq["attention_mask"][r, T - completion_width:]])
        rows_ids.append(ids)
        rows_att.append(att)
    width = max(len(x) for x in rows_ids)
    out_ids = torch.full((len(rows_ids), width), pad_id, dtype=torch.long)
    out_att = torch.zeros((len(rows_ids), width), dtype=torch.long)
    for r, (ids, att) in enumerate(zip(rows_ids, rows_att)):
        out_ids[r, width - len(ids):] = ids
        out_att[r, width - len(att):] = att
    return {"input_ids": out_ids, "attention_mask": out_att, "mm_token_type_ids": torch.zeros_like(out_ids)}


def test_mask_probe_equals_deleting_the_placeholders(tiny_model, batch):
    model, _ = tiny_model
    seq, ids, valid = batch["seq"], batch["ids"], batch["valid"]
    Lc, pad = ids.shape[1], batch["special"].pad_id
    masked = batch["all_masked"]
    deleted = _delete_visual(seq, Lc, pad)
    assert (deleted["input_ids"] == model.config.video_token_id).sum() == 0
    start = model.config.vision_start_token_id  # one per item (Qwen2/2.5-VL) or per frame group (Qwen3-VL)
    assert (deleted["input_ids"] == start).sum() == (seq["input_ids"] == start).sum() >= seq["input_ids"].shape[0]  # markers stay
    # left padding differs between the two batches: each row is also checked alone (no padding at all)
    batched = _logp(model, deleted, ids)
    assert torch.allclose(masked[valid], batched[valid], atol=ATOL), (masked - batched)[valid].abs().max()
    for r in (0, 1, 3):
        row = {k: v[r : r + 1] for k, v in deleted.items()}
        first = int((row["attention_mask"][0] == 1).nonzero()[0])
        row = {k: v[:, first:] for k, v in row.items()}
        alone = _logp(model, row, ids[r : r + 1])
        assert torch.allclose(masked[r][valid[r]], alone[0][valid[r]], atol=ATOL)
    # and the probe does change the log-probs (the visual input matters to the random model)
    full = batch["full"]
    assert (full - masked)[valid].abs().max() > 1e-3


def test_mask_probe_drops_placeholder_and_padding_columns(tiny_model, batch):
    """With the completion width given, the masked placeholders and left padding leave the batch: the prompt
    part is as wide as the longest row's text, and the log-probs (full and shared-prefix) are unchanged."""
    from video_ktr.model.prefix import shared_prefix_logprobs

    model, _ = tiny_model
    seq, ids, valid, G = batch["seq"], batch["ids"], batch["valid"], batch["G"]
    Lc = ids.shape[1]
    compact = visual_masked_inputs(seq, completion_width=Lc)
    text = (seq["mm_token_type_ids"][:, :-Lc] == 0) & (seq["attention_mask"][:, :-Lc] == 1)
    assert compact["input_ids"].shape[1] == int(text.sum(1).max()) + Lc < seq["input_ids"].shape[1]
    placeholders = (compact["input_ids"] == model.config.video_token_id) | (compact["input_ids"] == model.config.image_token_id)
    assert not (placeholders & compact["attention_mask"].bool()).any()  # a shorter row's left columns are padding
    assert torch.equal(compact["input_ids"][:, -Lc:], ids) and torch.equal(compact["attention_mask"][:, -Lc:], valid.long())
    # each row keeps its text tokens in order, at their positions
    for r in range(ids.shape[0]):
        kept = compact["attention_mask"][r, :-Lc].bool()
        assert torch.equal(compact["input_ids"][r, :-Lc][kept], seq["input_ids"][r, :-Lc][text[r]])
    assert torch.equal(compact["position_ids"][:, :, -Lc:], visual_masked_inputs(seq)["position_ids"][:, :, -Lc:])
    assert torch.allclose(_logp(model, compact, ids)[valid], batch["all_masked"][valid], atol=ATOL)
    fast, _ = shared_prefix_logprobs(model, compact, ids, G)
    assert torch.allclose(fast[valid], batch["all_masked"][valid], atol=ATOL)
    # nothing to drop: the inputs come back as they are
    assert visual_masked_inputs(compact, completion_width=Lc)["input_ids"] is compact["input_ids"]


@pytest.mark.parametrize("masked_rows", [[0], [2, 3], [1], [0, 1, 2]], ids=["first-video", "last-videos", "image", "all-but-last"])
def test_masking_some_rows_leaves_the_others_unchanged(tiny_model, batch, masked_rows):
    model, _ = tiny_model
    seq, ids, valid, G = batch["seq"], batch["ids"], batch["valid"], batch["G"]
    rows = [p * G + g for p in masked_rows for g in range(G)]
    others = [r for r in range(ids.shape[0]) if r not in rows]
    full, all_masked = batch["full"], batch["all_masked"]
    partial = _logp(model, visual_masked_inputs(seq, rows), ids)
    assert torch.allclose(partial[rows][valid[rows]], all_masked[rows][valid[rows]], atol=ATOL)
    assert torch.allclose(partial[others][valid[others]], full[others][valid[others]], atol=ATOL)
    if masked_rows == [0]:
        # the trap this guards against: masking only the attention of some rows while keeping every
        # grid hands the masked row's grid to the next video row (M-RoPE pairs grids with rows in order)
        naive = dict(seq)
        drop = torch.zeros_like(seq["attention_mask"], dtype=torch.bool)
        drop[rows] = seq["mm_token_type_ids"][rows] != 0
        naive["attention_mask"] = seq["attention_mask"].masked_fill(drop, 0)
        try:
            wrong = _logp(model, naive, ids)
        except RuntimeError:  # transformers 5.x: the grids no longer fit the rows' token counts
            return
        assert (wrong[others] - full[others])[valid[others]].abs().max() > 1e-3


def test_masking_some_rows_with_precomputed_features(tiny_model, batch):
    model, _ = tiny_model
    prompts, ids, valid, G = batch["prompts"], batch["ids"], batch["valid"], batch["G"]
    P = prompts["input_ids"].shape[0]
    once = sequence_inputs(encode_visual_once(model, prompts, list(range(P)), G), ids, valid)
    rows = [0, 1, 6]  # half of the first video's group, and one row of the last video's
    full, all_masked = batch["full"], batch["all_masked"]
    partial = _logp(model, visual_masked_inputs(once, rows), ids)
    others = [r for r in range(ids.shape[0]) if r not in rows]
    assert torch.allclose(partial[rows][valid[rows]], all_masked[rows][valid[rows]], atol=ATOL)
    assert torch.allclose(partial[others][valid[others]], full[others][valid[others]], atol=ATOL)


def test_encode_visual_once_equals_repeated_pixels(tiny_model, batch):
    model, _ = tiny_model
    prompts, ids, valid, G = batch["prompts"], batch["ids"], batch["valid"], batch["G"]
    P = prompts["input_ids"].shape[0]
    once = encode_visual_once(model, prompts, list(range(P)), G)
    assert "pixel_values" not in once and "pixel_values_videos" not in once
    assert len(once["mm_encoder_outputs"]["video"].pooler_output) == 3 * G
    assert len(once["mm_encoder_outputs"]["image"].pooler_output) == 1 * G
    a = batch["full"]
    b = _logp(model, sequence_inputs(once, ids, valid), ids)
    assert torch.allclose(a[valid], b[valid], atol=ATOL), (a - b)[valid].abs().max()
    # a subset of prompts in another order follows its own items
    sub = [3, 1]
    rows = [p * G + g for p in sub for g in range(G)]
    c = _logp(model, sequence_inputs(encode_visual_once(model, prompts, sub, G), ids[rows], valid[rows]), ids[rows])
    assert torch.allclose(a[rows][valid[rows]], c[valid[rows]], atol=ATOL)


def test_chunked_probe_passes_equal_one_pass(tiny_model, batch):
    model, processor = tiny_model
    seq, ids, valid, G = batch["seq"], batch["ids"], batch["valid"], batch["G"]
    kw = dict(seq_inputs=seq, completion_ids=ids, completion_valid=valid, group_size=G, processor=processor,
              prompt_inputs=batch["prompts"], media=batch["media"])
    for mode in ("mask", "zero_features", "blank"):
        whole = visual_probe_logprobs(model, mode, **kw)
        chunked = visual_probe_logprobs(model, mode, chunk_rows=3, **kw)
        assert torch.allclose(whole[valid], chunked[valid], atol=ATOL), mode


def test_temporal_positions_differ_across_frames(tiny_setup, tiny_model):
    model, processor = tiny_model
    sample = next(s for s in tiny_setup.samples() if s.data_type == "video")
    media = tiny_setup.media(sample, nframes=8)
    assert media.video.frames.shape[0] == 8
    assert media.video.sampled_fps == pytest.approx(4.0)
    text = processor.apply_chat_template(sample.messages(), add_generation_prompt=True, tokenize=False)
    inputs = processor_call(processor, [text], [media])
    grid = inputs["video_grid_thw"][0].tolist()
    assert grid[0] == 4  # 8 frames, temporal patch 2
    # 8 frames sampled at 4 fps: 2 frames per temporal patch = 0.5 s (not the 1/12 s of the 24 fps default)
    times = {}
    if "second_per_grid_ts" in inputs:  # Qwen2.5-VL: absolute time per temporal grid step
        assert inputs["second_per_grid_ts"].tolist() == pytest.approx([2 / media.video.sampled_fps])
        times["second_per_grid_ts"] = inputs["second_per_grid_ts"]
    pos, _ = model.model.get_rope_index(
        inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"], video_grid_thw=inputs["video_grid_thw"],
        attention_mask=inputs["attention_mask"], **times,
    )
    video = inputs["input_ids"][0] == model.config.video_token_id
    temporal = pos[0, 0][video].view(grid[0], -1)  # (temporal groups, tokens per group)
    assert (temporal == temporal[:, :1]).all()  # one temporal id per group
    ids = temporal[:, 0].tolist()
    assert len(set(ids)) == 4 and ids == sorted(ids), ids


def test_frame_permutation():
    for n in (2, 3, 4, 8, 16):
        for seed in range(50):
            perm = frame_permutation(n, "shuffle", torch.Generator().manual_seed(seed))
            assert sorted(perm) == list(range(n)) and perm != list(range(n))
        for mode in ("reverse", "segments"):
            perm = frame_permutation(n, mode, torch.Generator().manual_seed(0))
            assert sorted(perm) == list(range(n)) and perm != list(range(n)), (mode, n)
    a = [frame_permutation(8, "shuffle", torch.Generator().manual_seed(s)) for s in range(5)]
    b = [frame_permutation(8, "shuffle", torch.Generator().manual_seed(s)) for s in range(5)]
    assert a == b
    assert len({tuple(p) for p in a}) > 1
    assert frame_permutation(1, "shuffle", torch.Generator().manual_seed(0)) is None
    assert frame_permutation(0, "reverse", torch.Generator().manual_seed(0)) is None


def test_temporal_probe_with_identity_order_scores_zero(tiny_model, batch):
    model, processor = tiny_model
    prompts, ids, valid, G, media = batch["prompts"], batch["ids"], batch["valid"], batch["G"], batch["media"]
    videos = [p for p, m in enumerate(media) if m.kind == "video"]
    identity = {p: list(range(media[p].video.frames.shape[0])) for p in videos}
    logp = batch["full"]
    tmp, rows = temporal_probe_logprobs(model, processor, prompts, media, identity, ids, valid, G)
    assert rows.tolist() == [media[r // G].kind == "video" for r in range(ids.shape[0])]
    # the shared-prefix probe pass differs from the full policy forward by float rounding only; the
    # trainer's probe_score turns such differences into exact zeros
    from video_ktr.training.grpo_stages import probe_score

    score = torch.where(rows[:, None], probe_score(logp, tmp, 1e-5), torch.zeros_like(logp))
    assert torch.equal(score[valid], torch.zeros_like(score[valid]))
    assert (logp - tmp)[rows][valid[rows]].abs().max() < 1e-5
    # a real permutation moves the scores of the video rows
    perms = {p: frame_permutation(media[p].video.frames.shape[0], "reverse", torch.Generator()) for p in videos}
    tmp, _ = temporal_probe_logprobs(model, processor, prompts, media, perms, ids, valid, G)
    assert (logp - tmp)[rows][valid[rows]].abs().max() > 0
    assert permuted_media(media[0], perms[0]).video.frames[0].equal(media[0].video.frames[-1])


# --------------------------------------------------------------- the optimised probes == the straightforward ones


def _ragged(batch):
    """The batch's completions with a row without any valid token, a whole prompt group without any
    (the last video's), and a shorter row."""
    ids, valid = batch["ids"].clone(), batch["valid"].clone()
    valid[3] = False  # the image prompt's second completion
    valid[6:8] = False  # both completions of the last video
    valid[4, 4:] = False
    ids[~valid] = batch["special"].pad_id
    return ids, valid


def _straightforward_temporal(model, processor, prompts, media, perms, ids, valid, G):
    """Per prompt: the processor re-encodes the permuted frames, the pixels are repeated G times and the
    full prompt+completion sequences are run."""
    out = torch.zeros(ids.shape)
    for p, perm in perms.items():
        enc = reencode_visual(processor, select_prompts(prompts, [p]), [permuted_media(media[p], perm)])
        rows = list(range(p * G, (p + 1) * G))
        out[rows] = _logp(model, sequence_inputs(select_prompts(enc, [0], G), ids[rows], valid[rows]), ids[rows])
    return out


@pytest.mark.parametrize("chunk_rows", [None, 2, 4])
def test_optimised_probes_equal_the_straightforward_computation(tiny_model, batch, chunk_rows):
    model, processor = tiny_model
    prompts, media, G = batch["prompts"], batch["media"], batch["G"]
    ids, valid = _ragged(batch)
    P = prompts["input_ids"].shape[0]
    full_seq = sequence_inputs(select_prompts(prompts, list(range(P)), G), ids, valid)  # pixels repeated G times
    token_seq = sequence_inputs(select_prompts(strip_pixels(prompts), list(range(P)), G), ids, valid)  # the trainer's
    assert "pixel_values_videos" not in token_seq and "video_grid_thw" in token_seq
    kw = dict(seq_inputs=token_seq, completion_ids=ids, completion_valid=valid, group_size=G, processor=processor,
              prompt_inputs=prompts, media=media, chunk_rows=chunk_rows)
    for mode, plain in (("mask", visual_masked_inputs(full_seq)), ("zero_features", zero_feature_inputs(model, full_seq))):
        want = _logp(model, plain, ids)
        got = visual_probe_logprobs(model, mode, **kw)
        assert torch.allclose(got[valid], want[valid], atol=ATOL), (mode, (got - want)[valid].abs().max())
        assert (got[~valid] == 0).all()  # nothing after a row's last valid token, nothing for empty rows
    videos = [p for p, m in enumerate(media) if m.kind == "video"]
    perms = {p: frame_permutation(media[p].video.frames.shape[0], "shuffle", torch.Generator().manual_seed(p)) for p in videos}
    want = _straightforward_temporal(model, processor, prompts, media, perms, ids, valid, G)
    got, rows = temporal_probe_logprobs(model, processor, prompts, media, perms, ids, valid, G, chunk_rows)
    assert rows.tolist() == [p in perms for p in range(P) for _ in range(G)]
    assert torch.allclose(got[valid], want[valid], atol=ATOL), (got - want)[valid].abs().max()
    assert (got[~valid] == 0).all()
    assert (got - batch["full"])[valid & rows[:, None]].abs().max() > 1e-3  # the permutation matters


def test_permuted_pixels_equal_the_processors(tiny_setup, tiny_model, batch, monkeypatch):
    import video_ktr.model.probes as probes

    _, processor = tiny_model
    prompts, media = batch["prompts"], batch["media"]
    # three video grids ((2, 4, 4), (4, 4, 4), (4, 2, 2)) and a 7-frame video the processor pads to 8
    sample = next(s for s in tiny_setup.samples() if s.data_type == "video")
    odd = tiny_setup.media(sample)
    odd = Media(video=replace(odd.video, frames=odd.video.frames[:7]))
    odd_prompts = encode_prompts(processor, [sample.messages()], [odd])
    assert odd_prompts["video_grid_thw"].tolist() == [[4, 4, 4]]
    for inputs, items in ((prompts, media), (odd_prompts, [odd])):
        videos = [p for p, m in enumerate(items) if m.kind == "video"]
        perms = {p: frame_permutation(items[p].video.frames.shape[0], "shuffle", torch.Generator().manual_seed(p + 1))
                 for p in videos}
        rows, fast = shuffled_prompts(processor, inputs, items, perms)
        assert rows == videos
        want = reencode_visual(processor, select_prompts(inputs, rows), [permuted_media(items[p], perms[p]) for p in rows])
        assert torch.equal(fast["pixel_values_videos"], want["pixel_values_videos"])
        assert torch.equal(fast["video_grid_thw"], want["video_grid_thw"])
        assert not torch.equal(fast["pixel_values_videos"], select_prompts(inputs, rows)["pixel_values_videos"])
    # a processor of unknown layout is called again instead
    monkeypatch.setattr(probes, "_patch_layout", lambda processor: None)
    calls = []
    monkeypatch.setattr(probes, "reencode_visual", lambda *a: calls.append(1) or reencode_visual(*a))
    rows, slow = shuffled_prompts(processor, odd_prompts, [odd], {0: [6, 5, 4, 3, 2, 1, 0]})
    assert calls and torch.equal(slow["pixel_values_videos"],
                                 reencode_visual(processor, odd_prompts, [permuted_media(odd, [6, 5, 4, 3, 2, 1, 0])])["pixel_values_videos"])


def test_rollout_keeps_no_pixel_copies_and_the_fallbacks_agree(tiny_setup, tmp_path):
    """The rollout's rows carry no pixels; the policy inputs without once-per-prompt vision and the probes
    without shared prefixes (the straightforward paths) give the optimised numbers."""
    from dataclasses import replace

    from tests.grpo_steps import record_step
    from video_ktr.training.grpo import KTRTrainer
    from video_ktr.training.grpo_config import TrainConfig
    from video_ktr.training.grpo_stages import policy_inputs, probe_scores, temporal_permutations
    from video_ktr.utils.config import parse_args

    cfg = parse_args(TrainConfig, tiny_setup.train_args(tmp_path, "--max_steps", "1", "--token_selection", "all",
                                                         "--reward_funcs", "format", "--learning_rate", "0"))
    trainer = KTRTrainer(cfg)
    trainer.state.micro_step = 1  # an image prompt and a video prompt
    ro = record_step(trainer).rollout
    trainer.model.eval()
    assert {s.data_type for s in ro.samples} == {"image", "video"}
    assert not {"pixel_values", "pixel_values_videos", "mm_encoder_outputs"} & set(ro.seq_inputs)
    ids, valid, G = ro.completions.ids, ro.completions.valid, cfg.num_generations
    plain = replace(trainer.plan, encode_visual_once=False, shared_prefix=False)
    with torch.no_grad():
        once = sequence_logprobs(trainer.model, policy_inputs(trainer.model, ro, G, trainer.plan), ids)[0]
        repeated_inputs = policy_inputs(trainer.model, ro, G, plain)
        repeated = sequence_logprobs(trainer.model, repeated_inputs, ids)[0]
    assert repeated_inputs["pixel_values_videos"].shape[0] == G * ro.prompt_inputs["pixel_values_videos"].shape[0]
    assert torch.allclose(once[valid], repeated[valid], atol=ATOL)
    # the probes without shared prefixes: the same scores as the rollout's (lr 0: the model did not move)
    picked = list(zip(ro.indices, ro.samples))
    perms = temporal_permutations(cfg.seed, ro.micro_step, picked, ro.media, cfg.temporal_probe)
    again = probe_scores(trainer.model, trainer.processor, signals=cfg.signals, visual_probe=cfg.visual_probe,
                         prompt_inputs=ro.prompt_inputs, seq_inputs=ro.seq_inputs, media=ro.media, comps=ro.completions,
                         perms=perms, probed=list(range(len(picked))), group_size=G, plan=plain)
    assert torch.allclose(again.visual[valid], ro.probes.visual[valid], atol=ATOL)
    assert torch.equal(again.temporal_rows, ro.probes.temporal_rows) and ro.probes.temporal_rows.any()
    assert torch.allclose(again.temporal[valid], ro.probes.temporal[valid], atol=ATOL)


def test_bf16_probes_move_the_selection_only_near_each_threshold(tiny_model, batch):
    """probe dtype 'bfloat16' (autocast over float32 weights): each probe log-prob moves by at most eps (the bf16
    rounding, measured here), so a token can enter or leave a probe's key set only within 2 eps of its group's
    threshold; the entropy signal (policy pass) is untouched; 'weights' is the default computation bit for bit."""
    from video_ktr.core.selection import SelectionSpec, quantile_threshold
    from video_ktr.training.grpo_stages import ProbeScores, select_tokens, signal_scores

    model, processor = tiny_model
    prompts, media, G, ids, valid, seq = (batch[k] for k in ("prompts", "media", "G", "ids", "valid", "seq"))
    P = prompts["input_ids"].shape[0]
    token_seq = sequence_inputs(select_prompts(strip_pixels(prompts), list(range(P)), G), ids, valid)
    with torch.no_grad():
        logp, entropy = sequence_logprobs(model, seq, ids, with_entropy=True)
    perms = {p: frame_permutation(m.video.frames.shape[0], "shuffle", torch.Generator().manual_seed(p))
             for p, m in enumerate(media) if m.kind == "video"}
    spec, tol = SelectionSpec(), 1e-5
    kw = dict(seq_inputs=token_seq, completion_ids=ids, completion_valid=valid, group_size=G)
    default_vis = visual_probe_logprobs(model, "mask", **kw)
    out = {}
    for dtype in ("weights", "bfloat16"):
        vis = visual_probe_logprobs(model, "mask", dtype=dtype, **kw)
        tmp, rows = temporal_probe_logprobs(model, processor, prompts, media, perms, ids, valid, G, dtype=dtype)
        probes = ProbeScores(torch.ones(ids.shape[0], dtype=torch.bool), vis, tmp, rows)
        scores = signal_scores(logp, entropy, probes, spec.signals, tol)
        out[dtype] = (vis, scores, select_tokens(scores, valid, probes, spec, G))
    assert torch.equal(out["weights"][0], default_vis)
    (_, s32, m32), (_, s16, m16) = out["weights"], out["bfloat16"]
    assert torch.equal(m32["entropy"], m16["entropy"])
    for name in ("visual", "temporal"):
        pool = valid & (rows[:, None] if name == "temporal" else True)
        eps = float((s32[name] - s16[name])[pool].abs().max())
        assert 0 < eps < 0.05, (name, eps)  # autocast ran, and bf16 rounding is small beside a nat
        flipped = (m32[name] ^ m16[name]) & pool
        for p in range(P):
            group = torch.zeros_like(pool)
            group[p * G:(p + 1) * G] = True
            if not (pool & group).any():
                continue
            tau = quantile_threshold(s32[name][pool & group], spec.ratio(name))
            distance = (s32[name] - tau).abs()[flipped & group]
            assert (distance <= 2 * eps + 2 * tol).all(), (name, p, distance.max(), eps)
        print(f"{name}: eps {eps:.2e} nats, {int(flipped.sum())} of {int(pool.sum())} tokens change selection")


def test_temporal_probe_runs_each_shuffled_prompt_once_for_its_group(tiny_model, batch):
    """The temporal probe's re-encoded prompt (shuffled video) runs through the vision tower and the language model
    once per prompt, its cache shared by the G completions, and gives the log-probs of the unshared pass (every
    row's full prompt + completion) to float32 tolerance."""
    model, processor = tiny_model
    prompts, media, G, ids, valid = (batch[k] for k in ("prompts", "media", "G", "ids", "valid"))
    Lc = ids.shape[1]
    perms = {p: frame_permutation(m.video.frames.shape[0], "shuffle", torch.Generator().manual_seed(p))
             for p, m in enumerate(media) if m.kind == "video"}
    inner = model.model
    seen: dict[str, list] = {"text": [], "vision": []}
    hooks = [inner.language_model.register_forward_pre_hook(
                 lambda m, a, kw: seen["text"].append(tuple((kw.get("inputs_embeds") if kw.get("inputs_embeds") is not None
                                                             else kw["input_ids"]).shape[:2])), with_kwargs=True),
             inner.visual.register_forward_pre_hook(lambda m, a, kw: seen["vision"].append(1), with_kwargs=True)]
    try:
        shared, rows = temporal_probe_logprobs(model, processor, prompts, media, perms, ids, valid, G)
        calls = {k: list(v) for k, v in seen.items()}
        seen["text"].clear()
        seen["vision"].clear()
        unshared, rows2 = temporal_probe_logprobs(model, processor, prompts, media, perms, ids, valid, G, shared_prefix=False)
    finally:
        for h in hooks:
            h.remove()
    assert torch.equal(rows, rows2)
    assert torch.allclose(shared[valid], unshared[valid], atol=1e-5, rtol=0), (shared - unshared)[valid].abs().max()
    # shared: one vision call, one prompt pass over the len(perms) prompts, then completion passes no wider than Lc
    assert len(calls["vision"]) == 1
    prompt_passes = [s for s in calls["text"] if s[1] > Lc]
    assert prompt_passes == [(len(perms), prompts["input_ids"].shape[1])], calls["text"]
    # unshared: every one of the len(perms) x G rows runs its whole prompt
    assert sum(s[0] for s in seen["text"] if s[1] > Lc) == len(perms) * G


def test_trainer_runs_its_probes_in_bf16_when_asked(tiny_setup, tmp_path, monkeypatch):
    """--probe_dtype bfloat16 reaches both probe passes (under autocast over the float32 weights); the default does not."""
    import video_ktr.model.probes as probes
    from tests.grpo_steps import record_step
    from video_ktr.training.grpo import KTRTrainer
    from video_ktr.training.grpo_config import TrainConfig
    from video_ktr.utils.config import parse_args

    seen = []
    original = probes.probe_precision
    monkeypatch.setattr(probes, "probe_precision", lambda model, dtype="weights": seen.append(dtype) or original(model, dtype))
    for dtype in ("weights", "bfloat16"):
        cfg = parse_args(TrainConfig, tiny_setup.train_args(tmp_path / dtype, "--max_steps", "1", "--token_selection", "all",
                                                             "--probe_dtype", dtype, "--probe_all_groups", "true"))
        trainer = KTRTrainer(cfg)
        trainer.state.micro_step = 1  # an image prompt and a video prompt: both probes run
        seen.clear()
        ro = record_step(trainer).rollout
        assert seen == [dtype, dtype]
        assert torch.isfinite(ro.probes.visual).all() and ro.probes.temporal_rows.any()
