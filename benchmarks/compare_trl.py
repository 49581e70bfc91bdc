"""Peer comparison: the same image-question GRPO workload through TRL's ``GRPOTrainer`` with its entropy
mask (``top_entropy_quantile=0.2``) and through ``video-ktr train --token_selection all`` (entropy + visual
probe; the temporal probe does nothing on images). Reports median seconds per step and the ratio ours / TRL.

    .venv/bin/python benchmarks/compare_trl.py [--trl_path /tmp/trl-lib] [--steps 8] [--warmup 2] \\
        [--rounds 2] [--threads 2] [--ours all,entropy] [--json out.json]

TRL is a benchmark-only dependency, never a runtime one: it lives in its own folder (``--trl_path``), which
is put on ``sys.path`` only inside the TRL child process. The project's venv, and so its tests, never see
it. Install it there once (``--install_trl`` runs exactly this)::

    .venv/bin/pip install --no-deps --target /tmp/trl-lib trl==1.16.0 datasets==5.2.0 pyarrow==26.0.1 \\
        dill==0.4.1 pandas==3.1.1 xxhash==4.1.0 multiprocess==0.70.19

(``--no-deps``: everything else TRL needs, torch, transformers 5.x, accelerate, numpy, jinja2, psutil, ...,
comes from the project's venv, so nothing in it is shadowed.)

The workload (both sides): the tiny random Qwen2.5-VL of ``video_ktr.model.tiny.build_tiny_model(seed=0)``; 64
synthetic image questions (``image_color``, ``image_position``; 56x56 PNGs, kept at 56x56 = 4 visual
tokens); the Video-R1 question template; rewards = ``video_ktr.core.rewards`` accuracy + format; ``--prompts``
prompts x ``--num_generations`` completions per optimiser step (TRL counts completions: its
per_device_train_batch_size is prompts x G); completions up to ``--max_completion_length`` tokens;
temperature 1, top_p 1, beta 0 (no reference model), one iteration (no old-policy pass), loss_type grpo,
constant learning rate, clip 1.0, float32, sdpa, no gradient checkpointing, CPU, ``--threads`` torch threads.

Each run is its own subprocess (its own peak memory, no shared state); the sides alternate, in reversed
order every other round, so load on a shared machine hits both alike. The first ``--warmup`` steps of every
run are left out; the remaining steps of all rounds are pooled and their median taken.
TRL's step is timed by a TrainerCallback from ``on_step_begin`` to ``on_step_end`` (generation, rewards,
forward, backward and optimiser step; the data loader's fetch happens before ``on_step_begin`` and is
reported separately as the end-to-end interval); ours is ``KTRTrainer.train_step`` (the ``step_seconds``
of metrics.jsonl, data loading included).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_TRL_PATH = "/tmp/trl-lib"
# Versions measured together with transformers 5.23 / torch 2.14 / accelerate 1.15 (see docs/performance.md).
TRL_REQUIREMENTS = (
    "trl==1.16.0", "datasets==5.2.0", "pyarrow==26.0.1", "dill==0.4.1", "pandas==3.1.1", "xxhash==4.1.0",
    "multiprocess==0.70.19",
)
IMAGE_PIXELS = 56 * 56  # 3136: the synthetic images stay 56x56 (2x2 merged patches = 4 visual tokens)

# What differs between the two runs and cannot be removed by settings (printed and written to --json).
DIFFERENCES = (
    "Key tokens: TRL keeps the top 20% of completion tokens by entropy (one quantile over the whole local batch); "
    "ours (--token_selection all) keeps the union of the top 20% by entropy and the top 20% by visual-probe score, "
    "each within a prompt's G completions (--selection_scope group). Ours therefore runs one extra no-grad pass "
    "per step (the visual probe, prompt prefix shared across the G completions); TRL runs none.",
    "Loss normalisation: TRL 'grpo' divides each sequence's masked loss by all its completion tokens; ours divides "
    "by its key tokens (--normalize_by mask, the paper). Same cost, different gradient scale.",
    "Sampling: TRL calls model.generate(do_sample=True) with one global random stream (and suppresses the image "
    "token); ours samples each row from its own seeded stream through a Gumbel logits processor on greedy "
    "generate (suppressing all vision tokens). Same distribution (temperature 1, top_p 1), different draws, so "
    "completion lengths differ step by step: the mean completion length of each side is reported next to its time.",
    "Data order: each side shuffles the 64 rows with its own sampler (same seed value, different generators), so "
    "a given step sees different prompts; all prompts have the same template, one 56x56 image and similar length.",
    "Policy pass: TRL runs the vision tower on every one of the prompts x G rows and computes log-probs and "
    "entropies with its fused, chunked LM head; ours runs the vision tower once per prompt and repeats the features "
    "(ForwardPlan.encode_visual_once) and computes full-vocabulary log-softmax on the completion positions.",
    "Entropy: both compute it on every valid completion token in the policy forward (TRL needs it for the mask "
    "and its 'entropy' metric; ours for the entropy signal).",
    "Bookkeeping: TRL's step includes its Trainer machinery (callbacks, metric gathering, learning-rate scheduler "
    "of transformers); ours includes data loading and image decoding for the step (TRL decodes in its data loader, "
    "before on_step_begin: see the interval row). TRL's optimiser is transformers' default fused AdamW "
    "(adamw_torch_fused), ours torch's AdamW (foreach); both are milliseconds on this model.",
    "Prompt: identical text and chat template on both sides (Video-R1 question template, the checkpoint's default "
    "system turn, image first), hence the same prompt tokens.",
)


# ---------------------------------------------------------------------------------------------------- children
def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _treat_target_as_installed(trl_path: str) -> None:
    """datasets fingerprints a Dataset by pickling it with dill, and dill pickles a module *by value* unless its
    file lies under sys.prefix: pyarrow in a --target folder then fails with "Can't pickle <class 'MonthDayNano'>".
    Modules under ``trl_path`` are installed libraries: let dill pickle them by reference."""
    import dill._dill as dd

    root = os.path.realpath(trl_path) + os.sep
    original = dd._is_builtin_module

    def is_builtin(module) -> bool:
        path = getattr(module, "__file__", None)
        return bool(path and os.path.realpath(path).startswith(root)) or original(module)

    dd._is_builtin_module = is_builtin


def _child_trl(spec: dict) -> dict:
    sys.path.insert(0, spec["trl_path"])
    _treat_target_as_installed(spec["trl_path"])
    import torch

    torch.set_num_threads(spec["threads"])
    import transformers
    import trl
    from datasets import Dataset
    from PIL import Image
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from video_ktr.core.rewards import batch_accuracy_reward, batch_format_reward
    from video_ktr.data.prompts import user_text
    from video_ktr.model.loading import load_model

    w = spec["workload"]
    data_file = Path(spec["dataset"])
    rows = json.loads(data_file.read_text())
    records: dict[str, list] = {"prompt": [], "image": [], "solution": [], "problem_type": []}
    for r in rows:
        with Image.open(data_file.parent / r["path"]) as im:
            image = im.convert("RGB")
        text = user_text(r["problem"], r["problem_type"], r.get("options"), "train")
        # TRL's VLM format: conversational prompt with an image placeholder, the image in the "image" column
        records["prompt"].append([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}])
        records["image"].append(image)
        records["solution"].append(r["solution"])
        records["problem_type"].append(r["problem_type"])
    dataset = Dataset.from_dict(records)

    def _texts(completions: list) -> list[str]:
        out = []
        for c in completions:
            if isinstance(c, list):  # conversational: [{"role": "assistant", "content": ...}]
                content = c[-1]["content"]
                if isinstance(content, list):
                    content = "".join(p.get("text") or "" for p in content if p.get("type") == "text")
                out.append(content)
            else:
                out.append(c)
        return out

    def accuracy_reward(prompts, completions, solution, problem_type, **kwargs):
        return batch_accuracy_reward(_texts(completions), solution, problem_type)

    def format_reward(prompts, completions, **kwargs):
        return batch_format_reward(_texts(completions))

    config = GRPOConfig(
        output_dir=spec["output_dir"],
        use_cpu=True, bf16=False, fp16=False,
        max_steps=spec["steps"], learning_rate=w["learning_rate"], lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, seed=w["seed"],
        per_device_train_batch_size=w["prompts"] * w["num_generations"], gradient_accumulation_steps=1,
        num_generations=w["num_generations"], max_completion_length=w["max_completion_length"],
        temperature=w["temperature"], top_p=w["top_p"], top_k=0, beta=w["beta"], num_iterations=1,
        epsilon=0.2, loss_type="grpo", scale_rewards="group", top_entropy_quantile=w["entropy_ratio"],
        gradient_checkpointing=False, report_to="none", logging_steps=1, save_strategy="no",
        log_completions=False, dataloader_num_workers=0, disable_tqdm=True,
    )
    model = load_model(spec["model"], dtype="float32", attn_implementation="sdpa")
    trainer = GRPOTrainer(model=model, reward_funcs=[accuracy_reward, format_reward], args=config,
                          train_dataset=dataset)

    phases: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                phases[name] = phases.get(name, 0.0) + time.perf_counter() - t
        return wrapper

    # rollout = tokenise + generate + rewards + advantages; policy = forward (log-probs, entropy) + mask + loss
    trainer._generate_and_score_completions = timed("rollout", trainer._generate_and_score_completions)
    trainer.compute_loss = timed("policy", trainer.compute_loss)
    trainer.training_step = timed("training_step", trainer.training_step)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.steps: list[dict] = []
            self.logs: list[dict] = []
            self.t0 = 0.0
            self.last_end: float | None = None

        def on_step_begin(self, args, state, control, **kwargs):
            phases.clear()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            t = time.perf_counter()
            ts = phases.get("training_step", 0.0)
            self.steps.append({
                "step_seconds": t - self.t0,
                "interval_seconds": (t - self.last_end) if self.last_end is not None else None,
                "time_rollout": phases.get("rollout", 0.0),
                "time_policy": phases.get("policy", 0.0),
                "time_backward": max(0.0, ts - phases.get("rollout", 0.0) - phases.get("policy", 0.0)),
                "time_optimizer": max(0.0, t - self.t0 - ts),
            })
            self.last_end = t

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                self.logs.append(dict(logs))

    timer = StepTimer()
    trainer.add_callback(timer)
    trainer.train()
    for step, log in zip(timer.steps, timer.logs):
        step["completion_length"] = log.get("completions/mean_length")
        step["reward"] = log.get("reward")
        step["entropy"] = log.get("entropy")
    return {"steps": timer.steps, "peak_rss_mb": _peak_rss_mb(),
            "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__}}


def _child_ours(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    import transformers

    from video_ktr.training.grpo import KTRTrainer
    from video_ktr.training.grpo_config import TrainConfig
    from video_ktr.utils.config import from_dict

    w = spec["workload"]
    values = {
        "model_name_or_path": spec["model"], "dataset": spec["dataset"], "output_dir": spec["output_dir"],
        "max_steps": spec["steps"], "learning_rate": w["learning_rate"], "lr_scheduler_type": "constant",
        "warmup_ratio": 0.0, "weight_decay": 0.0, "max_grad_norm": 1.0, "seed": w["seed"],
        "per_device_train_batch_size": w["prompts"], "gradient_accumulation_steps": 1,
        "num_generations": w["num_generations"], "max_completion_length": w["max_completion_length"],
        "temperature": w["temperature"], "top_p": w["top_p"], "beta": w["beta"], "num_iterations": 1,
        "epsilon": 0.2, "loss_type": "grpo", "token_selection": [spec["variant"]],
        "entropy_ratio": w["entropy_ratio"], "visual_ratio": w["entropy_ratio"], "temporal_ratio": w["entropy_ratio"],
        "image_min_pixels": IMAGE_PIXELS, "image_max_pixels": IMAGE_PIXELS,
        "dtype": "float32", "attn_implementation": "sdpa", "gradient_checkpointing": False,
        "save_steps": 0, "report_to": ["none"], "reward_funcs": ["accuracy", "format"],
        "probe_all_groups": w.get("probe_all_groups", True),
    }
    cfg = from_dict(TrainConfig, values, source="compare_trl")
    trainer = KTRTrainer(cfg)
    trainer.model.train()
    steps = []
    while trainer.state.step < cfg.max_steps:
        m = trainer.train_step()
        steps.append({
            "step_seconds": m["step_seconds"],
            "time_rollout": sum(m.get(f"time_{k}", 0.0) for k in ("data", "rollout", "rewards")),
            "time_probes": m.get("time_probes", 0.0),
            "time_policy": sum(m.get(f"time_{k}", 0.0) for k in ("policy", "selection", "loss")),
            "time_backward": m.get("time_backward", 0.0),
            "time_optimizer": m.get("time_optimizer", 0.0),
            "completion_length": m.get("completion_length"),
            "key_token_fraction": m.get("key_token_fraction"),
            "reward": m.get("reward"),
        })
    return {"steps": steps, "peak_rss_mb": _peak_rss_mb(),
            "versions": {"transformers": transformers.__version__, "torch": torch.__version__}}


def _child_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    result = _child_trl(spec) if spec["side"] == "trl" else _child_ours(spec)
    print("RESULT " + json.dumps(result), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------------- parent
def trl_status(trl_path: str) -> tuple[bool, str]:
    """(importable, versions or the error) for TRL + datasets from ``trl_path``, checked in a subprocess."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import trl, datasets; "
            "from trl import GRPOTrainer, GRPOConfig; print(trl.__version__, datasets.__version__)")
    proc = subprocess.run([sys.executable, "-c", code, trl_path], capture_output=True, text=True)
    if proc.returncode == 0:
        return True, proc.stdout.strip()
    return False, (proc.stderr.strip().splitlines() or ["(no message)"])[-1]


