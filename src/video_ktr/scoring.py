"""Per-token log-probabilities and entropies of completions, without keeping (B, T, V) logits.

The policy pass needs log p of each sampled token (with grad) and the entropy of the full next-token
distribution (no grad); the probe and reference passes need only log p (no grad). Only the logits of
the completion positions are formed, in chunks of rows, so a no-grad pass holds at most
``chunk_rows x T x V`` logits at once.
"""

from __future__ import annotations

import torch
from torch import Tensor


def completion_mask(completion_ids: Tensor, eos_token_ids: list[int] | tuple[int, ...], pad_token_id: int | None = None) -> Tensor:
    """C[i, t] = 1 up to and including the first end-of-turn token of row i (all tokens if none).

    completion_ids: (B, T) sampled ids (right-padded). Padding after the end token is excluded.
    """
    is_eos = torch.zeros_like(completion_ids, dtype=torch.bool)
    for eid in eos_token_ids:
        is_eos |= completion_ids == eid
    B, T = completion_ids.shape
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1), torch.full((B,), T, device=completion_ids.device))
    idx = torch.arange(T, device=completion_ids.device).expand(B, T)
    return idx <= first.unsqueeze(1)


def sequence_logprobs(
    model: torch.nn.Module,
    inputs: dict[str, Tensor],
    completion_ids: Tensor,
    *,
    with_entropy: bool = False,
    chunk_rows: int | None = None,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor | None]:
    """log p (and entropy) of the completion tokens under ``model`` for prompt+completion ``inputs``.

    inputs: forward kwargs for B rows whose last Lc columns are ``completion_ids`` (B, Lc). Only the
    logits of the Lc predicting positions are formed (``logits_to_keep``), and rows run in chunks of
    ``chunk_rows`` so that a no-grad pass never holds more than ``chunk_rows x Lc x V`` logits.
    Grad flows when the caller has grad enabled.
    """
    from video_ktr.model_inputs import select_prompts

    B, Lc = completion_ids.shape
    step = B if not chunk_rows else max(1, chunk_rows)
    logps, ents = [], []
    for start in range(0, B, step):
        rows = list(range(start, min(B, start + step)))
        sub = inputs if len(rows) == B else select_prompts(inputs, rows)
        logits = model(**sub, logits_to_keep=Lc + 1, use_cache=False).logits[:, :-1]
        logits = logits.float()
        if temperature != 1.0:
            logits = logits / temperature
        logsm = torch.log_softmax(logits, dim=-1)
        logps.append(logsm.gather(-1, completion_ids[rows].unsqueeze(-1)).squeeze(-1))
        if with_entropy:
            with torch.no_grad():
                ents.append(-(logsm.exp() * logsm).sum(-1))
        del logits, logsm
    return torch.cat(logps), (torch.cat(ents) if with_entropy else None)
