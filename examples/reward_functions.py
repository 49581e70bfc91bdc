"""Reward functions in the three forms `video-ktr train --reward_funcs` accepts; copy one and edit it.

    video-ktr train ... --reward_funcs accuracy format examples.reward_functions:answer_length_reward
    video-ktr train ... --reward_funcs examples.reward_functions:video_r1_accuracy_reward examples.reward_functions:think_format_reward

(run from the repository root, or put the file on PYTHONPATH; 'package.module:function' is imported with
importlib). Each returns one float per completion, in order, and never raises on a malformed completion.
"""

from __future__ import annotations

import re


# 1. TRL's form: completions (conversational: one [{"role": "assistant", "content": ...}] list each) and
#    the dataset's columns as keyword lists, one value per completion. Return None where it does not apply.
def answer_length_reward(completions, problem_type, **kwargs) -> list[float | None]:
    """Free-form answers: 1 for 1-30 words between <answer> tags, else 0; other problem types: None (skipped)."""
    out: list[float | None] = []
    for completion, ptype in zip(completions, problem_type):
        if ptype != "free-form":
            out.append(None)
            continue
        match = re.search(r"<answer>(.*?)</answer>", completion[0]["content"], re.DOTALL)
        words = len(match.group(1).split()) if match else 0
        out.append(1.0 if 1 <= words <= 30 else 0.0)
    return out


# 2. Video-R1's form (src/open_r1/grpo.py there): completions, solution, and problem_type in kwargs.
def video_r1_accuracy_reward(completions, solution, **kwargs) -> list[float]:
    """Multiple choice and numerical rows: 1 when the <answer> equals the solution's, else 0."""
    def answer(text: str) -> str:
        match = re.search(r"<answer>(.*?)</answer>", text, re.DOTALL)
        return match.group(1).strip() if match else ""

    rewards = []
    for completion, sol, ptype in zip(completions, solution, kwargs["problem_type"]):
        pred, gold = answer(completion[0]["content"]), answer(sol)
        if ptype == "numerical":
            try:
                rewards.append(1.0 if round(float(pred), 2) == round(float(gold), 2) else 0.0)
            except ValueError:
                rewards.append(0.0)
        else:
            rewards.append(1.0 if pred and pred == gold else 0.0)
    return rewards


def think_format_reward(completions, **kwargs) -> list[float]:
    """1 for '<think>...</think> <answer>...</answer>' and nothing else, as Video-R1's format reward."""
    pattern = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
    return [1.0 if pattern.fullmatch(c[0]["content"].strip()) else 0.0 for c in completions]


# 3. This trainer's own form (the built-ins'): plain texts, solutions and problem types by position; the
#    validated rows (video_ktr.data.rows.Sample) in kwargs['samples'].
def video_only_length_penalty(completions: list[str], solutions: list[str], problem_types: list[str], **kwargs) -> list[float]:
    """-0.001 per character beyond 400 on video rows, 0 on image rows."""
    return [-0.001 * max(0, len(text) - 400) if s.data_type == "video" else 0.0
            for text, s in zip(completions, kwargs["samples"])]
