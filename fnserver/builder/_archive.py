"""Safe extraction of an uploaded zip archive.

Every entry is checked before anything is written; sizes are counted while extracting because
the headers' sizes are chosen by the uploader.
"""

from __future__ import annotations

import errno
import os
import stat
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Final, NoReturn

from fnserver.protocol import FnError, InvalidArgumentError, ResourceExhaustedError, TooLargeError

__all__ = ["ArchiveLimits", "extract_zip"]

# Version-control metadata is never part of a build, and macOS Finder adds __MACOSX/.
_DROPPED_DIRS: Final = frozenset({".git", ".hg", ".svn", "__MACOSX"})
_CHUNK: Final = 64 * 1024
#: Linux's NAME_MAX and a path length every file system here takes: checked before extraction
#: so that a long name is the uploader's INVALID_ARGUMENT, not the server's ENAMETOOLONG.
_MAX_COMPONENT_BYTES: Final = 255
_MAX_PATH_BYTES: Final = 1024
#: General purpose flag bit 0: the entry is encrypted (APPNOTE 4.4.4).
_FLAG_ENCRYPTED: Final = 0x1
#: Entry names are shown in messages up to this many characters.
_SHOWN_CHARS: Final = 120
#: What the host can run out of while extracting: the uploader's archive is not at fault.
_RESOURCE_ERRNOS: Final = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EMFILE, errno.ENFILE, errno.ENOMEM})


@dataclass(frozen=True)
class ArchiveLimits:
    """Caps on what an archive may expand to."""

    max_entries: int = 10_000
    max_file_bytes: int = 64 * 1024 * 1024
    max_total_bytes: int = 256 * 1024 * 1024
    max_ratio: int = 200
    # Small entries may compress far better than max_ratio (a file of zeros); the ratio is
    # only enforced once an entry has expanded past this many bytes.
    ratio_floor_bytes: int = 1024 * 1024


def extract_zip(archive: Path, dest: Path, limits: ArchiveLimits | None = None) -> None:
    """Extract ``archive`` into the existing empty directory ``dest``, or refuse it.

    Raises InvalidArgumentError for a corrupt archive or a hostile entry (named in the message),
    TooLargeError when a cap is exceeded. On error ``dest`` may hold partial output; the caller
    owns and removes it.
    """
    lim = limits or ArchiveLimits()
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            keep = _check_entries(infos, lim)
            _extract(zf, keep, dest, lim)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
        raise InvalidArgumentError(f"corrupt or unsupported zip archive: {exc}") from exc
    except zipfile.LargeZipFile as exc:  # pragma: no cover - zip64 is supported by default
        raise InvalidArgumentError(f"unsupported zip archive: {exc}") from exc


def _check_entries(infos: list[zipfile.ZipInfo], lim: ArchiveLimits) -> list[zipfile.ZipInfo]:
    """Validate every entry; return those to extract (VCS folders dropped)."""
    if len(infos) > lim.max_entries:
        raise TooLargeError(
            f"archive has {len(infos)} entries, the limit is {lim.max_entries}",
            {"limit": lim.max_entries},
        )
    seen: dict[str, str] = {}  # casefolded path -> original spelling
    files: set[str] = set()
    dirs: set[str] = set()
    keep: list[zipfile.ZipInfo] = []
    for info in infos:
        raw = info.orig_filename
        shown = raw  # _refuse uses repr(), which escapes NUL and control characters
        if "\0" in raw:
            _refuse(shown, "has a NUL byte in its name")
        if "\\" in raw:
            _refuse(shown, "has a backslash in its name")
        if raw.startswith("/") or (len(raw) > 1 and raw[1] == ":"):
            _refuse(shown, "is an absolute path")
        is_dir = raw.endswith("/")
        parts = raw.rstrip("/").split("/") if raw.rstrip("/") else []
        if not parts:
            _refuse(shown, "has an empty name")
        if ".." in parts:
            _refuse(shown, "escapes the archive root")
        if any(p in ("", ".") for p in parts):
            _refuse(shown, "has an empty or '.' path component")
        if any(ord(c) < 0x20 for c in raw):
            _refuse(shown, "has a control character in its name")
        if any(len(p.encode("utf-8", "surrogateescape")) > _MAX_COMPONENT_BYTES for p in parts):
            _refuse(shown, f"has a name component over {_MAX_COMPONENT_BYTES} bytes")
        if len(raw.encode("utf-8", "surrogateescape")) > _MAX_PATH_BYTES:
            _refuse(shown, f"has a path over {_MAX_PATH_BYTES} bytes")
        if info.flag_bits & _FLAG_ENCRYPTED:
            _refuse(shown, "is encrypted (the server has no password to read it)")
        mode = info.external_attr >> 16
        if mode:
            if stat.S_ISLNK(mode):
                _refuse(shown, "is a symbolic link")
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
                _refuse(shown, "is a device file")
            if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
                _refuse(shown, "is a FIFO or socket")
            if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                _refuse(shown, "is not a regular file or directory")
            if stat.S_ISDIR(mode):
                is_dir = True
        path = "/".join(parts)
        folded = path.casefold()
        if folded in seen:
            other = seen[folded]
            if other == path:
                _refuse(shown, "appears twice")
            _refuse(shown, f"differs only in letter case from {other!r}")
        seen[folded] = path
        if any(p in _DROPPED_DIRS for p in parts):
            continue
        if is_dir:
            dirs.add(path)
        else:
            files.add(path)
            keep.append(info)
    # A name used both as a file and as a folder cannot be extracted faithfully.
    for path in files:
        parts = path.split("/")
        for i in range(1, len(parts)):
            prefix = "/".join(parts[:i])
            if prefix in files:
                _refuse(path, f"is inside {prefix!r}, which is a file")
        if path in dirs:
            _refuse(path, "is both a file and a folder")
    return keep


