"""Running one toolchain command: through the box launcher, own process group, capped output.

Every command starts as ``python -I -S _box.py <config>`` (see :mod:`._box`): the launcher sets
the limits and, when a :class:`Box` is given, builds the namespaces and mounts and drops to the
build uid before it execs the tool, so nothing runs between ``fork`` and ``exec`` in the
server's own (multi-threaded) process.

The deadline is the caller's (an ``asyncio.timeout`` around the whole build): when it fires the
awaiting task is cancelled, and cancellation here kills the command's whole process group, so
the compiler processes go spawns die with it (and, in a box, the pid namespace ends with its
first process: the kernel kills everything else in it).
"""

from __future__ import annotations

import asyncio
import contextlib
import marshal
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from fnserver.protocol import InternalError

__all__ = ["BOX_FAILED", "Box", "BoxError", "ProcResult", "run_tool"]

# Compiler output past this is dropped (still drained, so the compiler never blocks on a pipe).
MAX_LOG_BYTES: Final = 256 * 1024
_FSIZE_LIMIT: Final = 1024 * 1024 * 1024
#: Processes one build uid may have (go runs a compiler per package, a few at a time).
BUILD_NPROC: Final = 512
#: Toolchains run this much nicer than the serving processes' event loops (as guest threads
#: do): under a full machine a build waits, an invocation does not.
BUILD_NICE: Final = 10
#: The launcher's status when it could not set the box up (its message is in the error pipe).
BOX_FAILED: Final = 125
_LAUNCHER: Final = str(Path(__file__).with_name("_box.py"))
#: Device files a toolchain opens; nothing else of /dev is in the box.
BOX_DEVICES: Final = ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom")


@dataclass(frozen=True)
class ProcResult:
    """Exit status and combined stdout+stderr of one command."""

    returncode: int
    output: str


@dataclass(frozen=True)
class Box:
    """What one boxed command sees and who it runs as (see :mod:`._box`)."""

    #: An empty host directory the box's tmpfs root is mounted on (in the box's namespace).
    root: Path
    #: (host path, path inside, writable): directories or files bound in at that path.
    binds: tuple[tuple[str, str, bool], ...]
    #: (host cache dir, path inside): read-only below a per-build writable tmpfs layer.
    overlays: tuple[tuple[str, str], ...] = ()
    #: An empty host directory the writable layers' tmpfs is mounted on.
    overlay_dir: Path | None = None
    overlay_size_mb: int = 1024
    #: The unprivileged uid/gid to run as; None keeps root (the server's own warm-up build).
    uid: int | None = None
    gid: int | None = None
    #: The build's memory cgroup's ``cgroup.procs``: when set, memory is counted there and
    #: no RLIMIT_AS applies (it limits address space, not memory).
    cgroup_procs: str | None = None
    umask: int = 0o022


def _config(argv: Sequence[str], cwd: Path, env: Mapping[str, str], memory_bytes: int,
            box: Box | None, errfd: int) -> str:
    rlimits: dict[str, int] = {"CORE": 0, "FSIZE": _FSIZE_LIMIT}
    if box is None or box.cgroup_procs is None:
        rlimits["AS"] = memory_bytes
    cfg: dict[str, Any] = {
        "argv": list(argv),
        "env": dict(env),
        "cwd": str(cwd),
        "errfd": errfd,
        "rlimits": rlimits,
        "nice": BUILD_NICE,
        "box": box is not None,
    }
    if box is not None:
        if box.uid is not None:
            rlimits["NPROC"] = BUILD_NPROC
        cfg.update(
            root=str(box.root),
            binds=[list(b) for b in box.binds],
            overlays=[list(o) for o in box.overlays],
            overlay_dir=str(box.overlay_dir) if box.overlay_dir is not None else None,
            overlay_size=f"{box.overlay_size_mb}m",
            devices=list(BOX_DEVICES),
            uid=box.uid,
            gid=box.gid,
            cgroup_procs=box.cgroup_procs,
            umask=box.umask,
        )
    return marshal.dumps(cfg).hex()


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _read_error(fd: int) -> bytes:
    try:
        return os.read(fd, 4096)
    except BlockingIOError:  # someone still holds the write end: no report
        return b""


async def run_tool(argv: Sequence[str], *, cwd: Path, env: Mapping[str, str],
                   memory_bytes: int, box: Box | None = None) -> ProcResult:
    """Run ``argv`` to completion (boxed when ``box`` is given); on cancellation kill its
    process group and re-raise. Raises :class:`BoxError` (INTERNAL) if the box could not be set up."""
    rfd, wfd = os.pipe()
    os.set_blocking(rfd, False)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-I", "-S", _LAUNCHER,
            _config(argv, cwd, env, memory_bytes, box, wfd),
            cwd="/",
            env={},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
            pass_fds=(wfd,),
        )
    except BaseException:
        os.close(rfd)
        raise
    finally:
        os.close(wfd)
    # start_new_session made the launcher a session and group leader: pgid == pid.
    pgid = proc.pid
    try:
        buf = bytearray()
        assert proc.stdout is not None
        while chunk := await proc.stdout.read(65536):
            if len(buf) < MAX_LOG_BYTES:
                buf += chunk[: MAX_LOG_BYTES - len(buf)]
        rc = await proc.wait()
        failed = _read_error(rfd) if rc == BOX_FAILED else b""
    except BaseException:
        # Cancelled (deadline) or failed: the whole group goes, then we reap the leader so no
        # zombie and no orphaned compiler outlives the build.
        _kill_group(pgid)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await asyncio.shield(proc.wait())
        raise
    finally:
        os.close(rfd)
    # go waits for its children, but a crashed toolchain may leave some behind.
    _kill_group(pgid)
    if failed:
        # Our own set-up failed, not the user's build: the detail (host paths) is logged by
        # the caller, never sent.
        raise BoxError(failed.decode("utf-8", "replace"))
    text = buf.decode("utf-8", "replace")
    if len(buf) >= MAX_LOG_BYTES:
        text += "\n[output truncated]\n"
    return ProcResult(rc, text)


class BoxError(InternalError):
    """The build box could not be set up on this host (the server's fault, not the upload's).

    The message a client sees is fixed; :attr:`detail` holds the launcher's own words (host
    paths), for the server's log only."""

    def __init__(self, detail: str) -> None:
        super().__init__("the build sandbox could not be set up on this server")
        self.detail = detail
