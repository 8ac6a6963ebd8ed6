"""``/v1``: the gateway's clean API (docs/HTTP.md, docs/openapi.json)."""

from __future__ import annotations

import json
from typing import Any, Final

from aiohttp import web

from ..protocol import (
    MAX_PAGE,
    AliasRequest,
    GetRequest,
    InvalidArgumentError,
    InvokeAccepted,
    InvokeResult,
    ListRequest,
    LogsRequest,
    ResultRequest,
    StatsRequest,
    VersionInfo,
)
from ..service import RequestContext
from . import _actions as act
from ._common import Gate, json_response, query_bool, query_int

__all__ = ["V1"]

#: Longest ``?wait`` of ``GET /v1/invocations/{id}``, in seconds.
MAX_WAIT_S: Final = 60
#: Metadata carried in the headers of a raw invoke reply.
_TRUE_FALSE: Final = ("false", "true")


def invoke_headers(result: InvokeResult) -> dict[str, str]:
    """The ``Fn-*`` headers of a raw invoke reply."""
    return {
        "Fn-Exit-Code": str(result.exit_code),
        "Fn-Version": str(result.version),
        "Fn-Duration-Us": str(result.duration_us),
        "Fn-Queue-Us": str(result.queue_us),
        "Fn-Wall-Us": str(result.wall_us),
        "Fn-Truncated": _TRUE_FALSE[result.truncated],
        "Fn-Mode": result.mode,
        "Fn-Cold": _TRUE_FALSE[result.cold],
        "Fn-Invocation-Id": result.id,
        "Fn-Stderr-Bytes": str(len(result.stderr)),
    }


def version_location(info: VersionInfo) -> str:
    return f"/v1/functions/{info.name.replace('/', '%2F')}@{info.version}"


