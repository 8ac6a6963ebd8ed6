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
import ctypes
import errno
import itertools
import logging
import socket
import ssl
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, Protocol, cast

from ..config import ServerConfig
from ..protocol import (
    OPERATIONS,
    OPS,
    PROTOCOL_VERSION,
    Ack,
    ClaimRequest,
    FnError,
    FrameDecoder,
    HelloRequest,
    InternalError,
    InvalidArgumentError,
    LogsRequest,
    ProgressEvent,
    ProtocolError,
    RegisterRequest,
    ReportRequest,
    ResourceExhaustedError,
    TooLargeError,
    UnauthenticatedError,
    UnavailableError,
    UploadChunk,
    encode_error,
    encode_event,
    encode_response,
    parse_request,
)
from ..service import Caller, RequestContext, Services, UploadSink, audit_event, audit_refused_hello
from ..service._calls import follow_records
from ._lag import LagMonitor

__all__ = ["DISPATCHED_OPS", "TcpFront", "access_line", "big_blocks_from_mmap", "os_error_reply"]

log = logging.getLogger("fnserver")
#: One line per request at info level (OPERATIONS.md "Logs").
access = logging.getLogger("fnserver.access")

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
    "delete": lambda s, ctx, req: s.audited(ctx, "delete", req.name, s.functions.delete(ctx, req)),
    "alias": lambda s, ctx, req: s.audited(ctx, "alias", req.name, s.functions.alias(ctx, req)),
    "invoke": lambda s, ctx, req: s.invoke(ctx, req),
    "compile": lambda s, ctx, req: s.compile(ctx, req),
    "result": lambda s, ctx, req: s.calls.result(ctx, req),
    "logs": lambda s, ctx, req: s.calls.logs(ctx, req),
    "stats": lambda s, ctx, req: s.calls.stats(ctx, req),
    "report": lambda s, ctx, req: s.report(ctx, req),
    "claim": lambda s, ctx, req: s.claim(ctx, req),
    "renew": lambda s, ctx, req: s.renew(ctx, req),
    "complete": lambda s, ctx, req: s.complete(ctx, req),
}
_CONNECTION_OPS: Final = frozenset({"hello", "register", "upload"})
#: Internal operations (§5.15) are not worth an access line each.
_QUIET_OPS: Final = frozenset({"report", "claim", "renew", "complete"})
#: Every operation this front answers; a test checks it against the table and the spec.
DISPATCHED_OPS: Final = frozenset(_HANDLERS) | _CONNECTION_OPS
if DISPATCHED_OPS != OPS:  # pragma: no cover - caught at import, never as a KeyError on a live socket
    raise ImportError(f"TCP dispatch and OPERATIONS disagree: {sorted(DISPATCHED_OPS ^ OPS)}")

_conn_ids = itertools.count(1)

#: A connection may always buffer this much of an unfinished frame, whatever the others hold:
#: small requests never wait for the shared budget (ServerConfig.max_buffered).
PARTIAL_ALLOWANCE: Final = 64 * 1024
#: Replies up to this size always go out; bigger ones count against the reply caps (§1.1).
SMALL_REPLY: Final = 64 * 1024
#: glibc's mallopt parameter number for the mmap threshold (malloc.h).
_M_MMAP_THRESHOLD: Final = -3
#: What the host can run out of while serving a request the client did nothing wrong in.
_RESOURCE_ERRNOS: Final = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EMFILE, errno.ENFILE, errno.ENOMEM})


