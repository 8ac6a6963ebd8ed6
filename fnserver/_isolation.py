"""Host isolation helpers shared by the exec workers and the build box.

Both run untrusted work under dedicated uids and memory cgroups; the uids come from one range,
claimed through one lock directory, so a worker's uid is never a build's, nor another server's.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from typing import Final

__all__ = ["MEMCG_ROOT", "SANDBOX_UID_BASE", "SANDBOX_UID_COUNT", "claim_uids", "memcg_dir"]

SANDBOX_UID_BASE: Final = 60000
SANDBOX_UID_COUNT: Final = 2000
MEMCG_ROOT: Final = "/sys/fs/cgroup/memory"


def claim_uids(count: int) -> tuple[list[int], list[int]]:
    """Claim ``count`` sandbox uids for one pool (or one builder); return them and the lock fds to keep open.

    A worker kills every process of its uid (``kill(-1)``), so two pools on one host (two
    servers, or tests) must never share a uid: each uid is held by an flock on a lock file in
    a root-only directory for the life of the pool. Empty lists when not root.
    """
    if os.geteuid() != 0:
        return [], []
    lock_dir = os.path.join(tempfile.gettempdir(), "fnserver-exec-uids")
    os.makedirs(lock_dir, mode=0o700, exist_ok=True)
    st = os.lstat(lock_dir)
    if st.st_uid != 0 or st.st_mode & 0o077:
        raise PermissionError(f"{lock_dir} must be a root-owned 0700 directory")
    uids: list[int] = []
    fds: list[int] = []
    for uid in range(SANDBOX_UID_BASE, SANDBOX_UID_BASE + SANDBOX_UID_COUNT):
        if len(uids) == count:
            break
        fd = os.open(os.path.join(lock_dir, str(uid)), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        uids.append(uid)
        fds.append(fd)
    if len(uids) < count:
        for fd in fds:
            os.close(fd)
        raise OSError(f"no free sandbox uid in {SANDBOX_UID_BASE}+{SANDBOX_UID_COUNT}")
    return uids, fds


def memcg_dir(uid: int) -> str | None:
    """Where the memory cgroup of the worker (or build) with ``uid`` lives, under this
    process's own memory cgroup (v1); None when the host has none. A worker's ``call`` child
    is its native call's."""
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                if "memory" in controllers.split(","):
                    base = MEMCG_ROOT + ("" if path == "/" else path)
                    return f"{base}/fnserver-{uid}" if os.path.isdir(base) else None
    except (OSError, ValueError):
        pass
    return None
