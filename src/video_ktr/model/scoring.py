"""Per-token log-probabilities and entropies of completions, without keeping (B, T, V) logits.

The policy pass needs log p of each sampled token (with grad) and the entropy of the full next-token
distribution (no grad); the probe and reference passes need only log p (no grad). Only the logits of
the completion positions are formed, in chunks of rows, so a no-grad pass holds at most
``chunk_rows x T x V`` logits at once.
"""

from __future__ import annotations

import torch
from torch import Tensor

from video_ktr.model.inputs import select_prompts

# What one more forward call costs, in completion-token forwards: the padded work (rows x width) a
# width bucket must save to be run apart. A round figure, not tuned per machine: it keeps the buckets
# few (3 for 64 rows with lengths spread evenly over 20-96) so that the fixed cost of a call never dominates.
BUCKET_OVERHEAD_TOKENS = 256
# float32 elements of one log-softmax chunk in a no-grad pass (64 Mi elements, 256 MiB): at a real
# vocabulary (151,936) that is about 440 positions per chunk, instead of float32 copies of all B x T x V
LOGPROB_CHUNK_ELEMENTS = 1 << 26


def token_logprobs(logits: Tensor, ids: Tensor, *, with_entropy: bool = False, temperature: float = 1.0,
                   chunk_elements: int = LOGPROB_CHUNK_ELEMENTS) -> tuple[Tensor, Tensor | None]:
    """log p of ``ids`` (R, T) under ``logits`` (R, T, V) / ``temperature``, and each distribution's entropy (R, T).

    log p = log_softmax(z)[id], H = -sum_v p_v log p_v, with z the float32 logits over the temperature.
    The float32 copy and the log-softmax are formed for a few positions at a time (``chunk_elements``
    float32 values, all rows of a position range together), never for all R x T x V at once: on a 152k
    vocabulary a pass over 16 x 256 positions held three or four 2.5 GB float32 tensors at the end. The
    log-softmax of each position is the same computation either way, so the numbers are the same bit for
    bit (tests). With grad (the policy pass) the backward forms the log-softmax of each chunk again from
    the logits and applies the log-softmax's own backward kernel to it: the same gradient bit for bit,
    with the logits (which the caller holds anyway) as the only tensor kept for it, instead of the float32
    log-softmax, its scattered gradient and the float32 gradient of the logits (12 bytes x R x T x V).
    That costs one more log-softmax pass in the backward; where everything fits in one chunk, autograd keeps
    the log-softmax instead (no second pass). The entropy never takes a gradient.
    """
    R, T, V = logits.shape
    step = max(1, chunk_elements // max(1, R * V))
    if logits.requires_grad and torch.is_grad_enabled():
        if R * T * V <= chunk_elements:  # one chunk: autograd keeps its log-softmax, no second pass in the backward
            logsm = _chunk_log_softmax(logits, 0, T, temperature)
            logp = logsm.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
            with torch.no_grad():
                return logp, (-(logsm.exp() * logsm).sum(-1) if with_entropy else None)
        logp, entropy = _ChunkedTokenLogprobs.apply(logits, ids, float(temperature), step, with_entropy)
        return logp, (entropy if with_entropy else None)
    with torch.no_grad():
        logp, entropy = _chunked_forward(logits, ids, temperature, step, with_entropy)
    return logp, (entropy if with_entropy else None)


def _chunk_log_softmax(logits: Tensor, a: int, b: int, temperature: float) -> Tensor:
    z = logits[:, a:b].float()
    if temperature != 1.0:
        z = z / temperature
    return torch.log_softmax(z, dim=-1)


def _chunked_forward(logits: Tensor, ids: Tensor, temperature: float, step: int,
                     with_entropy: bool) -> tuple[Tensor, Tensor]:
    R, T, _ = logits.shape
    logps, ents = [], []
    for a in range(0, T, step):
        logsm = _chunk_log_softmax(logits, a, a + step, temperature)
        logps.append(logsm.gather(-1, ids[:, a:a + step].unsqueeze(-1)).squeeze(-1))
        if with_entropy:
            ents.append(-(logsm.exp() * logsm).sum(-1))
        del logsm
    empty = logits.new_zeros((R, 0), dtype=torch.float32)
    return (torch.cat(logps, 1) if logps else empty), (torch.cat(ents, 1) if ents else empty)


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """log p at the sampled ids (and the entropy, no grad) with the log-softmax formed a chunk at a time in the
    forward and again in the backward (see token_logprobs)."""

    @staticmethod
    def forward(ctx, logits: Tensor, ids: Tensor, temperature: float, step: int, with_entropy: bool):
        logp, entropy = _chunked_forward(logits, ids, temperature, step, with_entropy)
        ctx.save_for_backward(logits, ids)
        ctx.temperature, ctx.step = temperature, step
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp: Tensor, _grad_entropy: Tensor | None):
        logits, ids = ctx.saved_tensors
        temperature, step = ctx.temperature, ctx.step
        grad = torch.empty_like(logits)
        for a in range(0, logits.shape[1], step):
            logsm = _chunk_log_softmax(logits, a, a + step, temperature)
            # what autograd does for log_softmax(z).gather(ids) -> z / temperature -> z.float(), chunk by chunk
            scattered = torch.zeros_like(logsm).scatter_(-1, ids[:, a:a + step].unsqueeze(-1),
                                                          grad_logp[:, a:a + step].unsqueeze(-1))
            g = torch.ops.aten._log_softmax_backward_data(scattered, logsm, -1, torch.float32)
            if temperature != 1.0:
                g = g / temperature
            grad[:, a:a + step] = g.to(logits.dtype)
            del logsm, scattered, g
        return grad, None, None, None, None


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


