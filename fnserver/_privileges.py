"""A serving process gives up root before it serves (docs/OPERATIONS.md, "Least privilege").

Serving processes run wasm guests in their own address space. If one ever escaped wasmtime,
it should find a process that can change nothing that outlives it: no capability, no write
access to the store or the module cache, no way to signal or trace another process of the
server. So, when started as root, a serving process:

1. claims a uid of its own from the sandbox range (never shared with a worker, a build, another
   serving process or another server: the same flock-held claim the workers use);
2. opens the data directory and the module cache directory while still root, and from then on
   reaches them through those descriptors (``/proc/self/fd/N``), so directories above them may
   stay private to root (a 0700 home, pytest's temporary directories);
3. reaches ``sys.path`` the same way, so later imports still work when the interpreter is
   installed under a private home;
4. drops every group, its gid and uid to the claimed one (which clears every capability) and
   sets ``no_new_privs``. Being non-dumpable after the change, it cannot be traced by the
   other uids' processes either.

The store's files are root's, 0644 in 0755 directories: readable, never writable, from here.
Not root: nothing changes (no other uid to go to).
"""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final

from ._lifeline import die_with_parent
from .config import ServerConfig
from .exec._sandbox import claim_uids, hold_import_path

__all__ = ["Dropped", "drop_root"]

log = logging.getLogger("fnserver")

_PR_SET_NO_NEW_PRIVS: Final = 38


@dataclass(frozen=True)
class Dropped:
    """What the drop left this process: its config (paths through held descriptors), its uid
    (None when it was not root) and the descriptors it must keep open for its life."""

    config: ServerConfig
    uid: int | None
    keep: tuple[int, ...]


def drop_root(config: ServerConfig) -> Dropped:
    """Claim a uid, hold the store's directories open, become that uid (see module docs)."""
    if os.geteuid() != 0:
        return Dropped(config, None, ())
    parent = os.getppid()
    uids, locks = claim_uids(1)
    uid = uids[0]
    data_fd = os.open(config.data_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    modules_fd = os.open(config.modules_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    held = [data_fd, modules_fd]
    if config.auth_file is not None:
        # The auth file is read again before every request (a revoke applies at once): hold
        # its directory, which may be private to root, like the data directory's.
        auth_fd = os.open(config.auth_file.absolute().parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        held.append(auth_fd)
        config = replace(config, auth_file=Path(f"/proc/self/fd/{auth_fd}") / config.auth_file.name)
    config = replace(
        config,
        data_dir=Path(f"/proc/self/fd/{data_fd}"),
        compile_cache_dir=Path(f"/proc/self/fd/{modules_fd}"),
        build_cache_dir=None,
    )
    path_fds = hold_import_path()
    os.chdir("/")
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    die_with_parent(parent)  # the uid change disarmed what the supervisor armed
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
    # root's home is not ours any more: libraries that look there (asyncpg, for client
    # certificates in ~/.postgresql) would fail on a permission instead of finding nothing.
    os.environ["HOME"] = "/nonexistent"
    log.info("serving process %d runs as uid %d, without capabilities", os.getpid(), uid)
    return Dropped(config, uid, (*locks, *held, *path_fds))

