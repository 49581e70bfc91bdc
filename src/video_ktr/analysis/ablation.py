"""`video-ktr ablate`: GRPO, T-GRPO, the single signals, the random mask, KTR (hard, sigmoid, linear) from one start, over seeds.

Every run uses the same training YAML (same data, same start model, same steps and hyper-parameters);
only ``token_selection`` / ``temporal_grpo`` (the variant), ``seed`` and ``output_dir`` differ::

    DIR/<variant>/seed<k>/      a normal `video-ktr train` output folder, plus
        eval_greedy.json        held-out results and metrics, greedy decoding
        eval_sampled.json       the same with sampling (temperature 1.0, top_p 1.0)
        done.json               the marker: the run's settings, evaluation and summary numbers
    DIR/ablation.json           per variant: per-seed values, mean and sample std over seeds
    DIR/ablation.md             the table, the machine, the command, and a computed reading
    DIR/accuracy.png, DIR/reward_curves.png

Resumable: a run with its final model and ``done.json`` is not redone; a run without ``done.json``
continues from its newest checkpoint (``resume_from_checkpoint latest``), so an interrupted ablation
loses at most ``save_steps`` steps of one run. A run folder made with other settings is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import gc
import hashlib
import json
import math
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from video_ktr.analysis.ablation_report import (
    DIAGNOSTICS,
    METRICS,
    _fmt,
    machine_info,
    reward_curves,
    write_markdown,
    write_plots,
)
from video_ktr.analysis.ablation_stats import (  # noqa: F401  (EXCEEDS, WITHIN: the verdicts, read by callers)
    ACCURACIES,
    EXCEEDS,
    WITHIN,
    finite,
    item_bootstrap,
    mean_ci,
    paired_against_baseline,
    reading,
    stats,
)
from video_ktr.data.media import FrameSettings
from video_ktr.data.rows import read_rows
from video_ktr.evaluation.engine import pick_device
from video_ktr.evaluation.evaluate import evaluate_rows
from video_ktr.evaluation.protocol import write_json_atomic
from video_ktr.model.loading import load_model, load_processor
from video_ktr.training import checkpoint as ckpt
from video_ktr.training.distributed import launched_world_size
from video_ktr.training.grpo import KTRTrainer
from video_ktr.training.grpo_config import TrainConfig
from video_ktr.utils.config import build_parser, from_dict, load_yaml
from video_ktr.utils.jsonl import read_jsonl
from video_ktr.utils.logs import bars_disabled

# name -> the only settings that differ between variants
_HARD = {"temporal_grpo": False, "token_weighting": "hard"}
VARIANTS: dict[str, dict[str, Any]] = {
    "grpo": {"token_selection": ["none"], **_HARD},
    "t_grpo": {"token_selection": ["none"], "temporal_grpo": True, "token_weighting": "hard"},
    "entropy": {"token_selection": ["entropy"], **_HARD},
    "visual": {"token_selection": ["visual"], **_HARD},
    "temporal": {"token_selection": ["temporal"], **_HARD},
    "random": {"token_selection": ["random"], **_HARD},
    "ktr": {"token_selection": ["all"], **_HARD},
    # the authors' soft variants: every token weighted by the rank of its scores (core/weighting.py)
    "ktr_sigmoid": {"token_selection": ["all"], "temporal_grpo": False, "token_weighting": "sigmoid"},
    "ktr_linear": {"token_selection": ["all"], "temporal_grpo": False, "token_weighting": "linear"},
}
# set per run by the ablation; a YAML value is replaced, a command-line override is refused
PER_RUN_KEYS = ("token_selection", "temporal_grpo", "token_weighting", "seed", "output_dir", "resume_from_checkpoint")
# settings that do not change what a run computes (a finished run is reused when only these differ)
NEUTRAL_KEYS = {"output_dir", "resume_from_checkpoint", "overwrite_output_dir", "save_total_limit", "logging_steps", "report_to",
                "log_completions_every", "run_name", "log_level", "log_level_replica", "disable_tqdm"}
DONE = "done.json"


class AblateError(RuntimeError):
    """A refusal with a message for the user (no traceback)."""


@dataclasses.dataclass
class AblateOptions:
    config: str
    output_dir: str
    seeds: list[int]
    variants: list[str]
    eval_data: str | None = None
    eval_media_root: str | None = None
    eval_max_new_tokens: int | None = None
    eval_batch_size: int = 16
    eval_device: str = "auto"
    delete_checkpoints_when_done: bool = False
    train_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    argv: list[str] = dataclasses.field(default_factory=list)


# ---------------------------------------------------------------------------------------- arguments


def _split_list(values: list[str] | None) -> list[str]:
    return [v.strip() for item in values or [] for v in item.split(",") if v.strip()]


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="video-ktr ablate", allow_abbrev=False,
        description="Run GRPO, T-GRPO, entropy/visual/temporal-only, the random mask, KTR and its soft variants "
                    "(ktr_sigmoid, ktr_linear) from one start over "
                    "several seeds, evaluate every final model on held-out questions, and write ablation.json/.md "
                    "and plots. Any `video-ktr train` option (e.g. --max_steps 40) may follow: it overrides the "
                    "YAML for every run.")
    p.add_argument("--config", required=True, help="Training YAML (TrainConfig keys), e.g. configs/tiny-cpu.yaml. Its "
                   "output_dir, seed, token_selection, temporal_grpo and resume_from_checkpoint are set per run.")
    p.add_argument("--output_dir", required=True, help="Where DIR/<variant>/seed<k>/, ablation.json/.md and plots go.")
    p.add_argument("--seeds", type=int, default=3, help="Seeds 0..N-1 per variant.")
    p.add_argument("--seed_list", nargs="+", default=None, help="Explicit seeds (overrides --seeds), e.g. 0 1 2 or 0,1,2.")
    p.add_argument("--variants", nargs="+", default=None,
                   help=f"Variants to run (default: all): {', '.join(VARIANTS)}.")
    p.add_argument("--eval_data", default=None,
                   help="Held-out Video-R1-schema JSON/JSONL (default: test.json beside the training dataset, if it exists).")
    p.add_argument("--eval_media_root", default=None, help="Folder the held-out rows' paths are relative to (default: its folder).")
    p.add_argument("--eval_max_new_tokens", type=int, default=None, help="Most tokens per held-out answer (default: max_completion_length).")
    p.add_argument("--eval_batch_size", type=int, default=16, help="Held-out prompts generated together (results do not depend on it).")
    p.add_argument("--eval_device", default="auto", help="Device of the evaluation ('auto': cuda if available, else cpu).")
    p.add_argument("--delete_checkpoints_when_done", action="store_true",
                   help="Delete a run's checkpoint-N folders once its done.json is written (they hold the optimiser "
                        "state: about 3x the model each; only needed to resume an unfinished run).")
    return p


def parse_options(argv: list[str]) -> AblateOptions:
    parser = build_arg_parser()
    ns, rest = parser.parse_known_args(argv)
    overrides: dict[str, Any] = {}
    if rest:
        tparser = build_parser(TrainConfig, prog="video-ktr ablate (video-ktr train options)")
        overrides = vars(tparser.parse_args(rest))
        overrides.pop("config", None)
        refused = sorted(set(overrides) & set(PER_RUN_KEYS))
        if refused:
            parser.error(f"set per run by the ablation, not an option here: {', '.join('--' + k for k in refused)} "
                         "(see --variants, --seeds, --seed_list, --output_dir)")
    if ns.seed_list:
        try:
            seeds = [int(s) for s in _split_list(ns.seed_list)]
        except ValueError:
            parser.error(f"--seed_list expects integers, got {ns.seed_list}")
    else:
        if ns.seeds < 1:
            parser.error("--seeds must be >= 1")
        seeds = list(range(ns.seeds))
    if len(set(seeds)) != len(seeds):
        parser.error(f"--seed_list has repeated seeds: {seeds}")
    variants = _split_list(ns.variants) or list(VARIANTS)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    variants = list(dict.fromkeys(variants))
    if ns.eval_batch_size < 1 or (ns.eval_max_new_tokens is not None and ns.eval_max_new_tokens < 1):
        parser.error("--eval_batch_size and --eval_max_new_tokens must be >= 1")
    return AblateOptions(config=ns.config, output_dir=ns.output_dir, seeds=seeds, variants=variants,
                         eval_data=ns.eval_data, eval_media_root=ns.eval_media_root,
                         eval_max_new_tokens=ns.eval_max_new_tokens, eval_batch_size=ns.eval_batch_size,
                         eval_device=ns.eval_device, delete_checkpoints_when_done=ns.delete_checkpoints_when_done,
                         train_overrides=overrides, argv=list(argv))


# ---------------------------------------------------------------------------------------- run settings


def base_config(opts: AblateOptions) -> TrainConfig:
    """The settings shared by every run (validated once, before any run starts)."""
    values = load_yaml(opts.config)
    values.update(opts.train_overrides)
    for key in PER_RUN_KEYS:
        values.pop(key, None)
    values["output_dir"] = str(Path(opts.output_dir) / "_base")  # replaced per run
    try:
        cfg = from_dict(TrainConfig, values, source=opts.config)
    except ValueError as exc:
        raise AblateError(str(exc)) from exc
    if cfg.max_steps == -1:  # a finished run is recognised by its step count; epochs are counted per launch
        raise AblateError(f"{opts.config}: ablate runs a fixed number of optimiser steps; give --max_steps N instead of "
                          f"--num_train_epochs {cfg.num_train_epochs} (one epoch is ceil(rows / prompts per step) steps)")
    if not cfg.save_steps:  # checkpoints, so that an interrupted run resumes
        cfg.save_steps = max(1, cfg.max_steps // 4)
    if cfg.save_total_limit is None:  # only the newest one is needed to resume
        cfg.save_total_limit = 1
    return cfg


def run_dir(out: Path, variant: str, seed: int) -> Path:
    return out / variant / f"seed{seed}"


def run_config(base: TrainConfig, variant: str, seed: int, folder: Path) -> TrainConfig:
    cfg = dataclasses.replace(base, **{k: (list(v) if isinstance(v, list) else v) for k, v in VARIANTS[variant].items()},
                              seed=seed, output_dir=str(folder), resume_from_checkpoint=None)
    cfg.validate()
    return cfg


def comparable(cfg: TrainConfig | dict[str, Any]) -> dict[str, Any]:
    values = dataclasses.asdict(cfg) if isinstance(cfg, TrainConfig) else dict(cfg)
    values = json.loads(json.dumps(values))  # tuples -> lists, as read back from a file
    return {k: v for k, v in values.items() if k not in NEUTRAL_KEYS}


def config_differences(old: dict[str, Any], new: TrainConfig) -> list[str]:
    a, b = comparable(old), comparable(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


# ---------------------------------------------------------------------------------------- evaluation


def default_eval_data(cfg: TrainConfig) -> Path | None:
    candidate = Path(cfg.dataset).parent / "test.json"
    return candidate if candidate.is_file() else None


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def eval_protocol(opts: AblateOptions, cfg: TrainConfig) -> dict[str, Any] | None:
    """Everything the held-out numbers depend on (besides the model); None when there is no held-out set."""
    data = Path(opts.eval_data) if opts.eval_data else default_eval_data(cfg)
    if data is None:
        return None
    if not data.is_file():
        raise FileNotFoundError(f"--eval_data {data} does not exist")
    media_root = Path(opts.eval_media_root) if opts.eval_media_root else data.parent
    protocol = {
        "data": str(data), "data_sha256": _digest(data), "media_root": str(media_root),
        "max_new_tokens": opts.eval_max_new_tokens or cfg.max_completion_length,
        "prompt_layout": cfg.prompt_layout, "system_prompt": cfg.system_prompt,
        "frames": dataclasses.asdict(cfg.frame_settings()),
        "decodings": {"greedy": {"greedy": True, "temperature": 0.0, "top_p": 1.0},
                      "sampled": {"greedy": False, "temperature": 1.0, "top_p": 1.0}},
        "sampling_seed": "the run's seed",
    }
    return json.loads(json.dumps(protocol))  # as read back from done.json (tuples -> lists)


def _accuracy_record(metrics: dict[str, Any], results: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Accuracy overall and per kind; with ``results`` also each item's score (keyed by problem_id, for the
    paired tests) and the accuracy on the rows synth marked unseen (``seen_in_train`` false)."""
    record: dict[str, Any] = {"accuracy": metrics.get("overall"),
                              "by_kind": {k: v.get("accuracy") for k, v in (metrics.get("by_kind") or {}).items()},
                              "num_failed": metrics.get("num_failed")}
    if results is not None:
        items, unseen, unseen_ids = {}, [], []
        for i, r in enumerate(results):
            meta = r.get("meta") or {}
            key = str(r.get("problem_id", i))
            items[key] = r.get("score")
            if r.get("seen_in_train", meta.get("seen_in_train")) is False and r.get("score") is not None:
                unseen.append(float(r["score"]))
                unseen_ids.append(key)
        record.update(items=items, unseen_items=unseen_ids, unseen_rows=len(unseen),
                      unseen_accuracy=sum(unseen) / len(unseen) if unseen else None)
    return record