class TcpFront:
    """The listening socket and its connections, their limits and the deadlines that drop them
    (PROTOCOL.md §1.1)."""

    def __init__(self, config: ServerConfig, services: Services, tls: ssl.SSLContext | None = None) -> None:
        self.config = config
        self.services = services
        #: TLS for every connection (``_tls.py``); the handshake must end by the HELLO deadline.
        self.tls = tls
        self.stopping = False
        self._server: asyncio.Server | None = None
        self._connections: set[Connection] = set()
        self._per_peer: Counter[str] = Counter()
        #: Connections of other fronts counted against the same limits (the HTTP gateway's).
        self.others = 0
        #: Bytes all connections' decoders hold (unfinished frames, and frames not yet taken).
        self.buffered = 0
        #: Frame lengths reserved against max_buffered by connections reading a big frame.
        self._reserved: dict[Connection, int] = {}
        self._reserved_total = 0
        self._budget_waiters: dict[Connection, None] = {}  # ordered: first paused, first resumed
        #: Connections whose last write left bytes in their transport: the only ones whose
        #: unread replies can be non-zero.
        self._backlogged: set[Connection] = set()
        self._watcher: asyncio.Task[None] | None = None
        self.lag = LagMonitor()
        self._trimmer = HeapTrimmer()
        self._trimming: asyncio.Future[None] | None = None

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        assert self._server is not None and self._server.sockets
        return int(self._server.sockets[0].getsockname()[1])

    def connections(self) -> list[Connection]:
        """The connections open now (for stats and tests)."""
        return list(self._connections)

    async def start(self) -> None:
        """Listen on the configured address."""
        loop = asyncio.get_running_loop()
        big_blocks_from_mmap()
        if self.config.listen_fd is not None:
            # A serving process under the supervisor: the socket is bound and listening
            # already, shared (SO_REUSEPORT) with the other serving processes.
            sock = socket.socket(fileno=self.config.listen_fd)
            self._server = await loop.create_server(lambda: Connection(self), sock=sock, **self._tls_args())
        else:
            self._server = await loop.create_server(
                lambda: Connection(self), self.config.host, self.config.port, reuse_address=True,
                **self._tls_args(),
            )
        self.lag.start()
        self._watcher = loop.create_task(self._watch(), name="fnserver-connection-deadlines")
        self._watcher.add_done_callback(_report_crash)

    def _tls_args(self) -> dict[str, Any]:
        if self.tls is None:
            return {}
        return {"ssl": self.tls, "ssl_handshake_timeout": self.config.hello_timeout_s}

    # --- admission and accounting ---

    def attach(self, conn: Connection) -> FnError | None:
        """A connection opened: count it, or say why it is refused (§1.1)."""
        refused = self.admit(conn.peer_host)
        if refused is None:
            self._connections.add(conn)
        return refused

    def admit(self, peer_host: str) -> FnError | None:
        """Count one more connection from ``peer_host`` (of this front, or of another front
        that shares its limits: the HTTP gateway), or say why it is refused (§1.1)."""
        c = self.config
        if len(self._connections) + self.others >= c.max_connections:
            return UnavailableError(
                f"the server has {c.max_connections} connections open; retry later",
                {"reason": "too_many_connections", "limit": c.max_connections},
            )
        if self._per_peer[peer_host] >= c.max_connections_per_peer:
            return UnavailableError(
                f"{c.max_connections_per_peer} connections from your address are open; close"
                " one or retry later",
                {"reason": "too_many_connections_from_peer", "limit": c.max_connections_per_peer},
            )
        self._per_peer[peer_host] += 1
        return None

    def admit_other(self, peer_host: str) -> FnError | None:
        """:meth:`admit` for a connection of another front; :meth:`leave_other` undoes it."""
        refused = self.admit(peer_host)
        if refused is None:
            self.others += 1
        return refused

    def leave_other(self, peer_host: str) -> None:
        """A connection counted by :meth:`admit_other` closed."""
        self.others -= 1
        self._leave(peer_host)

    def _leave(self, peer_host: str) -> None:
        self._per_peer[peer_host] -= 1
        if self._per_peer[peer_host] <= 0:
            del self._per_peer[peer_host]

    def detach(self, conn: Connection) -> None:
        """A connection closed: forget it and give back what it held."""
        if conn in self._connections:
            self._connections.discard(conn)
            self._leave(conn.peer_host)
        self._backlogged.discard(conn)
        self._budget_waiters.pop(conn, None)
        self.release(conn)
        self.buffered_changed(-conn.release_buffer())

    def buffered_changed(self, delta: int) -> None:
        """A connection's decoder grew or shrank by ``delta`` bytes."""
        self.buffered += delta

    def reserve(self, conn: Connection, length: int) -> bool:
        """Let ``conn`` read a frame of ``length`` bytes to its end, or pause it until the
        shared budget (``max_buffered``) has room (§1.1).

        The whole frame is reserved up front, so a connection that may read never has to
        stop before its frame is complete: the budget cannot end up split among half-read
        frames that all wait for each other. One frame is always let in when none is
        reserved, even one bigger than the budget.
        """
        if conn in self._reserved:
            return True
        if self._reserved_total and self._reserved_total + length > self.config.max_buffered:
            self._budget_waiters[conn] = None
            conn.hold_reading("buffer", True)
            return False
        self._reserved[conn] = length
        self._reserved_total += length
        return True

    def release(self, conn: Connection) -> None:
        """``conn``'s reserved frame is complete (or the connection gone): wake the waiters,
        each of which tries to reserve again."""
        length = self._reserved.pop(conn, None)
        if length is None:
            return
        self._reserved_total -= length
        if self._budget_waiters:
            waiters, self._budget_waiters = list(self._budget_waiters), {}
            for waiter in waiters:
                waiter.hold_reading("buffer", False)

    def backlogged(self, conn: Connection) -> None:
        """``conn`` has bytes waiting in its transport."""
        self._backlogged.add(conn)

    def unread_total(self) -> int:
        """Reply bytes written but not yet taken by their clients, across connections."""
        total = 0
        for conn in list(self._backlogged):
            unread = conn.unread()
            if unread == 0:
                self._backlogged.discard(conn)
            total += unread
        return total

    def reply_refused(self, conn: Connection, size: int) -> FnError | None:
        """Why a reply of ``size`` bytes may not be queued on ``conn`` now, or None (§1.1)."""
        c = self.config
        unread = conn.unread()
        cap = max(c.max_reply_buffer, c.max_frame + 64)
        # A client that took some bytes lately is reading, only slower than the server
        # writes: it may go past its own cap (the total still bounds it). One that has taken
        # nothing for a while (the deadline sweep tells) meets the cap.
        if unread + size > cap and conn.stalled_for(time.monotonic()) >= min(1.0, c.write_timeout_s / 2):
            return ResourceExhaustedError(
                f"reply of {size} bytes not sent: this connection has {unread} reply bytes its"
                f" client has not read, and may hold {cap}; read replies before sending more",
                {"reason": "unread_replies", "unread": unread, "limit": cap},
            )
        total_cap = max(c.max_reply_total, c.max_frame + 64)
        total = self.unread_total()
        if total + size > total_cap:
            return ResourceExhaustedError(
                f"reply of {size} bytes not sent: clients of this server have {total} reply bytes"
                " unread; retry later",
                {"reason": "unread_replies_total", "unread": total, "limit": total_cap},
            )
        return None

    # --- deadlines ---

    async def _watch(self) -> None:
        """Apply every connection's deadlines (§1.1): one sweep, not one timer per frame."""
        c = self.config
        shortest = min(c.hello_timeout_s, c.frame_timeout_s, c.idle_timeout_s, c.write_timeout_s)
        interval = min(1.0, max(0.01, shortest / 4))
        while True:
            await asyncio.sleep(interval)  # a tick, not a synchronisation
            now = time.monotonic()
            for conn in list(self._connections):
                conn.check_deadlines(now)
            if self._trimmer.due(len(self._connections) + self.others, self.buffered + self.unread_total()):
                self._trimming = asyncio.ensure_future(asyncio.to_thread(self._trimmer.trim))

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
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.wait([self._watcher])
        if self._trimming is not None:
            await asyncio.wait([self._trimming])  # a thread: it ends by itself, soon
        self.lag.stop()
        for conn in list(self._connections):
            conn.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)


