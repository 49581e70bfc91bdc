"""The demo's report: ``summary.md`` and PNG plots from measured values only (nothing rescaled)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from video_ktr.analysis.plots import moving_average, pyplot, save_figure
from video_ktr.utils.jsonl import read_jsonl


def sft_accuracy_curves(sft: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """(step, accuracy) per question kind (and "overall") from the SFT metrics' eval_accuracy keys."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for m in sft:
        for key, value in m.items():
            if key == "eval_accuracy" or key.startswith("eval_accuracy/"):
                name = "overall" if key == "eval_accuracy" else key.split("/", 1)[1]
                if value is not None:
                    curves.setdefault(name, []).append((int(m["step"]), float(value)))
    return curves


def _plot_curves(out: Path, sft: list[dict], rl: list[dict]) -> list[str]:
    plt = pyplot()
    written = []
    if sft:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([m["step"] for m in sft], [m["loss"] for m in sft], lw=0.8)
        ax.set_xlabel("SFT step")
        ax.set_ylabel("loss")
        ax.set_title("SFT cold start: training loss")
        written.append(save_figure(fig, out / "sft_loss.png"))
        curves = sft_accuracy_curves(sft)
        if curves:
            fig, ax = plt.subplots(figsize=(6, 3.8))
            for name, points in curves.items():
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=3,
                        lw=2.2 if name == "overall" else 1, label=name)
            ax.set_xlabel("SFT step")
            ax.set_ylabel("held-out accuracy (greedy)")
            ax.set_ylim(0, 1.02)
            ax.set_title("SFT cold start: accuracy per question kind")
            ax.legend(fontsize=7, ncol=2)
            written.append(save_figure(fig, out / "sft_accuracy.png"))
    if rl:
        steps = [m["step"] for m in rl]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for key, label in (("reward", "reward"), ("accuracy_reward", "accuracy reward"), ("format_reward", "format reward")):
            if key in rl[0]:
                vals = [m[key] for m in rl]
                ax.plot(steps, vals, lw=0.5, alpha=0.35)
                ax.plot(steps, moving_average(vals, 10), lw=1.5, label=f"{label} (10-step mean)")
        ax.set_xlabel("GRPO step")
        ax.set_ylabel("mean over the step's completions")
        ax.set_title("KTR training rewards (measured)")
        ax.legend(fontsize=7)
        written.append(save_figure(fig, out / "rl_reward.png"))
        if "key_token_fraction" in rl[0]:
            fig, ax = plt.subplots(figsize=(6, 3.5))
            for key in ("key_token_fraction", "entropy_fraction", "visual_fraction", "temporal_fraction"):
                if key in rl[0]:
                    ax.plot(steps, [m[key] for m in rl], lw=1, label=key)
            ax.set_xlabel("GRPO step")
            ax.set_ylabel("fraction of completion tokens")
            ax.set_title("Key tokens selected per step")
            ax.legend(fontsize=7)
            written.append(save_figure(fig, out / "key_tokens.png"))
    return written


def _plot_accuracy(out: Path, before: dict, after: dict) -> str:
    plt = pyplot()
    kinds = sorted(set(before["greedy"]["by_kind"]) | set(after["greedy"]["by_kind"]))
    labels = ["overall", *kinds]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(labels)), 3.8))
    width = 0.2
    series = [("SFT greedy", before, "greedy"), ("KTR greedy", after, "greedy")]
    sampled = "sampled" if "sampled" in before and "sampled" in after else "sampled_0"
    if sampled in before and sampled in after:
        series += [("SFT sampled", before, sampled), ("KTR sampled", after, sampled)]
    for j, (name, rep, key) in enumerate(series):
        vals = [rep[key]["accuracy"]] + [rep[key]["by_kind"].get(k, float("nan")) for k in kinds]
        ax.bar([i + (j - len(series) / 2 + 0.5) * width for i in range(len(labels))], vals, width, label=name)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.set_title("Held-out accuracy before and after RL")
    return save_figure(fig, out / "accuracy.png")


