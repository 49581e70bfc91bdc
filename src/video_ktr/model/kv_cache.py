"""A key/value cache that reserves room for the tokens to come instead of concatenating at every step.

transformers' ``DynamicLayer.update`` appends with ``torch.cat``: each decoding step copies a layer's
whole cache to add one column, so a rollout of T tokens copies the cache T times (16 % of the tiny
default's rollout, measured). The reserving layer here (a ``DynamicLayer`` in all else) writes the new columns into a buffer that already has
room for them and hands attention a view of the filled part: the same values in the same shapes, so
the attention, and every logit, is the same number (tests pin it). The room is reserved up to
``RESERVE_STEP`` tokens ahead of what is filled, never past the expected length (``capacity``): a batch
that stops early never holds much more memory than the concatenating cache would (an evaluation with
``max_new_tokens`` 1024 whose answers take 300 tokens would otherwise reserve 1024). When the room runs out
it grows by another ``RESERVE_STEP`` tokens: one copy per ``RESERVE_STEP`` tokens instead of one per token.

Used by the rollouts (rollout.generate), which run without autograd. An in-place write into a buffer
that a graph reads would be wrong, so an update that carries a gradient takes the concatenating path.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

RESERVE_STEP = 256  # tokens of room reserved ahead of the filled part


def room_for(needed: int, capacity: int) -> int:
    """Columns to reserve for ``needed`` tokens: up to RESERVE_STEP more, not past ``capacity`` while it holds."""
    return needed + RESERVE_STEP if needed >= capacity else min(capacity, needed + RESERVE_STEP)


def _dynamic_layer_class():
    from transformers.cache_utils import DynamicLayer

    return DynamicLayer


class _ReservedMixin:
    """``update`` writes into reserved room; ``keys`` / ``values`` are views of the filled part."""

    capacity: int
    _kbuf: Tensor | None
    _vbuf: Tensor | None

    def _owns(self) -> bool:
        """Whether ``keys`` / ``values`` are still the views of this layer's buffers (nothing replaced them)."""
        kb, vb = self._kbuf, self._vbuf
        k, v = self.keys, self.values
        return (kb is not None and k is not None and v is not None and k.data_ptr() == kb.data_ptr()
                and v.data_ptr() == vb.data_ptr() and k.shape[0] == kb.shape[0] and k.shape[1:2] == kb.shape[1:2])

    def _reserve(self, like_k: Tensor, like_v: Tensor, length: int, room: int, repeats: int = 1) -> None:
        """New buffers with ``room`` columns holding the current ``length`` columns, each row ``repeats``
        times in a row (as ``batch_repeat_interleave``: one copy straight into the buffer)."""
        B, H, _, Dk = like_k.shape
        Dv = like_v.shape[-1]
        kb = like_k.new_empty(B * repeats, H, room, Dk)
        vb = like_v.new_empty(B * repeats, H, room, Dv)
        if length:
            kb.view(B, repeats, H, room, Dk)[:, :, :, :length].copy_(self.keys[:, None].expand(B, repeats, H, length, Dk))
            vb.view(B, repeats, H, room, Dv)[:, :, :, :length].copy_(self.values[:, None].expand(B, repeats, H, length, Dv))
        self._kbuf, self._vbuf = kb, vb
        self._filled(length)

    def _filled(self, length: int) -> None:
        """``keys`` / ``values``: the views of the first ``length`` columns of the buffers."""
        self.keys, self.values = self._kbuf[:, :, :length], self._vbuf[:, :, :length]

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        if torch.is_grad_enabled() and (key_states.requires_grad or value_states.requires_grad):
            self._kbuf = self._vbuf = None  # the graph needs fresh tensors: concatenate
            return super().update(key_states, value_states, *args, **kwargs)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        old = self.get_seq_length()
        new = old + key_states.shape[-2]
        if not (old and self._owns()) or self._kbuf.shape[-2] < new:
            self._reserve(key_states, value_states, old, room_for(new, self.capacity))
        self._kbuf[:, :, old:new].copy_(key_states)
        self._vbuf[:, :, old:new].copy_(value_states)
        self._filled(new)
        return self.keys, self.values

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)  # a shorter view of the same buffer: still owned, the room stays

    def reset(self) -> None:
        self._kbuf = self._vbuf = None
        super().reset()


@functools.cache
def _reserved_class() -> type:
    return type("ReservedDynamicLayer", (_ReservedMixin, _dynamic_layer_class()), {})


def _reserved_layers(cache: Any) -> list[Any] | None:
    """``cache``'s layers with each plain dynamic one replaced by a reserving one holding the same state.

    None (and ``cache`` untouched) when a layer is of another kind (sliding window, static, quantised,
    offloaded): its own update is kept.
    """
    base = _dynamic_layer_class()
    layers = getattr(cache, "layers", None) or []
    if not layers or any(not (type(layer) is base or isinstance(layer, _ReservedMixin)) for layer in layers):
        return None
    out = []
    for layer in layers:
        if not isinstance(layer, _ReservedMixin):
            new = _reserved_class().__new__(_reserved_class())
            new.__dict__.update(layer.__dict__)
            new._kbuf = new._vbuf = None
            layer = new
        out.append(layer)
    cache.layers = out
    return out


