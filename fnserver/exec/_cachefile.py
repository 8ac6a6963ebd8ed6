"""Names and checks of compiled-module files in the node's module cache (both sides).

A compiled module is native code: whoever can write one can run code in every worker that
loads it. So the files belong to the node, not to a function version: they live in one cache
directory owned by the server uid (0755, files 0644), are written only by the pool after a
compile in a separate process, and each file's name records what its bytes hash to::

    <artifact sha256>.<engine key>.<sha256 of the compiled bytes>.cwasm

The artifact digest and the engine key say what was compiled with which settings; the last
part is checked by the worker before it deserializes (:func:`open_verified`), so a file
that changed after it was written is refused, never loaded. A name carries its own check,
so there is no sidecar to keep in step with the file (two writes cannot be one rename).
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from typing import Final

__all__ = [
    "DIGEST_RE",
    "ModuleMismatch",
    "module_file_name",
    "open_verified",
    "parse_module_file_name",
]

DIGEST_RE: Final = re.compile(r"^[0-9a-f]{64}$")
_NAME_RE: Final = re.compile(r"^([0-9a-f]{64})\.([0-9a-f]{16})\.([0-9a-f]{64})\.cwasm$")
_HASH_CHUNK: Final = 1 << 20


class ModuleMismatch(Exception):
    """The compiled-module file is missing, not a regular file, or not the bytes recorded."""


def module_file_name(digest: str, engine_key: str, cwasm_sha256: str) -> str:
    """The cache file name of ``digest`` compiled by engine ``engine_key``."""
    name = f"{digest}.{engine_key}.{cwasm_sha256}.cwasm"
    if _NAME_RE.match(name) is None:
        raise ValueError(f"not a module cache key: {digest!r}, {engine_key!r}, {cwasm_sha256!r}")
    return name


def parse_module_file_name(name: str) -> tuple[str, str, str] | None:
    """(artifact digest, engine key, compiled sha256) of a cache file name, or None."""
    m = _NAME_RE.match(name)
    return None if m is None else (m[1], m[2], m[3])


def open_verified(directory: str, name: str, engine_key: str, expected_sha256: str) -> int:
    """Open a cache file read-only and check it before anyone maps it; return the fd.

    The caller deserializes through ``/proc/self/fd/<fd>``: the checked inode is the one
    loaded, whatever happens to the name meanwhile. Raises :class:`ModuleMismatch`.
    """
    parsed = parse_module_file_name(name)
    if parsed is None or parsed[1] != engine_key or parsed[2] != expected_sha256:
        raise ModuleMismatch(f"{name!r} is not a module file of engine {engine_key}")
    try:
        fd = os.open(os.path.join(directory, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise ModuleMismatch(f"cannot open {name}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ModuleMismatch(f"{name} is not a regular file")
        h = hashlib.sha256()
        while chunk := os.read(fd, _HASH_CHUNK):
            h.update(chunk)
        if h.hexdigest() != expected_sha256:
            raise ModuleMismatch(f"{name}: its bytes do not match the recorded sha256")
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd
