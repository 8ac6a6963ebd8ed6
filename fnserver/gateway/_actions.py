"""The use cases as the gateway's routes call them: requests built from HTTP parts through
the records' own ``from_wire`` (so every field is checked exactly as over TCP), then the same
service calls the TCP front makes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final, TypeVar

from aiohttp import BodyPartReader, MultipartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from ..protocol import (
    MAX_PAGE,
    DeleteReply,
    DeleteRequest,
    GetReply,
    GetRequest,
    InvalidArgumentError,
    InvokeAccepted,
    InvokeRequest,
    InvokeResult,
    RegisterRequest,
    TooLargeError,
    UnavailableError,
    VersionInfo,
    VersionRef,
    parse_version_ref,
)
from ..service import RequestContext
from ._common import Gate
from ._upload import Backlog, Spool, feed_sink, spooled

__all__ = [
    "FIELD_LIMIT",
    "PAUSE_LIMIT",
    "Form",
    "body_chunks",
    "delete",
    "get_version",
    "invoke",
    "read_body",
    "read_form",
    "register",
    "register_options",
    "spool_body",
    "split_ref",
]

T = TypeVar("T")

#: The app key holding how long a request body may pause (the config's frame deadline).
PAUSE_LIMIT: Final = web.AppKey("pause_limit", float)
#: Largest text field of a form (a name, an option): anything bigger is no such field.
FIELD_LIMIT: Final = 64 * 1024
_READ_CHUNK: Final = 256 * 1024


def split_ref(ref: str) -> tuple[str, VersionRef]:
    """``NAME``, ``NAME@VERSION`` or ``NAME@ALIAS`` as a name and a version reference."""
    name, at, version = ref.partition("@")
    if at and not version:
        raise InvalidArgumentError(f"{ref!r} names no version after '@'")
    return name, parse_version_ref(version) if at else None


def _int_option(key: str, raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise InvalidArgumentError(f"'{key}' must be an integer, got {raw!r}") from None


def register_options(get: Callable[[str], str | None], env: list[str]) -> dict[str, Any]:
    """The register options' wire map from query parameters or form fields (strings)."""
    opts: dict[str, Any] = {}
    for key in ("timeout_ms", "memory_mb", "fuel"):
        raw = get(key)
        if raw:
            opts[key] = _int_option(key, raw)
    for key in ("alias", "kind", "description"):
        raw = get(key)
        if raw:
            opts[key] = raw
    if env:
        pairs: dict[str, str] = {}
        for item in env:
            key, eq, value = item.partition("=")
            if not eq:
                raise InvalidArgumentError(f"'env' must be KEY=VALUE, got {item!r}")
            pairs[key] = value
        opts["env"] = pairs
    return opts


def _pause_limit(request: web.Request) -> float:
    return float(request.app[PAUSE_LIMIT])


async def _within(request: web.Request, read: Awaitable[T]) -> T:
    """One read of the body, which may not pause longer than the frame deadline."""
    limit = _pause_limit(request)
    try:
        async with asyncio.timeout(limit):
            return await read
    except TimeoutError:
        raise UnavailableError(
            f"connection closed: the request body paused for over {limit:g} s",
            {"reason": "frame_timeout"},
        ) from None
    except HttpProcessingError as exc:  # a body aiohttp could not parse (chunking, multipart)
        raise InvalidArgumentError(f"malformed request body: {exc.message}") from None


async def body_chunks(request: web.Request) -> AsyncIterator[bytes]:
    """The request body as it arrives (bounded reads: no chunk bigger than the reader's)."""
    while True:
        data = await _within(request, request.content.read(_READ_CHUNK))
        if not data:
            return
        yield data


async def part_chunks(request: web.Request, part: BodyPartReader) -> AsyncIterator[bytes]:
    """One multipart part's bytes as they arrive."""
    while True:
        data = await _within(request, part.read_chunk(_READ_CHUNK))
        if not data:
            return
        yield data


async def read_body(request: web.Request, limit: int, what: str) -> bytes:
    """The whole body, refused with TOO_LARGE past ``limit`` (before reading, when the
    request says its length)."""
    if request.content_length is not None and request.content_length > limit:
        raise TooLargeError(f"{what} of {request.content_length} bytes is over the limit of {limit}", {"limit": limit})
    out = bytearray()
    async for chunk in body_chunks(request):
        if len(out) + len(chunk) > limit:
            raise TooLargeError(f"{what} is over the limit of {limit} bytes", {"limit": limit})
        out += chunk
    return bytes(out)


class Form:
    """A multipart form's text fields, and its file part spooled to disk (if it had one)."""

    def __init__(self) -> None:
        self.fields: dict[str, list[str]] = {}
        self.filename: str | None = None
        self.spool: Spool | None = None

    def get(self, key: str) -> str | None:
        values = self.fields.get(key)
        return values[-1] if values else None

    def getall(self, key: str) -> list[str]:
        return self.fields.get(key, [])


