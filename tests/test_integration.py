"""End-to-end: a real server on port 0, real worker processes, talked to over TCP."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import struct
from collections.abc import Callable
from pathlib import Path

import fnclient
import msgpack
import pytest
from fnclient import AsyncClient, Client

from fnserver.protocol import encode_frame, encode_request

from . import wasm_fixtures as wf
from .conftest import ServerHandle, run_fn, start_server_process


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


async def _until(predicate: Callable[[], bool], what: str) -> None:
    """Poll server-side state until it holds. Correctness never depends on the interval; the
    bound (about 60 s of polls) only turns a hang into a failure."""
    for _ in range(6000):
        if predicate():
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"never observed: {what}")


def _running(handle: ServerHandle) -> dict[str, int]:
    """Calls the server's exec pool holds in its workers, per function."""
    assert handle.server is not None
    return handle.server.pool.stats()["running"]


async def test_register_twice_versions_aliases_delete(client: AsyncClient, tmp_path: Path) -> None:
    wasm = _write(tmp_path, "echo.wasm", wf.echo())
    m1 = await client.register("echo", wasm)
    m2 = await client.register("echo", wasm, alias="prod")
    assert (m1["version"], m2["version"]) == (1, 2)
    assert m1["kind"] == "wasm" and m1["artifacts"] == ["wasm"] and m1["mode"] == "wasm"
    assert m1["sha256"] == hashlib.sha256(wasm.read_bytes()).hexdigest()
    assert m2["aliases"] == ["prod"]

    by_name = await client.invoke("echo", b"hello")
    assert (by_name.output, by_name.exit_code, by_name.version) == (b"hello", 0, 2)
    assert by_name.duration_us > 0 and by_name.wall_us >= by_name.duration_us
    assert (await client.invoke("echo", b"x", version=1)).version == 1
    await client.alias("echo", "prod", 1)
    assert (await client.invoke("echo", "via alias", version="prod")).output == b"via alias"
    assert (await client.invoke("echo", b"", version="prod")).version == 1

    listing = await client.list()
    assert [f["name"] for f in listing] == ["echo"]
    assert listing[0]["versions"] == [1, 2] and listing[0]["latest"] == 2
    assert listing[0]["aliases"] == {"prod": 1}

    deleted = await client.delete("echo", 1)
    assert deleted["deleted"] == [1] and deleted["aliases_removed"] == ["prod"]
    with pytest.raises(fnclient.NotFoundError):
        await client.invoke("echo", version=1)
    with pytest.raises(fnclient.NotFoundError):
        await client.invoke("echo", version="prod")
    assert (await client.get("echo"))["latest"] == 2

    # Versions are never reused, even after the newest is deleted.
    await client.delete("echo", 2)
    with pytest.raises(fnclient.NotFoundError):
        await client.invoke("echo")
    assert (await client.register("echo", wasm))["version"] == 3


async def test_exit_code_stderr_and_args(client: AsyncClient) -> None:
    await client.register("exiter", wf.exit_code(3), filename="exit.wasm")
    res = await client.invoke("exiter")
    assert (res.output, res.stderr, res.exit_code) == (b"bye", b"oops", 3)
    await client.register("argv", wf.argv_echo(), filename="argv.wasm")
    res = await client.invoke("argv", args=["a b", "--flag"])
    assert res.output == b"argv\na b\n--flag\n"


async def test_unknown_function_is_not_found(client: AsyncClient) -> None:
    with pytest.raises(fnclient.NotFoundError) as info:
        await client.invoke("nope")
    assert info.value.code == "NOT_FOUND" and "nope" in str(info.value)
    with pytest.raises(fnclient.NotFoundError):
        await client.get("nope")
    with pytest.raises(fnclient.NotFoundError):
        await client.delete("nope")


