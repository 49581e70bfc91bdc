"""Words of the completions: word classes (function word, content word, number, ...), the token counts of
each token set, and word-cloud images of them.
"""

from __future__ import annotations

import math
import re
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from video_ktr.analysis.plots import pyplot
from video_ktr.analysis.runs import SETS
from video_ktr.core.diagnostics import TokenRecord

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


def layout_word_cloud(boxes: Sequence[tuple[float, float]], width: int, height: int, cell: int = 2,
                      margins: Sequence[float] | None = None) -> list[tuple[float, float]] | None:
    """Place boxes (w, h in pixels, biggest first) apart from each other, each as near the centre as it fits.

    Box i keeps `margins[i]` pixels (default 1) free on every side, inside the canvas too, so two placed
    boxes are at least the sum of their margins apart. Deterministic: an occupancy grid of `cell`-pixel
    cells; a box and its margins go to the free window whose centre is nearest the canvas centre (ties:
    the first in row-major order). Returns the lower-left corner of each box (pixels, y up), or None when
    one does not fit (the caller shrinks every size alike).
    """
    margins = [1.0] * len(boxes) if margins is None else list(margins)
    if len(margins) != len(boxes):
        raise ValueError(f"layout_word_cloud: {len(boxes)} boxes but {len(margins)} margins")
    gw, gh = width // cell, height // cell
    occupied = np.zeros((gh, gw), dtype=np.int32)
    ys, xs = np.mgrid[0:gh, 0:gw]
    out = []
    for (w, h), m in zip(boxes, margins):
        bw, bh = max(1, math.ceil((w + 2 * m) / cell)), max(1, math.ceil((h + 2 * m) / cell))
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
        out.append((col * cell + m, height - (row + bh) * cell + m))  # grid row 0 is the top
    return out


def word_margin(points: float, dpi: int = 100) -> float:
    """The free space kept around a word drawn at `points` pt: 8% of its size, at least 1.5 px (two words
    are at least 3 px apart: never touching, even where the renderer's anti-aliasing spills a pixel)."""
    return max(1.5, 0.08 * points * dpi / 72)


@dataclass
class CloudInfo:
    words: int  # distinct words placed (all of them)
    tokens: int  # tokens counted
    points_per_count: float  # font size = points_per_count x count
    font_sizes: dict[str, float] = field(default_factory=dict)  # word -> the font size it was drawn at (pt)
    # word -> its drawn text's box as the renderer reports it: (x0, y0, x1, y1), pixels, origin bottom-left
    boxes: dict[str, tuple[float, float, float, float]] = field(default_factory=dict)


def word_cloud(counts: Counter, path: Path, title: str, colour: str, width: int = 880, height: int = 440) -> CloudInfo | None:
    """Render a word cloud: font size = k x count for every word (k the same for all), all words placed,
    no two words touching.

    k starts at the largest value for which the most frequent word is 72 pt and the words' boxes cover at
    most half the canvas, and shrinks by 15% (for every word alike) until all fit. Each word is measured at
    the size it is drawn at (small text does not scale linearly), placed with `word_margin` free around
    it, and the drawn boxes are checked once more after rendering: two that touch are an error.
    """
    if not counts:
        return None
    plt = pyplot()
    from matplotlib.font_manager import FontProperties  # after pyplot(), which picks the backend

    dpi, band = 100, 22  # the title's band at the top
    words = sorted(counts, key=lambda w: (-counts[w], w))
    fig = plt.figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)
    ax.axis("off")
    renderer = fig.canvas.get_renderer()
    prop = FontProperties(family="DejaVu Sans")

    def extent(word: str, points: float) -> tuple[float, float, float, float]:
        """The text's box drawn at (0, 0) with ha=left, va=bottom: its offset from the anchor and size."""
        t = ax.text(0, 0, word, fontsize=points, fontproperties=prop, parse_math=False, ha="left", va="bottom")
        ext = t.get_window_extent(renderer)
        t.remove()
        x0, y0 = ax.transData.transform((0, 0))
        return ext.x0 - x0, ext.y0 - y0, max(ext.width, 1.0), max(ext.height, 1.0)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # glyphs missing from the font are drawn as boxes
        ref = 100.0  # the start value of k from sizes measured at 100 pt, scaled linearly
        sizes = [extent(w, ref)[2:] for w in words]
        top = counts[words[0]]
        area = sum(sw * sh * counts[w] ** 2 for w, (sw, sh) in zip(words, sizes)) / ref ** 2
        k = min(72.0 / top, math.sqrt(0.5 * width * (height - band) / area), (width - 8) * ref / (sizes[0][0] * top),
                (height - band - 8) * ref / (sizes[0][1] * top))
        for _ in range(60):
            measured = [extent(w, k * counts[w]) for w in words]
            margins = [word_margin(k * counts[w], dpi) for w in words]
            places = layout_word_cloud([(m[2], m[3]) for m in measured], width, height - band, margins=margins)
            if places is not None:
                break
            k *= 0.85
        else:
            plt.close(fig)
            raise RuntimeError(f"word cloud {path.name}: {len(words)} words do not fit")
        drawn, artists = {}, {}
        for w, (x, y), (dx, dy, _, _) in zip(words, places, measured):
            drawn[w] = k * counts[w]
            artists[w] = ax.text(x - dx, y - dy, w, fontsize=drawn[w], fontproperties=prop, parse_math=False,
                                 color=colour, ha="left", va="bottom")
        ax.text(4, height - 4, title, fontsize=9, ha="left", va="top", parse_math=False)
        fig.canvas.draw()
        boxes = {w: tuple(float(v) for v in a.get_window_extent(renderer).extents) for w, a in artists.items()}
        fig.savefig(path, dpi=dpi)
    plt.close(fig)
    if (clash := touching(boxes)) is not None:
        raise RuntimeError(f"word cloud {path.name}: the drawn words {clash[0]!r} and {clash[1]!r} touch")
    return CloudInfo(words=len(words), tokens=sum(counts.values()), points_per_count=k, font_sizes=drawn, boxes=boxes)


def touching(boxes: dict[str, tuple[float, float, float, float]], gap: float = 1.0) -> tuple[str, str] | None:
    """The first two boxes (x0, y0, x1, y1) less than `gap` pixels apart (overlapping or touching), or None."""
    items = sorted(boxes.items(), key=lambda kv: kv[1][0])
    for i, (a, ba) in enumerate(items):
        for b, bb in items[i + 1:]:
            if bb[0] >= ba[2] + gap:
                break  # sorted by x0: every later box starts further right
            if not (ba[3] + gap <= bb[1] or bb[3] + gap <= ba[1]):
                return a, b
    return None


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