class HeapTrimmer:
    """Give the heap's free pages back to the system once the clients that grew it left.

    Big blocks are mapped on their own and go back when freed (:func:`big_blocks_from_mmap`),
    but a thousand connections leave thousands of small buffers and objects spread over the
    heap and the arenas of the guest threads: freed, yet resident, because glibc returns only
    the top of a heap by itself (measured with ``bench_soak.py --probe-trim``: tens of MB
    fall at one ``malloc_trim``). The deadline sweep reports the load it sees (connections,
    and bytes buffered or unread); when it fell by half and by at least a thousand
    connections' worth since its peak, one ``malloc_trim(0)`` runs, on a thread (it walks
    every arena; the loop goes on meanwhile), and the peak starts again from there.
    """

    #: A fall smaller than this is not worth a trim: what one connection costs, roughly,
    #: times a few hundred (a busy server's ordinary churn must not trim every second).
    MIN_FALL_BYTES: Final = 16 * 1024 * 1024
    #: What an open connection is counted as, in bytes (its objects and buffers).
    PER_CONNECTION: Final = 32 * 1024

    def __init__(self) -> None:
        self._peak = 0
        self._running = False
        self.trims = 0
        try:
            self._trim: Any = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):  # not glibc: nothing to do
            self._trim = None

    def due(self, connections: int, held_bytes: int) -> bool:
        """Whether to trim now, given the load the sweep sees."""
        if self._trim is None or self._running:
            return False
        load = connections * self.PER_CONNECTION + held_bytes
        if load > self._peak:
            self._peak = load
            return False
        if self._peak - load < self.MIN_FALL_BYTES or load > self._peak // 2:
            return False
        self._peak = load
        self._running = True
        return True

    def trim(self) -> None:
        """Run ``malloc_trim(0)`` (on a thread: ctypes lets go of the GIL meanwhile)."""
        started = time.monotonic()
        try:
            self._trim(0)
            self.trims += 1
        finally:
            self._running = False
        log.info("gave the heap's free pages back (malloc_trim) in %.0f ms", (time.monotonic() - started) * 1e3)


