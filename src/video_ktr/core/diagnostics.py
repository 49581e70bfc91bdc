"""Training diagnostics of key-token reinforcement, measured on the trainer's own tensors.

Three kinds, all pure functions on tensors (the trainer only collects the inputs):

1. Gradient decomposition (the paper's "key vs masked gradient" figure). With the trainer's loss
   L(S) = grpo_loss(logp, A, mask=S, valid=C, ...) restricted to a token set S:

       g_key    = d L(M & C)  / d theta        the key tokens (what training applies)
       g_masked = d L(C & ~M) / d theta        the non-key valid tokens, as if they were selected
       g_full   = d L(C)      / d theta        every valid token (vanilla GRPO)

   reported as ||g_key||, ||g_masked||, ||g_full|| and cos(g_key, g_full), cos(g_masked, g_full),
   per parameter group (the last decoder layer; the LM head) and over the groups together. Each set
   uses the trainer's normalisation (normalize_by "mask": 1/|S_i| per row), so g_key shows the
   amplification the paper describes. A cosine with a zero vector is undefined and reported as 0.

2. Selection statistics: Jaccard overlaps |A & B| / |A | B| of the signals' token sets and the mean
   relative position t / (n_i - 1) of the tokens in each set (0 = first token, 1 = last).

3. Token records: each completion token by token (text, scores, which sets selected it) for
   tokens.jsonl and the report.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from video_ktr.core.loss import PAPER_LOSS, LossSpec, grpo_loss

TOKEN_SETS = ("key", "masked", "full")
SIGNAL_NAMES = ("entropy", "visual", "temporal")
ROUND = 4  # decimals of the floats in tokens.jsonl

# ---------------------------------------------------------------------------- gradient decomposition


@dataclass
class LinearUses:
    """The calls y = x W^T of one bias-free linear layer (inputs x (..., d_in), outputs y (..., d_out)).

    Its gradient is that of W *as used by these calls*: dL/dW = sum_calls dL/dy^T x (leading dims
    flattened). Used for the LM head: with tied embeddings (Qwen2.5-VL-3B, the tiny test model) the
    head's matrix is also the input embedding, and differentiating the parameter itself would add the
    input-embedding path (a backward pass through the whole network) to the head's gradient.
    """

    calls: list[tuple[Tensor, Tensor]] = field(default_factory=list)


GradTarget = Tensor | LinearUses


def token_set_losses(logp: Tensor, advantages: Tensor, key_mask: Tensor, valid: Tensor, spec: LossSpec = PAPER_LOSS, *,
                     ref_logp: Tensor | None = None, old_logp: Tensor | None = None) -> dict[str, Tensor]:
    """The trainer's loss restricted to the key, masked (valid non-key) and full (valid) token sets.

    logp: (B, T) with grad; advantages: (B,); key_mask, valid: (B, T) bool; spec, ref_logp, old_logp:
    as grpo_loss. With kl_on="valid" the KL term covers every valid token in all three losses, as in
    training.
    """
    sets = {"key": key_mask & valid, "masked": valid & ~key_mask, "full": valid}
    return {name: grpo_loss(logp, advantages, mask, spec, ref_logp=ref_logp, old_logp=old_logp, valid=valid)
            for name, mask in sets.items()}


def _target_tensors(groups: Mapping[str, Sequence[GradTarget]]) -> list[Tensor]:
    """The tensors autograd differentiates against: parameters as given, a LinearUses' outputs."""
    out = []
    for targets in groups.values():
        for t in targets:
            if isinstance(t, LinearUses):
                out.extend(y for _, y in t.calls)
            else:
                out.append(t)
    return out


def _linear_weight_grad(uses: LinearUses, output_grads: Sequence[Tensor], chunk: int = 4096) -> Tensor:
    """dL/dW = sum over calls of dY^T X, in float32 at least (float64 stays float64), over rows in chunks
    (so half-precision dY is never copied to float32 whole)."""
    grad = None
    for (x, _), dy in zip(uses.calls, output_grads):
        x2 = x.detach().reshape(-1, x.shape[-1])
        if grad is None:
            dtype = torch.promote_types(x2.dtype, torch.float32)
            grad = torch.zeros(_out_features(uses), x2.shape[1], dtype=dtype, device=x2.device)
        dy2 = dy.reshape(-1, dy.shape[-1])
        for s in range(0, x2.shape[0], chunk):
            grad.addmm_(dy2[s:s + chunk].to(grad.dtype).T, x2[s:s + chunk].to(grad.dtype))
    if grad is None:
        raise ValueError("LinearUses has no recorded call")
    return grad


