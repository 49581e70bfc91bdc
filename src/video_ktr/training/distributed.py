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


def _kind(acc: Any) -> str:
    return str(getattr(acc, "distributed_type", "NO")).rsplit(".", 1)[-1]


def own_fsdp2(acc: Any, environ: dict[str, str] | None = None) -> bool:
    """True when this package shards the model itself with PyTorch's FSDP2 (``fully_shard``;
    training/distributed_fsdp.py): the launch asked for FSDP and accelerate set up plain CPU processes.

    accelerate 1.15 turns an FSDP launch on a machine without GPUs into ``MULTI_CPU`` (gloo, every
    process holding the full parameters), silently; PyTorch's own ``fully_shard`` runs on CPU with gloo.
    """
    return requested_backend(environ) == "FSDP" and _kind(acc) == "MULTI_CPU"


def sharded_parameters(acc: Any) -> bool:
    """True under FSDP (accelerate's or this package's own FSDP2) or DeepSpeed ZeRO-3, where a process holds
    shards of the parameters."""
    kind = _kind(acc)
    if kind == "FSDP" or own_fsdp2(acc):
        return True
    if kind == "DEEPSPEED":
        plugin = getattr(getattr(acc, "state", None), "deepspeed_plugin", None)
        return getattr(plugin, "zero_stage", 0) == 3
    return False


