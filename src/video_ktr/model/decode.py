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
  the reason is kept in ``DecodeResult.fallback``. The per-row generator noise draws its blocks from
  Python and is never captured (the step stays on the static buffers, eagerly).

A ``GraphStore`` keeps captured steps across calls (the trainer holds one: ``rollout_decoder``). A later
call of the same shapes (rows, cache columns, cache layout, sampler and stop settings, the same weight
tensors) copies its prefilled cache, first token, mask, positions and seeds into the stored step's buffers
and replays the stored graph from its first step: no warm-up, no capture. The static cache's columns are
rounded up to a multiple of ``StaticDecoder.capacity_multiple`` so that prompts of different lengths share
a graph (the extra columns are masked). The store holds each kept step's static cache (the KV room of one
rollout) between calls; ``GraphStore.clear`` gives it back.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
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


class GraphStore:
    """Captured decode steps kept across calls, keyed by everything a captured step has fixed (``_graph_key``).

    At most ``max_entries`` steps are kept (the least recently used goes first); each holds its static
    cache, so the store holds that much KV memory between rollouts. ``clear`` releases it all.
    """

    def __init__(self, max_entries: int = 2):
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self.entries: OrderedDict[tuple, _Captured] = OrderedDict()
        self.hits = 0
        self.captures = 0

    def get(self, key: tuple) -> _Captured | None:
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
            self.hits += 1
        return entry

    def put(self, key: tuple, entry: _Captured) -> None:
        self.entries[key] = entry
        self.entries.move_to_end(key)
        self.captures += 1
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)

    def clear(self) -> None:
        self.entries.clear()

    def cache_for(self, rows: int, capacity: int, device: torch.device) -> Any | None:
        """A kept step's static cache of ``rows`` x ``capacity`` columns on ``device`` for the next prefill to write
        into (None: none kept). Its contents are stale; the prefill overwrites what the step reads, and a step
        replayed on it skips the copy. Saves a second cache's worth of memory during the rollout."""
        for entry in reversed(self.entries.values()):
            cache = entry.state.cache
            layers = getattr(cache, "layers", None) or []
            keys = getattr(layers[0], "keys", None) if layers else None
            if keys is not None and _static_capacity(cache) == capacity and keys.shape[0] == rows \
                    and keys.device == torch.device(device):
                return cache
        return None


