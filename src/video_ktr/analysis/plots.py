"""The report's figures (matplotlib, imported only when a figure is drawn): training curves, gradient
norms and cosines, Jaccard overlaps of the token sets, word-class shares.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from video_ktr.analysis.runs import PAIRS, Run

# ---------------------------------------------------------------------------- figures


def pyplot():
    """matplotlib.pyplot on the Agg backend."""
    # imported on first use: the Agg backend (files only, no display) must be chosen before pyplot loads
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> str:
    """Write ``fig`` to ``path`` (PNG, 110 dpi, tight layout), close it and return the file name."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path.name


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over the last `window` values (fewer at the start)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_curve(runs: Sequence[Run], key: str, ylabel: str, title: str, path: Path) -> str | None:
    """One metric over steps, runs overlaid; runs of 20+ steps add their 10-step trailing mean."""
    plt = pyplot()
    drawn = False
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for k, run in enumerate(runs):
        steps, values = run.series(key)
        if not steps:
            continue
        colour = f"C{k % 10}"
        if len(steps) >= 20:
            ax.plot(steps, values, lw=0.6, alpha=0.35, color=colour)
            ax.plot(steps, moving_average(values, 10), lw=1.6, color=colour, label=f"{run.name} (10-step mean)")
        else:
            ax.plot(steps, values, lw=1.4, marker="o", ms=3, color=colour, label=run.name)
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title} (measured, per step)")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_gradients(runs: Sequence[Run], path_norms: Path, path_cos: Path) -> list[str]:
    """Gradient norms (key, masked, full) and cosines with the full gradient over the diagnosed steps."""
    plt = pyplot()
    written = []
    for path, series, ylabel, title in (
        (path_norms, (("grad_norm_key", "-", "key"), ("grad_norm_masked", "--", "masked"), ("grad_norm_full", ":", "full")),
         "gradient norm (last layer + LM head)", "Gradient norm of the loss on each token set"),
        (path_cos, (("cos_key_full", "-", "key"), ("cos_masked_full", "--", "masked")),
         "cosine with the all-token gradient", "Cosine with the full-loss gradient"),
    ):
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        drawn = False
        for k, run in enumerate(runs):
            for key, style, label in series:
                steps, values = run.series(key)
                if steps:
                    ax.plot(steps, values, ls=style, lw=1.4, marker="o", ms=3, color=f"C{k % 10}", label=f"{run.name}: {label}")
                    drawn = True
        if not drawn:
            plt.close(fig)
            continue
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=7)
        written.append(save_figure(fig, path))
    return written


def plot_jaccard(runs: Sequence[Run], path: Path) -> str | None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    styles = ("-", "--", ":", "-.")
    drawn = False
    for k, run in enumerate(runs):
        for j, key in enumerate(PAIRS):
            steps, values = run.series(key)
            if steps:
                label = key.removeprefix("jaccard_").replace("_", " & ")
                ax.plot(steps, values, ls=styles[k % len(styles)], lw=1.4, marker="o", ms=3, color=f"C{j}",
                        label=f"{run.name}: {label}")
                drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_ylabel("Jaccard |A & B| / |A | B|")
    ax.set_title("Overlap of the signals' token sets")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_word_classes(shares: dict[tuple[str, str], Counter], classes: Sequence[str], path: Path) -> str | None:
    """Stacked horizontal bars: the share of each word class in each (run, set)."""
    rows = [(k, c) for k, c in shares.items() if sum(c.values())]
    if not rows:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(rows) + 1.6))
    labels = [f"{run}: {name} ({sum(c.values())} tokens)" for (run, name), c in rows]
    left = [0.0] * len(rows)
    for j, cls in enumerate(classes):
        vals = [c.get(cls, 0) / sum(c.values()) for _, c in rows]
        if not any(vals):
            continue
        ax.barh(range(len(rows)), vals, left=left, color=f"C{j % 10}", label=cls)
        left = [a + b for a, b in zip(left, vals)]
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of the set's tokens")
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.25))
    return save_figure(fig, path)
