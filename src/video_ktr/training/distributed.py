"""How the accelerator is set up for a launch: shared by `train`, `sft` and `ablate`."""

from __future__ import annotations

import os
from typing import Any

import torch


def launched_world_size() -> int:
    """The process count a launcher (torchrun, accelerate launch, mpirun) asked for."""
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        value = os.environ.get(name)
        if value and value.isdigit():
            return int(value)
    return 1


def accelerator_device_kwargs() -> dict[str, Any]:
    """``cpu=True`` when several processes were launched on a machine without an accelerator device.

    accelerate only sets up CPU data parallelism (gloo) when told to: without it, ``torchrun
    --nproc_per_node 2`` on a CPU machine silently runs two independent single-process trainings on
    the same data, each writing the same files.
    """
    has_device = bool(getattr(torch, "accelerator", None) and torch.accelerator.is_available()) or torch.cuda.is_available()
    return {"cpu": True} if launched_world_size() > 1 and not has_device else {}


def check_process_count(acc: Any) -> None:
    launched = launched_world_size()
    if launched > 1 and acc.num_processes != launched:
        raise RuntimeError(f"{launched} processes were launched but accelerate set up {acc.num_processes}: they would each "
                           "train alone on the same data. Launch with `accelerate launch` and a matching config.")


def sharded_parameters(acc: Any) -> bool:
    """True under FSDP or DeepSpeed ZeRO-3, where a process holds shards of the parameters."""
    kind = str(getattr(acc, "distributed_type", ""))
    if kind.endswith("FSDP"):
        return True
    if kind.endswith("DEEPSPEED"):
        plugin = getattr(getattr(acc, "state", None), "deepspeed_plugin", None)
        return getattr(plugin, "zero_stage", 0) == 3
    return False