async def test_loop_times_out_while_others_are_served(
    handle: ServerHandle, client: AsyncClient
) -> None:
    await client.register("spin", wf.infinite_loop(), filename="spin.wasm", timeout_ms=500)
    await client.register("echo", wf.echo(), filename="echo.wasm")
    spin = asyncio.ensure_future(client.invoke("spin"))
    # The echoes start once the loop holds a worker (or, on a starved machine, has already
    # been stopped): they are served by the other worker, not queued behind the loop.
    await _until(lambda: _running(handle).get("spin") == 1 or spin.done(), "spin in a worker")
    others = [await client.invoke("echo", f"req {i}".encode()) for i in range(20)]
    assert [r.output for r in others] == [f"req {i}".encode() for i in range(20)]
    # It ends, and by its own 500 ms limit (the wait_for only turns a hang into a failure).
    with pytest.raises(fnclient.FunctionTimeoutError) as info:
        await asyncio.wait_for(spin, 60)
    assert isinstance(info.value, TimeoutError)
    assert info.value.details["timeout_ms"] == 500 and "fuel" not in info.value.details
    # The pool recovered: the function can be called again and times out again, at the limit
    # this call asked for.
    with pytest.raises(fnclient.FunctionTimeoutError) as info:
        await asyncio.wait_for(client.invoke("spin", timeout_ms=200), 60)
    assert info.value.details["timeout_ms"] == 200
    assert (await client.invoke("echo", b"after")).output == b"after"


async def test_sleeping_guest_is_killed_at_the_wall_deadline(
    handle: ServerHandle, client: AsyncClient
) -> None:
    # The guest asks for an hour in poll_oneoff, where epochs cannot stop it: only the wall
    # deadline ends the call, so an answer at all proves the guest was killed (the wait_for
    # only turns a hang into a failure).
    await client.register("sleeper", wf.sleep(3600), filename="sleep.wasm", timeout_ms=300)
    await client.register("echo", wf.echo(), filename="echo.wasm")
    with pytest.raises(fnclient.FunctionTimeoutError) as info:
        await asyncio.wait_for(client.invoke("sleeper"), 60)
    assert info.value.details["timeout_ms"] == 300
    assert (await client.invoke("echo", b"still here")).output == b"still here"
    # The killed call gave its place back: with one worker per function, the next two calls
    # could not run if the first sleeper still held one.
    for _ in range(2):
        with pytest.raises(fnclient.FunctionTimeoutError):
            await asyncio.wait_for(client.invoke("sleeper"), 60)
    await _until(lambda: _running(handle) == {}, "no call left in a worker")
    assert (await client.invoke("echo", b"and here")).output == b"and here"


async def test_memory_growth_stops_at_the_limit(client: AsyncClient) -> None:
    await client.register("hog", wf.grow_forever(), filename="hog.wasm", memory_mb=16)
    with pytest.raises(fnclient.MemoryLimitError):
        await client.invoke("hog")


async def test_64_concurrent_invocations_on_one_connection(client: AsyncClient) -> None:
    await client.register("echo", wf.echo(), filename="echo.wasm")
    payloads = [os.urandom(100 + i) for i in range(64)]
    results = await asyncio.gather(*(client.invoke("echo", p) for p in payloads))
    assert [r.output for r in results] == payloads


async def test_restart_keeps_everything(handle: ServerHandle) -> None:
    async with AsyncClient(handle.address) as c:
        await c.register("echo", wf.echo(), filename="echo.wasm")
        await c.register("echo", wf.echo(), filename="echo.wasm", alias="stable")
        await c.register("other", wf.exit_code(0), filename="x.wasm")
        before = await c.list()
    await handle.stop()
    await handle.start()
    async with AsyncClient(handle.address) as c:
        assert await c.list() == before
        assert (await c.invoke("echo", b"back", version="stable")).output == b"back"
        assert (await c.register("echo", wf.echo(), filename="echo.wasm"))["version"] == 3


