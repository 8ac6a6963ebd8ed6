"""Clients that know several nodes (issue 14, item 5): real servers over TCP, nothing mocked.

Two in-process servers, each with a data directory of its own, hold the same functions. A node
that cannot be reached is a real socket that refuses connections (bound, never listening), or a
server really stopped. Tests wait on events (a call failing, a connection seen closed), never on
a clock.
"""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace

import fnclient
import pytest
from fnclient import AsyncClient, Client, InvalidArgumentError, UnavailableError
from fnclient.cli import EXIT_ERROR, EXIT_USAGE

from fnserver.config import ServerConfig

from . import wasm_fixtures as wf
from .conftest import ServerHandle, run_fn

#: Long enough to be in flight whenever its node is stopped; the stop cuts it short.
SLEEP_S = 120


async def _until(predicate: Callable[[], bool], what: str) -> None:
    """Poll state until it holds; the bound (about 60 s of polls) only turns a hang into a
    failure."""
    for _ in range(6000):
        if predicate():
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"never observed: {what}")


@pytest.fixture
async def nodes(server_config: ServerConfig) -> AsyncIterator[tuple[ServerHandle, ServerHandle]]:
    """Two servers (grace 0: a stop cuts calls in flight short) holding the same ``echo``
    and ``sleeper``."""
    base = replace(server_config, shutdown_grace_s=0.0)
    a = ServerHandle(replace(base, data_dir=server_config.data_dir / "a"))
    b = ServerHandle(replace(base, data_dir=server_config.data_dir / "b"))
    try:
        await a.start()
        await b.start()
        for handle in (a, b):
            async with AsyncClient(handle.address) as c:
                await c.register("echo", wf.echo(), filename="echo.wasm")
                await c.register(
                    "sleeper", wf.sleep_then_write(SLEEP_S), filename="sleeper.wasm",
                    timeout_ms=(SLEEP_S + 60) * 1000,
                )
        yield a, b
    finally:
        await a.stop()
        await b.stop()


