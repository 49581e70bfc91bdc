"""Counterfactual probes: how much each sampled token needs to see, and to see in order.

visual   V[i,t] = log p[i,t] - log p_vis[i,t]: the same sequence with the visual input taken away;
temporal T[i,t] = log p[i,t] - log p_tmp[i,t]: the same video with its sampled frames permuted and
re-encoded (Qwen2.5-VL patches frames in pairs, so a permutation changes the pairs).

Both run without grad and keep only the log-prob of each sampled token.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from video_ktr.model.adapters import adapter_for, patch_layout
from video_ktr.model.inputs import (
    PIXEL_KEYS,
    VISUAL_KEYS,
    Media,
    keep_visual_items,
    processor_call,
    select_prompts,
    sequence_inputs,
    to_device,
)
from video_ktr.model.loading import unwrap
from video_ktr.model.lockstep import Lockstep
from video_ktr.model.prefix import shared_prefix_logprobs
from video_ktr.model.rollout import encode_visual_once, pad_encoder_calls
from video_ktr.model.scoring import BUCKET_OVERHEAD_TOKENS, sequence_logprobs

VISUAL_PROBES = ("mask", "zero_features", "blank")
TEMPORAL_PROBES = ("shuffle", "reverse", "segments")
PROBE_DTYPES = ("weights", "bfloat16")


def probe_precision(model: torch.nn.Module, dtype: str = "weights") -> contextlib.AbstractContextManager:
    """The precision of a probe's forward passes.

    ``weights`` (default): as the weights are, nothing changes. ``bfloat16``: where the weights are float32,
    the passes run under bf16 autocast (matrix products in bf16: about twice the speed on a GPU's tensor
    cores); the log-softmax of the sampled tokens stays float32 (scoring.token_logprobs). Weights already
    in 16 bits run as they are. Not exact: each probe log-prob moves by the bf16 rounding eps, so a token
    can change selection only within 2 eps of its pool's threshold (docs/performance.md gives eps measured).
    """
    if dtype not in PROBE_DTYPES:
        raise ValueError(f"probe dtype must be one of {PROBE_DTYPES}, got {dtype!r}")
    param = next(unwrap(model).parameters(), None)
    if dtype == "weights" or param is None or param.dtype != torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=param.device.type, dtype=torch.bfloat16)


def text_only_positions(attention_mask: Tensor) -> Tensor:
    """(3, B, T) M-RoPE positions of the attended tokens as plain text (0, 1, 2, ... per row)."""
    pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return pos.unsqueeze(0).expand(3, -1, -1)


def drop_unattended_prompt_columns(inputs: dict[str, Any], completion_width: int) -> dict[str, Any]:
    """Text-only ``inputs`` (no visual tensors) without the prompt columns that no row attends to.

    Each row's attended prompt tokens move right, next to its completion (the last ``completion_width``
    columns, kept as they are), and the prompt part is cut to the widest row's attended count. Unattended
    columns are keys nobody attends to and queries nobody reads, so with the caller's ``position_ids``
    carried along the log-probs are the same numbers while every pass over the prompt is shorter: the
    ``mask`` probe's placeholders (and left padding) are not run at all.
    """
    ids = inputs["input_ids"]
    B, L = ids.shape
    Lp = L - completion_width
    keep = inputs["attention_mask"][:, :Lp].bool()
    width = int(keep.sum(1).max()) if B and Lp else 0
    if width == Lp:
        return inputs
    # a stable sort puts each row's unattended prompt columns first and its attended ones after, in order
    order = torch.sort(keep.to(torch.int8), dim=1, stable=True).indices[:, Lp - width:]
    cols = torch.cat([order, torch.arange(Lp, L, device=ids.device).expand(B, -1)], dim=1)
    out = dict(inputs)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        out[key] = inputs[key].gather(1, cols)
    if "position_ids" in inputs:
        pos = inputs["position_ids"]
        out["position_ids"] = pos.gather(2, cols[None].expand(pos.shape[0], -1, -1))
    return out


def visual_masked_inputs(inputs: dict[str, Any], rows: list[int] | None = None, *, filler_id: int | None = None,
                         completion_width: int | None = None) -> dict[str, Any]:
    """The ``mask`` probe: visual placeholders removed from attention, text kept at its own positions.

    ``rows``: the rows whose visual item is taken away (default: all). With all rows masked no pixels
    are passed (the vision tower is not run: its output would be masked out anyway) and the text gets
    the positions it would have if the placeholders were absent (0, 1, 2, ... over attended tokens).

    With only some rows masked, the other rows keep their visual item: the pixels, grids and times
    of the masked rows' items are dropped (the model pairs grids with rows in order), the masked
    placeholders are replaced by ``filler_id`` (default: the row's first token; never attended, so
    its value does not matter) and their token types set to text, and the model computes M-RoPE
    positions itself from the attention mask: text-only positions for the masked rows, the usual
    3-D positions for the others. Either way a masked row gives the same log-probs as the sequence
    with its placeholder tokens deleted (the vision start/end markers stay).

    With all rows masked and ``completion_width`` given (the last columns are completions), the masked
    placeholders and left padding are dropped from the prompt columns (drop_unattended_prompt_columns):
    the same numbers, and the probe does not run the placeholders through the language model.
    """
    mm = inputs["mm_token_type_ids"]
    B = mm.shape[0]
    masked_rows = list(range(B)) if rows is None else sorted(set(int(r) for r in rows))
    if any(r < 0 or r >= B for r in masked_rows):
        raise ValueError(f"rows {masked_rows} out of range for a batch of {B}")
    row_masked = torch.zeros(B, dtype=torch.bool, device=mm.device)
    row_masked[masked_rows] = True
    visual = (mm != 0) & row_masked[:, None]
    attention = inputs["attention_mask"].masked_fill(visual, 0)
    kept = [r for r in range(B) if r not in set(masked_rows)]
    has_kept_item = bool((mm[kept] != 0).any()) if kept else False
    if not has_kept_item:
        out = {k: v for k, v in inputs.items() if k not in VISUAL_KEYS and k != "mm_encoder_outputs"}
        out["attention_mask"] = attention
        out["mm_token_type_ids"] = mm.masked_fill(visual, 0)
        out["position_ids"] = text_only_positions(attention)
        return out if completion_width is None else drop_unattended_prompt_columns(out, completion_width)
    if "position_ids" in inputs:
        raise ValueError("visual_masked_inputs with some rows kept needs inputs without explicit position_ids")
    out = keep_visual_items(inputs, kept)
    ids = inputs["input_ids"]
    filler = ids[:, :1].expand_as(ids) if filler_id is None else torch.full_like(ids, int(filler_id))
    out["input_ids"] = torch.where(visual, filler, ids)
    out["attention_mask"] = attention
    out["mm_token_type_ids"] = mm.masked_fill(visual, 0)
    return out


def zero_feature_inputs(model: torch.nn.Module, inputs: dict[str, Tensor]) -> dict[str, Any]:
    """The ``zero_features`` probe: the placeholders stay, their visual features are all zero."""
    cfg = getattr(model, "config", None)
    hidden = getattr(cfg, "text_config", cfg).hidden_size
    merge = getattr(getattr(cfg, "vision_config", None), "spatial_merge_size", 2)
    dtype = next(model.parameters()).dtype
    adapter = adapter_for(model)
    out: dict[str, Any] = {k: v for k, v in inputs.items() if k not in PIXEL_KEYS}
    encoded = {}
    for name, grid_key in (("image", "image_grid_thw"), ("video", "video_grid_thw")):
        if grid_key in inputs:
            sizes = (inputs[grid_key].prod(-1) // merge**2).tolist()
            encoded[name] = adapter.zero_features(cfg, sizes, hidden, dtype, inputs["input_ids"].device)
    out["mm_encoder_outputs"] = encoded
    return out


def blank_media(media: Media) -> Media:
    """The ``blank`` probe's input: black frames / a black image of the same size."""
    if media.video is not None:
        return Media(video=replace(media.video, frames=torch.zeros_like(media.video.frames)))
    if media.image is not None:
        from PIL import Image

        return Media(image=Image.new("RGB", media.image.size))
    return media


