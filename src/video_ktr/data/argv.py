"""Command-line parsing of the ``video-ktr data`` sub-commands: one positional argument, then flags."""

from __future__ import annotations

import dataclasses
import sys
import typing
from collections.abc import Sequence
from typing import Any

from video_ktr.utils.config import parse_args

_TRUE_FALSE = {"1", "true", "yes", "y", "on", "0", "false", "no", "n", "off"}


def parse_positional(cls: type, argv: Sequence[str], prog: str, *, positional: str) -> Any:
    """``parse_args`` with one positional argument (moved to ``--<positional>``).

    A boolean flag followed by a word that is not a boolean (``--dry_run DIR``) is read as ``true``.
    """
    hints = typing.get_type_hints(cls)
    bool_flags = set()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if tp is bool or bool in typing.get_args(tp):
            bool_flags.add(f"--{f.name}")
    out: list[str] = []
    pos: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok == "--":
            pos.extend(argv[i + 1:])
            break
        if tok.startswith("-") and tok != "-":
            out.append(tok)
            i += 1
            if "=" in tok or tok in ("-h", "--help"):
                continue
            if tok in bool_flags:
                if i < len(argv) and argv[i].lower() in _TRUE_FALSE:
                    out.append(argv[i])
                    i += 1
                continue
            if i < len(argv):  # the option's value (may start with '-', e.g. a negative number)
                out.append(argv[i])
                i += 1
            continue
        pos.append(tok)
        i += 1
    if len(pos) > 1:
        print(f"{prog}: one {positional.upper()} expected, got {len(pos)}: {' '.join(pos)}", file=sys.stderr)
        raise SystemExit(2)
    if pos:
        out = [f"--{positional}", pos[0], *out]
    return parse_args(cls, out, prog=prog)