@pytest.fixture
def dead_address() -> Iterator[str]:
    """An address that refuses connections: a port bound (so nobody else takes it) but never
    listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def dead_address_2() -> Iterator[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"


async def _calls(client: AsyncClient, name: str, at_least: int = 0) -> int:
    """The calls of ``name`` the client's node counts, once it counts ``at_least`` (stats are
    recorded just after each reply); the bound only turns a hang into a failure."""
    for _ in range(6000):
        stats = await client.stats(name)
        calls = sum(v.calls for v in stats.functions)
        if calls >= at_least:
            return calls
        await asyncio.sleep(0.01)
    pytest.fail(f"{name} never reached {at_least} calls")


def _connections(handle: ServerHandle) -> int:
    assert handle.server is not None
    return len(handle.server.tcp.connections())


def _running(handle: ServerHandle) -> dict[str, int]:
    assert handle.server is not None
    return handle.server.pool.stats()["running"]


# -- address lists ---------------------------------------------------------------------------


def test_address_lists_are_parsed() -> None:
    assert AsyncClient("h1:1").addresses == ("h1:1",)
    assert AsyncClient("h1:1,tls://h2:2, [::1]:3 ").addresses == ("h1:1", "tls://h2:2", "[::1]:3")
    assert AsyncClient(["h1:1", "h2:2"]).addresses == ("h1:1", "h2:2")
    assert AsyncClient(("h1:1", "h2:2,h3:3")).addresses == ("h1:1", "h2:2", "h3:3")
    assert fnclient.parse_addresses("h1:1,h2") == ("h1:1", "h2")
    one = AsyncClient("example.com:9000")
    assert (one.address, one.host, one.port) == ("example.com:9000", "example.com", 9000)
    many = AsyncClient("h1:1,h2:2,h3:3")
    assert many.address in many.addresses
    assert (many.host, many.port) == fnclient.parse_address(many.address)


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("a:1,,b:2", "address 2 of 3 is empty"),
        ("a:1,b:2,", "address 3 of 3 is empty"),
        (",", "address 1 of 2 is empty"),
        ("", "empty server address"),
        ("  ", "empty server address"),
        ([], "no server address given"),
        (["a:1", ""], "address 2 of 2 is empty"),
        ("a:1,b:x", "invalid port in server address 'b:x'"),
        ("a:1,http://b:2", "'http://' is not a scheme"),
        ([b"a:1"], "must be a string"),
    ],
)
def test_malformed_address_lists_are_refused(value: object, says: str) -> None:
    for make in (AsyncClient, Client):
        with pytest.raises(InvalidArgumentError) as info:
            make(value)  # type: ignore[arg-type]
        assert says in info.value.message


# -- one client, two nodes -------------------------------------------------------------------


async def test_a_client_given_both_nodes_works(nodes: tuple[ServerHandle, ServerHandle]) -> None:
    a, b = nodes
    async with AsyncClient([a.address, b.address]) as c:
        assert c.addresses == (a.address, b.address)
        assert c.address in c.addresses
        assert (await c.invoke("echo", b"hi")).output == b"hi"
        assert (await c.whoami()).tenant == "default"
        assert c.server_info["server"] == "fnserver"
    # The blocking client, from a comma-separated string.
    def blocking() -> tuple[bytes, str, tuple[str, ...]]:
        with Client(f"{a.address},{b.address}") as s:
            return s.invoke("echo", b"sync").output, s.address, s.addresses

    output, address, addresses = await asyncio.to_thread(blocking)
    assert output == b"sync" and addresses == (a.address, b.address) and address in addresses


async def test_clients_spread_over_the_nodes(nodes: tuple[ServerHandle, ServerHandle]) -> None:
    a, b = nodes
    before = {a.address: _connections(a), b.address: _connections(b)}
    # Each new client of a process starts on the next node in turn: consecutive clients
    # alternate, whichever node the process began with.
    clients = [AsyncClient([a.address, b.address]) for _ in range(20)]
    try:
        await asyncio.gather(*(c.connect() for c in clients))
        assert Counter(c.address for c in clients) == {a.address: 10, b.address: 10}
        # The servers agree: ten new connections each (every HELLO was answered, so each
        # connection is attached).
        assert _connections(a) - before[a.address] == 10
        assert _connections(b) - before[b.address] == 10
        outputs = await asyncio.gather(*(c.invoke("echo", str(i)) for i, c in enumerate(clients)))
        assert [r.output for r in outputs] == [str(i).encode() for i in range(20)]
    finally:
        await asyncio.gather(*(c.close() for c in clients))


async def test_a_node_that_refuses_is_passed_over(
    nodes: tuple[ServerHandle, ServerHandle], dead_address: str
) -> None:
    a, _ = nodes
    # Two consecutive clients start on different nodes: one of them on the dead one.
    clients = [AsyncClient([dead_address, a.address]) for _ in range(2)]
    assert {c.address for c in clients} == {dead_address, a.address}
    try:
        for c in clients:
            assert (await c.invoke("echo", b"x")).output == b"x"
            assert c.address == a.address
    finally:
        await asyncio.gather(*(c.close() for c in clients))


async def test_a_stopped_node_sends_its_clients_to_the_other(
    nodes: tuple[ServerHandle, ServerHandle],
) -> None:
    a, b = nodes
    clients = [AsyncClient([a.address, b.address]) for _ in range(4)]
    try:
        await asyncio.gather(*(c.connect() for c in clients))
        on_a = [c for c in clients if c.address == a.address]
        assert len(on_a) == 2
        await a.stop()
        # A client can move only once it knows its connection is gone (the server closed it).
        await _until(lambda: not any(c.connected for c in on_a), "the clients of A see it close")
        for i, c in enumerate(clients):
            assert (await c.invoke("echo", f"after {i}")).output == f"after {i}".encode()
            assert c.address == b.address
        assert await _calls(clients[0], "echo", 4) == 4
    finally:
        await asyncio.gather(*(c.close() for c in clients))


@pytest.mark.parametrize("death", ["stopped", "connection_dropped"])
async def test_a_call_in_flight_when_its_node_dies_fails_and_is_never_sent_again(
    nodes: tuple[ServerHandle, ServerHandle], death: str
) -> None:
    a, b = nodes
    # Make a client on A (consecutive clients alternate between the nodes).
    clients = [AsyncClient([a.address, b.address]) for _ in range(2)]
    other = clients[1] if clients[0].address == a.address else clients[0]
    c = clients[0] if other is clients[1] else clients[1]
    await other.close()
    try:
        await c.connect()
        assert c.address == a.address
        call = asyncio.ensure_future(c.invoke("sleeper"))
        await _until(lambda: _running(a).get("sleeper") == 1, "the sleeper running on A")
        if death == "stopped":
            stopping = asyncio.ensure_future(a.stop())
        else:
            assert a.server is not None
            for conn in a.server.tcp.connections():
                assert conn.transport is not None
                conn.transport.abort()
        with pytest.raises(UnavailableError) as info:
            await call
        # Stopped: the server answered the call it cut short. Dropped: the client saw its
        # connection end under the call. Either way the call may have run: not sent again.
        assert info.value.message == (
            "server is shutting down" if death == "stopped" else "connection to server lost"
        )
        if death == "stopped":
            await stopping
        else:
            await a.stop()
        await _until(lambda: not c.connected, "the client sees A's connection closed")
        # The client carries on, on B, where the sleeper never ran: the call that was in
        # flight was not sent again.
        assert _running(b) == {}
        assert (await c.invoke("echo", b"next")).output == b"next"
        assert c.address == b.address
        # B has recorded the call made after the failure, and nothing of the sleeper.
        await _calls(c, "echo", 1)
        assert len(await c.logs("echo")) == 1
        assert await c.logs("sleeper") == []
        assert await _calls(c, "sleeper") == 0
        assert _running(b) == {}
    finally:
        await c.close()


async def test_all_nodes_down_names_each(dead_address: str, dead_address_2: str) -> None:
    c = AsyncClient(f"{dead_address},{dead_address_2}", connect_timeout=5)
    with pytest.raises(UnavailableError) as info:
        await c.invoke("echo")
    message = info.value.message
    assert message.startswith("cannot connect to any of the 2 servers (")
    assert dead_address in message and dead_address_2 in message
    assert "refused" in message.lower()
    tried = info.value.details["tried"]
    assert sorted(t["address"] for t in tried) == sorted([dead_address, dead_address_2])
    assert all(t["error"].startswith(f"cannot connect to {t['address']}: ") for t in tried)
    # The single-node message is the node's own, as it always was.
    with pytest.raises(UnavailableError) as single:
        await AsyncClient(dead_address).connect()
    assert single.value.message.startswith(f"cannot connect to {dead_address}: ")
    assert "tried" not in single.value.details


# -- the fn command line ---------------------------------------------------------------------


async def test_fn_with_a_node_list(
    nodes: tuple[ServerHandle, ServerHandle], dead_address: str, dead_address_2: str
) -> None:
    a, _ = nodes
    listed = f"{dead_address},{a.address}"
    code, out, err = await run_fn(listed, "invoke", "echo", "--input", "hello")
    assert (code, out) == (0, b"hello"), err
    code, out, err = await run_fn(listed, "ping")
    assert code == 0, err
    assert f" at {a.address}: " in out.decode()  # the node that answered
    code, out, err = await run_fn(a.address, "--server", f"{a.address},{dead_address}", "whoami")
    assert code == 0 and f"server  {a.address} " in out.decode(), err
    # Every node down: one error naming each.
    code, out, err = await run_fn(f"{dead_address},{dead_address_2}", "ping")
    assert code == EXIT_ERROR, out
    text = err.decode()
    assert text.startswith("error: UNAVAILABLE: cannot connect to any of the 2 servers (")
    assert dead_address in text and dead_address_2 in text
    # A malformed list is a usage error, before any connection.
    code, out, err = await run_fn(f"{a.address},,{dead_address}", "ping")
    assert code == EXIT_USAGE
    assert "address 2 of 3 is empty" in err.decode()
