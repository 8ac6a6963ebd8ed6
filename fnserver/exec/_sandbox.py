"""Worker-process hardening on Linux, all through ctypes and best effort.

Runs once at worker start, before any guest code. Each step is applied where the host allows
and recorded in :class:`SandboxInfo` otherwise; nothing here raises on a refusing host.

Order matters:
1. child subreaper: every process a native binary leaves behind (even after ``setsid``) is
   reparented to the worker, which kills and reaps them after each call;
2. ``unshare(CLONE_NEWNET)`` (needs CAP_SYS_ADMIN, so before dropping root): native binaries
   get a network namespace of their own with nothing but a loopback, brought up so that a
   program may talk to itself over 127.0.0.1;
3. when root, ``unshare(CLONE_NEWNS)``: a private ``/tmp``, ``/var/tmp``, ``/dev/shm`` and a
   ``/proc`` showing only the worker's uid (:func:`_private_mounts`); and a memory cgroup of
   the worker's own, whose ``call`` group its native calls are born in (:func:`_memory_cgroup`);
4. hard rlimits on the worker itself, inherited by native children from their first
   instruction (NOFILE, CORE, FSIZE, NPROC); per-call limits are lowered further with
   ``prlimit`` right after spawn;
5. when root: drop to a dedicated uid/gid (claimed by the pool, see :func:`claim_uids`) so
   RLIMIT_NPROC is enforced (root ignores it) and ``kill(-1, SIGKILL)`` reaches exactly this
   worker's leftovers. The worker writes no file outside its private ``/tmp``. It keeps
   CAP_DAC_READ_SEARCH only (read and search, never write), to open artifacts under a data
   directory the server may keep private (pytest's 0700 temp dirs, a 0700 data dir);
   ``no_new_privs`` plus a non-zero uid means a native child's execve clears every
   capability, so native code never has it;
6. parent-death signal, so a dead server leaves no worker behind (set after the uid change,
   which would clear it).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import resource
import shutil
import signal
import socket
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from .._isolation import SANDBOX_UID_BASE, SANDBOX_UID_COUNT, claim_uids, memcg_dir

__all__ = [
    "SANDBOX_UID_BASE",
    "SANDBOX_UID_COUNT",
    "SandboxInfo",
    "claim_uids",
    "kill_descendants",
    "setup_worker",
]

_PR_SET_PDEATHSIG: Final = 1
_PR_SET_KEEPCAPS: Final = 8
_PR_SET_CHILD_SUBREAPER: Final = 36
_PR_SET_NO_NEW_PRIVS: Final = 38
_CLONE_NEWNET: Final = 0x40000000
_CLONE_NEWNS: Final = 0x00020000
_MS_NOSUID: Final = 0x2
_MS_NODEV: Final = 0x4
_MS_NOEXEC: Final = 0x8
_MS_REC: Final = 0x4000
_MS_REMOUNT: Final = 0x20
_MS_PRIVATE: Final = 0x40000
_SIOCGIFFLAGS: Final = 0x8913
_SIOCSIFFLAGS: Final = 0x8914
_IFF_UP: Final = 0x1
_CAP_VERSION_3: Final = 0x20080522
_CAP_DAC_READ_SEARCH: Final = 2

#: Worker hard limits, inherited by native children before prlimit narrows them.
WORKER_NOFILE: Final = 256
WORKER_FSIZE: Final = 1 << 30  # bounds the output memfds between calls
WORKER_AS: Final = 8 << 30  # backstop for the worker itself; its binaries get per-call limits
#: The worker's private scratch file systems (what native calls may write, wiped after each).
PRIVATE_TMP: Final = ("/tmp", "/var/tmp", "/dev/shm")
PRIVATE_TMP_SIZE: Final = "64m"
#: What of the host's root stays in view of native calls: the system (programs, libraries,
#: ``/etc``), devices and kernel interfaces. Every other top-level directory (homes,
#: checkouts, ``/opt``, ``/srv``, ``/mnt``, ``/var`` and ``/run``) is covered by an empty one.
HOST_KEEP: Final = frozenset({"bin", "sbin", "lib", "lib32", "lib64", "libx32", "usr", "etc",
                              "dev", "proc", "sys", "tmp"})
#: The worker's environment variable naming the directories to hide (os.pathsep-joined).
HIDDEN_ENV: Final = "FNSERVER_HIDDEN"
_MS_RDONLY: Final = 0x1

_libc = ctypes.CDLL(None, use_errno=True)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


@dataclass
class SandboxInfo:
    """What the worker managed to apply; reported to the parent in the ready frame."""

    uid: int | None = None  # dedicated uid when dropped from root, else None
    subreaper: bool = False
    netns: bool = False
    refused: list[str] = field(default_factory=list)
    #: The private /tmp, /var/tmp, /dev/shm and hidepid /proc are in place (this side only).
    private_tmp: bool = False
    #: An O_PATH descriptor of the host's "/" from before those mounts (this side only).
    host_root: int | None = None
    #: The worker's memory cgroup (v1), when the host has one (this side only).
    memcg: MemoryCgroup | None = None

    @property
    def nproc_enforced(self) -> bool:
        return self.uid is not None


def _prctl(option: int, arg: int) -> bool:
    return _libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0) == 0


def _errno() -> str:
    return os.strerror(ctypes.get_errno())


def worker_nproc() -> int:
    """Hard RLIMIT_NPROC of a worker: its own threads (wasmtime compiles on one per CPU)
    plus room for the processes a native call may start."""
    return 64 + 4 * (os.cpu_count() or 1)


def _loopback_up() -> None:
    """Bring up ``lo`` in this (new) network namespace: a program may talk to itself over
    127.0.0.1 and nothing else (needs CAP_NET_ADMIN, held before the uid drop)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        req = struct.pack("16sH", b"lo", 0)
        flags = struct.unpack("16sH", fcntl.ioctl(sock, _SIOCGIFFLAGS, req)[:18])[1]
        fcntl.ioctl(sock, _SIOCSIFFLAGS, struct.pack("16sH", b"lo", flags | _IFF_UP))


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    if _libc.mount(
        source and source.encode(), target.encode(), fstype and fstype.encode(),
        ctypes.c_ulong(flags), data and data.encode(),
    ) != 0:
        raise OSError(ctypes.get_errno(), f"mount {target}: {_errno()}")


