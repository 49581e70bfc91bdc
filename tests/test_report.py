"""`video-ktr report`: the HTML page and its figures from short real runs, escaping, word clouds, word classes."""

from __future__ import annotations

import html.parser
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tests.test_diagnostics import diagnostics_run
from video_ktr.analysis.report import token_span, write_report
from video_ktr.analysis.runs import run_names
from video_ktr.analysis.word_cloud import (
    WordClassifier,
    cloud_word,
    layout_word_cloud,
    touching,
    word_classifier,
    word_cloud,
)
from video_ktr.commands.report import main
from video_ktr.core.diagnostics import TokenRecord, read_token_records

PNG = b"\x89PNG\r\n\x1a\n"
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class StrictPage(html.parser.HTMLParser):
    """Collects images and token spans, and every nesting error (an unclosed or stray tag)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.images: list[str] = []
        self.token_titles: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a["src"])
        if tag == "span" and "tok" in (a.get("class") or "").split():
            assert a.get("title"), "a token span without a title"
            self.token_titles.append(a["title"])
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def parse(path: Path) -> StrictPage:
    page = StrictPage()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    assert not page.errors and not page.stack, (page.errors, page.stack)
    return page


@pytest.fixture(scope="module")
def runs(tiny_setup, tmp_path_factory):
    return {name: diagnostics_run(tiny_setup, tmp_path_factory, name) for name in ("all", "none")}


def test_report_renders_from_short_runs(runs, tmp_path):
    path = write_report([runs["all"], runs["none"]], tmp_path / "out")
    assert path == tmp_path / "out" / "index.html"
    page = parse(path)
    text = " ".join(page.text)
    # figures: relative PNG files in the same folder, real PNGs
    expected = {"reward.png", "accuracy_reward.png", "loss.png", "key_token_fraction.png", "loss_variance.png",
                "grad_norms.png", "grad_cosines.png", "jaccard.png", "word_classes.png"}
    assert expected <= set(page.images), set(page.images)
    assert any(re.fullmatch(r"wordcloud_0_all_key\.png", s) for s in page.images)
    assert any(re.fullmatch(r"wordcloud_0_all_masked\.png", s) for s in page.images)
    for src in page.images:
        assert "/" not in src
        data = (path.parent / src).read_bytes()
        assert len(data) > 1000 and data.startswith(PNG), src
    # every displayed token is a span with its scores in the title
    shown = [r for name in ("all", "none") for r in read_token_records(runs[name] / "tokens.jsonl") if r.step == 2]
    titles = [t for t in page.token_titles if t.startswith("entropy ")]  # the legend's 4 spans are not tokens
    assert len(titles) == len(page.token_titles) - 4 == sum(len(r.tokens) for r in shown)
    assert all("| sets: " in t for t in titles)
    assert any("sets: entropy" in t for t in page.token_titles) and any("temporal n/a" in t for t in page.token_titles)
    # the method of the word classes is stated
    assert "built-in English function-word list" in text and "spaCy is not installed" in text
    # the runs side by side: both, with their selection and loss variance
    table = re.search(r"Runs side by side.*?</table>", path.read_text(), re.S).group(0)
    header = re.findall(r"<th[^>]*>(.*?)</th>", table)
    rows = {cells[0]: dict(zip(header, cells)) for cells in
            (re.findall(r"<td[^>]*>(.*?)</td>", row) for row in table.split("</tr>")[1:-1])}
    assert set(rows) == {"all", "none"}
    assert rows["all"]["token selection"] == "all" and rows["none"]["token selection"] == "none"
    assert rows["none"]["mean key fraction"] == "1"
    for name in ("all", "none"):
        assert float(rows[name]["mean loss variance"]) >= 0 and float(rows[name]["final reward"]) >= 0
        assert float(rows[name]["mean grad_norm_key"]) > 0


def test_report_default_output_and_cli(runs, tmp_path, capsys):
    from video_ktr.cli import main as cli_main

    single = tmp_path / "run"
    single.mkdir()
    for name in ("metrics.jsonl", "train_config.json"):
        (single / name).write_bytes((runs["none"] / name).read_bytes())
    assert cli_main(["report", str(single)]) == 0
    assert Path(capsys.readouterr().out.strip()) == single / "report" / "index.html"
    page = parse(single / "report" / "index.html")
    assert "No tokens.jsonl" in " ".join(page.text) and len(page.token_titles) == 4  # the legend only
    assert main([str(tmp_path / "missing")]) == 2
    assert "has no metrics.jsonl" in capsys.readouterr().err


def test_report_skips_a_half_written_last_line(runs, tmp_path):
    run = tmp_path / "live"
    run.mkdir()
    (run / "metrics.jsonl").write_text((runs["all"] / "metrics.jsonl").read_text() + '{"step": 3, "rew')
    page = parse(write_report([run], tmp_path / "out"))
    assert "incomplete and was skipped" in " ".join(page.text)


def _record(tokens, **selected) -> TokenRecord:
    n = len(tokens)
    return TokenRecord(step=1, problem_id="<p&1>", kind="k", data_type="video", reward=1.0, advantage=-0.5, tokens=tokens,
                       token_ids=list(range(n)), entropy=[0.5] * n, visual=None, temporal=[0.25] * n,
                       selected={k: v for k, v in selected.items()})


def test_tokens_are_escaped_and_titled():
    rec = _record(['<script>alert("x")</script>', "&amp;", "\x07"], entropy=[True, False, False], key=[True, False, True])
    spans = [token_span(rec, t) for t in range(3)]
    assert spans[0] == ('<span class="tok e k" title="entropy 0.5000 | visual n/a | temporal 0.2500 | sets: entropy, key | '
                        'id 0 | &lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;">'
                        '&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;</span>')
    assert ">&amp;amp;</span>" in spans[1] and 'class="tok"' in spans[1]
    assert "\x07" not in spans[2] and "\u2407" in spans[2] and "\\x07" in spans[2]  # shown as a control picture


def test_word_cloud_places_every_word_at_a_size_proportional_to_its_count(tmp_path):
    counts = Counter({"the": 40, "video": 17, "<|im_end|>": 9, "$x$": 3, "␣": 2, "(partial char)": 1, **{f"w{i}": 1 for i in range(60)}})
    info = word_cloud(counts, tmp_path / "cloud.png", "title", "#333")
    assert (tmp_path / "cloud.png").read_bytes().startswith(PNG)
    assert set(info.font_sizes) == set(counts) and info.words == len(counts) and info.tokens == sum(counts.values())
    for word, size in info.font_sizes.items():
        assert size == pytest.approx(info.points_per_count * counts[word], rel=1e-12)


def test_word_cloud_layout_keeps_the_margins():
    boxes = [(300, 80), (120, 40), (120, 40), *[(30, 12)] * 40, *[(3, 2)] * 100]
    margins = [6.0, 3.0, 3.0, *[1.5] * 40, *[1.0] * 100]
    places = layout_word_cloud(boxes, 600, 300, margins=margins)
    assert places is not None and len(places) == len(boxes)
    rects = [(x, y, x + w, y + h) for (x, y), (w, h) in zip(places, boxes)]
    for i, a in enumerate(rects):
        m = margins[i]
        assert m <= a[0] and a[2] <= 600 - m and m <= a[1] and a[3] <= 300 - m
        for j, b in enumerate(rects[:i]):
            gap = m + margins[j]
            assert a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1], (a, b)
    assert layout_word_cloud([(700, 10)], 600, 300) is None  # does not fit: the caller shrinks every size alike
    with pytest.raises(ValueError, match="2 boxes but 1 margins"):
        layout_word_cloud([(1, 1), (1, 1)], 600, 300, margins=[1.0])


def test_word_cloud_words_never_touch(tmp_path):
    """Issue 18: words were packed with no gap ("movesfirstred"). The drawn words' boxes, as the renderer
    reports them, are at least 3 px apart, and every pixel of a word's ink lies within 1 px of its own box,
    so the ink of two words never meets."""
    counts = Counter({"moves": 7, "first": 7, "red": 7, ",": 7, ".": 5, "the": 30, "<|im_end|>": 9, "⏎": 4,
                      **{f"w{i}": 1 + i % 4 for i in range(120)}})
    png = tmp_path / "cloud.png"
    info = word_cloud(counts, png, "title", "#ff0000", width=600, height=300)
    boxes = [info.boxes[w] for w in counts]
    for i, a in enumerate(boxes):
        assert 0 <= a[0] and a[2] <= 600 and 0 <= a[1] and a[3] <= 300 - 22  # below the title's band
        for b in boxes[:i]:
            assert a[2] + 3 <= b[0] or b[2] + 3 <= a[0] or a[3] + 3 <= b[1] or b[3] + 3 <= a[1], (a, b)
    from PIL import Image

    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    assert img.shape[:2] == (300, 600)
    ink = img[..., 0] - img[..., 1] > 24  # the words' red, anti-aliased edges included (the title is black)
    near = np.zeros(ink.shape, dtype=bool)
    for x0, y0, x1, y1 in boxes:  # pixel rows count from the top
        near[max(0, math.floor(300 - y1) - 1):math.ceil(300 - y0) + 1, max(0, math.floor(x0) - 1):math.ceil(x1) + 1] = True
    assert ink.sum() > 1000 and not (ink & ~near).any(), np.argwhere(ink & ~near)[:5]
    assert touching({"a": (0, 0, 10, 10), "b": (10.5, 0, 20, 10)}) == ("a", "b")  # the check itself
    assert touching({"a": (0, 0, 10, 10), "b": (11, 0, 20, 10), "c": (0, 11, 10, 20)}) is None


def test_cloud_words():
    assert cloud_word(" The") == "the" and cloud_word("\n") == "⏎" and cloud_word("  ") == "␣␣"
    assert cloud_word("") == "(partial char)" and cloud_word("\x07") == "\\x07"


def test_function_word_classes():
    clf = word_classifier("auto")
    assert clf.method == "function_words" and "spaCy is not installed" in clf.description
    tokens = ["<", "think", ">", "The", " cat", "'s", " on", " 4", "2", ".", "\n", "", "é", "</answer>", "<|im_end|>"]
    assert clf.classes(tokens) == [
        "markup", "markup", "markup", "function word", "content word", "content word", "function word", "number", "number",
        "punctuation", "whitespace", "partial character", "content word", "markup", "markup",
    ]
    with pytest.raises(ValueError, match="spaCy is not installed"):
        word_classifier("spacy")


def test_spacy_classes_map_to_tokens_by_character_offsets():
    class Tok:
        def __init__(self, idx, text, pos):
            self.idx, self.text, self.pos_ = idx, text, pos

    def nlp(text):  # a stand-in for a spaCy pipeline on "The cats sat."
        assert text == "The cats sat."
        return [Tok(0, "The", "DET"), Tok(4, "cats", "NOUN"), Tok(9, "sat", "VERB"), Tok(12, ".", "PUNCT")]

    clf = WordClassifier("spacy", "stand-in", nlp)
    assert clf.classes(["The", " ca", "ts", " sat", "."]) == ["DET", "NOUN", "NOUN", "VERB", "PUNCT"]


def test_run_names_are_distinct(tmp_path):
    assert run_names([tmp_path / "a" / "run", tmp_path / "b" / "run", tmp_path / "c"]) == ["a/run", "b/run", "c"]
    assert run_names([tmp_path / "x", tmp_path / "x"]) == [f"{tmp_path.name}/x", f"{tmp_path.name}/x #2"]
