"""How the training processes hold the model, for `video-ktr estimate`: read from the accelerate config
the training is launched with (``accelerate launch --config_file X``), or from ``--zero_stage``.

What the estimate needs of a launch: which of weights, gradients and AdamW states are split over the
processes (DeepSpeed's ZeRO stage; FSDP full sharding splits all three, FSDP with
``reshard_after_forward: false`` keeps the weights whole between forward and backward), what is offloaded
to CPU memory, the mixed precision and the process count. The keys read are the ones accelerate 1.15's
``accelerate config`` writes (``distributed_type``, ``num_processes``, ``mixed_precision``, ``use_cpu``,
``deepspeed_config.{zero_stage, offload_optimizer_device, offload_param_device, deepspeed_config_file}``,
``fsdp_config.{fsdp_version, fsdp_reshard_after_forward, fsdp_sharding_strategy, fsdp_offload_params}``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from video_ktr.utils.config import load_yaml

DDP_TYPES = ("NO", "MULTI_GPU", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU", "MULTI_MUSA", "MULTI_HPU", "MULTI_SDAA")


@dataclass(frozen=True)
class Launch:
    """The distributed set-up of a training launch, as far as memory per GPU goes."""

    backend: str = "DDP"  # "DDP" (one process too), "DeepSpeed" or "FSDP"
    zero_stage: int = 0  # what is sharded: 1 AdamW states, 2 also gradients, 3 also weights (FSDP: 3 or 2, see above)
    num_processes: int | None = None  # None: not said (the --num_gpus default then)
    mixed_precision: str | None = None  # accelerate's: "no", "bf16", "fp16" (None: not said)
    offload_optimizer: bool = False  # AdamW states (and their step) in CPU memory
    offload_params: bool = False  # sharded weights in CPU memory (ZeRO-3 offload_param, FSDP offload)
    source: str = "--zero_stage"

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.backend not in ("DDP", "DeepSpeed", "FSDP"):
            raise ValueError(f"backend must be DDP, DeepSpeed or FSDP, got {self.backend!r}")

    @classmethod
    def for_zero_stage(cls, zero_stage: int) -> Launch:
        """What ``--zero_stage`` alone means: DeepSpeed with that stage (0: plain DDP)."""
        return cls(backend="DeepSpeed" if zero_stage else "DDP", zero_stage=zero_stage)

    @property
    def sharded_weights(self) -> bool:
        """Each process holds a shard of the weights between steps (ZeRO-3, FSDP)."""
        return self.zero_stage == 3 or self.backend == "FSDP"

    @property
    def label(self) -> str:
        if self.backend == "DeepSpeed":
            text = f"DeepSpeed ZeRO-{self.zero_stage}"
        elif self.backend == "FSDP":
            text = "FSDP2 " + ("full sharding" if self.zero_stage == 3 else "reshard_after_forward false")
        else:
            text = "DDP"
        offload = [name for name, on in (("optimizer", self.offload_optimizer), ("parameters", self.offload_params)) if on]
        return text + (f", {' and '.join(offload)} offloaded to CPU" if offload else "")


def _bool(value: Any) -> bool:
    return value is True or str(value).strip().lower() in ("true", "1", "yes")


def _offloaded(device: Any) -> bool:
    return str(device or "none").lower() in ("cpu", "nvme")


def read_accelerate_config(path: str | Path) -> Launch:
    """The :class:`Launch` of an accelerate config file (YAML or JSON), with errors naming the file and key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--accelerate_config {path}: no such file")
    raw = json.loads(path.read_text()) if path.suffix == ".json" else load_yaml(path)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: not an accelerate config (a mapping of keys)")
    if _bool(raw.get("use_cpu", False)):
        raise ValueError(f"{path}: use_cpu is true, a CPU launch; the estimate is per GPU")
    kind = str(raw.get("distributed_type", "NO")).upper().removeprefix("DISTRIBUTEDTYPE.")
    processes = raw.get("num_processes")
    common = dict(num_processes=int(processes) if processes is not None else (1 if kind == "NO" else None),
                  mixed_precision=str(raw.get("mixed_precision") or "no").lower(), source=str(path))
    if kind in DDP_TYPES:
        return Launch(backend="DDP", **common)
    if kind == "DEEPSPEED":
        return _deepspeed_launch(path, raw.get("deepspeed_config") or {}, common)
    if kind == "FSDP":
        return _fsdp_launch(path, raw.get("fsdp_config") or {}, common)
    raise ValueError(f"{path}: distributed_type {kind!r} is not modelled by the estimate (DDP, DEEPSPEED or FSDP)")