def completion_widths(attention_mask: Tensor, Lc: int) -> Tensor:
    """Per row, the columns up to and including its last attended completion token (0: none)."""
    att = attention_mask[:, attention_mask.shape[1] - Lc:].bool()
    return torch.where(att.any(1), Lc - att.flip(1).int().argmax(1), torch.zeros_like(att[:, 0], dtype=torch.long))


def _truncate(inputs: dict[str, Tensor], length: int) -> dict[str, Tensor]:
    """The first ``length`` columns of the per-token tensors (visual tensors untouched)."""
    out = dict(inputs)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        if key in out:
            out[key] = out[key][:, :length]
    if "position_ids" in out:
        out["position_ids"] = out["position_ids"][..., :length]
    return out


def width_buckets(widths: list[int], overhead: int = BUCKET_OVERHEAD_TOKENS) -> list[tuple[int, int]]:
    """Split rows sorted by width (ascending) into runs [start, stop) that minimise the padded work.

    A run costs its rows x its widest row (token-forwards, padding included) plus ``overhead`` for
    the extra forward call; dynamic programming over the cut points gives the cheapest split
    (one run when the widths are alike or ``overhead`` is large).
    """
    n = len(widths)
    if any(a > b for a, b in zip(widths, widths[1:])):
        raise ValueError("width_buckets needs the widths sorted in ascending order")
    if n == 0:
        return []
    best = [0.0] + [float("inf")] * n  # best[j]: cheapest split of the first j rows
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):
            cost = best[i] + (j - i) * widths[j - 1] + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    runs, j = [], n
    while j > 0:
        runs.append((cut[j], j))
        j = cut[j]
    return runs[::-1]


def bucket_rows(rows: Tensor, widths: Tensor, overhead: int | None) -> list[tuple[Tensor, int]]:
    """``rows`` (indices into ``widths``) in buckets of similar width: (bucket's rows, its widest row).

    The rows are sorted by width and cut where ``width_buckets`` says; ``overhead`` None: one bucket.
    """
    rows = rows[torch.argsort(widths[rows], stable=True)]
    sorted_widths = widths[rows].tolist()
    runs = width_buckets(sorted_widths, overhead) if overhead is not None else [(0, len(sorted_widths))]
    return [(rows[a:b], sorted_widths[b - 1]) for a, b in runs if b > a]


def sequence_logprobs(
    model: torch.nn.Module,
    inputs: dict[str, Tensor],
    completion_ids: Tensor,
    *,
    with_entropy: bool = False,
    chunk_rows: int | None = None,
    temperature: float = 1.0,
    bucket_overhead: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """log p (and entropy) of the completion tokens under ``model`` for prompt+completion ``inputs``.

    inputs: forward kwargs for B rows whose last Lc columns are ``completion_ids`` (B, Lc). Only the
    logits of the Lc predicting positions are formed (``logits_to_keep``), and rows run in chunks of
    ``chunk_rows`` so that a no-grad pass never holds more than ``chunk_rows x Lc x V`` logits.
    Grad flows when the caller has grad enabled.

    With ``bucket_overhead`` (the cost of one more forward call in token-forwards) the rows run in
    buckets of similar completion width (``width_buckets``), each cut after its longest row's
    last attended token, instead of every row padded to Lc; values after its bucket's width are then 0
    (after the row's last attended token: no caller reads them). Equal to the unbucketed pass to float
    tolerance at the attended tokens.
    """

    B, Lc = completion_ids.shape
    L = inputs["input_ids"].shape[1]
    if bucket_overhead is None or B == 0:
        groups = [(list(range(B)), Lc)]
    else:
        widths = completion_widths(inputs["attention_mask"], Lc)
        groups = [(rows.tolist(), max(1, width))
                  for rows, width in bucket_rows(torch.arange(B, device=widths.device), widths, bucket_overhead)]
    logps, ents, done = [], [], []
    for group, width in groups:
        step = len(group) if not chunk_rows else max(1, chunk_rows)
        for start in range(0, len(group), step):
            rows = group[start:start + step]
            sub = inputs if rows == list(range(B)) else select_prompts(inputs, rows)
            if width < Lc:
                sub = _truncate(sub, L - Lc + width)
            logits = model(**sub, logits_to_keep=width + 1, use_cache=False).logits[:, :-1]
            logp, ent = token_logprobs(logits, completion_ids[rows, :width], with_entropy=with_entropy,
                                       temperature=temperature)
            logps.append(torch.nn.functional.pad(logp, (0, Lc - width)))
            if with_entropy:
                ents.append(torch.nn.functional.pad(ent, (0, Lc - width)))
            done += rows
            del logits
    logp, entropy = torch.cat(logps), (torch.cat(ents) if with_entropy else None)
    if done != list(range(B)):
        back = torch.argsort(torch.tensor(done, device=logp.device))  # the inverse of the bucket order
        logp = logp[back]
        entropy = entropy[back] if entropy is not None else None
    return logp, entropy
