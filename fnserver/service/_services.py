"""The facade every front calls: one object holding the use cases and the HELLO facts."""

from __future__ import annotations

import os

from .. import __version__
from .._quotas import LocalUsage, QuotaBook, SharedUsage, UsageTable
from ..builder import Builder
from ..config import ServerConfig
from ..exec import ExecPool
from ..protocol import (
    PROTOCOL_VERSION,
    CompileReply,
    CompileRequest,
    HelloReply,
    InvalidArgumentError,
    InvokeRequest,
    InvokeResult,
    PingReply,
    PingRequest,
    ServerLimits,
)
from ..registry import Registry
from ._context import RequestContext
from ._control import ControlLink, RelayedFunctionService, RelayedRegisterService
from ._functions import FunctionService, fresh
from ._invoke import InvokeService
from ._register import RegisterService

__all__ = ["Services"]


class Services:
    """The use cases of one serving process, over its registry, exec pool and builder."""

    def __init__(self, config: ServerConfig, registry: Registry, pool: ExecPool,
                 builder: Builder | None, link: ControlLink | None = None) -> None:
        self.config = config
        self.registry = registry
        self.pool = pool
        #: Every tenant's quotas: the flags' defaults, with the auth file's overrides.
        self.quotas = QuotaBook(config.tenant_limits)
        self.functions: FunctionService
        self.registrations: RegisterService
        if link is not None:  # a serving process under the supervisor: writes are relayed
            self.functions = RelayedFunctionService(registry, link)
            self.registrations = RelayedRegisterService(registry, link, config)
        else:
            assert builder is not None
            self.functions = FunctionService(registry)
            self.registrations = RegisterService(registry, builder, pool, config, self.quotas)
        self.usage: UsageTable | None = None
        if config.role == "control":
            # Its invokes are native calls the serving processes relay, counted there.
            self.invocations: InvokeService = NativeOnlyInvokeService(registry, pool, config)
        else:
            self.usage = (
                SharedUsage(config.usage_fd, config.usage_column)
                if config.usage_fd is not None
                else LocalUsage()
            )
            self.invocations = InvokeService(registry, pool, config, self.quotas, self.usage)

    def hello(self) -> HelloReply:
        """What this server speaks and allows (PROTOCOL.md §4)."""
        c = self.config
        return HelloReply(
            server="fnserver",
            server_version=__version__,
            protocol=PROTOCOL_VERSION,
            max_frame=c.max_frame,
            max_upload=c.max_upload,
            chunk_size=c.chunk_size,
            limits=ServerLimits(
                timeout_ms=c.default_timeout_ms,
                max_timeout_ms=c.max_timeout_ms,
                memory_mb=c.default_memory_mb,
                max_memory_mb=c.max_memory_mb,
                output_bytes=c.output_bytes,
            ),
            pid=os.getpid(),
        )

    async def ping(self, ctx: RequestContext, req: PingRequest) -> PingReply:
        """§5.1."""
        return PingReply()

    async def compile(self, ctx: RequestContext, req: CompileRequest) -> CompileReply:
        """§5.10: the version's module compiled into the node's cache (checked again if there)."""
        info = await fresh(self.registry, lambda: self.registry.resolve(req.name, req.version))
        if "wasm" not in info.artifacts:
            raise InvalidArgumentError(
                f"function '{info.name}' version {info.version} has no wasm artifact to compile"
            )
        await self.pool.compile(
            info.name,
            info.version,
            self.registry.artifact_path(info, "wasm"),
            info.artifact_sha256.get("wasm", ""),
            info.limits.fuel is not None,
        )
        return CompileReply(info.name, info.version)


class NativeOnlyInvokeService(InvokeService):
    """The control process's invoke: native calls relayed by the serving processes, never a
    wasm guest (guests run only in the unprivileged serving processes)."""

    async def invoke(self, ctx: RequestContext, req: InvokeRequest) -> InvokeResult:
        """§5.8, mode ``native`` only."""
        if req.mode != "native":
            raise InvalidArgumentError("the control process runs native calls only")
        return await super().invoke(ctx, req)
