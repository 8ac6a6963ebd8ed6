"""The invoke use case: resolve the version, settle the limits, run it in the exec layer."""

from __future__ import annotations

from dataclasses import replace
from typing import Final

from ..config import ServerConfig
from ..exec import ExecPool, InvokeJob, Limits
from ..protocol import InvalidArgumentError, InvokeRequest, InvokeResult
from ..registry import Registry
from ._context import RequestContext
from ._functions import fresh

__all__ = ["InvokeService"]

#: Room left in a reply frame for its envelope and the small fields around output and stderr.
REPLY_ENVELOPE: Final = 4096


class InvokeService:
    """PROTOCOL.md §5.8."""

    def __init__(self, registry: Registry, pool: ExecPool, config: ServerConfig) -> None:
        self.registry = registry
        self.pool = pool
        self.config = config

    async def invoke(self, ctx: RequestContext, req: InvokeRequest) -> InvokeResult:
        """Run one call; guest failures raise the matching FnError."""
        c = self.config
        if req.timeout_ms is not None and req.timeout_ms > c.max_timeout_ms:
            raise InvalidArgumentError(
                f"'timeout_ms' must be an integer from 1 to {c.max_timeout_ms}, got {req.timeout_ms}"
            )
        info = await fresh(self.registry, lambda: self.registry.resolve(req.name, req.version))
        mode = req.mode or info.mode
        if mode not in info.artifacts:
            raise InvalidArgumentError(
                f"function '{info.name}' version {info.version} has no {mode} artifact"
                f" (it has: {', '.join(info.artifacts)})"
            )
        limits = info.limits
        job = InvokeJob(
            function=info.name,
            version=info.version,
            mode=mode,
            artifact=self.registry.artifact_path(info, mode),
            digest=info.artifact_sha256.get(mode, ""),
            input=req.input,
            args=req.args,
            limits=Limits(
                timeout_ms=req.timeout_ms or limits.timeout_ms,
                memory_mb=limits.memory_mb,
                fuel=limits.fuel if mode == "wasm" else None,
                output_bytes=c.output_bytes,
            ),
        )
        result = await self.pool.invoke(job)
        # Output and stderr are each capped at output_bytes; stderr gives way so that the reply
        # always fits in one frame.
        room = max(0, c.max_frame - len(result.output) - REPLY_ENVELOPE)
        if len(result.stderr) > room:
            result = replace(result, stderr=result.stderr[:room])
        return result