def evaluate_run(folder: Path, cfg: TrainConfig, protocol: dict[str, Any], opts: AblateOptions) -> dict[str, Any]:
    """Greedy and sampled (temperature 1, top_p 1) accuracy of the run's final model, overall and per kind."""
    rows = read_rows(Path(protocol["data"]))
    model = load_model(str(folder), dtype=cfg.dtype, attn_implementation=cfg.attn_implementation,
                       device=pick_device(opts.eval_device))
    model.eval()
    processor = load_processor(str(folder))
    settings = FrameSettings(**protocol["frames"])
    out: dict[str, Any] = {}
    for name, dec in protocol["decodings"].items():
        results, metrics = evaluate_rows(
            model, processor, rows, protocol["media_root"], settings, greedy=dec["greedy"],
            temperature=dec["temperature"], top_p=dec["top_p"], max_new_tokens=protocol["max_new_tokens"],
            batch_size=opts.eval_batch_size, seed=cfg.seed, prompt_layout=protocol["prompt_layout"],
            system_prompt=protocol["system_prompt"], progress=not bars_disabled(cfg),  # --disable_tqdm (a train option)
            progress_desc=f"eval {folder.parent.name}/{folder.name} {name}",
        )
        write_json_atomic(folder / f"eval_{name}.json", {"results": results, "metrics": metrics, "protocol": protocol})
        out[name] = _accuracy_record(metrics, results)
    del model
    _free_memory()
    return out