def frame_permutation(num_frames: int, mode: str, generator: torch.Generator, segments: int = 4) -> list[int] | None:
    """A non-identity order of ``num_frames`` frames (None when there is no such order: one frame).

    shuffle: uniform random permutation, redrawn until it is not the identity;
    reverse: last to first; segments: the frames cut into ``segments`` contiguous pieces, shuffled.
    """
    if num_frames < 2:
        return None
    if mode == "reverse":
        return list(range(num_frames - 1, -1, -1))
    if mode == "shuffle":
        while True:
            perm = torch.randperm(num_frames, generator=generator).tolist()
            if perm != list(range(num_frames)):
                return perm
    if mode == "segments":
        k = max(2, min(segments, num_frames))
        bounds = torch.linspace(0, num_frames, k + 1).round().long().tolist()
        pieces = [list(range(bounds[j], bounds[j + 1])) for j in range(k) if bounds[j + 1] > bounds[j]]
        while True:
            order = torch.randperm(len(pieces), generator=generator).tolist()
            if order != list(range(len(pieces))):
                return [f for j in order for f in pieces[j]]
    raise ValueError(f"temporal probe must be one of {TEMPORAL_PROBES}, got {mode!r}")


def permuted_media(media: Media, perm: list[int]) -> Media:
    """The same video with its sampled frames in the order ``perm`` (sampling metadata unchanged)."""
    video = media.video
    return Media(video=replace(video, frames=video.frames[torch.tensor(perm)]))


