"""Where a training step's time goes, GRPO (`--token_selection none`) vs KTR (`all`), same seed and data.

    .venv/bin/python benchmarks/step_breakdown.py --config configs/tiny-cpu.yaml --steps 12 \
        [--set key=value ...] [--json out.json]

Each variant runs in its own subprocess (so its peak memory is its own) for ``--steps`` steps of the
config, or with ``--interleave`` all variants in one subprocess, one step of each in turn (the robust way to
compare step times on a shared machine); the first ``--warmup`` steps are left out of the medians. Printed: median seconds per phase
(data, rollout, rewards, probes, reference, policy, selection, loss, backward, optimizer), the same in
CPU seconds of the process (less disturbed by other load on a shared machine; use ``--threads 1``),
the step-time ratio KTR / GRPO, generated tokens per second and peak resident memory of each.
Without ``--config`` it builds the embedded default (tiny model + synthetic data) in a temporary
folder first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

PHASES = ("data", "rollout", "rewards", "probes", "reference", "policy", "selection", "loss", "backward", "optimizer")

_CHILD = r"""
import json, resource, sys, time
from collections import defaultdict
spec = json.loads(sys.argv[1])
import torch
torch.set_num_threads(spec["threads"])
import video_ktr.training.grpo as trainer_module
from video_ktr.utils.config import from_dict, load_yaml
from video_ktr.training.grpo_config import TrainConfig
from video_ktr.training.grpo import KTRTrainer

class CpuTimer(trainer_module.Timer):
    # the trainer's phase timer, also counting this process's CPU seconds per phase
    last = None

    def __init__(self):
        super().__init__()
        self.cpu = defaultdict(float)
        CpuTimer.last = self

    def phase(self, name):
        wall, timer = super().phase(name), self

        class _Both:
            def __enter__(self):
                self.c0 = time.process_time()
                wall.__enter__()

            def __exit__(self, *exc):
                wall.__exit__(*exc)
                timer.cpu[name] += time.process_time() - self.c0

        return _Both()

trainer_module.Timer = CpuTimer
base = load_yaml(spec["config"]) if spec["config"] else {}
trainers = []
for overrides in spec["variants"]:
    values = {**base, **overrides}
    cfg = from_dict(TrainConfig, values, source="benchmark")
    trainers.append(KTRTrainer(cfg))
rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
steps = [[] for _ in trainers]
for trainer in trainers:
    trainer.model.train()
# one step of each variant in turn (one variant: its steps in a row)
while any(t.state.step < t.cfg.max_steps for t in trainers):
    for trainer, kept in zip(trainers, steps):
        if trainer.state.step >= trainer.cfg.max_steps:
            continue
        c0 = time.process_time()
        m = trainer.train_step()
        m["cpu_step_seconds"] = time.process_time() - c0
        m.update({f"cpu_{k}": v for k, v in CpuTimer.last.cpu.items()})
        kept.append(m)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("RESULT " + json.dumps({"steps": steps, "peak_rss_kb": peak, "rss_after_load_kb": rss_loaded}))
"""


def run_variants(config: str | None, variants: list[dict], threads: int) -> list[dict]:
    """Run the variants' steps in one subprocess (several variants: one step of each in turn)."""
    spec = {"config": config, "variants": variants, "threads": threads}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(spec)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        names = [v.get("token_selection") for v in variants]
        raise RuntimeError(f"variants {names} failed:\n{proc.stderr[-4000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    return [{"steps": steps, "peak_rss_kb": result["peak_rss_kb"], "rss_after_load_kb": result["rss_after_load_kb"]}
            for steps in result["steps"]]


