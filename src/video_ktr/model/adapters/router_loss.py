"""The mixture-of-experts router's load-balancing loss, added to the policy loss as TRL adds it.

TRL's trainers add ``router_aux_loss_coef x aux_loss`` to the training loss when the model's config has
``output_router_logits`` on; ``aux_loss`` is transformers' load-balancing loss (Switch Transformer: the
number of experts x the sum over experts of the fraction of tokens routed to it times its mean router
probability, over the attended tokens of the forward). A family's adapter says whether its models have
routers (``ModelAdapter.router_loss``); a checkpoint as released leaves ``output_router_logits`` off, and
then nothing here runs.

With ``output_router_logits`` on, :class:`RouterLoss` hooks the family's inner model (the module that
returns the decoder's router logits to the top-level forward) and

- while :meth:`RouterLoss.recording` is open (the trainer's policy pass, with gradient), keeps each forward
  call's router logits with the attention mask of its tokens; :meth:`RouterLoss.loss` then gives the
  load-balancing loss over the tokens of all the calls at once: the value one unchunked forward of the
  micro-batch's rows gives (the policy pass may run its rows in chunks and width buckets; a bucket's
  columns after a row's last token are masked and count for nothing);
- always hands the top-level forward no router logits, so it computes no loss of its own. transformers
  5.23 computes it with the call's attention mask, which in a call with a cache (generation, the shared
  prompt passes of the probes and the reference) covers more positions than the call's tokens: the
  forward fails there (``The size of tensor a ... must match``) when ``output_router_logits`` is on.

The prompt tokens count once per row, as in a forward of the full rows (the trainer runs the policy pass
without its shared-prompt path when the loss is on, docs/models.md). With several processes each process
adds the loss of its own rows (as TRL's per-process aux loss), a lockstep padding call's one token included.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor


class RouterLoss:
    """The router load-balancing loss of the policy pass (see the module docstring)."""

    def __init__(self, inner: list[torch.nn.Module], *, coef: float, num_experts: int, top_k: int,
                 loss_fn: Callable[..., Any]):
        self.coef, self.num_experts, self.top_k, self._loss_fn = float(coef), int(num_experts), int(top_k), loss_fn
        self._calls: list[tuple[tuple[Tensor, ...], Tensor]] = []
        self._recording = False
        self._handles = [m.register_forward_hook(self._hook, with_kwargs=True) for m in inner]

    @contextlib.contextmanager
    def recording(self) -> Iterator[RouterLoss]:
        """Keep the router logits of the forward calls made inside (the previous pass's are dropped)."""
        self._calls, self._recording = [], True
        try:
            yield self
        finally:
            self._recording = False

    def loss(self) -> Tensor | None:
        """The load-balancing loss over the tokens of the recorded calls (None when no call routed a token)."""
        calls, self._calls = self._calls, []
        if not calls:
            return None
        layers = len(calls[0][0])
        logits = tuple(torch.cat([c[0][i] for c in calls]) for i in range(layers))
        weights = torch.cat([c[1].to(logits[0].device) for c in calls])
        if not bool(weights.sum() > 0):
            return None
        return self._loss_fn(logits, self.num_experts, self.top_k, weights)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, module: torch.nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> Any:
        logits = getattr(output, "router_logits", None)
        if not logits:
            return output
        if self._recording:
            tokens = int(logits[0].shape[0])
            mask = kwargs.get("attention_mask")
            if mask is None or mask.dim() != 2 or tokens % mask.shape[0]:
                weights = torch.ones(tokens, dtype=torch.float32)
            else:  # with a cache the mask covers the cached positions too: the call's tokens are its last columns
                weights = mask[:, mask.shape[1] - tokens // mask.shape[0]:].reshape(-1).float()
            self._calls.append((tuple(logits), weights))
        output.router_logits = None  # the top-level forward computes no loss of its own (module docstring)
        return output
