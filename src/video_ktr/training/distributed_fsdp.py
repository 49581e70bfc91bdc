"""FSDP2 (PyTorch's ``fully_shard``) where accelerate cannot set it up, and FSDP2 state dicts for checkpoints.

accelerate 1.15 turns an FSDP launch on a machine without GPUs into plain DDP (``MULTI_CPU``, every process
holding the whole model). When the launch asked for FSDP and accelerate set up CPU processes
(:func:`video_ktr.training.distributed.own_fsdp2`), :func:`shard_model` wraps the model itself, the way
accelerate's TRANSFORMER_BASED_WRAP does on GPUs: one ``fully_shard`` unit per decoder layer and per vision
block (the launch's fsdp_transformer_layer_cls_to_wrap, else the model's ``_no_split_modules``), one for
the vision tower (the trainers call ``get_image_features`` / ``get_video_features`` directly, outside the
root's forward), then the root (embeddings, the tied output head, the final norm). Each process then holds
a DTensor shard (``Shard(0)`` over a 1-D device mesh) of every parameter.

The state-dict helpers serve any model wrapped with FSDP2 (accelerate's on GPUs too): they are collectives
that every process enters the same number of times, in the same order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from video_ktr.model.adapters import adapter_for
from video_ktr.training.rollout_weights import init_fsdp2_root


def is_fsdp2(model: Any) -> bool:
    """Whether ``model`` (or, behind accelerate's wrappers, its module) was wrapped with ``fully_shard``."""
    from torch.distributed.fsdp import FSDPModule

    while model is not None:
        if isinstance(model, FSDPModule):
            return True
        model = getattr(model, "_orig_mod", None)  # a compiled module
    return False


def _fsdp_module(model: Any) -> Any:
    while not _is_fsdp_module(model) and getattr(model, "_orig_mod", None) is not None:
        model = model._orig_mod
    return model


def _is_fsdp_module(model: Any) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gradients_unsynced(accelerator: Any, model: Any, unsynced: bool = True) -> Iterator[None]:
    """No gradient reduction across processes inside the block (``unsynced``): the micro-batches of an optimiser
    step before its last one (forward and backward both inside). The gradients accumulate locally and are
    reduced once, by the last micro-batch's backward.

    FSDP2 (accelerate's, or this package's own wrapping on CPU processes, which accelerate's ``no_sync`` does
    not see: it set up plain CPU processes): ``set_requires_gradient_sync(False)`` on every unit, so no
    reduce-scatter runs until the last micro-batch (each unit keeps its unsharded gradient meanwhile, the price
    of skipping the communication, as with accelerate's own ``no_sync`` under FSDP2). Anything else:
    accelerate's ``no_sync`` (DDP's; nothing on one process; DeepSpeed refuses accumulation at start-up)."""
    if not unsynced:
        yield
        return
    if is_fsdp2(model):
        module = _fsdp_module(model)
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
        return
    with accelerator.no_sync(model):
        yield


def wrap_class_names(model: torch.nn.Module, requested: list[str] | None = None) -> set[str]:
    """The classes wrapped one by one: ``requested`` (the launch's list), else the adapter's decoder layer and
    vision block, else the model's ``_no_split_modules``."""
    if requested:
        names = set(requested)
    else:
        names = set(getattr(model, "_no_split_modules", None) or ())
        try:
            names |= {n for n in adapter_for(model).wrap_classes() if n}
        except (KeyError, ValueError, AttributeError):
            pass
    present = {type(m).__name__ for m in model.modules()}
    missing = sorted(names - present)
    if requested and missing:
        raise ValueError(f"fsdp_transformer_layer_cls_to_wrap names {missing}, which {type(model).__name__} does not "
                         f"contain; its layer classes include {sorted(n for n in present if 'Layer' in n or 'Block' in n)[:8]}")
    if not names & present:
        raise ValueError(f"no class to wrap one by one in {type(model).__name__} (looked for {sorted(names)}): set "
                         "fsdp_transformer_layer_cls_to_wrap in the accelerate config")
    return names & present


def shard_model(model: torch.nn.Module, *, reshard_after_forward: bool = True,
                wrap_classes: list[str] | None = None) -> list[str]:
    """Wrap ``model`` in place with ``fully_shard`` over all processes (CPU, gloo); returns the units' names,
    the root last as ''. Every process must call it with the same model."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized():
        raise RuntimeError("FSDP2 needs torch.distributed set up (launch with accelerate launch or torchrun)")
    classes = wrap_class_names(model, wrap_classes)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    named = list(model.named_modules())
    layers = [name for name, m in named if type(m).__name__ in classes]
    towers = vision_towers(model, layers)
    units = []
    for name in [*reversed(layers), *towers]:  # bottom-up
        fully_shard(model.get_submodule(name), mesh=mesh, reshard_after_forward=reshard_after_forward)
        units.append(name)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    units.append("")
    init_fsdp2_root(model)  # the tower may run before the whole model does (the reference's first use)
    return units


def vision_towers(model: torch.nn.Module, layers: list[str]) -> list[str]:
    """Names of the modules that own the list of the wrapped vision blocks among ``layers`` (module names).

    The vision tower must be a unit of its own: the trainers call it through get_image_features /
    get_video_features, outside the root's forward. Left in the root unit, its patch embedding and merger are
    still sharded there after the root resharded (after a backward, after a rollout released the gathered
    weights), and the call fails ("got mixed torch.Tensor and DTensor", checked on two CPU processes).
    """
    return sorted({name.rsplit(".", 2)[0] for name in layers if "Vision" in type(model.get_submodule(name)).__name__
                   and name.count(".") >= 2})


def wrap_vision_towers_too(plugin: Any, model: torch.nn.Module) -> list[str]:
    """Add the vision tower's class to the classes accelerate's FSDP2 plugin wraps one by one (its
    TRANSFORMER_BASED_WRAP takes ``transformer_cls_names_to_wrap``, else the model's ``_no_split_modules``,
    which name the blocks but not the tower; see :func:`vision_towers`). Returns the names now wrapped."""
    names = list(getattr(plugin, "transformer_cls_names_to_wrap", None) or getattr(model, "_no_split_modules", None) or [])
    layers = [name for name, m in model.named_modules() if type(m).__name__ in names]
    towers = [type(model.get_submodule(t)).__name__ for t in vision_towers(model, layers)]
    added = [t for t in dict.fromkeys(towers) if t not in names]
    if added:
        plugin.transformer_cls_names_to_wrap = [*names, *added]
    return [*names, *added]


def rebind_optimizer(optimizer: torch.optim.Optimizer, before: dict[int, str], model: torch.nn.Module) -> None:
    """Point ``optimizer`` at the sharded parameters ``fully_shard`` put in place of the ones it was built on.

    ``before`` maps id(parameter) -> name, taken before the wrapping. The optimiser must hold no state yet.
    """
    if optimizer.state:
        raise RuntimeError("the optimiser already holds state: shard the model before the first step")
    now = dict(model.named_parameters())
    for group in optimizer.param_groups:
        group["params"] = [now[before[id(p)]] for p in group["params"]]


def parameter_names(model: torch.nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters()}


def _options(**kwargs: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kwargs)


def full_model_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights, on the CPU of the main process (an empty dict on the others); a collective."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_options(full_state_dict=True, cpu_offload=True))
    for name in tied_aliases(model):  # the gathered copies no longer share storage: keep one name, as
        state.pop(name, None)         # save_pretrained does for a model that is not sharded
    return state


def tied_aliases(model: torch.nn.Module) -> list[str]:
    """Names of parameters that are the same tensor as an earlier one (a tied output head)."""
    first: dict[int, str] = {}
    return [name for name, p in model.named_parameters(remove_duplicate=False) if first.setdefault(id(p), name) != name]


def load_full_model_state_dict(model: torch.nn.Module, weights: dict[str, torch.Tensor], *,
                               from_main_process: bool = False) -> None:
    """The whole weights (keys of ``model.state_dict()``) into ``model``; each process keeps its shard. With
    ``from_main_process`` only the main process passes them (the others an empty dict) and they are broadcast
    tensor by tensor; a collective then."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, weights, options=_options(full_state_dict=True, strict=False,
                                                          broadcast_from_rank0=from_main_process))


def load_full_optimizer_state_dict(model: torch.nn.Module, optimizer: Any, state: dict[str, Any], *,
                                   from_main_process: bool = False) -> None:
    """The whole optimiser state (keyed by parameter name: FSDP2 checkpoints written before the sharded format,
    training/optimizer_shards.py) into ``optimizer``; each process keeps its shard.
    ``from_main_process``: as for :func:`load_full_model_state_dict`."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, torch_optimizer(optimizer), state,
                             options=_options(full_state_dict=True, broadcast_from_rank0=from_main_process))


def torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer  # accelerate's AcceleratedOptimizer
    return optimizer


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor; a plain tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t
