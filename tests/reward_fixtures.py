"""User reward functions for the trainer tests, loaded as ``--reward_funcs tests.reward_fixtures:NAME``.

They have the signature of the built-ins (see video_ktr.core.rewards) and reward something a random tiny
model already does now and then, so that GRPO has a signal to learn from within a few dozen steps.
"""

from __future__ import annotations


def count_e(completions: list[str], solutions: list[str], problem_types: list[str], **kwargs) -> list[float]:
    """The fraction of the completion's characters that are the letter 'e' (0 for an empty completion)."""
    return [text.count("e") / len(text) if text else 0.0 for text in completions]


def constant(completions: list[str], solutions: list[str], problem_types: list[str], **kwargs) -> list[float]:
    """1 for every completion: every advantage is 0 (a run must then leave the policy term at 0)."""
    return [1.0 for _ in completions]


def count_e_on_videos(completions: list[str], solutions: list[str], problem_types: list[str], **kwargs) -> list[float]:
    """count_e on video questions, 1 on image questions: every image prompt group has advantage 0."""
    samples = kwargs["samples"]
    return [1.0 if s.data_type == "image" else v for s, v in zip(samples, count_e(completions, solutions, problem_types))]


# TRL's form (f(completions, **columns)); conversational completions as TRL passes them for chat data.
def trl_count_e(completions, **kwargs) -> list[float]:
    """count_e in TRL's form: the same values as count_e."""
    texts = [c[0]["content"] for c in completions]
    return [t.count("e") / len(t) if t else 0.0 for t in texts]


def trl_text_count_e(completions: list[str], **kwargs) -> list[float]:
    """count_e in TRL's form over plain texts (the annotation asks for strings)."""
    return [t.count("e") / len(t) if t else 0.0 for t in completions]


def video_r1_solution_echo(completions, solution, **kwargs) -> list[float]:
    """Video-R1's form: 1 when the completion contains the solution's answer text, None on image rows."""
    return [None if dt == "image" else float(sol.replace("<answer>", "").replace("</answer>", "").strip() in c[0]["content"])
            for c, sol, dt in zip(completions, solution, kwargs["data_type"])]