# ---------------------------------------------------------------------------------------- one run


def read_metrics(folder: Path) -> list[dict[str, Any]]:
    return read_jsonl(folder / "metrics.jsonl")


def _mean_or_none(values: list[Any]) -> float | None:
    vals = finite(values)
    return sum(vals) / len(vals) if vals else None


def run_summary(metrics: list[dict[str, Any]], evaluation: dict[str, Any] | None) -> dict[str, Any]:
    """The per-run numbers that are aggregated over seeds (None when not measured)."""
    n_last = max(1, math.ceil(0.1 * len(metrics))) if metrics else 0
    last = metrics[-n_last:] if n_last else []
    summary: dict[str, Any] = {
        "greedy_accuracy": (evaluation or {}).get("greedy", {}).get("accuracy"),
        "sampled_accuracy": (evaluation or {}).get("sampled", {}).get("accuracy"),
        "greedy_unseen_accuracy": (evaluation or {}).get("greedy", {}).get("unseen_accuracy"),
        "sampled_unseen_accuracy": (evaluation or {}).get("sampled", {}).get("unseen_accuracy"),
        "final_reward": _mean_or_none([m.get("reward") for m in last]),
        "final_accuracy_reward": _mean_or_none([m.get("accuracy_reward") for m in last]),
        "loss_variance": _mean_or_none([m.get("loss_variance") for m in metrics]),
        "key_token_fraction": _mean_or_none([m.get("key_token_fraction") for m in metrics]),
    }
    for key in DIAGNOSTICS:  # means over the steps that logged them
        summary[key] = _mean_or_none([m.get(key) for m in metrics])
    summary["final_steps_averaged"] = n_last
    summary["diagnostic_steps"] = sum(1 for m in metrics if finite([m.get("grad_norm_key")]))
    return summary