def write_report(out: Path, results: dict[str, Any]) -> Path:
    sft = read_jsonl(out / "sft" / "metrics.jsonl")
    rl = read_jsonl(out / "ktr" / "metrics.jsonl")
    plots = _plot_curves(out, sft, rl)
    before, after = results["before"], results["after"]
    plots.append(_plot_accuracy(out, before, after))
    kinds = sorted(set(before["greedy"]["by_kind"]) | set(after["greedy"]["by_kind"]))
    held = results.get("held_out") or {}
    lines = [
        "# video-ktr demo: SFT cold start, then GRPO with key-token reinforcement",
        "",
        *([f"Held out by content (synth --held_out redraw): none of the {results['config']['num_test']} test questions "
           f"equals a training row in question, options, answer and video ({held.get('test_redraws', 0)} test rows were "
           "redrawn to make it so), so every accuracy below is on unseen rows."]
          if held.get("held_out") == "redraw" and held.get("test_rows_identical_to_a_train_row") == 0 else []),
        f"Held-out questions: {results['config']['num_test']}; RL steps: {results['config']['rl_steps']} "
        f"({results['config']['rl_prompts']} prompts x {results['config']['num_generations']} completions); "
        f"token selection: {', '.join(results['config']['token_selection'])}; seed {results['config']['seed']}.",
        *([f"SFT data: {results['config']['cot_error_rate']:.0%} of the chain-of-thought rows carry a flawed teacher's "
           "reasoning and answer (synth --cot_error_rate); RL rewards and evaluation use the ground truth."]
          if results["config"].get("cot_error_rate") else []),
        "",
        "| accuracy | SFT (before RL) | KTR (after RL) | change |",
        "|---|---|---|---|",
    ]
    # greedy and the mean of the sampled evaluations (each sample's own figures stay in results.json)
    keys = [k for k in before if k in after and not (k.startswith("sampled_") and "sampled" in before)]
    for key in keys:
        b, a = before[key]["accuracy"], after[key]["accuracy"]
        label = f"sampled (mean of {before[key]['samples']})" if key == "sampled" else key
        lines.append(f"| {label} overall | {b:.3f} | {a:.3f} | {a - b:+.3f} |")
        bu, au = before[key].get("unseen_accuracy"), after[key].get("unseen_accuracy")
        everything_unseen = before[key].get("unseen_rows") == results["config"]["num_test"]  # the line above again
        if bu is not None and au is not None and not everything_unseen:
            lines.append(f"| {label} unseen rows only ({before[key]['unseen_rows']}) | {bu:.3f} | {au:.3f} | {au - bu:+.3f} |")
        for kind in kinds:
            b2, a2 = before[key]["by_kind"].get(kind), after[key]["by_kind"].get(kind)
            if b2 is not None and a2 is not None:
                lines.append(f"| {label} {kind} | {b2:.3f} | {a2:.3f} | {a2 - b2:+.3f} |")
    if rl:
        first, last = rl[: min(10, len(rl))], rl[-min(10, len(rl)):]

        def mean(ms, k):
            return sum(m.get(k, 0.0) for m in ms) / max(1, len(ms))

        lines += [
            "",
            f"Training reward, mean of the first {len(first)} steps: {mean(first, 'reward'):.3f}; "
            f"of the last {len(last)}: {mean(last, 'reward'):.3f}. Key-token fraction: {mean(rl, 'key_token_fraction'):.3f} "
            f"of completion tokens on average.",
        ]
    curves = sft_accuracy_curves(sft)
    if curves:
        names = ["overall", *sorted(n for n in curves if n != "overall")]
        steps = sorted({step for points in curves.values() for step, _ in points})
        table = {n: dict(points) for n, points in curves.items()}
        lines += ["", "SFT cold start, held-out greedy accuracy per question kind (measured during SFT):", "",
                  "| SFT step | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for step in steps:
            cells = [f"{table[n][step]:.2f}" if step in table.get(n, {}) else "" for n in names]
            lines.append(f"| {step} | " + " | ".join(cells) + " |")
    t = results["timings_seconds"]
    lines += ["", "Time per stage (s): " + ", ".join(f"{k} {v:.0f}" for k, v in t.items())
              + f"; total {results['total_seconds']:.0f} s.", ""]
    lines += [f"![{p}]({p})" for p in plots]
    path = out / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path
