"""A serving process's side of the privilege split: what it hands to its control process.

Under the supervisor (``fnserver/supervisor.py``) the serving processes run wasm guests in
their own address space, so they hold no capability and cannot write the store (a guest that
escaped wasmtime would find nothing to tamper with). Everything that writes, builds, compiles
or spawns native workers runs in one control process, which they reach over loopback with a
secret only they know, speaking the public protocol (docs/PROTOCOL.md):

- ``register`` is relayed with its upload streamed as it arrives, each on a connection of its
  own, so a client that goes away mid-upload aborts it the way §5.2 says (the connection
  closes);
- ``delete`` and ``alias`` are relayed; their effects reach this process's index through the
  registry's change feed before the reply is sent on (the control process publishes the
  change before it answers, and every read here checks the feed);
- native calls (``invoke`` with mode ``native``) and compiles (``compile``, §5.10) go through
  :class:`ControlLink`, the exec pool's :class:`~fnserver.exec.Delegate`.

Errors come back as the protocol's classes, rebuilt from their codes, and go to the client
as they are.
"""

from __future__ import annotations

import dataclasses
import errno
import os
from typing import Any, Final

from fnclient import AsyncClient, UploadStream

from ..config import ServerConfig
from ..exec import InvokeJob
from ..protocol import (
    AliasReply,
    AliasRequest,
    CompileRequest,
    DeleteReply,
    DeleteRequest,
    FnError,
    InvokeRequest,
    InvokeResult,
    ProgressEvent,
    RegisterRequest,
    RequestRecord,
    ResourceExhaustedError,
    UnavailableError,
    VersionInfo,
)
from ..registry import Registry
from ._context import RequestContext
from ._functions import FunctionService, catch_up
from ._register import Progress, RegisterService, UploadSink

__all__ = ["ControlLink", "RelayedFunctionService", "RelayedRegisterService"]

#: How long a link connection waits for the control process's HELLO: a control process being
#: restarted by the supervisor takes a second or two; its socket holds the connection meanwhile.
LINK_CONNECT_TIMEOUT_S: Final = 60.0
#: What a link that could not be opened for these reasons is: a shortage, not a restart.
_SHORTAGE: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


class ControlLink:
    """One serving process's connection to the control process (shared by its requests)."""

    def __init__(self, address: str, token: str) -> None:
        self.address = address
        self._token = token
        self._client = self._new_client()

    def _new_client(self) -> AsyncClient:
        return AsyncClient(self.address, self._token, connect_timeout=LINK_CONNECT_TIMEOUT_S)

    async def close(self) -> None:
        """Close the shared connection (requests in flight get UNAVAILABLE)."""
        await self._client.close()

    async def call(self, req: RequestRecord) -> dict[str, Any]:
        """One request on the shared connection, reconnecting if the control process was
        replaced since the last one."""
        try:
            return await self._client.request(req)
        except UnavailableError as exc:
            raise _unavailable(exc) from None

    # -- the exec pool's Delegate --------------------------------------------------------------

    async def invoke_native(self, job: InvokeJob) -> InvokeResult:
        """Run a native call in the control process's workers (limits already settled)."""
        req = InvokeRequest(
            job.function, job.version, job.input, tuple(job.args), job.limits.timeout_ms, "native"
        )
        result = InvokeResult.from_wire(await self.call(req))
        return dataclasses.replace(result, id=job.call_id)  # this process's record names it

    async def compile(self, function: str, version: int) -> None:
        """Have the control process compile (or re-check) a version's module (§5.10)."""
        await self.call(CompileRequest(function, version))

    # -- relayed writes ------------------------------------------------------------------------

    async def register(self, req: RegisterRequest, sink: UploadSink,
                       progress: Progress, config: ServerConfig) -> VersionInfo:
        """Relay a register, its upload streamed from ``sink`` as the client sends it."""

        def relay(event: dict[str, Any]) -> None:
            received, size = event.get("received"), event.get("size")
            progress(
                ProgressEvent(
                    str(event.get("stage", "")),
                    str(event.get("message", "")),
                    received if isinstance(received, int) else None,
                    size if isinstance(size, int) else None,
                )
            )

        o = req.options
        client = self._new_client()
        try:
            result = await client.register(
                req.name,
                UploadStream(req.size, req.sha256, sink.chunks()),
                filename=req.filename,
                timeout_ms=o.timeout_ms,
                memory_mb=o.memory_mb,
                alias=o.alias,
                kind=o.kind,
                description=o.description or None,
                progress=relay,
                fuel=o.fuel,
                env=o.env,
            )
        except UnavailableError as exc:
            raise _unavailable(exc) from None
        finally:
            # Closing mid-upload (cancelled: the client went away) aborts it (§5.2).
            await client.close()
        return VersionInfo.from_wire(
            result, timeout_ms=config.default_timeout_ms, memory_mb=config.default_memory_mb
        )


def _unavailable(exc: UnavailableError) -> FnError:
    """The control process's own UNAVAILABLE passes as it is; a lost link says what happened
    without naming internal addresses; a link this process could not open for want of
    descriptors or memory is RESOURCE_EXHAUSTED, like any other such shortage."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno in _SHORTAGE:
            return ResourceExhaustedError(
                f"the server is short of resources ({os.strerror(cause.errno or 0)}); "
                "try again later",
                {"errno": errno.errorcode.get(cause.errno or 0, "")},
            )
        cause = cause.__cause__ or cause.__context__
    if exc.message.startswith(("cannot connect", "connection to server lost", "no HELLO")):
        return UnavailableError(
            "the server's control process is restarting; try again", {"retry": True}
        )
    return exc


class RelayedRegisterService(RegisterService):
    """``register`` for a serving process: checked here, built and stored by the control
    process."""

    def __init__(self, registry: Registry, link: ControlLink, config: ServerConfig) -> None:
        self.registry = registry
        self.link = link
        self.config = config

    async def _register_key(self, ctx: RequestContext, req: RegisterRequest, sink: UploadSink,
                            progress: Progress) -> VersionInfo:
        """Relay the register by registry key (quotas are the control process's to hold); the
        new version is in this process's index before the reply."""
        info = await self.link.register(req, sink, progress, self.config)
        await catch_up(self.registry)
        return info


class RelayedFunctionService(FunctionService):
    """list and get read this process's index; delete and alias are the control process's."""

    def __init__(self, registry: Registry, link: ControlLink) -> None:
        super().__init__(registry)
        self.link = link

    async def _delete(self, req: DeleteRequest) -> DeleteReply:
        """Relayed (§5.6), by registry key: the control process's link is an admin's."""
        r = await self.link.call(req)
        await catch_up(self.registry)
        return DeleteReply(
            str(r.get("name", req.name)),
            tuple(int(v) for v in r.get("deleted") or ()),
            tuple(str(a) for a in r.get("aliases_removed") or ()),
        )

    async def _alias(self, req: AliasRequest) -> AliasReply:
        """Relayed (§5.7), by registry key."""
        r = await self.link.call(req)
        await catch_up(self.registry)
        previous = r.get("previous")
        return AliasReply(
            str(r.get("name", req.name)),
            str(r.get("alias", req.alias)),
            int(r.get("version", req.version)),
            previous if isinstance(previous, int) else None,
        )

