"""Data preparation, ``video-ktr data unpack DIR``.

``unpack`` -- extract the media archives of a downloaded Video-R1-data folder
    Layout assumed (that of ``huggingface.co/datasets/Video-R1/Video-R1-data`` and of Video-R1's
    ``src/unzip.py``): the JSON files (``Video-R1-260k.json``, ``Video-R1-COT-165k.json``) sit at the top
    of DIR, the media come as zip archives anywhere below it (one folder per source, e.g.
    ``CLEVRER/CLEVRER.zip``), and each archive is extracted *into the folder that holds it*, with the
    member names as stored.  The rows' paths (``./CLEVRER/video_validation/video_10000.mp4``) are then
    relative to DIR, so train/check with ``--media_root DIR``.  These assumptions are not verified against
    the download here: run ``video-ktr data check`` afterwards, it opens every file the rows name.
    If every member of an archive starts with the name of the folder it is extracted into (which would
    give ``CLEVRER/CLEVRER/...``), a warning says so.

    - Hidden folders (``.cache`` of ``huggingface-cli download --local-dir``) are not searched, folder
      symlinks are not followed.
    - Members are refused -- the whole archive, before anything of it is written -- when their name is
      absolute (``/x``, ``C:\\x``), has a ``..`` component, is a symlink entry, or would be written
      through an existing symlink to a place outside the archive's folder.  The error names the archive
      and the member; the other archives are still extracted and the exit status is 1.
    - After an archive is completely extracted, ``.<archive name>.unpacked`` (e.g. ``.CLEVRER.zip.unpacked``)
      is written next to it, holding the archive's size and mtime.  An archive with a matching marker is
      skipped; a crash mid-extraction leaves no marker, so the next run extracts it again (overwriting the
      partial files); a re-downloaded (changed) archive is extracted again.
    - Zip files that came out of another archive (listed in its marker) are content, not downloads, and
      are left alone, as a single pass of ``unzip.py`` does.
    - Existing files are never replaced silently: a member whose target exists with other content (and
      was not written by an earlier, interrupted or outdated, extraction of the same archive), a member
      whose target is a folder, or one whose folder is a file (on disk or in the archive) is a collision; the
      archive is refused before anything of it is written, each colliding member named, and the other
      archives are still extracted (exit status 1). ``--overwrite`` replaces differing files; an identical
      existing file is fine. ``.<archive name>.unpacking`` marks an extraction in progress.
    - Tar archives (``.tar``, ``.tar.gz``, ``.tgz``, ...) are not extracted; each is named in the output.
    - Split archives (``x.z01``, ``x.zip.001``) are not joined: they are reported, join them first.
    - ``--dry_run`` lists what would be extracted, skipped or refused and writes nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import stat
import sys
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from video_ktr.data.argv import parse_positional as _parse
from video_ktr.utils.config import field

_SPLIT_PART = re.compile(r"(\.z\d\d|\.zip\.\d{3})$", re.IGNORECASE)
_TAR = re.compile(r"\.(tar|tar\.gz|tgz|tar\.bz2|tbz2|tar\.xz|txz)$", re.IGNORECASE)


@dataclass
class UnpackArgs:
    """Extract every zip archive under a downloaded Video-R1-data folder into the folder holding it.

    Usage: video-ktr data unpack DIR [--dry_run].
    """

    dir: str = field(help="The downloaded Video-R1-data folder (may be given as the first positional argument).")
    dry_run: bool = field(False, help="Only list which archives would be extracted, skipped or refused; write nothing.")
    overwrite: bool = field(False, help="Replace existing files that differ from an archive's member (without it such an archive is refused, each colliding member named, and the others are still extracted).")


class ArchiveError(Exception):
    """An archive that is refused or cannot be read; names the archive and, if any, the member."""

    def __init__(self, archive: str | os.PathLike, member: str | None, message: str) -> None:
        self.archive, self.member, self.message = str(archive), member, message
        where = f"archive {self.archive}" + (f", member {member!r}" if member is not None else "")
        super().__init__(f"{where}: {message}")


@dataclass
class UnpackResult:
    extracted: list[Path] = dataclasses.field(default_factory=list)
    skipped: list[Path] = dataclasses.field(default_factory=list)
    errors: list[ArchiveError] = dataclasses.field(default_factory=list)
    split_parts: list[Path] = dataclasses.field(default_factory=list)
    tar_archives: list[Path] = dataclasses.field(default_factory=list)  # named, not extracted

    @property
    def ok(self) -> bool:
        return not self.errors and not self.split_parts


def marker_path(archive: Path) -> Path:
    """``.<archive name>.unpacked`` next to the archive; written after a complete extraction."""
    return archive.with_name(f".{archive.name}.unpacked")


def find_archives(root: Path) -> tuple[list[Path], list[Path]]:
    """(zip archives, split-archive parts) below ``root``, sorted; hidden folders are not searched."""
    archives: list[Path] = []
    parts: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            if name.lower().endswith(".zip"):
                archives.append(Path(dirpath) / name)
            elif _SPLIT_PART.search(name):
                parts.append(Path(dirpath) / name)
    return archives, parts


def find_tar_archives(root: Path) -> list[Path]:
    """Tar archives below ``root`` (not extracted by ``data unpack``: they are named so nothing is missed)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath) / n for n in sorted(filenames) if not n.startswith(".") and _TAR.search(n)]
    return found


def _in_progress_path(archive: Path) -> Path:
    return archive.with_name(f".{archive.name}.unpacking")