def _has_final_model(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds")


class RunRecord(dict):
    """done.json of a run (a dict), plus whether this invocation trained / evaluated it."""

    trained_now: bool = False
    evaluated_now: bool = False


def run_one(variant: str, seed: int, cfg: TrainConfig, protocol: dict[str, Any] | None, opts: AblateOptions,
            tag: str) -> RunRecord:
    """Train (or resume, or reuse) one run, evaluate its final model and write its done.json."""
    folder = Path(cfg.output_dir)
    done_file = folder / DONE
    t0 = time.perf_counter()
    if done_file.is_file() and _has_final_model(folder):
        done = json.loads(done_file.read_text())
        diff = config_differences(done.get("train_config", {}), cfg)
        if diff:
            raise AblateError(f"{folder} was trained with other settings ({'; '.join(diff)}); use another "
                               "--output_dir or delete that folder")
        if done.get("eval_protocol") == protocol:
            print(f"{tag} {variant} seed{seed}: already done, reused ({folder})", flush=True)
            return RunRecord(done, run_dir=str(folder))  # the folder may have moved
        print(f"{tag} {variant} seed{seed}: trained before; the held-out protocol changed, evaluating again", flush=True)
        record = RunRecord(done, run_dir=str(folder))
    else:
        started = folder / "train_config.json"
        if started.is_file():
            diff = config_differences(json.loads(started.read_text()), cfg)
            if diff:
                raise AblateError(f"{folder} was started with other settings ({'; '.join(diff)}); use another "
                                   "--output_dir or delete that folder")
        checkpoints = ckpt.complete_checkpoints(folder)
        metrics = read_metrics(folder)
        resumed_from = None
        if checkpoints:
            resumed_from = int(checkpoints[-1].name.rsplit("-", 1)[1])
            cfg = dataclasses.replace(cfg, resume_from_checkpoint="latest")
            how = f"resuming from {checkpoints[-1].name}"
        elif _has_final_model(folder) and started.is_file() and metrics and metrics[-1].get("step") == cfg.max_steps:
            how = None  # trained to the end (no checkpoint left): evaluate only
        else:
            how = "fresh"
            cfg = dataclasses.replace(cfg, overwrite_output_dir=True)  # a run killed before its first checkpoint
        train_seconds = None
        if how is not None:
            print(f"{tag} {variant} seed{seed}: training ({how}, {cfg.max_steps} steps, token_selection="
                  f"{','.join(cfg.token_selection)}, temporal_grpo={cfg.temporal_grpo}) -> {folder}", flush=True)
            t_train = time.perf_counter()
            trainer = KTRTrainer(cfg)
            trainer.train()
            del trainer
            _free_memory()
            train_seconds = time.perf_counter() - t_train
            print(f"{tag} {variant} seed{seed}: trained in {train_seconds:.1f} s", flush=True)
        else:
            print(f"{tag} {variant} seed{seed}: training had finished; evaluating", flush=True)
        record = RunRecord(variant=variant, seed=seed, run_dir=str(folder), train_config=json.loads(json.dumps(
            dataclasses.asdict(dataclasses.replace(cfg, resume_from_checkpoint=None)))),
            train_seconds=train_seconds, resumed_from_step=resumed_from)
        record.trained_now = how is not None
    metrics = read_metrics(folder)
    evaluation = None
    eval_seconds = None
    if protocol is not None:
        t_eval = time.perf_counter()
        evaluation = evaluate_run(folder, cfg, protocol, opts)
        eval_seconds = time.perf_counter() - t_eval
        record.evaluated_now = True
    record.update(
        steps=len(metrics), step_seconds_total=sum(finite([m.get("step_seconds") for m in metrics])),
        eval_protocol=protocol, evaluation=evaluation, eval_seconds=eval_seconds,
        summary=run_summary(metrics, evaluation), finished_at=_now(),
    )
    write_json_atomic(done_file, dict(record))
    if opts.delete_checkpoints_when_done:
        for old in ckpt.complete_checkpoints(folder):
            shutil.rmtree(old)
    s = record["summary"]
    print(f"{tag} {variant} seed{seed}: finished in {time.perf_counter() - t0:.1f} s "
          f"(train {_fmt_s(record.get('train_seconds') if record.trained_now else None)}, eval {_fmt_s(eval_seconds)}): "
          f"greedy acc {_fmt(s['greedy_accuracy'])}, sampled acc {_fmt(s['sampled_accuracy'])}, "
          f"final reward {_fmt(s['final_reward'])}", flush=True)
    return record


def _fmt_s(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


# ---------------------------------------------------------------------------------------- aggregation


def aggregate(records: dict[str, list[RunRecord]], seeds: list[int]) -> dict[str, Any]:
    variants: dict[str, Any] = {}
    for name, runs in records.items():
        summaries = [r["summary"] for r in runs]
        metrics = {m: stats([s.get(m) for s in summaries]) for m in METRICS}
        for m in ACCURACIES:  # 95 % intervals: t over the seeds' accuracies, bootstrap over the pooled items
            metrics[m]["ci95_seeds"] = mean_ci([s.get(m) for s in summaries])
            metrics[m]["ci95_items"] = item_bootstrap(runs, m)
        by_kind: dict[str, dict[str, Any]] = {}
        for dec in ("greedy", "sampled"):
            kinds = sorted({k for r in runs for k in ((r.get("evaluation") or {}).get(dec, {}).get("by_kind") or {})})
            by_kind[dec] = {k: stats([((r.get("evaluation") or {}).get(dec, {}).get("by_kind") or {}).get(k) for r in runs])
                            for k in kinds}
        variants[name] = {**VARIANTS[name], "seeds": list(seeds), "run_dirs": [r["run_dir"] for r in runs],
                          "metrics": metrics, "by_kind": by_kind}
    return variants


# ---------------------------------------------------------------------------------------- driver


def run_ablation(opts: AblateOptions) -> dict[str, Any]:
    """Train, evaluate and report every (variant, seed); returns the content of ablation.json."""
    if launched_world_size() > 1:
        raise AblateError("video-ktr ablate runs its runs one after another in ONE process; launch it without "
                           "torchrun / accelerate launch")
    started, t0 = _now(), time.perf_counter()
    out = Path(opts.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = base_config(opts)
    protocol = eval_protocol(opts, base)
    if protocol is None:
        print("video-ktr ablate: no held-out set (no --eval_data, no test.json beside the training data): "
              "held-out accuracy is not measured", file=sys.stderr)
    plan = [(v, s) for s in opts.seeds for v in opts.variants]  # seed-major: every variant has a result early
    print(f"ablation: {len(opts.variants)} variants x {len(opts.seeds)} seeds = {len(plan)} runs of "
          f"{base.max_steps} steps from {base.model_name_or_path} -> {out}", flush=True)
    records: dict[str, list[RunRecord]] = {v: [] for v in opts.variants}
    for i, (variant, seed) in enumerate(plan, 1):
        folder = run_dir(out, variant, seed)
        cfg = run_config(base, variant, seed, folder)
        records[variant].append(run_one(variant, seed, cfg, protocol, opts, f"[{i}/{len(plan)}]"))
    variants = aggregate(records, opts.seeds)
    report: dict[str, Any] = {
        "command": "video-ktr ablate " + shlex.join(opts.argv),
        "argv": opts.argv,
        "started": started,
        "machine": machine_info(),
        "output_dir": str(out),
        "seeds": list(opts.seeds),
        "variants_run": list(opts.variants),
        "base_train_config": {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(base))).items()
                              if k not in PER_RUN_KEYS},
        "eval": protocol,
        "runs_trained_now": sum(r.trained_now for rs in records.values() for r in rs),
        "runs_evaluated_now": sum(r.evaluated_now for rs in records.values() for r in rs),
        "runs_reused": sum(not (r.trained_now or r.evaluated_now) for rs in records.values() for r in rs),
        "variants": variants,
        "reading": reading(variants),
        "paired_tests": paired_against_baseline({v: [dict(r) for r in rs] for v, rs in records.items()}),
    }
    report["plots"] = write_plots(out, variants, reward_curves(records))
    report["finished"] = _now()
    report["wall_seconds"] = time.perf_counter() - t0
    write_json_atomic(out / "ablation.json", report)
    write_markdown(out / "ablation.md", report)
    print(f"\nablation: {out / 'ablation.md'} ({report['wall_seconds']:.1f} s)")
    for entry in report["reading"]:
        print(f"  {entry['text']}")
    return report
