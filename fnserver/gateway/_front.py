"""The HTTP front: aiohttp's server on the serving process's own event loop (docs/HTTP.md).

aiohttp parses HTTP; this module adds what fnserver asks of every front: connections counted
with the TCP front's against the same limits, deadlines for a client that trickles its
headers or stops reading its reply, JSON errors with one status per code, and an access line
per request. Routes live in ``_v1.py`` and ``_legacy.py``; both call the same services the TCP
front calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import Any, Final, cast

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.registry import Collector

from ..config import ServerConfig
from ..metrics import families
from ..protocol import (
    FnError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    StatsRequest,
    TooLargeError,
    UnavailableError,
)
from ..service import Services
from ..transport import TcpFront, os_error_reply
from ._actions import PAUSE_LIMIT
from ._common import Gate, error_response, json_response
from ._legacy import Legacy
from ._v1 import V1

__all__ = ["HttpFront"]

log = logging.getLogger("fnserver")

#: The dashboard's files and the OpenAPI document, shipped inside the package.
_HERE: Final = Path(str(resources.files(__package__)))
STATIC_DIR: Final = _HERE / "static"
OPENAPI: Final = _HERE / "openapi.json"
#: Seconds aiohttp keeps reading an unread request body before it closes the connection.
LINGER_S: Final = 1.0
_REFUSED: Final = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
    b"Retry-After: 1\r\nContent-Length: %d\r\n\r\n%s"
)


class _Conn(web.RequestHandler):
    """aiohttp's protocol for one connection, counted against the server's connection limits
    and watched for its deadlines (:meth:`HttpFront._sweep`)."""

    def __init__(self, front: HttpFront, manager: web.Server, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.front = front
        self.refused = False
        self.peer_host = ""
        self.requests = 0
        #: Since when the client owes the rest of a request's headers (None: it owes nothing).
        self.partial_since: float | None = None
        self.in_request = False
        self.transport_: asyncio.Transport | None = None
        #: The reply bytes waiting in the transport at the last sweep, and since when that
        #: number has not moved (the client has read nothing).
        self._unread_seen = -1
        self._stalled_since: float | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self.peer_host = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        refused = self.front.tcp.admit_other(self.peer_host)
        if refused is not None:
            self.refused = True
            body = error_response(refused).text or ""
            data = body.encode()
            cast(asyncio.Transport, transport).write(_REFUSED % (len(data), data))
            transport.close()
            log.warning("refused an HTTP connection from %s: %s", self.peer_host, refused.message)
            return
        super().connection_made(transport)
        self.transport_ = cast(asyncio.Transport, transport)
        self.partial_since = time.monotonic()  # the first request's headers are due
        self.front.conns.add(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.refused:
            return
        self.front.conns.discard(self)
        self.front.tcp.leave_other(self.peer_host)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self.in_request and self.partial_since is None:
            self.partial_since = time.monotonic()
        super().data_received(data)

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """A request aiohttp could not parse (bad request line, headers or chunking) gets the
        JSON error every other refusal gets, and one log line without a traceback."""
        if status >= 500:
            return super().handle_error(request, status, exc, message)
        log.info("HTTP request from %s refused: %s", request.remote, message or exc)
        if request.writer.output_size > 0:
            raise ConnectionError("a response was sent already")
        err = TooLargeError if status == 413 else InvalidArgumentError
        resp = error_response(err(f"malformed HTTP request: {message or exc or status}"), status)
        resp.force_close()
        return resp

    def check(self, now: float, config: ServerConfig) -> None:
        """Drop the connection if a deadline passed: headers owed too long, or a reply its
        client has not read for the write deadline."""
        t = self.transport_
        if t is None or t.is_closing():
            return
        if self.partial_since is not None and not self.in_request:
            limit = config.hello_timeout_s if self.requests == 0 else config.frame_timeout_s
            if now - self.partial_since > limit:
                log.info("closing an HTTP connection from %s: no complete request within %g s", self.peer_host, limit)
                t.abort()
                return
        unread = t.get_write_buffer_size()
        if not unread:
            self._stalled_since = None
            return
        if unread != self._unread_seen or self._stalled_since is None:
            self._unread_seen = unread
            self._stalled_since = now
        elif now - self._stalled_since > config.write_timeout_s:
            log.warning("dropping an HTTP connection from %s: %d reply bytes unread for %.0f s",
                        self.peer_host, unread, now - self._stalled_since)
            t.abort()


class HttpFront:
    """The HTTP gateway's listening socket, app and connections."""

    def __init__(self, config: ServerConfig, services: Services, tcp: TcpFront,
                 tls: ssl.SSLContext | None = None) -> None:
        self.config = config
        self.services = services
        self.tcp = tcp
        self.tls = tls
        self.gate = Gate(services)
        self.conns: set[_Conn] = set()
        self.stopping = False
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        assert self._server is not None and self._server.sockets
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        """The gateway's base URL."""
        host = self.config.http_address_host
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    def app(self) -> web.Application:
        """The aiohttp application: every route, behind the error middleware."""
        app = web.Application(middlewares=[self._errors], client_max_size=self.config.max_frame)
        app[PAUSE_LIMIT] = self.config.frame_timeout_s
        app.add_routes(V1(self.gate).routes())
        app.add_routes(Legacy(self.gate).routes())
        app.add_routes(
            [
                web.get("/healthz", self.healthz),
                web.get("/readyz", self.readyz),
                web.get("/metrics", self.metrics),
                web.get("/v1/openapi.json", self.openapi),
                web.get("/", self.index),
            ]
        )
        app.router.add_static("/ui", STATIC_DIR, follow_symlinks=False)
        return app

    async def start(self) -> None:
        """Listen: on the supervisor's socket (``http_fd``), or bind ``http_host:http_port``."""
        c = self.config
        kwargs: dict[str, Any] = {
            "keepalive_timeout": c.idle_timeout_s,
            "access_log": None,
            "lingering_time": LINGER_S,
        }
        self._runner = web.AppRunner(self.app(), handle_signals=False, **kwargs)
        await self._runner.setup()
        manager = self._runner.server
        assert manager is not None
        loop = asyncio.get_running_loop()

        def factory() -> _Conn:
            return _Conn(self, manager, loop=loop, **kwargs)

        tls: dict[str, Any] = {}
        if self.tls is not None:
            tls = {"ssl": self.tls, "ssl_handshake_timeout": c.hello_timeout_s}
        if c.http_fd is not None:
            sock = socket.socket(fileno=c.http_fd)
            self._server = await loop.create_server(factory, sock=sock, **tls)
        else:
            self._server = await loop.create_server(
                factory, c.http_address_host, c.http_port, reuse_address=True, **tls
            )
        self._sweeper = loop.create_task(self._sweep(), name="fnserver-http-deadlines")
        if c.http_fd is None:
            log.info("HTTP gateway on %s", self.url)

    async def _sweep(self) -> None:
        """Apply every connection's deadlines: one sweep, not a timer per request."""
        c = self.config
        interval = min(1.0, max(0.01, min(c.hello_timeout_s, c.frame_timeout_s, c.write_timeout_s) / 4))
        while True:
            await asyncio.sleep(interval)  # a tick, not a synchronisation
            now = time.monotonic()
            for conn in list(self.conns):
                conn.check(now, c)

    async def stop(self, grace_s: float) -> None:
        """Stop listening, let requests in flight finish for ``grace_s``, close the rest."""
        self.stopping = True
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._runner is not None:
            manager = self._runner.server
            if manager is not None:
                manager.pre_shutdown()
                with contextlib.suppress(Exception):
                    await manager.shutdown(grace_s)
            await self._runner.cleanup()
        for conn in list(self.conns):
            if conn.transport_ is not None:
                conn.transport_.abort()

    # -- middleware --

    @web.middleware
    async def _errors(self, request: web.Request,
                      handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        """Every failure as the JSON error of its code; deadlines' bookkeeping per request."""
        conn = request.protocol if isinstance(request.protocol, _Conn) else None
        if conn is not None:
            conn.in_request = True
            conn.partial_since = None
            conn.requests += 1
        try:
            if self.stopping:
                raise UnavailableError("server is shutting down")
            return await handler(request)
        except FnError as err:
            if err.details.get("reason") != "frame_timeout":
                return error_response(err)
            # The client stopped sending its body: say so, and end the connection.
            resp = error_response(err, 408)
            resp.force_close()
            return resp
        except web.HTTPException as exc:
            return _http_error(exc)
        except ConnectionResetError:
            # The client went away mid-request: nobody is left to answer, nothing to log.
            return error_response(UnavailableError("the connection was closed by the client"))
        except OSError as exc:
            return error_response(os_error_reply("http", f"{request.method} {request.path}", exc))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("HTTP %s %s failed", request.method, request.path)
            return error_response(InternalError("internal error"))
        finally:
            if conn is not None:
                conn.in_request = False

    # -- operations routes --

    async def healthz(self, request: web.Request) -> web.Response:
        """Alive: this process answers."""
        return json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        """Ready: workers up, store writable (``Services.readiness``)."""
        checks = await self.services.readiness()
        ready = all(v == "ok" for v in checks.values())
        return json_response({"status": "ready" if ready else "unready", "checks": checks}, 200 if ready else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        """The Prometheus exposition of the caller's tenant (an admin's: every tenant's)."""

        async def work(ctx: Any) -> Any:
            req = StatsRequest(all=ctx.caller.role == "admin")
            return await self.services.calls.stats(ctx, req)

        reply = await self.gate.run(request, "stats", work)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Fixed(list(reply.functions), reply.server))
        text = await asyncio.to_thread(generate_latest, registry)
        return web.Response(body=text, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def openapi(self, request: web.Request) -> web.FileResponse:
        """The ``/v1`` API's OpenAPI document (docs/openapi.json)."""
        return web.FileResponse(OPENAPI, headers={"Content-Type": "application/json"})

    async def index(self, request: web.Request) -> web.FileResponse:
        """The dashboard."""
        return web.FileResponse(STATIC_DIR / "index.html")


class _Fixed(Collector):
    """One snapshot, already taken on the event loop, as metric families."""

    def __init__(self, functions: list[Any], server: Any) -> None:
        self.functions = functions
        self.server = server

    def collect(self) -> Any:
        yield from families(self.functions, self.server)


def _http_error(exc: web.HTTPException) -> web.Response:
    """aiohttp's own refusals (no such route, a method the route does not take, a body over
    the size it buffers) as fnserver's JSON errors."""
    if exc.status == 404:
        return error_response(NotFoundError("no such route (docs/HTTP.md lists them)"))
    if exc.status == 405:
        allowed = sorted(getattr(exc, "allowed_methods", ()) or ())
        resp = error_response(
            InvalidArgumentError(f"this route does not take that method; it takes {', '.join(allowed)}",
                                 {"allowed": allowed}),
            405,
        )
        resp.headers["Allow"] = ", ".join(allowed)
        return resp
    if exc.status == 413:
        return error_response(TooLargeError(exc.text or "request body too large"))
    err = InvalidArgumentError(exc.reason or "bad request") if exc.status < 500 else InternalError(exc.reason)
    return error_response(err, exc.status)