def install_hint(trl_path: str) -> str:
    return (f"  {sys.executable} -m pip install --no-deps --target {trl_path} {' '.join(TRL_REQUIREMENTS)}\n"
            f"(or run this script with --install_trl). The folder is used only by this benchmark's TRL child "
            f"process; the project's venv and tests never import TRL.")


def install_trl(trl_path: str) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--target", trl_path, *TRL_REQUIREMENTS]
    print("installing TRL for the benchmark only:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def run_child(spec: dict, log_dir: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": str(spec["threads"]), "MKL_NUM_THREADS": str(spec["threads"])}
    env.pop("PYTHONPATH", None)  # only the TRL child adds --trl_path, itself, to its sys.path
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--_child", json.dumps(spec)],
                          capture_output=True, text=True, env=env)
    name = f"{spec['side']}-{spec['variant']}-r{spec['round']}"
    (log_dir / f"{name}.stderr.txt").write_text(proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    result["wall_seconds"] = time.perf_counter() - t0
    return result


def _median(values) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def summarize(steps: list[dict], peak_rss_mb: float) -> dict:
    out = {"steps_measured": len(steps), "step_seconds": _median(s["step_seconds"] for s in steps)}
    for key in ("interval_seconds", "time_rollout", "time_probes", "time_policy", "time_backward", "time_optimizer"):
        out[key] = _median(s.get(key) for s in steps)
    out["completion_length_mean"] = _mean(s.get("completion_length") for s in steps)
    out["seconds_per_completion_token"] = (
        _median(s["step_seconds"] / s["completion_length"] for s in steps if s.get("completion_length")))
    out["key_token_fraction"] = _mean(s.get("key_token_fraction") for s in steps)
    out["peak_rss_mb"] = peak_rss_mb
    return out


def build_workload(workdir: Path, num_train: int) -> tuple[str, str]:
    from video_ktr.data import synth
    from video_ktr.model import tiny

    model = workdir / "model"
    data = workdir / "data"
    if not (model / "config.json").exists():
        tiny.build_tiny_model(model, seed=0)
    if not (data / "train.json").exists():
        synth.generate(data, num_train=num_train, num_test=0, image_fraction=1.0,
                       kinds=["image_color", "image_position"], seed=0, overwrite=True)
    return str(model), str(data / "train.json")


def print_table(table: dict[str, dict], names: list[str]) -> None:
    rows = [
        ("median s / step", "step_seconds"),
        ("  rollout (data+gen+rewards)", "time_rollout"),
        ("  probes (no grad)", "time_probes"),
        ("  policy fwd + mask + loss", "time_policy"),
        ("  backward", "time_backward"),
        ("  optimizer + other", "time_optimizer"),
        ("end-to-end interval (TRL)", "interval_seconds"),
        ("mean completion length", "completion_length_mean"),
        ("s / step / completion token", "seconds_per_completion_token"),
        ("key-token fraction", "key_token_fraction"),
        ("peak RSS (MB)", "peak_rss_mb"),
        ("steps measured", "steps_measured"),
    ]
    width = max(14, *(len(n) + 2 for n in names))
    print("".ljust(30) + "".join(n.rjust(width) for n in names))
    for label, key in rows:
        cells = []
        for n in names:
            v = table[n].get(key)
            if v is None:
                cells.append("-".rjust(width))
            elif key == "steps_measured":
                cells.append(f"{int(v)}".rjust(width))
            elif key == "seconds_per_completion_token":
                cells.append(f"{v:.5f}".rjust(width))
            else:
                cells.append(f"{v:.3f}".rjust(width))
        print(label.ljust(30) + "".join(cells))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_child"]:
        return _child_main(argv[1])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trl_path", default=DEFAULT_TRL_PATH, help="folder holding TRL and its extra deps (pip --target)")
    ap.add_argument("--install_trl", action="store_true", help="pip-install the pinned TRL set into --trl_path first")
    ap.add_argument("--steps", type=int, default=8, help="measured steps per run (after --warmup)")
    ap.add_argument("--warmup", type=int, default=2, help="steps run first and left out of the medians")
    ap.add_argument("--rounds", type=int, default=2, help="runs per side, alternating (order reversed every other round)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in every run (the same for both sides)")
    ap.add_argument("--ours", default="all", help="comma list of our --token_selection values to run (e.g. all,entropy)")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per optimiser step")
    ap.add_argument("--num_generations", type=int, default=8, help="completions per prompt (G)")
    ap.add_argument("--max_completion_length", type=int, default=96)
    ap.add_argument("--learning_rate", type=float, default=5e-5)
    ap.add_argument("--entropy_ratio", type=float, default=0.2, help="TRL's top_entropy_quantile and our ratios")
    ap.add_argument("--num_train", type=int, default=64, help="synthetic image questions")
    ap.add_argument("--workdir", default=None, help="keep the model, data and run logs here (default: a temp dir)")
    ap.add_argument("--probe_all_groups", type=lambda v: v.lower() in ("1", "true", "yes"), default=True,
                    help="our probes run on every prompt group (default true: the random tiny model's rewards are all "
                         "0, so skipping the groups with advantage 0 would skip every probe and compare nothing)")
    ap.add_argument("--json", default=None, help="write the figures here as JSON")
    args = ap.parse_args(argv)

    if args.install_trl:
        install_trl(args.trl_path)
    ok, status = trl_status(args.trl_path)
    if not ok:
        print(f"TRL is not importable from --trl_path {args.trl_path}: {status}\n"
              f"TRL is a benchmark-only dependency; install it into that folder (not the project venv):\n"
              f"{install_hint(args.trl_path)}", file=sys.stderr)
        return 2
    trl_version, datasets_version = status.split()
    print(f"TRL {trl_version} (datasets {datasets_version}) from {args.trl_path}", flush=True)

    workload = {
        "prompts": args.prompts, "num_generations": args.num_generations,
        "max_completion_length": args.max_completion_length, "learning_rate": args.learning_rate,
        "temperature": 1.0, "top_p": 1.0, "beta": 0.0, "seed": 0, "entropy_ratio": args.entropy_ratio,
        "probe_all_groups": args.probe_all_groups,
    }
    variants = [("trl", "entropy")] + [("ours", v) for v in args.ours.split(",") if v]
    total_steps = args.steps + args.warmup

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        model, dataset = build_workload(workdir, args.num_train)
        pooled: dict[str, dict] = {}
        for r in range(args.rounds):
            order = variants if r % 2 == 0 else list(reversed(variants))
            for side, variant in order:
                name = f"{'TRL' if side == 'trl' else 'ours'} {variant}"
                print(f"round {r + 1}/{args.rounds}: {name} ({total_steps} steps) ...", flush=True)
                spec = {"side": side, "variant": variant, "round": r, "model": model, "dataset": dataset,
                        "output_dir": str(workdir / f"out-{side}-{variant}-{r}"), "steps": total_steps,
                        "threads": args.threads, "trl_path": args.trl_path, "workload": workload}
                res = run_child(spec, workdir)
                steps = res["steps"][args.warmup:]
                print(f"  {len(res['steps'])} steps, median {statistics.median(s['step_seconds'] for s in steps):.3f} "
                      f"s/step, run {res['wall_seconds']:.0f} s", flush=True)
                entry = pooled.setdefault(name, {"steps": [], "peak_rss_mb": 0.0, "versions": res["versions"],
                                                  "rounds": []})
                entry["steps"] += steps
                entry["peak_rss_mb"] = max(entry["peak_rss_mb"], res["peak_rss_mb"])
                entry["rounds"].append(statistics.median(s["step_seconds"] for s in steps))

    names = list(pooled)
    table = {n: {**summarize(p["steps"], p["peak_rss_mb"]), "round_medians": p["rounds"]} for n, p in pooled.items()}
    print(f"\nmedian over {args.rounds} round(s) x {args.steps} steps (first {args.warmup} of each run left out); "
          f"{args.prompts} prompts x G={args.num_generations}, completions <= {args.max_completion_length} tokens, "
          f"{args.threads} torch thread(s)")
    print_table(table, names)
    for n in names:
        print(f"round medians {n}: " + ", ".join(f"{x:.3f}" for x in table[n]["round_medians"]))
    trl_name = "TRL entropy"
    ratios = {}
    for n in names:
        if n == trl_name:
            continue
        ratio = table[n]["step_seconds"] / table[trl_name]["step_seconds"]
        per_tok = None
        if table[n]["seconds_per_completion_token"] and table[trl_name]["seconds_per_completion_token"]:
            per_tok = table[n]["seconds_per_completion_token"] / table[trl_name]["seconds_per_completion_token"]
        # each round's runs are adjacent in time: their ratio is the least exposed to slow drifts of the load
        per_round = [a / b for a, b in zip(table[n]["round_medians"], table[trl_name]["round_medians"])]
        ratios[f"{n} / {trl_name}"] = {"step_time": ratio, "step_time_per_completion_token": per_tok,
                                       "per_round": per_round}
        extra = f" (per completion token: {per_tok:.3f})" if per_tok is not None else ""
        print(f"\nstep time {n} / {trl_name} = {ratio:.3f}{extra}; per round: "
              + ", ".join(f"{x:.3f}" for x in per_round))
    print("\nDifferences that settings cannot remove:")
    for d in DIFFERENCES:
        print(f"- {d}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "date": _dt.date.today().isoformat(), "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
            "trl_version": trl_version, "datasets_version": datasets_version,
            "versions": {n: p["versions"] for n, p in pooled.items()},
            "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "threads": args.threads,
            "workload": workload, "results": table, "ratios": ratios, "differences": list(DIFFERENCES),
        }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
