"""Data preparation, ``video-ktr data unpack DIR``.

``unpack`` -- extract the media archives of a downloaded Video-R1-data folder
    Layout assumed (that of ``huggingface.co/datasets/Video-R1/Video-R1-data`` and of Video-R1's
    ``src/unzip.py``): the JSON files (``Video-R1-260k.json``, ``Video-R1-COT-165k.json``) sit at the top
    of DIR, the media come as zip archives anywhere below it (tar archives, plain or compressed, are
    extracted the same way) (one folder per source, e.g.
    ``CLEVRER/CLEVRER.zip``), and each archive is extracted *into the folder that holds it*, with the
    member names as stored.  The rows' paths (``./CLEVRER/video_validation/video_10000.mp4``) are then
    relative to DIR, so train/check with ``--media_root DIR``.  These assumptions are not verified against
    the download here: run ``video-ktr data check`` afterwards, it opens every file the rows name.
    If every member of an archive starts with the name of the folder it is extracted into (which would
    give ``CLEVRER/CLEVRER/...``), a warning says so.

    - Hidden folders (``.cache`` of ``huggingface-cli download --local-dir``) are not searched, folder
      symlinks are not followed.
    - Members are refused -- the whole archive, before anything of it is written -- when their name is
      absolute (``/x``, ``C:\\x``), has a ``..`` component, is a link entry (zip symlinks, tar symbolic and
      hard links), a tar device file or FIFO, or would be written through an existing symlink to a place
      outside the archive's folder (:mod:`video_ktr.data.archives`).  The error names the archive and the
      member; the other archives are still extracted and the exit status is 1.  An archive whose files
      need more space than the disk has free is refused the same way.
    - After an archive is completely extracted, ``.<archive name>.unpacked`` (e.g. ``.CLEVRER.zip.unpacked``)
      is written next to it, holding the archive's size and mtime.  An archive with a matching marker is
      skipped; a crash mid-extraction leaves no marker, so the next run extracts it again (overwriting the
      partial files); a re-downloaded (changed) archive is extracted again.
    - Archives that came out of another archive (listed in its marker) are content, not downloads, and
      are left alone, as a single pass of ``unzip.py`` does.
    - Existing files are never replaced silently: a member whose target exists with other content (and
      was not written by an earlier, interrupted or outdated, extraction of the same archive), a member
      whose target is a folder, or one whose folder is a file (on disk or in the archive) is a collision; the
      archive is refused before anything of it is written, each colliding member named, and the other
      archives are still extracted (exit status 1). ``--overwrite`` replaces differing files; an identical
      existing file is fine. ``.<archive name>.unpacking`` marks an extraction in progress.
    - Tar archives (``.tar``, ``.tar.gz``/``.tgz``, ``.tar.bz2``/``.tbz2``, ``.tar.xz``/``.txz``) follow the
      same rules; only their members' bytes are written (no modes, owners or times from the archive).
    - Split archives (``x.z01``, ``x.zip.001``) are not joined: they are reported, join them first.
    - ``--dry_run`` lists what would be extracted, skipped or refused and writes nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from video_ktr.data.archives import (
    ArchiveError,
    Member,
    TarArchive,
    ZipArchive,
    is_archive_name,
    open_archive,
)
from video_ktr.utils.config import field

__all__ = ["ArchiveError", "UnpackArgs", "UnpackResult", "find_archives", "marker_path", "unpack", "unpack_archive"]

_SPLIT_PART = re.compile(r"(\.z\d\d|\.zip\.\d{3})$", re.IGNORECASE)


@dataclass
class UnpackArgs:
    """Extract every zip and tar archive under a downloaded Video-R1-data folder into the folder holding it.

    Usage: video-ktr data unpack DIR [--dry_run].
    """

    dir: str = field(help="The downloaded Video-R1-data folder (may be given as the first positional argument).")
    dry_run: bool = field(False, help="Only list which archives would be extracted, skipped or refused; write nothing.")
    overwrite: bool = field(False, help="Replace existing files that differ from an archive's member (without it such an archive is refused, each colliding member named, and the others are still extracted).")


@dataclass
class UnpackResult:
    extracted: list[Path] = dataclasses.field(default_factory=list)
    skipped: list[Path] = dataclasses.field(default_factory=list)
    errors: list[ArchiveError] = dataclasses.field(default_factory=list)
    split_parts: list[Path] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors and not self.split_parts


def marker_path(archive: Path) -> Path:
    """``.<archive name>.unpacked`` next to the archive; written after a complete extraction."""
    return archive.with_name(f".{archive.name}.unpacked")


def find_archives(root: Path) -> tuple[list[Path], list[Path]]:
    """(zip and tar archives, split-archive parts) below ``root``, sorted; hidden folders are not searched."""
    archives: list[Path] = []
    parts: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            if is_archive_name(name):
                archives.append(Path(dirpath) / name)
            elif _SPLIT_PART.search(name):
                parts.append(Path(dirpath) / name)
    return archives, parts


def _in_progress_path(archive: Path) -> Path:
    return archive.with_name(f".{archive.name}.unpacking")


def _collisions(members: list[Member], reader: ZipArchive | TarArchive, dest: Path, *, overwrite: bool) -> list[str]:
    """One line per member that cannot be written: a folder or a file in the way, or an existing file that
    differs from the member (allowed with ``overwrite``). An existing identical file is not a collision."""
    problems = []
    names = {m.name.rstrip("/") for m in members if not m.is_dir}
    folders = {m.name.rstrip("/") for m in members if m.is_dir}
    for m in members:
        if m.is_dir:
            continue
        name = m.name
        target = dest / name
        if name in folders:
            problems.append(f"{name!r}: the archive also holds a folder of that name")
            continue
        parts = Path(name).parts
        for k in range(1, len(parts)):
            prefix = "/".join(parts[:k])
            if prefix in names:
                problems.append(f"{name!r}: the archive also holds a file {prefix!r} where its folder would be")
                break
            if (dest / prefix).is_file():
                problems.append(f"{name!r}: {dest / prefix} is a file where its folder would be")
                break
        else:
            if target.is_dir():
                problems.append(f"{name!r}: {target} is a folder")
            elif target.is_file() and not overwrite and not reader.same_content(target, m):
                problems.append(f"{name!r}: {target} exists and differs (--overwrite replaces it)")
    return problems


def _read_marker(archive: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(marker_path(archive).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _marker_matches(archive: Path, marker: dict[str, Any] | None) -> bool:
    if marker is None:
        return False
    st = archive.stat()
    return marker.get("size") == st.st_size and marker.get("mtime_ns") == st.st_mtime_ns


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def _doubled_prefix(members: Sequence[Member], dest: Path) -> bool:
    """True if every member starts with ``<name of dest>/`` (extraction would double the folder name)."""
    prefix = dest.name + "/"
    names = [m.name for m in members]
    return bool(names) and bool(dest.name) and all(n.startswith(prefix) or n == prefix for n in names)


def unpack_archive(archive: Path, dest: Path | None = None, *, progress: bool = True, overwrite: bool = False) -> list[str]:
    """Extract ``archive`` (zip or tar) into ``dest`` (default: its folder) and write its marker.

    Every member is checked before anything is written; raises :class:`ArchiveError` for an unsafe,
    encrypted, unsupported or corrupt archive, colliding members, or too little free disk space.
    Returns the names of the members that are archives themselves (left alone by later runs).
    """
    archive = Path(archive)
    dest = archive.parent if dest is None else Path(dest)
    with open_archive(archive) as reader:
        members = reader.members(dest)
        # files this package wrote before (a crash mid-extraction, a changed archive) may be replaced
        ours = _in_progress_path(archive).exists() or marker_path(archive).exists()
        problems = _collisions(members, reader, dest, overwrite=overwrite or ours)
        if problems:
            shown = "; ".join(problems[:10]) + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
            raise ArchiveError(archive, None, f"{len(problems)} member(s) collide with what is on disk, nothing "
                               f"extracted: {shown}")
        files = [m for m in members if not m.is_dir]
        total = sum(m.size for m in files)
        existing = 0
        for m in files:
            target = dest / m.name
            if target.is_file():
                existing += target.stat().st_size
        free = shutil.disk_usage(dest).free
        if total - existing > free:
            raise ArchiveError(
                archive, None,
                f"needs {_human(total - existing)} of disk space in {dest}, only {_human(free)} free",
            )
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc=archive.name, disable=not progress, leave=False)
        _in_progress_path(archive).write_text(archive.name, encoding="utf-8")
        try:
            for m in members:
                target = dest / m.name
                if m.is_dir:
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                try:  # reading a corrupt or unsupported member raises ArchiveError (archives._Guarded)
                    with reader.open(m) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
                except OSError as exc:
                    raise ArchiveError(archive, m.raw_name, f"cannot be written to {target} ({exc})") from None
                bar.update(m.size)
        finally:
            bar.close()
    st = archive.stat()
    nested = [m.name for m in files if is_archive_name(m.name)]
    marker = {
        "archive": archive.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
        "members": len(members), "bytes": total, "nested_archives": nested,
    }
    tmp = marker_path(archive).with_suffix(".tmp")
    tmp.write_text(json.dumps(marker, indent=1), encoding="utf-8")
    os.replace(tmp, marker_path(archive))
    _in_progress_path(archive).unlink(missing_ok=True)
    return nested


def unpack(root: str | os.PathLike, *, dry_run: bool = False, progress: bool = True,
           log: Callable[[str], None] = print, overwrite: bool = False) -> UnpackResult:
    """Extract every archive below ``root`` into its own folder (see the module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory (give the downloaded Video-R1-data folder)")
    result = UnpackResult()
    archives, result.split_parts = find_archives(root)
    # zip files that came out of an extracted archive are content, not downloads
    nested: dict[Path, Path] = {}
    for a in archives:
        marker = _read_marker(a)
        if _marker_matches(a, marker):
            for name in marker.get("nested_archives") or []:
                nested[(a.parent / name).resolve()] = a
    for part in result.split_parts:
        log(f"split archive part {part}: not handled; join the parts first (e.g. `cat x.zip.0* > x.zip`, "
            "or `zip -s 0 x.zip --out x-joined.zip` for x.z01..)")
    todo = [a for a in archives if a.resolve() not in nested]
    for a in archives:
        if a.resolve() in nested:
            log(f"skip {a.relative_to(root)}: it was extracted from {nested[a.resolve()].relative_to(root)}")
    log(f"{len(todo)} archive(s) under {root}" + (" (dry run: nothing is written)" if dry_run else ""))
    for k, archive in enumerate(todo, start=1):
        rel = archive.relative_to(root)
        head = f"[{k}/{len(todo)}] {rel}"
        marker = _read_marker(archive)
        if _marker_matches(archive, marker):
            log(f"{head}: already extracted (marker {marker_path(archive).name}), skipped")
            result.skipped.append(archive)
            continue
        note = " (changed since it was last extracted)" if marker is not None else ""
        dest = archive.parent
        try:
            with open_archive(archive) as reader:
                members = reader.members(dest)
        except ArchiveError as err:
            log(f"{head}: {'REFUSED' if err.member is not None else 'ERROR'}: {err}")
            result.errors.append(err)
            continue
        size = sum(m.size for m in members)
        where = dest.relative_to(root).as_posix() or "."
        if _doubled_prefix(members, dest):
            log(f"{head}: warning: every member starts with '{dest.name}/', so the files land in "
                f"{where}/{dest.name}/...; check that the rows' paths match (video-ktr data check)")
        if dry_run:
            log(f"{head}: would extract {len(members)} member(s), {_human(size)} into {where}/{note}")
            continue
        log(f"{head}: extracting {len(members)} member(s), {_human(size)} into {where}/{note}")
        try:
            unpack_archive(archive, dest, progress=progress, overwrite=overwrite)
        except ArchiveError as err:
            log(f"{head}: ERROR: {err}")
            result.errors.append(err)
            continue
        result.extracted.append(archive)
    if dry_run:
        log(f"dry run: {len(todo) - len(result.skipped) - len(result.errors)} to extract, "
            f"{len(result.skipped)} already extracted, {len(result.errors)} refused/unreadable")
    else:
        log(f"done: {len(result.extracted)} extracted, {len(result.skipped)} already extracted, "
            f"{len(result.errors)} refused/unreadable")
    for err in result.errors:
        log(f"  error: {err}")
    return result
