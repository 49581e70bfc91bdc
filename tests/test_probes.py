"""The counterfactual probes on the tiny Qwen2.5-VL: what they compute equals what they claim to.

- visual ``mask`` probe == the sequence with its visual placeholder tokens deleted (the vision
  start/end markers stay), with left padding and rows of different prompt lengths;
- masking only SOME rows leaves the other rows exactly as without the probe (their grids stay paired
  with their rows);
- features encoded once per prompt and repeated == the pixels repeated G times;
- M-RoPE temporal positions differ across frames (the sampling metadata reaches the processor);
- frame permutations and the temporal probe's identity sanity check.
"""

from __future__ import annotations

import pytest
import torch

from video_ktr.model_inputs import encode_prompts, processor_call, select_prompts, sequence_inputs
from video_ktr.modeling import special_tokens
from video_ktr.probes import (
    frame_permutation,
    permuted_media,
    temporal_probe_logprobs,
    visual_masked_inputs,
    visual_probe_logprobs,
)
from video_ktr.rollout import encode_visual_once
from video_ktr.scoring import sequence_logprobs

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
    overrides = [dict(nframes=4), {}, {}, dict(max_pixels=784, min_pixels=784)]
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
    assert (deleted["input_ids"] == model.config.vision_start_token_id).sum() == seq["input_ids"].shape[0]  # markers stay
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
    assert inputs["second_per_grid_ts"].tolist() == pytest.approx([2 / media.video.sampled_fps])
    pos, _ = model.model.get_rope_index(
        inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"], video_grid_thw=inputs["video_grid_thw"],
        second_per_grid_ts=inputs["second_per_grid_ts"], attention_mask=inputs["attention_mask"],
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
    from video_ktr.trainer import probe_score

    score = torch.where(rows[:, None], probe_score(logp, tmp, 1e-5), torch.zeros_like(logp))
    assert torch.equal(score[valid], torch.zeros_like(score[valid]))
    assert (logp - tmp)[rows][valid[rows]].abs().max() < 1e-5
    # a real permutation moves the scores of the video rows
    perms = {p: frame_permutation(media[p].video.frames.shape[0], "reverse", torch.Generator()) for p in videos}
    tmp, _ = temporal_probe_logprobs(model, processor, prompts, media, perms, ids, valid, G)
    assert (logp - tmp)[rows][valid[rows]].abs().max() > 0
    assert permuted_media(media[0], perms[0]).video.frames[0].equal(media[0].video.frames[-1])
