"""Zip and tar archives read safely for ``video-ktr data unpack``: every member is listed and checked first.

One interface for both formats (:func:`open_archive`): ``members(dest)`` lists the members that would be
written into ``dest`` or raises :class:`ArchiveError` for the first one that is refused, ``open(member)``
streams a member's bytes and ``same_content(path, member)`` says whether a file on disk already holds them.

Refused, in either format (the whole archive, before anything of it is written): a name that is absolute
(``/x``, ``C:\\x``), has a ``..`` component or a NUL character, or would be written through an existing
symlink to a place outside ``dest``; link entries (zip symlinks; tar symbolic and hard links: a link could
point outside the folder); tar device files, FIFOs and any other member that is neither a regular file nor
a folder; encrypted zip members. Only the bytes of a member are written: tar modes, owners and times are
not applied, so no set-uid bit or foreign owner comes out of an archive.
"""

from __future__ import annotations

import lzma
import re
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

TAR_NAME = re.compile(r"\.(tar|tar\.gz|tgz|tar\.bz2|tbz2|tar\.xz|txz)$", re.IGNORECASE)


def is_archive_name(name: str) -> bool:
    """A zip or tar archive by its file name (``.zip``, ``.tar``, ``.tar.gz``, ``.tgz``, ``.tar.bz2``, ``.tar.xz``, ...)."""
    return name.lower().endswith(".zip") or bool(TAR_NAME.search(name))


class ArchiveError(Exception):
    """An archive that is refused or cannot be read; names the archive and, if any, the member."""

    def __init__(self, archive: str | Path, member: str | None, message: str) -> None:
        self.archive, self.member, self.message = str(archive), member, message
        where = f"archive {self.archive}" + (f", member {member!r}" if member is not None else "")
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class Member:
    """One member: its name ('/'-separated, relative to the folder it is extracted into), kind and size."""

    name: str
    is_dir: bool
    size: int
    raw: Any  # the zipfile.ZipInfo / tarfile.TarInfo

    @property
    def raw_name(self) -> str:
        """The name as the archive stores it (what errors quote)."""
        return self.raw.filename if isinstance(self.raw, zipfile.ZipInfo) else self.raw.name


class _Guarded:
    """A member's byte stream whose read errors become an ArchiveError naming the archive and the member, so
    the caller can tell a corrupt archive from a failed write (both may be an OSError)."""

    def __init__(self, stream: IO[bytes], archive: Any, name: str) -> None:
        self._stream, self._archive, self._name = stream, archive, name

    def read(self, n: int = -1) -> bytes:
        try:
            return self._stream.read(n)
        except self._archive.corrupt_errors + self._archive.unsupported_errors as exc:
            raise self._archive.read_error(self._name, exc) from None

    def close(self) -> None:
        self._stream.close()

    def __enter__(self) -> _Guarded:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def name_problem(name: str, dest: Path, dest_real: Path) -> str | None:
    """Why writing a member called ``name`` ('/'-separated) into ``dest`` is refused (None if it is safe)."""
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return "has an absolute name (refused: it would be written outside the folder)"
    if ".." in name.split("/"):
        return "has a '..' component (refused: it would be written outside the folder)"
    if "\x00" in name:
        return "has a NUL character in its name"
    target = (dest / name).resolve()
    if not target.is_relative_to(dest_real):
        return f"would be written to {target}, outside {dest_real} (through an existing symlink); refused"
    return None


class ZipArchive:
    """A zip file (``zipfile``); members checked by :meth:`members`."""

    kind = "zip"
    # what reading a member can raise: corrupt data, and compressions zipfile cannot read (Deflate64)
    corrupt_errors: tuple[type[BaseException], ...] = (zipfile.BadZipFile, zlib.error, EOFError)
    unsupported_errors: tuple[type[BaseException], ...] = (NotImplementedError, RuntimeError)
    unsupported_hint = "extract the archive with `unzip` or `7z x` (e.g. Deflate64 compression is not supported by zipfile)"

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._zf = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise ArchiveError(path, None, f"is not a readable zip file ({exc}); re-download it") from None

    def members(self, dest: Path) -> list[Member]:
        dest_real = dest.resolve()
        out = []
        for info in self._zf.infolist():
            if stat.S_ISLNK(info.external_attr >> 16):
                raise ArchiveError(self.path, info.filename, "is a symbolic link entry (refused: a link could point outside the folder)")
            name = info.filename.replace("\\", "/")
            problem = name_problem(name, dest, dest_real)
            if problem is not None:
                raise ArchiveError(self.path, info.filename, problem)
            if info.flag_bits & 0x1:
                raise ArchiveError(self.path, info.filename, "is encrypted; extract the archive with `unzip` or `7z x`")
            out.append(Member(name, info.is_dir(), info.file_size, info))
        return out

    def read_error(self, name: str, exc: BaseException) -> ArchiveError:
        if isinstance(exc, self.corrupt_errors):
            return ArchiveError(self.path, name, f"is corrupt ({exc}); re-download the archive")
        return ArchiveError(self.path, name, f"cannot be extracted by Python ({exc}); {self.unsupported_hint}")

    def open(self, member: Member) -> _Guarded:
        """The member's bytes; reading them raises ArchiveError if the archive is corrupt or unsupported."""
        try:
            return _Guarded(self._zf.open(member.raw), self, member.raw.filename)
        except self.corrupt_errors + self.unsupported_errors as exc:
            raise self.read_error(member.raw.filename, exc) from None

    def same_content(self, path: Path, member: Member) -> bool:
        """Whether the file at ``path`` holds the member's bytes (size, then the CRC the zip stores)."""
        if path.stat().st_size != member.size:
            return False
        crc = 0
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                crc = zlib.crc32(chunk, crc)
        return crc == member.raw.CRC

    def close(self) -> None:
        self._zf.close()

    def __enter__(self) -> ZipArchive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_TAR_READ_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError)