def backend(acc: Any) -> str:
    """The distributed set-up in force: 'single', 'DDP', 'FSDP2' (accelerate's, or this package's own on CPU
    processes), 'FSDP1', 'DeepSpeed ZeRO-<n>' (or accelerate's own name)."""
    kind = _kind(acc)
    if kind == "NO":
        return "single"
    if own_fsdp2(acc):
        return "FSDP2"
    if kind in ("MULTI_CPU", "MULTI_GPU", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU", "MULTI_MUSA", "MULTI_HPU"):
        return "DDP"
    if kind == "FSDP":
        return "FSDP2" if getattr(acc, "is_fsdp2", False) else "FSDP1"
    if kind == "DEEPSPEED":
        plugin = getattr(getattr(acc, "state", None), "deepspeed_plugin", None)
        return f"DeepSpeed ZeRO-{getattr(plugin, 'zero_stage', '?')}"
    return kind


def requested_backend(environ: dict[str, str] | None = None) -> str | None:
    """'FSDP' or 'DeepSpeed' when the launch asked for it (``accelerate launch`` with such a config sets
    ACCELERATE_USE_FSDP / ACCELERATE_USE_DEEPSPEED), else None."""
    env = os.environ if environ is None else environ
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "DeepSpeed"
    if env.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "FSDP"
    return None


def check_backend(acc: Any, cfg: Any, environ: dict[str, str] | None = None) -> None:
    """Refuse to start a set-up that would not do what the launch and the options ask.

    - FSDP or DeepSpeed asked for but accelerate set up something else (accelerate 1.15 turns an FSDP
      config on a CPU machine into plain DDP, every process holding the full parameters, silently). An FSDP
      launch on several CPU processes is the exception: the trainers shard the model themselves with FSDP2
      (:func:`own_fsdp2`), and the settings that wrapping does not honour are refused (:func:`check_own_fsdp2`);
    - DeepSpeed with --gradient_accumulation_steps > 1: its engine steps inside each backward, so every
      micro-batch would be an optimiser step;
    - DeepSpeed with a --max_grad_norm other than its config's gradient_clipping: the engine clips, with
      the JSON's value, and this run's option would be ignored.
    """
    want, have = requested_backend(environ), backend(acc)
    if own_fsdp2(acc, environ):
        check_own_fsdp2(acc, os.environ if environ is None else environ)
        have = "FSDP2"
    if want and not have.startswith(want):
        raise RuntimeError(f"the launch asked for {want} (accelerate config) but accelerate set up {have}: "
                           f"{'every process would hold the full parameters' if have in ('DDP', 'single') else 'a different set-up'}. "
                           "accelerate falls back to DDP for FSDP on a CPU machine; use a GPU machine, or launch "
                           "without the FSDP / DeepSpeed config.")
    if have.startswith("DeepSpeed"):
        if cfg.gradient_accumulation_steps > 1:
            raise RuntimeError("--gradient_accumulation_steps > 1 is not supported under DeepSpeed here: its engine "
                               "steps inside every backward, so each micro-batch would be an optimiser step. Use 1 and a "
                               "larger --per_device_train_batch_size.")
        plugin = getattr(getattr(acc, "state", None), "deepspeed_plugin", None)
        clipping = (getattr(plugin, "deepspeed_config", None) or {}).get("gradient_clipping")
        if clipping not in (None, "auto") and float(clipping) != float(cfg.max_grad_norm or 0.0):
            raise RuntimeError(f"the DeepSpeed config clips gradients at {clipping} (gradient_clipping) but "
                               f"--max_grad_norm is {cfg.max_grad_norm}: the engine clips, so set --max_grad_norm "
                               f"{clipping} (or change the JSON) to say what runs.")


def check_own_fsdp2(acc: Any, env: dict[str, str]) -> None:
    """The FSDP settings of the launch that this package's own FSDP2 wrapping (CPU processes) honours, and a
    refusal for each one it does not: a setting silently ignored would not say what runs."""
    version = env.get("FSDP_VERSION", "1")
    if version != "2":
        raise RuntimeError(f"the launch asked for FSDP version {version} on CPU processes: accelerate cannot set up FSDP "
                           "without GPUs, and this package's own wrapping is FSDP2 (fully_shard); set fsdp_version: 2.")
    refused = {
        "FSDP_OFFLOAD_PARAMS": "fsdp_offload_params (the parameters are already in CPU memory)",
        "FSDP_CPU_RAM_EFFICIENT_LOADING": "fsdp_cpu_ram_efficient_loading (transformers would load the weights on the "
                                          "main process only and leave the others' empty)",
        "FSDP_ACTIVATION_CHECKPOINTING": "fsdp_activation_checkpointing (use --gradient_checkpointing true)",
    }
    for name, what in refused.items():
        if env.get(name, "false").lower() == "true":
            raise RuntimeError(f"FSDP2 on CPU processes does not support {what}: set it to false in the accelerate config.")
    policy = env.get("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP")
    if policy != "TRANSFORMER_BASED_WRAP":
        raise RuntimeError(f"FSDP2 on CPU processes wraps per decoder layer and vision block (TRANSFORMER_BASED_WRAP); "
                           f"the launch asked for fsdp_auto_wrap_policy {policy}.")
    precision = str(getattr(acc, "mixed_precision", "no"))
    if precision != "no":
        raise RuntimeError(f"FSDP2 on CPU processes runs without mixed precision (the launch asked for {precision}); "
                           "set mixed_precision: 'no' and choose the weights' dtype with --dtype.")


def fsdp_wrap_classes(environ: dict[str, str] | None = None) -> list[str]:
    """fsdp_transformer_layer_cls_to_wrap of the launch (empty: the model's own _no_split_modules)."""
    env = os.environ if environ is None else environ
    return [name.strip() for name in env.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if name.strip()]


def fsdp_reshard_after_forward(environ: dict[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return env.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() not in ("false", "no_shard", "shard_grad_op")


def parameter_shard_fraction(model: Any) -> float | None:
    """Elements of the parameters this process holds / elements of the whole model (1.0 unsharded; ~1/N under
    FSDP2 over N processes); None without parameters."""
    local = total = 0
    for p in model.parameters():
        total += p.numel()
        local += p.to_local().numel() if hasattr(p, "to_local") else p.numel()
    return local / total if total else None


def run_info(acc: Any, model: Any) -> dict[str, Any]:
    """What ran: world size, the distributed set-up in force, whether parameters are sharded, dtype, device."""
    param = next(iter(model.parameters()), None)
    config = getattr(acc.unwrap_model(model), "config", None)
    return {
        "world_size": acc.num_processes,
        "distributed": backend(acc),
        "sharded_parameters": sharded_parameters(acc),
        "fsdp_wrapping": ("video_ktr (fully_shard on CPU processes: accelerate cannot set up FSDP without GPUs)"
                          if own_fsdp2(acc) else "accelerate" if _kind(acc) == "FSDP" else None),
        "parameter_shard_fraction": parameter_shard_fraction(model),
        "mixed_precision": str(getattr(acc, "mixed_precision", "no")),
        "dtype": str(param.dtype).removeprefix("torch.") if param is not None else None,
        "device": str(acc.device),
        "attn_implementation": getattr(config, "_attn_implementation", None),
        "launch_requested": requested_backend(),
    }


def fill_deepspeed_batch_size(acc: Any, micro_batch: int) -> None:
    """Give DeepSpeed's ``train_micro_batch_size_per_gpu`` a number where the launch left it ``auto``.

    accelerate fills ``auto`` from a prepared data loader's batch size, and the trainers prepare no data
    loader (their data order is their own): without this, ``accelerate.prepare(model, optimizer)`` stops
    under every DeepSpeed launch whose config does not spell the value out (accelerate's own
    ``deepspeed_config:`` section in a YAML, as configs/accelerate/zero*.yaml, always leaves it ``auto``).
    DeepSpeed only uses it in its ``train_batch_size`` bookkeeping (micro x accumulation x processes).
    """
    plugin = getattr(getattr(acc, "state", None), "deepspeed_plugin", None)
    if not backend(acc).startswith("DeepSpeed") or plugin is None:
        return
    if plugin.deepspeed_config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = int(micro_batch)