def _out_features(uses: LinearUses) -> int:
    return uses.calls[0][1].shape[-1]


def _group_gradients(loss: Tensor, groups: Mapping[str, Sequence[GradTarget]]) -> dict[str, list[Tensor]]:
    """Per group, the gradient of `loss` for each target (every target must be in the loss's graph).

    One torch.autograd.grad call for all groups, retain_graph=True: nothing is accumulated into
    .grad, and the graph stays usable for the training backward that follows.
    """
    tensors = _target_tensors(groups)
    grads = torch.autograd.grad(loss, tensors, retain_graph=True, allow_unused=True)
    unused = [i for i, g in enumerate(grads) if g is None]
    if unused:
        # a parameter the loss never reaches: not a zero gradient but a wrong target (e.g. a sharded
        # FSDP / ZeRO-3 parameter whose forward used a gathered copy); a zero would be reported silently
        raise ValueError(f"{len(unused)} of the {len(tensors)} tensors of the gradient diagnostics are not used by the "
                         "loss's graph: pass the tensors the forward pass used")
    out: dict[str, list[Tensor]] = {}
    k = 0
    for name, targets in groups.items():
        out[name] = []
        for t in targets:
            if isinstance(t, LinearUses):
                n = len(t.calls)
                out[name].append(_linear_weight_grad(t, grads[k:k + n]))
                k += n
            else:
                out[name].append(grads[k])
                k += 1
    return out


def _dot(a: Tensor, b: Tensor, chunk: int = 1 << 22) -> float:
    """sum(a * b) in float64, over flat chunks (a float64 copy of one chunk at a time)."""
    a, b = a.detach().reshape(-1), b.detach().reshape(-1)
    total = 0.0
    for s in range(0, a.numel(), chunk):
        total += float(torch.dot(a[s:s + chunk].double(), b[s:s + chunk].double()))
    return total


def _cosine(dot: float, sq_a: float, sq_b: float) -> float:
    if sq_a <= 0 or sq_b <= 0:
        return 0.0
    return max(-1.0, min(1.0, dot / math.sqrt(sq_a * sq_b)))


def gradient_decomposition(
    logp: Tensor,
    advantages: Tensor,
    key_mask: Tensor,
    valid: Tensor,
    groups: Mapping[str, Sequence[GradTarget]],
    spec: LossSpec = PAPER_LOSS,
    *,
    ref_logp: Tensor | None = None,
    old_logp: Tensor | None = None,
) -> dict[str, float]:
    """Norms and cosines of the key-, masked- and full-token loss gradients (module docstring, 1).

    logp: (B, T) policy log-probs with their graph; advantages: (B,); key_mask, valid: (B, T) bool;
    groups: name -> parameters (leaf tensors) and/or LinearUses. spec, ref_logp, old_logp: as grpo_loss.

    Returns, for each group g and for all groups together (no suffix):
        grad_norm_{key,masked,full}_{g},  cos_key_full_{g},  cos_masked_full_{g}
    Three backward passes from logp down to the groups' tensors (autograd visits only what leads to
    them); at most two gradients (g_full and one other) are alive at once.
    """
    if not groups:
        raise ValueError("gradient_decomposition needs at least one parameter group")
    losses = token_set_losses(logp, advantages, key_mask, valid, spec, ref_logp=ref_logp, old_logp=old_logp)
    full = _group_gradients(losses["full"], groups)
    sq = {("full", g): sum(_dot(x, x) for x in full[g]) for g in groups}
    dots: dict[tuple[str, str], float] = {}
    for name in ("key", "masked"):
        grads = _group_gradients(losses[name], groups)
        for g in groups:
            sq[(name, g)] = sum(_dot(x, x) for x in grads[g])
            dots[(name, g)] = sum(_dot(x, y) for x, y in zip(grads[g], full[g]))
        del grads
    out: dict[str, float] = {}
    for suffix, names in [*((f"_{g}", [g]) for g in groups), ("", list(groups))]:
        for s in TOKEN_SETS:
            out[f"grad_norm_{s}{suffix}"] = math.sqrt(sum(sq[(s, g)] for g in names))
        for s in ("key", "masked"):
            out[f"cos_{s}_full{suffix}"] = _cosine(sum(dots[(s, g)] for g in names), sum(sq[(s, g)] for g in names),
                                                   sum(sq[("full", g)] for g in names))
    return out