async def _field_text(request: web.Request, part: BodyPartReader, name: str) -> str:
    data = bytearray()
    async for chunk in part_chunks(request, part):
        data += chunk
        if len(data) > FIELD_LIMIT:
            raise TooLargeError(f"form field {name!r} is over {FIELD_LIMIT} bytes", {"limit": FIELD_LIMIT})
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidArgumentError(f"form field {name!r} is not UTF-8 text") from None


class read_form:  # noqa: N801 - used as ``async with read_form(...) as form``
    """Parse a ``multipart/form-data`` body: text fields in memory (each bounded), the part
    named ``file_field`` streamed to a spool file (bounded by ``limit``), removed on exit."""

    def __init__(self, request: web.Request, file_field: str, limit: int) -> None:
        self.request = request
        self.file_field = file_field
        self.limit = limit
        self._spool_cm: Any = None

    async def __aenter__(self) -> Form:
        if not self.request.content_type.startswith("multipart/"):
            raise InvalidArgumentError(
                f"expected a multipart/form-data body, got {self.request.content_type!r}"
            )
        try:
            reader = await self.request.multipart()
        except (AssertionError, ValueError, HttpProcessingError) as exc:  # a bad boundary
            raise InvalidArgumentError(f"malformed multipart body: {exc}") from None
        form = Form()
        try:
            await self._parts(reader, form)
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return form

    async def _parts(self, reader: MultipartReader, form: Form) -> None:
        while True:
            try:
                part = await _within(self.request, reader.next())
            except InvalidArgumentError:
                raise
            except ValueError as exc:
                raise InvalidArgumentError(f"malformed multipart body: {exc}") from None
            if part is None:
                return
            if not isinstance(part, BodyPartReader):
                raise InvalidArgumentError("nested multipart bodies are not accepted")
            name = part.name or ""
            if name == self.file_field and form.spool is None:
                form.filename = part.filename
                self._spool_cm = spooled(part_chunks(self.request, part), self.limit)
                form.spool = await self._spool_cm.__aenter__()
            elif name == self.file_field:
                raise InvalidArgumentError(f"the form has more than one {name!r} part")
            else:
                form.fields.setdefault(name, []).append(await _field_text(self.request, part, name))

    async def __aexit__(self, *exc: object) -> None:
        if self._spool_cm is not None:
            cm, self._spool_cm = self._spool_cm, None
            await cm.__aexit__(None, None, None)


async def register(gate: Gate, ctx: RequestContext, name: str, filename: str, options: dict[str, Any],
                   spool: Spool) -> VersionInfo:
    """§5.2 over a spooled body: the register use case, fed from the spool file."""
    services = gate.services
    req = RegisterRequest.from_wire(
        {"name": name, "filename": filename, "size": spool.size, "sha256": spool.sha256, "options": options}
    )
    backlog = Backlog()
    sink = services.registrations.open_upload(ctx, req, backlog)
    work = services.audited(
        ctx, "register", req.name, services.registrations.register(ctx, req, sink, lambda _event: None)
    )
    return await feed_sink(spool, sink, backlog, services.config.chunk_size, work)


def spool_body(request: web.Request, limit: int) -> Any:
    """The request body spooled (an async context manager yielding a :class:`Spool`)."""
    if request.content_length is not None and request.content_length > limit:
        raise TooLargeError(
            f"upload of {request.content_length} bytes is over the maximum of {limit} bytes",
            {"size": request.content_length, "max_upload": limit},
        )
    return spooled(body_chunks(request), limit)


async def invoke(gate: Gate, ctx: RequestContext, wire: dict[str, Any]) -> InvokeResult | InvokeAccepted:
    """§5.8 (or §5.12 with ``async``)."""
    return await gate.services.invoke(ctx, InvokeRequest.from_wire(wire))


async def get_version(gate: Gate, ctx: RequestContext, name: str, version: VersionRef,
                      log: bool = False) -> VersionInfo:
    """One version's metadata (the newest for no version)."""
    if version is None:
        first: GetReply = await gate.services.functions.get(ctx, GetRequest.from_wire({"name": name, "limit": 1}))
        version = first.latest
    reply: GetReply = await gate.services.functions.get(
        ctx, GetRequest.from_wire({"name": name, "version": version, "limit": 1, "log": log})
    )
    return reply.versions[0]


async def all_versions(gate: Gate, ctx: RequestContext, name: str) -> list[VersionInfo]:
    """Every version of ``name``, oldest first (page by page)."""
    found: list[VersionInfo] = []
    cursor: int | None = None
    while True:
        reply: GetReply = await gate.services.functions.get(
            ctx, GetRequest.from_wire({"name": name, "limit": MAX_PAGE, "cursor": cursor})
        )
        found.extend(reply.versions)
        if reply.next_cursor is None or not reply.versions:
            return found
        cursor = reply.next_cursor


async def delete(gate: Gate, ctx: RequestContext, name: str, version: VersionRef) -> DeleteReply:
    """§5.6: the function (no version), or one version (a number, or an alias's version)."""
    if isinstance(version, str):
        version = (await get_version(gate, ctx, name, version)).version
    req = DeleteRequest.from_wire({"name": name, "version": version})
    services = gate.services
    return await services.audited(ctx, "delete", req.name, services.functions.delete(ctx, req))
