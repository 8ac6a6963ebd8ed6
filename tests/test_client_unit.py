"""fnclient against a fake peer: a tiny in-test server speaking docs/PROTOCOL.md framing.

The fake is a test double of the *server* (HELLO, a few ops, chunked uploads, errors); the
client under test is the real one. The real server is exercised by the integration tests.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import fnclient
import pytest
from fnclient import (
    AsyncClient,
    BuildError,
    ChecksumMismatchError,
    Client,
    FnError,
    FunctionTimeoutError,
    InvalidArgumentError,
    InvokeResult,
    NotFoundError,
    ProtocolError,
    TooLargeError,
    TrapError,
    UnauthenticatedError,
    UnavailableError,
    cli,
    parse_address,
)

from fnserver.protocol import (
    CHUNK_SIZE,
    DEFAULT_MAX_FRAME,
    FrameDecoder,
    encode_error,
    encode_event,
    encode_response,
    error_from_wire,
)

# -- the fake peer ---------------------------------------------------------------------------

_ERRORS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "missing": ("NOT_FOUND", "no function named 'missing'", {}),
    "slowpoke": ("TIMEOUT", "function exceeded its 100 ms limit", {"timeout_ms": 100}),
    "bad": ("INVALID_ARGUMENT", "bad input", {}),
    "trap": ("TRAP", "guest trapped", {"trap": "stack_overflow"}),
    "busy": ("UNAVAILABLE", "all workers busy", {}),
    "weird": ("SOMETHING_NEW", "a code from the future", {}),
}


class FakePeer:
    """Answers HELLO, ping, invoke, register/upload, list, get, delete and alias.

    Tests synchronise on what the fake received and sent (:meth:`until`), never on a clock.
    """

    def __init__(
        self,
        *,
        max_frame: int = DEFAULT_MAX_FRAME,
        chunk_size: int = CHUNK_SIZE,
        token: str | None = None,
    ) -> None:
        self.max_frame = max_frame
        self.chunk_size = chunk_size
        self.token = token
        self.received: list[dict[str, Any]] = []
        self.sent_ids: list[int] = []
        self.uploads: dict[int, dict[str, Any]] = {}
        self.connections = 0
        #: Calls to "held" wait for this; calls to "ordered" wait for ``ordered_batch`` peers.
        self.release = asyncio.Event()
        self.ordered_batch = 0
        self._ordered_seen = 0
        self._ordered: list[int] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for w in self._writers:
            w.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    def invokes(self, name: str) -> list[dict[str, Any]]:
        """The invoke frames received for ``name``, in arrival order."""
        return [f for f in self.received if f.get("op") == "invoke" and f.get("name") == name]

    async def until(self, predicate: Callable[[], bool], what: str = "") -> None:
        """Wait until ``predicate()`` holds; it is re-checked each time the fake receives or
        sends a frame. The 60 s bound only turns a hang into a failure."""
        try:
            await asyncio.wait_for(self._until(predicate), 60)
        except TimeoutError:
            pytest.fail(f"the fake peer never saw: {what or predicate}")

    async def _until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter

    def _changed(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        self._spawn(self._conn(reader, writer))

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = FrameDecoder(self.max_frame)
        hello_done = False
        try:
            while data := await reader.read(65536):
                decoder.feed(data)
                for frame in decoder.frames():
                    self.received.append(frame)
                    if not hello_done:
                        if frame.get("op") != "hello" or frame.get("token") != self.token:
                            writer.write(_err(frame.get("id"), "UNAUTHENTICATED", "bad token"))
                            writer.close()
                            return
                        hello_done = True
                        writer.write(encode_response(frame["id"], self.hello_result()))
                        continue
                    self._handle(frame, writer)
                    self._changed()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    def hello_result(self) -> dict[str, Any]:
        return {
            "server": "fnserver",
            "server_version": "0.0-fake",
            "protocol": 1,
            "max_frame": self.max_frame,
            "max_upload": 1 << 20,
            "chunk_size": self.chunk_size,
            "limits": {"timeout_ms": 1000, "max_timeout_ms": 5000, "memory_mb": 64},
        }

    def _reply(self, writer: asyncio.StreamWriter, req_id: int, result: dict[str, Any]) -> None:
        self.sent_ids.append(req_id)
        writer.write(encode_response(req_id, result))
        self._changed()

    def _handle(self, frame: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        op, req_id = frame["op"], frame["id"]
        if op == "ping":
            self._reply(writer, req_id, {"pong": True})
        elif op == "invoke":
            self._spawn(self._invoke(frame, writer))
        elif op == "register":
            self.uploads[req_id] = {"frame": frame, "data": bytearray(), "chunks": 0}
            if frame["name"] == "reject":  # rejected before the chunks arrive (§5.2)
                del self.uploads[req_id]
                writer.write(_err(req_id, "INVALID_ARGUMENT", "no"))
        elif op == "upload":
            up = self.uploads.get(req_id)
            if up is None:
                return  # §5.2: chunks for a finished or rejected upload are dropped
            up["data"] += frame["data"]
            up["chunks"] += 1
            size = up["frame"]["size"]
            writer.write(
                encode_event(
                    req_id,
                    "progress",
                    stage="upload",
                    message="",
                    received=len(up["data"]),
                    size=size,
                )
            )
            if len(up["data"]) >= size:
                self._finish_upload(req_id, up, writer)
        elif op == "list":
            self._reply(
                writer,
                req_id,
                {
                    "functions": [
                        {
                            "name": "alpha",
                            "latest": 3,
                            "versions": [1, 2, 3],
                            "aliases": {"prod": 2},
                            "kind": "go",
                            "description": "",
                        },
                        {
                            "name": "beta",
                            "latest": 1,
                            "versions": [1],
                            "aliases": {},
                            "kind": "wasm",
                            "description": "",
                        },
                    ]
                },
            )
        elif op == "get":
            if frame["name"] != "alpha":
                writer.write(_err(req_id, "NOT_FOUND", f"no function named {frame['name']!r}"))
                return
            self._reply(
                writer,
                req_id,
                {"name": "alpha", "latest": 1, "aliases": {}, "versions": [_meta("alpha", 1)]},
            )
        elif op == "delete":
            version = frame["version"]
            self._reply(
                writer,
                req_id,
                {
                    "name": frame["name"],
                    "deleted": [1, 2] if version is None else [version],
                    "aliases_removed": ["prod"],
                },
            )
        elif op == "alias":
            self._reply(
                writer,
                req_id,
                {
                    "name": frame["name"],
                    "alias": frame["alias"],
                    "version": frame["version"],
                    "previous": None,
                },
            )
        else:
            writer.write(_err(req_id, "INVALID_ARGUMENT", f"unknown operation {op!r}"))

    def _finish_upload(self, req_id: int, up: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        del self.uploads[req_id]
        req = up["frame"]
        self.uploads[-req_id] = up  # kept for the test to inspect
        if hashlib.sha256(up["data"]).hexdigest() != req["sha256"]:
            writer.write(_err(req_id, "CHECKSUM_MISMATCH", "sha256 differs"))
            return
        if req["name"] == "broken":
            writer.write(
                _err(req_id, "BUILD_FAILED", "build failed", {"log": "main.go:3:1: syntax error\n"})
            )
            return
        writer.write(encode_event(req_id, "progress", stage="build", message="go build (wasip1)"))
        meta = _meta(req["name"], 2)
        meta.update(
            filename=req["filename"],
            size=req["size"],
            sha256=req["sha256"],
            options=req.get("options", {}),
        )
        self._reply(writer, req_id, meta)

    async def _invoke(self, frame: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        req_id, name, data = frame["id"], frame["name"], frame.get("input", b"")
        if name in _ERRORS:
            writer.write(_err(req_id, *_ERRORS[name]))
        elif name == "ordered":
            # Held until ``ordered_batch`` of them are in, then answered smallest input first:
            # replies leave in an order of the fake's choosing, decided by events, not a clock.
            key = int(data)
            self._ordered.append(key)
            self._ordered_seen += 1
            self._changed()
            await self._until(
                lambda: self._ordered_seen >= self.ordered_batch and min(self._ordered) == key
            )
            self._ordered.remove(key)
            self._reply(writer, req_id, _result(data))
        elif name == "held":  # answered once the test sets ``release``
            await self.release.wait()
            self._reply(writer, req_id, _result(data))
        elif name == "hang":
            await asyncio.sleep(3600)
        elif name == "die":
            writer.close()
        elif name == "conn-error":
            writer.write(_err(None, "PROTOCOL_ERROR", "you broke it"))
            writer.close()
        elif name == "huge":  # over the max_frame the fake itself announced
            writer.write(encode_response(req_id, {"output": b"x" * (self.max_frame + 1)}))
        else:
            result = _result(data)
            result.update(
                version=frame.get("version") if isinstance(frame.get("version"), int) else 1,
                exit_code=len(frame.get("args", [])),
                stderr=json.dumps(
                    {"args": frame.get("args", []), "version": frame.get("version")}
                ).encode(),
                truncated=name == "cut",
            )
            self._reply(writer, req_id, result)


def _err(
    req_id: int | None, code: str, message: str, details: dict[str, Any] | None = None
) -> bytes:
    return encode_error(req_id, error_from_wire(code, message, details or {}))


def _result(output: bytes) -> dict[str, Any]:
    return {
        "output": output,
        "stderr": b"",
        "truncated": False,
        "exit_code": 0,
        "version": 1,
        "mode": "wasm",
        "duration_us": 10,
        "queue_us": 2,
        "wall_us": 15,
        "memory_peak": 65536,
    }


def _meta(name: str, version: int) -> dict[str, Any]:
    return {
        "name": name,
        "version": version,
        "created": "2025-01-01T00:00:00Z",
        "filename": "main.go",
        "size": 100,
        "sha256": "ab" * 32,
        "kind": "go",
        "artifacts": ["wasm", "native"],
        "mode": "wasm",
        "limits": {"timeout_ms": 1000, "memory_mb": 64},
        "description": "",
        "toolchain": "go1.24",
        "build_ms": 1400,
        "aliases": [],
    }


@pytest.fixture
async def peer() -> AsyncIterator[FakePeer]:
    fake = FakePeer()
    await fake.start()
    yield fake
    await fake.close()


async def _peer(**kwargs: Any) -> FakePeer:
    fake = FakePeer(**kwargs)
    await fake.start()
    return fake


# -- addresses and results ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("example.com:9000", ("example.com", 9000)),
        ("example.com", ("example.com", 8080)),
        ("[::1]:8081", ("::1", 8081)),
        ("[::1]", ("::1", 8080)),
        ("::1", ("::1", 8080)),
        ("127.0.0.1:1", ("127.0.0.1", 1)),
    ],
)
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["", "host:", "host:port", "host:70000", ":80", "[::1", "[::1]x"])
def test_parse_address_rejects(text: str) -> None:
    with pytest.raises(InvalidArgumentError):
        parse_address(text)


def test_invoke_result_is_frozen() -> None:
    result = InvokeResult.from_wire(_result(b"hi"))
    assert (result.output, result.memory_peak, result.mode) == (b"hi", 65536, "wasm")
    with pytest.raises(AttributeError):
        result.output = b"other"  # type: ignore[misc]


def test_public_api() -> None:
    for name in fnclient.__all__:
        assert hasattr(fnclient, name), name
    assert issubclass(fnclient.FunctionTimeoutError, TimeoutError)
    assert issubclass(fnclient.InvalidArgumentError, ValueError)


# -- the async client --------------------------------------------------------------------------


async def test_hello_ping_and_server_info(peer: FakePeer) -> None:
    async with AsyncClient(peer.address) as client:
        await client.ping()
        assert client.server_info["server"] == "fnserver"
        assert client.server_info["chunk_size"] == CHUNK_SIZE
    hello = peer.received[0]
    assert (hello["op"], hello["id"], hello["protocol"], hello["token"]) == ("hello", 0, 1, None)
    assert peer.received[1]["op"] == "ping"


async def test_token_and_unauthenticated() -> None:
    fake = await _peer(token="s3cret")
    try:
        async with AsyncClient(fake.address, "s3cret") as client:
            await client.ping()
        with pytest.raises(UnauthenticatedError):
            await AsyncClient(fake.address, "wrong").connect()
    finally:
        await fake.close()


async def test_connect_refused_is_unavailable(peer: FakePeer) -> None:
    address = peer.address
    await peer.close()
    with pytest.raises(UnavailableError, match="cannot connect to 127.0.0.1"):
        await AsyncClient(address, connect_timeout=2).connect()


async def test_out_of_order_responses_reach_their_callers(peer: FakePeer) -> None:
    keys = [b"4", b"0", b"2", b"1", b"3"]
    peer.ordered_batch = len(keys)  # all five are in flight before the first reply leaves
    async with AsyncClient(peer.address) as client:
        calls = asyncio.gather(*(client.invoke("ordered", k) for k in keys))
        results = await asyncio.wait_for(calls, 60)  # a safety net: the fake decides the order
    assert [r.output for r in results] == keys
    frames = peer.invokes("ordered")
    sent_inputs = {f["id"]: f["input"] for f in frames}
    answered = [sent_inputs[i] for i in peer.sent_ids]
    assert answered == sorted(keys, key=int)
    assert answered != [f["input"] for f in frames]  # the fake really answered out of order


async def test_64_concurrent_invokes_on_one_connection(peer: FakePeer) -> None:
    async with AsyncClient(peer.address) as client:
        results = await asyncio.gather(*(client.invoke("echo", f"n{i}") for i in range(64)))
    assert [r.output for r in results] == [f"n{i}".encode() for i in range(64)]
    assert peer.connections == 1
    ids = [f["id"] for f in peer.received if f.get("op") == "invoke"]
    assert len(set(ids)) == 64


async def test_invoke_fields_on_the_wire(peer: FakePeer) -> None:
    async with AsyncClient(peer.address) as client:
        r = await client.invoke(
            "echo", "héllo", version="prod", args=["-v", "x"], timeout_ms=50, mode="native"
        )
        assert r.output == "héllo".encode()
        assert r.exit_code == 2
        await client.invoke("echo", b"", version="7")
        await client.invoke("echo", version="latest")
    frames = [f for f in peer.received if f.get("op") == "invoke"]
    assert frames[0]["input"] == "héllo".encode()
    assert isinstance(frames[0]["input"], bytes)
    assert (
        frames[0]["version"],
        frames[0]["args"],
        frames[0]["timeout_ms"],
        frames[0]["mode"],
    ) == (
        "prod",
        ["-v", "x"],
        50,
        "native",
    )
    assert frames[1]["version"] == 7
    assert "version" not in frames[2] and "args" not in frames[2]


@pytest.mark.parametrize(
    ("name", "cls", "builtin"),
    [
        ("missing", NotFoundError, FnError),
        ("slowpoke", FunctionTimeoutError, TimeoutError),
        ("bad", InvalidArgumentError, ValueError),
        ("trap", TrapError, FnError),
        ("busy", UnavailableError, FnError),
    ],
)
async def test_error_frames_rebuild_their_class(
    peer: FakePeer, name: str, cls: type[FnError], builtin: type[BaseException]
) -> None:
    async with AsyncClient(peer.address) as client:
        with pytest.raises(cls) as info:
            await client.invoke(name)
        assert info.value.code == _ERRORS[name][0]
        assert info.value.message == _ERRORS[name][1]
        assert info.value.details == _ERRORS[name][2]
        assert isinstance(info.value, builtin)
        await client.ping()  # a request error leaves the connection usable


async def test_unknown_error_code_is_an_fnerror(peer: FakePeer) -> None:
    async with AsyncClient(peer.address) as client:
        with pytest.raises(FnError) as info:
            await client.invoke("weird")
    assert info.value.code == "SOMETHING_NEW"


async def test_register_bytes_streams_chunks_with_the_register_id() -> None:
    fake = await _peer(chunk_size=1000)
    payload = bytes(range(256)) * 22  # 5632 bytes -> 6 chunks
    events: list[dict[str, Any]] = []
    try:
        async with AsyncClient(fake.address) as client:
            meta = await client.register(
                "hello",
                payload,
                filename="main.go",
                timeout_ms=500,
                alias="prod",
                progress=events.append,
            )
    finally:
        await fake.close()
    reg = next(f for f in fake.received if f.get("op") == "register")
    assert reg["size"] == len(payload)
    assert reg["sha256"] == hashlib.sha256(payload).hexdigest()
    assert reg["options"] == {"timeout_ms": 500, "alias": "prod"}
    uploads = [f for f in fake.received if f.get("op") == "upload"]
    assert len(uploads) == 6
    assert {f["id"] for f in uploads} == {reg["id"]}
    assert all(isinstance(f["data"], bytes) and len(f["data"]) <= 1000 for f in uploads)
    assert b"".join(f["data"] for f in uploads) == payload
    assert meta["version"] == 2 and meta["filename"] == "main.go"
    assert [e["stage"] for e in events] == ["upload"] * 6 + ["build"]
    assert events[-1]["message"] == "go build (wasip1)"


async def test_register_path_streams_the_file(tmp_path: Any) -> None:
    fake = await _peer(chunk_size=4096)
    src = tmp_path / "main.go"
    content = b"package main\n" + b"// padding\n" * 2000
    src.write_bytes(content)
    try:
        async with AsyncClient(fake.address) as client:
            meta = await client.register("hello", src)
    finally:
        await fake.close()
    assert meta["filename"] == "main.go"
    assert meta["sha256"] == hashlib.sha256(content).hexdigest()
    uploads = [f for f in fake.received if f.get("op") == "upload"]
    assert len(uploads) == -(-len(content) // 4096)
    assert b"".join(f["data"] for f in uploads) == content


async def test_register_bytes_filename_rules(peer: FakePeer) -> None:
    async with AsyncClient(peer.address) as client:
        with pytest.raises(InvalidArgumentError, match="filename"):
            await client.register("hello", b"package main")
        meta = await client.register("hello", b"\0asm\x01\0\0\0")
        assert meta["filename"] == "main.wasm"
        with pytest.raises(InvalidArgumentError):
            await client.register("hello", b"", filename="x.go")


async def test_register_errors(peer: FakePeer) -> None:
    async with AsyncClient(peer.address) as client:
        with pytest.raises(BuildError) as info:
            await client.register("broken", b"package main", filename="main.go")
        assert "syntax error" in info.value.details["log"]
        with pytest.raises(InvalidArgumentError):
            await client.register("reject", b"x" * 5000, filename="main.go")
        with pytest.raises(TooLargeError):  # over the announced max_upload: refused locally
            await client.register("hello", b"x" * ((1 << 20) + 1), filename="main.go")
        await client.ping()


async def test_register_checksum_mismatch_is_surfaced(peer: FakePeer) -> None:
    async with AsyncClient(peer.address) as client:
        # Corrupt what the client sends, as a flipped bit on the wire would.
        original = client._write

        async def corrupting(frame: bytes) -> None:
            await original(frame.replace(b"payload", b"PAYLOAD"))

        client._write = corrupting  # type: ignore[method-assign]
        with pytest.raises(ChecksumMismatchError):
            await client.register("hello", b"payload", filename="main.go")


async def test_connection_loss_fails_every_pending_call(peer: FakePeer) -> None:
    async with AsyncClient(peer.address) as client:
        hanging = [asyncio.ensure_future(client.invoke("hang")) for _ in range(3)]
        await peer.until(lambda: len(peer.invokes("hang")) == 3, "three calls to hang")
        results = await asyncio.gather(*hanging, client.invoke("die"), return_exceptions=True)
        assert all(isinstance(r, UnavailableError) for r in results), results
        assert all(str(r) == "connection to server lost" for r in results)
        await client.ping()  # the next call opens a new connection
    assert peer.connections == 2


async def test_connection_level_error_fails_every_pending_call(peer: FakePeer) -> None:
    async with AsyncClient(peer.address) as client:
        results = await asyncio.gather(
            client.invoke("hang"), client.invoke("conn-error"), return_exceptions=True
        )
    assert all(isinstance(r, ProtocolError) and str(r) == "you broke it" for r in results), results


async def test_oversized_frame_from_the_server() -> None:
    fake = await _peer(max_frame=4096)
    try:
        async with AsyncClient(fake.address) as client:
            with pytest.raises(TooLargeError):
                await client.invoke("huge")
    finally:
        await fake.close()


async def test_oversized_request_is_refused_before_sending() -> None:
    fake = await _peer(max_frame=4096)
    try:
        async with AsyncClient(fake.address) as client:
            with pytest.raises(TooLargeError):
                await client.invoke("echo", b"x" * 5000)
            assert (await client.invoke("echo", b"x" * 1000)).output == b"x" * 1000
    finally:
        await fake.close()
    assert not any(len(f.get("input", b"")) == 5000 for f in fake.received)


async def test_close_fails_pending_and_is_idempotent(peer: FakePeer) -> None:
    client = AsyncClient(peer.address)
    await client.connect()
    call = asyncio.ensure_future(client.invoke("hang"))
    await peer.until(lambda: len(peer.invokes("hang")) == 1, "the call to hang")
    await client.close()
    with pytest.raises(UnavailableError):
        await call
    await client.close()
    with pytest.raises(UnavailableError, match="closed"):
        await client.ping()


async def test_cancelled_call_ignores_its_late_reply(peer: FakePeer) -> None:
    async with AsyncClient(peer.address) as client:
        call = asyncio.ensure_future(client.invoke("held", b"late"))
        await peer.until(lambda: len(peer.invokes("held")) == 1, "the held call")
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        held_id = peer.invokes("held")[0]["id"]
        peer.release.set()
        await peer.until(lambda: held_id in peer.sent_ids, "the late reply sent")
        # Replies on one connection arrive in order: by the time this one is read, the late
        # reply was read first and reached nobody.
        assert (await client.invoke("echo", b"ok")).output == b"ok"
    assert peer.sent_ids == [held_id, peer.invokes("echo")[0]["id"]]


async def test_lazy_connect_and_crud_ops(peer: FakePeer) -> None:
    client = AsyncClient(peer.address)
    try:
        functions = await client.list()
        assert [f["name"] for f in functions] == ["alpha", "beta"]
        assert (await client.get("alpha"))["versions"][0]["version"] == 1
        assert (await client.delete("alpha"))["deleted"] == [1, 2]
        assert (await client.delete("alpha", 3))["deleted"] == [3]
        assert (await client.alias("alpha", "prod", 3))["version"] == 3
    finally:
        await client.close()
    delete = [f for f in peer.received if f.get("op") == "delete"]
    assert "version" in delete[0] and delete[0]["version"] is None


# -- the sync client ---------------------------------------------------------------------------


async def test_sync_client_shared_by_two_threads(peer: FakePeer) -> None:
    def work() -> list[bytes]:
        with Client(peer.address) as client:
            out: dict[int, list[bytes]] = {}

            def thread_body(n: int) -> None:
                out[n] = [client.invoke("echo", f"{n}-{i}").output for i in range(20)]

            threads = [threading.Thread(target=thread_body, args=(n,)) for n in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert client.server_info["server"] == "fnserver"
            with pytest.raises(NotFoundError):
                client.invoke("missing")
            return out[0] + out[1]

    outputs = await asyncio.to_thread(work)
    assert outputs == [f"{n}-{i}".encode() for n in range(2) for i in range(20)]
    assert peer.connections == 1


async def test_sync_client_after_close(peer: FakePeer) -> None:
    def work() -> None:
        client = Client(peer.address)
        client.ping()
        client.close()
        client.close()
        with pytest.raises(UnavailableError):
            client.ping()

    await asyncio.to_thread(work)


# -- the CLI -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "target", "fn_args"),
    [
        (["invoke", "hello"], ("hello", None), []),
        (["invoke", "hello@3"], ("hello", 3), []),
        (["invoke", "hello@prod", "--json"], ("hello", "prod"), []),
        (["invoke", "hello@latest"], ("hello", None), []),
        (
            ["invoke", "hello", "--json", "--", "-a", "--json", "b"],
            ("hello", None),
            ["-a", "--json", "b"],
        ),
        (["invoke", "--timeout", "5", "hello@2", "--"], ("hello", 2), []),
    ],
)
def test_cli_parses_targets_and_function_args(
    argv: list[str], target: tuple[str, Any], fn_args: list[str]
) -> None:
    ns = cli.parse_args(argv)
    assert ns.target == target
    assert ns.fn_args == fn_args


@pytest.mark.parametrize(
    "argv",
    [
        ["invoke", "hello@"],
        ["invoke", "hello@Bad!"],
        ["invoke", "hello", "extra"],
        ["invoke", "hello", "--input", "a", "--input-file", "b"],
        ["invoke", "hello", "--mode", "jvm"],
        ["delete", "hello@prod"],
        ["list", "--", "x"],
        ["alias", "hello", "prod", "zero"],
    ],
)
def test_cli_usage_errors_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.parse_args(argv)
    assert info.value.code == 2


def test_cli_server_option_placement(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FN_SERVER", raising=False)
    monkeypatch.delenv("FN_TOKEN", raising=False)
    assert cli.parse_args(["list"]).server == "127.0.0.1:8080"
    assert cli.parse_args(["--server", "a:1", "list"]).server == "a:1"
    assert cli.parse_args(["list", "--server", "b:2"]).server == "b:2"
    assert cli.parse_args(["--token", "t", "list"]).token == "t"
    monkeypatch.setenv("FN_SERVER", "env:3")
    monkeypatch.setenv("FN_TOKEN", "envtok")
    ns = cli.parse_args(["list"])
    assert (ns.server, ns.token) == ("env:3", "envtok")
    assert cli.parse_args(["get", "x", "--server", "c:4"]).server == "c:4"


async def _fn(*argv: str) -> int:
    return await asyncio.to_thread(cli.main, list(argv))


async def test_cli_invoke_writes_bytes_and_exits_with_the_code(
    peer: FakePeer, capfd: pytest.CaptureFixture[str]
) -> None:
    code = await _fn(
        "--server", peer.address, "invoke", "echo@4", "--input", "hi", "--", "a", "b", "c"
    )
    out, err = capfd.readouterr()
    assert code == 3
    assert out == "hi"
    assert json.loads(err) == {"args": ["a", "b", "c"], "version": 4}


async def test_cli_invoke_reads_input_file_and_notes_truncation(
    peer: FakePeer, capfd: pytest.CaptureFixture[str], tmp_path: Any
) -> None:
    path = tmp_path / "in.bin"
    path.write_bytes(b"abc")
    code = await _fn("invoke", "cut", "--input-file", str(path), "--server", peer.address)
    out, err = capfd.readouterr()
    assert code == 0 and out == "abc"
    assert "fn: output truncated at 3 bytes" in err


async def test_cli_invoke_json(peer: FakePeer, capfd: pytest.CaptureFixture[str]) -> None:
    code = await _fn(
        "--server", peer.address, "invoke", "echo", "--input", "hé", "--json", "--", "x"
    )
    out, _ = capfd.readouterr()
    doc = json.loads(out)
    assert code == 1
    assert doc["output"] == "hé" and doc["exit_code"] == 1
    assert {
        "duration_us",
        "queue_us",
        "wall_us",
        "memory_peak",
        "version",
        "mode",
        "truncated",
    } <= set(doc)


async def test_cli_platform_error_format(peer: FakePeer, capfd: pytest.CaptureFixture[str]) -> None:
    code = await _fn("--server", peer.address, "invoke", "missing", "--input", "")
    out, err = capfd.readouterr()
    assert code == 125
    assert out == ""
    assert err == "error: NOT_FOUND: no function named 'missing'\n"


async def test_cli_connection_refused(peer: FakePeer, capfd: pytest.CaptureFixture[str]) -> None:
    address = peer.address
    await peer.close()
    peer.close = _noop  # type: ignore[method-assign]
    code = await _fn("list", "--server", address)
    _, err = capfd.readouterr()
    assert code == 125
    assert err.startswith(f"error: UNAVAILABLE: cannot connect to {address}: ")


async def _noop() -> None:
    return None


async def test_cli_register_json_and_build_failure(
    peer: FakePeer, capfd: pytest.CaptureFixture[str], tmp_path: Any
) -> None:
    src = tmp_path / "main.go"
    src.write_bytes(b"package main\n")
    code = await _fn(
        "--server", peer.address, "register", "hello", str(src), "--json", "--timeout", "500"
    )
    out, err = capfd.readouterr()
    assert code == 0
    meta = json.loads(out)
    assert meta["version"] == 2 and isinstance(meta["version"], int)
    assert "error" not in err

    code = await _fn("--server", peer.address, "register", "hello", str(src))
    out, _ = capfd.readouterr()
    assert out == "registered hello version 2 (go, wasm+native, built in 1.4 s)\n"

    code = await _fn("--server", peer.address, "register", "broken", str(src))
    out, err = capfd.readouterr()
    assert code == 125 and out == ""
    assert err.endswith("error: BUILD_FAILED: build failed\nmain.go:3:1: syntax error\n")


async def test_cli_list_get_delete_alias(peer: FakePeer, capfd: pytest.CaptureFixture[str]) -> None:
    assert await _fn("--server", peer.address, "list") == 0
    out, _ = capfd.readouterr()
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "LATEST", "VERSIONS", "ALIASES", "KIND"]
    assert lines[1].split() == ["alpha", "3", "1-3", "prod=2", "go"]

    assert await _fn("--server", peer.address, "get", "alpha") == 0
    out, _ = capfd.readouterr()
    # Every version: a table row each; one version (``NAME@V``): in full.
    assert out.splitlines()[1].split()[:4] == ["VERSION", "CREATED", "KIND", "ARTIFACTS"]
    assert out.splitlines()[2].split()[:4] == ["1", "2025-01-01T00:00:00", "go", "wasm+native"]
    assert await _fn("--server", peer.address, "get", "alpha@1") == 0
    out, _ = capfd.readouterr()
    assert "version 1" in out and "wasm+native" in out and "abababababab" in out and "go1.24" in out

    assert await _fn("--server", peer.address, "delete", "alpha@2") == 0
    out, _ = capfd.readouterr()
    assert out == "deleted alpha version 2 (aliases removed: prod)\n"

    assert await _fn("--server", peer.address, "alias", "alpha", "prod", "3") == 0
    out, _ = capfd.readouterr()
    assert out == "alpha@prod -> version 3\n"

    assert await _fn("--server", peer.address, "get", "nope") == 125
    _, err = capfd.readouterr()
    assert err == "error: NOT_FOUND: no function named 'nope'\n"


def test_cli_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("fn (fnclient) ")


def test_cli_progress_on_a_terminal_shows_stages_with_elapsed_time() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    progress = cli._Progress(out, "main.go")
    progress({"stage": "upload", "received": 1 << 20, "size": 3 << 20, "message": ""})
    progress({"stage": "upload", "received": 3 << 20, "size": 3 << 20, "message": ""})
    progress({"stage": "build", "message": "go build"})
    progress.finish()
    text = out.getvalue()
    assert "uploading main.go (3.0 MiB)" in text and "build: go build" in text
    assert "0:00:0" in text  # each line's elapsed time


def test_cli_progress_when_piped_is_plain_and_only_for_long_work() -> None:
    out = io.StringIO()
    progress = cli._Progress(out, "main.go")
    progress({"stage": "upload", "received": 3 << 20, "size": 3 << 20, "message": ""})
    progress({"stage": "build", "message": "warming the shared zig build cache"})
    progress.tick()
    assert out.getvalue() == ""  # a register that ends at once prints no progress
    # Past the quiet start, the stage that began in it is said (by the next tick)...
    progress._started -= cli._Progress.QUIET_S
    progress.tick()
    progress({"stage": "build", "message": "go build (wasm)"})
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("[") and lines[0].endswith("s] build: warming the shared zig build cache")
    assert lines[1].endswith("s] build: go build (wasm)")
    # ... and a long stage is said again rather than leaving a silent pipe.
    progress._last_line -= cli._Progress.HEARTBEAT_S
    progress.tick()
    assert out.getvalue().splitlines()[2].endswith("s] still build: go build (wasm)")
    quiet = io.StringIO()
    q = cli._Progress(quiet, "main.go", quiet=True)
    q._started -= 10
    q({"stage": "build", "message": "x"})
    assert quiet.getvalue() == ""
