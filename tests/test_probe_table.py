"""The probe table: answer tokens found in the text, answer-vs-median numbers by hand, a real run's file."""

from __future__ import annotations

import json

import pytest

from video_ktr.analysis.probe_table import answer_token_indices, format_table, main, probe_table


def test_answer_tokens_overlap_the_text_between_the_tags():
    tokens = ["<think>", "red", " first", "</think>", "<ans", "wer>", " B", "</answer>"]
    assert answer_token_indices(tokens) == [6]
    # a token that spans the tag and the letter counts; spaces around the answer do not
    assert answer_token_indices(["x", "<answer>1", "2 ", " </answer>"]) == [1, 2]
    assert answer_token_indices(["<answer>", "  ", "</answer>"]) == []
    assert answer_token_indices(["no answer here"]) == []
    assert answer_token_indices(["<answer>", "A"]) == []  # never closed


def _record(kind, tokens, visual, selected, step=1, entropy=None, temporal=None):
    return {"step": step, "kind": kind, "tokens": tokens, "entropy": entropy, "visual": visual, "temporal": temporal,
            "selected": {"visual": selected}}


def test_table_by_hand():
    toks = ["<answer>", "A", "</answer>", " ok"]
    recs = [
        _record("color_first", toks, [0.0, 0.9, 0.1, 0.2], [False, True, False, False]),  # answer 0.9 > median 0.15
        _record("color_first", toks, [0.5, 0.1, 0.3, 0.4], [True, False, False, False]),  # answer 0.1 < median 0.35
        _record("color_first", toks, [0.0, 0.7, 0.0, 0.0], [False, True, False, False]),  # 0.7 > 0.0
        _record("count", ["no tags"], [0.3], [True]),  # no answer span: counted apart
        _record("count", toks, [0.0, 0.2, 0.0, 0.0], [False, True, False, False], step=2),  # another step
    ]
    result = probe_table(recs, step=1)
    assert result["completions"] == 4 and result["without_answer"] == {"count": 1}
    v = result["kinds"]["color_first"]["visual"]
    assert v["completions"] == 3 and v["answer_median"] == pytest.approx(0.7)
    assert v["row_median_median"] == pytest.approx(0.15)  # medians 0.15, 0.35, 0.0
    assert v["answer_above_median"] == pytest.approx(2 / 3) and v["answer_selected"] == pytest.approx(2 / 3)
    assert v["most_selected"][0] == ("A", 2)
    assert "entropy" not in result["kinds"]["color_first"]  # not recorded
    assert "| color_first | visual | 3 | 0.7000 | 0.1500 | 0.67 | 0.67 |" in format_table(result)
    assert probe_table(recs)["kinds"]["count"]["visual"]["completions"] == 1  # all steps


def test_reads_a_real_runs_token_file(tiny_setup, tmp_path, capsys):
    from tests.test_trainer import make_trainer

    trainer = make_trainer(tiny_setup, tmp_path, "--max_steps", "1", "--token_selection", "all",
                           "--log_tokens_every", "1")
    trainer.train()
    records = [json.loads(line) for line in (tmp_path / "tokens.jsonl").read_text().splitlines()]
    result = probe_table(records, step=1)
    n_answers = sum(1 for r in records if answer_token_indices(r["tokens"]))
    assert result["completions"] == len(records) > 0
    assert sum(result["without_answer"].values()) == len(records) - n_answers
    assert sum(max((v["completions"] for v in k.values()), default=0) for k in result["kinds"].values()) == n_answers
    assert main([str(tmp_path), "--step", "1", "--json", str(tmp_path / "t.json")]) == 0
    assert "Probe scores of the answer token" in capsys.readouterr().out
    assert json.loads((tmp_path / "t.json").read_text())["completions"] == len(records)
    assert main([str(tmp_path / "nowhere")]) == 2