def big_blocks_from_mmap() -> None:
    """Serve allocations of 1 MiB and more from their own mappings, always.

    glibc raises its mmap threshold (up to 32 MiB) each time a mapped block is freed, so after
    the first multi-MiB replies the next ones come from the heap, and a heap that grew for a
    burst of 6 MiB replies stays resident after they are freed (measured: 442 MB kept after a
    client read 600 of them, 300 MB after three never-reading clients left; with a fixed
    threshold 144 MB and 132 MB, from a 49 MB baseline). Fixing the threshold returns every big
    reply, upload chunk and output buffer to the system when it is freed. Process-wide and
    idempotent: each server process sets it at start (``__main__``), before its first big
    allocation; the front sets it again for servers embedded in another program (the tests).
    """
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, 1024 * 1024)
    except (OSError, AttributeError):  # not glibc: its own policy applies
        pass


def access_line(op: str, ctx: RequestContext | None, req: Any, reply: Any, outcome: str,
                 seconds: float, peer: str) -> None:
    """One line per request at info (``fnserver.access``): operation, tenant,
    function@version, outcome code and duration; JSON logs get each as a field."""
    name = getattr(req, "name", None) if not isinstance(req, ClaimRequest | ReportRequest) else None
    version = getattr(reply, "version", None) if reply is not None else None
    if not isinstance(version, int):
        ref = getattr(req, "version", None)
        version = ref if isinstance(ref, int | str) else None
    function = f"{name}@{version}" if name and version is not None else (name or "-")
    tenant = ctx.caller.tenant if ctx is not None else "-"
    ms = round(seconds * 1e3, 3)
    access.info(
        "%s tenant=%s function=%s outcome=%s duration_ms=%.3f peer=%s",
        op, tenant, function, outcome, ms, peer,
        extra={"op": op, "tenant": tenant, "function": function, "code": outcome,
               "duration_ms": ms, "peer": peer},
    )


