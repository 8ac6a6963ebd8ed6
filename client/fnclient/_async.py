"""The asyncio client: one connection, many requests in flight (docs/PROTOCOL.md §1-§5).

The codec is :mod:`fnserver.protocol`; this layer only adds the transport, futures keyed by
request id, one owned reader task and backpressure on writes.

A client may know several nodes of one deployment (issue 14): it holds one connection, to one
of them, at a time. Each client of a process starts on the next node in turn (round robin,
from a random node for the process's first client), so many clients spread evenly over the
nodes, and many one-client processes (``fn`` commands) spread at random. A node that cannot be
reached when connecting is passed over for the next one (§4: nothing but HELLO was sent);
a connection lost later fails the calls written on it, which are never sent again.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import random
import ssl
from collections.abc import AsyncGenerator, AsyncIterable, Callable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, BinaryIO, Final

from ._address import parse_address, parse_addresses, split_scheme
from ._results import InvokeResult
from .protocol import (
    CHUNK_SIZE,
    DEFAULT_MAX_FRAME,
    DEFAULT_PAGE,
    MAX_PAGE,
    PROTOCOL_VERSION,
    AliasRequest,
    CallStatus,
    CompileRequest,
    DeleteRequest,
    FnError,
    FrameDecoder,
    GetRequest,
    Identity,
    InternalError,
    InvalidArgumentError,
    InvocationRecord,
    InvokeAccepted,
    InvokeRequest,
    ListRequest,
    LogsReply,
    LogsRequest,
    PingRequest,
    ProtocolError,
    RegisterOptions,
    RegisterRequest,
    RequestRecord,
    ResultRequest,
    StatsReply,
    StatsRequest,
    TooLargeError,
    UnavailableError,
    UploadChunk,
    check_env,
    encode_request,
    error_from_wire,
    parse_version_ref,
)
from .protocol._calls import MAX_WAIT_MS

__all__ = ["AsyncClient", "ProgressCallback", "Source", "UploadStream"]

#: Called with each ``event`` frame (§5.3) of a running register, as the decoded map.
ProgressCallback = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class UploadStream:
    """An upload whose bytes arrive as they are sent: its size and sha256 known up front
    (a proxy relaying another client's upload, a pipe). ``chunks`` must yield exactly
    ``size`` bytes; the server checks them against ``sha256``."""

    size: int
    sha256: str
    chunks: AsyncIterable[bytes]


#: What ``register`` uploads: a filesystem path, the bytes themselves, or a stream.
Source = str | os.PathLike[str] | bytes | bytearray | memoryview | UploadStream

_HELLO_ID: Final = 0
_READ_SIZE: Final = 256 * 1024
#: Room for the ``upload`` envelope around a chunk, so a full chunk still fits in one frame.
_UPLOAD_OVERHEAD: Final = 128
_WASM_MAGIC: Final = b"\0asm"
_LOST: Final = "connection to server lost"
#: Rounds of connection attempts (refused, or lost during HELLO) before connect() gives up,
#: and the first pause between them (doubled each time). A round tries each node once.
CONNECT_ATTEMPTS: Final = 4
CONNECT_BACKOFF_S: Final = 0.05
#: A ``get`` of every version stops after this many pages (100 versions each).
_MAX_PAGES: Final = 10_000
#: Buffered request bytes past which a caller waits for the transport to drain.
_WRITE_HIGH_WATER: Final = 1 << 20


#: The node each new multi-node client starts on: the next in turn, process-wide, from a
#: random one (so clients of one process spread evenly, and separate processes at random).
_starts: Final = itertools.count(random.randrange(1 << 16))


class _Retryable(Exception):
    """A connection attempt that failed before anything but HELLO was sent, and that may
    succeed if tried again soon (refused, reset: a serving process restarting)."""

    def __init__(self, error: UnavailableError) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass(frozen=True, slots=True)
class _Node:
    """One server address of a client: as given, and how to dial it."""

    address: str
    host: str
    port: int
    tls: bool

    @classmethod
    def parse(cls, address: str) -> _Node:
        host, port = parse_address(address)
        return cls(address, host, port, split_scheme(address)[0])

    @property
    def target(self) -> str:
        """``host:port`` (brackets around an IPv6 host), for messages."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(slots=True)
class _Pending:
    future: asyncio.Future[dict[str, Any]]
    progress: ProgressCallback | None = None


class AsyncClient:
    """Async client for fnserver; ``async with AsyncClient("host:port") as c: ...``.

    ``address`` names one server, or several nodes of one deployment: a list of addresses or
    one comma-separated string (``"h1:8080,h2:8080"``, each with its own optional ``tls://``).
    The client holds one connection, to one node at a time (:attr:`address`); see the module's
    docstring for which node it starts on and when it moves to another.

    The connection is opened by :meth:`connect` (or lazily by the first call, and again after
    a lost connection). Calls may run concurrently on one client; their replies are routed by
    request id.
    """

    def __init__(
        self,
        address: str | Sequence[str],
        token: str | None = None,
        *,
        connect_timeout: float = 10.0,
        ca_file: str | os.PathLike[str] | None = None,
    ) -> None:
        self._nodes = tuple(_Node.parse(a) for a in parse_addresses(address))
        #: The node connected to, or tried first by the next connection.
        self._index = next(_starts) % len(self._nodes) if len(self._nodes) > 1 else 0
        #: For ``tls://`` addresses: the server's certificate is checked against ``ca_file``
        #: (a PEM bundle), or the system's trusted roots without one.
        self.ca_file = ca_file
        self._ssl: ssl.SSLContext | None = (
            ssl.create_default_context(cafile=os.fspath(ca_file) if ca_file else None)
            if any(node.tls for node in self._nodes)
            else None
        )
        self.token = token
        self.connect_timeout = connect_timeout
        self._ids = itertools.count(_HELLO_ID + 1)
        self._pending: dict[int, _Pending] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._hello: dict[str, Any] | None = None
        self._connect_lock = asyncio.Lock()
        self._closed = False
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._flush_scheduled = False

    # -- life cycle ------------------------------------------------------------------------

    async def __aenter__(self) -> AsyncClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def address(self) -> str:
        """The address of the node this client is connected to (or will try first)."""
        return self._nodes[self._index].address

    @property
    def addresses(self) -> tuple[str, ...]:
        """Every node this client knows, in the order given."""
        return tuple(node.address for node in self._nodes)

    @property
    def host(self) -> str:
        """The host of :attr:`address`."""
        return self._nodes[self._index].host

    @property
    def port(self) -> int:
        """The port of :attr:`address`."""
        return self._nodes[self._index].port

    @property
    def connected(self) -> bool:
        """Whether a HELLO-authenticated connection is open."""
        return self._writer is not None and not self._writer.is_closing()

    @property
    def server_info(self) -> dict[str, Any]:
        """The server's HELLO result (§4): versions, ``max_frame``, ``chunk_size``, limits."""
        if self._hello is None:
            raise UnavailableError("not connected: call connect() first")
        return dict(self._hello)

    async def connect(self) -> None:
        """Open the connection and complete HELLO (§4); a no-op when already connected.

        The current node is tried first, then each other in the order given. Raises
        :class:`UnavailableError` when none can be reached, naming each and why.
        """
        async with self._connect_lock:
            self._closed = False
            if self.connected:
                return
            reader, writer, decoder, hello = await self._open_any()
            target = self._nodes[self._index].target
            max_frame = hello.get("max_frame")
            if isinstance(max_frame, int) and max_frame > 0:
                decoder.max_frame = max_frame
            self._hello = hello
            self._writer = writer
            self._reader_task = asyncio.get_running_loop().create_task(
                self._read_loop(reader, writer, decoder), name=f"fnclient-reader-{target}"
            )

    async def _open_any(
        self,
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, FrameDecoder, dict[str, Any]]:
        """Connect to the current node or, failing that, to the next ones in turn; make the
        node that answered the current one.

        Nothing but HELLO is sent before a connection is up, so a node that cannot be reached
        (refused, unreachable, timed out, TLS failure, HELLO answered UNAVAILABLE) is passed
        over for the next, each tried at most once per round. Nodes whose failure may pass
        soon (refused, or reset by a serving process that died) get further rounds, after a
        pause: a server restarting one of its processes costs a caller a short wait, not an
        error. Any other error (a wrong token, not an fnserver) is raised at once.
        """
        count = len(self._nodes)
        order = [(self._index + k) % count for k in range(count)]
        failures: dict[int, UnavailableError] = {}
        for attempt in range(CONNECT_ATTEMPTS):
            if attempt:
                await asyncio.sleep(CONNECT_BACKOFF_S * 2 ** (attempt - 1))  # backoff, not a sync
            again: list[int] = []
            for index in order:
                try:
                    opened = await self._open(self._nodes[index])
                except _Retryable as exc:
                    exc.error.__cause__ = exc.__cause__
                    failures[index] = exc.error
                    again.append(index)
                    continue
                except UnavailableError as exc:
                    failures[index] = exc
                    continue
                self._index = index
                return opened
            order = again
            if not order:
                break
        raise self._unreachable(failures)

    def _unreachable(self, failures: Mapping[int, UnavailableError]) -> UnavailableError:
        """The error of a :meth:`connect` that reached no node: a single node's own, or one
        naming every node tried and why (``details["tried"]``: address and message each)."""
        if len(self._nodes) == 1:
            return failures[0]
        tried = [(self._nodes[i], failures[i]) for i in sorted(failures)]
        reasons = "; ".join(
            f"{node.address}: {_strip_prefix(err.message, f'cannot connect to {node.target}: ')}"
            for node, err in tried
        )
        return UnavailableError(
            f"cannot connect to any of the {len(self._nodes)} servers ({reasons})",
            {"tried": [{"address": node.address, "error": err.message} for node, err in tried]},
        )

    async def _open(
        self, node: _Node
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, FrameDecoder, dict[str, Any]]:
        """One connection attempt to ``node`` with its HELLO: :class:`UnavailableError` when
        the node cannot be reached, :class:`_Retryable` when it may be tried again soon (the
        connection failed before the server answered anything)."""
        target = node.target
        tls = self._ssl if node.tls else None
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    node.host,
                    node.port,
                    ssl=tls,
                    server_hostname=node.host if tls is not None else None,
                ),
                self.connect_timeout,
            )
        except TimeoutError as exc:  # before OSError: TimeoutError is one
            raise UnavailableError(f"cannot connect to {target}: timed out") from exc
        except ssl.SSLCertVerificationError as exc:
            # Not retried: the next attempt would meet the same certificate.
            raise UnavailableError(
                f"cannot connect to {target}: the server's TLS certificate could not be verified"
                f" ({exc.verify_message}); pass the CA that signed it with --ca-file or FN_CA_FILE"
                " (ca_file= in fnclient)",
                {"reason": "certificate"},
            ) from exc
        except ssl.SSLError as exc:
            raise UnavailableError(
                f"cannot connect to {target}: the TLS handshake failed ({exc.reason or exc});"
                " is the server started with --tls-cert, and the address tls://?",
                {"reason": "tls"},
            ) from exc
        except OSError as exc:
            raise _Retryable(UnavailableError(f"cannot connect to {target}: {exc}")) from exc
        decoder = FrameDecoder(DEFAULT_MAX_FRAME)
        try:
            hello = await asyncio.wait_for(
                self._hello_exchange(target, reader, writer, decoder), self.connect_timeout
            )
        except BaseException as exc:
            writer.close()
            if isinstance(exc, TimeoutError) and not isinstance(exc, FnError):
                raise UnavailableError(
                    f"no HELLO reply from {target} within {self.connect_timeout:g} s: is it an"
                    " fnserver (not, say, an HTTP server), and is the port right?"
                ) from exc
            if isinstance(exc, OSError):
                raise _Retryable(UnavailableError(f"{_LOST} during HELLO: {exc}")) from exc
            if isinstance(exc, UnavailableError) and exc.message == f"{_LOST} during HELLO":
                raise _Retryable(exc) from exc
            raise
        return reader, writer, decoder, hello

    async def close(self) -> None:
        """Close the connection; pending calls fail with :class:`UnavailableError`. Idempotent."""
        self._closed = True
        task, writer = self._reader_task, self._writer
        if task is not None:
            task.cancel()
            # asyncio.wait, not ``await task``: the task's CancelledError must not be confused
            # with a cancellation of the caller.
            await asyncio.wait([task])
        if writer is not None:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass  # the peer may have reset the connection already; it is closed either way

    async def _hello_exchange(
        self,
        target: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        decoder: FrameDecoder,
    ) -> dict[str, Any]:
        writer.write(
            encode_request(
                "hello", _HELLO_ID, protocol=PROTOCOL_VERSION, token=self.token, client="fnclient"
            )
        )
        await writer.drain()
        while True:
            try:
                frame = decoder.next_frame()
            except FnError as exc:
                raise ProtocolError(
                    f"the server at {target} does not speak the fnserver protocol"
                    f" (its first reply is not a valid frame: {exc.message}); check the address"
                ) from exc
            if frame is None:
                data = await reader.read(_READ_SIZE)
                if not data:
                    raise UnavailableError(f"{_LOST} during HELLO")
                if not decoder.buffered:
                    _check_speaks_fnserver(data, target)
                decoder.feed(data)
                continue
            if frame.get("id") not in (_HELLO_ID, None):
                continue  # nothing else can be in flight yet; ignore rather than guess
            if frame.get("type") == "error":
                raise _error_from_frame(frame)
            result = frame.get("result")
            if frame.get("type") != "response" or not isinstance(result, dict):
                raise ProtocolError(f"unexpected reply to HELLO: {frame.get('type')!r}")
            return result

    # -- reading ---------------------------------------------------------------------------

    async def _read_loop(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, decoder: FrameDecoder
    ) -> None:
        """Route frames to pending calls until the connection ends, then fail what is left."""
        error: FnError = UnavailableError(_LOST)
        try:
            while True:
                # Frames may already sit in the decoder, buffered behind the HELLO reply.
                while (frame := decoder.next_frame()) is not None:
                    conn_error = self._dispatch(frame)
                    if conn_error is not None:
                        error = conn_error
                        return
                data = await reader.read(_READ_SIZE)
                if not data:
                    return
                decoder.feed(data)
        except FnError as exc:  # ProtocolError / TooLargeError from the decoder
            error = exc
        except OSError as exc:
            error = UnavailableError(_LOST)
            error.__cause__ = exc
        except asyncio.CancelledError:
            error = UnavailableError("client closed")
            raise
        except Exception as exc:  # a bug here must reach the callers, not vanish with the task
            error = InternalError(f"fnclient reader failed: {exc!r}")
            error.__cause__ = exc
        finally:
            writer.close()
            if self._writer is writer:
                self._writer = None
                self._reader_task = None
            self._fail_all(error)

    def _dispatch(self, frame: dict[str, Any]) -> FnError | None:
        """Deliver one frame; return an error when it ends the whole connection."""
        kind = frame.get("type")
        req_id = frame.get("id")
        if kind == "error" and req_id is None:
            return _error_from_frame(frame)  # §3: a connection-level error, then the close
        if kind not in ("response", "error", "event") or not isinstance(req_id, int):
            return ProtocolError(f"server sent a frame without a valid envelope: type {kind!r}")
        pending = self._pending.get(req_id)
        if pending is None or pending.future.done():
            return None  # a call that was cancelled meanwhile; its late reply has no reader
        if kind == "event":
            if pending.progress is not None:
                try:
                    pending.progress(frame)
                except Exception as exc:
                    # The callback belongs to the caller: its failure becomes the call's failure.
                    pending.future.set_exception(exc)
            return None
        if kind == "error":
            pending.future.set_exception(_error_from_frame(frame))
            return None
        result = frame.get("result")
        if not isinstance(result, dict):
            pending.future.set_exception(ProtocolError("response without a 'result' map"))
        else:
            pending.future.set_result(result)
        return None

    def _fail_all(self, error: FnError) -> None:
        pending, self._pending = self._pending, {}
        for p in pending.values():
            if not p.future.done():
                # A fresh instance per caller: one exception object raised in several tasks
                # would collect everyone's tracebacks.
                err = error_from_wire(error.code, error.message, error.details)
                err.__cause__ = error.__cause__
                p.future.set_exception(err)

    # -- writing ---------------------------------------------------------------------------

    async def _start(
        self, op: str, fields: dict[str, Any], progress: ProgressCallback | None = None
    ) -> tuple[int, asyncio.Future[dict[str, Any]]]:
        """Send one request; return its id and the future its final frame will resolve."""
        await self._ensure_connected()
        req_id = next(self._ids)
        frame = encode_request(op, req_id, **fields)
        self._check_frame(frame, op)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[req_id] = _Pending(future, progress)
        try:
            await self._write(frame)
        except BaseException:
            self._pending.pop(req_id, None)
            _consume(future)
            raise
        return req_id, future

    async def _finish(self, req_id: int, future: asyncio.Future[dict[str, Any]]) -> dict[str, Any]:
        try:
            return await future
        finally:
            self._pending.pop(req_id, None)

    async def _ensure_connected(self) -> None:
        if self._closed:
            raise UnavailableError("client is closed")
        if not self.connected:
            await self.connect()

    def _check_frame(self, frame: bytes, what: str) -> None:
        # §2: a client must never send a frame over the server's max_frame.
        limit = self._max_frame
        if len(frame) - 4 > limit:
            raise TooLargeError(
                f"{what} request of {len(frame) - 4} bytes is over the server's frame limit"
                f" of {limit} bytes",
                {"max_frame": limit, "length": len(frame) - 4},
            )

    @property
    def _max_frame(self) -> int:
        value = (self._hello or {}).get("max_frame")
        return value if isinstance(value, int) and value > 0 else DEFAULT_MAX_FRAME

    async def _write(self, frame: bytes) -> None:
        writer = self._writer
        if writer is None or writer.is_closing():
            raise UnavailableError(_LOST)
        # Frames written in one loop iteration (many calls in flight) leave in one send: a
        # syscall per request costs the client more CPU than the request itself.
        self._out.append(frame)
        self._out_bytes += len(frame)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush, writer)
        if self._out_bytes + writer.transport.get_write_buffer_size() > _WRITE_HIGH_WATER:
            self._flush(writer)
            try:
                await writer.drain()  # backpressure: wait while the transport's buffer is full
            except OSError as exc:
                raise UnavailableError(_LOST) from exc

    def _flush(self, writer: asyncio.StreamWriter) -> None:
        self._flush_scheduled = False
        out, self._out, self._out_bytes = self._out, [], 0
        if out and not writer.is_closing():
            # A send error closes the transport; the reader then fails every pending call.
            writer.write(out[0] if len(out) == 1 else b"".join(out))

    # -- operations (§5) -------------------------------------------------------------------

    async def _request(self, req: RequestRecord, progress: ProgressCallback | None = None) -> dict[str, Any]:
        """Send one typed request (the protocol's op table names it) and await its result."""
        req_id, future = await self._start(req.op, req.to_wire(), progress)
        return await self._finish(req_id, future)

    async def request(
        self, req: RequestRecord, progress: ProgressCallback | None = None
    ) -> dict[str, Any]:
        """Send any typed request record (``fnclient.protocol``) and return its result map:
        for tools and proxies that relay requests they already hold as records."""
        return await self._request(req, progress)

    async def ping(self, *, deep: bool = False) -> None:
        """Round-trip a ``ping`` (§5.1); ``deep``: raise UnavailableError unless the server is
        ready to serve (its workers up, its store writable)."""
        await self._request(PingRequest(deep))

    async def whoami(self) -> Identity:
        """The tenant and role the server took this client's token for (HELLO's reply, §4)."""
        await self.connect()
        return Identity.from_hello(self.server_info)

    async def register(
        self,
        name: str,
        path_or_bytes: Source,
        *,
        filename: str | None = None,
        timeout_ms: int | None = None,
        memory_mb: int | None = None,
        alias: str | None = None,
        kind: str | None = None,
        description: str | None = None,
        env: Mapping[str, str] | None = None,
        progress: ProgressCallback | None = None,
        fuel: int | None = None,
    ) -> dict[str, Any]:
        """Upload and build a new version of ``name`` (§5.2); return its metadata (§5.9).

        A path is hashed in one pass and streamed in a second, one chunk in memory at a time.
        ``progress`` receives each event map the server sends while the request runs.
        ``fuel`` gives the function an instruction budget (wasm mode; running out is a
        :class:`FunctionTimeoutError` with ``details["fuel"]``).
        """
        stream: UploadStream | None = None
        path: str | None = None
        if isinstance(path_or_bytes, UploadStream):
            stream = path_or_bytes
            if filename is None:
                raise InvalidArgumentError("filename is required when registering a stream")
            size, sha256, data = stream.size, stream.sha256, b""
        elif isinstance(path_or_bytes, bytes | bytearray | memoryview):
            data = bytes(path_or_bytes)
            if filename is None:
                if not data.startswith(_WASM_MAGIC):
                    raise InvalidArgumentError(
                        "filename is required when registering bytes that are not a WebAssembly"
                        " module: its extension picks the kind (.go, .zip, .c, .zig, .wasm)"
                    )
                filename = "main.wasm"
            size, sha256 = len(data), hashlib.sha256(data).hexdigest()
        else:
            path = os.fspath(path_or_bytes)
            if filename is None:
                filename = os.path.basename(path)
            data = b""
            size, sha256 = await asyncio.to_thread(_hash_file, path)
        if size == 0:
            raise InvalidArgumentError("cannot register an empty file")
        await self._ensure_connected()
        max_upload = self.server_info.get("max_upload")
        if isinstance(max_upload, int) and size > max_upload:
            # Refuse before streaming what the server would only discard (§5.2).
            raise TooLargeError(
                f"upload of {size} bytes is over the server's maximum of {max_upload}",
                {"max_upload": max_upload, "size": size},
            )
        req = RegisterRequest(
            name,
            filename,
            size,
            sha256,
            RegisterOptions(
                timeout_ms=timeout_ms,
                memory_mb=memory_mb,
                fuel=fuel,
                alias=alias,
                kind=kind,
                description=description or "",
                env=check_env(env),
            ),
        )
        req_id, future = await self._start(req.op, req.to_wire(), progress)
        chunk_size = self._chunk_size
        if stream is not None:
            chunks = _stream_chunks(stream.chunks, chunk_size)
        elif path:
            chunks = _file_chunks(path, size, chunk_size)
        else:
            chunks = _byte_chunks(data, chunk_size)
        try:
            async with aclosing(chunks):
                async for chunk in chunks:
                    if future.done():
                        break  # rejected early (§5.2): the remaining chunks would be discarded
                    chunk_frame = UploadChunk(chunk)
                    await self._write(encode_request(chunk_frame.op, req_id, **chunk_frame.to_wire()))
        except UnavailableError:
            if future.done():
                return await self._finish(req_id, future)  # the reader knows why
            self._pending.pop(req_id, None)
            raise
        except BaseException:
            self._pending.pop(req_id, None)
            _consume(future)
            raise
        return await self._finish(req_id, future)

    @property
    def _chunk_size(self) -> int:
        value = self.server_info.get("chunk_size")
        chunk = value if isinstance(value, int) and value > 0 else CHUNK_SIZE
        return max(1, min(chunk, self._max_frame - _UPLOAD_OVERHEAD))

    async def invoke(
        self,
        name: str,
        input: bytes | bytearray | memoryview | str = b"",  # noqa: A002 - the wire field's name
        *,
        version: int | str | None = None,
        args: Sequence[str] = (),
        timeout_ms: int | None = None,
        mode: str | None = None,
    ) -> InvokeResult:
        """Run ``name`` (a version number, an alias, or the newest) on ``input`` (§5.8)."""
        req = _invoke_request(name, input, version, args, timeout_ms, mode, async_=False)
        return InvokeResult.from_wire(await self._request(req))

    async def invoke_async(
        self,
        name: str,
        input: bytes | bytearray | memoryview | str = b"",  # noqa: A002 - the wire field's name
        *,
        version: int | str | None = None,
        args: Sequence[str] = (),
        timeout_ms: int | None = None,
        mode: str | None = None,
    ) -> str:
        """Queue a call (``invoke`` with ``async``, §5.8) and return its invocation id at once;
        :meth:`result` fetches its outcome. It runs under the same limits as a direct call,
        at least once even if the server restarts meanwhile."""
        req = _invoke_request(name, input, version, args, timeout_ms, mode, async_=True)
        return InvokeAccepted.from_wire(await self._request(req)).id

    async def result(self, invocation_id: str, *, wait: bool | float = False) -> CallStatus:
        """An async call's state (``queued``, ``running``, ``done`` or ``failed``) with its
        result or error once it has one (§5.12). ``wait``: True waits until it finishes, a
        number waits at most that many seconds, False answers at once."""
        if wait is True:
            while True:
                status = CallStatus.from_wire(await self._request(ResultRequest(invocation_id, MAX_WAIT_MS)))
                if status.state in ("done", "failed"):
                    return status
        wait_ms = 0 if wait is False else max(0, min(int(float(wait) * 1000), MAX_WAIT_MS))
        return CallStatus.from_wire(await self._request(ResultRequest(invocation_id, wait_ms or None)))

    async def logs(self, name: str, *, version: int | None = None, limit: int = 20,
                   after: int | None = None) -> list[InvocationRecord]:
        """A function's newest ``limit`` invocation records, oldest first (§5.13); ``after``
        (a record's ``seq``) asks only for newer ones."""
        reply = LogsReply.from_wire(await self._request(LogsRequest(name, version, limit, after)))
        return list(reply.records)

    async def follow_logs(self, name: str, *, version: int | None = None,
                          limit: int = 20) -> AsyncGenerator[InvocationRecord, None]:
        """The newest ``limit`` records, then each new one as the server stores it (§5.13,
        ``follow``). It runs on a connection of its own, closed when the generator is."""
        queue: asyncio.Queue[InvocationRecord | BaseException] = asyncio.Queue()

        def on_event(frame: dict[str, Any]) -> None:
            if frame.get("event") == "record":
                queue.put_nowait(InvocationRecord.from_wire(frame.get("record")))

        stream = AsyncClient(self.addresses, self.token, connect_timeout=self.connect_timeout, ca_file=self.ca_file)
        stream._index = self._index  # the stream starts on this client's node
        try:
            req_id, future = await stream._start("logs", LogsRequest(name, version, limit, follow=True).to_wire(), on_event)
            future.add_done_callback(
                lambda f: queue.put_nowait(f.exception() or UnavailableError("the server ended the stream"))
                if not f.cancelled() else None
            )
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            await stream.close()

    async def stats(self, name: str | None = None, *, tenant: str | None = None) -> StatsReply:
        """Per-version statistics of one function, or of every function of your tenant
        (admins: of ``tenant``), and the server's gauges (§5.14)."""
        return StatsReply.from_wire(await self._request(StatsRequest(name, tenant)))

    async def list(self, *, all: bool = False) -> list[dict[str, Any]]:  # noqa: A002, A003 - the operation's names (§5.4)
        """Every function of your tenant, sorted by name; with ``all`` (admins), every
        tenant's, sorted by tenant and name, other tenants' named ``TENANT/NAME`` (§5.4)."""
        result = await self._request(ListRequest(all=all))
        functions = result.get("functions")
        return functions if isinstance(functions, list) else []

    async def get(
        self,
        name: str,
        version: int | str | None = None,
        *,
        log: bool = False,
        limit: int | None = None,
        cursor: int | None = None,
    ) -> dict[str, Any]:
        """One function with its versions' metadata (§5.5).

        With neither ``limit`` nor ``cursor`` every version is fetched, page by page, so a
        function with hundreds of versions never needs one oversized reply; ``version`` asks
        for one version only. Build logs are left out unless ``log`` is true.
        """
        ref = parse_version_ref(version)
        if ref is not None or limit is not None or cursor is not None:
            return await self._request(
                GetRequest(name, ref, limit or DEFAULT_PAGE, cursor, log)
            )
        result = await self._request(GetRequest(name, None, MAX_PAGE, None, log))
        versions = list(result.get("versions") or [])
        seen = 0
        while isinstance(result.get("next_cursor"), int) and seen < _MAX_PAGES:
            seen += 1
            result = await self._request(GetRequest(name, None, MAX_PAGE, result["next_cursor"], log))
            versions.extend(result.get("versions") or [])
        result = dict(result)
        result["versions"] = versions
        result["next_cursor"] = None
        return result

    async def compile(self, name: str, version: int | str | None = None) -> dict[str, Any]:
        """Make sure a version's wasm module is compiled on the server's node (§5.10)."""
        return await self._request(CompileRequest(name, parse_version_ref(version)))

    async def delete(self, name: str, version: int | None = None) -> dict[str, Any]:
        """Delete one version, or every version when ``version`` is None (§5.6)."""
        if version is not None and (not isinstance(version, int) or isinstance(version, bool)):
            raise InvalidArgumentError(f"delete takes a version number, not {version!r}")
        return await self._request(DeleteRequest(name, version))

    async def alias(self, name: str, alias: str, version: int) -> dict[str, Any]:
        """Point ``alias`` at ``version`` of ``name`` (§5.7)."""
        return await self._request(AliasRequest(name, alias, version))


