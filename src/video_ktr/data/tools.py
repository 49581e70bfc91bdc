"""``video-ktr data``: the dispatcher of ``data unpack`` (:mod:`video_ktr.data.unpack`) and ``data check``
(:mod:`video_ktr.data.check`); their names are re-exported here for existing callers.
"""

from __future__ import annotations

import sys

from video_ktr.data.check import (
    CheckArgs,
    CheckResult,
    Rejection,
    check_dataset,
    check_main,
    open_media,
    write_clean,
)
from video_ktr.data.unpack import (
    ArchiveError,
    UnpackArgs,
    UnpackResult,
    find_archives,
    marker_path,
    unpack,
    unpack_archive,
    unpack_main,
)

__all__ = [
    "ArchiveError",
    "CheckArgs",
    "CheckResult",
    "Rejection",
    "UnpackArgs",
    "UnpackResult",
    "check_dataset",
    "check_main",
    "find_archives",
    "main",
    "marker_path",
    "open_media",
    "unpack",
    "unpack_archive",
    "unpack_main",
    "write_clean",
]

SUBCOMMANDS = {
    "unpack": "extract every zip archive under a downloaded Video-R1-data folder, in place",
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


if __name__ == "__main__":
    raise SystemExit(main())
