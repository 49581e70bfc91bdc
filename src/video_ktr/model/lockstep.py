"""The same forward calls on every process in a step: the schedules of the scoring passes agreed across ranks.

With several processes, a call of the model can be a collective that every process must join:

- DDP broadcasts the module's buffers (the rotary ``inv_freq``) from rank 0 at every forward of the wrapped
  model (``broadcast_buffers``, accelerate's default);
- FSDP and DeepSpeed ZeRO-3 gather each sharded module's parameters at each call (language-model layers at
  every forward, vision blocks at every call of the vision tower).

A process that makes one such call fewer than another leaves the other waiting forever (or pairs its next
collective with the wrong one). How many calls a pass makes depends on each process's own rows: the length
buckets (``scoring.bucket_rows``), rows without a completion token, the probe groups skipped at advantage 0,
which prompts carry a video with several frames (the temporal probe), which modalities a batch holds (one
vision-tower call per modality). So each pass agrees its counts first:

- ``Lockstep.agree``: the element-wise largest of some counts over the processes (one all-reduce MAX);
- ``lockstep_pass``: before each of its own forward calls in a pass a process says so (an agreement of 1); a
  process that has finished its pass answers each such agreement with a padding call (a one-token text
  forward, ``pad_forward``) until no process has a call left. The agreement comes before the call, never
  after: a process that agreed after its own calls would sit in the all-reduce while another one's forward
  waits in its own collective. How many calls a pass makes need not be known beforehand;
- vision-tower calls are agreed before they are made (``rollout.encode_visual_once``: the largest number of
  calls, one per modality present, padded with the smallest image, ``visual_padding_inputs``).

A padding call's output is discarded; in a pass with gradient it is kept (``hold``) and added, times 0, to
the pass's result (``fold``), so its backward runs too (under FSDP the backward is a collective as well)
and adds exactly zero to every gradient. On one process there is no Lockstep (``None``) and nothing changes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from video_ktr.model.loading import unwrap


class Lockstep:
    """Agreement between the processes of one run; ``all_max`` takes the element-wise max of a 1-D long tensor.

    ``sharded``: every sharded module's call is a collective (FSDP, ZeRO-3), so the vision-tower calls are agreed
    too; without it (DDP) only the calls of the wrapped model are (its buffer broadcast). The rollouts need no
    agreement: under ZeRO-3 / FSDP they run on weights gathered once (training/rollout_weights.py).
    """

    def __init__(self, all_max: Callable[[Tensor], Tensor], *, sharded: bool = True):
        self._all_max = all_max
        self.sharded = sharded
        self._held: list[Tensor] = []
        self.padding_calls = 0  # padding calls made so far (model forwards and vision-tower calls)

    def agree(self, *counts: int) -> list[int]:
        """The largest value of each count on any process (every process must call this at the same point)."""
        agreed = self._all_max(torch.tensor([int(c) for c in counts], dtype=torch.long))
        return [int(v) for v in agreed.tolist()]

    def hold(self, output: Tensor) -> None:
        """Keep a padding call's output made with gradient, for ``fold``."""
        if output.requires_grad:
            self._held.append(output.float().sum())

    def fold(self, result: Tensor) -> Tensor:
        """``result`` + 0 x the held padding outputs: the same values, and their backward runs with it."""
        if not self._held:
            return result
        held, self._held = self._held, []
        return result + 0.0 * torch.stack(held).sum().to(result.device)


def pad_forward(model: torch.nn.Module) -> Tensor:
    """One padding call of the language model: a one-token text row, no cache, one logit position."""
    device = next(unwrap(model).parameters()).device
    ids = torch.zeros(1, 1, dtype=torch.long, device=device)
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=torch.zeros(3, 1, 1, dtype=torch.long,
                device=device), use_cache=False, logits_to_keep=1)
    return out.logits


@contextlib.contextmanager
def lockstep_pass(lockstep: Lockstep | None, model: torch.nn.Module) -> Iterator[None]:
    """Keep ``model``'s forward calls inside in step with the other processes' (see the module's docstring).

    Before each own call: an agreement of 1 (this process has a call). On leaving: agreements of 0 until
    every process is done, each answered by a padding call while another process still had one. The padding
    calls run under the grad mode of the pass and are held for ``Lockstep.fold`` (the caller of a pass with
    gradient folds them into its result). Every process must enter the same passes in the same order; a
    pass a process has nothing to run in is entered all the same (it then only pads).
    """
    if lockstep is None:
        yield
        return

    def announce(*args: Any) -> None:
        lockstep.agree(1)

    # prepend: before the hooks that make the call a collective (FSDP2 gathers the root's parameters in its own
    # forward pre-hook; DDP and DeepSpeed inside the forward)
    handle = model.register_forward_pre_hook(announce, prepend=True)
    try:
        yield
    finally:
        handle.remove()
    while lockstep.agree(0)[0]:
        lockstep.hold(pad_forward(model))
        lockstep.padding_calls += 1


def visual_padding_inputs(model: torch.nn.Module) -> tuple[Tensor, Tensor]:
    """(pixel rows, grid) of the smallest image the vision tower takes: one merged token (a merge x merge patch grid)."""
    m = unwrap(model)
    vision = m.config.vision_config
    merge, patch = int(vision.spatial_merge_size), int(vision.patch_size)
    temporal, channels = int(getattr(vision, "temporal_patch_size", 1)), int(getattr(vision, "in_channels", 3))
    param = next(m.parameters())
    pixels = torch.zeros(merge * merge, channels * temporal * patch * patch, dtype=param.dtype, device=param.device)
    grid = torch.tensor([[1, merge, merge]], dtype=torch.long, device=param.device)
    return pixels, grid


def agree_vision_calls(lockstep: Lockstep | None, present: Sequence[str]) -> int:
    """How many padding vision-tower calls this process makes after its own (one per modality present);
    agreed before any of them is made."""
    if lockstep is None or not lockstep.sharded:
        return 0
    (agreed,) = lockstep.agree(len(present))
    return agreed - len(present)
