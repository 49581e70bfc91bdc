"""Counterfactual probes: how much each sampled token needs to see, and to see in order.

visual   V[i,t] = log p[i,t] - log p_vis[i,t]: the same sequence with the visual input taken away;
temporal T[i,t] = log p[i,t] - log p_tmp[i,t]: the same video with its sampled frames permuted and
re-encoded (Qwen2.5-VL patches frames in pairs, so a permutation changes the pairs).

Both run without grad and keep only the log-prob of each sampled token.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from video_ktr.model_inputs import VISUAL_KEYS, Media, processor_call
from video_ktr.scoring import sequence_logprobs

VISUAL_PROBES = ("mask", "zero_features", "blank")
TEMPORAL_PROBES = ("shuffle", "reverse", "segments")


def text_only_positions(attention_mask: Tensor) -> Tensor:
    """(3, B, T) M-RoPE positions of the attended tokens as plain text (0, 1, 2, ... per row)."""
    pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return pos.unsqueeze(0).expand(3, -1, -1)


def visual_masked_inputs(inputs: dict[str, Tensor]) -> dict[str, Tensor]:
    """The ``mask`` probe: visual placeholders removed from attention, text kept at its own positions.

    No pixels are passed (the vision tower is not run: its output would be masked out anyway); the
    text after the visual item gets the positions it would have if the placeholders were absent.
    """
    out = {k: v for k, v in inputs.items() if k not in VISUAL_KEYS}
    visual = inputs["mm_token_type_ids"] != 0
    attention = inputs["attention_mask"].masked_fill(visual, 0)
    out["attention_mask"] = attention
    out["mm_token_type_ids"] = torch.zeros_like(inputs["mm_token_type_ids"])
    out["position_ids"] = text_only_positions(attention)
    return out


def zero_feature_inputs(model: torch.nn.Module, inputs: dict[str, Tensor]) -> dict[str, Any]:
    """The ``zero_features`` probe: the placeholders stay, their visual features are all zero."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    cfg = getattr(model, "config", None)
    hidden = getattr(cfg, "text_config", cfg).hidden_size
    merge = getattr(getattr(cfg, "vision_config", None), "spatial_merge_size", 2)
    dtype = next(model.parameters()).dtype
    out: dict[str, Any] = {k: v for k, v in inputs.items() if k not in ("pixel_values", "pixel_values_videos")}
    encoded = {}
    for name, grid_key in (("image", "image_grid_thw"), ("video", "video_grid_thw")):
        if grid_key in inputs:
            sizes = (inputs[grid_key].prod(-1) // merge**2).tolist()
            dev = inputs["input_ids"].device
            feats = tuple(torch.zeros(int(n), hidden, dtype=dtype, device=dev) for n in sizes)
            encoded[name] = BaseModelOutputWithPooling(pooler_output=feats)
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
    for key in ("pixel_values", "pixel_values_videos"):
        if key in enc:
            out[key] = enc[key]
    for grid in ("image_grid_thw", "video_grid_thw"):
        if grid in enc and not torch.equal(enc[grid], inputs[grid]):
            raise RuntimeError(f"re-encoded {grid} {enc[grid].tolist()} differs from the original {inputs[grid].tolist()}")
    return out


@torch.no_grad()
def probe_logprobs(model: torch.nn.Module, inputs: dict[str, Any], completion_ids: Tensor, chunk_rows: int | None) -> Tensor:
    logp, _ = sequence_logprobs(model, inputs, completion_ids, with_entropy=False, chunk_rows=chunk_rows)
    return logp