async def test_bad_uploads_store_nothing(handle: ServerHandle, client: AsyncClient, tmp_path: Path) -> None:
    data_dir = handle.config.data_dir

    def stored() -> list[str]:
        return sorted(p.name for p in data_dir.iterdir() if not p.name.startswith("."))

    with pytest.raises(fnclient.InvalidArgumentError):
        await client.register("../evil", wf.echo(), filename="e.wasm")
    with pytest.raises(fnclient.InvalidArgumentError):
        await client.register("Upper", wf.echo(), filename="e.wasm")
    with pytest.raises(fnclient.InvalidArgumentError) as info:
        await client.register("notwasm", b"\0asm but not really a module", filename="x.wasm")
    assert "WebAssembly" in str(info.value)
    assert stored() == []
    assert list((data_dir / ".staging").iterdir()) == []


async def _raw_connect(address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = address.rsplit(":", 1)
    return await asyncio.open_connection(host, int(port))


async def _read_frame(reader: asyncio.StreamReader) -> dict:
    """The next final frame (response or error); progress events are skipped."""
    while True:
        (n,) = struct.unpack(">I", await reader.readexactly(4))
        frame = msgpack.unpackb(await reader.readexactly(n))
        if frame["type"] != "event":
            return frame


async def _hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> dict:
    writer.write(encode_request("hello", 0, protocol=1, token=None))
    reply = await _read_frame(reader)
    assert reply["type"] == "response" and reply["result"]["protocol"] == 1
    return reply["result"]


async def test_checksum_and_size_are_enforced_on_the_wire(handle: ServerHandle) -> None:
    reader, writer = await _raw_connect(handle.address)
    await _hello(reader, writer)
    data = wf.echo()
    # Wrong sha256: the upload is refused after the last chunk.
    writer.write(encode_request("register", 1, name="a", filename="a.wasm", size=len(data), sha256="0" * 64))
    writer.write(encode_request("upload", 1, data=data))
    reply = await _read_frame(reader)
    assert reply["type"] == "error" and reply["error"]["code"] == "CHECKSUM_MISMATCH"
    # More bytes than announced: TOO_LARGE while streaming; later chunks are discarded silently.
    sha = hashlib.sha256(data).hexdigest()
    writer.write(encode_request("register", 2, name="a", filename="a.wasm", size=10, sha256=sha))
    writer.write(encode_request("upload", 2, data=data))
    writer.write(encode_request("upload", 2, data=b"more"))
    writer.write(encode_request("ping", 3))
    replies = {r["id"]: r for r in [await _read_frame(reader), await _read_frame(reader)]}
    assert replies[2]["error"]["code"] == "TOO_LARGE"
    assert replies[3]["result"] == {"pong": True}
    # Over max_upload: refused at register, before any byte.
    writer.write(encode_request("register", 4, name="a", filename="a.wasm", size=1 << 40, sha256=sha))
    assert (await _read_frame(reader))["error"]["code"] == "TOO_LARGE"
    writer.close()
    assert [p for p in handle.config.data_dir.iterdir() if not p.name.startswith(".")] == []


async def test_max_upload_enforced_while_streaming(server_config, tmp_path: Path) -> None:
    h = ServerHandle(server_config)
    await h.start(max_upload=4096)
    try:
        async with AsyncClient(h.address) as c:
            with pytest.raises(fnclient.TooLargeError):
                await c.register("big", b"\0asm" + b"\0" * 5000, filename="big.wasm")
            assert (await c.list()) == []
    finally:
        await h.stop()


async def test_malformed_frames_get_protocol_errors_and_others_keep_working(
    handle: ServerHandle, client: AsyncClient
) -> None:
    await client.register("echo", wf.echo(), filename="echo.wasm")
    cases = [
        b"\x00\x00\x00\x02\x82\xa1" + b"\x00\x00",  # truncated map inside the body
        b"\x00\x00\x00\x01\xc1",  # invalid msgpack byte
        struct.pack(">I", 1 << 31),  # length prefix far over max_frame
        encode_frame({"type": "response", "id": 1}),  # a client may not send responses
    ]
    expected = ["PROTOCOL_ERROR", "PROTOCOL_ERROR", "TOO_LARGE", "PROTOCOL_ERROR"]
    for raw, code in zip(cases, expected, strict=True):
        reader, writer = await _raw_connect(handle.address)
        await _hello(reader, writer)
        writer.write(raw)
        reply = await _read_frame(reader)
        assert reply["type"] == "error" and reply["error"]["code"] == code
        assert await reader.read() == b""  # the server closed this connection
        writer.close()
        assert (await client.invoke("echo", b"ok")).output == b"ok"


async def test_hello_is_required_and_checked(server_config) -> None:
    h = ServerHandle(server_config)
    await h.start(token="s3cret")
    try:
        reader, writer = await _raw_connect(h.address)
        writer.write(encode_request("ping", 1))
        reply = await _read_frame(reader)
        assert reply["error"]["code"] == "UNAUTHENTICATED"
        writer.close()
        reader, writer = await _raw_connect(h.address)
        writer.write(encode_request("hello", 0, protocol=99, token="s3cret"))
        assert (await _read_frame(reader))["error"]["code"] == "PROTOCOL_ERROR"
        writer.close()
        with pytest.raises(fnclient.UnauthenticatedError):
            async with AsyncClient(h.address, token="wrong") as c:
                await c.ping()
        async with AsyncClient(h.address, token="s3cret") as c:
            await c.ping()
            assert c.server_info["max_upload"] == 64 * 1024 * 1024
    finally:
        await h.stop()


async def test_unknown_op_and_bad_fields_keep_the_connection(handle: ServerHandle) -> None:
    reader, writer = await _raw_connect(handle.address)
    await _hello(reader, writer)
    writer.write(encode_request("explode", 1))
    writer.write(encode_request("invoke", 2, name="x", input="not bytes", args="nope"))
    writer.write(encode_request("ping", 3))
    replies = {}
    for _ in range(3):
        r = await _read_frame(reader)
        replies[r["id"]] = r
    assert replies[1]["error"]["code"] == "INVALID_ARGUMENT"
    assert replies[2]["error"]["code"] in {"INVALID_ARGUMENT", "NOT_FOUND"}
    assert replies[3]["result"] == {"pong": True}
    writer.close()


async def test_server_process_sync_client_and_clean_shutdown(tmp_path: Path) -> None:
    proc, address = await start_server_process(tmp_path)
    try:
        def use_sync_client() -> tuple[int, bytes]:
            with Client(address) as c:
                meta = c.register("echo", wf.echo(), filename="echo.wasm")
                return meta["version"], c.invoke("echo", b"sync").output

        assert await asyncio.to_thread(use_sync_client) == (1, b"sync")
        # A call in flight when SIGTERM arrives gets UNAVAILABLE (or sees the connection
        # close), and the server exits cleanly without waiting for the guest: it asked for an
        # hour and its limit is the 300 s maximum, so a server that waited would hang here.
        async with AsyncClient(address) as c:
            await c.register("sleeper", wf.sleep(3600), filename="s.wasm", timeout_ms=300_000)
        reader, writer = await _raw_connect(address)
        await _hello(reader, writer)
        # One write, invoke first: the server dispatches a connection's frames in order, so the
        # ping's reply proves it has taken the call.
        writer.write(encode_request("invoke", 1, name="sleeper", input=b"")
                     + encode_request("ping", 2))
        first = await asyncio.wait_for(_read_frame(reader), 60)
        assert (first["id"], first.get("result")) == (2, {"pong": True}), first
        proc.send_signal(signal.SIGTERM)
        try:
            reply = await asyncio.wait_for(_read_frame(reader), 120)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the server closed the connection
        else:
            assert reply["id"] == 1 and reply["type"] == "error", reply
            assert reply["error"]["code"] == "UNAVAILABLE", reply
        writer.close()
        assert await asyncio.wait_for(proc.wait(), 120) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_cli_end_to_end(handle: ServerHandle, tmp_path: Path) -> None:
    addr = handle.address
    wasm = _write(tmp_path, "echo.wasm", wf.echo())
    code, out, err = await run_fn(addr, "register", "echo", str(wasm), "--json")
    assert code == 0, err
    assert json.loads(out)["version"] == 1
    code, out, err = await run_fn(addr, "register", "echo", str(wasm), "--alias", "prod", "--timeout", "2000")
    assert code == 0, err
    assert b"2" in out

    code, out, _ = await run_fn(addr, "invoke", "echo", "--input", "hi there")
    assert (code, out) == (0, b"hi there")
    code, out, _ = await run_fn(addr, "invoke", "echo@1", input=b"from stdin")
    assert (code, out) == (0, b"from stdin")
    inp = _write(tmp_path, "in.bin", b"\x00\x01binary")
    code, out, _ = await run_fn(addr, "invoke", "echo@prod", "--input-file", str(inp))
    assert (code, out) == (0, b"\x00\x01binary")

    exiter = _write(tmp_path, "exit.wasm", wf.exit_code(7))
    assert (await run_fn(addr, "register", "exiter", str(exiter)))[0] == 0
    code, out, err = await run_fn(addr, "invoke", "exiter")
    assert (code, out, err) == (7, b"bye", b"oops")

    spin = _write(tmp_path, "spin.wasm", wf.infinite_loop())
    code, out, err = await run_fn(addr, "register", "spin", str(spin), "--fuel", "100000", "--json")
    assert code == 0 and json.loads(out)["limits"]["fuel"] == 100000, err
    code, out, _ = await run_fn(addr, "get", "spin@1")
    assert code == 0 and b"fuel 100000" in out
    code, out, _ = await run_fn(addr, "get", "spin")
    assert code == 0 and out.splitlines()[2].split()[7] == b"100000"  # the FUEL column
    code, out, err = await run_fn(addr, "invoke", "spin", "--input", "")
    assert code == 125 and err.decode().startswith("error: TIMEOUT: ") and b"fuel" in err

    argv = _write(tmp_path, "argv.wasm", wf.argv_echo())
    assert (await run_fn(addr, "register", "argv", str(argv)))[0] == 0
    code, out, _ = await run_fn(addr, "invoke", "argv", "--input", "", "--", "x", "--y")
    assert (code, out) == (0, b"argv\nx\n--y\n")

    code, out, _ = await run_fn(addr, "list", "--json")
    names = {f["name"]: f for f in json.loads(out)}
    assert names["echo"]["versions"] == [1, 2] and names["echo"]["aliases"] == {"prod": 2}
    code, out, _ = await run_fn(addr, "list")
    assert code == 0 and b"echo" in out and b"exiter" in out
    code, out, _ = await run_fn(addr, "get", "echo", "--json")
    assert code == 0 and [v["version"] for v in json.loads(out)["versions"]] == [1, 2]
    code, out, _ = await run_fn(addr, "get", "echo")
    assert code == 0 and b"prod" in out

    assert (await run_fn(addr, "alias", "echo", "prod", "1"))[0] == 0
    code, out, _ = await run_fn(addr, "invoke", "echo@prod", "--input", "p", "--json")
    assert code == 0 and json.loads(out)["version"] == 1

    assert (await run_fn(addr, "delete", "echo@1"))[0] == 0
    code, out, err = await run_fn(addr, "invoke", "echo@1", "--input", "")
    assert code == 125
    assert err.decode().startswith("error: NOT_FOUND: ")

    code, _, err = await run_fn(addr, "invoke", "missing", "--input", "")
    assert code == 125 and err.decode().startswith("error: NOT_FOUND: ")
    code, _, err = await run_fn(addr, "register", "Bad Name", str(wasm))
    assert code == 125 and err.decode().startswith("error: INVALID_ARGUMENT: ")
    code, _, err = await run_fn("127.0.0.1:1", "list")
    assert code == 125 and err.decode().startswith("error: UNAVAILABLE: ")
