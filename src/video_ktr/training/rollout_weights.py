"""The policy's whole weights for a rollout when each process holds only a shard of them.

Under DeepSpeed ZeRO-3 and FSDP2 every forward pass gathers each layer's parameters from all
processes and frees them after the layer ran. Training forwards run once per step, but a rollout
runs the model once per sampled token: one gather per layer per token. :func:`rollout_weights`
gathers all parameters once before the rollout and releases them when it ends, before the policy's
forward and backward with gradients (TRL's ``unwrap_model_for_generation``, DeepSpeed's
``deepspeed.zero.unwrap_model_for_generation``):

    with rollout_weights(model, gather=cfg.gather_for_generation) as gen:   # one all-gather
        comps = sample_completions(gen, ...)                                # no collective inside
    ... policy forward and backward: the parameters are sharded again

Inside the block no forward is a collective any more, so processes may decode different numbers of
tokens. Without the gather (``gather=False``, for a model whose whole weights do not fit next to
the rollout's cache) every token's forward stays a collective: the rollout then has to keep all
processes in step (:func:`synced_rollout`: transformers' ``generate(synced_gpus=True)``, never the
static decoder, which stops when its own rows are done).

One process or DDP (whole parameters everywhere): the block does nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


def zero3_partitioned(model: torch.nn.Module) -> bool:
    """True when ``model`` holds DeepSpeed ZeRO-3 partitioned parameters (DeepSpeed's own test: a ``ds_id``)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def fsdp2_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules ``fully_shard`` wrapped inside ``model`` (the outermost first), empty when none."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def init_fsdp2_root(model: torch.nn.Module) -> None:
    """Make the outermost ``fully_shard`` unit of ``model`` FSDP2's root now, before any forward.

    FSDP2 takes as root the first unit whose forward runs. The trainers call the vision tower
    (``get_video_features``) outside the root's forward, and a reference model's first call is one: its
    tower would then become a root of its own and the first whole forward would stop with "FSDP requires
    running forward through the root module first". torch has no public call for this; the unit's state
    does it in its first pre-forward (``_lazy_init``, a no-op once done).
    """
    units = fsdp2_units(model)
    if units:
        units[0]._get_fsdp_state()._lazy_init()


def sharded_for_rollout(model: torch.nn.Module) -> bool:
    """Whether a rollout with ``model`` would gather parameters in every forward (ZeRO-3 or FSDP2)."""
    return zero3_partitioned(model) or bool(fsdp2_units(model))


def synced_rollout(model: torch.nn.Module, gather: bool) -> bool:
    """Whether the rollout's forwards are collectives, so every process must decode until all are done."""
    return not gather and sharded_for_rollout(model) and torch.distributed.is_available() \
        and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


@contextlib.contextmanager
def rollout_weights(model: torch.nn.Module, *, gather: bool = True) -> Iterator[torch.nn.Module]:
    """Yield the model to sample with; under ZeRO-3 / FSDP2 and ``gather``, with all its parameters whole.

    Exactly one gather on entry, released on exit (also when the rollout raises). Every process must
    enter and leave the block together: the gather and the release are collectives.
    """
    if gather and zero3_partitioned(model):
        with _deepspeed_gathered(model):
            yield model
    elif gather and fsdp2_units(model):
        with _fsdp2_unsharded(fsdp2_units(model)):
            yield model
    else:
        yield model


@contextlib.contextmanager
def _deepspeed_gathered(engine: Any) -> Iterator[None]:
    """DeepSpeed's own context (deepspeed >= 0.15): ``GatheredParameters`` over every parameter, and the
    engine's per-module fetch / release hooks taken off meanwhile (with them on, each module's
    post-forward hook would release what was gathered and the next token would gather it again);
    the hooks are registered again on exit, then the parameters are partitioned again."""
    try:
        import deepspeed
    except ImportError as exc:  # partitioned parameters without deepspeed: not a ZeRO-3 engine after all
        raise ImportError("the policy holds ZeRO-3 partitioned parameters but deepspeed cannot be imported: "
                          "pip install 'video-ktr[deepspeed]'") from exc
    unwrap = getattr(deepspeed.zero, "unwrap_model_for_generation", None)
    if unwrap is None:
        raise RuntimeError(f"deepspeed {getattr(deepspeed, '__version__', '?')} has no zero.unwrap_model_for_generation "
                           "(added in 0.15): upgrade deepspeed, or set --gather_for_generation false")
    if getattr(engine, "optimizer", None) is None:
        raise RuntimeError("rollout_weights needs the policy's DeepSpeed engine (with its optimizer), as "
                           "accelerate.prepare returns it, not the module inside it")
    with unwrap(engine):
        yield


@contextlib.contextmanager
def _fsdp2_unsharded(units: list[torch.nn.Module]) -> Iterator[None]:
    """Every FSDP2 unit unsharded (one all-gather each, all issued before the first wait), kept whole
    through any number of forwards, then given back its own reshard-after-forward setting and left as a
    forward leaves it (resharded, or whole where that setting is off).

    ``FSDPModule.unshard`` / ``reshard`` / ``set_reshard_after_forward`` are public but per unit;
    the setting to restore is read from the unit's state (torch keeps no public getter): the
    post-forward mesh of each parameter group and the root's automatic choice.
    """
    init_fsdp2_root(units[0])  # the root's own 'no reshard after forward' is decided there; do it before saving
    saved = []
    for unit in units:
        state = unit._get_fsdp_state()
        saved.append((state, state._auto_reshard_after_forward,
                      [(g, g.post_forward_mesh_info) for g in state._fsdp_param_groups]))
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        handles = [unit.unshard(async_op=True) for unit in units]
        for handle in handles:
            if handle is not None:
                handle.wait()
        yield
    finally:
        for unit, (state, auto, groups) in zip(units, saved):
            state._auto_reshard_after_forward = auto
            for group, mesh_info in groups:
                group.post_forward_mesh_info = mesh_info
            # as after any forward: a unit that reshards after its forward is sharded again; one that does not
            # (the root, accelerate's output-head unit) stays whole, and the vision tower's parameters it owns
            # stay usable by the probes' direct get_video_features calls until the backward reshards it
            if any(mesh_info is not None for _, mesh_info in groups):
                unit.reshard()
