"""File helpers shared by the stores: durable atomic writes, digests, error wording.

Everything here blocks; callers run it in a worker thread (``asyncio.to_thread``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import mmap
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Final

from fnserver.protocol import FnError, InternalError, ResourceExhaustedError

log = logging.getLogger("fnserver.registry")

TMP_SUFFIX: Final = ".tmp"
_CHUNK: Final = 1 << 20
_ELF_MAGIC: Final = b"\x7fELF"


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``, or None if it is missing or unreadable (logged)."""
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("unreadable %s: %s", path, exc)
        return None
    if not isinstance(data, dict):
        log.warning("unreadable %s: not a JSON object", path)
        return None
    return data


def write_json_atomic(path: Path, obj: dict[str, Any]) -> None:
    """Temp file + fsync + rename + fsync of the directory: readers see old or new, never half."""
    data = json.dumps(obj, indent=2, sort_keys=True).encode() + b"\n"
    tmp = path.with_name(f"{path.name}.{secrets.token_hex(6)}{TMP_SUFFIX}")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove(path: Path) -> None:
    """Remove a file or a directory tree; a missing one is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=False)
    else:
        path.unlink(missing_ok=True)


def staging_prefix() -> str:
    """The name prefix of this process's staging entries: several serving processes share a
    staging area, and one that starts must not remove what a live sibling is building."""
    return f"p{os.getpid()}-"


def _owner_alive(name: str) -> bool:
    head = name.split("-", 1)[0]
    if not (head.startswith("p") and head[1:].isdigit()):
        return False  # not named by an owner: left by an older layout
    pid = int(head[1:])
    if pid == os.getpid():
        return False  # an earlier process that had our pid: this one just started
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_staging(root: Path) -> None:
    """Remove the staging entries under ``root`` whose owner process is gone."""
    if not root.exists():
        return
    for leftover in root.iterdir():
        if not _owner_alive(leftover.name):
            log.info("removing leftover staging entry %s", leftover)
            remove(leftover)


def copy_verified(source: Path, target: Path, digest: str) -> None:
    """Copy ``source`` to the new file ``target`` (0644), checking its sha256 on the way.

    A copy rather than a link: the committed file then shares no inode with anything the
    builder (or whoever wrote ``source``) can still reach. The digest is checked on the bytes
    actually written, so a file that changed under us is refused instead of stored.
    """
    h = hashlib.sha256()
    try:
        with open(source, "rb") as src, open(target, "xb") as dst:
            head = b""
            while chunk := src.read(_CHUNK):
                head = head or chunk[:4]
                h.update(chunk)
                dst.write(chunk)
            dst.flush()
            # Readable by all, written by nobody but the store's owner; an executable (a
            # native artifact, run by the sandbox uids) keeps its execute bits.
            os.fchmod(dst.fileno(), 0o755 if head == _ELF_MAGIC else 0o644)
            os.fsync(dst.fileno())
        if h.hexdigest() != digest:
            raise InternalError(f"artifact changed while it was stored (expected sha256 {digest})")
    except BaseException:
        target.unlink(missing_ok=True)
        raise


#: What the host ran out of: the caller did nothing wrong and nothing was changed, so these get
#: their own wire code (RESOURCE_EXHAUSTED), never INTERNAL.
RESOURCE_ERRNOS: Final = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EMFILE, errno.ENFILE, errno.ENOMEM}
)


def storage_error(what: str, exc: OSError) -> FnError:
    """The error a caller gets when storage failed while trying to ``what`` (no path in it):
    RESOURCE_EXHAUSTED for a full disk or exhausted descriptors, INTERNAL otherwise."""
    if exc.errno in RESOURCE_ERRNOS:
        return ResourceExhaustedError(
            f"could not {what}: {reason(exc)}", {"errno": errno.errorcode.get(exc.errno or 0, "")}
        )
    return InternalError(f"could not {what}: {reason(exc)}")


def reason(exc: BaseException) -> str:
    """Why an operation failed, without the file names an OSError carries (no server paths)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, OSError):
        return type(exc).__name__
    return str(exc) or type(exc).__name__


class GenerationHint:
    """An 8-byte file holding the newest change-feed generation, read through a shared mmap.

    Writers store the number after each change; a reader learns "something changed" with one
    memory read, no system call, so a check can sit on the invoke path. It is only a hint,
    compared for inequality: a torn or stale read costs one needless refresh, never a missed
    one, because the writer stores it after the change is complete and visible.
    """

    SIZE: Final = 8

    def __init__(self, path: Path) -> None:
        self.path = path
        self._map: mmap.mmap | None = None

    def open(self) -> None:
        """Create the file if needed and map it (blocking: call from a thread)."""
        if self._map is not None:
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            writable = True
        except PermissionError:
            # A serving process without write access to the store can still read the hint.
            fd = os.open(self.path, os.O_RDONLY)
            writable = False
        try:
            if writable and os.fstat(fd).st_size < self.SIZE:
                os.ftruncate(fd, self.SIZE)
            self._map = mmap.mmap(fd, self.SIZE, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)

    def close(self) -> None:
        """Unmap; idempotent."""
        m, self._map = self._map, None
        if m is not None:
            m.close()

    def read(self) -> int | None:
        """The generation last stored, or None when not mapped. No I/O."""
        m = self._map
        return None if m is None else int.from_bytes(m[: self.SIZE], "little")

    def store(self, generation: int) -> None:
        """Publish ``generation`` (blocking; the caller holds its store's write lock)."""
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, generation.to_bytes(self.SIZE, "little"), 0)
        finally:
            os.close(fd)