def _private_mounts(uid: int, scratch: str, hidden: tuple[str, ...]) -> None:
    """A mount namespace of the worker's own: empty, size-capped ``/tmp``, ``/var/tmp`` and
    ``/dev/shm`` (nothing a native call writes there reaches the host or the next call: the
    worker wipes them after each call, and they vanish with the worker), and a ``/proc`` that
    shows only this uid's processes (``hidepid``: not the server, its command line, or any
    other process of the host). Each ``hidden`` directory (the store, the build and module
    caches) is covered by an empty read-only file system: the worker reaches artifacts only
    through its handle on the host's tree (``SandboxInfo.host_root``), taken before. The
    worker's scratch directory is made again inside the new ``/tmp``."""
    if _libc.unshare(_CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), f"unshare(CLONE_NEWNS): {_errno()}")
    # Mounts made here must not propagate back to the host.
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE, None)
    for name in sorted(os.listdir("/")):
        target = "/" + name
        if name not in HOST_KEEP | {"var"} and os.path.isdir(target) and not os.path.islink(target):
            _mount("tmpfs", target, "tmpfs", _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC,
                   "size=4k,mode=0755")
    if os.path.isdir("/var") and not os.path.islink("/var"):  # but a private /var/tmp, below
        _mount("tmpfs", "/var", "tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, "size=4k,mode=0755")
        os.mkdir("/var/tmp", 0o1777)
        _mount("tmpfs", "/var", "tmpfs",
               _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, "size=4k,mode=0755")
    for target in PRIVATE_TMP:
        if os.path.isdir(target):
            _mount("tmpfs", target, "tmpfs", _MS_NOSUID | _MS_NODEV,
                   f"size={PRIVATE_TMP_SIZE},mode=1777")
    _mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, "hidepid=invisible")
    for target in hidden:
        if os.path.isdir(target):  # one under /tmp is out of sight already
            _mount("tmpfs", target, "tmpfs", _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC,
                   "size=4k,mode=0555")
    os.makedirs(scratch, mode=0o700, exist_ok=True)
    os.chown(scratch, uid, uid)


@dataclass(frozen=True)
class MemoryCgroup:
    """Descriptors on the worker's memory cgroup files, opened while still root: writing
    through them needs no permission on the files, which stay root's, so a native call
    (the worker's uid) can neither lift its limit nor leave its group."""

    path: str
    call_procs: int
    #: The path of that ``cgroup.procs``, for reading: whatever a call left behind is listed
    #: there. Opened afresh for each read: cgroup v1 keeps a pid list per open file for a
    #: second or so, so a descriptor read again would show a stale list.
    call_members: str
    own_procs: int
    call_limit: int
    call_oom: int


