"""The GPU check's ``dist`` part: FSDP2 and DeepSpeed ZeRO-3 launches that save a checkpoint and resume from it.

Used by benchmarks/gpu_check.py (``--parts dist``). For each set-up the tiny default model trains through
``accelerate launch --config_file configs/accelerate/<config>.yaml -m video_ktr train`` as a user launches it:

1. an unbroken run of ``steps`` optimiser steps that saves at step ``save`` (and at the end);
2. the checkpoint of step ``save`` copied into a new output folder and resumed from there (``latest``) to the
   same last step.

Recorded per set-up: each launch's exit code and wall time; what ``run_info.json`` says ran (the distributed
set-up, sharded parameters, the share of elements each process holds); the checkpoint's optimiser format
(``sharded``: each process's DCP shards under ``optimizer/``; ``deepspeed``: the engine's partitions) and its
files; the largest difference between the resumed run's final weights and the unbroken run's, beside how far
the weights moved in training (``ok`` when the difference is under 1 % of the move: bf16 compute and the
GPU's atomics make two runs differ a little); whether ``from_pretrained`` loads the resumed run's model.

On a GPU: FSDP2 (``fsdp.yaml``, accelerate's own FSDP2 plugin, one process) and, when ``deepspeed`` imports,
ZeRO-3 (``zero3.yaml``, one process). Without a GPU (``--small`` dry run): FSDP2 over two CPU processes
(``fsdp-cpu-2proc.yaml``: this package's own wrapping, since accelerate cannot set up FSDP without GPUs);
ZeRO-3 is then recorded as not run. One GPU shards nothing (each unit is whole on its one process), but
accelerate's FSDP2 and DeepSpeed code paths, NCCL, the DTensor / partitioned state dicts and the checkpoint
formats all run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs" / "accelerate"


def letter_e(completions: list[str], solutions: list[str], problem_types: list[str], **kwargs: Any) -> list[float]:
    """The reward of these runs (``--reward_funcs gpu_check_dist:letter_e``): the share of a completion's characters
    that are 'e'. A random model earns it now and then, so the advantages are not all 0 and the weights move."""
    return [text.count("e") / len(text) if text else 0.0 for text in completions]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH", "")]))
    return env


def launch_config(source: Path, target: Path, processes: int) -> Path:
    """``source`` with ``num_processes`` set (the repository's configs say 8)."""
    import yaml

    config = yaml.safe_load(source.read_text())
    config["num_processes"] = processes
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(yaml.safe_dump(config, sort_keys=False))
    return target


def _launch(config: Path, processes: int, args: list[str], log: Path, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes",
           str(processes), "--main_process_port", str(_free_port()), "-m", "video_ktr", "train", *args]
    t0 = time.perf_counter()
    with log.open("w") as fh:
        try:
            rc = subprocess.run(cmd, env=_env(), cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    result = {"exit_code": rc, "seconds": round(time.perf_counter() - t0, 1)}
    if rc:
        result["output_tail"] = log.read_text()[-2000:]
    return result


def _weights(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    weights: dict[str, Any] = {}
    for file in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(str(file)))
    return weights


def compare(unbroken: Path, resumed: Path, start: Path) -> dict[str, Any]:
    """The largest |resumed - unbroken| over all weights, and the largest |unbroken - start| (how far training
    moved them); the tensors of the three folders must have the same names."""
    a, b, s = _weights(unbroken), _weights(resumed), _weights(start)
    if not a or a.keys() != b.keys():
        return {"same_tensor_names": False, "unbroken": len(a), "resumed": len(b)}
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    moved = max(float((a[k].float() - s[k].float()).abs().max()) for k in a if k in s)
    return {"same_tensor_names": True, "max_abs_difference": diff, "max_abs_move": moved,
            "difference_over_move": round(diff / moved, 6) if moved else None}


def _checkpoint_files(folder: Path) -> dict[str, Any]:
    state = json.loads((folder / "trainer_state.json").read_text())
    mode = state.get("optimizer_state")
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    out: dict[str, Any] = {"optimizer_state": mode, "optimizer_processes": state.get("optimizer_processes"),
                           "files": files[:40]}
    if mode == "sharded":
        out["optimizer_shard_bytes"] = {p.name: p.stat().st_size for p in sorted((folder / "optimizer").glob("*.distcp"))}
    return out


def _loads(folder: Path) -> bool | str:
    import torch
    from transformers import AutoModelForImageTextToText

    try:
        AutoModelForImageTextToText.from_pretrained(str(folder), dtype=torch.float32)
        return True
    except Exception as exc:  # recorded, not raised: the other set-ups still run
        return f"{type(exc).__name__}: {exc}"[:500]


def run_setup(out: Path, paths: dict, name: str, config: Path, processes: int, small: bool,
              timeout: float = 600) -> dict[str, Any]:
    """Train, save, copy the checkpoint, resume; see the module docstring."""
    import torch

    work = out / name
    shutil.rmtree(work, ignore_errors=True)
    cfg = launch_config(config, work / "accelerate.yaml", processes)
    steps, save = (2, 1) if small else (4, 2)
    media = ["--max_frames", "8", "--video_fps", "4", "--min_pixels", "784", "--max_pixels", "3136"]
    rows = ["--per_device_train_batch_size", "1", "--num_generations", "2", "--max_completion_length", "8",
            "--token_selection", "none"] if small else \
        ["--per_device_train_batch_size", "2", "--num_generations", "4", "--max_completion_length", "32"]
    dtype = ["--dtype", "bfloat16"] if torch.cuda.is_available() else []
    base = ["--model_name_or_path", str(paths["tiny"]), "--dataset", str(paths["cli_data"] / "train.json"), *media, *rows,
            *dtype, "--max_steps", str(steps), "--save_steps", str(save), "--learning_rate", "1e-3", "--logging_steps", "1",
            "--max_grad_norm", "1.0", "--reward_funcs", "gpu_check_dist:letter_e"]  # zero3.yaml's gradient_clipping (the engine clips; the trainer refuses another)
    unbroken, resumed = work / "unbroken", work / "resumed"
    result: dict[str, Any] = {"config": str(config.relative_to(ROOT)), "processes": processes, "steps": steps,
                              "saved_at": save}
    result["unbroken"] = _launch(cfg, processes, [*base, "--output_dir", str(unbroken)], work / "unbroken.log", timeout)
    checkpoint = unbroken / f"checkpoint-{save}"
    if result["unbroken"]["exit_code"] or not (checkpoint / "trainer_state.json").is_file():
        result["ok"] = False
        return result
    info = json.loads((unbroken / "run_info.json").read_text())
    result["run_info"] = {k: info.get(k) for k in ("world_size", "distributed", "sharded_parameters",
                                                   "parameter_shard_fraction", "fsdp_wrapping", "dtype", "device")}
    result["checkpoint"] = _checkpoint_files(checkpoint)
    shutil.copytree(checkpoint, resumed / checkpoint.name)
    result["resumed"] = _launch(cfg, processes, [*base, "--output_dir", str(resumed), "--resume_from_checkpoint", "latest"],
                                work / "resumed.log", timeout)
    if result["resumed"]["exit_code"]:
        result["ok"] = False
        return result
    result["weights"] = compare(unbroken, resumed, paths["tiny"])
    result["from_pretrained_loads"] = _loads(resumed)
    w = result["weights"]
    result["ok"] = bool(w.get("same_tensor_names") and w["max_abs_move"] > 0
                        and w["max_abs_difference"] <= max(1e-6, 0.01 * w["max_abs_move"])
                        and result["from_pretrained_loads"] is True)
    return result


def part_dist(check: Any, paths: dict) -> dict[str, Any]:
    """FSDP2 and (DeepSpeed importable, a GPU) ZeRO-3, each saving and resuming once."""
    import torch

    out = check.out / "dist"
    gpu = torch.cuda.is_available()
    results: dict[str, Any] = {}
    setups = [("fsdp2", CONFIGS / ("fsdp.yaml" if gpu else "fsdp-cpu-2proc.yaml"), 1 if gpu else 2)]
    if gpu and importlib.util.find_spec("deepspeed") is not None:
        setups.append(("zero3", CONFIGS / "zero3.yaml", 1))
    else:
        results["zero3"] = {"ok": None, "not_run": "no GPU" if not gpu else "deepspeed does not import here"}
    for name, config, processes in setups:
        left = check.left()
        if left <= 60:
            results[name] = {"ok": None, "not_run": "budget spent"}
            continue
        results[name] = run_setup(out, paths, name, config, processes, check.args.small, timeout=min(600, left / 2))
        r = results[name]
        check.log(f"dist {name}: {'ok' if r.get('ok') else 'FAILED'}; {r.get('run_info', {}).get('distributed')}, "
                  f"optimizer {r.get('checkpoint', {}).get('optimizer_state')}, weights {r.get('weights')}")
    return results


def summary_lines(results: dict[str, Any]) -> list[str]:
    lines = ["## FSDP2 / ZeRO-3: save, then resume from the checkpoint", "",
             "| set-up | result | ran as | optimiser state | resumed - unbroken | moved | from_pretrained | wall (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if r.get("not_run"):
            lines.append(f"| {name} | not run: {r['not_run']} | | | | | | |")
            continue
        info, w = r.get("run_info", {}), r.get("weights", {})
        wall = sum(r[k]["seconds"] for k in ("unbroken", "resumed") if k in r)
        lines.append(f"| {name} | {'ok' if r.get('ok') else 'FAILED'} | {info.get('distributed')} x {info.get('world_size')}, "
                     f"sharded {info.get('sharded_parameters')} | {r.get('checkpoint', {}).get('optimizer_state')} | "
                     f"{w.get('max_abs_difference')} | {w.get('max_abs_move')} | {r.get('from_pretrained_loads')} | {wall:.0f} |")
    return [*lines, ""]
