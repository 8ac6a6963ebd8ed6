"""The original platform's routes, for its users' scripts (docs/HTTP.md "The original routes").

``/functions`` and ``/invoke/{id}`` answer in the original's shapes; where the original was
wrong (500 for an unknown id, a random id per upload) these do the right thing, and
docs/HTTP.md lists each deviation.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import parse_qs

from aiohttp import web

from ..protocol import (
    InvalidArgumentError,
    InvokeResult,
    ListRequest,
    NotFoundError,
    VersionInfo,
    check_alias,
)
from ..service import RequestContext
from . import _actions as act
from ._common import Gate, json_response

__all__ = ["Legacy", "version_object"]


def version_object(info: VersionInfo, label: str | None = None) -> dict[str, Any]:
    """A version as the original routes show it: its metadata with ``id`` (``NAME@LABEL``),
    ``version`` (the label: ``label``, else its first alias, else its number) and ``number``."""
    wire = info.to_wire(log=False)
    if label is None:
        label = sorted(info.aliases)[0] if info.aliases else str(info.version)
    out: dict[str, Any] = {"id": f"{info.name}@{label}", "name": info.name, "version": label, "number": info.version}
    out.update((k, v) for k, v in wire.items() if k not in ("name", "version"))
    return out


def _label(raw: str | None) -> str | None:
    """The original's ``version`` field: the alias the new version gets."""
    if raw is None or raw == "":
        return None
    if raw.isdigit():
        raise InvalidArgumentError(
            f"version label {raw!r} is a number: numbers are given by the server, in order;"
            " use a label that starts with a letter (v1, prod) or leave it out",
            {"field": "version"},
        )
    try:
        return check_alias(raw)
    except InvalidArgumentError as err:
        raise InvalidArgumentError(f"version label {raw!r}: {err.message}", {"field": "version"}) from None


class Legacy:
    """``/functions`` and ``/invoke/{id}`` over one :class:`Gate`."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        self.services = gate.services

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/functions", self.register),
            web.get("/functions", self.list_versions),
            web.get("/functions/{id}", self.get),
            web.delete("/functions/{id}", self.delete),
            web.post("/invoke/{id}", self.invoke),
        ]

    async def register(self, request: web.Request) -> web.Response:
        limit = self.services.config.max_upload

        async def work(ctx: RequestContext) -> tuple[VersionInfo, str | None]:
            async with act.read_form(request, "file", limit) as form:
                name = form.get("name")
                if not name:
                    raise InvalidArgumentError("the form has no 'name' field", {"field": "name"})
                if form.spool is None:
                    raise InvalidArgumentError("the form has no 'file' part", {"field": "file"})
                label = _label(form.get("version"))
                options = act.register_options(form.get, form.getall("env"))
                if label is not None:
                    options["alias"] = label
                info = await act.register(self.gate, ctx, name, form.filename or "upload", options, form.spool)
                return info, label

        info, label = await self.gate.run(request, "register", work)
        return json_response(version_object(info, label))

    async def list_versions(self, request: web.Request) -> web.Response:
        async def work(ctx: RequestContext) -> list[dict[str, Any]]:
            listed = await self.services.functions.list(ctx, ListRequest())
            out: list[dict[str, Any]] = []
            for summary in listed.functions:
                try:
                    versions = await act.all_versions(self.gate, ctx, summary.name)
                except NotFoundError:  # deleted since the list: not listed
                    continue
                out.extend(version_object(v) for v in versions)
            return out

        return json_response(await self.gate.run(request, "list", work))

    async def get(self, request: web.Request) -> web.Response:
        name, version = act.split_ref(request.match_info["id"])
        info = await self.gate.run(request, "get", lambda ctx: act.get_version(self.gate, ctx, name, version))
        return json_response(version_object(info, version if isinstance(version, str) else None))

    async def delete(self, request: web.Request) -> web.Response:
        name, version = act.split_ref(request.match_info["id"])
        reply = await self.gate.run(request, "delete", lambda ctx: act.delete(self.gate, ctx, name, version))
        return json_response(reply.to_wire())

    async def invoke(self, request: web.Request) -> web.Response:
        name, version = act.split_ref(request.match_info["id"])
        limit = self.services.config.max_frame

        async def work(ctx: RequestContext) -> InvokeResult:
            data = await self._input(request, limit)
            reply = await act.invoke(self.gate, ctx, {"name": name, "version": version, "input": data})
            assert isinstance(reply, InvokeResult)  # not async
            return reply

        result = await self.gate.run(request, "invoke", work)
        return json_response(
            {
                "Stdout": result.output,
                "Stderr": result.stderr,
                "ExitCode": result.exit_code,
                "DurationMs": round(result.duration_us / 1000, 3),
                "Version": result.version,
                "Truncated": result.truncated,
            }
        )

    async def _input(self, request: web.Request, limit: int) -> bytes:
        """The form field ``input`` (urlencoded or multipart); none is empty input."""
        if request.content_type == "application/x-www-form-urlencoded":
            body = await act.read_body(request, limit, "input")
            values = parse_qs(body.decode("latin-1"), keep_blank_values=True, encoding="latin-1").get("input")
            return values[-1].encode("latin-1") if values else b""
        if request.content_type.startswith("multipart/"):
            async with act.read_form(request, "input", limit) as form:
                if form.spool is not None:
                    return await asyncio.to_thread(form.spool.path.read_bytes)
                return b""
        if await request.content.read(1):
            raise InvalidArgumentError(
                "send the input as the form field 'input' (urlencoded or multipart), as"
                " curl --data-urlencode 'input=...' does; raw bodies are for"
                " POST /v1/functions/{name}/invoke"
            )
        return b""
