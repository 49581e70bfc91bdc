"""Measuring what an estimate predicts, on CPU: the peak memory of a few real training steps of a config
in a fresh subprocess (used by the tests and docs/estimate.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from video_ktr.analysis.estimate import estimate
from video_ktr.analysis.model_size import resolve_arch
from video_ktr.data.synth import generate
from video_ktr.model.tiny import build_tiny_model
from video_ktr.training.grpo_config import TrainConfig
from video_ktr.utils.config import from_dict

_CHILD = r"""
import json, os, resource, sys
spec = json.loads(sys.argv[1])
import torch
torch.set_num_threads(spec["threads"])
import video_ktr.training.grpo as T
import video_ktr.training.grpo_data as D
import video_ktr.training.grpo_stages as S
from video_ktr.utils.config import from_dict
from video_ktr.training.grpo_config import TrainConfig

seen = {"prompt_tokens": 0, "visual_tokens": 0, "completion_tokens": 0}
_encode, _generate = D.encode_prompts, S.generate
def encode(*a, **k):
    out = _encode(*a, **k)
    seen["prompt_tokens"] = max(seen["prompt_tokens"], int(out["input_ids"].shape[1]))
    seen["visual_tokens"] = max(seen["visual_tokens"], int((out["mm_token_type_ids"] != 0).sum(1).max()))
    return out
def generate(*a, **k):
    out = _generate(*a, **k)
    seen["completion_tokens"] = max(seen["completion_tokens"], int(out.ids.shape[1]))
    return out
D.encode_prompts, S.generate = encode, generate

def rss_mb():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

def hwm_mb():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

def reset_peak():
    # Linux: writing 5 to clear_refs resets the peak RSS (VmHWM), so the peak measured below is the
    # training steps' own and not a spike while the model and data were loaded
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False

cfg = from_dict(TrainConfig, spec["config"])
trainer = T.KTRTrainer(cfg)
base = rss_mb()
max_before = hwm_mb()
peak_was_reset = reset_peak()
trainer.train()
peak = hwm_mb() if peak_was_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print("MEASURE " + json.dumps({"rss_after_load_mb": base, "max_rss_before_training_mb": max_before,
                                "peak_reset_after_load": peak_was_reset,
                                "max_rss_mb": peak, "peak_increase_mb": peak - base, **seen}))
"""


def prepare_tiny(workdir: str | os.PathLike, **tiny_kwargs: Any) -> tuple[str, str]:
    """Build the tiny model and a small synthetic data set in ``workdir`` (once); returns (model_dir, train.json)."""

    work = Path(workdir)
    model, data = work / "tiny-model", work / "data"
    if not (model / "config.json").is_file():
        build_tiny_model(model, **tiny_kwargs)
    if not (data / "train.json").is_file():
        generate(data, num_train=64, num_test=0, seed=0, overwrite=True)
    return str(model), str(data / "train.json")


def _start_measure(config: dict[str, Any], workdir: str | os.PathLike, steps: int, malloc_mmap_threshold: int | None,
                   threads: int, tag: str) -> tuple[subprocess.Popen, str]:
    model, data = prepare_tiny(workdir)
    values = dict(config)
    values.update(model_name_or_path=model, dataset=data, output_dir=str(Path(workdir) / f"out-{tag}"), max_steps=steps,
                  save_steps=0, report_to=["none"], resume_from_checkpoint=None, log_completions_every=0)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=str(threads))
    if malloc_mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(int(malloc_mmap_threshold))
    spec = json.dumps({"config": values, "threads": threads})
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, spec], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=str(workdir))
    return proc, model


def _collect(proc: subprocess.Popen, model: str, timeout: float) -> dict[str, Any]:
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    lines = [ln for ln in stdout.splitlines() if ln.startswith("MEASURE ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"measurement run failed ({proc.returncode}):\n{stderr[-4000:]}")
    out = json.loads(lines[-1][len("MEASURE "):])
    out["model_dir"] = model
    return out


def measure_peak(config: dict[str, Any], *, steps: int = 2, workdir: str | os.PathLike | None = None,
                 malloc_mmap_threshold: int | None = None, threads: int = 2, timeout: float = 600) -> dict[str, Any]:
    """Run ``steps`` real training steps of ``config`` (training options, e.g. configs/tiny-cpu.yaml's values) on
    CPU in a fresh subprocess, with the tiny model and synthetic data built in ``workdir``.

    Returns the peak RSS increase: ``ru_maxrss`` at the end minus the RSS right after the trainer was built
    (model, optimizer, data loaded), plus the prompt / visual / completion lengths the steps actually had.
    ``malloc_mmap_threshold`` sets glibc's M_MMAP_THRESHOLD in the child (e.g. 65536: every large tensor gets
    its own mapping, returned on free, so RSS follows live memory instead of the heap's high-water mark).
    """
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="vk-measure-")
        workdir = tmp.name
    try:
        proc, model = _start_measure(config, workdir, steps, malloc_mmap_threshold, threads, "run")
        return _collect(proc, model, timeout)
    finally:
        if tmp is not None:
            tmp.cleanup()


def compare_with_measurement(config_a: dict[str, Any], config_b: dict[str, Any], *, workdir: str | os.PathLike,
                             steps: int = 2, malloc_mmap_threshold: int | None = None, threads: int = 1,
                             parallel: bool = True, timeout: float = 600) -> dict[str, Any]:
    """Measure two configs (two subprocesses, concurrently by default) and compare the measured difference in
    peak RSS increase with the estimated difference in step-dependent memory.

    The estimate is fed the shapes the runs really had (prompt and completion lengths), 1 CPU "GPU", no ZeRO.
    """

    prepare_tiny(workdir)
    pairs = (("a", config_a), ("b", config_b))
    measured: dict[str, dict[str, Any]] = {}
    if parallel:
        started = {n: _start_measure(v, workdir, steps, malloc_mmap_threshold, threads, n) for n, v in pairs}
        for n, (proc, model) in started.items():
            measured[n] = _collect(proc, model, timeout)
    else:
        for n, v in pairs:
            measured[n] = _collect(*_start_measure(v, workdir, steps, malloc_mmap_threshold, threads, n), timeout)
    rows = {}
    for name, values in pairs:
        m = measured[name]
        model = m["model_dir"]
        cfg = from_dict(TrainConfig, {**values, "model_name_or_path": model, "dataset": "unused.json", "output_dir": "unused"})
        est = estimate(cfg, resolve_arch(model), gpu_memory_gb=1e6, num_gpus=1, zero_stage=0, video_seconds=10.0,
                       prompt_text_tokens=m["prompt_tokens"] - m["visual_tokens"], completion_tokens=m["completion_tokens"],
                       suggest=False, grouped_heads=True)  # the trainer's sdpa takes grouped heads on CPU
        if est["tokens"]["visual_tokens"] != m["visual_tokens"]:
            raise RuntimeError(f"estimated {est['tokens']['visual_tokens']} visual tokens, the run had {m['visual_tokens']}")
        rows[name] = {"measured_mb": m["peak_increase_mb"], "estimated_mb": est["step_dependent_gb"] * 1024,
                      "largest_phase": est["largest_phase"], "measurement": m,
                      "phases_mb": {k: v * 1024 for k, v in est["phases_gb"].items()}}
    dm = rows["b"]["measured_mb"] - rows["a"]["measured_mb"]
    de = rows["b"]["estimated_mb"] - rows["a"]["estimated_mb"]
    return {"a": rows["a"], "b": rows["b"], "measured_difference_mb": dm, "estimated_difference_mb": de,
            "relative_error": (de - dm) / dm if dm else float("inf")}

