"""Shared-prefix scoring: the G completions of a prompt share its prompt, so encode the prompt once.

A no-grad pass over N = P x G sequences of length Lp + Lc costs N (Lp + Lc) token-forwards when run
naively. Here the prompt (with its video) runs once per prompt, its key/value cache is repeated G
times, and only the completions run per row: P Lp + N Lc token-forwards. With Video-R1's long prompt
and a video, Lp is several times Lc, so the probe and reference passes shrink by about that factor.

Positions are those of the full sequence (M-RoPE positions from ``get_rope_index`` on prompt +
completion, or the caller's ``position_ids``), so the result equals the full forward to float
tolerance: tests pin it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from video_ktr.model_inputs import VISUAL_KEYS, select_prompts


def _rope_fn(model: torch.nn.Module):
    from video_ktr.rollout import unwrap

    m = unwrap(model)
    for cand in (m, getattr(m, "model", None), getattr(getattr(m, "base_model", None), "model", None)):
        inner = getattr(cand, "model", None) if cand is not None else None
        for obj in (cand, inner):
            fn = getattr(obj, "get_rope_index", None) if obj is not None else None
            if fn is not None:
                return fn
    return None


def full_positions(model: torch.nn.Module, inputs: dict[str, Any]) -> Tensor:
    """(3, N, L) M-RoPE positions of full sequences, as the model's own forward would compute them."""
    if "position_ids" in inputs:
        return inputs["position_ids"]
    fn = _rope_fn(model)
    has_grid = "image_grid_thw" in inputs or "video_grid_thw" in inputs
    if fn is None or not has_grid:
        pos = (inputs["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
        return pos.unsqueeze(0).expand(3, -1, -1)
    pos, _ = fn(
        inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=inputs.get("image_grid_thw"),
        video_grid_thw=inputs.get("video_grid_thw"), second_per_grid_ts=inputs.get("second_per_grid_ts"),
        attention_mask=inputs["attention_mask"],
    )
    return pos


@torch.no_grad()
def shared_prefix_logprobs(
    model: torch.nn.Module,
    seq_inputs: dict[str, Any],
    completion_ids: Tensor,
    group_size: int,
    *,
    with_entropy: bool = False,
    prompts_per_chunk: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """log p of each completion token (and entropy), computing each prompt's prefix once.

    seq_inputs: forward kwargs of N = P x G prompt+completion rows laid out as consecutive groups of
    ``group_size`` rows sharing one prompt (identical prompt columns and visual input); the last Lc
    columns are ``completion_ids`` (N, Lc). Returns logp (N, Lc) and entropy (N, Lc) or None.
    """
    N, Lc = completion_ids.shape
    G = group_size
    if N % G:
        raise ValueError(f"{N} rows do not split into groups of {G}")
    L = seq_inputs["input_ids"].shape[1]
    Lp = L - Lc
    positions = full_positions(model, seq_inputs)
    P = N // G
    step = P if not prompts_per_chunk else max(1, prompts_per_chunk)
    logps, ents = [], []
    for p0 in range(0, P, step):
        prompts = list(range(p0, min(P, p0 + step)))
        first_rows = [p * G for p in prompts]
        rows = torch.tensor([p * G + g for p in prompts for g in range(G)], device=completion_ids.device)
        prefix = {k: (v[:, :Lp] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v)
                  for k, v in seq_inputs.items() if k != "position_ids"}
        prefix = select_prompts(prefix, first_rows)
        prefix["position_ids"] = positions[:, first_rows, :Lp]
        out = model(**prefix, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        if cache is None:
            # the model refused a cache (gradient checkpointing in training mode turns it off): score
            # the full sequences instead, same numbers
            from video_ktr.scoring import sequence_logprobs

            return sequence_logprobs(model, seq_inputs, completion_ids, with_entropy=with_entropy)
        cache.batch_repeat_interleave(G)
        first_logits = out.logits[:, -1:].float().repeat_interleave(G, dim=0)  # predicts completion token 0
        suffix = {
            "input_ids": completion_ids[rows],
            "attention_mask": seq_inputs["attention_mask"][rows],
            "position_ids": positions[:, rows, Lp:],
            "past_key_values": cache,
        }
        rest = model(**suffix, use_cache=True).logits[:, :-1].float() if Lc > 1 else first_logits[:, :0]
        logits = torch.cat([first_logits, rest], dim=1)
        logsm = torch.log_softmax(logits, dim=-1)
        logps.append(logsm.gather(-1, completion_ids[rows].unsqueeze(-1)).squeeze(-1))
        if with_entropy:
            ents.append(-(logsm.exp() * logsm).sum(-1))
        del out, cache, logits, logsm
    return torch.cat(logps), (torch.cat(ents) if with_entropy else None)


def strip_visual(inputs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in inputs.items() if k not in VISUAL_KEYS}