@dataclass
class StaticDecoder:
    """Settings of the static decoder (rollout.generate(decoder=StaticDecoder(...)); 'static' is the default one).

    ``graphs``: ``"auto"`` captures with ``CudaGraphs`` on CUDA and runs eagerly elsewhere; None never
    captures; or an object with ``warm_up(fn)`` and ``capture(fn) -> replay`` (tests use a stand-in).
    ``noise``: ``"auto"`` is counter noise on CUDA (capturable) and the per-row generators elsewhere
    (the transformers path's stream: the same tokens on CPU).
    ``store``: a GraphStore that keeps captured steps for later calls of the same shapes (None: capture
    per call); ``capacity_multiple``: with a store and graphs, the static cache's columns (prompt +
    new tokens) rounded up to this multiple, so that batches whose prompts differ a little in length
    replay one graph.
    """

    graphs: Any = "auto"
    noise: str = "auto"
    stop_every: int = STOP_EVERY
    store: GraphStore | None = field(default=None, compare=False, repr=False)
    capacity_multiple: int = 64

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

    def capacity(self, prompt_length: int, max_new_tokens: int, graphs: Any) -> int:
        """The static cache's columns: prompt + new tokens, rounded up where a stored graph can be replayed."""
        needed = prompt_length + max_new_tokens
        if graphs is None or self.store is None or self.capacity_multiple <= 1:
            return needed
        return -(-needed // self.capacity_multiple) * self.capacity_multiple


def rollout_decoder(setting: str, device: torch.device | str) -> str | StaticDecoder:
    """A trainer's decoder for its rollouts: 'hf', or a StaticDecoder with its own GraphStore (kept across steps)."""
    if resolve_decoder(setting, torch.device(device)) == "hf":
        return "hf"
    return StaticDecoder(store=GraphStore())


@dataclass
class DecodeResult:
    ids: Tensor  # (N, steps) the tokens after the prompt, the first one included; pad after a row's end
    steps: int  # decoding steps run (columns of ids that hold tokens)
    captured: bool  # whether later steps replayed a captured graph
    fallback: str | None = None  # why capture was abandoned, if it was
    reused: bool = False  # whether the graph was one a GraphStore kept from an earlier call


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
        # a static cache may have more columns than prompt + new tokens (GraphStore rounds them up)
        capacity = _static_capacity(cache) if static else None
        capacity = capacity or length + max_new_tokens
        mask = torch.ones(n, capacity, dtype=torch.long, device=device)
        mask[:, :length] = prompt_mask
        # generate() drops an all-ones mask (no padding); the eager step does too, for the same numbers
        self.mask = mask if static or not bool(prompt_mask.all()) else None
        if static:
            self.mask = mask.bool()
            self.column = torch.full((), length, dtype=torch.long, device=device)  # the cache column written next
            self.columns = torch.arange(capacity, device=device)
        self.eager_step = 1  # the Python-side step counter of the eager mode

    def load(self, cache: Any, first: Tensor, prompt_mask: Tensor, sampler: Any, rope_deltas: Tensor | None) -> None:
        """Start a new decode on this (static, captured) step's buffers: every value copied in place.

        ``cache``, ``sampler``: the new call's prefilled static cache and the sampler that drew ``first``;
        their tensors are copied into this step's own (the captured graph reads those addresses).
        """
        n, length = prompt_mask.shape
        if cache is not self.cache:
            for mine, theirs in zip(self.cache.layers, cache.layers):
                mine.keys.copy_(theirs.keys)
                mine.values.copy_(theirs.values)
                mine.cumulative_length.copy_(theirs.cumulative_length)
        if sampler is not self.sampler:
            self.sampler.keys.copy_(sampler.keys)
            self.sampler.step.copy_(sampler.step)
        self.ids.fill_(int(self.pad))
        self.ids[:, 0] = first
        self.done.copy_(self._is_eos(first))
        self.token.copy_(first.reshape(n, 1))
        text = prompt_mask.long().sum(-1, keepdim=True)
        self.pos.copy_((text + rope_deltas.to(text.device)).unsqueeze(0).expand(3, n, 1) if rope_deltas is not None
                       else text)
        self.step.fill_(1)
        self.mask.fill_(True)
        self.mask[:, :length] = prompt_mask.bool()
        self.column.fill_(length)
        self.length = length

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


@dataclass
class _Captured:
    """A captured step kept by a GraphStore: its state (buffers, cache, sampler) and its replay."""

    state: _Step
    replay: Callable[[], None]
    graphs: Any  # kept alive: its identity is part of the key


def _static_capacity(cache: Any) -> int | None:
    layers = getattr(cache, "layers", None) or []
    return int(layers[0].max_cache_len) if layers and hasattr(layers[0], "max_cache_len") else None


def _graph_key(model: torch.nn.Module, cache: Any, first: Tensor, sampler: Any, graphs: Any, *, max_new_tokens: int,
               eos_ids: tuple[int, ...], pad_id: int, min_new_tokens: int, rope_deltas: Tensor | None) -> tuple | None:
    """What a captured step fixed: shapes, addresses of the weights, Python values read at capture (None: keep none).

    The prompt's length is not in it: in the static mode it is a value in the step's buffers (the mask,
    the column counter), not a shape.
    """
    layers = getattr(cache, "layers", None) or []
    if not layers or getattr(sampler, "noise", None) != "counter" or not hasattr(sampler, "keys"):
        return None
    layout = []
    for layer in layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if keys is None or values is None or not hasattr(layer, "cumulative_length"):
            return None
        layout.append((type(layer).__name__, tuple(keys.shape), tuple(values.shape), keys.dtype))
    weights = tuple(p.data_ptr() for p in model.parameters())  # a moved or re-allocated weight: capture again
    graphs_id = "cuda" if type(graphs) is CudaGraphs else id(graphs)
    return (graphs_id, id(model), str(first.device), int(first.shape[0]), max_new_tokens, tuple(sorted(set(eos_ids))),
            int(pad_id), int(min_new_tokens), rope_deltas is None, sampler.temperature, sampler.top_p,
            tuple(sampler.suppress_ids), int(sampler.rows), tuple(layout), weights)


@torch.no_grad()
def decode_from(model: torch.nn.Module, cache: Any, first: Tensor, prompt_mask: Tensor, *, sampler: Any,
                max_new_tokens: int, eos_ids: tuple[int, ...], pad_id: int, min_new_tokens: int = 0,
                rope_deltas: Tensor | None = None, graphs: Any = None, stop_every: int = STOP_EVERY,
                store: GraphStore | None = None) -> DecodeResult:
    """Decode tokens 2..``max_new_tokens`` after a prefill that filled ``cache`` and drew ``first`` (N,).

    ``model`` is the unwrapped model in eval mode; ``prompt_mask`` (N, L) the prompt's attention mask
    (the cache holds its L columns); ``sampler`` a GumbelSampler that drew ``first`` (its stream goes on);
    ``rope_deltas`` (N, 1) the M-RoPE offsets the prefill left on the model (None: plain 1-D positions).
    With ``graphs`` the cache must be a ``StaticCache`` with room for at least L + ``max_new_tokens``
    columns. With ``store`` (and ``graphs``) a step captured by an earlier call of the same shapes is
    replayed (its buffers loaded with this call's values), and a step captured here is kept.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if stop_every < 1:
        raise ValueError(f"stop_every must be >= 1, got {stop_every}")
    key = entry = None
    if graphs is not None and store is not None:
        key = _graph_key(model, cache, first, sampler, graphs, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                         pad_id=pad_id, min_new_tokens=min_new_tokens, rope_deltas=rope_deltas)
        entry = store.get(key) if key is not None else None
    if entry is not None:  # replay the kept graph on its own buffers, loaded with this call's values
        state, run = entry.state, entry.replay
        state.load(cache, first, prompt_mask, sampler, rope_deltas)
    else:
        state = _Step(model, cache, first, prompt_mask, sampler=sampler, max_new_tokens=max_new_tokens,
                      eos_ids=eos_ids, pad_id=pad_id, min_new_tokens=min_new_tokens, rope_deltas=rope_deltas,
                      static=graphs is not None)
        run = state
    captured, fallback, steps = entry is not None, None, 1
    # the per-row generators' noise comes in blocks chosen by Python: a captured step would replay one block
    # column forever, so that noise decodes on the static buffers eagerly
    capturable = getattr(sampler, "noise", None) != "generator" or getattr(sampler, "temperature", 1.0) == 0
    if graphs is not None and entry is None and not capturable:
        fallback = "the per-row generator noise is drawn by Python and cannot be captured (noise='counter' can)"
    for step in range(1, max_new_tokens):
        if (step - 1) % stop_every == 0 and state.all_done():
            break
        if entry is not None or graphs is None or not capturable:
            run()
        elif step == 1:
            graphs.warm_up(state)
        elif step == 2:
            try:
                run = graphs.capture(state)
                captured = True
                if key is not None:
                    store.put(key, _Captured(state, run, graphs))
            except Exception as exc:  # decode on eagerly, on the same static buffers
                fallback = f"{type(exc).__name__}: {exc}"
                logger.warning("decode: CUDA graph capture failed, decoding eagerly (%s)", fallback)
                run = state
            run()
        else:
            run()
        steps = step + 1
    ids = state.ids[:, :steps]
    # a kept step's buffers are the next call's: hand out a copy
    return DecodeResult(ids=ids.clone() if key is not None and captured else ids, steps=steps, captured=captured,
                        fallback=fallback, reused=entry is not None)