def _memory_cgroup(uid: int) -> MemoryCgroup:
    """Put this (worker) process in a memory cgroup of its own with a ``call`` child group.
    The worker steps into ``call`` just for the spawn, so a native call is born there:
    everything it and its descendants touch, shared mappings and page cache included,
    counts against the call's limit from its first instruction, and the OOM killer of that
    group reaches the call alone."""
    d = memcg_dir(uid)
    if d is None:
        raise OSError(0, "no memory cgroup")
    call = os.path.join(d, "call")
    os.makedirs(call, exist_ok=True)
    flags = os.O_CLOEXEC
    group = MemoryCgroup(
        path=d,
        call_procs=os.open(os.path.join(call, "cgroup.procs"), os.O_WRONLY | flags),
        call_members=os.path.join(call, "cgroup.procs"),
        own_procs=os.open(os.path.join(d, "cgroup.procs"), os.O_WRONLY | flags),
        call_limit=os.open(os.path.join(call, "memory.limit_in_bytes"), os.O_WRONLY | flags),
        call_oom=os.open(os.path.join(call, "memory.oom_control"), os.O_RDONLY | flags),
    )
    os.write(group.own_procs, str(os.getpid()).encode())
    return group


def hold_import_path() -> list[int]:
    """Reach ``sys.path`` through held descriptors (``/proc/self/fd/N``): the standard library
    imports lazily, and the interpreter may live where this process will not see it any more
    (a home directory covered by the mount namespace, or under a 0700 /root after a uid
    drop). Reading is all the descriptors allow; they are close-on-exec."""
    held: list[int] = []
    moved: dict[str, str] = {}
    for i, entry in enumerate(sys.path):
        path = entry or os.getcwd()
        if path.startswith("/proc/self/fd/") or not os.path.isdir(path):
            continue
        fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        held.append(fd)
        sys.path[i] = f"/proc/self/fd/{fd}"
        moved[os.path.join(path, "")] = f"/proc/self/fd/{fd}/"
    # Packages imported already find their submodules through their own __path__ (``email``
    # imported, ``email.policy`` not yet): point those at the held directories too.
    for module in list(sys.modules.values()):
        paths = getattr(module, "__path__", None)
        if not isinstance(paths, list):
            continue
        for j, where in enumerate(paths):
            for old, new in moved.items():
                if isinstance(where, str) and where.startswith(old):
                    paths[j] = new + where[len(old):]
                    break
    sys.path_importer_cache.clear()
    return held


def wipe_private_tmp(keep: str, keep_inside: str | None = None) -> None:
    """Remove everything a call left in the private scratch file systems: all but ``keep``,
    the worker's own scratch directory, and in it all but ``keep_inside`` (the next call's
    directory, checked empty before it is used)."""
    with contextlib.suppress(OSError):
        for name in os.listdir(keep):
            path = os.path.join(keep, name)
            if path != keep_inside:
                _remove(path)
    for root in PRIVATE_TMP:
        try:
            if root != "/tmp":  # the scratch directory lives in /tmp: it is never empty
                st = os.statvfs(root)
                if st.f_files - st.f_ffree <= 1:
                    continue  # a tmpfs holding only its root: nothing was written (one syscall)
            entries = os.listdir(root)
        except OSError:
            continue
        for name in entries:
            path = os.path.join(root, name)
            if path != keep:
                _remove(path)


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        if os.path.isdir(path) and not os.path.islink(path):
            with contextlib.suppress(OSError):
                os.chmod(path, 0o700)  # a call may have locked its own directory
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)


def setup_worker(
    uid: int | None, scratch: str | None = None, hidden: tuple[str, ...] = ()
) -> SandboxInfo:
    """Harden the current (worker) process; see the module docstring.

    ``uid`` is the dedicated uid to drop to when running as root (None: stay as is);
    ``scratch`` its scratch directory, made again inside its private ``/tmp``; ``hidden`` the
    directories native calls must not see.
    """
    info = SandboxInfo()
    info.subreaper = _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    if not info.subreaper:
        info.refused.append(f"subreaper: {_errno()}")
    if _libc.unshare(_CLONE_NEWNET) == 0:
        info.netns = True
        try:
            _loopback_up()
        except OSError as exc:
            info.refused.append(f"loopback up: {exc.strerror}")
    else:
        info.refused.append(f"unshare(CLONE_NEWNET): {_errno()}")
    if os.geteuid() == 0 and uid is not None and scratch is not None:
        try:
            # The host's file tree as it was before the new mounts, for the worker alone
            # (close-on-exec; a non-dumpable worker's fds are closed to its children's
            # /proc/<pid>/fd): artifacts under a host /tmp stay reachable to it.
            info.host_root = os.open("/", os.O_PATH | os.O_CLOEXEC)
            hold_import_path()
            _private_mounts(uid, scratch, hidden)
            info.private_tmp = True
        except OSError as exc:
            info.refused.append(f"private mounts: {exc.strerror}")
    if os.geteuid() == 0 and uid is not None:
        try:
            info.memcg = _memory_cgroup(uid)
        except OSError as exc:
            info.refused.append(f"memory cgroup: {exc.strerror or exc} ({exc.filename})")
    # Writes past a cap must fail with EFBIG in the worker, not kill it.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    limits = [
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_NOFILE, WORKER_NOFILE),
        (resource.RLIMIT_FSIZE, WORKER_FSIZE),
        (resource.RLIMIT_AS, WORKER_AS),
    ]
    root = os.geteuid() == 0 and uid is not None
    if root:
        limits.append((resource.RLIMIT_NPROC, worker_nproc()))
    for which, value in limits:
        soft, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        try:
            resource.setrlimit(which, (value, value))
        except (OSError, ValueError) as exc:
            info.refused.append(f"setrlimit({which}): {exc}")
    if root and uid is not None:
        _drop_root(uid, info)
    if not _prctl(_PR_SET_NO_NEW_PRIVS, 1):
        info.refused.append(f"no_new_privs: {_errno()}")
    if not _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL):
        info.refused.append(f"pdeathsig: {_errno()}")
    if info.uid is not None:
        # Leftovers of a previous worker in this slot run under this uid: kill them now.
        kill_descendants(info, startup=True)
    return info


