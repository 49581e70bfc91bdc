"""Reward functions written for TRL or Video-R1, called by this trainer as they are.

The trainer calls every reward function in one form (the built-ins' form, see :mod:`video_ktr.core.rewards`)::

    fn(completions: list[str], solutions: list[str], problem_types: list[str], samples=rows) -> list[float]

A user function in that form is used unchanged. A callable that names a ``completions`` parameter but not
``solutions, problem_types`` after it is taken to be in TRL's form, which Video-R1's reward functions also
follow::

    def f(completions, **kwargs) -> list[float | None]              # TRL GRPOTrainer
    def accuracy_reward(completions, solution, **kwargs)             # Video-R1 (src/open_r1/grpo.py)

and is wrapped by :func:`adapt_reward_function`: its signature is inspected once, and each call passes, by
keyword, the parameters it names (all of them when it takes ``**kwargs``):

- ``completions``: one per completion, as TRL passes them for a conversational dataset (Video-R1's data
  is one): ``[{"role": "assistant", "content": text}]``; or the plain text (``completion_format="text"``,
  or ``"auto"`` with a ``completions: list[str]`` annotation);
- ``prompts``: the prompt messages of each completion's row (our chat layout, text parts only);
- every column of the row, one value per completion: ``solution``, ``problem_type``, ``problem``,
  ``problem_id``, ``data_type``, ``options``, ``data_source``, ``path`` (the resolved media file), and the
  row's extra keys;
- ``completion_ids`` is not available (the adapter sees texts); a function that requires it is refused at
  load time, as is any other required parameter that is not a column.

As in TRL, a function may return ``None`` for a completion it does not apply to; that completion gets 0
from it (TRL sums the rewards with ``nansum``). Any other non-number is an error naming the function.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["COMPLETION_FORMATS", "adapt_reward_function", "is_native_form", "row_columns"]

COMPLETION_FORMATS = ("auto", "conversational", "text")
_NATIVE = ("completions", "solutions", "problem_types")
_ROW_FIELDS = ("problem_id", "problem", "data_type", "problem_type", "solution", "options", "data_source")


def _parameters(fn: Callable[..., Any]) -> list[inspect.Parameter] | None:
    try:
        return list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a builtin or C callable without a signature: call it natively
        return None


def is_native_form(fn: Callable[..., Any]) -> bool:
    """True unless ``fn`` is in TRL's form: it names a ``completions`` parameter and its first positional
    parameters are not ``(completions, solutions, problem_types)``. A callable without a ``completions``
    parameter (``fn(texts, sols, types)``) keeps being called by position, as before adapters existed."""
    params = _parameters(fn)
    if params is None:
        return True
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if tuple(positional[:3]) == _NATIVE:
        return True
    return not any(p.name == "completions" and p.kind != p.POSITIONAL_ONLY for p in params)


def row_columns(sample: Any) -> dict[str, Any]:
    """The dataset columns of one validated row (data.rows.Sample), by name, as a TRL user knows them."""
    cols = {name: getattr(sample, name, None) for name in _ROW_FIELDS}
    media = getattr(sample, "media_path", None)
    cols["path"] = str(media) if media is not None else None
    for key, value in (getattr(sample, "meta", None) or {}).items():
        cols.setdefault(key, value)
    return cols


def _text_prompt(sample: Any) -> list[dict[str, Any]]:
    messages = sample.messages() if hasattr(sample, "messages") else []
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):  # keep the text parts; the media part is named by the 'path' column
            content = [part for part in content if part.get("type") == "text"]
        out.append({"role": m.get("role"), "content": content})
    return out


def _wants_text(fn: Callable[..., Any]) -> bool:
    """``completions: list[str]`` (or Sequence[str]) in the annotations."""
    try:
        hint = typing.get_type_hints(fn).get("completions")
    except Exception:  # unresolvable annotations: no hint
        return False
    args = typing.get_args(hint)
    return bool(args) and args[0] is str


def adapt_reward_function(fn: Callable[..., Any], spec: str, completion_format: str = "auto") -> Callable[..., list[float]]:
    """``fn`` in the trainer's form: unchanged when it already is, else a TRL/Video-R1-form wrapper.

    Raises TypeError (naming ``spec``) for an unknown ``completion_format`` or a required parameter the
    trainer cannot supply.
    """
    if completion_format not in COMPLETION_FORMATS:
        raise TypeError(f"reward function {spec!r}: completion format {completion_format!r} is not one of {COMPLETION_FORMATS}")
    if is_native_form(fn):
        return fn
    params = _parameters(fn) or []
    takes_all = any(p.kind == p.VAR_KEYWORD for p in params)
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    conversational = completion_format == "conversational" or (completion_format == "auto" and not _wants_text(fn))
    required = [p.name for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]

    def call(completions: Sequence[str], solutions: Sequence[str], problem_types: Sequence[str], *,
             samples: Sequence[Any], **_: Any) -> list[float]:
        columns: dict[str, list[Any]] = {}
        for sample in samples:
            for key, value in row_columns(sample).items():
                columns.setdefault(key, []).append(value)
        n = len(completions)
        for key in list(columns):  # a key only some rows carry is padded with None, as datasets does
            columns[key] += [None] * (n - len(columns[key]))
        columns["solution"], columns["problem_type"] = list(solutions), list(problem_types)
        kwargs: dict[str, Any] = {
            "completions": [[{"role": "assistant", "content": t}] for t in completions] if conversational else list(completions),
            "prompts": [_text_prompt(s) for s in samples],
            **columns,
        }
        missing = [name for name in required if name not in kwargs]
        if missing:
            raise TypeError(f"reward function {spec!r}: needs {missing}, which is not a column of these rows "
                            f"(columns: {sorted(kwargs)})")
        if not takes_all:
            kwargs = {k: v for k, v in kwargs.items() if k in named}
        values = fn(**kwargs)
        try:
            values = list(values)
        except TypeError:
            raise TypeError(f"reward function {spec!r} returned {type(values).__name__}, not a list of floats") from None
        out = []
        for i, v in enumerate(values):
            if v is None:
                out.append(0.0)  # TRL: None = not applicable to this completion (nansum)
            elif isinstance(v, (int, float)) or hasattr(v, "__float__"):
                out.append(float(v))
            else:
                raise TypeError(f"reward function {spec!r}: value {i} is {type(v).__name__} {v!r}, not a float or None")
        return out

    # a required parameter that is not a standard column may be one of the rows' extra keys: checked per call
    if "completion_ids" in required or "trainer_state" in required:
        raise TypeError(f"reward function {spec!r}: requires "
                        f"{[n for n in required if n in ('completion_ids', 'trainer_state')]}, which this trainer does not pass "
                        "(give it a default)")
    call.__name__ = getattr(fn, "__name__", "reward")
    call.__doc__ = getattr(fn, "__doc__", None)
    call.__wrapped__ = fn  # type: ignore[attr-defined]
    return call