class V1:
    """The ``/v1`` routes over one :class:`Gate`."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        self.services = gate.services

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/v1/functions", self.list_functions),
            web.post("/v1/functions/{ref}/invoke", self.invoke),
            web.put("/v1/functions/{name}/aliases/{alias}", self.set_alias),
            web.get("/v1/functions/{name}/logs", self.logs),
            web.get("/v1/functions/{name}/stats", self.function_stats),
            web.post("/v1/functions/{ref}", self.register),
            web.get("/v1/functions/{ref}", self.get),
            web.delete("/v1/functions/{ref}", self.delete),
            web.get("/v1/invocations/{id}", self.invocation),
            web.get("/v1/stats", self.stats),
            web.get("/v1/whoami", self.whoami),
        ]

    async def list_functions(self, request: web.Request) -> web.Response:
        req = ListRequest.from_wire({"all": query_bool(request, "all")})
        reply = await self.gate.run(request, "list", lambda ctx: self.services.functions.list(ctx, req), req)
        return json_response(reply.to_wire())

    async def register(self, request: web.Request) -> web.Response:
        name, version = act.split_ref(request.match_info["ref"])
        if version is not None:
            raise InvalidArgumentError(
                "register names a function, not a version: POST /v1/functions/{name};"
                " versions are numbered by the server (use ?alias= to label one)"
            )
        limit = self.services.config.max_upload

        async def work(ctx: RequestContext) -> VersionInfo:
            if request.content_type.startswith("multipart/"):
                async with act.read_form(request, "file", limit) as form:
                    if form.spool is None:
                        raise InvalidArgumentError("the form has no 'file' part")
                    filename = form.get("filename") or form.filename or "upload"
                    options = act.register_options(form.get, form.getall("env"))
                    return await act.register(self.gate, ctx, name, filename, options, form.spool)
            q = request.query
            options = act.register_options(q.get, q.getall("env", []))
            async with act.spool_body(request, limit) as spool:
                return await act.register(self.gate, ctx, name, q.get("filename") or "upload", options, spool)

        info = await self.gate.run(request, "register", work)
        return json_response(info.to_wire(log=False), 201, {"Location": version_location(info)})

    async def get(self, request: web.Request) -> web.Response:
        name, version = act.split_ref(request.match_info["ref"])
        if version is not None:
            log = query_bool(request, "log")
            info = await self.gate.run(
                request, "get", lambda ctx: act.get_version(self.gate, ctx, name, version, log)
            )
            return json_response(info.to_wire(log=log))
        req = GetRequest.from_wire(
            {"name": name, "limit": query_int(request, "limit", 1, MAX_PAGE),
             "cursor": query_int(request, "cursor", 1, 2**62)}
        )
        reply = await self.gate.run(request, "get", lambda ctx: self.services.functions.get(ctx, req), req)
        return json_response(reply.to_wire())

    async def delete(self, request: web.Request) -> web.Response:
        name, version = act.split_ref(request.match_info["ref"])
        reply = await self.gate.run(request, "delete", lambda ctx: act.delete(self.gate, ctx, name, version))
        return json_response(reply.to_wire())

    async def set_alias(self, request: web.Request) -> web.Response:
        body = await act.read_body(request, act.FIELD_LIMIT, "an alias request")
        try:
            doc = json.loads(body or b"{}")
        except ValueError:
            raise InvalidArgumentError('the body must be JSON: {"version": N}') from None
        if not isinstance(doc, dict):
            raise InvalidArgumentError('the body must be a JSON object: {"version": N}')
        req = AliasRequest.from_wire(
            {"name": request.match_info["name"], "alias": request.match_info["alias"], "version": doc.get("version")}
        )
        services = self.services
        reply = await self.gate.run(
            request, "alias",
            lambda ctx: services.audited(ctx, "alias", req.name, services.functions.alias(ctx, req)), req,
        )
        return json_response(reply.to_wire())

    async def invoke(self, request: web.Request) -> web.Response:
        name, version = act.split_ref(request.match_info["ref"])
        q = request.query
        limit = self.services.config.max_frame
        wire: dict[str, Any] = {
            "name": name,
            "version": version,
            "args": q.getall("arg", []),
            "timeout_ms": query_int(request, "timeout_ms", 1, 2**31),
            "mode": q.get("mode") or None,
            "async": query_bool(request, "async"),
        }

        async def work(ctx: RequestContext) -> InvokeResult | InvokeAccepted:
            wire["input"] = await act.read_body(request, limit, "input")
            return await act.invoke(self.gate, ctx, wire)

        reply = await self.gate.run(request, "invoke", work)
        if isinstance(reply, InvokeAccepted):
            url = f"/v1/invocations/{reply.id}"
            return json_response({**reply.to_wire(), "url": url}, 202, {"Location": url})
        if "application/json" in request.headers.get("Accept", ""):
            return json_response(reply.to_wire(), headers=invoke_headers(reply))
        return web.Response(body=reply.output, content_type="application/octet-stream", headers=invoke_headers(reply))

    async def invocation(self, request: web.Request) -> web.Response:
        wait = query_int(request, "wait", 0, MAX_WAIT_S)
        req = ResultRequest.from_wire(
            {"invocation": request.match_info["id"], "wait_ms": wait * 1000 if wait else None}
        )
        status = await self.gate.run(request, "result", lambda ctx: self.services.calls.result(ctx, req), req)
        return json_response(status.to_wire())

    async def logs(self, request: web.Request) -> web.Response:
        req = LogsRequest.from_wire(
            {
                "name": request.match_info["name"],
                "version": query_int(request, "version", 1, 2**62),
                "limit": query_int(request, "limit", 1, 2**31),
                "after": query_int(request, "after", 0, 2**63 - 1),
            }
        )
        reply = await self.gate.run(request, "logs", lambda ctx: self.services.calls.logs(ctx, req), req)
        return json_response(reply.to_wire())

    async def function_stats(self, request: web.Request) -> web.Response:
        req = StatsRequest.from_wire({"name": request.match_info["name"]})
        reply = await self.gate.run(request, "stats", lambda ctx: self.services.calls.stats(ctx, req), req)
        return json_response(reply.to_wire())

    async def stats(self, request: web.Request) -> web.Response:
        req = StatsRequest()
        reply = await self.gate.run(request, "stats", lambda ctx: self.services.calls.stats(ctx, req), req)
        return json_response(reply.to_wire())

    async def whoami(self, request: web.Request) -> web.Response:
        caller = self.gate.caller(request)
        return json_response({"tenant": caller.tenant, "role": caller.role, "token_id": caller.token_id})
