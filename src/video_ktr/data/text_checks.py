"""Checks of the free text of a row (problem, options, solution, process) before anything tokenises it.

Three things in user text crash or silently change a run, so every command that reads rows
(``data check``, ``train``, ``sft``, ``eval``) refuses them here, as a :class:`~video_ktr.data.rows.DataError`
naming file, row and field, which ``--on_bad_sample skip`` skips and counts:

- **invalid Unicode** (a lone surrogate such as ``"\\ud800"``, which JSON allows as ``\\ud800``): the
  tokenizer raises a ``TypeError`` and a clean copy cannot be written as UTF-8 (reason ``invalid_unicode``);
- **control and placeholder tokens** written in the text (``<|im_start|>``, ``<|video_pad|>``, any
  ``<|name|>``): a placeholder makes the processor's count of visual tokens disagree with the frames
  (a transformers ``ValueError``), a chat token silently becomes a real turn marker. ``refuse`` (the
  default) rejects the row (reason ``special_token_in_text``); ``escape`` keeps it with a zero-width space
  (U+200B) after the ``<`` so the tokenizer reads plain characters;
- **huge text**: a field longer than :func:`text_char_limit` characters is refused before tokenising
  (reason ``text_too_long``), so a 10 MB ``problem`` costs a string length, not gigabytes of token ids.
"""

from __future__ import annotations

import re

SPECIAL_TOKEN_POLICIES = ("refuse", "escape")
# No tokenizer in use here averages more characters per token than this on text a prompt can hold.
CHARS_PER_TOKEN_BOUND = 64
# The cap on one text field when no --max_prompt_length is given (Video-R1 problems are < 2,000 characters).
DEFAULT_MAX_TEXT_CHARS = 200_000

_SPECIAL = re.compile(r"<\|[A-Za-z0-9_]{1,40}\|>")
_SURROGATE = re.compile("[\ud800-\udfff]")
ESCAPE = "\u200b"


def text_char_limit(max_prompt_length: int | None) -> int:
    """Characters one text field may have: CHARS_PER_TOKEN_BOUND per prompt token, or the default cap."""
    if max_prompt_length is None:
        return DEFAULT_MAX_TEXT_CHARS
    return CHARS_PER_TOKEN_BOUND * int(max_prompt_length)


def escape_special(text: str) -> str:
    """``<|video_pad|>`` -> ``<\\u200b|video_pad|>``: the same text to a reader, no special token to a tokenizer."""
    return _SPECIAL.sub(lambda m: "<" + ESCAPE + m.group(0)[1:], text)


def text_problem(text: str, *, special_tokens: str = "refuse", max_chars: int | None = None) -> tuple[str, str] | None:
    """``(reason, message)`` for the first problem of ``text``, or None when it is usable as it is (or escaped)."""
    if max_chars is not None and len(text) > max_chars:
        return "text_too_long", (f"{len(text):,} characters, over the limit of {max_chars:,} "
                                 f"({CHARS_PER_TOKEN_BOUND} per token of --max_prompt_length, or "
                                 f"{DEFAULT_MAX_TEXT_CHARS:,} without it); refused before tokenising")
    bad = _SURROGATE.search(text)
    if bad:
        return "invalid_unicode", (f"invalid Unicode: a lone surrogate U+{ord(bad.group(0)):04X} at character "
                                   f"{bad.start()} (fix the text; JSON '\\ud800'-style escapes must come in pairs)")
    if special_tokens == "refuse":
        tok = _SPECIAL.search(text)
        if tok:
            return "special_token_in_text", (f"holds the control token {tok.group(0)!r} at character {tok.start()}; "
                                             "it would act as a real chat or vision token (use --special_tokens "
                                             "escape to keep such rows as plain text)")
    return None


def clean_text(text: str, special_tokens: str) -> str:
    return escape_special(text) if special_tokens == "escape" else text
