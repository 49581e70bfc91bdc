"""The prompt text of Video-R1 / Video-KTR, verbatim, in one place.

Changing a word here moves benchmark scores, so these strings are data: the question template, the
per-problem-type suffixes and the two ways the released code lays out multiple-choice options (the
training script puts a newline after every option; the evaluation script joins options with
newlines and ends without one). A hash of the template in use is recorded in every results file.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

QUESTION_TEMPLATE = (
    "{Question}\n"
    "Please think about this question as if you were a human pondering deeply. "
    "Engage in an internal dialogue using expressions such as 'let me think', 'wait', 'Hmm', 'oh, I see', "
    "'let's break it down', etc, or other natural language thought expressions "
    "It's encouraged to include self-reflection or verification in the reasoning process. "
    "Provide your detailed reasoning between the <think> </think> tags, and then give your final answer "
    "between the <answer> </answer> tags."
)

TYPE_TEMPLATE = {
    "multiple choice": " Please provide only the single option letter (e.g., A, B, C, D, etc.) within the <answer> </answer> tags.",
    "numerical": " Please provide the numerical value (e.g., 42 or 3.14) within the <answer> </answer> tags.",
    "OCR": " Please transcribe text from the image/video clearly and provide your text answer within the <answer> </answer> tags.",
    "free-form": " Please provide your text answer within the <answer> </answer> tags.",
    "regression": " Please provide the numerical value (e.g., 42 or 3.14) within the <answer> </answer> tags.",
}

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# How the multiple-choice block is laid out: "train" = Video-R1 training (every option followed by a
# newline), "eval" = Video-R1 eval_bench.py (options joined by newlines, no trailing newline).
OPTION_LAYOUTS = ("train", "eval")


def question_text(problem: str, problem_type: str, options: list[str] | None, layout: str = "train") -> str:
    """The question as the released code builds it: ``problem + "Options:\\n" + options`` for MC."""
    if problem_type != "multiple choice":
        return problem
    if layout not in OPTION_LAYOUTS:
        raise ValueError(f"option layout must be one of {OPTION_LAYOUTS}, got {layout!r}")
    opts = list(options or [])
    if layout == "train":
        return problem + "Options:\n" + "".join(op + "\n" for op in opts)
    return problem + "Options:\n" + "\n".join(opts)


def user_text(problem: str, problem_type: str, options: list[str] | None, layout: str = "train") -> str:
    """The full user text: question template plus the problem-type suffix."""
    suffix = TYPE_TEMPLATE.get(problem_type, "")
    return QUESTION_TEMPLATE.format(Question=question_text(problem, problem_type, options, layout)) + suffix


def build_messages(
    problem: str,
    problem_type: str,
    options: list[str] | None,
    data_type: str,
    *,
    layout: str = "train",
    system_prompt: str | None = None,
) -> list[dict[str, Any]]:
    """One user turn: the visual item first, then the text (content items typed by ``type`` only)."""
    content: list[dict[str, Any]] = []
    if data_type in ("video", "image"):
        content.append({"type": data_type})
    content.append({"type": "text", "text": user_text(problem, problem_type, options, layout)})
    messages: list[dict[str, Any]] = []
    if system_prompt:
        messages.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    messages.append({"role": "user", "content": content})
    return messages


def template_hash(layout: str = "train") -> str:
    """A short hash of every string that shapes the prompt, recorded in results files."""
    blob = json.dumps({"q": QUESTION_TEMPLATE, "t": TYPE_TEMPLATE, "layout": layout}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]
