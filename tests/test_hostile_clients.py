"""One client cannot stall the others (issue 10): each rule tried against a real server.

Every test here acts as a hostile client would — trickling bytes, never reading, holding
partial frames or hundreds of registers — and checks what the server does by the order of
events only: the server closes, answers, or stops reading *before* something else happens,
never "within N seconds". Deadlines are configured short so the tests do not wait long, but
no assertion depends on how long anything took.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import logging
import os
import resource
import signal
import socket
import struct
import sys
import time
import zipfile
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import fnclient
import msgpack
import pytest
from fnclient import AsyncClient

from fnserver.builder._gomod import package_clause, package_name
from fnserver.config import ServerConfig
from fnserver.protocol import FrameDecoder, FunctionLimits, encode_request
from fnserver.registry import NewVersion
from fnserver.transport._tcp import Connection, HeapTrimmer

from . import wasm_fixtures as wf
from .conftest import ServerHandle
from .test_exec import until

_OPEN: list[Raw] = []


@pytest.fixture(autouse=True)
async def _close_raw_connections() -> AsyncIterator[None]:
    """Every hand-made connection is closed before the test's loop is."""
    yield
    while _OPEN:
        raw = _OPEN.pop()
        raw.writer.close()
        with contextlib.suppress(OSError):
            await raw.writer.wait_closed()


