"""The ablation's report: ablation.md (tables, paired tests, set-up) and the plots."""

from __future__ import annotations

import os
import platform
import statistics
from pathlib import Path
from typing import Any

from video_ktr.analysis.ablation_stats import ACCURACIES, BASELINE, finite
from video_ktr.analysis.plots import pyplot, save_figure
from video_ktr.utils.jsonl import read_jsonl

# summary numbers of a run (done.json "summary") aggregated over seeds
METRICS = ("greedy_accuracy", "sampled_accuracy", "greedy_unseen_accuracy", "sampled_unseen_accuracy", "final_reward",
           "final_accuracy_reward", "loss_variance", "key_token_fraction", "grad_norm_key", "grad_norm_masked", "cos_key_full", "cos_masked_full")
DIAGNOSTICS = ("grad_norm_key", "grad_norm_masked", "cos_key_full", "cos_masked_full")
LABELS = {
    "greedy_accuracy": "held-out acc. (greedy)", "sampled_accuracy": "held-out acc. (T=1)",
    "greedy_unseen_accuracy": "unseen rows (greedy)", "sampled_unseen_accuracy": "unseen rows (T=1)",
    "final_reward": "final reward", "final_accuracy_reward": "final acc. reward", "loss_variance": "loss variance",
    "key_token_fraction": "key-token fraction", "grad_norm_key": "grad_norm_key", "grad_norm_masked": "grad_norm_masked",
    "cos_key_full": "cos_key_full", "cos_masked_full": "cos_masked_full",
}

def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"



# ---------------------------------------------------------------------------------------- report


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"nproc": os.cpu_count(), "platform": platform.platform(), "machine": platform.machine(),
                            "processor": platform.processor() or None, "python": platform.python_version()}
    if hasattr(os, "sched_getaffinity"):
        info["nproc_usable"] = len(os.sched_getaffinity(0))
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:  # pragma: no cover
        pass
    return info


def _pm(st: dict[str, Any], digits: int = 3) -> str:
    if st["mean"] is None:
        return "—"
    if st["std"] is None:
        return f"{st['mean']:.{digits}f}"
    return f"{st['mean']:.{digits}f} ± {st['std']:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def _interval(ci: dict[str, Any] | None) -> str:
    if not ci or ci.get("low") is None:
        return "—"
    return f"[{ci['low']:.3f}, {ci['high']:.3f}]"


def _p(value: float | None) -> str:
    return "—" if value is None else (f"{value:.3f}" if value >= 0.001 else f"{value:.1e}")


def _intervals_and_tests(report: dict[str, Any]) -> list[str]:
    """The 95 % intervals of each accuracy and the paired tests against the baseline (ablation_stats)."""
    variants = report["variants"]
    metrics = [m for m in ACCURACIES if any(v["metrics"][m]["n"] for v in variants.values())]
    if not metrics:
        return []
    lines = ["", "## 95 % intervals", "",
             "Per accuracy: the Student-t interval of the mean over seeds, and the percentile bootstrap (10,000 "
             "resamples, seeded) of the accuracy over the items of all seeds pooled (seed-to-seed variation is not "
             "in the second).", ""]
    rows = [[f"`{n}`", *(f"{_interval(v['metrics'][m].get('ci95_seeds'))} / {_interval(v['metrics'][m].get('ci95_items'))}"
                         for m in metrics)] for n, v in variants.items()]
    lines += _table(["variant", *(f"{LABELS[m]}: seeds / items" for m in metrics)], rows)
    tests = report.get("paired_tests") or []
    if tests:
        lines += ["", f"## Paired tests against `{BASELINE}`", "",
                  "Paired t-test over the seeds both variants ran (same seed: same data order and start); exact "
                  "McNemar on per-item correctness (score >= 0.5) of the same seed, pooled over seeds. Two-sided p; "
                  "no correction for the number of comparisons.", ""]
        lines += _table(["variant", "metric", "mean diff.", "t (df)", "p (t)", "items: variant only / baseline only",
                         "p (McNemar)"],
                        [[f"`{e['variant']}`", LABELS[e["metric"]], _fmt(e["t_test"]["mean_difference"]),
                          "—" if e["t_test"]["t"] is None else f"{e['t_test']['t']:.2f} ({e['t_test']['df']})",
                          _p(e["t_test"]["p"]), f"{e['mcnemar']['a_only']} / {e['mcnemar']['b_only']}",
                          _p(e["mcnemar"]["p"])] for e in tests])
    return lines


