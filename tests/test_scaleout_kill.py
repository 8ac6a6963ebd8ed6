"""A node killed with SIGKILL in the middle of a storm of async calls (issue 14): real
``fnserver`` nodes over a real PostgreSQL (tests/_postgres.py), the whole process group of one
of them killed at once, as a machine that dies would be.

What must hold: every call the dying node acknowledged finishes, with its own output, through
the other node; the calls the dead node was running run again there once their leases run out
(``--async-lease 3``: renewed by the process running a call, so a lease is short however long
the call); and a call longer than its lease is not taken from the live node that runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path

from fnclient import AsyncClient
from fnclient.protocol import CallStatus

from fnserver.invocations import PostgresInvocationStore

from . import wasm_fixtures as wf
from .conftest import start_server_process

#: Async calls submitted through the node that is then killed.
CALLS = 40
#: How long each call sleeps: twice its lease, so a call that finishes in one attempt on the
#: surviving node shows that its lease was renewed; and long enough that the calls the killed
#: node claimed are still running when it is killed, right after one is seen running.
SLEEP_S = 7.0
LEASE_S = 3
#: Bounds every wait, only to turn a hang into a failure (a loaded machine is slow).
HANG_S = 120.0


def _process_tree(root: int) -> dict[int, int]:
    """``root`` and its descendants now: pid -> start time (``/proc/PID/stat``), so that a pid
    reused by an unrelated process afterwards is never signalled."""
    parents: dict[int, int] = {}
    started: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue  # gone meanwhile
        fields = stat.rsplit(")", 1)[1].split()
        parents[int(entry)] = int(fields[1])
        started[int(entry)] = int(fields[19])
    tree = {root} if root in started else set()
    grew = True
    while grew:
        more = {pid for pid, parent in parents.items() if parent in tree and pid not in tree}
        tree |= more
        grew = bool(more)
    return {pid: started[pid] for pid in tree}


def _kill_leftovers(processes: dict[int, int]) -> None:
    """SIGKILL those of ``processes`` still alive (the same processes: same start time).
    Native workers and compilers run in sessions of their own and die with their parent by
    PR_SET_PDEATHSIG; this makes sure of it."""
    for pid, started in processes.items():
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[19]) == started:
                os.kill(pid, signal.SIGKILL)


async def _outcome(client: AsyncClient, call_id: str, until: float) -> CallStatus:
    """The call's final status, waiting for it (bounded by ``until``, a monotonic time)."""
    while True:
        left = until - time.monotonic()
        status = await client.result(call_id, wait=max(0.0, min(left, 30.0)))
        if status.state in ("done", "failed") or left <= 0:
            return status


async def test_a_killed_nodes_async_calls_run_again_on_another_node(postgres_dsn: str, tmp_path: Path) -> None:
    lease = ("--async-lease", str(LEASE_S))
    one, address_one = await start_server_process(
        tmp_path / "one", "--registry", postgres_dsn, "--processes", "1", *lease, new_session=True,
    )
    doomed = _process_tree(one.pid)
    two: asyncio.subprocess.Process | None = None
    try:
        # -- the storm, through node one, which alone is up: whatever runs, runs there --------
        async with AsyncClient(address_one) as a:
            await a.register("nap", wf.sleep_then_echo(SLEEP_S), filename="nap.wasm", timeout_ms=60_000)
            inputs: dict[str, bytes] = {}
            for i in range(CALLS):
                payload = f"call {i}".encode()
                inputs[await a.invoke_async("nap", payload)] = payload
            # The oldest call is claimed first: once it runs, node one is running calls.
            first = next(iter(inputs))
            until = time.monotonic() + HANG_S
            while (await a.result(first)).state == "queued":
                assert time.monotonic() < until, "node one never started an async call"
                await asyncio.sleep(0.01)
            # -- the whole node dies at once: supervisor, control and serving processes -------
            doomed |= _process_tree(one.pid)
            os.killpg(one.pid, signal.SIGKILL)
        assert await asyncio.wait_for(one.wait(), HANG_S) == -signal.SIGKILL

        # What the dead node was running, as the shared store says with nobody alive to change
        # it: these calls must run again; the rest waited in the queue.
        store = PostgresInvocationStore(postgres_dsn)
        await store.open()
        try:
            states = {call_id: await store.status(call_id) for call_id in inputs}
        finally:
            await store.close()
        assert all(s is not None for s in states.values())
        interrupted = {i for i, s in states.items() if s is not None and s.state == "running"}
        assert interrupted, "node one finished what it ran before it died: nothing was interrupted"
        assert all(s is not None and s.state in ("queued", "running", "done") for s in states.values())

        # -- node two takes over, with room for every call twice over: it keeps claiming while
        # it runs them all, so a lease it failed to renew would be taken again ----------------
        room = str(2 * CALLS)
        two, address_two = await start_server_process(
            tmp_path / "two", "--registry", postgres_dsn, "--processes", "1", *lease,
            "--async-concurrency", room, "--slots", room, "--slots-per-function", room,
        )
        until = time.monotonic() + HANG_S
        async with AsyncClient(address_two) as b:
            outcomes = {call_id: await _outcome(b, call_id, until) for call_id in inputs}

        # Every acknowledged call finished, with its own output: none lost.
        unfinished = {i: (s.state, s.error) for i, s in outcomes.items() if s.state != "done"}
        assert not unfinished
        for call_id, status in outcomes.items():
            assert status.result is not None and status.result.exit_code == 0
            assert status.result.output == inputs[call_id], call_id
        # The calls the dead node held ran again, once their leases ran out.
        ran_again = {i: outcomes[i].attempts for i in interrupted}
        assert all(attempts >= 2 for attempts in ran_again.values()), ran_again
        # A call twice as long as its lease finished in one attempt on node two: its lease was
        # renewed while it ran (without renewal node two would claim it again, being idle).
        assert any(outcomes[i].attempts == 1 for i in inputs if i not in interrupted)
    finally:
        if one.returncode is None:  # not reaped yet: its pid, and so its group, are still its own
            with contextlib.suppress(ProcessLookupError):
                os.killpg(one.pid, signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(one.wait(), HANG_S)
        _kill_leftovers(doomed)
        if two is not None:
            two.terminate()
            await asyncio.wait_for(two.wait(), HANG_S)
