"""`video-ktr report RUN_DIR [RUN_DIR ...]`: one HTML page about training runs, from measured values only.

Reads each run's metrics.jsonl (and train_config.json, tokens.jsonl when present) and writes
``index.html`` (inline CSS, every string HTML-escaped) plus the PNG figures it shows, in one folder:

- curves of reward, accuracy reward, loss, key-token fraction and loss variance (runs overlaid);
- the gradient diagnostics of --diagnostics_steps (norms and cosines over steps), the Jaccard overlaps
  of the signals' token sets and the mean positions of their tokens;
- logged completions (tokens.jsonl) with each token highlighted by the sets that selected it;
- word clouds of selected vs masked tokens: font size proportional to the measured count, every
  distinct token placed (nothing deleted, nothing multiplied by a random factor);
- part-of-speech (spaCy, when an English model is installed) or function-word shares of the sets;
- a table of the runs side by side.
"""

from __future__ import annotations

import html
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from video_ktr.analysis.plots import plot_curve, plot_gradients, plot_jaccard, plot_word_classes
from video_ktr.analysis.runs import (
    CURVES,
    PAIRS,
    POSITIONS,
    SET_COLOURS,
    Run,
    _mean,
    _slug,
    load_run,
    run_names,
)
from video_ktr.analysis.word_cloud import (
    WORD_CLASSES,
    class_counts,
    token_counts,
    visible,
    word_classifier,
    word_cloud,
)
from video_ktr.core.diagnostics import SIGNAL_NAMES, TokenRecord