def summarize(result: dict, warmup: int) -> dict:
    steps = result["steps"][warmup:] or result["steps"]
    out = {"step_seconds": statistics.median(s["step_seconds"] for s in steps)}
    for ph in PHASES:
        out[ph] = statistics.median(s.get(f"time_{ph}", 0.0) for s in steps)
    out["cpu_step_seconds"] = statistics.median(s.get("cpu_step_seconds", 0.0) for s in steps)
    for ph in PHASES:
        out[f"cpu_{ph}"] = statistics.median(s.get(f"cpu_{ph}", 0.0) for s in steps)
    out["completion_length"] = statistics.median(s["completion_length"] for s in steps)
    # prompt groups with equal rewards (advantage 0) and groups the probes ran on (the others are skipped
    # where that cannot change the loss: TrainConfig.zero_advantage_masks_matter), as step means
    out["zero_advantage_groups"] = statistics.mean(s.get("zero_advantage_groups", 0.0) for s in steps)
    out["probed_groups"] = statistics.mean(s["probed_groups"] for s in steps) if "probed_groups" in steps[0] else None
    # generated tokens (valid completion tokens of every row) per second of rollout
    out["rollout_tokens_per_s"] = statistics.median(
        s["completion_length"] * s["num_completions"] / s["time_rollout"] for s in steps if s.get("time_rollout")
    )
    out["peak_rss_mb"] = result["peak_rss_kb"] / 1024
    out["peak_rss_over_load_mb"] = (result["peak_rss_kb"] - result["rss_after_load_kb"]) / 1024
    return out