def _collisions(members: list[zipfile.ZipInfo], zf: zipfile.ZipFile, dest: Path, *, overwrite: bool) -> list[str]:
    """One line per member that cannot be written: a folder or a file in the way, or an existing file that
    differs from the member (allowed with ``overwrite``). An existing identical file is not a collision."""
    problems = []
    names = {m.filename.rstrip("/") for m in members if not m.is_dir()}
    for m in members:
        if m.is_dir():
            continue
        name = m.filename.replace("\\", "/")
        target = dest / name
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
            elif target.is_file() and not overwrite and not _same_content(target, m, zf):
                problems.append(f"{name!r}: {target} exists and differs (--overwrite replaces it)")
    return problems


def _same_content(target: Path, member: zipfile.ZipInfo, zf: zipfile.ZipFile) -> bool:
    if target.stat().st_size != member.file_size:
        return False
    crc = 0
    with open(target, "rb") as fh:
        while chunk := fh.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc == member.CRC


def _is_symlink_entry(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


def _member_problem(info: zipfile.ZipInfo, dest: Path, dest_real: Path) -> str | None:
    """Why extracting ``info`` into ``dest`` is refused (None if it is safe)."""
    name = info.filename
    if _is_symlink_entry(info):
        return "is a symbolic link entry (refused: a link could point outside the folder)"
    norm = name.replace("\\", "/")
    if norm.startswith("/") or re.match(r"^[A-Za-z]:", norm):
        return "has an absolute name (refused: it would be written outside the folder)"
    if ".." in norm.split("/"):
        return "has a '..' component (refused: it would be written outside the folder)"
    if "\x00" in name:
        return "has a NUL character in its name"
    target = (dest / norm).resolve()
    if not target.is_relative_to(dest_real):
        return f"would be written to {target}, outside {dest_real} (through an existing symlink); refused"
    return None


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


def _safe_members(zf: zipfile.ZipFile, archive: Path, dest: Path) -> list[zipfile.ZipInfo]:
    """All members of ``zf``, or ArchiveError for the first one that is refused."""
    dest_real = dest.resolve()
    members = zf.infolist()
    for info in members:
        problem = _member_problem(info, dest, dest_real)
        if problem is not None:
            raise ArchiveError(archive, info.filename, problem)
        if info.flag_bits & 0x1:
            raise ArchiveError(archive, info.filename, "is encrypted; extract the archive with `unzip` or `7z x`")
    return members


def _doubled_prefix(members: Sequence[zipfile.ZipInfo], dest: Path) -> bool:
    """True if every member starts with ``<name of dest>/`` (extraction would double the folder name)."""
    prefix = dest.name + "/"
    names = [m.filename.replace("\\", "/") for m in members]
    return bool(names) and bool(dest.name) and all(n.startswith(prefix) or n == prefix for n in names)


def unpack_archive(archive: Path, dest: Path | None = None, *, progress: bool = True, overwrite: bool = False) -> list[str]:
    """Extract ``archive`` into ``dest`` (default: its folder) and write its marker.

    Every member is checked before anything is written; raises :class:`ArchiveError` for an unsafe,
    encrypted, unsupported or corrupt archive.  Returns the names of the members that are zip files.
    """
    archive = Path(archive)
    dest = archive.parent if dest is None else Path(dest)
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ArchiveError(archive, None, f"is not a readable zip file ({exc}); re-download it") from None
    with zf:
        members = _safe_members(zf, archive, dest)
        # files this package wrote before (a crash mid-extraction, a changed archive) may be replaced
        ours = _in_progress_path(archive).exists() or marker_path(archive).exists()
        problems = _collisions(members, zf, dest, overwrite=overwrite or ours)
        if problems:
            shown = "; ".join(problems[:10]) + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
            raise ArchiveError(archive, None, f"{len(problems)} member(s) collide with what is on disk, nothing "
                               f"extracted: {shown}")
        files = [m for m in members if not m.is_dir()]
        total = sum(m.file_size for m in files)
        existing = 0
        for m in files:
            target = dest / m.filename
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
                target = dest / m.filename.replace("\\", "/")
                if m.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    with zf.open(m) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
                except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
                    raise ArchiveError(archive, m.filename, f"is corrupt ({exc}); re-download the archive") from None
                except (NotImplementedError, RuntimeError) as exc:
                    raise ArchiveError(
                        archive, m.filename,
                        f"cannot be extracted by Python ({exc}); extract the archive with `unzip` or `7z x` "
                        "(e.g. Deflate64 compression is not supported by zipfile)",
                    ) from None
                except OSError as exc:
                    raise ArchiveError(archive, m.filename, f"cannot be written to {target} ({exc})") from None
                bar.update(m.file_size)
        finally:
            bar.close()
    st = archive.stat()
    nested = [m.filename for m in files if m.filename.lower().endswith(".zip")]
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
    result.tar_archives = find_tar_archives(root)
    for tar in result.tar_archives:
        log(f"tar archive {tar.relative_to(root)}: not extracted by this command; extract it with "
            f"`tar xf {tar.name}` in its folder (Video-R1-data ships zip archives)")
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
            with zipfile.ZipFile(archive) as zf:
                members = _safe_members(zf, archive, dest)
        except ArchiveError as err:
            log(f"{head}: REFUSED: {err}")
            result.errors.append(err)
            continue
        except (zipfile.BadZipFile, OSError) as exc:
            err = ArchiveError(archive, None, f"is not a readable zip file ({exc}); re-download it")
            log(f"{head}: ERROR: {err}")
            result.errors.append(err)
            continue
        size = sum(m.file_size for m in members)
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


def unpack_main(argv: list[str]) -> int:
    args = _parse(UnpackArgs, argv, "video-ktr data unpack", positional="dir")
    try:
        result = unpack(args.dir, dry_run=args.dry_run, overwrite=args.overwrite)
    except FileNotFoundError as exc:
        print(f"video-ktr data unpack: {exc}", file=sys.stderr)
        return 2
    return 0 if result.ok else 1
