"""Model inputs for prompts and prompt+completion sequences (video and image rows mixed).

The processor turns chat messages plus decoded frames into ``input_ids``, ``attention_mask``,
``mm_token_type_ids`` (always passed on: without it M-RoPE is silently skipped), pixel tensors and
grids. Prompts are left-padded, so the completions of all rows start at the same column.
Each sample carries exactly one visual item; its pixel rows are found by its grid size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from video_ktr.model.adapters import PIXEL_KEYS, VISUAL_KEYS, select_encoder_items, video_size  # noqa: F401  (the names callers import from here)


@dataclass
class Media:
    """The decoded visual item of one sample: ``video`` (a media.Video) or ``image`` (a PIL image)."""

    video: Any = None
    image: Any = None

    @property
    def kind(self) -> str:
        return "video" if self.video is not None else ("image" if self.image is not None else "text")


def video_processor_inputs(video: Any) -> tuple[Any, dict[str, Any]]:
    """Frames (T, H, W, 3) uint8 numpy and their sampling metadata for the processor."""
    frames = video.frames.permute(0, 2, 3, 1).contiguous().numpy()
    return frames, video.metadata()


def _metadata(md: dict[str, Any]):
    from transformers.video_utils import VideoMetadata

    return VideoMetadata(
        total_num_frames=int(md["total_num_frames"]), fps=float(md["fps"]), frames_indices=list(md["frames_indices"]),
        duration=float(md.get("duration") or 0.0) or None, width=md.get("width"), height=md.get("height"),
    )


def processor_call(processor: Any, texts: list[str], media: list[Media], *, padding_side: str = "left") -> dict[str, Tensor]:
    """Run the processor on texts and their media (in order), returning tensors."""
    images = [m.image for m in media if m.kind == "image"]
    videos, metas = [], []
    for m in media:
        if m.kind == "video":
            frames, md = video_processor_inputs(m.video)
            videos.append(frames)
            metas.append(_metadata(md))
    kwargs: dict[str, Any] = {"text": texts, "return_tensors": "pt", "padding": True, "padding_side": padding_side}
    # The frames and images were already resized by video_ktr.data.media (sides multiples of 28, area within
    # the run's pixel settings): the processor must not resize them again. Its own bounds come from the
    # checkpoint (transformers 5's Qwen2-VL video default is 128x28x28 pixels at least per frame, which
    # would upscale smaller frames and change the grid), so pass bounds that hold exactly these sizes.
    if images:
        kwargs["images"] = images
        areas = [im.size[0] * im.size[1] for im in images]
        kwargs["images_kwargs"] = {"size": {"shortest_edge": min(areas), "longest_edge": max(areas)}}
    if videos:
        kwargs["videos"] = videos
        kwargs["video_metadata"] = metas
        shapes = [(int(v.shape[0]), int(v.shape[1]), int(v.shape[2])) for v in videos]
        kwargs["videos_kwargs"] = {"do_sample_frames": False, "cap_pixels_per_frame": False,
                                   "size": video_size(processor, shapes)}
    out = processor(**kwargs)
    result = {k: v for k, v in out.items() if isinstance(v, Tensor)}
    if "second_per_grid_ts" in out and not isinstance(out["second_per_grid_ts"], Tensor):
        result["second_per_grid_ts"] = torch.tensor(out["second_per_grid_ts"], dtype=torch.float)
    if "mm_token_type_ids" not in result:
        raise RuntimeError(
            "the processor returned no mm_token_type_ids: without them Qwen-VL skips M-RoPE silently. "
            "Use a transformers version whose Qwen-VL processor returns them (>= 5.0)."
        )
    return result


def encode_prompts(processor: Any, messages: list[list[dict]], media: list[Media], *, max_prompt_length: int | None = None,
                   source: list[str] | None = None) -> dict[str, Tensor]:
    """Chat template + processor for a batch of prompts (left-padded)."""
    texts = [processor.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in messages]
    inputs = processor_call(processor, texts, media)
    if max_prompt_length is not None:
        lengths = inputs["attention_mask"].sum(1)
        too_long = (lengths > max_prompt_length).nonzero().flatten().tolist()
        if too_long:
            where = ", ".join((source[i] if source else f"prompt {i}") + f" ({int(lengths[i])} tokens)" for i in too_long)
            raise ValueError(
                f"prompt longer than --max_prompt_length {max_prompt_length}: {where}. Visual tokens cannot be "
                "truncated away: lower the frame count or pixels, or raise --max_prompt_length."
            )
    return inputs


def _split_rows(pixels: Tensor, grid: Tensor) -> list[Tensor]:
    sizes = grid.prod(-1).tolist()
    return list(torch.split(pixels, [int(s) for s in sizes]))


_MODALITIES = (
    # (mm_token_type_id, mm_encoder_outputs key, pixel key, grid key, per-item extra key)
    (1, "image", "pixel_values", "image_grid_thw", None),
    (2, "video", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts"),
)


def items_of_rows(mm_token_type_ids: Tensor, type_id: int) -> dict[int, int]:
    """{row: index of its visual item of modality ``type_id``} (items are counted in row order)."""
    item_of_row, k = {}, 0
    for r, f in enumerate((mm_token_type_ids == type_id).any(1).tolist()):
        if f:
            item_of_row[r] = k
            k += 1
    return item_of_row


def _take_items(inputs: dict[str, Any], items_per_modality: dict[str, list[int]], out: dict[str, Any]) -> dict[str, Any]:
    """Copy into ``out`` the visual tensors of the listed items (in that order), per modality."""
    encoded_in = inputs.get("mm_encoder_outputs") or {}
    encoded_out = {}
    for _, name, pix_key, grid_key, extra in _MODALITIES:
        if grid_key not in inputs:
            continue
        items = items_per_modality.get(name) or []
        if not items:
            continue
        if pix_key in inputs:
            chunks = _split_rows(inputs[pix_key], inputs[grid_key])
            out[pix_key] = torch.cat([chunks[i] for i in items])
        if name in encoded_in:
            encoded_out[name] = select_encoder_items(encoded_in[name], items)
        out[grid_key] = inputs[grid_key][items]
        if extra and extra in inputs:
            out[extra] = inputs[extra][items]
    if "mm_encoder_outputs" in inputs:
        out["mm_encoder_outputs"] = encoded_out
    return out


def select_prompts(inputs: dict[str, Any], rows: list[int], repeats: int = 1) -> dict[str, Any]:
    """Inputs for the given rows, each repeated ``repeats`` times (visual tensors follow).

    Rows keep their order; a row's visual item is located by counting the rows before it that hold
    an item of the same modality. Precomputed ``mm_encoder_outputs`` are selected the same way.
    """
    mm = inputs["mm_token_type_ids"]
    out: dict[str, Any] = {}
    index = torch.tensor(rows, dtype=torch.long, device=mm.device).repeat_interleave(repeats)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        out[key] = inputs[key][index]
    if "position_ids" in inputs:
        out["position_ids"] = inputs["position_ids"][:, index]
    items = {}
    for type_id, name, _, grid_key, _ in _MODALITIES:
        if grid_key in inputs:
            item_of_row = items_of_rows(mm, type_id)
            items[name] = [item_of_row[r] for r in rows for _ in range(repeats) if r in item_of_row]
    return _take_items(inputs, items, out)


def keep_visual_items(inputs: dict[str, Any], keep_rows: list[int] | set[int]) -> dict[str, Any]:
    """All rows of ``inputs``, but the visual tensors (pixels, grids, times, precomputed features)
    hold only the items of ``keep_rows``. The token tensors are unchanged: the caller takes the other
    rows' placeholders away (see probes.visual_masked_inputs), or the model's grid bookkeeping breaks.
    """
    keep = set(keep_rows)
    mm = inputs["mm_token_type_ids"]
    out = {k: v for k, v in inputs.items() if k not in VISUAL_KEYS and k != "mm_encoder_outputs"}
    items = {}
    for type_id, name, _, grid_key, _ in _MODALITIES:
        if grid_key in inputs:
            item_of_row = items_of_rows(mm, type_id)
            items[name] = [i for r, i in sorted(item_of_row.items()) if r in keep]
    if "mm_encoder_outputs" in inputs:
        out["mm_encoder_outputs"] = {}
    return _take_items(inputs, items, out)


def sequence_inputs(prompt_inputs: dict[str, Tensor], completion_ids: Tensor, completion_attention: Tensor) -> dict[str, Tensor]:
    """Prompt (already expanded to one row per completion) + completion as one forward batch."""
    out = dict(prompt_inputs)
    out["input_ids"] = torch.cat([prompt_inputs["input_ids"], completion_ids], dim=1)
    out["attention_mask"] = torch.cat([prompt_inputs["attention_mask"], completion_attention.to(prompt_inputs["attention_mask"].dtype)], dim=1)
    out["mm_token_type_ids"] = torch.cat(
        [prompt_inputs["mm_token_type_ids"], torch.zeros_like(completion_ids, dtype=prompt_inputs["mm_token_type_ids"].dtype)], dim=1
    )
    return out


def to_device(inputs: dict[str, Tensor], device: torch.device | str, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    out = {}
    for k, v in inputs.items():
        v = v.to(device)
        if dtype is not None and k in PIXEL_KEYS:
            v = v.to(dtype)
        out[k] = v
    return out
