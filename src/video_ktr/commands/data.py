"""`video-ktr data`: ``data unpack`` (video_ktr.data.unpack) and ``data check`` (video_ktr.data.check).

Each sub-command takes one positional argument (the folder or the data set), then flags.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from video_ktr.data.check import CheckArgs, check_dataset, write_clean
from video_ktr.data.rows import DataError
from video_ktr.data.unpack import UnpackArgs, unpack
from video_ktr.utils.config import parse_args

__all__ = ["main"]

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


def unpack_main(argv: list[str]) -> int:
    args = parse_positional(UnpackArgs, argv, "video-ktr data unpack", positional="dir")
    try:
        result = unpack(args.dir, dry_run=args.dry_run, overwrite=args.overwrite)
    except FileNotFoundError as exc:
        print(f"video-ktr data unpack: {exc}", file=sys.stderr)
        return 2
    return 0 if result.ok else 1


def check_main(argv: list[str]) -> int:
    args = parse_positional(CheckArgs, argv, "video-ktr data check", positional="dataset")
    prog = "video-ktr data check"
    try:
        settings = args.frame_settings()
    except ValueError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    if args.write_clean and Path(args.write_clean).resolve() == Path(args.dataset).resolve():
        print(f"{prog}: --write_clean must not be the input file {args.dataset}", file=sys.stderr)
        return 2
    row_check = None
    if args.model_name_or_path:  # the prompt as training makes and tokenises it, against --max_prompt_length
        # imported here on purpose: torch and transformers take seconds to load, which `data unpack` and a
        # `data check` without a model never need
        from video_ktr.model.adapters import frames_for
        from video_ktr.model.loading import load_processor
        from video_ktr.training.grpo_data import prompt_length_check

        processor = load_processor(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
        settings = frames_for(processor, settings)
        row_check = prompt_length_check(processor, settings, args.max_prompt_length, prompt_layout=args.prompt_layout,
                                        system_prompt=args.system_prompt)
    try:
        result = check_dataset(
            args.dataset, args.media_root, settings=settings, workers=args.workers,
            open_media_files=args.open_media, allow_outside_media_root=args.allow_outside_media_root,
            require_process=args.require_process, special_tokens=args.special_tokens,
            max_prompt_length=args.max_prompt_length, row_check=row_check,
        )
    except DataError as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 2 if err.reason == "missing_file" else 1
    print(result.summary(args.examples))
    if args.write_clean:
        clean, rejected = write_clean(result, args.write_clean)
        root = args.media_root or str(Path(args.dataset).parent)
        print(f"wrote {len(result.good_rows)} good row(s) to {clean} (paths relative to {root}) and "
              f"{len(result.rejected)} rejection(s) to {rejected}")
    return 0 if result.ok else 1


SUBCOMMANDS = {
    "unpack": "extract every zip and tar archive under a downloaded Video-R1-data folder, in place",
    "check": "validate every row and open every media file of a data set; optionally write the good rows",
}


def _usage() -> str:
    lines = ["usage: video-ktr data SUBCOMMAND [options]   (video-ktr data SUBCOMMAND --help)", "", "subcommands:"]
    for name, desc in SUBCOMMANDS.items():
        lines.append(f"  {name.ljust(7)} {desc}")
    lines += ["", "  video-ktr data unpack DIR [--dry_run]",
              "  video-ktr data check DATASET [--media_root DIR] [--workers N] [--write_clean FILE] [frame options]"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name == "unpack":
        return unpack_main(rest)
    if name == "check":
        return check_main(rest)
    print(f"video-ktr data: unknown subcommand {name!r}\n\n{_usage()}", file=sys.stderr)
    return 2