def _report_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        asyncio.get_running_loop().call_exception_handler(
            {"message": "connection deadline watcher failed", "exception": task.exception(), "task": task}
        )


class Connection(asyncio.Protocol):
    """One client connection: frames in, replies out, requests in flight tracked by id."""

    def __init__(self, front: TcpFront) -> None:
        self.front = front
        self.services = front.services
        self.config = front.config
        # Small before HELLO (§1.1): an unauthenticated peer cannot make the server buffer much.
        self.decoder = FrameDecoder(min(self.config.hello_max_frame, self.config.max_frame))
        self.transport: asyncio.Transport | None = None
        self.caller: Caller | None = None  # set by a successful HELLO
        self.peer = ""
        self.peer_host = ""
        self.tag = f"c{next(_conn_ids)}"
        #: Set when the connection is gone and every request it started has ended.
        self.gone = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._in_flight: set[int] = set()
        self._uploads: dict[int, UploadSink] = {}
        self._registers = 0
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._flush_scheduled = False
        self._pump_scheduled = False
        self._holds: set[str] = set()
        self._closing = False
        self._lost = False
        now = time.monotonic()
        self._opened_at = now
        self._closed_at: float | None = None
        self._last_rx = now
        self._frame_since: float | None = None  # when the unfinished frame's first byte came
        self._frames = 0  # frames taken from the decoder
        self._frame_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._buffered = 0  # decoder bytes counted in front.buffered
        self._written = 0  # bytes handed to the transport
        self._drained_mark = 0  # bytes known to have left the transport at the last check
        self._stalled_since: float | None = None

    # --- transport callbacks ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport does not subclass asyncio.Transport, so no isinstance check.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.peer = f"{peer[0]}:{peer[1]}"
            self.peer_host = str(peer[0])
        refused = self.front.attach(self)
        if refused is not None:
            log.warning("refused a connection from %s: %s", self.peer, refused.message)
            self._closing = True
            self._closed_at = time.monotonic()
            self.transport.write(encode_error(None, refused))
            self.transport.close()
            return
        c = self.config
        # pause_writing() (which stops reading this client) fires at the high-water mark.
        self.transport.set_write_buffer_limits(high=c.reply_high_water, low=c.reply_high_water // 4)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._lost = True
        self.front.detach(self)
        self._abort_uploads(UnavailableError("connection closed during upload"))
        self._out.clear()
        self._out_bytes = 0
        for task in list(self._tasks):
            task.cancel()
        if not self._tasks:
            self.gone.set()

    def pause_writing(self) -> None:
        # The peer is not reading its replies: stop reading its requests until it catches up.
        self.hold_reading("write", True)

    def resume_writing(self) -> None:
        self.hold_reading("write", False)

    def data_received(self, data: bytes) -> None:
        self._last_rx = time.monotonic()
        try:
            self.decoder.feed(data)
        except (ProtocolError, TooLargeError) as err:
            self._fail_connection(err)
            return
        self._pump()

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
        if not self._closing:
            self._closed_at = time.monotonic()
        self._closing = True
        self._abort_uploads(UnavailableError("connection closed during upload"))
        if self.transport is not None:
            self.transport.close()

    def unread(self) -> int:
        """Reply bytes queued here or in the transport that the client has not taken yet."""
        t = self.transport
        return self._out_bytes + (t.get_write_buffer_size() if t is not None and not t.is_closing() else 0)

    async def drained(self) -> None:
        """Return once the client has taken most of its unread replies (a stream waits here
        rather than piling up events; the write deadline drops a client that never reads)."""
        while self.unread() > SMALL_REPLY // 2 and not self._closing:
            await asyncio.sleep(0.05)

    def stalled_for(self, now: float) -> float:
        """Seconds the client has taken none of its unread replies (0 when it took some
        since the last look, or had nothing unread when the deadline sweep last looked)."""
        t = self.transport
        if t is not None and not t.is_closing():
            drained = self._written - t.get_write_buffer_size()
            if drained != self._drained_mark:
                self._drained_mark = drained
                self._stalled_since = now
        return 0.0 if self._stalled_since is None else now - self._stalled_since

    def release_buffer(self) -> int:
        """Give back the decoder's bytes to the front's count (the connection is gone)."""
        held, self._buffered = self._buffered, 0
        return held

    def check_deadlines(self, now: float) -> None:
        """Drop this connection if one of its deadlines passed (§1.1)."""
        c = self.config
        t = self.transport
        if t is None:
            return
        if self._closing:
            # Closed, but its last writes are still queued: a peer that reads nothing would keep
            # it (and them) forever.
            if self._closed_at is not None and now - self._closed_at > c.write_timeout_s:
                t.abort()
            return
        if self.caller is None and now - self._opened_at > c.hello_timeout_s:
            self._drop("hello_timeout", f"no HELLO within {c.hello_timeout_s:g} s")
            return
        # While reading is paused the frame cannot progress; the pause's own rules apply.
        if self._frame_since is not None and not self._holds and now - self._frame_since > c.frame_timeout_s:
            self._drop("frame_timeout", f"a frame took over {c.frame_timeout_s:g} s to arrive")
            return
        unread = self.unread()
        if unread:
            drained = self._written - t.get_write_buffer_size()
            if drained != self._drained_mark or self._stalled_since is None:
                self._drained_mark = drained
                self._stalled_since = now
            elif now - self._stalled_since > c.write_timeout_s:
                log.warning(
                    "dropping %s (%s): %d reply bytes unread for %.0f s",
                    self.tag, self.peer, unread, now - self._stalled_since,
                )
                # Nothing more can reach a peer that reads nothing: free its replies now.
                self._closing = True
                t.abort()
                return
        else:
            self._stalled_since = None
        if (
            not self._in_flight
            and not self._uploads
            and not unread
            and not self.decoder.buffered
            and now - self._last_rx > c.idle_timeout_s
        ):
            self._drop("idle_timeout", f"idle for {c.idle_timeout_s:g} s")

    # --- input ---

    def _pump(self) -> None:
        """Take and dispatch the frames buffered, unless reading is held (§1.1: past a
        high-water mark nothing new starts for this connection)."""
        self._pump_scheduled = False
        frames = self._frames
        try:
            while not self._holds and not self._closing:
                frame = self.decoder.next_frame()
                if frame is None:
                    break
                self._frames += 1
                self._dispatch(frame)
        except (ProtocolError, TooLargeError) as err:
            self._fail_connection(err)
        self._account(new_frame=self._frames != frames)
        self._flush()
        if self._frame_waiters:
            for want, fut in [w for w in self._frame_waiters if w[0] <= self._frames]:
                self._frame_waiters.remove((want, fut))
                if not fut.done():
                    fut.set_result(None)

    async def frames_taken(self, count: int) -> None:
        """Wait until ``count`` frames of this connection have been dispatched (tests and
        diagnostics: "the server has seen every request sent so far")."""
        if self._frames >= count:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._frame_waiters.append((count, fut))
        await fut

    def _account(self, *, new_frame: bool) -> None:
        """Keep the front's count of buffered bytes and this frame's start time current."""
        if self._closing:
            return
        buffered = self.decoder.buffered
        delta, self._buffered = buffered - self._buffered, buffered
        if not buffered:
            self._frame_since = None
        elif new_frame or self._frame_since is None:
            self._frame_since = time.monotonic()
        if delta:
            self.front.buffered_changed(delta)
        length = self.decoder.frame_length
        if new_frame or length is None:
            self.front.release(self)  # the reserved frame, if any, is complete
        if buffered > PARTIAL_ALLOWANCE and length is not None:
            self.front.reserve(self, length)

    def hold_reading(self, reason: str, on: bool) -> None:
        """Pause reading (and dispatching what is buffered) while any reason holds: upload
        backlog, unread replies, the shared buffer budget."""
        if self.transport is None or self._closing or self.transport.is_closing():
            return
        before = bool(self._holds)
        if on:
            self._holds.add(reason)
        else:
            self._holds.discard(reason)
        if bool(self._holds) == before:
            return
        if self._holds:
            self.transport.pause_reading()
            return
        self.transport.resume_reading()
        if self._frame_since is not None:
            self._frame_since = time.monotonic()  # the wait was the server's, not the client's
        if self.decoder.buffered and not self._pump_scheduled:
            # Frames read before the pause are still waiting in the decoder.
            self._pump_scheduled = True
            asyncio.get_running_loop().call_soon(self._pump)

    # --- output ---

    def _send(self, frame: bytes) -> None:
        """Queue a frame; frames queued in one loop iteration go out in one write."""
        if self._closing:
            return
        self._out.append(frame)
        self._out_bytes += len(frame)
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
        t = self.transport
        if self._out and t is not None and not t.is_closing():
            data = self._out[0] if len(self._out) == 1 else b"".join(self._out)
            self._written += len(data)
            t.write(data)
            if t.get_write_buffer_size():
                self.front.backlogged(self)
        self._out.clear()
        self._out_bytes = 0

    def _drop(self, reason: str, message: str) -> None:
        """Close for a broken limit: one UNAVAILABLE error frame (id nil), then the close."""
        log.info("closing %s (%s): %s", self.tag, self.peer, message)
        self._fail_connection(UnavailableError(f"connection closed: {message}", {"reason": reason}))

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
        if not self.services.auth.still_valid(self.caller):
            # Revoked (or the server now wants tokens): refused from the next request on.
            audit_event(RequestContext(self.caller, peer=self.peer), "request_refused", "UNAUTHENTICATED", operation=op)
            self._fail_connection(UnauthenticatedError("the token of this connection was revoked"), req_id)
            return
        ctx = RequestContext.new(self.caller, peer=self.peer, tag=f"{self.tag}.{req_id}")
        try:
            self.services.authorize(ctx, op)
        except FnError as err:
            self._send(encode_error(req_id, err))
            return
        if op == "register":
            self._start_register(req_id, ctx, req)
            return
        if op == "logs" and req.follow:
            self._start_follow(req_id, ctx, req)
            return
        self._run(req_id, op, _HANDLERS[op](self.services, ctx, req), ctx, req)

    def _hello(self, op: str, req_id: int, body: dict[str, Any]) -> None:
        if op != "hello":
            self._fail_connection(UnauthenticatedError("the first request must be HELLO (PROTOCOL.md §4)"), req_id)
            return
        hello = HelloRequest.from_wire(body)
        if hello.protocol != PROTOCOL_VERSION:
            got = body.get("protocol")
            self._fail_connection(
                ProtocolError(
                    f"'protocol' must be the integer {PROTOCOL_VERSION}, got {got!r}"
                    f" ({type(got).__name__}); this server speaks protocol {PROTOCOL_VERSION}",
                    {"protocol": PROTOCOL_VERSION},
                ),
                req_id,
            )
            return
        who = self.services.auth.authenticate(hello.token)
        if not isinstance(who, Caller):
            audit_refused_hello(self.peer, who.token_id, "missing" if hello.token is None else "invalid")
            self._fail_connection(UnauthenticatedError(who.message), req_id)
            return
        self.caller = who
        self.decoder.max_frame = self.config.max_frame  # the limit HELLO's reply announces
        self._send(encode_response(req_id, self.services.hello(who).to_wire()))

    def _start_register(self, req_id: int, ctx: RequestContext, req: RegisterRequest) -> None:
        limit = self.config.max_registers_per_connection
        if self._registers >= limit:
            # Each register holds a staging directory and, while it uploads, a descriptor:
            # one connection must not be able to take them all (§5.2).
            self._send(
                encode_error(
                    req_id,
                    ResourceExhaustedError(
                        f"{limit} registers are already in progress on this connection;"
                        " wait for one to finish",
                        {"reason": "registers_per_connection", "limit": limit},
                    ),
                )
            )
            return
        reason = f"upload:{req_id}"
        try:
            sink = self.services.registrations.open_upload(
                ctx, req, lambda on: self.hold_reading(reason, on)
            )
        except FnError as err:
            self._send(encode_error(req_id, err))
            return
        self._uploads[req_id] = sink
        self._registers += 1

        def progress(event: ProgressEvent) -> None:
            self._send(encode_event(req_id, "progress", **event.to_wire()))

        async def register() -> _Reply:
            try:
                return await self.services.audited(
                    ctx, "register", req.name, self.services.registrations.register(ctx, req, sink, progress)
                )
            finally:
                self._registers -= 1
                self._uploads.pop(req_id, None)
                self.hold_reading(reason, False)

        self._run(req_id, "register", register(), ctx, req)

    def _start_follow(self, req_id: int, ctx: RequestContext, req: LogsRequest) -> None:
        """``logs`` with ``follow`` (§5.13): each record as an ``event`` until the client goes
        (or the server stops); sent only while the client reads them (the reply caps hold)."""

        async def follow() -> _Reply:
            async for record in follow_records(lambda r: self.services.calls.logs(ctx, r), req):
                self._send(encode_event(req_id, "record", record=record.to_wire()))
                if self.unread() > SMALL_REPLY:
                    await self.drained()
            return Ack()

        self._run(req_id, "logs", follow(), ctx, req)

    def _run(self, req_id: int, op: str, coro: Awaitable[_Reply], ctx: RequestContext | None = None,
             req: Any = None) -> None:
        self._in_flight.add(req_id)
        # Named after the request, so the loop-lag warning can say which one held the loop.
        task = asyncio.ensure_future(self._answer(req_id, op, coro, ctx, req))
        task.set_name(f"{op} {self.tag}.{req_id}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if self._lost and not self._tasks:
            self.gone.set()

    async def _answer(self, req_id: int, op: str, coro: Awaitable[_Reply], ctx: RequestContext | None,
                      req: Any) -> None:
        started = time.perf_counter()
        outcome = "OK"
        reply: _Reply | None = None
        try:
            reply = await coro
        except FnError as err:
            outcome = err.code
            self._send(encode_error(req_id, err))
        except asyncio.CancelledError:
            outcome = "UNAVAILABLE"
            self._send(encode_error(req_id, UnavailableError("server is shutting down")))
        except OSError as exc:
            translated = self._os_error(op, req_id, exc)
            outcome = translated.code
            self._send(encode_error(req_id, translated))
        except Exception as exc:
            outcome = "INTERNAL"
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
                refused = self.front.reply_refused(self, len(frame)) if len(frame) > SMALL_REPLY else None
                self._send(frame if refused is None else encode_error(req_id, refused))
        finally:
            self._in_flight.discard(req_id)
            if op not in _QUIET_OPS and access.isEnabledFor(logging.INFO):
                access_line(op, ctx, req, reply, outcome, time.perf_counter() - started, self.peer)

    def _os_error(self, op: str, req_id: int, exc: OSError) -> FnError:
        return os_error_reply(op, f"{self.tag}/{req_id}", exc)


def os_error_reply(op: str, where: str, exc: OSError) -> FnError:
    """An OSError a service let through, translated at a front's boundary: what the host ran
    out of is RESOURCE_EXHAUSTED (logged, no traceback), anything else INTERNAL; the message
    never carries the file name the OSError holds. ``where`` names the request in the log."""
    why = exc.strerror or type(exc).__name__
    if exc.errno in _RESOURCE_ERRNOS:
        log.warning("%s request %s: %s", op, where, why)
        return ResourceExhaustedError(
            f"the server could not complete {op}: {why}",
            {"errno": errno.errorcode.get(exc.errno or 0, "")},
        )
    log.exception("%s request %s failed", op, where)
    return InternalError(f"internal error: {type(exc).__name__}")
