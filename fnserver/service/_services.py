"""The facade every front calls: one object holding the use cases and the HELLO facts."""

from __future__ import annotations

import os

from .. import __version__
from ..builder import Builder
from ..config import ServerConfig
from ..exec import ExecPool
from ..protocol import PROTOCOL_VERSION, HelloReply, PingReply, PingRequest, ServerLimits
from ..registry import Registry
from ._context import RequestContext
from ._functions import FunctionService
from ._invoke import InvokeService
from ._register import RegisterService

__all__ = ["Services"]


class Services:
    """The use cases of one serving process, over its registry, exec pool and builder."""

    def __init__(self, config: ServerConfig, registry: Registry, pool: ExecPool, builder: Builder) -> None:
        self.config = config
        self.functions = FunctionService(registry)
        self.invocations = InvokeService(registry, pool, config)
        self.registrations = RegisterService(registry, builder, pool, config)

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