def _deepspeed_launch(path: Path, section: dict[str, Any], common: dict[str, Any]) -> Launch:
    file = section.get("deepspeed_config_file")
    if file:  # a DeepSpeed JSON: its zero_optimization section and precision flags say it all
        json_path = Path(file)
        if not json_path.is_file():
            raise FileNotFoundError(f"{path}: deepspeed_config.deepspeed_config_file {file}: no such file "
                                    "(relative paths are read from the current folder, as accelerate does)")
        ds = json.loads(json_path.read_text())
        zero = ds.get("zero_optimization") or {}
        stage = zero.get("stage", 0)
        for flag in ("bf16", "fp16"):
            if _bool((ds.get(flag) or {}).get("enabled", False)):
                common = {**common, "mixed_precision": flag}
        offload_opt = _offloaded((zero.get("offload_optimizer") or {}).get("device"))
        offload_par = _offloaded((zero.get("offload_param") or {}).get("device"))
        where = f"{json_path} zero_optimization.stage"
    else:
        stage = section.get("zero_stage", 2)  # accelerate's default stage
        offload_opt = _offloaded(section.get("offload_optimizer_device"))
        offload_par = _offloaded(section.get("offload_param_device"))
        where = f"{path} deepspeed_config.zero_stage"
    try:
        stage = int(stage)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {stage!r} is not a ZeRO stage (0-3)") from None
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"{where}: {stage} is not a ZeRO stage (0-3)")
    return Launch(backend="DeepSpeed", zero_stage=stage, offload_optimizer=offload_opt,
                  offload_params=offload_par and stage == 3, **common)


def _fsdp_launch(path: Path, section: dict[str, Any], common: dict[str, Any]) -> Launch:
    # FSDP1's sharding strategy and FSDP2's reshard_after_forward (accelerate accepts the strategy names there too)
    value = section.get("fsdp_reshard_after_forward", section.get("fsdp_sharding_strategy", "FULL_SHARD"))
    text = str(value).strip().upper()
    if text in ("TRUE", "1", "FULL_SHARD"):
        stage = 3
    elif text in ("FALSE", "0", "2", "SHARD_GRAD_OP"):
        stage = 2
    elif text in ("3", "NO_SHARD"):
        return Launch(backend="DDP", **common)
    else:
        raise ValueError(f"{path}: fsdp_config reshard / sharding strategy {value!r} is not modelled by the estimate "
                         "(FULL_SHARD / true, SHARD_GRAD_OP / false, NO_SHARD)")
    offload = _bool(section.get("fsdp_offload_params", False))
    return Launch(backend="FSDP", zero_stage=stage, offload_optimizer=offload, offload_params=offload, **common)


def resolve_launch(accelerate_config: str | None, zero_stage: int | None, num_gpus: int | None,
                   default_gpus: int = 8) -> tuple[Launch, int]:
    """The launch and process count of an estimate: the accelerate config file, with ``--zero_stage`` and
    ``--num_gpus`` given on the command line winning over it (as ``accelerate launch``'s own flags win over
    its config file); without a file, ``--zero_stage`` (default 0) and ``--num_gpus`` (default 8)."""
    if accelerate_config is None:
        return Launch.for_zero_stage(zero_stage or 0), num_gpus if num_gpus is not None else default_gpus
    launch = read_accelerate_config(accelerate_config)
    if zero_stage is not None and launch.backend != "DeepSpeed" and not (launch.backend == "DDP" and zero_stage == 0):
        raise ValueError(f"--zero_stage {zero_stage} with {accelerate_config}, a {launch.label} launch: ZeRO stages "
                         "are DeepSpeed's; drop --zero_stage or use a DeepSpeed config")
    if zero_stage is not None and zero_stage != launch.zero_stage:
        from dataclasses import replace

        launch = replace(launch, zero_stage=zero_stage, offload_params=launch.offload_params and zero_stage == 3,
                         source=f"{accelerate_config}, --zero_stage {zero_stage}")
    gpus = num_gpus if num_gpus is not None else (launch.num_processes or default_gpus)
    return launch, gpus
