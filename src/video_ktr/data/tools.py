"""Data preparation: ``video-ktr data unpack DIR`` and ``video-ktr data check DATASET``.

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
    - Split archives (``x.z01``, ``x.zip.001``) are not joined: they are reported, join them first.
    - ``--dry_run`` lists what would be extracted, skipped or refused and writes nothing.

``check`` -- validate every row and open every media file
    Every row goes through :func:`video_ktr.data.rows.validate_row` (media must exist under ``--media_root``),
    then every distinct media file is opened in worker processes exactly as training does
    (:func:`video_ktr.data.media.load_video` with the frame options / :func:`video_ktr.data.media.load_image`).
    The summary counts every row (good + bad = rows in the file) by reason with a few examples naming
    file, row and field; the exit status is 1 if any row is bad.  ``--write_clean FILE`` writes the good
    rows, unchanged and in order, in the input's format (JSON list or JSONL), plus
    ``FILE.rejected.jsonl`` with one line per rejected row (row index, reason, field, message).
    In a JSONL file a line that is not valid JSON is one bad row (``bad_json``) and the other lines are
    still checked; a JSON list that does not parse cannot be split into rows and fails as a whole.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import re
import shutil
import stat
import sys
import typing
import zipfile
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from video_ktr.data.options import MediaArgs
from video_ktr.data.rows import DataError, validate_row
from video_ktr.utils.config import field, parse_args

__all__ = [
    "ArchiveError",
    "CheckArgs",
    "CheckResult",
    "Rejection",
    "UnpackArgs",
    "UnpackResult",
    "check_dataset",
    "find_archives",
    "main",
    "marker_path",
    "open_media",
    "unpack",
    "unpack_archive",
]

SUBCOMMANDS = {
    "unpack": "extract every zip archive under a downloaded Video-R1-data folder, in place",
    "check": "validate every row and open every media file of a data set; optionally write the good rows",
}

_TRUE_FALSE = {"1", "true", "yes", "y", "on", "0", "false", "no", "n", "off"}
_SPLIT_PART = re.compile(r"(\.z\d\d|\.zip\.\d{3})$", re.IGNORECASE)


# ================================================================================================ unpack


@dataclass
class UnpackArgs:
    """Extract every zip archive under a downloaded Video-R1-data folder into the folder holding it.

    Usage: video-ktr data unpack DIR [--dry_run].
    """

    dir: str = field(help="The downloaded Video-R1-data folder (may be given as the first positional argument).")
    dry_run: bool = field(False, help="Only list which archives would be extracted, skipped or refused; write nothing.")


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


def unpack_archive(archive: Path, dest: Path | None = None, *, progress: bool = True) -> list[str]:
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
    return nested


def unpack(root: str | os.PathLike, *, dry_run: bool = False, progress: bool = True,
           log: Callable[[str], None] = print) -> UnpackResult:
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
            unpack_archive(archive, dest, progress=progress)
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
        result = unpack(args.dir, dry_run=args.dry_run)
    except FileNotFoundError as exc:
        print(f"video-ktr data unpack: {exc}", file=sys.stderr)
        return 2
    return 0 if result.ok else 1


# ================================================================================================= check


@dataclass
class CheckArgs(MediaArgs):
    """Validate every row of a Video-R1-schema data set and open every media file it names.

    Usage: video-ktr data check DATASET --media_root DIR [--workers N] [--write_clean FILE] [frame options].
    """

    dataset: str = field(help="The data file, JSON list or JSONL (may be given as the first positional argument).", kw_only=True)
    media_root: str | None = field(None, help="Folder that the rows' 'path' fields are relative to (default: the data file's folder).")
    workers: int | None = field(None, help="Worker processes that open media files (default: min(4, CPU count)); 0 opens them in this process.")
    write_clean: str | None = field(None, help="Write the good rows (same format as the input) to this file, and the rejected ones to FILE.rejected.jsonl.")
    open_media: bool = field(True, help="Decode every video / open every image; false only checks the rows and that the files exist.")
    allow_outside_media_root: bool = field(False, help="Accept media paths that are absolute or lead outside --media_root.")
    require_process: bool = field(False, help="Rows must carry the reasoning in 'process' (SFT data).")
    examples: int = field(3, help="Examples shown per reason in the summary.")

    def validate(self) -> None:
        if self.workers is not None and self.workers < 0:
            raise ValueError("field 'workers' must be >= 0")
        if self.examples < 0:
            raise ValueError("field 'examples' must be >= 0")


@dataclass
class Rejection:
    """One bad row: 0-based ``row`` index (as in error messages), reason, field and message."""

    row: int
    reason: str
    field: str | None
    message: str
    line: int | None = None  # JSONL line number
    problem_id: Any = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"row": self.row}
        if self.line is not None:
            out["line"] = self.line
        if self.problem_id is not None:
            out["problem_id"] = self.problem_id
        out.update(reason=self.reason, field=self.field, message=self.message)
        return out


@dataclass
class CheckResult:
    file: str
    format: str  # "json" | "jsonl"
    rows: list[Any]  # every row as read (None for a JSONL line that is not JSON)
    rejected: list[Rejection]
    media_files: int = 0  # distinct media files opened
    media_bad: int = 0

    @property
    def total(self) -> int:
        return len(self.rows)

    @property
    def good_rows(self) -> list[Any]:
        bad = {r.row for r in self.rejected}
        return [row for i, row in enumerate(self.rows) if i not in bad]

    @property
    def ok(self) -> bool:
        return not self.rejected

    def counts(self) -> Counter:
        return Counter(r.reason for r in self.rejected)

    def summary(self, examples: int = 3) -> str:
        n_bad = len({r.row for r in self.rejected})
        lines = [f"{self.file}: {self.total} row(s): {self.total - n_bad} good, {n_bad} bad"]
        if self.media_files:
            lines.append(f"media: {self.media_files} distinct file(s) opened, {self.media_bad} unusable")
        by_reason: dict[str, list[Rejection]] = defaultdict(list)
        for r in self.rejected:
            by_reason[r.reason].append(r)
        if by_reason:
            lines.append("bad rows by reason:")
        for reason, n in self.counts().most_common():
            lines.append(f"  {reason}: {n}")
            for r in by_reason[reason][:examples]:
                lines.append(f"    - {r.message}")
        return "\n".join(lines)


def _read_for_check(path: Path) -> tuple[str, list[Any], list[Rejection], list[int | None]]:
    """(format, rows, rejections for unparsable JSONL lines, line numbers); same format rule as read_rows."""
    if not path.is_file():
        raise DataError(path, None, None, "data file does not exist", "missing_file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(path, None, None, f"is not UTF-8 text ({exc})", "bad_json") from None
    stripped = text.lstrip()
    if path.suffix == ".jsonl" or (stripped and stripped[0] == "{"):
        rows: list[Any] = []
        rejected: list[Rejection] = []
        linenos: list[int | None] = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except (json.JSONDecodeError, RecursionError) as exc:
                msg = getattr(exc, "msg", str(exc))
                err = DataError(path, len(rows), None, f"line {lineno} is not valid JSON ({msg})", "bad_json")
                rejected.append(Rejection(len(rows), err.reason, None, str(err), line=lineno))
                rows.append(None)
            linenos.append(lineno)
        return "jsonl", rows, rejected, linenos
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            path, None, None, f"not valid JSON at line {exc.lineno} column {exc.colno} ({exc.msg})", "bad_json"
        ) from None
    except RecursionError:
        raise DataError(path, None, None, "JSON nested too deeply", "bad_json") from None
    if not isinstance(data, list):
        raise DataError(path, None, None, "a data file must hold a JSON list of rows (or be JSONL)", "bad_json")
    return "json", data, [], [None] * len(data)


def _media_reason(err: BaseException, data_type: str) -> str:
    text = str(getattr(err, "reason", "") or err)
    if "is a still image" in text or "is a video, not an image" in text:
        return "media_wrong_type"
    if "is empty" in text:
        return "media_empty"
    return "video_unreadable" if data_type == "video" else "image_unreadable"


def open_media(path: str, data_type: str, settings: Any) -> tuple[str, str] | None:
    """Open one media file as training does; None if usable, else (reason, message).  Never raises."""
    from video_ktr.data.media import MediaError, load_image
    from video_ktr.data.video import load_video

    try:
        if data_type == "video":
            load_video(path, settings)
        else:
            load_image(path, settings)
    except MediaError as err:
        return _media_reason(err, data_type), str(err)
    except Exception as err:  # a decoder bug must not stop the check of the other files
        return "media_error", f"cannot use media file {path!r}: {type(err).__name__}: {err}"
    return None


Opener = Callable[[str, str, Any], "tuple[str, str] | None"]


def _open_batch(batch: list[tuple[str, str]], settings: Any, opener: Opener) -> list[tuple[str, str] | None]:
    return [opener(path, data_type, settings) for path, data_type in batch]


def _worker_init() -> None:
    try:
        import torch

        torch.set_num_threads(1)  # one process per core; do not oversubscribe
    except Exception:  # pragma: no cover - torch is a dependency, but this is only a tuning knob
        pass


def _pool(workers: int) -> ProcessPoolExecutor:
    methods = multiprocessing.get_all_start_methods()
    if "forkserver" in methods:
        # not fork: the parent may hold threads (tqdm, torch); the server preloads the decoders once
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["video_ktr.data.video"])
    else:  # pragma: no cover - Windows / macOS without forkserver
        ctx = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init)


def _run_media(
    items: list[tuple[str, str]], settings: Any, workers: int, opener: Opener,
    update: Callable[[int], None], batch_size: int = 8,
) -> list[tuple[str, str] | None]:
    """Open ``items`` [(path, data_type)]; one result per item, in order.

    A worker that dies (a decoder crash, out of memory) breaks the pool; the files not done yet are then
    opened one at a time in a fresh single-worker pool, so the file that kills it is identified and
    reported as ``media_crashed`` instead of aborting the check.
    """
    results: list[tuple[str, str] | None] = [None] * len(items)
    done = [False] * len(items)
    if workers == 0:
        for i, (path, data_type) in enumerate(items):
            results[i] = opener(path, data_type, settings)
            update(1)
        return results
    batches = [list(range(s, min(s + batch_size, len(items)))) for s in range(0, len(items), batch_size)]
    broken = False
    with _pool(workers) as pool:
        futures = {}
        pending_batches = iter(batches)
        # keep at most 2 batches per worker in flight (bounded memory for 260k rows)
        def fill() -> None:
            while len(futures) < 2 * workers:
                idx = next(pending_batches, None)
                if idx is None:
                    return
                futures[pool.submit(_open_batch, [items[i] for i in idx], settings, opener)] = idx

        fill()
        while futures:
            finished, _ = wait(list(futures), return_when=FIRST_COMPLETED)
            for fut in finished:
                idx = futures.pop(fut)
                try:
                    out = fut.result()
                except BrokenProcessPool:
                    broken = True
                    continue
                for i, r in zip(idx, out):
                    results[i], done[i] = r, True
                update(len(idx))
            if broken:
                for fut in futures:
                    fut.cancel()
                futures.clear()
                break
            fill()
    if broken:
        left = [i for i in range(len(items)) if not done[i]]
        pool = _pool(1)
        try:
            for i in left:
                path, data_type = items[i]
                try:
                    results[i] = pool.submit(_open_batch, [items[i]], settings, opener).result()[0]
                except BrokenProcessPool:
                    results[i] = ("media_crashed", f"cannot use media file {path!r}: the worker process opening "
                                  "it died (decoder crash or out of memory)")
                    pool.shutdown(wait=True)
                    pool = _pool(1)
                update(1)
        finally:
            pool.shutdown(wait=True)
    return results


def check_dataset(
    dataset: str | os.PathLike,
    media_root: str | os.PathLike | None = None,
    *,
    settings: Any = None,
    workers: int | None = None,
    open_media_files: bool = True,
    allow_outside_media_root: bool = False,
    require_process: bool = False,
    progress: bool = True,
    opener: Opener = open_media,
) -> CheckResult:
    """Check every row of ``dataset`` and (``open_media_files``) open every distinct media file.

    Raises :class:`DataError` only when the file itself cannot be read as rows (missing, or a JSON list
    that does not parse); every other problem is one :class:`Rejection` per row.
    """
    path = Path(dataset)
    root = Path(media_root) if media_root is not None else path.parent
    if settings is None:
        from video_ktr.data.media import FrameSettings

        settings = FrameSettings()
    fmt, rows, rejected, linenos = _read_for_check(path)
    bad_rows = {r.row for r in rejected}
    media_rows: dict[tuple[str, str], list[int]] = defaultdict(list)
    for index, row in enumerate(rows):
        if index in bad_rows:
            continue
        pid = row.get("problem_id") if isinstance(row, dict) else None
        try:
            sample = validate_row(
                row, file=str(path), index=index, media_root=root, check_media_exists=True,
                allow_outside=allow_outside_media_root, require_process=require_process,
            )
        except DataError as err:
            rejected.append(Rejection(index, err.reason, err.field, str(err), linenos[index], pid))
            continue
        except (ValueError, OSError) as exc:  # e.g. a path with a NUL byte or a too long name
            err = DataError(path, index, "path", f"cannot be checked ({type(exc).__name__}: {exc})", "bad_path")
            rejected.append(Rejection(index, err.reason, err.field, str(err), linenos[index], pid))
            continue
        media_rows[(str(sample.media_path), sample.data_type)].append(index)

    result = CheckResult(file=str(path), format=fmt, rows=rows, rejected=rejected)
    if open_media_files and media_rows:
        items = list(media_rows)
        n_workers = min(4, os.cpu_count() or 1) if workers is None else workers
        n_workers = min(n_workers, len(items))
        from tqdm.auto import tqdm

        with tqdm(total=len(items), desc="media", unit="file", disable=not progress) as bar:
            outcomes = _run_media(items, settings, n_workers, opener, bar.update)
        result.media_files = len(items)
        for item, outcome in zip(items, outcomes):
            if outcome is None:
                continue
            result.media_bad += 1
            reason, message = outcome
            for index in media_rows[item]:
                row = rows[index]
                err = DataError(path, index, "path", message, reason)
                rejected.append(Rejection(index, reason, "path", str(err), linenos[index], row.get("problem_id")))
    rejected.sort(key=lambda r: r.row)
    return result


def _write_atomic(path: Path, lines: Iterable[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "w", encoding="utf-8") as fh:
        for text in lines:
            fh.write(text)
    os.replace(tmp, path)


def write_clean(result: CheckResult, out: str | os.PathLike) -> tuple[Path, Path]:
    """Write the good rows (format of the input) to ``out`` and the rejections to ``out.rejected.jsonl``."""
    out = Path(out)
    good = result.good_rows
    if result.format == "jsonl":
        _write_atomic(out, (json.dumps(row, ensure_ascii=False) + "\n" for row in good))
    else:
        _write_atomic(out, [json.dumps(good, ensure_ascii=False, indent=2) + "\n"])
    rejected_path = out.with_name(out.name + ".rejected.jsonl")
    _write_atomic(rejected_path, (json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in result.rejected))
    return out, rejected_path


def check_main(argv: list[str]) -> int:
    args = _parse(CheckArgs, argv, "video-ktr data check", positional="dataset")
    prog = "video-ktr data check"
    try:
        settings = args.frame_settings()
    except ValueError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    if args.write_clean and Path(args.write_clean).resolve() == Path(args.dataset).resolve():
        print(f"{prog}: --write_clean must not be the input file {args.dataset}", file=sys.stderr)
        return 2
    try:
        result = check_dataset(
            args.dataset, args.media_root, settings=settings, workers=args.workers,
            open_media_files=args.open_media, allow_outside_media_root=args.allow_outside_media_root,
            require_process=args.require_process,
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


# ================================================================================================= main


def _parse(cls: type, argv: Sequence[str], prog: str, *, positional: str) -> Any:
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