def _invoke_request(name: str, input: bytes | bytearray | memoryview | str,  # noqa: A002
                    version: int | str | None, args: Sequence[str], timeout_ms: int | None,
                    mode: str | None, *, async_: bool) -> InvokeRequest:
    """The §5.8 request of :meth:`AsyncClient.invoke` and :meth:`AsyncClient.invoke_async`."""
    data = input.encode("utf-8") if isinstance(input, str) else bytes(input)
    if isinstance(args, str | bytes):
        raise InvalidArgumentError("args must be a sequence of strings, not one string")
    if mode is not None and mode not in ("wasm", "native"):
        raise InvalidArgumentError(f"mode must be 'wasm' or 'native', got {mode!r}")
    return InvokeRequest(
        name, parse_version_ref(version), data, tuple(str(a) for a in args), timeout_ms,
        mode,  # type: ignore[arg-type]
        async_=async_,
    )


def _strip_prefix(text: str, prefix: str) -> str:
    return text[len(prefix) :] if text.startswith(prefix) else text


def _check_speaks_fnserver(first: bytes, target: str) -> None:
    """Refuse a peer whose first bytes are plainly another protocol's: an HTTP server answers a
    frame with ``HTTP/1.1 400 ...``, which read as a frame length is ~1.2 GB (issue 12)."""
    if first[:5] == b"HTTP/" or first[:1] == b"<" or first[:4] in (b"SSH-", b"220 ", b"-ERR", b"+OK "):
        what = "an HTTP server" if first[:5] == b"HTTP/" or first[:1] == b"<" else "another kind of server"
        raise ProtocolError(
            f"the server at {target} does not speak the fnserver protocol: it answered like"
            f" {what} ({first[:40]!r}); check the address and port"
        )