def _drop_root(uid: int, info: SandboxInfo) -> None:
    try:
        if not _prctl(_PR_SET_KEEPCAPS, 1):
            raise OSError(ctypes.get_errno(), "PR_SET_KEEPCAPS: " + _errno())
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    except OSError as exc:
        info.refused.append(f"drop to uid {uid}: {exc}")
        return
    info.uid = uid
    header = _CapHeader(_CAP_VERSION_3, 0)
    data = (_CapData * 2)()
    data[0].effective = data[0].permitted = 1 << _CAP_DAC_READ_SEARCH
    if _libc.capset(ctypes.byref(header), data) != 0:
        info.refused.append(f"capset(CAP_DAC_READ_SEARCH): {_errno()} (artifact reads may fail)")
    _prctl(_PR_SET_KEEPCAPS, 0)


def _reap_dead() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _children() -> list[int]:
    pids: list[int] = []
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return pids
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/children") as f:
                pids.extend(int(p) for p in f.read().split())
        except OSError:
            continue
    return pids


def kill_descendants(info: SandboxInfo, *, startup: bool = False) -> int:
    """SIGKILL and reap every remaining descendant; return how many rounds it took.

    The worker is a child subreaper, so once a native binary has been waited for, anything it
    left behind (even after ``setsid`` or a double fork) is in the worker's subtree: no
    children means nothing is left, which is the common case and costs one /proc read. Each
    round kills the worker's children one by one and waits for them; what they had forked is
    then the worker's child, for the next round.

    ``startup``: a new worker in a recycled uid slot sends one ``kill(-1)`` for leftovers of its
    predecessor (not its children; the pool also sweeps that uid before starting it), before
    its serving thread is under the seccomp filter that refuses ``kill(-1)``.
    """
    if startup:
        if info.uid is not None:
            with contextlib.suppress(OSError):
                os.kill(-1, signal.SIGKILL)
        return 0
    g = info.memcg
    if g is not None:
        # Every process of a call is born in the call group and cannot leave it: an empty
        # group means nothing is left (one small read, where /proc costs ~100 us). Zombies a
        # call left are reparented here already dead: reaped without waiting.
        try:
            fd = os.open(g.call_members, os.O_RDONLY | os.O_CLOEXEC)
            try:
                alive = os.read(fd, 64)
            finally:
                os.close(fd)
        except OSError:
            alive = b"?"
        if not alive:
            _reap_dead()
            return 0
    for rounds in range(64):
        pids = _children()
        if not pids:
            return rounds
        # One by one: the serving thread's seccomp filter (_seccomp.py) refuses kill(-1), so
        # that no native call can aim it at the worker. What a killed process had forked is
        # reparented to the worker (the subreaper) and ends in the next round.
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        for pid in pids:  # these die now; a blocking wait on any child might wait on a live one
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
    return 64


def child_env() -> dict[str, str]:
    """The whole environment of a worker or compile process: nothing of the server's own
    (no token, no proxy, no secrets), only what Python needs to import fnserver and fnclient
    from wherever they are installed."""
    import fnclient

    import fnserver

    roots = dict.fromkeys(
        str(Path(pkg.__file__).resolve().parent.parent) for pkg in (fnserver, fnclient) if pkg.__file__
    )
    return {
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "PYTHONPATH": os.pathsep.join(roots),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