# ---------------------------------------------------------------------------- where to measure


def last_decoder_layer(model: torch.nn.Module) -> torch.nn.Module | None:
    """The last block of the language model's decoder (``...language_model.layers[-1]``), or None.

    Prefers a ModuleList named ``language_model.layers``; else the last ``*layers`` list outside the
    vision tower (``visual``). Works under PEFT wrappers (the names gain a prefix).
    """
    found = None
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or not name.endswith("layers") or len(module) == 0:
            continue
        if "visual" in name.split("."):
            continue
        if name.endswith("language_model.layers"):
            return module[-1]
        found = module[-1]
    return found


def output_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The bias-free linear LM head (``get_output_embeddings()``), or None if there is no such layer."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if isinstance(head, torch.nn.Linear) and head.bias is None:
        return head
    return None


@contextlib.contextmanager
def record_linear_calls(layer: torch.nn.Linear | None) -> Iterator[LinearUses]:
    """Record the (input, output) of every call of `layer` inside the block (nothing if layer is None).

    The recorded tensors keep their graph: the head's logits stay alive until the LinearUses is dropped.
    """
    uses = LinearUses()
    if layer is None:
        yield uses
        return
    handle = layer.register_forward_hook(lambda module, args, output: uses.calls.append((args[0], output)))
    try:
        yield uses
    finally:
        handle.remove()


# ---------------------------------------------------------------------------- selection statistics


def overlap_pairs(names: Sequence[str]) -> list[tuple[str, str]]:
    """Pairs of signals in the canonical order (entropy, visual, temporal)."""
    ordered = [s for s in SIGNAL_NAMES if s in names]
    return [(a, b) for i, a in enumerate(ordered) for b in ordered[i + 1:]]


def overlap_counts(masks: Mapping[str, Tensor], valid: Tensor, temporal_rows: Tensor | None = None) -> dict[str, tuple[int, int]]:
    """``jaccard_{a}_{b}`` -> (|A & B|, |A | B|) over valid tokens, for each pair of signal masks.

    A pair with the temporal signal is counted on the rows that have a temporal probe (videos) only:
    image rows have no temporal set, so their tokens would count against the overlap by construction.
    masks: name -> (B, T) bool (other names than the signals are ignored); temporal_rows: (B,) bool.
    Jaccard = |A & B| / |A | B| (0 when both are empty, as selection.jaccard).
    """
    out = {}
    for a, b in overlap_pairs(list(masks)):
        pool = valid
        if "temporal" in (a, b) and temporal_rows is not None:
            pool = valid & temporal_rows[:, None]
        ma, mb = masks[a] & pool, masks[b] & pool
        out[f"jaccard_{a}_{b}"] = (int((ma & mb).sum()), int((ma | mb).sum()))
    return out


def relative_positions(valid: Tensor) -> Tensor:
    """p[i, t] = t / (n_i - 1) for the n_i valid tokens of row i (0 for a one-token row), (B, T) float.

    valid is a prefix mask (tokens up to the end-of-turn token); positions past it are meaningless.
    """
    n = valid.sum(1, keepdim=True).clamp(min=2) - 1
    t = torch.arange(valid.shape[1], device=valid.device).expand_as(valid)
    return t.double() / n.double()


def position_sums(masks: Mapping[str, Tensor], valid: Tensor) -> dict[str, tuple[float, int]]:
    """``position_{name}`` -> (sum of relative positions, token count) of each set's valid tokens.

    Adds ``position_nonkey`` (valid tokens outside masks["key"]) when "key" is given, and
    ``position_valid`` (every valid token: the reference, about 0.5). The mean is sum / count.
    """
    pos = relative_positions(valid)
    sets = {name: m & valid for name, m in masks.items()}
    if "key" in masks:
        sets["nonkey"] = valid & ~masks["key"]
    sets["valid"] = valid
    return {f"position_{name}": (float(pos[m].sum()), int(m.sum())) for name, m in sets.items()}


# ---------------------------------------------------------------------------- token records


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character table of byte-level BPE (GPT-2, Qwen): printable Latin-1
    bytes map to themselves, the others to code points from 256 up, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_OF_CHAR = {c: b for b, c in _bytes_to_unicode().items()}


