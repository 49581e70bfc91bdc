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

import argparse
import html
import json
import math
import re
import sys
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from video_ktr.core.diagnostics import SIGNAL_NAMES, TokenRecord, read_token_records

CURVES = (  # metric, axis label, title
    ("reward", "mean reward of the step's completions", "Reward"),
    ("accuracy_reward", "mean accuracy reward", "Accuracy reward"),
    ("loss", "loss", "Training loss"),
    ("key_token_fraction", "fraction of completion tokens", "Key-token fraction"),
    ("loss_variance", "variance of the per-sequence losses", "Loss variance"),
)
SETS = ("key", "masked", *SIGNAL_NAMES)  # token sets of the word statistics ("masked": valid, not key)
SET_COLOURS = {"entropy": "#f5a623", "visual": "#1f77b4", "temporal": "#2ca02c", "key": "#111111", "masked": "#7f7f7f"}
PAIRS = ("jaccard_entropy_visual", "jaccard_entropy_temporal", "jaccard_visual_temporal")
POSITIONS = ("position_key", "position_nonkey", "position_entropy", "position_visual", "position_temporal", "position_valid")

# ---------------------------------------------------------------------------- word classes

# English function words: articles and determiners, pronouns, prepositions, conjunctions, auxiliary and
# modal verbs, particles and a few grammatical adverbs (closed classes). Compared lower-cased, per word.
FUNCTION_WORDS = frozenset("""
a an the this that these those each every either neither some any no all both few many much more most
several such what which whose whatever whichever another other own same
i me my mine myself we us our ours ourselves you your yours yourself yourselves he him his himself she
her hers herself it its itself they them their theirs themselves one ones who whom whoever someone
anyone everyone nobody somebody anybody everybody something anything everything nothing
about above across after against along amid among around as at before behind below beneath beside
besides between beyond by despite down during except for from in inside into like near of off on onto
out outside over past per since than through throughout till to toward towards under underneath until
unlike up upon via with within without
and but or nor so yet if because although though while whereas unless whether whenever wherever
when where why how once then therefore however thus hence also too either else instead
be am is are was were been being have has had having do does did doing done will would shall should
can could may might must ought need dare
not no yes there here just only very now again ever never always still even already rather quite
let let's
i'm i've i'll i'd you're you've you'll you'd he's he'll he'd she's she'll she'd it's it'll we're
we've we'll we'd they're they've they'll they'd that's there's here's what's who's where's how's
isn't aren't wasn't weren't don't doesn't didn't haven't hasn't hadn't won't wouldn't can't cannot
couldn't shouldn't mustn't mightn't needn't
""".split())
WORD_CLASSES = ("function word", "content word", "number", "punctuation", "markup", "whitespace", "partial character")
_WORD_RE = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)*|\d+(?:[.,]\d+)*")
_MARKUP_RE = re.compile(r"</?(?:think|answer)>|<\|[^|<>\s]*\|>")
_SPACY_MODELS = ("en_core_web_sm", "en_core_web_md", "en_core_web_lg", "en_core_web_trf")


@dataclass
class WordClassifier:
    """Labels completion tokens by the word they belong to: spaCy POS tags or the function-word list."""

    method: str  # "spacy" | "function_words"
    description: str  # what the report states
    nlp: Any = None

    def classes(self, tokens: Sequence[str]) -> list[str]:
        """One label per token: the label of the word covering its first non-space character.

        The tokens are joined into the completion's text; `<think>` / `</answer>` tags and special
        tokens (<|...|>) are "markup"; words come from spaCy's tokenizer (label: universal POS tag) or
        from a letters / digits pattern (label: function word, content word, number). A token of
        whitespace only is "whitespace", one adding no text (part of a multi-byte character)
        "partial character", any other "punctuation" (spaCy: its tag of that character).
        """
        text = "".join(tokens)
        label: list[str | None] = [None] * len(text)

        def mark(start: int, end: int, name: str) -> None:
            for c in range(start, end):
                if label[c] is None:
                    label[c] = name

        for m in _MARKUP_RE.finditer(text):
            mark(m.start(), m.end(), "markup")
        if self.method == "spacy":
            for tok in self.nlp(text):
                mark(tok.idx, tok.idx + len(tok.text), str(tok.pos_))
        else:
            for m in _WORD_RE.finditer(text):
                word = m.group()
                name = "number" if word[0].isdigit() else ("function word" if word.lower() in FUNCTION_WORDS else "content word")
                mark(m.start(), m.end(), name)
        out, pos = [], 0
        for tok in tokens:
            start, pos = pos, pos + len(tok)
            if not tok:
                out.append("partial character")
                continue
            first = next((c for c in range(start, pos) if not text[c].isspace()), None)
            if first is None:
                out.append("whitespace")
            else:
                out.append(label[first] or "punctuation")
        return out


