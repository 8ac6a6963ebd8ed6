"""Several serving processes on one port under the supervisor (``fnserver --processes N``).

Real ``python -m fnserver`` processes, real SIGKILLs. Which serving process holds a
connection is the kernel's choice (SO_REUSEPORT); HELLO names it (``pid``), so tests open
connections until they hold the processes they need.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from fnclient import AsyncClient
from fnclient.protocol import FnError, NotFoundError, UnavailableError

from . import wasm_fixtures as wf
from .conftest import ServerProcess, start_server_process

Server = ServerProcess


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


def _children(supervisor_pid: int, role: str) -> set[int]:
    with open(f"/proc/{supervisor_pid}/task/{supervisor_pid}/children") as f:
        pids = {int(p) for p in f.read().split()}
    found = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            if b"--role" in argv and argv[argv.index(b"--role") + 1] == role.encode():
                found.add(pid)
    return found


def serving_pids(supervisor_pid: int) -> set[int]:
    return _children(supervisor_pid, "serving")


def control_pid(supervisor_pid: int) -> int:
    (pid,) = _children(supervisor_pid, "control")
    return pid


def status_fields(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


async def wait_for_line(srv: Server, text: str, start: int = 0) -> str:
    """The first log line from index ``start`` on that contains ``text`` (an event, not a
    deadline: the bound only turns a hang into a failure)."""
    async with asyncio.timeout(120):
        while True:
            for line in srv.log[start:]:
                if text in line:
                    return line
            await asyncio.sleep(0.05)  # polling the collected log, not synchronising on time


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


NATIVE_ECHO_C = r"""
#include <stdio.h>
int main(void) { int c; while ((c = getchar()) != EOF) putchar(c); return 0; }
"""

# Started as root, then the serving process's uid with the store reached the way the serving
# process reaches it (a descriptor opened before the drop): every write must be refused.
TAMPER = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_PATH | os.O_DIRECTORY)
uid = int(sys.argv[2])
os.setgroups([])
os.setresgid(uid, uid, uid)
os.setresuid(uid, uid, uid)
root = "/proc/self/fd/%d" % fd
tried = refused = 0
def attempt(what, fn):
    global tried, refused
    tried += 1
    try:
        fn()
        print("WROTE", what)
    except PermissionError:
        refused += 1
for dirpath, dirnames, filenames in os.walk(root):
    attempt(dirpath, lambda: open(os.path.join(dirpath, "planted"), "xb").close())
    for name in filenames:
        path = os.path.join(dirpath, name)
        attempt(path, lambda: open(path, "r+b").close())
        attempt(path, lambda: os.rename(path, path + ".moved"))
        attempt(path, lambda: os.chmod(path, 0o666))
print(tried, refused)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="the privilege split applies when run as root")
async def test_serving_processes_hold_no_privilege_and_cannot_write_the_store(
    tmp_path: Path,
) -> None:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed")
    (tmp_path / "echo.c").write_text(NATIVE_ECHO_C)
    subprocess.run([gcc, "-static", "-O1", "-o", str(tmp_path / "echo"), str(tmp_path / "echo.c")],
                   check=True, capture_output=True, timeout=120)
    async with supervisor(tmp_path, 2) as srv:
        clients = await clients_on(srv.address, 2)
        a, b = clients.values()
        # Every kind of write works, relayed to the control process: a wasm module (compiled
        # there), a native binary (run by its workers), an alias.
        await a.register("echo", wf.echo(), filename="echo.wasm")
        await b.register("necho", (tmp_path / "echo").read_bytes(), filename="echo")
        await a.alias("necho", "prod", 1)
        assert (await b.invoke("echo", b"wasm")).output == b"wasm"
        assert (await a.invoke("necho", b"native", version="prod")).output == b"native"
        ctl = control_pid(srv.proc.pid)
        assert status_fields(ctl)["Uid"].split()[0] == "0"  # the privileged half
        for pid in clients:
            st = status_fields(pid)
            uids = set(st["Uid"].split())
            assert len(uids) == 1 and "0" not in uids, st["Uid"]
            assert set(st["Gid"].split()) == uids, st["Gid"]
            assert st["Groups"].strip() == ""
            for caps in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
                assert int(st[caps], 16) == 0, (caps, st[caps])
            assert st["NoNewPrivs"].strip() == "1"
        uid = int(status_fields(next(iter(clients)))["Uid"].split()[0])
        out = subprocess.run(
            [sys.executable, "-c", TAMPER, str(tmp_path / "data"), str(uid)],
            capture_output=True, text=True, timeout=120,
        )
        assert out.returncode == 0, out.stderr
        assert "WROTE" not in out.stdout, out.stdout
        tried, refused = map(int, out.stdout.split()[-2:])
        # The walk saw the store: the functions, their artifacts, the compiled module.
        assert tried > 10 and refused == tried
        assert any(p.suffix == ".cwasm" for p in (tmp_path / "data").rglob("*"))
        for c in clients.values():
            await c.close()


async def test_warm_calls_never_wait_for_the_control_process_which_is_replaced(
    tmp_path: Path,
) -> None:
    async with supervisor(tmp_path, 1) as srv:
        (client,) = (await clients_on(srv.address, 1)).values()
        await client.register("echo", wf.echo(), filename="echo.wasm")
        assert (await client.invoke("echo", b"warm")).output == b"warm"
        ctl = control_pid(srv.proc.pid)
        os.kill(ctl, signal.SIGSTOP)
        try:
            # The control process cannot answer anything now; a warm wasm call needs nothing
            # from it.
            assert (await client.invoke("echo", b"still")).output == b"still"
        finally:
            os.kill(ctl, signal.SIGCONT)
        mark = len(srv.log)
        os.kill(ctl, signal.SIGKILL)
        await wait_for_line(srv, "control process (pid", mark)
        line = await wait_for_line(srv, "ready", mark)
        assert f"(pid {ctl})" not in line
        assert (await client.invoke("echo", b"after")).output == b"after"
        # Writes go to the new control process.
        info = await client.register("echo", wf.exit_code(4), filename="exit.wasm")
        assert info["version"] == 2
        assert (await client.invoke("echo")).exit_code == 4
        await client.close()


async def test_a_damaged_module_is_recompiled_by_the_control_process_never_run(
    tmp_path: Path,
) -> None:
    async with supervisor(tmp_path, 1) as srv:
        (client,) = (await clients_on(srv.address, 1)).values()
        await client.register("echo", wf.echo(), filename="echo.wasm")
        (cwasm,) = (tmp_path / "data").rglob("*.cwasm")
        good = cwasm.read_bytes()
        # Swapped for other bytes of the same size: what a tampered cache would hold.
        cwasm.write_bytes(bytes(b ^ 0xFF for b in good))
        # A fresh serving process (the old one had the module mapped already).
        pid = client.server_info["pid"]
        await client.close()
        mark = len(srv.log)
        os.kill(pid, signal.SIGKILL)
        await wait_for_line(srv, "ready", mark)
        (client,) = (await clients_on(srv.address, 1)).values()
        assert client.server_info["pid"] != pid
        assert (await client.invoke("echo", b"intact")).output == b"intact"
        # The control process removed the bad file and wrote the module again.
        (again,) = (tmp_path / "data").rglob("*.cwasm")
        assert again.read_bytes() == good
        await client.close()


async def test_a_supervisor_killed_with_sigkill_takes_its_processes_with_it(tmp_path: Path) -> None:
    """Nothing can catch SIGKILL, so the children cannot be told: the kernel kills them
    (PR_SET_PDEATHSIG, armed again after a serving process changed its uid). A node killed
    this way must not leave serving processes answering with nobody to restart them."""
    async with supervisor(tmp_path, 2) as srv:
        clients = await clients_on(srv.address, 2)
        children = serving_pids(srv.proc.pid) | {control_pid(srv.proc.pid)}
        assert set(clients) <= children and len(children) == 3
        watches = {pid: os.pidfd_open(pid) for pid in children}
        try:
            os.kill(srv.proc.pid, signal.SIGKILL)
            assert await srv.proc.wait() == -signal.SIGKILL
            loop = asyncio.get_running_loop()
            for fd in watches.values():
                gone = loop.create_future()
                loop.add_reader(fd, lambda f=gone: f.done() or f.set_result(None))
                try:
                    # A pidfd turns readable when its process exits: the event, no polling.
                    await asyncio.wait_for(gone, 120)
                finally:
                    loop.remove_reader(fd)
        finally:
            for fd in watches.values():
                os.close(fd)
        for c in clients.values():
            with pytest.raises((UnavailableError, ConnectionError, OSError)):
                await c.ping()
            await c.close()


async def test_async_calls_of_a_killed_serving_process_run_again_after_its_lease(tmp_path: Path) -> None:
    """A serving process, not its node, dies mid-call: the control process lives on, but the
    leases were renewed by the process running the calls, so they run out and the successor
    runs the calls again (at least once, never lost)."""
    proc, address = await start_server_process(tmp_path, "--processes", "1", "--async-lease", "2")
    srv = Server(proc, address)
    try:
        async with AsyncClient(address) as c:
            await c.register("nap", wf.sleep_then_echo(5.0), filename="nap.wasm", timeout_ms=60_000)
            inputs = {await c.invoke_async("nap", b"nap %d" % i): b"nap %d" % i for i in range(4)}
            first = next(iter(inputs))
            for _ in range(12000):  # bounded only to turn a hang into a failure
                if (await c.result(first)).state == "running":
                    break
                await asyncio.sleep(0.01)
            running = {i for i in inputs if (await c.result(i)).state == "running"}
            assert first in running
            (victim,) = serving_pids(proc.pid)
            mark = len(srv.log)
            os.kill(victim, signal.SIGKILL)
        await wait_for_line(srv, "serving process 0 (pid", mark)  # its successor is up
        async with AsyncClient(address) as c:
            for call_id, payload in inputs.items():
                status = await c.result(call_id, wait=60)
                for _ in range(4):  # bounded only to turn a hang into a failure
                    if status.state not in ("queued", "running"):
                        break
                    status = await c.result(call_id, wait=60)
                assert status.state == "done" and status.result is not None, (status.state, status.error)
                assert status.result.output == payload
                if call_id in running:
                    assert status.attempts >= 2, call_id
    finally:
        assert await srv.stop() == 0