def token_texts(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """The text each token adds, so that "".join(texts) is the decoded completion (spaces shown).

    tokenizer.convert_ids_to_tokens gives byte-level pieces ("Ġthe" = " the"); they are mapped back
    to bytes and decoded incrementally: a character split over several tokens appears at the token
    that completes it (the earlier ones show ""). Pieces that are not byte-level (special tokens with
    other characters, SentencePiece "▁") are kept as text, with "▁" shown as a space.
    """
    pieces = tokenizer.convert_ids_to_tokens([int(i) for i in ids])
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out = []
    for piece in pieces:
        piece = "" if piece is None else str(piece)
        if piece and all(c in _BYTE_OF_CHAR for c in piece):
            out.append(decoder.decode(bytes(_BYTE_OF_CHAR[c] for c in piece)))
        else:
            out.append(decoder.decode(b"", final=True) + piece.replace("▁", " "))
    tail = decoder.decode(b"", final=True)
    if tail and out:
        out[-1] += tail
    return out


def _round(x: float | None) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return round(float(x), ROUND)


@dataclass
class TokenRecord:
    """One completion token by token (a line of tokens.jsonl).

    tokens[t]: the text token t adds; token_ids[t]: its id; entropy / visual / temporal: per-token
    scores, rounded to 4 decimals, None (JSON null) for the whole list when the score was not
    computed for this row (e.g. temporal on an image row) and for a single non-finite value;
    selected[set][t]: whether the set ("entropy", "visual", "temporal", "key") selected token t.
    Only the valid tokens (up to and including the end-of-turn token) are recorded.
    """

    step: int
    problem_id: str
    kind: str
    data_type: str
    reward: float
    advantage: float
    tokens: list[str]
    token_ids: list[int]
    entropy: list[float | None] | None
    visual: list[float | None] | None
    temporal: list[float | None] | None
    selected: dict[str, list[bool]]

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TokenRecord:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


def token_records(
    *,
    step: int,
    problem_ids: Sequence[str],
    kinds: Sequence[str],
    data_types: Sequence[str],
    tokenizer: Any,
    completion_ids: Tensor,
    valid: Tensor,
    rewards: Tensor,
    advantages: Tensor,
    masks: Mapping[str, Tensor],
    entropy: Tensor | None = None,
    visual: Tensor | None = None,
    temporal: Tensor | None = None,
    temporal_rows: Tensor | None = None,
) -> list[TokenRecord]:
    """TokenRecords of B completions. problem_ids, kinds, data_types: one per row (B);
    completion_ids, valid, masks, scores: (B, T); rewards, advantages: (B,); temporal_rows: (B,) bool
    (the rows with a temporal probe; temporal scores of the other rows are recorded as null)."""
    ids = completion_ids.detach().cpu()
    valid = valid.detach().cpu()
    scores = {"entropy": entropy, "visual": visual, "temporal": temporal}
    scores = {k: (None if v is None else v.detach().float().cpu()) for k, v in scores.items()}
    masks = {k: v.detach().cpu() for k, v in masks.items()}
    rows = None if temporal_rows is None else temporal_rows.detach().cpu()
    out = []
    for i in range(ids.shape[0]):
        n = int(valid[i].sum())
        row_ids = ids[i, :n].tolist()

        def score(name: str, i: int = i, n: int = n) -> list[float | None] | None:
            s = scores[name]
            if s is None or (name == "temporal" and rows is not None and not bool(rows[i])):
                return None
            return [_round(v) for v in s[i, :n].tolist()]

        out.append(TokenRecord(
            step=int(step), problem_id=str(problem_ids[i]), kind=str(kinds[i]), data_type=str(data_types[i]),
            reward=_round(float(rewards[i])), advantage=_round(float(advantages[i])),
            tokens=token_texts(tokenizer, row_ids), token_ids=row_ids,
            entropy=score("entropy"), visual=score("visual"), temporal=score("temporal"),
            selected={name: [bool(v) for v in masks[name][i, :n].tolist()] for name in (*SIGNAL_NAMES, "key") if name in masks},
        ))
    return out


def write_token_records(path: str | Path, records: Sequence[TokenRecord]) -> None:
    """Append records to a JSON-lines file (one completion per line, UTF-8)."""
    with Path(path).open("a", encoding="utf-8") as fh:
        for r in records:
            fh.write(r.to_json() + "\n")


def read_token_records(path: str | Path) -> list[TokenRecord]:
    """The records of a tokens.jsonl file, as written (an error names the line that is not a record)."""
    out = []
    path = Path(path)
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(TokenRecord.from_dict(json.loads(line)))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{n}: not a token record ({exc})") from exc
    return out
