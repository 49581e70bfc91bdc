"""Which tokens the probes pick, per question kind: the answer token's scores against the median token's.

Reads a run's ``tokens.jsonl`` (written by `video-ktr train --log_tokens_every N`: every completion token
with its entropy, visual score V = log p - log p_vis, temporal score T = log p - log p_tmp, and the sets
that selected it). For each completion with an ``<answer>...</answer>`` span:

- answer tokens: the tokens overlapping the text between the tags (the option letter or the number);
- per signal S: the answer's score = the largest S over its answer tokens, the row's median S over all of
  its tokens; "above median" when the answer's score is larger; "selected" when the signal's mask kept
  at least one answer token;
- per kind: the medians of both over the completions, the fraction above the median, the fraction
  selected, and the token texts the signal selects most often.

The first logged step of a run scores the starting model (e.g. the SFT checkpoint): use ``--step 1``
to read that model's probes. Usage: ``python -m video_ktr.analysis.probe_table RUN_DIR [--step N]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from video_ktr.utils.jsonl import read_jsonl

SIGNALS = ("entropy", "visual", "temporal")
OPEN, CLOSE = "<answer>", "</answer>"


def answer_token_indices(tokens: list[str]) -> list[int]:
    """Indices of the tokens overlapping the stripped text inside the first <answer>...</answer> ([] if none)."""
    text = "".join(tokens)
    start = text.find(OPEN)
    end = text.find(CLOSE, start + len(OPEN)) if start >= 0 else -1
    if start < 0 or end < 0:
        return []
    inner = text[start + len(OPEN):end]
    lo = start + len(OPEN) + (len(inner) - len(inner.lstrip()))
    hi = end - (len(inner) - len(inner.rstrip()))
    if hi <= lo:
        return []
    out, pos = [], 0
    for i, tok in enumerate(tokens):
        if pos < hi and pos + len(tok) > lo:
            out.append(i)
        pos += len(tok)
    return out


def completion_entry(record: dict[str, Any]) -> dict[str, Any] | None:
    """One completion's answer-vs-median numbers per signal, or None without an answer span."""
    idx = answer_token_indices(record["tokens"])
    if not idx:
        return None
    entry: dict[str, Any] = {"kind": record.get("kind", "unknown"), "signals": {}}
    for signal in SIGNALS:
        scores = record.get(signal)
        if scores is None:
            continue
        finite = [s for s in scores if s is not None]
        answer = [scores[i] for i in idx if scores[i] is not None]
        if not finite or not answer:
            continue
        selected = (record.get("selected") or {}).get(signal)
        entry["signals"][signal] = {
            "answer": max(answer), "median": statistics.median(finite),
            "selected": None if selected is None else any(selected[i] for i in idx),
            "picked_tokens": [] if selected is None else [record["tokens"][i].strip() for i, s in enumerate(selected) if s],
        }
    return entry


def probe_table(records: list[dict[str, Any]], *, step: int | None = None, top: int = 5) -> dict[str, Any]:
    """Per kind and signal: completions, median answer score, median of the rows' medians, fraction of
    completions whose answer scores above its median, fraction whose answer the signal selected, the most
    selected token texts. Records of other steps than ``step`` (when given) are left out."""
    chosen = [r for r in records if step is None or int(r.get("step", -1)) == step]
    by_kind: dict[str, list[dict[str, Any]]] = {}
    skipped: Counter[str] = Counter()
    for r in chosen:
        entry = completion_entry(r)
        if entry is None:
            skipped[r.get("kind", "unknown")] += 1
        else:
            by_kind.setdefault(entry["kind"], []).append(entry)
    table: dict[str, Any] = {}
    for kind, entries in sorted(by_kind.items()):
        table[kind] = {}
        for signal in SIGNALS:
            rows = [e["signals"][signal] for e in entries if signal in e["signals"]]
            if not rows:
                continue
            sel = [r["selected"] for r in rows if r["selected"] is not None]
            picked = Counter(t for r in rows for t in r["picked_tokens"] if t)
            table[kind][signal] = {
                "completions": len(rows),
                "answer_median": statistics.median(r["answer"] for r in rows),
                "row_median_median": statistics.median(r["median"] for r in rows),
                "answer_above_median": sum(r["answer"] > r["median"] for r in rows) / len(rows),
                "answer_selected": sum(sel) / len(sel) if sel else None,
                "most_selected": picked.most_common(top),
            }
    return {"step": step, "completions": len(chosen), "without_answer": dict(sorted(skipped.items())), "kinds": table}


def format_table(result: dict[str, Any]) -> str:
    lines = [f"Probe scores of the answer token against the row's median token (step {result['step']}, "
             f"{result['completions']} completions; without an answer span: {result['without_answer'] or 'none'})", "",
             "| kind | signal | completions | answer (median) | row median (median) | answer > median | answer selected "
             "| most selected tokens |", "|---|---|---|---|---|---|---|---|"]
    for kind, signals in result["kinds"].items():
        for signal, v in signals.items():
            sel = "—" if v["answer_selected"] is None else f"{v['answer_selected']:.2f}"
            top = ", ".join(f"`{t}` {n}" for t, n in v["most_selected"]) or "—"
            lines.append(f"| {kind} | {signal} | {v['completions']} | {v['answer_median']:.4f} | "
                         f"{v['row_median_median']:.4f} | {v['answer_above_median']:.2f} | {sel} | {top} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m video_ktr.analysis.probe_table",
                                description="Answer-token vs median-token probe scores per kind from a run's tokens.jsonl.")
    p.add_argument("run_dir", help="A `video-ktr train` output folder with tokens.jsonl (--log_tokens_every).")
    p.add_argument("--step", type=int, default=None, help="Only the records of this step (1: the starting model).")
    p.add_argument("--json", default=None, help="Also write the table as JSON to this file.")
    args = p.parse_args(argv)
    path = Path(args.run_dir) / "tokens.jsonl"
    if not path.is_file():
        print(f"probe_table: {path} not found (train with --log_tokens_every N)", file=sys.stderr)
        return 2
    result = probe_table(read_jsonl(path), step=args.step)
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