def write_markdown(path: Path, report: dict[str, Any]) -> None:
    variants = report["variants"]
    cols = [m for m in METRICS if any(v["metrics"][m]["n"] for v in variants.values())]
    lines = ["# Ablation: GRPO, T-GRPO, single signals, random mask and KTR", "",
             f"Mean ± sample standard deviation over seeds {report['seeds']} (n = {len(report['seeds'])} per variant; "
             "held-out accuracy on the final model of each run). Every run: the same start model, data, steps "
             "and hyper-parameters; only token_selection / temporal_grpo / token_weighting differ.", ""]
    rows = []
    for name, v in variants.items():
        rows.append([f"`{name}`", ",".join(v["token_selection"]), str(v["temporal_grpo"]).lower(),
                     v.get("token_weighting", "hard"),
                     *(_pm(v["metrics"][m], 4 if m in ("loss_variance",) + DIAGNOSTICS else 3) for m in cols)])
    lines += _table(["variant", "token_selection", "temporal_grpo", "token_weighting", *(LABELS[m] for m in cols)], rows)
    lines += ["", "Per seed, held-out greedy accuracy:", ""]
    lines += _table(["variant", *(f"seed {s}" for s in report["seeds"])],
                    [[f"`{n}`", *(_fmt(x) for x in v["metrics"]["greedy_accuracy"]["values"])] for n, v in variants.items()])
    lines += _intervals_and_tests(report)
    lines += ["", "## Reading (computed)", ""]
    if report["reading"]:
        lines.append(f"For each variant vs `{BASELINE}`: is the difference of mean greedy held-out accuracy larger "
                     "than the pooled seed-to-seed standard deviation? (A rough check with few seeds, not a "
                     "significance test.)")
        lines.append("")
        lines += [f"- {e['text']}" for e in report["reading"]]
    else:
        lines.append(f"No `{BASELINE}` run in this ablation: nothing to compare with.")
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in report["plots"]]
    ev = report["eval"]
    lines += ["", "## Set-up", "",
              f"- command: `{report['command']}`",
              f"- machine: nproc {report['machine'].get('nproc')} (usable {report['machine'].get('nproc_usable')}), "
              f"{report['machine']['platform']}, python {report['machine']['python']}, torch "
              f"{report['machine'].get('torch')}, CUDA devices: {report['machine'].get('cuda_devices') or 'none'}",
              f"- date: {report['started']} to {report['finished']}",
              f"- total wall time of this invocation: {report['wall_seconds']:.1f} s ({report['runs_trained_now']} runs "
              f"trained, {report['runs_evaluated_now']} evaluated, {report['runs_reused']} reused)",
              f"- start model: `{report['base_train_config']['model_name_or_path']}`, data: "
              f"`{report['base_train_config']['dataset']}`, {report['base_train_config']['max_steps']} steps",
              (f"- held-out set: `{ev['data']}` (sha256 {ev['data_sha256']}), greedy and sampled (temperature 1.0, "
               f"top_p 1.0, seed = run seed), at most {ev['max_new_tokens']} new tokens") if ev else
              "- held-out set: none (no --eval_data and no test.json beside the training data)",
              "- final reward: mean reward of the last 10% of steps; loss variance, key-token fraction and gradient "
              "diagnostics: means over the logged steps", ""]
    path.write_text("\n".join(lines))


def write_plots(out: Path, variants: dict[str, Any], curves: dict[str, dict[int, list[float]]]) -> list[str]:
    plt = pyplot()
    written = []
    names = list(variants)
    if any(v["metrics"]["greedy_accuracy"]["n"] for v in variants.values()):
        fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(names) + 2), 3.6))
        width = 0.38
        for j, (metric, label) in enumerate((("greedy_accuracy", "greedy"), ("sampled_accuracy", "sampled (T=1)"))):
            means = [variants[n]["metrics"][metric]["mean"] for n in names]
            stds = [variants[n]["metrics"][metric]["std"] or 0.0 for n in names]
            xs = [i + (j - 0.5) * width for i in range(len(names))]
            ax.bar(xs, [m if m is not None else 0.0 for m in means], width, yerr=stds, capsize=4, label=label)
        ax.set_xticks(range(len(names)), names)
        ax.set_ylabel("held-out accuracy")
        ax.set_ylim(0.0, 1.05)
        ax.set_title(f"held-out accuracy, mean ± std over {len(next(iter(variants.values()))['seeds'])} seeds")
        ax.legend()
        written.append(save_figure(fig, out / "accuracy.png"))
    if any(curves.values()):
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        for name in names:
            steps = sorted(curves.get(name, {}))
            if not steps:
                continue
            means = [statistics.fmean(curves[name][s]) for s in steps]
            stds = [statistics.stdev(curves[name][s]) if len(curves[name][s]) > 1 else 0.0 for s in steps]
            (line,) = ax.plot(steps, means, label=name, marker="." if len(steps) < 20 else None)
            ax.fill_between(steps, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                            color=line.get_color(), alpha=0.15)
        ax.set_xlabel("step")
        ax.set_ylabel("reward (mean over seeds)")
        ax.set_title("training reward, mean ± std over seeds")
        ax.legend(fontsize=8)
        written.append(save_figure(fig, out / "reward_curves.png"))
    return written


def reward_curves(records: dict[str, list[dict[str, Any]]]) -> dict[str, dict[int, list[float]]]:
    curves: dict[str, dict[int, list[float]]] = {}
    for name, runs in records.items():
        per_step: dict[int, list[float]] = {}
        for r in runs:
            for m in read_jsonl(Path(r["run_dir"]) / "metrics.jsonl"):
                if finite([m.get("reward")]):
                    per_step.setdefault(int(m["step"]), []).append(float(m["reward"]))
        curves[name] = per_step
    return curves


