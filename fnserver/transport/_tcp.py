"""The TCP front: connections, HELLO, dispatch, upload sinks, flow control (PROTOCOL.md).

Thin on purpose: bytes go into the pure :class:`FrameDecoder`; each complete frame is decoded
into its operation's request record and handed to the services; replies of one read are joined
into one ``transport.write`` (MEASURED.md: one write per batch is ~4x cheaper than one per
reply). No use-case logic lives here. Every task is tracked, and an exception in one becomes an
error frame, never a silent loss.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, Protocol, cast

from ..config import ServerConfig
from ..protocol import (
    OPERATIONS,
    OPS,
    PROTOCOL_VERSION,
    FnError,
    FrameDecoder,
    HelloRequest,
    InternalError,
    InvalidArgumentError,
    ProgressEvent,
    ProtocolError,
    RegisterRequest,
    TooLargeError,
    UnauthenticatedError,
    UnavailableError,
    UploadChunk,
    encode_error,
    encode_event,
    encode_response,
    parse_request,
)
from ..service import Caller, RequestContext, Services, UploadSink

__all__ = ["DISPATCHED_OPS", "TcpFront"]

log = logging.getLogger("fnserver")

#: Requests one connection may have in flight; bounds what one client can make the server hold.
MAX_IN_FLIGHT: Final = 4096


class _Reply(Protocol):
    def to_wire(self) -> dict[str, Any]: ...


_Handler = Callable[[Services, RequestContext, Any], Awaitable[_Reply]]

#: Operations answered by a service call, by name. HELLO, register and upload need the
#: connection itself (authentication state, the upload stream) and are handled below.
_HANDLERS: Final[Mapping[str, _Handler]] = {
    "ping": lambda s, ctx, req: s.ping(ctx, req),
    "list": lambda s, ctx, req: s.functions.list(ctx, req),
    "get": lambda s, ctx, req: s.functions.get(ctx, req),
    "delete": lambda s, ctx, req: s.functions.delete(ctx, req),
    "alias": lambda s, ctx, req: s.functions.alias(ctx, req),
    "invoke": lambda s, ctx, req: s.invocations.invoke(ctx, req),
    "compile": lambda s, ctx, req: s.compile(ctx, req),
}
_CONNECTION_OPS: Final = frozenset({"hello", "register", "upload"})
#: Every operation this front answers; a test checks it against the table and the spec.
DISPATCHED_OPS: Final = frozenset(_HANDLERS) | _CONNECTION_OPS
if DISPATCHED_OPS != OPS:  # pragma: no cover - caught at import, never as a KeyError on a live socket
    raise ImportError(f"TCP dispatch and OPERATIONS disagree: {sorted(DISPATCHED_OPS ^ OPS)}")

_conn_ids = itertools.count(1)


class TcpFront:
    """The listening socket and its connections."""

    def __init__(self, config: ServerConfig, services: Services) -> None:
        self.config = config
        self.services = services
        self.stopping = False
        self._server: asyncio.Server | None = None
        self._connections: set[Connection] = set()

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        assert self._server is not None and self._server.sockets
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        """Listen on the configured address."""
        loop = asyncio.get_running_loop()
        if self.config.listen_fd is not None:
            # A serving process under the supervisor: the socket is bound and listening
            # already, shared (SO_REUSEPORT) with the other serving processes.
            sock = socket.socket(fileno=self.config.listen_fd)
            self._server = await loop.create_server(lambda: Connection(self), sock=sock)
            return
        self._server = await loop.create_server(
            lambda: Connection(self), self.config.host, self.config.port, reuse_address=True
        )

    def attach(self, conn: Connection) -> None:
        """A connection opened."""
        self._connections.add(conn)

    def detach(self, conn: Connection) -> None:
        """A connection closed."""
        self._connections.discard(conn)

    async def stop(self, grace_s: float) -> None:
        """Refuse new work, let requests in flight finish for ``grace_s``, answer the rest
        with UNAVAILABLE, close every connection (PROTOCOL.md §7)."""
        self.stopping = True
        if self._server is not None:
            self._server.close()
        busy = [t for c in self._connections for t in c.running()]
        if busy:
            await asyncio.wait(busy, timeout=grace_s)
        for conn in list(self._connections):
            conn.cancel_all()
        busy = [t for c in self._connections for t in c.running()]
        if busy:
            await asyncio.wait(busy, timeout=2.0)
        for conn in list(self._connections):
            conn.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)


class Connection(asyncio.Protocol):
    """One client connection: frames in, replies out, requests in flight tracked by id."""

    def __init__(self, front: TcpFront) -> None:
        self.front = front
        self.services = front.services
        self.config = front.config
        self.decoder = FrameDecoder(self.config.max_frame)
        self.transport: asyncio.Transport | None = None
        self.caller: Caller | None = None  # set by a successful HELLO
        self.peer = ""
        self.tag = f"c{next(_conn_ids)}"
        self._tasks: set[asyncio.Task[Any]] = set()
        self._in_flight: set[int] = set()
        self._uploads: dict[int, UploadSink] = {}
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._holds: set[str] = set()
        self._closing = False

    # --- transport callbacks ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport does not subclass asyncio.Transport, so no isinstance check.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else ""
        self.front.attach(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self.front.detach(self)
        self._abort_uploads(UnavailableError("connection closed during upload"))
        for task in list(self._tasks):
            task.cancel()

    def pause_writing(self) -> None:
        # The peer is not reading its replies: stop reading its requests until it catches up.
        self._hold_reading("write", True)

    def resume_writing(self) -> None:
        self._hold_reading("write", False)

    def data_received(self, data: bytes) -> None:
        try:
            self.decoder.feed(data)
            while (frame := self.decoder.next_frame()) is not None:
                self._dispatch(frame)
                if self._closing:
                    return
        except (ProtocolError, TooLargeError) as err:
            self._fail_connection(err)
        self._flush()

    # --- what the front sees ---

    def running(self) -> list[asyncio.Task[Any]]:
        """The tasks answering this connection's requests."""
        return list(self._tasks)

    def cancel_all(self) -> None:
        """Used at shutdown: requests still running now get UNAVAILABLE."""
        for task in list(self._tasks):
            task.cancel()

    def close(self) -> None:
        """Close the transport after pending writes."""
        self._closing = True
        self._abort_uploads(UnavailableError("connection closed during upload"))
        if self.transport is not None:
            self.transport.close()

    # --- output ---

    def _send(self, frame: bytes) -> None:
        """Queue a frame; frames queued in one loop iteration go out in one write."""
        if self._closing:
            return
        self._out.append(frame)
        if len(self._in_flight) <= 1 and not self._flush_scheduled:
            # Nothing else in flight here: no later reply to coalesce with, so the loop
            # iteration a scheduled flush costs would only add latency.
            self._flush()
            return
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(self._out))
        self._out.clear()

    def _hold_reading(self, reason: str, on: bool) -> None:
        """Pause reading while any reason holds (upload backlog, unread replies)."""
        if self.transport is None or self.transport.is_closing():
            return
        before = bool(self._holds)
        if on:
            self._holds.add(reason)
        else:
            self._holds.discard(reason)
        if bool(self._holds) != before:
            if self._holds:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    def _fail_connection(self, err: FnError, req_id: int | None = None) -> None:
        """Send a connection-level error and close (PROTOCOL.md §2, §4)."""
        self._send(encode_error(req_id, err))
        self._flush()
        self.close()

    def _abort_uploads(self, err: FnError) -> None:
        for sink in list(self._uploads.values()):
            sink.abort(err)

    # --- dispatch ---

    def _dispatch(self, frame: dict[str, Any]) -> None:
        try:
            op, req_id, body = parse_request(frame)
        except ProtocolError as err:
            self._fail_connection(err, frame.get("id") if isinstance(frame.get("id"), int) else None)
            return
        except FnError as err:
            self._send(encode_error(frame.get("id"), err))
            return
        if op == "upload":
            sink = self._uploads.get(req_id)
            if sink is not None:  # chunks for a finished or refused upload are dropped (§5.2)
                try:
                    sink.feed(UploadChunk.from_wire(body).data)
                except FnError as err:
                    sink.abort(err)
            return
        if self.caller is None:
            self._hello(op, req_id, body)
            return
        if op == "hello":
            self._send(encode_error(req_id, InvalidArgumentError("HELLO was already sent")))
            return
        if len(self._in_flight) >= MAX_IN_FLIGHT:
            self._send(
                encode_error(
                    req_id,
                    UnavailableError(
                        f"{MAX_IN_FLIGHT} requests are already in flight on this connection;"
                        " wait for some replies"
                    ),
                )
            )
            return
        if req_id in self._in_flight:
            self._send(encode_error(req_id, InvalidArgumentError(f"request id {req_id} is already in flight")))
            return
        if self.front.stopping:
            self._send(encode_error(req_id, UnavailableError("server is shutting down")))
            return
        try:
            req = OPERATIONS[op].request.from_wire(body)
        except FnError as err:
            self._send(encode_error(req_id, err))
            return
        ctx = RequestContext.new(self.caller, peer=self.peer, tag=f"{self.tag}.{req_id}")
        if op == "register":
            self._start_register(req_id, ctx, req)
            return
        self._run(req_id, op, _HANDLERS[op](self.services, ctx, req))

    def _hello(self, op: str, req_id: int, body: dict[str, Any]) -> None:
        if op != "hello":
            self._fail_connection(UnauthenticatedError("the first request must be HELLO (PROTOCOL.md §4)"), req_id)
            return
        hello = HelloRequest.from_wire(body)
        if hello.protocol != PROTOCOL_VERSION:
            self._fail_connection(
                ProtocolError(
                    f"protocol version {body.get('protocol')!r} is not supported; this server speaks {PROTOCOL_VERSION}",
                    {"protocol": PROTOCOL_VERSION},
                ),
                req_id,
            )
            return
        want = self.config.token
        if want is not None:
            got = hello.token
            if got is None or not hmac.compare_digest(got.encode(), want.encode()):
                self._fail_connection(UnauthenticatedError("missing or wrong token"), req_id)
                return
        self.caller = Caller()
        self._send(encode_response(req_id, self.services.hello().to_wire()))

    def _start_register(self, req_id: int, ctx: RequestContext, req: RegisterRequest) -> None:
        reason = f"upload:{req_id}"
        try:
            sink = self.services.registrations.open_upload(
                ctx, req, lambda on: self._hold_reading(reason, on)
            )
        except FnError as err:
            self._send(encode_error(req_id, err))
            return
        self._uploads[req_id] = sink

        def progress(event: ProgressEvent) -> None:
            self._send(encode_event(req_id, "progress", **event.to_wire()))

        async def register() -> _Reply:
            try:
                return await self.services.registrations.register(ctx, req, sink, progress)
            finally:
                self._uploads.pop(req_id, None)
                self._hold_reading(reason, False)

        self._run(req_id, "register", register())

    def _run(self, req_id: int, op: str, coro: Awaitable[_Reply]) -> None:
        self._in_flight.add(req_id)
        task = asyncio.ensure_future(self._answer(req_id, op, coro))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, req_id: int, op: str, coro: Awaitable[_Reply]) -> None:
        started = time.monotonic()
        try:
            reply = await coro
        except FnError as err:
            self._send(encode_error(req_id, err))
        except asyncio.CancelledError:
            self._send(encode_error(req_id, UnavailableError("server is shutting down")))
        except Exception as exc:
            log.exception("%s request %s/%d failed", op, self.tag, req_id)
            self._send(encode_error(req_id, InternalError(f"internal error: {type(exc).__name__}")))
        else:
            try:
                frame = encode_response(req_id, reply.to_wire(), self.config.max_frame)
            except TooLargeError as err:
                # Every reply is checked against the frame limit: a peer must never receive a
                # frame it is entitled to refuse (§2). The request fails, the connection lives.
                self._send(encode_error(req_id, err))
            else:
                self._send(frame)
        finally:
            self._in_flight.discard(req_id)
            log.debug("%s %s/%d done in %.1f ms", op, self.tag, req_id, (time.monotonic() - started) * 1e3)