def build_default(tmp: Path, frames: int = 8, size: int = 56) -> tuple[str, dict]:
    from video_ktr.data import synth
    from video_ktr.model import tiny

    tiny.build_tiny_model(tmp / "model", seed=0)
    synth.generate(tmp / "data", num_train=256, num_test=8, seed=0, frames=frames, size=size)
    pixels = size * size
    return "configs/tiny-cpu.yaml", {
        "model_name_or_path": str(tmp / "model"), "dataset": str(tmp / "data" / "train.json"),
        "nframes": frames, "max_frames": frames, "min_pixels": pixels, "max_pixels": pixels,
        "image_min_pixels": pixels, "image_max_pixels": pixels,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="training YAML (default: the embedded default, built in a temp dir)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--frames", type=int, default=8, help="frames per synthetic video (embedded default only)")
    ap.add_argument("--size", type=int, default=56, help="frame side in pixels, a multiple of 28 (embedded default only)")
    ap.add_argument("--set", action="append", default=[], help="override a config key: key=value (YAML value)")
    ap.add_argument("--variants", default="none,all", help="comma list of --token_selection values to compare")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the variants this many times, alternating (none, all, all, none, ...), and pool the steps: "
                         "load on a shared machine then hits both alike")
    ap.add_argument("--interleave", action="store_true",
                    help="run the variants in one process, one step of each in turn (same seeds and data as apart): "
                         "a shared machine's drift and the process's own state then hit them alike. Peak memory is "
                         "then the process's, not a variant's: measure memory without this flag")
    ap.add_argument("--json", default=None, help="write the figures here as JSON")
    args = ap.parse_args(argv)

    import yaml

    with tempfile.TemporaryDirectory() as tmpdir:
        overrides: dict = {}
        config = args.config
        if config is None:
            config, overrides = build_default(Path(tmpdir), args.frames, args.size)
        overrides.update({"max_steps": args.steps, "output_dir": str(Path(tmpdir) / "out"), "save_steps": 0})
        for item in args.set:
            k, v = item.split("=", 1)
            overrides[k] = yaml.safe_load(v)
        pooled: dict[str, dict] = {}
        paired: list[float] = []  # --interleave: KTR step / the GRPO step next to it in time, per step pair
        for r in range(args.rounds):
            # the order is reversed every other round (A B, B A, ...): a machine that drifts during a run
            # then hits every variant alike
            order = args.variants.split(",")
            order = order if r % 2 == 0 else order[::-1]
            specs = {v: {**overrides, "token_selection": [v], "output_dir": str(Path(tmpdir) / f"out-{v}-{r}")} for v in order}
            if args.interleave:
                print(f"round {r + 1}/{args.rounds}: {', '.join(order)} interleaved in one process ({args.steps} steps each) ...",
                      flush=True)
                results = dict(zip(order, run_variants(config, [specs[v] for v in order], args.threads)))
            else:
                results = {}
                for variant in order:
                    print(f"round {r + 1}/{args.rounds}: {variant} ({args.steps} steps) ...", flush=True)
                    results[variant] = run_variants(config, [specs[variant]], args.threads)[0]
            for result in results.values():
                result["steps"] = result["steps"][args.warmup:] or result["steps"]
            if args.interleave and "none" in results and "all" in results:
                paired += [a["step_seconds"] / n["step_seconds"]
                           for a, n in zip(results["all"]["steps"], results["none"]["steps"])]
            for variant, result in results.items():
                if variant in pooled:
                    pooled[variant]["steps"] += result["steps"]
                    pooled[variant]["peak_rss_kb"] = max(pooled[variant]["peak_rss_kb"], result["peak_rss_kb"])
                else:
                    pooled[variant] = result
        table = {v: summarize(res, 0) for v, res in pooled.items()}

    names = list(table)
    print(f"\nmedian seconds per step phase ({args.rounds} round(s) of {args.steps} steps, first {args.warmup} of each left out)")
    print("phase".ljust(22) + "".join(n.rjust(12) for n in names))
    for key in ("step_seconds", *PHASES, "completion_length", "zero_advantage_groups", "probed_groups",
                "rollout_tokens_per_s", "peak_rss_mb", "peak_rss_over_load_mb"):
        print(key.ljust(22) + "".join(f"{table[n][key]:12.4f}" if table[n][key] is not None else "         n/a" for n in names))
    # CPU seconds of the benchmarked process: on a shared machine, time spent waiting for a core shows in
    # the wall-clock figures above but not here (with --threads 1 the two agree on an idle machine)
    print("\nmedian CPU seconds of the process per step phase")
    for key in ("cpu_step_seconds", *(f"cpu_{ph}" for ph in PHASES)):
        print(key.ljust(22) + "".join(f"{table[n][key]:12.4f}" for n in names))
    if "none" in table and "all" in table:
        ratio = table["all"]["step_seconds"] / table["none"]["step_seconds"]
        cpu_ratio = table["all"]["cpu_step_seconds"] / max(table["none"]["cpu_step_seconds"], 1e-9)
        mem = table["all"]["peak_rss_mb"] / table["none"]["peak_rss_mb"]
        mem_text = "n/a with --interleave (one process)" if args.interleave else f"{mem:.3f}"
        # the KTR step against itself without its own phases (probes, selection): the same work as the GRPO
        # step, measured in the same steps, so no drift between runs enters it (the entropy inside the policy
        # phase is not taken out: it is small against the pass)
        own = table["all"]["step_seconds"] - table["all"]["probes"] - table["all"]["selection"]
        in_step = table["all"]["step_seconds"] / max(own, 1e-9)
        # with --interleave: the median over step pairs (the KTR step and the GRPO step run next to it), which
        # cancels drift that a ratio of two medians keeps; with its quartiles as the spread
        pair = statistics.median(paired) if paired else None
        spread = statistics.quantiles(paired, n=4) if len(paired) >= 2 else None
        pair_text = (f"; paired per step: median {pair:.3f} (quartiles {spread[0]:.3f}-{spread[2]:.3f}, {len(paired)} pairs)"
                     if pair is not None and spread else "")
        print(f"\nstep time KTR / GRPO = {ratio:.3f} (CPU time {cpu_ratio:.3f}){pair_text}; KTR step / its phases without "
              f"probes and selection = {in_step:.3f}; peak memory KTR / GRPO = {mem_text}")
        table["ratios"] = {"step_time_ktr_over_grpo": ratio, "cpu_time_ktr_over_grpo": cpu_ratio,
                           "step_time_ktr_over_grpo_paired_median": pair,
                           "step_time_ktr_over_grpo_paired_quartiles": [spread[0], spread[2]] if spread else None,
                           "ktr_step_over_ktr_step_without_probes": in_step,
                           "peak_memory_ktr_over_grpo": None if args.interleave else mem}
    if args.json:
        Path(args.json).write_text(json.dumps({"config": args.config or "embedded default", "steps": args.steps,
                                               "overrides": {k: v for k, v in overrides.items() if k != "output_dir"},
                                               "results": table}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