def _tar_kind(info: tarfile.TarInfo) -> str:
    if info.ischr() or info.isblk():
        return "a device file"
    if info.isfifo():
        return "a FIFO"
    return f"of tar type {info.type!r}, neither a file nor a folder"


class TarArchive:
    """A tar file, plain or compressed with gzip, bzip2 or xz (``tarfile``); members checked by :meth:`members`.

    Listing the members reads the whole archive once (a compressed tar has no index); extracting reads it again.
    """

    kind = "tar"
    corrupt_errors: tuple[type[BaseException], ...] = _TAR_READ_ERRORS
    unsupported_errors: tuple[type[BaseException], ...] = ()
    unsupported_hint = ""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._tf = tarfile.open(path, "r:*")
        except _TAR_READ_ERRORS as exc:
            raise ArchiveError(path, None, f"is not a readable tar archive ({exc}); re-download it") from None

    def members(self, dest: Path) -> list[Member]:
        dest_real = dest.resolve()
        try:
            infos = self._tf.getmembers()
        except _TAR_READ_ERRORS as exc:
            raise ArchiveError(self.path, None, f"is corrupt or truncated ({exc}); re-download it") from None
        out = []
        for info in infos:
            if info.issym() or info.islnk():
                which = "symbolic" if info.issym() else "hard"
                raise ArchiveError(self.path, info.name, f"is a {which} link entry to {info.linkname!r} (refused: a link "
                                   "could point outside the folder; extract the archive with `tar xf` if you trust it)")
            if not (info.isreg() or info.isdir()):
                raise ArchiveError(self.path, info.name, f"is {_tar_kind(info)} (refused: only files and folders are extracted)")
            if info.name.startswith("/"):  # before '.' parts are dropped, which would hide it
                raise ArchiveError(self.path, info.name, "has an absolute name (refused: it would be written outside the folder)")
            name = "/".join(p for p in info.name.split("/") if p not in ("", "."))
            problem = name_problem(name, dest, dest_real)
            if problem is not None:
                raise ArchiveError(self.path, info.name, problem)
            if name:  # "." itself is the folder extracted into
                out.append(Member(name, info.isdir(), int(info.size) if info.isreg() else 0, info))
        return out

    def read_error(self, name: str, exc: BaseException) -> ArchiveError:
        return ArchiveError(self.path, name, f"is corrupt or truncated ({exc}); re-download the archive")

    def open(self, member: Member) -> _Guarded:
        """The member's bytes; reading them raises ArchiveError if the archive is corrupt or truncated."""
        try:
            stream = self._tf.extractfile(member.raw)
        except self.corrupt_errors as exc:
            raise self.read_error(member.raw.name, exc) from None
        if stream is None:  # pragma: no cover  (members() keeps regular files only)
            raise ArchiveError(self.path, member.raw.name, "has no data to extract")
        return _Guarded(stream, self, member.raw.name)

    def same_content(self, path: Path, member: Member) -> bool:
        """Whether the file at ``path`` holds the member's bytes (size, then byte for byte: tar stores no checksum)."""
        if path.stat().st_size != member.size:
            return False
        with open(path, "rb") as fh, self.open(member) as src:
            while True:
                a, b = fh.read(1 << 20), src.read(1 << 20)
                if a != b:
                    return False
                if not a:
                    return True

    def close(self) -> None:
        self._tf.close()

    def __enter__(self) -> TarArchive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_archive(path: Path) -> ZipArchive | TarArchive:
    """The archive at ``path``, by its name: a tar name (:data:`TAR_NAME`) is read as tar, anything else as zip."""
    return TarArchive(path) if TAR_NAME.search(path.name) else ZipArchive(path)