def word_classifier(method: str = "auto") -> WordClassifier:
    """spaCy with an installed English model when available (method auto or spacy), else the list."""
    n = len(FUNCTION_WORDS)
    fallback = f"built-in English function-word list ({n} closed-class words)"
    if method == "function_words":
        return WordClassifier("function_words", f"{fallback}, as asked (--pos_method function_words)")
    try:
        import spacy
    except ImportError:
        if method == "spacy":
            raise ValueError("--pos_method spacy: spaCy is not installed (pip install spacy, then "
                             "python -m spacy download en_core_web_sm)") from None
        return WordClassifier("function_words", f"{fallback}: spaCy is not installed")
    for name in _SPACY_MODELS:
        try:
            nlp = spacy.load(name, disable=["parser", "ner", "lemmatizer"])
        except (OSError, ImportError, ValueError):
            continue
        return WordClassifier("spacy", f"spaCy {spacy.__version__}, model {name} (universal part-of-speech tags)", nlp)
    if method == "spacy":
        raise ValueError(f"--pos_method spacy: no English spaCy model is installed (tried {', '.join(_SPACY_MODELS)})")
    return WordClassifier("function_words", f"{fallback}: spaCy is installed but has no English model")


# ---------------------------------------------------------------------------- runs


@dataclass
class Run:
    name: str
    path: Path
    metrics: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)
    tokens: list[TokenRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        steps, values = [], []
        for m in self.metrics:
            v = m.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                steps.append(int(m.get("step", len(steps) + 1)))
                values.append(float(v))
        return steps, values

    def has(self, key: str) -> bool:
        return any(key in m for m in self.metrics)

    @property
    def selection(self) -> str:
        sel = self.config.get("token_selection")
        return ",".join(sel) if isinstance(sel, list) else str(sel or "?")


def _read_jsonl(path: Path, notes: list[str]) -> list[dict[str, Any]]:
    rows = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError as exc:
            if n == len(lines):  # a run still writing, or killed mid-line
                notes.append(f"{path.name}: the last line ({n}) is incomplete and was skipped")
                continue
            raise ValueError(f"{path}:{n}: not a JSON line ({exc})") from exc
    return rows


def load_run(path: str | Path, name: str | None = None) -> Run:
    path = Path(path)
    metrics_path = path / "metrics.jsonl"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{path} has no metrics.jsonl: is it the --output_dir of a `video-ktr train` run?")
    notes: list[str] = []
    run = Run(name=name or path.resolve().name, path=path, metrics=_read_jsonl(metrics_path, notes), notes=notes)
    if (path / "train_config.json").is_file():
        run.config = json.loads((path / "train_config.json").read_text())
    if (path / "tokens.jsonl").is_file():
        run.tokens = read_token_records(path / "tokens.jsonl")
    return run


def run_names(paths: Sequence[str | Path]) -> list[str]:
    """A distinct label per run: the folder name, with its parent when names repeat, then #n."""
    resolved = [Path(p).resolve() for p in paths]
    names = [p.name for p in resolved]
    counts = Counter(names)
    names = [f"{p.parent.name}/{p.name}" if counts[n] > 1 else n for p, n in zip(resolved, names)]
    seen: Counter[str] = Counter()
    out = []
    for n in names:
        seen[n] += 1
        out.append(n if seen[n] == 1 else f"{n} #{seen[n]}")
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "run"


def _mean(values: Sequence[float]) -> float | None:
    vals = [v for v in values if math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None


# ---------------------------------------------------------------------------- figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
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
    plt = _pyplot()
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
    return _save(fig, path)


def plot_gradients(runs: Sequence[Run], path_norms: Path, path_cos: Path) -> list[str]:
    """Gradient norms (key, masked, full) and cosines with the full gradient over the diagnosed steps."""
    plt = _pyplot()
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
        written.append(_save(fig, path))
    return written


def plot_jaccard(runs: Sequence[Run], path: Path) -> str | None:
    plt = _pyplot()
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
    return _save(fig, path)


def plot_word_classes(shares: dict[tuple[str, str], Counter], classes: Sequence[str], path: Path) -> str | None:
    """Stacked horizontal bars: the share of each word class in each (run, set)."""
    rows = [(k, c) for k, c in shares.items() if sum(c.values())]
    if not rows:
        return None
    plt = _pyplot()
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
    return _save(fig, path)


# ---------------------------------------------------------------------------- word clouds


def visible(text: str) -> str:
    """A printable label: whitespace as ␣ / ⏎ / ⇥, other control characters as \\xNN."""
    out = []
    for ch in text:
        if ch == " ":
            out.append("␣")
        elif ch == "\n":
            out.append("⏎")
        elif ch == "\t":
            out.append("⇥")
        elif ord(ch) < 32 or 127 <= ord(ch) < 160:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


def cloud_word(token: str) -> str:
    """The word a token counts as in a cloud: its text without surrounding whitespace, lower-cased;
    whitespace-only tokens by their characters (␣, ⏎), a token adding no text as "(partial char)"."""
    if not token:
        return "(partial char)"
    stripped = token.strip()
    return visible(stripped.lower()) if stripped else visible(token)


def layout_word_cloud(boxes: Sequence[tuple[float, float]], width: int, height: int, cell: int = 2) -> list[tuple[float, float]] | None:
    """Place boxes (w, h in pixels, biggest first) without overlap, each as near the centre as it fits.

    Deterministic: an occupancy grid of `cell`-pixel cells; a box goes to the free window whose centre
    is nearest the canvas centre (ties: the first in row-major order). Returns the lower-left corner
    of each box (pixels, y up), or None when one does not fit (the caller shrinks every size alike).
    """
    import numpy as np

    gw, gh = width // cell, height // cell
    occupied = np.zeros((gh, gw), dtype=np.int32)
    ys, xs = np.mgrid[0:gh, 0:gw]
    out = []
    for w, h in boxes:
        bw, bh = max(1, math.ceil(w / cell) + 1), max(1, math.ceil(h / cell) + 1)  # one cell of padding
        if bw > gw or bh > gh:
            return None
        integral = np.zeros((gh + 1, gw + 1), dtype=np.int64)
        integral[1:, 1:] = occupied.cumsum(0).cumsum(1)
        window = integral[bh:, bw:] - integral[:-bh, bw:] - integral[bh:, :-bw] + integral[:-bh, :-bw]
        free = window == 0
        if not free.any():
            return None
        ny, nx = window.shape
        dist = ((xs[:ny, :nx] + bw / 2 - gw / 2) ** 2 + (ys[:ny, :nx] + bh / 2 - gh / 2) ** 2).astype(float)
        dist[~free] = np.inf
        row, col = divmod(int(np.argmin(dist)), nx)
        occupied[row:row + bh, col:col + bw] = 1
        out.append((col * cell, height - (row + bh) * cell))  # grid row 0 is the top
    return out


@dataclass
class CloudInfo:
    words: int  # distinct words placed (all of them)
    tokens: int  # tokens counted
    points_per_count: float  # font size = points_per_count x count
    font_sizes: dict[str, float] = field(default_factory=dict)  # word -> the font size it was drawn at (pt)


def word_cloud(counts: Counter, path: Path, title: str, colour: str, width: int = 880, height: int = 440) -> CloudInfo | None:
    """Render a word cloud: font size = k x count for every word (k the same for all), all words placed.

    k starts at the largest value for which the most frequent word is 72 pt and the words' boxes cover at
    most half the canvas, and shrinks by 15% (for every word alike) until all fit.
    """
    if not counts:
        return None
    plt = _pyplot()
    from matplotlib.font_manager import FontProperties

    dpi, band = 100, 22  # the title's band at the top
    words = sorted(counts, key=lambda w: (-counts[w], w))
    fig = plt.figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)
    ax.axis("off")
    renderer = fig.canvas.get_renderer()
    ref = 100.0  # measure at 100 pt, scale linearly
    prop = FontProperties(family="DejaVu Sans")
    sizes = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # glyphs missing from the font are drawn as boxes
        for w in words:
            t = ax.text(0, 0, w, fontsize=ref, fontproperties=prop, parse_math=False)
            ext = t.get_window_extent(renderer)
            sizes.append((max(ext.width, 1.0) / ref, max(ext.height, 1.0) / ref))
            t.remove()
    top = counts[words[0]]
    area = sum(sw * sh * counts[w] ** 2 for w, (sw, sh) in zip(words, sizes))
    k = min(72.0 / top, math.sqrt(0.5 * width * (height - band) / area), (width - 8) / (sizes[0][0] * top),
            (height - band - 8) / (sizes[0][1] * top))
    for _ in range(60):
        boxes = [(sw * k * counts[w], sh * k * counts[w]) for w, (sw, sh) in zip(words, sizes)]
        places = layout_word_cloud(boxes, width, height - band)
        if places is not None:
            break
        k *= 0.85
    else:
        plt.close(fig)
        raise RuntimeError(f"word cloud {path.name}: {len(words)} words do not fit")
    drawn = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for w, (x, y) in zip(words, places):
            drawn[w] = k * counts[w]
            ax.text(x + 1, y + 1, w, fontsize=drawn[w], fontproperties=prop, parse_math=False, color=colour,
                    ha="left", va="bottom")
        ax.text(4, height - 4, title, fontsize=9, ha="left", va="top", parse_math=False)
        fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return CloudInfo(words=len(words), tokens=sum(counts.values()), points_per_count=k, font_sizes=drawn)


# ---------------------------------------------------------------------------- token statistics


def set_members(record: TokenRecord, name: str) -> list[bool]:
    """Per token of a record: in the set? ("masked": valid tokens that are not key tokens)."""
    if name == "masked":
        return [not k for k in record.selected.get("key", [True] * len(record.tokens))]
    return record.selected.get(name, [False] * len(record.tokens))


def token_counts(records: Sequence[TokenRecord]) -> dict[str, Counter]:
    """Per set, how often each cloud word occurs among its tokens (over every record)."""
    out = {name: Counter() for name in SETS}
    for r in records:
        words = [cloud_word(t) for t in r.tokens]
        for name in SETS:
            out[name].update(w for w, inside in zip(words, set_members(r, name)) if inside)
    return out


def class_counts(records: Sequence[TokenRecord], classifier: WordClassifier) -> dict[str, Counter]:
    """Per set, how many of its tokens fall in each word class."""
    out = {name: Counter() for name in SETS}
    for r in records:
        classes = classifier.classes(r.tokens)
        for name in SETS:
            out[name].update(c for c, inside in zip(classes, set_members(r, name)) if inside)
    return out


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


def main(argv: list[str] | None = None) -> int:
    """``video-ktr report RUN_DIR [RUN_DIR ...] [--output DIR]``."""
    parser = argparse.ArgumentParser(
        prog="video-ktr report",
        description="An HTML report of training runs (--output_dir folders of `video-ktr train`): curves, gradient "
        "diagnostics, token overlaps and positions, logged completions with highlighted key tokens, word clouds and "
        "word-class shares of selected vs masked tokens, and the runs side by side.",
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="Training output folder(s); several are overlaid.")
    parser.add_argument("--output", default=None, help="Folder for index.html and its PNGs (default: RUN_DIR/report of the first run).")
    parser.add_argument("--max_completions", type=int, default=8, help="Completions shown per run (from its last logged step).")
    parser.add_argument("--pos_method", default="auto", choices=["auto", "spacy", "function_words"],
                        help="Word classes: spaCy POS tags when an English model is installed (auto), or the built-in "
                        "function-word list.")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        path = write_report(args.runs, args.output, max_completions=args.max_completions, pos_method=args.pos_method)
    except (FileNotFoundError, ValueError) as exc:
        print(f"video-ktr report: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0
