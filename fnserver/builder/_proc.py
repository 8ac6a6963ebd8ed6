"""Running one toolchain command: own process group, rlimits, capped output, killed on exit.

The deadline is the caller's (an ``asyncio.timeout`` around the whole build): when it fires the
awaiting task is cancelled, and cancellation here kills the command's whole process group, so
the compiler processes go spawns die with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = ["ProcResult", "run_tool"]

# Compiler output past this is dropped (still drained, so the compiler never blocks on a pipe).
MAX_LOG_BYTES: Final = 256 * 1024
_FSIZE_LIMIT: Final = 1024 * 1024 * 1024


@dataclass(frozen=True)
class ProcResult:
    """Exit status and combined stdout+stderr of one command."""

    returncode: int
    output: str


def _limits(memory_bytes: int) -> Callable[[], None]:
    def apply() -> None:
        # Runs in the child between fork and exec, so the limits hold before the toolchain
        # starts and every process it spawns inherits them (prlimit after spawn leaves a window
        # in which go may already have forked its compilers).
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_FSIZE, (_FSIZE_LIMIT, _FSIZE_LIMIT))

    return apply


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


async def run_tool(argv: Sequence[str], *, cwd: Path, env: Mapping[str, str],
                   memory_bytes: int) -> ProcResult:
    """Run ``argv`` to completion; on cancellation kill its process group and re-raise."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        env=dict(env),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=_limits(memory_bytes),
    )
    # start_new_session made the child a session and group leader: pgid == pid.
    pgid = proc.pid
    try:
        buf = bytearray()
        assert proc.stdout is not None
        while chunk := await proc.stdout.read(65536):
            if len(buf) < MAX_LOG_BYTES:
                buf += chunk[: MAX_LOG_BYTES - len(buf)]
        rc = await proc.wait()
    except BaseException:
        # Cancelled (deadline) or failed: the whole group goes, then we reap the leader so no
        # zombie and no orphaned compiler outlives the build.
        _kill_group(pgid)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await asyncio.shield(proc.wait())
        raise
    # go waits for its children, but a crashed toolchain may leave some behind.
    _kill_group(pgid)
    text = buf.decode("utf-8", "replace")
    if len(buf) >= MAX_LOG_BYTES:
        text += "\n[output truncated]\n"
    return ProcResult(rc, text)