def reencode_visual(processor: Any, inputs: dict[str, Tensor], media: list[Media]) -> dict[str, Tensor]:
    """Replace the pixel tensors of prompt ``inputs`` by those of ``media`` (same grids, same order)."""
    dummy = [processor.video_token if m.kind == "video" else processor.image_token for m in media]
    enc = processor_call(processor, dummy, media)
    out = dict(inputs)
    for key in PIXEL_KEYS:
        if key in enc:
            out[key] = enc[key]
    for grid in ("image_grid_thw", "video_grid_thw"):
        if grid in enc and not torch.equal(enc[grid], inputs[grid]):
            raise RuntimeError(f"re-encoded {grid} {enc[grid].tolist()} differs from the original {inputs[grid].tolist()}")
    return out


@torch.no_grad()
def probe_logprobs(model: torch.nn.Module, inputs: dict[str, Any], completion_ids: Tensor, chunk_rows: int | None,
                   group_size: int | None = None, bucket_overhead: int | None = BUCKET_OVERHEAD_TOKENS) -> Tensor:
    """log p of the completion tokens without grad.

    With ``group_size`` (rows laid out as groups sharing one prompt) each prompt's prefix is run once
    and its cache shared by the group (prefix.shared_prefix_logprobs; equal to the full forward to
    float tolerance; 0 after a row's last valid token); ``chunk_rows`` then counts prompts x
    group_size rows per chunk. Rows run in buckets of similar completion width unless
    ``bucket_overhead`` is None (scoring.width_buckets).
    """
    if group_size and group_size > 1:

        per_chunk = max(1, chunk_rows // group_size) if chunk_rows else None
        logp, _ = shared_prefix_logprobs(model, inputs, completion_ids, group_size, prompts_per_chunk=per_chunk,
                                         bucket_overhead=bucket_overhead)
        return logp
    logp, _ = sequence_logprobs(model, inputs, completion_ids, with_entropy=False, chunk_rows=chunk_rows,
                                bucket_overhead=bucket_overhead)
    return logp


def _patch_layout(processor: Any) -> tuple[int, int] | None:
    """(temporal_patch_size, patch_size) of a video processor whose layout a family adapter knows, else None."""
    return patch_layout(processor)


def permuted_video_pixels(pixels: Tensor, grid: Tensor, num_frames: int, perm: list[int],
                          layout: tuple[int, int]) -> Tensor | None:
    """The pixel rows (t h w, C tp p p) of one processed video with its ``num_frames`` frames in the order ``perm``.

    Qwen2-VL's video processor resizes, rescales and normalises each frame on its own, pads the frames
    to a multiple of the temporal patch tp with copies of the last one, and flattens a (t, h, w) grid
    of patches whose values are laid out (channel, temporal patch, patch row, patch column). Undoing
    the layout gives the processed frames; permuting them (and padding with the new last frame) and
    laying them out again gives, value for value, what the processor returns for the permuted frames
    (tests pin it), without a second processor call. None when ``pixels`` do not fit this layout.
    """
    tp, patch = layout
    t, h, w = (int(x) for x in grid.tolist())
    rows, dim = pixels.shape
    channels = dim // (tp * patch * patch)
    padded = num_frames + (-num_frames % tp)
    if rows != t * h * w or channels * tp * patch * patch != dim or t * tp != padded or sorted(perm) != list(range(num_frames)):
        return None
    frames = pixels.view(t, h * w, channels, tp, patch * patch).permute(0, 3, 1, 2, 4).reshape(padded, h * w, channels, -1)
    order = torch.tensor(list(perm) + [perm[-1]] * (padded - num_frames), device=pixels.device)
    frames = frames[order].view(t, tp, h * w, channels, patch * patch)
    return frames.permute(0, 2, 3, 1, 4).reshape(rows, dim)


def _permuted_prompts(processor: Any, prompts: dict[str, Tensor], media: list[Media],
                      perms: list[list[int]]) -> dict[str, Tensor] | None:
    """``prompts`` (video rows only) with each video's pixel rows permuted in place (None: not possible)."""
    layout = _patch_layout(processor)
    if layout is None or "pixel_values_videos" not in prompts or "pixel_values" in prompts:
        return None
    grids = prompts["video_grid_thw"]
    sizes = [int(n) for n in grids.prod(-1).tolist()]
    if len(sizes) != len(media) or sum(sizes) != prompts["pixel_values_videos"].shape[0] or any(m.kind != "video" for m in media):
        return None
    chunks = []
    for chunk, grid, m, perm in zip(torch.split(prompts["pixel_values_videos"], sizes), grids, media, perms):
        moved = permuted_video_pixels(chunk, grid, m.video.frames.shape[0], perm, layout)
        if moved is None:
            return None
        chunks.append(moved)
    out = dict(prompts)
    out["pixel_values_videos"] = torch.cat(chunks)
    return out


def shuffled_prompts(processor: Any, prompt_inputs: dict[str, Any], media: list[Media],
                     perms: dict[int, list[int]]) -> tuple[list[int], dict[str, Tensor]]:
    """The prompts of the rows in ``perms`` (sorted) with their videos' frames permuted and re-encoded.

    The processed frames are permuted where the processor's layout is known (permuted_video_pixels: the
    same values, no processor call); otherwise the processor re-encodes the permuted frames.
    """

    rows = sorted(perms)
    device = prompt_inputs["input_ids"].device
    prompts = select_prompts(prompt_inputs, rows)
    enc = _permuted_prompts(processor, prompts, [media[p] for p in rows], [perms[p] for p in rows])
    if enc is None:
        enc = reencode_visual(processor, prompts, [permuted_media(media[p], perms[p]) for p in rows])
    return rows, to_device(enc, device)


@torch.no_grad()
def visual_probe_logprobs(
    model: torch.nn.Module, mode: str, *, seq_inputs: dict[str, Any], completion_ids: Tensor, completion_valid: Tensor,
    group_size: int, processor: Any = None, prompt_inputs: dict[str, Any] | None = None, media: list[Media] | None = None,
    chunk_rows: int | None = None, shared_prefix: bool = True, bucket_overhead: int | None = BUCKET_OVERHEAD_TOKENS,
    lockstep: Lockstep | None = None, dtype: str = "weights",
) -> Tensor:
    """log p_vis (N, Lc): the sampled tokens with the visual input taken away (``mode`` in VISUAL_PROBES).

    seq_inputs: prompt+completion inputs of the N = P x G rows (groups of ``group_size`` consecutive rows);
    ``blank`` also needs the processor, the P un-repeated prompt inputs and their media. ``lockstep``: the
    vision-tower calls of ``blank`` agreed across processes (model/lockstep.py). ``dtype``: the passes'
    precision (probe_precision).
    """
    with probe_precision(model, dtype):
        return _visual_probe_logprobs(model, mode, seq_inputs, completion_ids, completion_valid, group_size, processor,
                                      prompt_inputs, media, chunk_rows, shared_prefix, bucket_overhead, lockstep)


def _visual_probe_logprobs(model, mode, seq_inputs, completion_ids, completion_valid, group_size, processor, prompt_inputs,
                           media, chunk_rows, shared_prefix, bucket_overhead, lockstep) -> Tensor:

    if mode == "mask":
        inputs = visual_masked_inputs(seq_inputs, completion_width=completion_ids.shape[1])
    elif mode == "zero_features":
        inputs = zero_feature_inputs(unwrap(model), seq_inputs)
    elif mode == "blank":
        if processor is None or prompt_inputs is None or media is None:
            raise ValueError("the blank visual probe needs processor, prompt_inputs and media")
        blank = reencode_visual(processor, prompt_inputs, [blank_media(m) for m in media])
        blank = {k: (v.to(prompt_inputs["input_ids"].device) if isinstance(v, Tensor) else v) for k, v in blank.items()}
        P = prompt_inputs["input_ids"].shape[0]
        inputs = sequence_inputs(encode_visual_once(model, blank, list(range(P)), group_size, lockstep=lockstep),
                                 completion_ids, completion_valid)
    else:
        raise ValueError(f"visual probe must be one of {VISUAL_PROBES}, got {mode!r}")
    return probe_logprobs(model, inputs, completion_ids, chunk_rows, group_size if shared_prefix else None, bucket_overhead)


@torch.no_grad()
def temporal_probe_logprobs(
    model: torch.nn.Module, processor: Any, prompt_inputs: dict[str, Any], media: list[Media], perms: dict[int, list[int]],
    completion_ids: Tensor, completion_valid: Tensor, group_size: int, chunk_rows: int | None = None,
    shared_prefix: bool = True, bucket_overhead: int | None = BUCKET_OVERHEAD_TOKENS, lockstep: Lockstep | None = None,
    dtype: str = "weights",
) -> tuple[Tensor, Tensor]:
    """log p_tmp (N, Lc) and the rows that have it (N,) bool.

    prompt_inputs: the P un-repeated prompts; completions: N = P x G rows, groups of ``group_size``.
    ``perms`` maps a prompt index to its frame order (the same for its G completions); prompts without
    one (images, single frames) get log p_tmp = 0 and are not temporal rows. Each shuffled video is
    encoded once and its features repeated for the G completions; with ``shared_prefix`` its prompt
    (re-encoded video included) runs once and its cache serves the G completions. ``lockstep``: the
    vision-tower calls agreed across processes (a process without a permuted video pads them;
    model/lockstep.py). ``dtype``: the passes' precision (probe_precision).
    """
    with probe_precision(model, dtype):
        return _temporal_probe_logprobs(model, processor, prompt_inputs, media, perms, completion_ids, completion_valid,
                                        group_size, chunk_rows, shared_prefix, bucket_overhead, lockstep)


def _temporal_probe_logprobs(model, processor, prompt_inputs, media, perms, completion_ids, completion_valid, group_size,
                             chunk_rows, shared_prefix, bucket_overhead, lockstep) -> tuple[Tensor, Tensor]:

    G = group_size
    N, Lc = completion_ids.shape
    device = completion_ids.device
    tmp = torch.zeros(N, Lc, device=device)
    temporal_rows = torch.zeros(N, dtype=torch.bool, device=device)
    if not perms:
        pad_encoder_calls(model, lockstep)
        return tmp, temporal_rows
    rows, shuffled = shuffled_prompts(processor, prompt_inputs, media, perms)
    probe_prompts = encode_visual_once(model, shuffled, list(range(len(rows))), G, lockstep=lockstep)
    seq_rows = torch.tensor([p * G + g for p in rows for g in range(G)], device=device)
    inputs = sequence_inputs(probe_prompts, completion_ids[seq_rows], completion_valid[seq_rows])
    tmp[seq_rows] = probe_logprobs(model, inputs, completion_ids[seq_rows], chunk_rows,
                                   G if shared_prefix else None, bucket_overhead).to(tmp.dtype)
    temporal_rows[seq_rows] = True
    return tmp, temporal_rows