class Raw:
    """A client that speaks the wire format by hand and misbehaves on purpose."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = FrameDecoder(64 * 1024 * 1024)

    @classmethod
    async def open(cls, address: str, *, hello: bool = True, rcvbuf: int | None = None) -> Raw:
        host, port = address.rsplit(":", 1)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            # Before connecting, so the window stays small: the server's writes back up soon.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
        reader, writer = await asyncio.open_connection(sock=sock)
        raw = cls(reader, writer)
        _OPEN.append(raw)
        if hello:
            raw.send(encode_request("hello", 0, protocol=1, token=None))
            reply = await raw.frame()
            assert reply["type"] == "response", reply
        return raw

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def frame(self) -> dict[str, Any]:
        """The next frame; ConnectionError when the server closed first."""
        while True:
            got = self.decoder.next_frame()
            if got is not None:
                return got
            data = await self.reader.read(1 << 20)
            if not data:
                raise ConnectionError("closed by the server")
            self.decoder.feed(data)

    async def until_closed(self) -> list[dict[str, Any]]:
        """Every frame until the server closes the connection."""
        frames = []
        while True:
            try:
                frames.append(await self.frame())
            except (ConnectionError, OSError):
                return frames

    def close(self) -> None:
        self.writer.close()


def header(length: int) -> bytes:
    return struct.pack(">I", length)


def front_of(handle: ServerHandle) -> Any:
    assert handle.server is not None
    return handle.server.tcp


async def server_side(handle: ServerHandle, raw: Raw) -> Connection:
    """The server's Connection for ``raw`` (matched by the client's port)."""
    port = raw.writer.get_extra_info("sockname")[1]
    for conn in front_of(handle).connections():
        if conn.peer.endswith(f":{port}"):
            return conn  # type: ignore[no-any-return]
    raise AssertionError("no server-side connection for this client")


@pytest.fixture
async def strict(server_config: ServerConfig) -> AsyncIterator[ServerHandle]:
    """A server with short deadlines and small limits, so hostile clients meet them soon."""
    config = replace(
        server_config,
        hello_timeout_s=0.5,
        frame_timeout_s=0.5,
        idle_timeout_s=0.5,
        write_timeout_s=0.5,
        max_connections=6,
        max_connections_per_peer=6,
    )
    h = ServerHandle(config)
    await h.start()
    try:
        yield h
    finally:
        await h.stop()


# -- 1. parsing user input is linear; nothing holds the loop -----------------------------------


@pytest.mark.parametrize(
    ("source", "name"),
    [
        (b"package main\n", "main"),
        (b"\xef\xbb\xbf// licence\n/* block */ package /* odd */ foo // tail\n", "foo"),
        (b"//go:build wasip1\n\npackage main\n\nfunc main() {}\n", "main"),
        (b"/*/ package x */ package y", "y"),
        (b"package\tmain", "main"),
        (b"/**/package/**/x", "x"),
        (b"package \xc3\xa9t\xc3\xa9\n", "\u00e9t\u00e9"),
        (b"/* unterminated package main", None),
        (b"packagemain", None),
        (b"x := `package main`", None),
        (b'var s = "package main"', None),
        (b"package", None),
        (b"   \n//only comments", None),
        (b"package " + b"a" * 5000, None),
    ],
)
def test_package_clause_whole_and_byte_by_byte(source: bytes, name: str | None) -> None:
    assert package_clause([source]) == name
    assert package_clause([source[i : i + 1] for i in range(len(source))]) == name


@pytest.mark.parametrize(
    ("source", "then"),
    [
        (b"/*a" * 1_400_000, None),  # froze the old regex for hours; still one open comment
        (b"//a\n" * 1_000_000, "q"),
        (b"/**/" * 1_000_000, "q"),
        (b"/*" + b"*" * 4_000_000 + b"*/", "q"),
        (b" " * 4_000_000, "q"),
    ],
)
def test_package_clause_of_pathological_sources(source: bytes, then: str | None) -> None:
    chunks = [source[i : i + 65536] for i in range(0, len(source), 65536)]
    assert package_clause(chunks) is None
    assert package_clause([*chunks, b"package q\n"]) == then


def test_package_name_reads_only_the_head_of_a_file(tmp_path: Path) -> None:
    path = tmp_path / "main.go"
    path.write_bytes(b"// x\n" * 1_000_000 + b"package main\n")  # 5 MB of comments first
    assert package_name(path) is None
    path.write_bytes(b"// licence\n" * 1000 + b"package main\n")
    assert package_name(path) == "main"


@pytest.mark.slow
async def test_pings_are_answered_while_a_pathological_source_registers(handle: ServerHandle) -> None:
    source = b"package main\n" + b"/*a" * 350_000  # 1 MB; go reports the unterminated comment
    uploaded = asyncio.Event()

    def progress(event: dict[str, Any]) -> None:
        if event.get("stage") == "upload" and event.get("received") == event.get("size"):
            uploaded.set()

    async with AsyncClient(handle.address) as hostile, AsyncClient(handle.address) as other:
        register = asyncio.ensure_future(
            hostile.register("patho", source, filename="patho.go", progress=progress)
        )
        await uploaded.wait()
        for _ in range(5):
            await other.ping()
            assert not register.done()  # answered while the register is still pending
        with pytest.raises(fnclient.BuildError):
            await register


async def test_a_callback_holding_the_loop_is_logged_with_its_culprit(
    handle: ServerHandle, caplog: pytest.LogCaptureFixture
) -> None:
    lag = front_of(handle).lag
    services = handle.server.services  # type: ignore[union-attr]
    real_ping = services.ping

    async def ping_that_holds_the_loop(ctx: Any, req: Any) -> Any:
        time.sleep(0.3)  # the culprit: blocking work on the event loop
        return await real_ping(ctx, req)

    services.ping = ping_that_holds_the_loop
    caplog.set_level(logging.WARNING, logger="fnserver")
    async with AsyncClient(handle.address) as c:
        await c.ping()
        for _ in range(10_000):  # until the late heartbeat has run: a few loop iterations
            if lag.warnings:
                break
            await asyncio.sleep(0)
    assert lag.warnings == 1
    (message,) = [r.getMessage() for r in caplog.records if "event loop held" in r.getMessage()]
    assert "ping c" in message  # the request's task: its operation and connection
    assert "ping_that_holds_the_loop" in message and "test_hostile_clients.py" in message


# -- 2. connection limits ---------------------------------------------------------------------


async def test_too_many_connections_get_unavailable_and_a_close(
    server_config: ServerConfig,
) -> None:
    h = ServerHandle(replace(server_config, max_connections=3, max_connections_per_peer=100))
    await h.start()
    try:
        held = [await Raw.open(h.address) for _ in range(3)]
        extra = await Raw.open(h.address, hello=False)
        (refusal,) = await extra.until_closed()
        assert refusal["id"] is None and refusal["error"]["code"] == "UNAVAILABLE"
        assert refusal["error"]["details"] == {"reason": "too_many_connections", "limit": 3}
        # fnclient turns it into the matching exception.
        with pytest.raises(fnclient.UnavailableError):
            async with AsyncClient(h.address):
                pass
        # Once one leaves, a newcomer is served.
        gone = await server_side(h, held[0])
        held[0].close()
        await gone.gone.wait()
        async with AsyncClient(h.address) as c:
            await c.ping()
        for raw in held[1:]:
            raw.close()
    finally:
        await h.stop()


async def test_connections_per_peer_are_limited(server_config: ServerConfig) -> None:
    h = ServerHandle(replace(server_config, max_connections=100, max_connections_per_peer=2))
    await h.start()
    try:
        held = [await Raw.open(h.address) for _ in range(2)]
        extra = await Raw.open(h.address, hello=False)
        (refusal,) = await extra.until_closed()
        assert refusal["error"]["code"] == "UNAVAILABLE"
        assert refusal["error"]["details"]["reason"] == "too_many_connections_from_peer"
        for raw in held:
            raw.close()
    finally:
        await h.stop()


async def test_a_big_frame_before_hello_is_refused_at_its_length(strict: ServerHandle) -> None:
    raw = await Raw.open(strict.address, hello=False)
    raw.send(header(65 * 1024))  # over the 64 KiB allowed before HELLO; no body follows
    (err,) = await raw.until_closed()
    assert err["id"] is None and err["error"]["code"] == "TOO_LARGE"
    assert err["error"]["details"]["max_frame"] == 64 * 1024


async def test_a_partial_frame_before_hello_meets_the_hello_deadline(strict: ServerHandle) -> None:
    raw = await Raw.open(strict.address, hello=False)
    raw.send(header(60 * 1024) + b"\x85" + b"x" * 1000)  # under the limit, never finished
    (err,) = await raw.until_closed()
    assert err["id"] is None and err["error"]["code"] == "UNAVAILABLE"
    assert err["error"]["details"] == {"reason": "hello_timeout"}
    assert front_of(strict).buffered == 0  # what it held is given back


async def test_a_slowloris_is_dropped_while_others_are_served(strict: ServerHandle) -> None:
    raw = await Raw.open(strict.address)
    raw.send(header(1024 * 1024))  # a 1 MiB frame, sent one byte at a time
    closed = asyncio.ensure_future(raw.until_closed())
    async with AsyncClient(strict.address) as other:
        for _ in range(5000):  # never enough to finish the frame
            if closed.done():
                break
            raw.send(b"\x00")
            await other.ping()  # paces the trickle, and is answered meanwhile
        frames = await closed
    assert frames and frames[-1]["error"]["code"] == "UNAVAILABLE"
    assert frames[-1]["error"]["details"] == {"reason": "frame_timeout"}


async def test_an_idle_connection_is_closed_and_fnclient_reconnects(strict: ServerHandle) -> None:
    raw = await Raw.open(strict.address)
    (notice,) = await raw.until_closed()
    assert notice["id"] is None and notice["error"]["details"] == {"reason": "idle_timeout"}
    async with AsyncClient(strict.address) as c:
        await c.ping()
        conn = front_of(strict).connections()[0]
        await conn.gone.wait()  # closed for idleness behind the client's back
        await c.ping()  # the next call reconnects


async def test_unfinished_frames_share_one_budget(server_config: ServerConfig) -> None:
    budget = 2 * 1024 * 1024
    h = ServerHandle(replace(server_config, max_buffered=budget))
    await h.start()
    try:
        async with AsyncClient(h.address) as c:
            await c.register("echo", wf.echo(), filename="echo.wasm")
        body = msgpack.packb(
            {"type": "request", "op": "invoke", "id": 1, "name": "echo", "input": b"y" * (3 << 20)}
        )
        raws = [await Raw.open(h.address) for _ in range(4)]
        for raw in raws:  # each sends two thirds of its 3 MiB frame, then stops
            raw.send(header(len(body)) + body[: 2 << 20])
        async with AsyncClient(h.address) as other:
            await other.ping()  # a small request never waits for the budget
            # Each connection may overshoot by one read (256 KiB) before it is paused.
            assert front_of(h).buffered <= budget + len(raws) * 320 * 1024
            await other.ping()
        for raw in raws:
            raw.send(body[2 << 20 :])
        for raw in raws:  # every paused connection was resumed and answered
            reply = await raw.frame()
            assert reply["id"] == 1 and reply["result"]["output"] == b"y" * (3 << 20)
            raw.close()
    finally:
        await h.stop()


# -- 3. bounded reply memory ------------------------------------------------------------------


async def test_a_client_that_never_reads_is_paused_then_dropped(server_config: ServerConfig) -> None:
    h = ServerHandle(
        replace(
            server_config,
            output_bytes=512 * 1024,
            reply_high_water=1024 * 1024,
            max_reply_buffer=2 * 1024 * 1024,
            max_reply_total=64 * 1024 * 1024,
            write_timeout_s=0.5,
        )
    )
    await h.start()
    try:
        async with AsyncClient(h.address) as c:
            await c.register("flood", wf.stdout_flood(), filename="flood.wasm")
            await c.register("echo", wf.echo(), filename="echo.wasm")
        raw = await Raw.open(h.address, rcvbuf=4096)
        conn = await server_side(h, raw)
        for i in range(1, 201):
            raw.send(encode_request("invoke", i, name="flood"))
        await raw.writer.drain()
        async with AsyncClient(h.address) as other:
            # The server stops reading the hoarder, drops it, and serves the others meanwhile.
            await conn.gone.wait()
            assert (await other.invoke("echo", b"still here")).output == b"still here"
        assert front_of(h).unread_total() == 0
        raw.close()
    finally:
        await h.stop()


def test_the_heap_is_trimmed_once_the_load_fell_by_half_and_enough() -> None:
    t = HeapTrimmer()
    t._trim = lambda _pad: 0  # glibc's own is exercised by the server test below
    mib = 1024 * 1024
    assert not t.due(0, 0)
    assert not t.due(0, 40 * mib)  # a peak
    assert not t.due(0, 30 * mib)  # fell, but not by half
    assert not t.due(0, 21 * mib)  # by half nearly, and 19 MiB: still over half
    assert t.due(0, 20 * mib)  # half, and more than 16 MiB below the peak
    assert not t.due(0, 0)  # while it runs, never twice
    t.trim()
    assert t.trims == 1
    assert not t.due(0, 10 * mib)  # the peak started again at 20: a fall of 10 is too small
    assert not t.due(600, 0)  # a peak of connections
    assert t.due(0, 0)  # they all left
    t.trim()
    small = HeapTrimmer()
    small._trim = lambda _pad: 0
    assert not small.due(0, 12 * mib) and not small.due(0, 0)  # a fall under 16 MiB: never


async def test_the_server_trims_its_heap_after_a_crowd_leaves(server_config: ServerConfig) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2000:  # both ends of 700 connections live in this process
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    h = ServerHandle(replace(server_config, max_connections=2048, max_connections_per_peer=2048))
    await h.start()
    try:
        trimmer = front_of(h)._trimmer
        before = trimmer.trims
        crowd = [await Raw.open(h.address) for _ in range(700)]
        await until(lambda: len(front_of(h).connections()) >= 700, "the crowd is connected")
        # The sweep must see the crowd at its peak before it leaves.
        await until(lambda: trimmer._peak >= 700 * HeapTrimmer.PER_CONNECTION, "the sweep saw the crowd")
        for raw in crowd:
            raw.close()
        await until(lambda: trimmer.trims > before, "a trim after the crowd left")
        async with AsyncClient(h.address) as c:
            await c.ping()
    finally:
        await h.stop()


async def test_replies_past_the_connection_cap_become_resource_exhausted(
    server_config: ServerConfig,
) -> None:
    h = ServerHandle(
        replace(
            server_config,
            output_bytes=256 * 1024,
            max_frame=512 * 1024,
            reply_high_water=16 * 1024 * 1024,
            max_reply_buffer=1024 * 1024,
            write_timeout_s=600.0,  # this test reads late on purpose; only the cap is tried
        )
    )
    await h.start()
    try:
        async with AsyncClient(h.address) as c:
            await c.register("flood", wf.stdout_flood(), filename="flood.wasm")
        raw = await Raw.open(h.address, rcvbuf=65536)
        conn = await server_side(h, raw)

        async def invokes(ids: range) -> None:
            for i in ids:
                raw.send(encode_request("invoke", i, name="flood"))
            await conn.frames_taken(ids[-1] + 1)  # HELLO and every invoke so far
            while conn.running():  # every invoke has answered (order of events)
                await asyncio.wait(conn.running())

        # 15 MiB of replies, more than the kernel buffers and the cap: while the client has
        # not yet been seen idle, the replies queue (a slow reader is not a hoarder).
        await invokes(range(1, 61))
        cap = max(h.config.max_reply_buffer, h.config.max_frame + 64)
        assert conn.unread() > cap
        # The hostile part: read nothing for a while (the behaviour tried, not a sync).
        await asyncio.sleep(1.5)
        before = conn.unread()
        await invokes(range(61, 81))
        assert conn.unread() - before < 20 * 4096  # only small error frames were added
        replies = [await raw.frame() for _ in range(80)]
        late = [r for r in replies if r["id"] > 60]
        assert {r["type"] for r in late} == {"error"}
        assert {r["error"]["code"] for r in late} == {"RESOURCE_EXHAUSTED"}
        assert late[0]["error"]["details"]["reason"] == "unread_replies"
        raw.close()
    finally:
        await h.stop()


# -- 4. descriptors: pending registers ----------------------------------------------------------


async def test_1100_registers_announced_on_one_connection(handle: ServerHandle) -> None:
    limit = handle.config.max_registers_per_connection
    wasm = wf.echo()
    digest = hashlib.sha256(wasm).hexdigest()
    raw = await Raw.open(handle.address)
    conn = await server_side(handle, raw)
    for i in range(1, 1101):  # announced, never uploaded
        raw.send(
            encode_request("register", i, name=f"f{i}", filename="f.wasm", size=len(wasm), sha256=digest)
        )
    refused = [await raw.frame() for _ in range(1100 - limit)]
    assert {r["error"]["code"] for r in refused} == {"RESOURCE_EXHAUSTED"}
    assert refused[0]["error"]["details"] == {"reason": "registers_per_connection", "limit": limit}
    async with AsyncClient(handle.address) as other:  # others are not starved of descriptors
        await other.register("echo", wasm, filename="echo.wasm")
        assert (await other.invoke("echo", b"ok")).output == b"ok"
    staging = handle.config.data_dir / ".staging"
    # The pending registers have sent no byte yet, so they hold no staging directory (opened
    # lazily at the first chunk); the only one made, the other client's, is gone with its commit.
    assert list(staging.iterdir()) == []
    raw.close()
    await conn.gone.wait()  # its registers were aborted and have cleaned up
    assert list(staging.iterdir()) == []


@pytest.mark.slow
async def test_exhausted_descriptors_give_resource_exhausted_and_the_server_recovers(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    proc = await asyncio.create_subprocess_exec(
        "prlimit", "--nofile=64:64", sys.executable, "-m", "fnserver", "--port", "0",
        "--data-dir", str(data), "--processes", "1", "--workers", "1", "--no-warm",
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    while True:
        line = (await asyncio.wait_for(proc.stderr.readline(), 120)).decode()
        assert line, "the server exited before listening"
        if "listening on " in line:
            address = line.split("listening on ")[1].split()[0]
            break
    drain = asyncio.ensure_future(proc.stderr.read())
    try:
        wasm = wf.echo()
        digest = hashlib.sha256(wasm).hexdigest()
        probe = await Raw.open(address)
        held: list[Raw] = []
        for _ in range(200):  # hold connections until the server has no descriptor left
            try:
                held.append(await Raw.open(address))
            except (ConnectionError, OSError):
                break  # accepted and closed at once: the server is out of descriptors
        else:
            raise AssertionError("the server never ran out of descriptors")
        # A register now cannot open its staging file: a stable code, not INTERNAL.
        probe.send(encode_request("register", 1, name="f", filename="f.wasm", size=len(wasm), sha256=digest))
        probe.send(encode_request("upload", 1, data=wasm))
        reply = await probe.frame()
        assert reply["type"] == "error" and reply["error"]["code"] == "RESOURCE_EXHAUSTED", reply
        assert "Too many open files" in reply["error"]["message"]
        assert str(data) not in reply["error"]["message"]
        for raw in held:
            raw.close()
        probe.send(encode_request("ping", 2))  # read after the closes above (same loop, later)
        assert (await probe.frame())["id"] == 2
        async with AsyncClient(address) as c:  # recovered by itself, no restart
            await c.register("echo", wasm, filename="echo.wasm")
            assert (await c.invoke("echo", b"back")).output == b"back"
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 60)
        await drain
    assert [p.name for p in (data / ".staging").iterdir()] == []


# -- 5. errors that say what happened -----------------------------------------------------------


def _zip(entries: dict[str, bytes], *, encrypted: str | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    raw = bytearray(buf.getvalue())
    if encrypted is not None:
        # zipfile writes no encrypted entries: set the flag bit (APPNOTE 4.4.4) by hand, in
        # the entry's local header and in its central directory record.
        with zipfile.ZipFile(io.BytesIO(bytes(raw))) as zf:
            info = zf.getinfo(encrypted)
        raw[info.header_offset + 6] |= 0x1
        central = raw.index(b"PK\x01\x02")
        name = encrypted.encode()
        while raw[central + 46 : central + 46 + len(name)] != name:
            central = raw.index(b"PK\x01\x02", central + 4)
        raw[central + 8] |= 0x1
    return bytes(raw)


@pytest.mark.parametrize(
    ("entries", "encrypted", "why"),
    [
        ({"go.mod": b"module m\n", "a" * 300 + ".go": b"package main\n"}, None, "name component"),
        ({"go.mod": b"module m\n", "main.go": b"package main\n"}, "main.go", "encrypted"),
    ],
)
async def test_bad_archive_entries_are_invalid_argument_naming_the_entry(
    client: AsyncClient, handle: ServerHandle, entries: dict[str, bytes], encrypted: str | None, why: str
) -> None:
    with pytest.raises(fnclient.InvalidArgumentError) as err:
        await client.register("bad", _zip(entries, encrypted=encrypted), filename="bad.zip")
    bad = encrypted or next(n for n in entries if len(n) > 200)
    assert err.value.details["entry"] in (bad, bad[:120] + "...")
    assert why in err.value.message
    assert str(handle.config.data_dir) not in err.value.message
    assert list((handle.config.data_dir / ".staging").iterdir()) == []


async def test_a_full_disk_is_resource_exhausted_and_keeps_earlier_versions(
    client: AsyncClient, handle: ServerHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    await client.register("echo", wf.echo(), filename="echo.wasm", alias="prod")
    from fnserver.registry import _fs

    def full(*args: Any, **kwargs: Any) -> Any:
        raise OSError(28, os.strerror(28), str(handle.config.data_dir / "x"))

    monkeypatch.setattr(_fs, "copy_verified", full)
    monkeypatch.setattr(_fs, "write_json_atomic", full)
    with pytest.raises(fnclient.ResourceExhaustedError) as err:
        await client.register("echo", wf.exit_code(3), filename="exit.wasm")
    assert str(handle.config.data_dir) not in err.value.message
    with pytest.raises(fnclient.ResourceExhaustedError):
        await client.alias("echo", "prod", 1)
    monkeypatch.undo()
    info = await client.get("echo")
    assert [v["version"] for v in info["versions"]] == [1] and info["aliases"] == {"prod": 1}
    assert (await client.invoke("echo", b"intact", version="prod")).output == b"intact"


async def _commit_without_precompile(handle: ServerHandle, name: str, wasm: bytes, tmp: Path) -> None:
    """A version whose module is not compiled yet: its first invoke reads main.wasm (as a
    serving process that did not run the register does)."""
    assert handle.server is not None
    registry = handle.server.registry
    staging = await registry.new_staging()
    path = staging / "main.wasm"
    path.write_bytes(wasm)
    meta = NewVersion(
        filename="f.wasm", size=len(wasm), sha256=hashlib.sha256(wasm).hexdigest(), kind="wasm",
        limits=FunctionLimits(5000, 128), description="", toolchain=None, build_ms=0, build_log=None,
    )
    await registry.commit(name, {"wasm": path}, meta)
    await registry.discard(staging)


async def test_invokes_racing_deletes_get_a_result_or_not_found(
    client: AsyncClient, handle: ServerHandle, tmp_path: Path
) -> None:
    outcomes: list[str] = []
    for round_ in range(15):
        name = f"race{round_}"
        code = round_ + 1  # new bytes each round: nothing compiled to fall back on
        await _commit_without_precompile(handle, name, wf.exit_code(code), tmp_path)

        async def call(name: str = name, code: int = code) -> str:
            try:
                res = await client.invoke(name, version=1)
            except fnclient.FnError as exc:
                return exc.code
            return "OK" if res.exit_code == code else "WRONG"

        calls = [asyncio.ensure_future(call()) for _ in range(40)]
        await asyncio.sleep(0)  # let them be written before the delete
        await client.delete(name, 1)
        outcomes += await asyncio.gather(*calls)
    assert set(outcomes) <= {"OK", "NOT_FOUND"}, sorted(set(outcomes))
    assert "NOT_FOUND" in outcomes


# -- 6. limits belong to the function; HELLO speaks an integer --------------------------------


async def test_an_invoke_may_lower_the_time_limit_never_raise_it(client: AsyncClient) -> None:
    await client.register("sleepy", wf.sleep(5), filename="sleep.wasm", timeout_ms=500)
    with pytest.raises(fnclient.InvalidArgumentError) as err:
        await client.invoke("sleepy", timeout_ms=8000)
    assert err.value.details["timeout_ms"] == 500
    assert "500 ms" in err.value.message
    with pytest.raises(fnclient.FunctionTimeoutError) as timeout:
        await client.invoke("sleepy", timeout_ms=100)
    assert timeout.value.details["timeout_ms"] == 100
    with pytest.raises(fnclient.FunctionTimeoutError) as timeout:
        await client.invoke("sleepy")
    assert timeout.value.details["timeout_ms"] == 500


async def test_a_client_cannot_speak_for_a_serving_process(handle: ServerHandle) -> None:
    """The async queue's internal operations (§5.15) take the control process's secret, not a
    client's standing: even the loopback admin cannot claim, renew or complete calls, or
    report records, which would let it steal, pin or forge other tenants' async calls."""
    from fnserver.protocol import ClaimRequest, CompleteRequest, RenewRequest, ReportRequest

    raw = await Raw.open(handle.address)
    call_id = "inv_" + "0" * 24
    forged = [ClaimRequest(1, 0), RenewRequest((call_id,)), CompleteRequest(call_id), ReportRequest()]
    for req_id, req in enumerate(forged, 1):
        raw.send(encode_request(req.op, req_id, **req.to_wire()))
        reply = await raw.frame()
        assert reply["id"] == req_id and reply["error"]["code"] == "PERMISSION_DENIED", (req.op, reply)
    raw.close()


@pytest.mark.parametrize("bad", [True, 1.0, "1", None, 2])
async def test_hello_protocol_must_be_the_integer_one(handle: ServerHandle, bad: object) -> None:
    raw = await Raw.open(handle.address, hello=False)
    raw.send(encode_request("hello", 0, protocol=bad, token=None))
    (err,) = await raw.until_closed()
    assert err["error"]["code"] == "PROTOCOL_ERROR"
    assert "must be the integer 1" in err["error"]["message"]
    assert err["error"]["details"] == {"protocol": 1}