# ---------------------------------------------------------------------------- HTML

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1100px;
color:#222;line-height:1.45;padding:0 16px}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:2em}h3{font-size:1.05em}
table{border-collapse:collapse;font-size:.88em;margin:8px 0}th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}img{max-width:100%;border:1px solid #eee;margin:6px 0}
.note{color:#555;font-size:.9em}.figs{display:flex;flex-wrap:wrap;gap:8px}.figs img{max-width:540px}
.completion{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.85em;white-space:pre-wrap;
word-break:break-word;border:1px solid #ddd;border-radius:4px;padding:8px;margin:4px 0 12px;background:#fcfcfc}
.meta{font-size:.85em;color:#444}
.tok{border-radius:2px}.tok.e{background:#fdd9a0}.tok.v{border-bottom:3px solid #1f77b4}
.tok.t{box-shadow:inset 0 3px 0 #2ca02c}.tok.k{font-weight:700}
.legend span{margin-right:14px;padding:1px 4px}
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:.{digits}g}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], left: int = 1) -> str:
    head = "".join(f'<th class="l">{esc(h)}</th>' if i < left else f"<th>{esc(h)}</th>" for i, h in enumerate(header))
    body = "".join(
        "<tr>" + "".join(f'<td class="l">{esc(v)}</td>' if i < left else f"<td>{esc(v)}</td>" for i, v in enumerate(r)) + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(name: str | None, alt: str) -> str:
    return f'<img src="{esc(name)}" alt="{esc(alt)}">' if name else ""


def _display(token: str) -> str:
    """Token text for the page: control characters as their Unicode control pictures."""
    return "".join(chr(0x2400 + ord(c)) if ord(c) < 32 and c not in "\n\t" else ("␡" if c == "\x7f" else c) for c in token)


def token_span(record: TokenRecord, t: int) -> str:
    """One token as <span class="tok ..." title="scores and sets">text</span>, everything escaped."""
    classes = ["tok"]
    sets = []
    for name, cls in (("entropy", "e"), ("visual", "v"), ("temporal", "t"), ("key", "k")):
        flags = record.selected.get(name)
        if flags and flags[t]:
            classes.append(cls)
            sets.append(name)
    scores = []
    for name in SIGNAL_NAMES:
        values = getattr(record, name)
        v = None if values is None else values[t]
        scores.append(f"{name} {'n/a' if v is None else format(v, '.4f')}")
    title = f"{' | '.join(scores)} | sets: {', '.join(sets) or 'none'} | id {record.token_ids[t]} | {visible(record.tokens[t])}"
    return f'<span class="{" ".join(classes)}" title="{esc(title)}">{esc(_display(record.tokens[t]))}</span>'


def completion_html(record: TokenRecord) -> str:
    meta = (f"step {record.step} · problem {record.problem_id} · {record.kind} ({record.data_type}) · "
            f"reward {_fmt(record.reward)} · advantage {_fmt(record.advantage)} · {len(record.tokens)} tokens")
    spans = "".join(token_span(record, t) for t in range(len(record.tokens)))
    return f'<div class="meta">{esc(meta)}</div><div class="completion">{spans}</div>'


def _runs_table(runs: Sequence[Run]) -> str:
    cols = [("reward", "reward"), ("accuracy_reward", "accuracy"), ("key_token_fraction", "key fraction"),
            ("loss_variance", "loss variance")]
    header = ["run", "token selection", "steps"]
    for _, label in cols:
        header += [f"final {label}", f"mean {label}"]
    header += ["mean grad_norm_key", "mean grad_norm_masked", "mean cos_key_full", "mean cos_masked_full"]
    rows = []
    for run in runs:
        row: list[Any] = [run.name, run.selection, len(run.metrics)]
        for key, _ in cols:
            _, values = run.series(key)
            row += [_fmt(values[-1] if values else None), _fmt(_mean(values))]
        for key in ("grad_norm_key", "grad_norm_masked", "cos_key_full", "cos_masked_full"):
            row.append(_fmt(_mean(run.series(key)[1])))
        rows.append(row)
    return _table(header, rows, left=2)


def write_report(run_dirs: Sequence[str | Path], output: str | Path | None = None, *, max_completions: int = 8,
                 pos_method: str = "auto") -> Path:
    """Write index.html and its PNGs into `output` (default RUN_DIRS[0]/report); returns the HTML path."""
    if not run_dirs:
        raise ValueError("give at least one run directory")
    runs = [load_run(p, n) for p, n in zip(run_dirs, run_names(run_dirs))]
    out = Path(output) if output else Path(run_dirs[0]) / "report"
    out.mkdir(parents=True, exist_ok=True)
    classifier = word_classifier(pos_method)
    slugs = [f"{i}_{_slug(r.name)}" for i, r in enumerate(runs)]
    parts: list[str] = []
    add = parts.append

    add("<h1>video-ktr training report</h1>")
    add('<p class="note">Every number and figure is computed from the runs\' own logs (metrics.jsonl, tokens.jsonl); '
        "nothing is rescaled, smoothed without saying so, or left out.</p>")
    add("<ul>" + "".join(f"<li><b>{esc(r.name)}</b>: {esc(r.path.resolve())} · token selection {esc(r.selection)} · "
                         f"{len(r.metrics)} steps · {len(r.tokens)} logged completions</li>" for r in runs) + "</ul>")
    for r in runs:
        for note in r.notes:
            add(f'<p class="note">{esc(r.name)}: {esc(note)}</p>')

    add("<h2>Runs side by side</h2>")
    add('<p class="note">final: the value at the last logged step; mean: over all logged steps (gradient '
        "diagnostics: over the diagnosed steps). – : not logged.</p>")
    add(_runs_table(runs))

    add("<h2>Training curves</h2>")
    figs = [plot_curve(runs, key, ylabel, title, out / f"{key}.png") for key, ylabel, title in CURVES]
    add('<div class="figs">' + "".join(_img(f, f) for f in figs if f) + "</div>")
    missing = [key for (key, _, _), f in zip(CURVES, figs) if not f]
    if missing:
        add(f'<p class="note">Not logged by any run: {esc(", ".join(missing))}.</p>')
    add('<p class="note">loss_variance: the variance of the per-sequence losses L_i of the step\'s completions '
        "(the paper's loss-variance diagnostic), logged at every step.</p>")

    add("<h2>Gradient diagnostics</h2>")
    if any(r.has("grad_norm_key") for r in runs):
        add('<p class="note">From <code>--diagnostics_steps</code>: on the first micro-batch of a diagnosed step, the '
            "gradient of the loss restricted to the key tokens (what training applies), to the masked tokens (valid "
            "tokens not selected, as if they were selected: same per-row normalisation) and to all valid tokens, "
            "with torch.autograd.grad at the last decoder layer and the LM head (as the output projection); the "
            "curves combine both groups (one vector), the table gives each. Cosines with a zero gradient are "
            "reported as 0.</p>")
        add('<div class="figs">' + "".join(_img(f, f) for f in plot_gradients(runs, out / "grad_norms.png", out / "grad_cosines.png")) + "</div>")
        rows = []
        for r in runs:
            for group in ("", "_last_layer", "_lm_head"):
                vals = [_mean(r.series(f"{k}{group}")[1]) for k in ("grad_norm_key", "grad_norm_masked", "grad_norm_full",
                                                                     "cos_key_full", "cos_masked_full")]
                if any(v is not None for v in vals):
                    n = len(r.series(f"grad_norm_key{group}")[0])
                    ratio = vals[0] / vals[1] if vals[0] is not None and vals[1] else None
                    rows.append([r.name, group.strip("_") or "combined", n, *map(_fmt, vals), _fmt(ratio)])
        add(_table(["run", "parameters", "steps", "|g_key|", "|g_masked|", "|g_full|", "cos(key, full)", "cos(masked, full)",
                    "|g_key| / |g_masked|"], rows, left=2))
    else:
        add('<p class="note">No run logged gradient diagnostics (train with <code>--diagnostics_steps N</code>).</p>')

    add("<h2>Overlaps and positions of the selected tokens</h2>")
    if any(r.has(k) for r in runs for k in PAIRS):
        add(_img(plot_jaccard(runs, out / "jaccard.png"), "Jaccard overlaps"))
        add('<p class="note">Jaccard |A &amp; B| / |A | B| over the step\'s valid tokens; pairs with the temporal set '
            "count the video rows only (image rows have no temporal set).</p>")
        add(_table(["run", *(k.removeprefix("jaccard_").replace("_", " & ") for k in PAIRS)],
                   [[r.name, *(_fmt(_mean(r.series(k)[1])) for k in PAIRS)] for r in runs]))
    if any(r.has(k) for r in runs for k in POSITIONS):
        add('<p class="note">Mean relative position t / (n - 1) of each set\'s tokens in their completion (0 = first '
            "token, 1 = last; position_valid: all valid tokens, the reference), mean over the diagnosed steps.</p>")
        add(_table(["run", *(k.removeprefix("position_") for k in POSITIONS)],
                   [[r.name, *(_fmt(_mean(r.series(k)[1])) for k in POSITIONS)] for r in runs]))
    if not any(r.has(k) for r in runs for k in (*PAIRS, *POSITIONS)):
        add('<p class="note">Not logged (train with <code>--diagnostics_steps N</code>).</p>')

    add("<h2>Logged completions, token by token</h2>")
    legend = "".join(f'<span class="tok {c}" title="{esc(t)}">{esc(n)}</span>' for n, c, t in (
        ("entropy", "e", "selected by the entropy signal (orange background)"),
        ("visual", "v", "selected by the visual probe (blue underline)"),
        ("temporal", "t", "selected by the temporal probe (green overline)"),
        ("key (bold)", "k", "key token: gets the policy gradient (bold)")))
    add(f'<p class="legend">{legend}</p><p class="note">Hover a token for its scores (entropy, visual, temporal; n/a: '
        "not computed) and the sets that selected it. Shown: the last logged step of each run, at most "
        f"{max_completions} completions.</p>")
    for r in runs:
        add(f"<h3>{esc(r.name)}</h3>")
        if not r.tokens:
            add('<p class="note">No tokens.jsonl (train with <code>--log_tokens_every N</code>).</p>')
            continue
        last = max(rec.step for rec in r.tokens)
        for rec in [rec for rec in r.tokens if rec.step == last][:max_completions]:
            add(completion_html(rec))

    add("<h2>Selected vs masked tokens</h2>")
    add(f'<p class="note">Word classes by: <b>{esc(classifier.description)}</b>. Counted over every logged completion '
        "of a run (tokens.jsonl). Key: the tokens that get the policy gradient; masked: the other valid tokens.</p>")
    shares: dict[tuple[str, str], Counter] = {}
    for r, slug in zip(runs, slugs):
        if not r.tokens:
            continue
        counts = token_counts(r.tokens)
        add(f"<h3>{esc(r.name)}</h3>")
        cloud_parts = []
        for name, label in (("key", "selected (key) tokens"), ("masked", "masked tokens")):
            fname = f"wordcloud_{slug}_{name}.png"
            info = word_cloud(counts[name], out / fname, f"{r.name}: {label}", SET_COLOURS[name])
            if info is None:
                cloud_parts.append(f'<p class="note">{esc(label)}: none.</p>')
                continue
            top = counts[name].most_common(15)
            cloud_parts.append(
                f"<div>{_img(fname, label)}<p class='note'>{esc(label)}: {info.tokens} tokens, {info.words} distinct, all "
                f"placed; font size = {info.points_per_count:.3g} pt × count. Most frequent: "
                f"{esc(', '.join(f'{w} ({c})' for w, c in top))}</p></div>")
        add('<div class="figs">' + "".join(cloud_parts) + "</div>")
        for name, c in class_counts(r.tokens, classifier).items():
            if sum(c.values()):
                shares[(r.name, name)] = c
    if shares:
        classes = list(WORD_CLASSES) if classifier.method == "function_words" else sorted({k for c in shares.values() for k in c})
        add(_img(plot_word_classes(shares, classes, out / "word_classes.png"), "word-class shares"))
        rows = [[run, name, sum(c.values()), *(f"{100 * c.get(k, 0) / sum(c.values()):.1f}%" for k in classes)]
                for (run, name), c in shares.items()]
        add(_table(["run", "set", "tokens", *classes], rows, left=2))
    else:
        add('<p class="note">No logged tokens in any run.</p>')

    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>video-ktr report: "
            f"{esc(', '.join(r.name for r in runs))}</title><style>{CSS}</style></head><body>\n"
            + "\n".join(parts) + "\n</body></html>\n")
    path = out / "index.html"
    path.write_text(page, encoding="utf-8")
    return path