def _extract(zf: zipfile.ZipFile, infos: list[zipfile.ZipInfo], dest: Path,
             lim: ArchiveLimits) -> None:
    total = 0
    for info in infos:
        try:
            total = _extract_one(zf, info, dest, lim, total)
        except OSError as exc:
            raise _os_error(info.orig_filename, exc) from exc
        except RuntimeError as exc:  # zipfile's word for "encrypted" and a few other refusals
            _refuse(info.orig_filename, f"cannot be read: {exc}")


def _extract_one(zf: zipfile.ZipFile, info: zipfile.ZipInfo, dest: Path, lim: ArchiveLimits,
                 total: int) -> int:
    """Extract one checked entry; return the running total of bytes written."""
    target = dest.joinpath(*info.orig_filename.split("/"))
    target.parent.mkdir(parents=True, exist_ok=True)
    size = 0
    compressed = max(info.compress_size, 1)
    # O_EXCL|O_NOFOLLOW: the checks above rule out links and duplicates; this makes sure.
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as out, zf.open(info) as src:
        while chunk := src.read(_CHUNK):
            size += len(chunk)
            total += len(chunk)
            if size > lim.max_file_bytes:
                raise TooLargeError(
                    f"archive entry {info.orig_filename!r} expands past "
                    f"{lim.max_file_bytes // (1024 * 1024)} MiB",
                    {"entry": info.orig_filename, "limit": lim.max_file_bytes},
                )
            if total > lim.max_total_bytes:
                raise TooLargeError(
                    f"archive expands past {lim.max_total_bytes // (1024 * 1024)} MiB "
                    f"(at entry {info.orig_filename!r})",
                    {"entry": info.orig_filename, "limit": lim.max_total_bytes},
                )
            if size > lim.ratio_floor_bytes and size > compressed * lim.max_ratio:
                raise TooLargeError(
                    f"archive entry {info.orig_filename!r} has a compression ratio over "
                    f"{lim.max_ratio}:1 (a zip bomb?)",
                    {"entry": info.orig_filename, "limit": lim.max_ratio},
                )
            out.write(chunk)
    return total


def _os_error(name: str, exc: OSError) -> FnError:
    """An extraction failure, named by the entry and never by the server path."""
    shown = _shown(name)
    why = exc.strerror or type(exc).__name__
    if exc.errno in _RESOURCE_ERRNOS:
        return ResourceExhaustedError(
            f"could not extract archive entry {shown!r}: {why}", {"entry": shown}
        )
    return InvalidArgumentError(f"archive entry {shown!r} cannot be extracted: {why}", {"entry": shown})


def _shown(name: str) -> str:
    return name if len(name) <= _SHOWN_CHARS else name[:_SHOWN_CHARS] + "..."


def _refuse(name: str, why: str) -> NoReturn:
    shown = _shown(name)
    raise InvalidArgumentError(f"archive entry {shown!r} {why}", {"entry": shown})
