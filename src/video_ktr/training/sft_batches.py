"""SFT batches: the target text, prompt + target inputs with labels, and the token cross-entropy.

How a batch is built (:func:`build_sft_batch`): the prompts go through the processor with their
decoded frames (left padding, exactly as for a GRPO rollout), the target of each row is tokenized on
its own, the end-of-turn id (read from the tokenizer) is appended, and the targets are appended as
right-padded columns. So the prompt/target boundary is exact by construction (no search for
``<|im_start|>assistant``, no re-tokenisation of a joined string that could merge tokens across the
boundary) and the model is trained on the very token layout it sees when it generates. Labels are
-100 on every prompt column (system, user text, vision markers, visual placeholders) and on padding.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from video_ktr.data.rows import Sample
from video_ktr.model.inputs import Media, processor_call, sequence_inputs

IGNORE_INDEX = -100


def sft_target(sample: Sample, separator: str = "") -> str:
    """The assistant text the model learns: ``process + separator + solution`` (end token added separately)."""
    if not (sample.process or "").strip():
        raise ValueError(f"{sample.source}: SFT rows need 'process' (<think>...</think>)")
    return sample.process + separator + sample.solution


def end_of_turn_id(tokenizer: Any) -> int:
    """The id of the end-of-turn token (<|im_end|> for Qwen chat models), read from the tokenizer."""
    ids = tokenizer.convert_tokens_to_ids("<|im_end|>")
    unk = getattr(tokenizer, "unk_token_id", None)
    if isinstance(ids, int) and ids >= 0 and ids != unk:
        return ids
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has neither <|im_end|> nor an eos token: cannot end the SFT targets")
    return int(tokenizer.eos_token_id)


def build_sft_batch(
    processor: Any, samples: list[Sample], media: list[Media], *, layout: str = "train",
    system_prompt: str | None = None, separator: str = "", end_id: int | None = None,
) -> tuple[dict[str, Tensor], Tensor]:
    """Forward inputs and labels for SFT rows (see the module docstring).

    Returns ``(inputs, labels)``: ``inputs`` holds every processor output (input_ids, attention_mask,
    mm_token_type_ids, pixel tensors, grids, second_per_grid_ts) for prompt + target; ``labels`` has
    the shape of ``input_ids``, equal to it on the target tokens (end-of-turn included) and -100 on
    prompt, visual and padding positions. The targets occupy the last ``Lt`` columns.
    """
    tok = processor.tokenizer
    end_id = end_of_turn_id(tok) if end_id is None else end_id
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else end_id
    texts = [processor.apply_chat_template(s.messages(layout, system_prompt), add_generation_prompt=True, tokenize=False)
             for s in samples]
    prompt = processor_call(processor, texts, media, padding_side="left")
    targets = [tok(sft_target(s, separator), add_special_tokens=False)["input_ids"] + [end_id] for s in samples]
    Lt = max(len(t) for t in targets)
    ids = torch.full((len(samples), Lt), pad_id, dtype=prompt["input_ids"].dtype)
    valid = torch.zeros((len(samples), Lt), dtype=torch.bool)
    for i, t in enumerate(targets):
        ids[i, : len(t)] = torch.tensor(t, dtype=ids.dtype)
        valid[i, : len(t)] = True
    inputs = sequence_inputs(prompt, ids, valid)
    labels = torch.full_like(inputs["input_ids"], IGNORE_INDEX)
    labels[:, -Lt:] = ids.masked_fill(~valid, IGNORE_INDEX)
    return inputs, labels


def token_ce(model: torch.nn.Module, inputs: dict[str, Tensor], labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token cross-entropy of the target columns: ``(ce, tail_labels)``, both (B, Lt); ce is 0 off the labels.

    The label tokens sit in the last columns (:func:`build_sft_batch`), so only the logits of those
    columns are formed: ``logits_to_keep`` = target width + 1, the last one dropped.
    """
    supervised = (labels != IGNORE_INDEX).any(0).nonzero()
    if supervised.numel() == 0:
        empty = labels[:, :0]
        return torch.zeros(empty.shape, device=labels.device), empty
    tail = labels[:, int(supervised.min()):]
    B, Lt = tail.shape
    logits = model(**inputs, logits_to_keep=Lt + 1, use_cache=False).logits[:, :-1].float()
    ce = F.cross_entropy(logits.reshape(B * Lt, -1), tail.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
    return ce.view(B, Lt), tail


def token_ce_sum(model: torch.nn.Module, inputs: dict[str, Tensor], labels: Tensor) -> tuple[Tensor, int]:
    """Sum of the token cross-entropies over the label tokens, and their number."""
    ce, tail = token_ce(model, inputs, labels)
    return ce.sum(), int((tail != IGNORE_INDEX).sum())


def answer_token_mask(tokenizer: Any, samples: list[Sample], separator: str, width: int) -> Tensor:
    """(B, width) bool: the target tokens that overlap the text inside <answer>...</answer>.

    Tokenizes each target exactly as :func:`build_sft_batch` does, with character offsets.
    """
    mask = torch.zeros((len(samples), width), dtype=torch.bool)
    for i, s in enumerate(samples):
        target = sft_target(s, separator)
        base = len(target) - len(s.solution)
        lo = s.solution.find("<answer>") + len("<answer>")
        hi = s.solution.find("</answer>", lo)
        start, end = base + lo, base + hi
        enc = tokenizer(target, add_special_tokens=False, return_offsets_mapping=True)
        for t, (a, b) in enumerate(enc["offset_mapping"][:width]):
            if a < end and b > start:
                mask[i, t] = True
    return mask
