"""Several serving processes on one port under the supervisor (``fnserver --processes N``).

Real ``python -m fnserver`` processes, real SIGKILLs. Which serving process holds a
connection is the kernel's choice (SO_REUSEPORT); HELLO names it (``pid``), so tests open
connections until they hold the processes they need.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from fnclient import AsyncClient
from fnclient.protocol import FnError, NotFoundError, UnavailableError

from . import wasm_fixtures as wf
from .conftest import start_server_process


class Server:
    """A supervisor process and what it printed."""

    def __init__(self, proc: asyncio.subprocess.Process, address: str) -> None:
        self.proc = proc
        self.address = address
        self.log: list[str] = []
        self._reader = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.log.append(line.decode(errors="replace"))

    async def stop(self) -> int:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(self.proc.wait(), 120)
        await self._reader
        return code


@contextlib.asynccontextmanager
async def supervisor(tmp_path: Path, processes: int) -> AsyncIterator[Server]:
    proc, address = await start_server_process(tmp_path, "--processes", str(processes))
    server = Server(proc, address)
    try:
        yield server
    finally:
        if proc.returncode is None:
            assert await server.stop() == 0


async def clients_on(address: str, pids: int, tries: int = 200) -> dict[int, AsyncClient]:
    """Connected clients, one per serving process, until ``pids`` distinct ones are held
    (the kernel spreads connections by a hash of the client port)."""
    held: dict[int, AsyncClient] = {}
    spare: list[AsyncClient] = []
    for _ in range(tries):
        # A connection the kernel put in the backlog of a process being replaced waits for
        # the replacement to start: give HELLO as long as a start takes on a loaded machine.
        c = AsyncClient(address, connect_timeout=120)
        await c.connect()
        pid = c.server_info["pid"]
        if pid in held:
            spare.append(c)
        else:
            held[pid] = c
        if len(held) == pids:
            break
    for c in spare:
        await c.close()
    assert len(held) == pids, f"connections reached {len(held)} of {pids} serving processes"
    return held


def serving_pids(supervisor_pid: int) -> set[int]:
    with open(f"/proc/{supervisor_pid}/task/{supervisor_pid}/children") as f:
        return {int(p) for p in f.read().split()}


async def test_every_process_sees_every_write_before_its_reply(tmp_path: Path) -> None:
    async with supervisor(tmp_path, 2) as srv:
        clients = await clients_on(srv.address, 2)
        assert set(clients) == serving_pids(srv.proc.pid)
        a, b = clients.values()
        # Written through one process, read through the other right after the reply.
        await a.register("echo", wf.echo(), filename="echo.wasm")
        assert (await b.invoke("echo", b"hi")).output == b"hi"
        await b.register("echo", wf.exit_code(3), filename="exit.wasm")
        assert (await a.invoke("echo")).exit_code == 3
        await a.alias("echo", "prod", 1)
        assert (await b.invoke("echo", b"v1", version="prod")).output == b"v1"
        await b.delete("echo")
        with pytest.raises(NotFoundError):
            await a.invoke("echo", b"gone")
        for c in clients.values():
            await c.close()


async def test_a_killed_serving_process_loses_only_its_own_calls(tmp_path: Path) -> None:
    async with supervisor(tmp_path, 2) as srv:
        clients = await clients_on(srv.address, 2)
        (victim_pid, victim), (other_pid, other) = clients.items()
        await other.register("echo", wf.echo(), filename="echo.wasm")
        await other.register("sleeper", wf.sleep(3600), filename="s.wasm", timeout_ms=60_000)
        # A call in flight in each process; then one process is killed mid-call.
        doomed = asyncio.ensure_future(victim.invoke("sleeper"))
        survivor = asyncio.ensure_future(other.invoke("sleeper"))
        # A connection's frames are dispatched in order: each ping's reply proves its
        # process has taken the call before it.
        await victim.ping()
        await other.ping()
        os.kill(victim_pid, signal.SIGKILL)
        with pytest.raises(UnavailableError):
            await doomed
        # The other process carries on: its own call is still running, new calls are served.
        assert not survivor.done()
        assert (await other.invoke("echo", b"still here")).output == b"still here"
        # The supervisor starts a replacement on the same socket; new connections reach it.
        clients2 = await clients_on(srv.address, 2)
        assert victim_pid not in clients2 and other_pid in clients2
        for pid, c in clients2.items():
            assert (await c.invoke("echo", b"%d" % pid)).output == b"%d" % pid
            await c.close()
        survivor.cancel()
        with contextlib.suppress(asyncio.CancelledError, FnError):
            await survivor
        await victim.close()
        await other.close()
        assert any("died (killed by signal 9)" in line for line in srv.log), srv.log


async def test_a_server_that_cannot_start_exits_with_an_error(tmp_path: Path) -> None:
    blocker = tmp_path / "data"
    blocker.write_text("not a directory")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fnserver", "--port", "0", "--data-dir", str(blocker),
        "--processes", "2", "--no-warm", stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 1
    assert b"failed to start" in err