def _error_from_frame(frame: dict[str, Any]) -> FnError:
    err = frame.get("error")
    if not isinstance(err, dict):
        return ProtocolError("error frame without an 'error' map")
    return error_from_wire(err.get("code"), err.get("message", ""), err.get("details"))


def _consume(future: asyncio.Future[Any]) -> None:
    """Mark an abandoned future's exception as seen, so asyncio does not log it."""
    if future.done() and not future.cancelled():
        future.exception()
    else:
        future.cancel()


def _hash_file(path: str) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(CHUNK_SIZE):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


async def _file_chunks(path: str, size: int, chunk_size: int) -> AsyncGenerator[bytes, None]:
    f: BinaryIO = await asyncio.to_thread(open, path, "rb")
    try:
        remaining = size
        while remaining > 0:
            block = await asyncio.to_thread(f.read, min(chunk_size, remaining))
            if not block:
                raise InvalidArgumentError(f"{path} shrank while it was being uploaded")
            remaining -= len(block)
            yield block
    finally:
        f.close()


async def _byte_chunks(data: bytes, chunk_size: int) -> AsyncGenerator[bytes, None]:
    for start in range(0, len(data), chunk_size):
        yield data[start : start + chunk_size]


async def _stream_chunks(source: AsyncIterable[bytes], chunk_size: int) -> AsyncGenerator[bytes, None]:
    """A stream's chunks, each cut to at most ``chunk_size`` (the server's, §4)."""
    async for block in source:
        for start in range(0, len(block), chunk_size):
            yield block[start : start + chunk_size]
