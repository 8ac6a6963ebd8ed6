"""Async invocations, invocation records and statistics (issue 12, PROTOCOL.md §5.12-§5.15):
against real servers on port 0, in one process and under the supervisor."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sys
import urllib.request
from pathlib import Path

import pytest
from fnclient import (
    AsyncClient,
    FunctionTimeoutError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from fnclient.protocol import InvocationRecord

from fnserver.config import ServerConfig

from .conftest import ServerHandle, ServerProcess, run_fn, start_server_process
from .wasm_fixtures import echo, exit_code, infinite_loop, sleep_then_write


async def _register(c: AsyncClient, name: str, module: bytes, **kw: object) -> int:
    meta = await c.register(name, module, filename=f"{name}.wasm", **kw)  # type: ignore[arg-type]
    return int(meta["version"])


async def test_async_invoke_returns_an_id_and_the_result_follows(client: AsyncClient) -> None:
    await _register(client, "echo", echo())
    call_id = await client.invoke_async("echo", b"later")
    assert call_id.startswith("inv_")
    status = await client.result(call_id, wait=True)
    assert status.state == "done"
    assert status.result is not None and status.result.output == b"later"
    assert status.name == "echo" and status.version == 1
    assert status.attempts == 1
    assert status.created <= (status.started or 0) <= (status.finished or 0)


async def test_an_async_call_fails_with_the_error_a_direct_call_would_raise(client: AsyncClient) -> None:
    await _register(client, "spin", infinite_loop(), timeout_ms=200)
    call_id = await client.invoke_async("spin")
    status = await client.result(call_id, wait=True)
    assert status.state == "failed"
    assert status.error is not None and status.error.code == "TIMEOUT"
    assert status.result is None


async def test_result_without_wait_shows_a_running_call(client: AsyncClient) -> None:
    await _register(client, "slow", sleep_then_write(30), timeout_ms=60_000)
    call_id = await client.invoke_async("slow")
    # Seen before it finishes: queued or running, never a result yet.
    first = await client.result(call_id)
    assert first.state in ("queued", "running") and first.result is None
    while (await client.result(call_id)).state == "queued":
        await asyncio.sleep(0.01)
    assert (await client.result(call_id)).state == "running"


async def test_unknown_ids_and_names(client: AsyncClient) -> None:
    with pytest.raises(NotFoundError):
        await client.result("inv_" + "0" * 24)
    with pytest.raises(NotFoundError):
        await client.invoke_async("missing")
    with pytest.raises(InvalidArgumentError):
        await client.result("not-an-id")


async def test_a_full_async_queue_is_unavailable(handle: ServerHandle) -> None:
    await handle.stop()
    # Nothing claims (no concurrency left for async calls beyond one long call).
    await handle.start(async_max_queue=2, async_concurrency=1)
    async with AsyncClient(handle.address) as c:
        await _register(c, "slow", sleep_then_write(30), timeout_ms=60_000)
        first = await c.invoke_async("slow")
        while (await c.result(first)).state != "running":
            await asyncio.sleep(0.01)
        await c.invoke_async("slow")
        await c.invoke_async("slow")
        with pytest.raises(UnavailableError) as info:
            await c.invoke_async("slow")
        assert info.value.details.get("reason") == "async_queue_full"


async def test_queued_calls_and_results_survive_a_restart(handle: ServerHandle) -> None:
    async with AsyncClient(handle.address) as c:
        await _register(c, "echo", echo())
        done_id = await c.invoke_async("echo", b"before")
        assert (await c.result(done_id, wait=True)).state == "done"
    await handle.stop()
    # Restarted with no room to run async calls: what is queued now stays queued.
    await handle.start(async_concurrency=1)
    async with AsyncClient(handle.address) as c:
        status = await c.result(done_id)
        assert status.state == "done" and status.result is not None
        assert status.result.output == b"before"
        await _register(c, "slow", sleep_then_write(30), timeout_ms=60_000)
        blocker = await c.invoke_async("slow")
        while (await c.result(blocker)).state != "running":
            await asyncio.sleep(0.01)
        queued = await c.invoke_async("echo", b"queued across a restart")
        assert (await c.result(queued)).state == "queued"
    await handle.stop()
    await handle.start(async_concurrency=4)
    async with AsyncClient(handle.address) as c:
        status = await c.result(queued, wait=True)
        assert status.state == "done" and status.result is not None
        assert status.result.output == b"queued across a restart"
        # The call that was running when the server stopped runs again (at least once).
        again = await c.result(blocker)
        assert again.state in ("queued", "running") and again.attempts >= 1


async def test_every_invocation_leaves_a_record(client: AsyncClient) -> None:
    await _register(client, "echo", echo())
    await _register(client, "exit3", exit_code(3))
    await _register(client, "spin", infinite_loop(), timeout_ms=100)
    result = await client.invoke("echo", b"one")
    assert result.id.startswith("inv_")
    await client.invoke("exit3")
    with pytest.raises(FunctionTimeoutError):
        await client.invoke("spin")
    async_id = await client.invoke_async("echo", b"two")
    await client.result(async_id, wait=True)
    records: list[InvocationRecord] = []
    while len(records) < 2:  # records are written in batches, a moment after the call
        records = await client.logs("echo")
    first, second = records
    assert first.id == result.id and first.mode == "sync" and first.runtime == "wasm"
    assert first.exit_code == 0 and first.error is None and first.output_size == 3
    assert first.cold is True  # the first call of a version loads its module
    assert second.id == async_id and second.mode == "async" and second.cold is False
    assert first.seq < second.seq
    assert first.wall_us >= first.run_us
    while not (exits := await client.logs("exit3")):
        pass
    assert exits[0].exit_code == 3 and exits[0].error is None
    while not (spins := await client.logs("spin")):
        pass
    assert spins[0].error == "TIMEOUT" and spins[0].exit_code is None
    # --limit keeps the newest; --version filters.
    assert [r.id for r in await client.logs("echo", limit=1)] == [async_id]
    assert await client.logs("echo", version=2) == []


async def test_follow_streams_new_records(client: AsyncClient) -> None:
    await _register(client, "echo", echo())
    stream = client.follow_logs("echo", limit=5)
    seen: list[InvocationRecord] = []
    sent = await client.invoke("echo", b"a")
    async for record in stream:
        seen.append(record)
        if len(seen) == 1:
            later = await client.invoke("echo", b"bb")
        if len(seen) == 2:
            break
    await stream.aclose()
    assert [r.id for r in seen] == [sent.id, later.id]
    assert seen[1].output_size == 2


async def test_stats_count_calls_errors_and_starts(client: AsyncClient) -> None:
    await _register(client, "echo", echo())
    await _register(client, "spin", infinite_loop(), timeout_ms=100)
    for _ in range(5):
        await client.invoke("echo", b"x")
    with pytest.raises(FunctionTimeoutError):
        await client.invoke("spin")
    while True:
        stats = await client.stats()
        by_name = {f.name: f for f in stats.functions}
        if by_name.get("echo") is not None and by_name["echo"].calls == 5 and "spin" in by_name:
            break
    echo_stats = by_name["echo"]
    assert echo_stats.version == 1 and echo_stats.errors == {}
    assert echo_stats.cold == 1 and echo_stats.warm == 4
    assert echo_stats.p50_ms is not None and echo_stats.p99_ms is not None
    assert 0 < echo_stats.p50_ms <= echo_stats.p99_ms
    assert by_name["spin"].errors == {"TIMEOUT": 1}
    one = await client.stats("echo")
    assert [f.name for f in one.functions] == ["echo"]
    server = stats.server
    assert server.connections >= 1 and server.processes == 1
    assert server.wasm_slots > 0 and server.workers_total == 2
    with pytest.raises(NotFoundError):
        await client.stats("missing/echo")


async def test_metrics_port_serves_prometheus_text(server_config: ServerConfig, tmp_path: Path) -> None:
    handle = ServerHandle(server_config)
    server = await handle.start(metrics_port=0)
    try:
        async with AsyncClient(handle.address) as c:
            await _register(c, "echo", echo())
            await c.invoke("echo", b"x")
            assert server.metrics is not None
            url = f"http://127.0.0.1:{server.metrics.port}/metrics"
            while True:
                text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=30).read().decode())
                if 'fnserver_invocations_total{function="echo",tenant="default",version="1"} 1.0' in text:
                    break
        assert "fnserver_invocation_duration_seconds_bucket{" in text
        assert 'fnserver_invocation_starts_total{function="echo",start="cold",tenant="default",version="1"} 1.0' in text
        assert "fnserver_connections " in text and "fnserver_event_loop_lag_seconds " in text
        assert 'fnserver_workers{state="idle"}' in text
    finally:
        await handle.stop()


async def test_under_the_supervisor_async_logs_stats_and_metrics(tmp_path: Path) -> None:
    """Serving processes run the calls; the control process holds the store and the metrics."""
    with socket.socket() as probe:  # a free port (the control process binds it after us)
        probe.bind(("127.0.0.1", 0))
        metrics_port = probe.getsockname()[1]
    proc, address = await start_server_process(tmp_path, "--processes", "2", "--metrics-port", str(metrics_port))
    server = ServerProcess(proc, address)
    try:
        async with AsyncClient(address) as c:
            await _register(c, "echo", echo())
            call_id = await c.invoke_async("echo", b"relayed")
            status = await c.result(call_id, wait=True)
            assert status.state == "done" and status.result is not None
            assert status.result.output == b"relayed"
            direct = await c.invoke("echo", b"x")
            while len(records := await c.logs("echo")) < 2:
                pass
            assert {r.id for r in records} == {call_id, direct.id}
            while (stats := await c.stats("echo")).functions[0:1] == () or stats.functions[0].calls < 2:
                pass
            while stats.server.processes < 2:  # each serving process reports within a second
                stats = await c.stats("echo")
            assert stats.server.workers_total >= 2
        code, out, err = await run_fn(address, "logs", "echo", "--json")
        assert code == 0, err
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=30).read().decode())
        assert 'fnserver_invocations_total{function="echo",tenant="default",version="1"} 2.0' in text
    finally:
        with contextlib.suppress(ProcessLookupError):
            await server.stop()


async def test_results_are_kept_for_their_time_then_gone(handle: ServerHandle) -> None:
    await handle.stop()
    await handle.start(result_ttl_s=0.2)
    async with AsyncClient(handle.address) as c:
        await _register(c, "echo", echo())
        call_id = await c.invoke_async("echo", b"brief")
        status = await c.result(call_id, wait=True)
        assert status.state == "done"
        while True:  # until the result is past its time (0.2 s after it finished)
            try:
                await c.result(call_id)
            except NotFoundError as exc:
                assert call_id in exc.message
                break


async def test_fn_logs_follow_streams_records(handle: ServerHandle) -> None:
    async with AsyncClient(handle.address) as c:
        await _register(c, "echo", echo())
        first = await c.invoke("echo", b"one")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "fnclient.cli", "logs", "echo", "--follow", "--json",
            stdout=asyncio.subprocess.PIPE, env={**os.environ, "FN_SERVER": handle.address},
        )
        try:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 120)
            assert json.loads(line)["id"] == first.id
            second = await c.invoke("echo", b"two")
            line = await asyncio.wait_for(proc.stdout.readline(), 120)
            assert json.loads(line)["id"] == second.id
        finally:
            proc.kill()
            await proc.wait()
