"""Model inputs: processor calls keep the media's sizes, rows and their visual items stay paired."""

from __future__ import annotations

import copy

import torch

from video_ktr.model.inputs import encode_prompts, keep_visual_items, select_prompts


def _batch(tiny_setup, processor, kinds=("video", "image", "video")):
    samples, picked = tiny_setup.samples(), []
    for kind in kinds:
        picked.append(next(s for s in samples if s.data_type == kind and s not in picked))
    media = [tiny_setup.media(s) for s in picked]
    return picked, media, encode_prompts(processor, [s.messages() for s in picked], media)


def test_processor_does_not_resize_the_media_again(tiny_setup, tiny_model):
    # transformers 5's Qwen2-VL video processor defaults to at least 128x28x28 pixels per frame: a
    # checkpoint with that default would upscale the 56x56 frames (16 tokens -> 128 per frame pair)
    _, processor = tiny_model
    picked, media, plain = _batch(tiny_setup, processor)
    strict = copy.deepcopy(processor)
    strict.video_processor.size = {"shortest_edge": 128 * 28 * 28, "longest_edge": 28 * 28 * 768}
    strict.image_processor.size = {"shortest_edge": 128 * 28 * 28, "longest_edge": 28 * 28 * 768}
    other = encode_prompts(strict, [s.messages() for s in picked], media)
    assert plain["video_grid_thw"].tolist() == [[4, 4, 4], [4, 4, 4]]
    assert plain["image_grid_thw"].tolist() == [[1, 4, 4]]
    for key in ("input_ids", "video_grid_thw", "image_grid_thw", "pixel_values_videos", "pixel_values"):
        assert torch.equal(plain[key], other[key]), key


def test_select_and_keep_visual_items(tiny_setup, tiny_model):
    _, processor = tiny_model
    _, _, inputs = _batch(tiny_setup, processor, ("video", "image", "video", "image"))
    sizes = inputs["video_grid_thw"].prod(-1).tolist()
    videos = torch.split(inputs["pixel_values_videos"], sizes)
    images = torch.split(inputs["pixel_values"], inputs["image_grid_thw"].prod(-1).tolist())
    sel = select_prompts(inputs, [2, 1], 2)
    assert torch.equal(sel["input_ids"], inputs["input_ids"][[2, 2, 1, 1]])
    assert torch.equal(sel["pixel_values_videos"], torch.cat([videos[1], videos[1]]))
    assert torch.equal(sel["pixel_values"], torch.cat([images[0], images[0]]))
    if "second_per_grid_ts" in inputs:  # Qwen2.5-VL's per-video times follow their video
        assert sel["second_per_grid_ts"].tolist() == inputs["second_per_grid_ts"][[1, 1]].tolist()
    kept = keep_visual_items(inputs, [2, 3])
    assert torch.equal(kept["input_ids"], inputs["input_ids"])  # tokens untouched
    assert torch.equal(kept["pixel_values_videos"], videos[1]) and torch.equal(kept["pixel_values"], images[1])
    assert kept["video_grid_thw"].shape[0] == 1 and kept["image_grid_thw"].shape[0] == 1
    none = keep_visual_items(inputs, [])
    assert not {"pixel_values", "pixel_values_videos", "video_grid_thw", "image_grid_thw", "second_per_grid_ts"} & set(none)
