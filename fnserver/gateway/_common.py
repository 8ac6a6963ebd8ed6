"""What every route of the gateway shares: the status of each error code, JSON bodies, the
bearer token, and running one use case with its context, permission check and access line."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, TypeVar

from aiohttp import web

from ..protocol import FnError, InvalidArgumentError, UnauthenticatedError
from ..service import Caller, RequestContext, Services, audit_refused_hello
from ..transport import access_line

__all__ = [
    "STATUS",
    "Gate",
    "error_response",
    "json_response",
    "jsonable",
    "query_bool",
    "query_int",
]

R = TypeVar("R")

#: The HTTP status of each error code (docs/HTTP.md "Errors": one table, here and there).
STATUS: Final[Mapping[str, int]] = {
    "INVALID_ARGUMENT": 400,
    "PROTOCOL_ERROR": 400,
    "CHECKSUM_MISMATCH": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "TOO_LARGE": 413,
    "BUILD_FAILED": 422,
    "TRAP": 422,
    "MEMORY_LIMIT": 422,
    "QUOTA_EXCEEDED": 429,
    "INTERNAL": 500,
    "RESOURCE_EXHAUSTED": 503,
    "UNAVAILABLE": 503,
    "TIMEOUT": 504,
}

_request_ids = itertools.count(1)


def jsonable(value: Any) -> Any:
    """A reply's wire form made JSON-ready: bytes become text (invalid UTF-8 replaced), tuples
    lists; everything else is already JSON's."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def json_response(body: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    """``body`` (made :func:`jsonable`) as an ``application/json`` reply."""
    text = json.dumps(jsonable(body), ensure_ascii=False, separators=(",", ":"))
    return web.Response(text=text, status=status, content_type="application/json", headers=headers)


def error_response(err: FnError, status: int | None = None) -> web.Response:
    """The JSON error of ``err`` with its code's status (or ``status``)."""
    headers: dict[str, str] = {}
    code = status or STATUS.get(err.code, 500)
    if err.code == "UNAUTHENTICATED":
        headers["WWW-Authenticate"] = 'Bearer realm="fnserver"'
    elif code == 503:
        headers["Retry-After"] = "1"
    return json_response(err.to_wire(), code, headers)


def query_int(request: web.Request, key: str, lo: int, hi: int) -> int | None:
    """Query parameter ``key`` as an integer from ``lo`` to ``hi``, or None when absent."""
    raw = request.query.get(key)
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise InvalidArgumentError(f"'{key}' must be an integer, got {raw!r}") from None
    if not lo <= value <= hi:
        raise InvalidArgumentError(f"'{key}' must be from {lo} to {hi}, got {value}")
    return value


def query_bool(request: web.Request, key: str) -> bool:
    """Query parameter ``key`` as a flag: absent, ``0``, ``false`` or ``no`` is False."""
    raw = request.query.get(key)
    if raw is None:
        return False
    value = raw.strip().lower()
    if value in ("", "1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise InvalidArgumentError(f"'{key}' must be 1 or 0 (true or false), got {raw!r}")


class Gate:
    """Who is calling and whether they may: the bearer token, the request context, the role
    check and the access line, for every route that runs a use case."""

    def __init__(self, services: Services) -> None:
        self.services = services

    def caller(self, request: web.Request) -> Caller:
        """The caller the request's bearer token stands for; UNAUTHENTICATED if none."""
        header = request.headers.get("Authorization")
        token: str | None = None
        if header is not None:
            scheme, _, value = header.strip().partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                raise UnauthenticatedError("the Authorization header must be 'Bearer TOKEN'")
            token = value.strip()
        who = self.services.auth.authenticate(token)
        if isinstance(who, Caller):
            return who
        peer = request.remote or ""
        audit_refused_hello(peer, who.token_id, "missing" if token is None else "invalid")
        if token is None:
            raise UnauthenticatedError(
                "this server requires a token: send 'Authorization: Bearer TOKEN' (an operator"
                " creates one with 'fnserver token add TENANT ROLE')"
            )
        raise UnauthenticatedError(who.message)

    def context(self, request: web.Request, op: str) -> RequestContext:
        """The request's context, after the caller's role was checked for ``op``."""
        ctx = RequestContext.new(self.caller(request), peer=_peer(request), tag=f"h{next(_request_ids)}")
        self.services.authorize(ctx, op)
        return ctx

    async def run(self, request: web.Request, op: str, work: Callable[[RequestContext], Awaitable[R]],
                  req: Any = None) -> R:
        """Run ``work`` for the authorized caller; log the access line whatever happens."""
        started = time.perf_counter()
        ctx: RequestContext | None = None
        outcome = "OK"
        reply: Any = None
        try:
            ctx = self.context(request, op)
            reply = await work(ctx)
            return reply
        except FnError as err:
            outcome = err.code
            raise
        except asyncio.CancelledError:
            outcome = "CANCELLED"
            raise
        except Exception:
            outcome = "INTERNAL"
            raise
        finally:
            access_line(op, ctx, req, reply, outcome, time.perf_counter() - started, _peer(request))


def _peer(request: web.Request) -> str:
    peer = request.transport.get_extra_info("peername") if request.transport is not None else None
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return request.remote or ""
