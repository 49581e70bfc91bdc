"""The frozen reference model of the KL term, held the way the policy is.

    one process, DDP      a whole copy on each process (accelerate's prepare_model, evaluation mode)
    DeepSpeed ZeRO-3      its own DeepSpeed inference engine, partitioned like the policy: the policy's
                          DeepSpeed config without optimizer and scheduler, stage 3 and parameter
                          offload kept (TRL's prepare_deepspeed)
    DeepSpeed ZeRO-0/1/2  a DeepSpeed engine of stage 0: whole on each process (the policy's weights
                          are whole there too), in the engine's precision like the policy
    FSDP2 (accelerate)    fully_shard like the policy, by accelerate's own fsdp2_prepare_model (the same
                          plugin: per-layer units, mixed precision, and with cpu_ram_efficient_loading the
                          main process's weights sent to the others, which loaded empty ones); every unit
                          resharded after its forward (no backward to keep them for) but the root, whose own
                          parameters stay whole (the tower is called outside the root's forward)
    FSDP2 (own wrapping)  the function that wrapped the policy, passed as ``fsdp_wrap``
    LoRA                  no second model: the policy with its adapters disabled (KTRTrainer._reference_logp)

accelerate's ``prepare_model(ref, evaluation_mode=True)`` alone only moves a model to the device
under DeepSpeed and does not even do that under FSDP: a ZeRO-3 reference loaded partitioned
(``zero3_init_flag``) would run without an engine to gather its layers, and an FSDP reference loaded
with ``cpu_ram_efficient_loading`` would hold uninitialised weights on every process but the main one.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

from video_ktr.training.distributed import backend
from video_ktr.training.rollout_weights import init_fsdp2_root


def reference_deepspeed_config(policy_config: dict[str, Any]) -> dict[str, Any]:
    """The reference engine's DeepSpeed config from the policy's (after accelerate filled its ``auto`` values).

    No optimizer, scheduler or optimizer offload (nothing trains); ZeRO stage 3 and its parameter
    offload kept, any other stage turned into 0 (whole weights on each process, as the policy's are).
    """
    config = copy.deepcopy(policy_config)
    for key in ("optimizer", "scheduler", "zero_allow_untested_optimizer"):
        config.pop(key, None)
    zero = dict(config.get("zero_optimization") or {})
    stage = int(zero.get("stage", 0))
    zero.pop("offload_optimizer", None)
    if stage != 3:
        zero = {"stage": 0}
    config["zero_optimization"] = zero
    left = sorted(_auto_keys(config))
    if left:
        raise ValueError(f"the DeepSpeed config still has 'auto' values at {', '.join(left)} after the policy was "
                         "prepared: give them numbers in the DeepSpeed config so the reference engine can use them")
    return config


def _auto_keys(config: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in config.items():
        if isinstance(value, dict):
            keys += _auto_keys(value, f"{prefix}{key}.")
        elif value == "auto":
            keys.append(prefix + key)
    return keys


def prepare_reference(ref: torch.nn.Module, acc: Any, *,
                      fsdp_wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None) -> torch.nn.Module:
    """``ref`` (frozen, eval mode) held like the policy under the set-up of ``acc``; see the module's table.

    Every process must call it (under ZeRO-3 and FSDP2 the wrapping is a collective). ``fsdp_wrap``:
    the function that wrapped the policy with ``fully_shard`` when accelerate did not (a CPU run).
    """
    ref.eval().requires_grad_(False)
    kind = backend(acc)
    if fsdp_wrap is not None:
        ref = fsdp_wrap(ref)
    elif kind.startswith("DeepSpeed"):
        ref = _deepspeed_reference(ref, acc)
    elif kind.startswith("FSDP"):
        ref = _fsdp_reference(ref, acc)
    else:
        ref = acc.prepare_model(ref, evaluation_mode=True)
    if hasattr(ref, "set_reshard_after_forward"):  # FSDP2
        _frozen_fsdp2(ref)
    ref.eval()
    return ref


def _frozen_fsdp2(ref: Any) -> None:
    """A frozen FSDP2 model: every unit resharded after its forward (no backward to keep it whole for), except
    the root, whose own parameters are gathered now and stay whole.

    The reference's first call of a pass is its vision tower (``encode_visual_once``), outside the root's
    forward; the parameters the root unit owns there (with accelerate's wrapping: the tower's patch embedding
    and merger; with ours: the embeddings and final norm) must be whole by then, and no root forward has run.
    """
    ref.set_reshard_after_forward(True)
    ref.set_reshard_after_forward(False, recurse=False)
    init_fsdp2_root(ref)  # the outermost unit is FSDP2's root, not the tower called first
    ref.unshard()


def _deepspeed_reference(ref: torch.nn.Module, acc: Any) -> torch.nn.Module:
    import deepspeed  # the deepspeed extra; present whenever accelerate set DeepSpeed up

    config = reference_deepspeed_config(acc.state.deepspeed_plugin.deepspeed_config)
    engine, *_ = deepspeed.initialize(model=ref, config=config)
    return engine


def _fsdp_reference(ref: torch.nn.Module, acc: Any) -> torch.nn.Module:
    if not getattr(acc, "is_fsdp2", False):
        raise ValueError("the reference model under FSDP is written for FSDP2 (fsdp_version: 2 in the accelerate "
                         "config, as configs/accelerate/fsdp.yaml); FSDP1 is not supported here")
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    return fsdp2_prepare_model(acc, ref)