def reserve(cache: Any, capacity: int) -> Any:
    """Give each plain dynamic layer of ``cache`` room towards ``capacity`` tokens (``room_for``; in place; returns ``cache``).

    Nothing changes when a layer is of another kind (sliding window, static, quantised, offloaded). A layer
    that already holds keys gets its buffer now (one copy, which the first concatenation would have
    made anyway); an empty one on its first update.
    """
    for layer in _reserved_layers(cache) or []:
        layer.capacity = int(capacity)
        if layer.is_initialized and layer.keys is not None and layer.keys.numel():
            n = layer.keys.shape[-2]
            if not layer._owns() or layer._kbuf.shape[-2] < min(capacity, n + RESERVE_STEP):
                layer._reserve(layer.keys, layer.values, n, room_for(n, int(capacity)))
    return cache


def new_cache(model: torch.nn.Module, capacity: int) -> Any:
    """An empty cache for ``model`` whose plain layers reserve room towards ``capacity`` tokens (None: not possible)."""
    from transformers import DynamicCache

    config = getattr(model, "config", None)
    try:
        cache = DynamicCache(config=config) if config is not None else DynamicCache()
    except Exception:  # a config transformers cannot read the layer layout from: let generate() build its own
        return None
    if not getattr(cache, "layers", None):
        return None
    return reserve(cache, capacity)


def repeat_rows(cache: Any, repeats: int, capacity: int) -> bool:
    """Repeat each row of ``cache`` ``repeats`` times (as ``batch_repeat_interleave``) into reserved room.

    One copy per layer straight into a buffer with room towards ``capacity`` tokens (instead of a repeat
    and later a concatenation per step). Returns False (``cache`` untouched) when a layer is not a plain
    dynamic one; the caller then repeats it the usual way.
    """
    layers = _reserved_layers(cache)
    if layers is None:
        return False
    for layer in layers:
        layer.capacity = int(capacity)
        if layer.is_initialized and layer.keys is not None and layer.keys.numel():
            n = layer.keys.shape[-2]
            layer._reserve(layer.keys, layer.values, n, room_for(n, int(capacity)), repeats)
    return True



def static_cache(model: torch.nn.Module, capacity: int, prefix: Any = None, repeats: int = 1, into: Any = None) -> Any:
    """transformers' ``StaticCache`` with ``capacity`` columns: fixed buffers a captured decode step writes in place.

    With ``prefix`` (a dynamic cache holding P rows, e.g. a shared prefill's), the static cache holds P x
    ``repeats`` rows whose first columns are the prefix's keys and values, each row repeated ``repeats``
    times in a row (as ``batch_repeat_interleave``): one copy per layer. Without it, the layers are
    allocated on the first update (the prefill). None when ``model``'s cache layout is not a plain one
    (every layer of a StaticCache must be a full-attention StaticLayer here).

    ``into``: an initialised StaticCache of ``capacity`` columns to reuse instead of allocating one (a kept
    decode step's, decode.GraphStore.cache_for): reset, or filled with the prefix; a new one is made when
    its layout does not fit.
    """
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer

    if into is not None and not _fits(into, capacity, prefix, repeats):
        into = None
    if into is not None:
        cache = into
        if prefix is None:
            cache.reset()
            return cache
    else:
        try:
            cache = StaticCache(config=model.config, max_cache_len=int(capacity))
        except Exception:  # a config transformers cannot read the layer layout from
            return None
        if not cache.layers or any(type(layer) is not StaticLayer for layer in cache.layers):
            return None
    if prefix is None:
        return cache
    src = getattr(prefix, "layers", None) or []
    if len(src) != len(cache.layers) or any(s.keys is None or not s.keys.numel() for s in src):
        return None
    for layer, s in zip(cache.layers, src):
        k, v = s.keys, s.values
        B, H, n, Dk = k.shape
        Dv = v.shape[-1]
        if n > capacity:
            raise ValueError(f"the prefix holds {n} tokens, more than the static cache's {capacity}")
        if into is None:
            layer.lazy_initialization(k.new_empty(B * repeats, H, 0, Dk), v.new_empty(B * repeats, H, 0, Dv))
        layer.keys.view(B, repeats, H, capacity, Dk)[:, :, :, :n].copy_(k[:, None].expand(B, repeats, H, n, Dk))
        layer.values.view(B, repeats, H, capacity, Dv)[:, :, :, :n].copy_(v[:, None].expand(B, repeats, H, n, Dv))
        layer.cumulative_length.fill_(n)
    return cache


def _fits(cache: Any, capacity: int, prefix: Any, repeats: int) -> bool:
    """Whether the initialised static ``cache`` has ``capacity`` columns and, with ``prefix``, its layers' rows, heads,
    widths, dtype and device (repeated ``repeats`` times)."""
    from transformers.cache_utils import StaticLayer

    layers = getattr(cache, "layers", None) or []
    if not layers or any(type(layer) is not StaticLayer or not layer.is_initialized or layer.max_cache_len != capacity
                         for layer in layers):
        return False
    if prefix is None:
        return True
    src = getattr(prefix, "layers", None) or []
    if len(src) != len(layers):
        return False
    for layer, s in zip(layers, src):
        if s.keys is None:
            return False
        B, H, _, Dk = s.keys.shape
        if (tuple(layer.keys.shape) != (B * repeats, H, capacity, Dk) or layer.keys.dtype != s.keys.dtype
                or layer.keys.device != s.keys.device or layer.values.shape[-1] != s.values.shape[-1]):
            return False
    return True

