"""The static decoder: a decoding loop over preallocated buffers whose one-token step a CUDA graph captures.

transformers' ``generate`` runs Python for every token: it concatenates the ids and the mask, rebuilds the
position ids, runs the logits processors and reads ``unfinished_sequences.max()`` back to the host (a
synchronisation per token). On a GPU that host work, not the weights, sets the pace of a rollout
(38-100 ms per step measured on an H200 where the weights take about 1 ms, ../docs/performance.md).

Here the prompt is prefilled and the first token drawn by the caller (rollout.generate, through
``generate`` with one new token, so the prefill is exactly that of the transformers path), and
``decode_from`` produces the rest. Every step reads and writes the same tensors:

* ``ids`` (N, T): the completion, written at column ``step``; ``done`` (N,): rows past an end-of-turn
  token, whose later tokens are the pad id (as ``generate`` pads them); no row is removed from the batch;
* the next input token, its positions (text position, plus the M-RoPE offset ``rope_deltas`` for
  Qwen2-VL / Qwen2.5-VL), the cache column and the step, all advanced in place;
* the sampler (sampling.GumbelSampler): with counter noise its step counter is a device tensor too.

The host looks at ``done`` every ``stop_every`` steps only (one synchronisation per block instead of
one per token); a block that overshoots decodes a few pad tokens for rows that are already done, which
are cut afterwards (rollout.generate keeps the columns up to the longest completion, as ``generate``).

Two modes:

* eager (``graphs=None``): the step runs as ordinary PyTorch on the caller's cache (the reserving
  dynamic cache of kv_cache.py) with the 2-D attention mask ``generate`` would pass. On CPU this gives
  exactly the tokens of the transformers path (tests).
* captured (``graphs`` given: ``CudaGraphs`` on CUDA): the cache is a ``StaticCache`` and the attention
  mask a 4-D boolean mask computed inside the step from the fixed mask buffer and the column counter, so
  the step has fixed shapes and addresses. The first step runs eagerly (warm-up), the second is
  captured, and the graph is replayed for every later token. If capture fails (a kernel that cannot be
  captured, an attention backend that synchronises), decoding goes on eagerly on the same buffers and
  the reason is kept in ``DecodeResult.fallback``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

DECODERS = ("auto", "hf", "static")
STOP_EVERY = 16  # decoding steps between two looks at the finished rows


def resolve_decoder(decoder: Any, device: torch.device) -> str:
    """'hf' or 'static' for a decoder setting: 'auto' is the static decoder on CUDA, transformers elsewhere."""
    if isinstance(decoder, StaticDecoder):
        return "static"
    if decoder not in DECODERS:
        raise ValueError(f"rollout decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
    if decoder == "auto":
        return "static" if torch.device(device).type == "cuda" else "hf"
    return decoder


class CudaGraphs:
    """Capture and replay of one step with ``torch.cuda.CUDAGraph`` (the warm-up runs on a side stream)."""

    def warm_up(self, fn: Callable[[], None]) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)

    def capture(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Record ``fn`` (nothing runs); returns the replay. ``thread_local``: a data-loading thread may use CUDA meanwhile."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            fn()
        return graph.replay


@dataclass
class StaticDecoder:
    """Settings of the static decoder (rollout.generate(decoder=StaticDecoder(...)); 'static' is the default one).

    ``graphs``: ``"auto"`` captures with ``CudaGraphs`` on CUDA and runs eagerly elsewhere; None never
    captures; or an object with ``warm_up(fn)`` and ``capture(fn) -> replay`` (tests use a stand-in).
    ``noise``: ``"auto"`` is counter noise on CUDA (capturable) and the per-row generators elsewhere
    (the transformers path's stream: the same tokens on CPU).
    """

    graphs: Any = "auto"
    noise: str = "auto"
    stop_every: int = STOP_EVERY

    def graphs_for(self, device: torch.device) -> Any:
        if self.graphs == "auto":
            return CudaGraphs() if torch.device(device).type == "cuda" else None
        return self.graphs

    def noise_for(self, device: torch.device) -> str:
        if self.noise == "auto":
            return "counter" if torch.device(device).type == "cuda" else "generator"
        if self.noise not in ("counter", "generator"):
            raise ValueError(f"noise must be 'auto', 'counter' or 'generator', got {self.noise!r}")
        return self.noise


@dataclass
class DecodeResult:
    ids: Tensor  # (N, steps) the tokens after the prompt, the first one included; pad after a row's end
    steps: int  # decoding steps run (columns of ids that hold tokens)
    captured: bool  # whether later steps replayed a captured graph
    fallback: str | None = None  # why capture was abandoned, if it was


class _Step:
    """The state and the one-token step of a decode (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, cache: Any, first: Tensor, prompt_mask: Tensor, *, sampler: Any,
                 max_new_tokens: int, eos_ids: tuple[int, ...], pad_id: int, min_new_tokens: int,
                 rope_deltas: Tensor | None, static: bool):
        n, length = prompt_mask.shape
        device = first.device
        self.model, self.cache, self.sampler, self.static = model, cache, sampler, static
        self.length, self.max_new_tokens, self.min_new_tokens = length, max_new_tokens, min_new_tokens
        self.ids = torch.full((n, max_new_tokens), pad_id, dtype=torch.long, device=device)
        self.ids[:, 0] = first
        self.eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=device)
        self.pad = torch.tensor(pad_id, dtype=torch.long, device=device)
        self.done = self._is_eos(first)
        self.token = first.reshape(n, 1).clone()
        # the text position of the token fed next: the prompt's real tokens are at 0 .. n_real - 1
        text = prompt_mask.long().sum(-1, keepdim=True)  # (N, 1)
        self.pos = (text + rope_deltas.to(device)).unsqueeze(0).expand(3, n, 1).clone() if rope_deltas is not None else text
        self.step = torch.ones((), dtype=torch.long, device=device)  # index of the token this step produces
        capacity = length + max_new_tokens
        mask = torch.ones(n, capacity, dtype=torch.long, device=device)
        mask[:, :length] = prompt_mask
        # generate() drops an all-ones mask (no padding); the eager step does too, for the same numbers
        self.mask = mask if static or not bool(prompt_mask.all()) else None
        if static:
            self.mask = mask.bool()
            self.column = torch.full((), length, dtype=torch.long, device=device)  # the cache column written next
            self.columns = torch.arange(capacity, device=device)
        self.eager_step = 1  # the Python-side step counter of the eager mode

    def _is_eos(self, tokens: Tensor) -> Tensor:
        return (tokens[:, None] == self.eos[None, :]).any(-1)

    def _attention_mask(self) -> Tensor | None:
        if self.static:  # (N, 1, 1, capacity): the filled columns the row attends to
            return (self.mask & (self.columns <= self.column))[:, None, None, :]
        if self.mask is None:
            return None
        return self.mask[:, : self.length + self.eager_step]

    def __call__(self) -> None:
        out = self.model(input_ids=self.token, attention_mask=self._attention_mask(), position_ids=self.pos,
                         past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        scores = out.logits[:, -1].to(torch.float32)
        if self.min_new_tokens:  # end-of-turn held back before min_new_tokens (as generate's MinNewTokens processor)
            held = torch.where(self.step < self.min_new_tokens, float("-inf"), 0.0)
            scores = scores.index_add(-1, self.eos, held.expand(scores.shape[0], self.eos.numel()).contiguous())
        token = self.sampler(None, scores).argmax(-1)
        token = torch.where(self.done, self.pad, token)
        if self.static:
            self.ids.index_copy_(1, self.step.reshape(1), token[:, None])
            self.column.add_(1)
        else:
            self.ids[:, self.eager_step] = token
            self.eager_step += 1
        self.done |= self._is_eos(token)
        self.token.copy_(token[:, None])
        self.pos.add_(1)
        self.step.add_(1)

    def all_done(self) -> bool:
        return bool(self.done.all())  # the one host synchronisation, every stop_every steps


@torch.no_grad()
def decode_from(model: torch.nn.Module, cache: Any, first: Tensor, prompt_mask: Tensor, *, sampler: Any,
                max_new_tokens: int, eos_ids: tuple[int, ...], pad_id: int, min_new_tokens: int = 0,
                rope_deltas: Tensor | None = None, graphs: Any = None, stop_every: int = STOP_EVERY) -> DecodeResult:
    """Decode tokens 2..``max_new_tokens`` after a prefill that filled ``cache`` and drew ``first`` (N,).

    ``model`` is the unwrapped model in eval mode; ``prompt_mask`` (N, L) the prompt's attention mask
    (the cache holds its L columns); ``sampler`` a GumbelSampler that drew ``first`` (its stream goes on);
    ``rope_deltas`` (N, 1) the M-RoPE offsets the prefill left on the model (None: plain 1-D positions).
    With ``graphs`` the cache must be a ``StaticCache`` with room for L + ``max_new_tokens`` columns.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if stop_every < 1:
        raise ValueError(f"stop_every must be >= 1, got {stop_every}")
    state = _Step(model, cache, first, prompt_mask, sampler=sampler, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                  pad_id=pad_id, min_new_tokens=min_new_tokens, rope_deltas=rope_deltas, static=graphs is not None)
    run: Callable[[], None] = state
    captured, fallback, steps = False, None, 1
    for step in range(1, max_new_tokens):
        if (step - 1) % stop_every == 0 and state.all_done():
            break
        if graphs is not None and step == 1:
            graphs.warm_up(state)
        elif graphs is not None and step == 2:
            try:
                run = graphs.capture(state)
                captured = True
            except Exception as exc:  # decode on eagerly, on the same static buffers
                fallback = f"{type(exc).__name__}: {exc}"
                logger.warning("decode: CUDA graph capture failed, decoding eagerly (%s)", fallback)
                run = state
            run()
        else:
            run()
        steps = step + 1
    return DecodeResult(ids=state.ids[:, :steps], steps=steps, captured=captured, fallback=fallback)
