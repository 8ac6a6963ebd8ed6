"""The invoke use case: resolve the version, settle the limits, run it in the exec layer."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Final

from .._quotas import QuotaBook, UsageTable
from ..config import ServerConfig
from ..exec import ExecPool, InvokeJob, Limits
from ..protocol import (
    ArtifactKind,
    FnError,
    InternalError,
    InvalidArgumentError,
    InvokeRequest,
    InvokeResult,
    NotFoundError,
    VersionInfo,
)
from ..registry import Registry
from ._calls import Recorder, make_record, new_call_id
from ._context import RequestContext
from ._functions import fresh
from ._names import key_for, said_as, shown, tenant_of

__all__ = ["InvokeService"]

#: Room left in a reply frame for its envelope and the small fields around output and stderr.
REPLY_ENVELOPE: Final = 4096


class InvokeService:
    """PROTOCOL.md §5.8."""

    def __init__(
        self,
        registry: Registry,
        pool: ExecPool,
        config: ServerConfig,
        quotas: QuotaBook | None = None,
        usage: UsageTable | None = None,
    ) -> None:
        self.registry = registry
        self.pool = pool
        self.config = config
        #: Tenant quotas on calls (None: not counted here, as in the control process, whose
        #: calls were counted by the serving process that relayed them).
        self.quotas = quotas
        self.usage = usage
        #: Where this process's invocation records go (None: not recorded here, as in the
        #: control process, whose calls the serving processes record).
        self.recorder: Recorder | None = None

    async def invoke(self, ctx: RequestContext, req: InvokeRequest, *, call_id: str | None = None,
                     queued_since: float | None = None) -> InvokeResult:
        """Run one call; guest failures raise the matching FnError. Once the version is
        resolved the call leaves an invocation record (§5.13), ``async`` mode when it came
        from the queue (``call_id``, queued at ``queued_since``)."""
        started = time.time()
        c = self.config
        if req.timeout_ms is not None and req.timeout_ms > c.max_timeout_ms:
            raise InvalidArgumentError(
                f"'timeout_ms' must be an integer from 1 to {c.max_timeout_ms}, got {req.timeout_ms}"
            )
        key = key_for(ctx.caller, req.name)
        with said_as(ctx.caller, key, req.name):
            info = await fresh(self.registry, lambda: self.registry.resolve(key, req.version))
        shown_name = shown(ctx.caller, key)
        if shown_name != key:
            info = replace(info, name=shown_name)  # for the messages below
        mode = req.mode or info.mode
        if mode not in info.artifacts:
            raise InvalidArgumentError(
                f"function '{info.name}' version {info.version} has no {mode} artifact"
                f" (it has: {', '.join(info.artifacts)})"
            )
        limit = info.limits.timeout_ms
        if req.timeout_ms is not None and req.timeout_ms > limit:
            # Limits belong to the function (PROTOCOL.md §5.8): a caller may lower one, never
            # raise it. Said, not clamped, so the caller learns what it will really get.
            raise InvalidArgumentError(
                f"'timeout_ms' {req.timeout_ms} is over the {limit} ms time limit of function"
                f" '{info.name}' version {info.version}; a call may lower it, not raise it",
                {"timeout_ms": limit, "name": info.name, "version": info.version},
            )
        # The function's tenant: an admin's call of another tenant's function counts there.
        tenant = tenant_of(key)
        info = replace(info, name=key) if shown_name != key else info
        if call_id is None and self.recorder is not None:
            call_id = new_call_id()
        job = self._job(info, mode, req, tenant, call_id or "")
        quota = self.quotas.limits(tenant) if self.quotas is not None else None
        metered = self.usage is not None and quota is not None and quota.metered
        if metered:
            assert self.usage is not None and quota is not None
            self.usage.enter(tenant, quota)  # QUOTA_EXCEEDED: over its concurrency or rate
        t0 = time.perf_counter_ns()
        try:
            result = await self._run(info, mode, job)
        except FnError as exc:
            self._record(call_id, queued_since, started, key, info.version, mode, exc, t0)
            raise
        finally:
            if metered:
                assert self.usage is not None
                self.usage.leave(tenant)
        self._record(call_id, queued_since, started, key, info.version, mode, result, t0)
        # Output and stderr are each capped at output_bytes; stderr gives way so that the reply
        # always fits in one frame.
        room = max(0, c.max_frame - len(result.output) - REPLY_ENVELOPE)
        if len(result.stderr) > room:
            result = replace(result, stderr=result.stderr[:room])
        return result

    def _record(self, call_id: str | None, queued_since: float | None, started: float, key: str,
                version: int, mode: ArtifactKind, outcome: InvokeResult | FnError, t0: int) -> None:
        if self.recorder is None:
            return
        queued_us = 0
        if queued_since is not None:  # an async call: its time in the queue counts as queue
            queued_us = max(0, int((started - queued_since) * 1e6))
            started = queued_since
        self.recorder.add(
            make_record(
                call_id or new_call_id(), tenant_of(key), key, version,
                "async" if queued_since is not None else "sync", mode, started, outcome,
                (time.perf_counter_ns() - t0) // 1000 + queued_us, queued_us,
            )
        )

    async def _run(self, info: VersionInfo, mode: ArtifactKind, job: InvokeJob) -> InvokeResult:
        try:
            return await self.pool.invoke(job)
        except (InternalError, InvalidArgumentError, OSError) as exc:
            # The version may have been deleted (here or by another serving process) between
            # the resolve and the exec layer opening its artifact: its files are gone. That is
            # NOT_FOUND, as if the delete had come first; a file that moved is run from there.
            retry = await self._after_failure(info, mode, job, exc)
            return await self.pool.invoke(retry)

    def _job(self, info: VersionInfo, mode: ArtifactKind, req: InvokeRequest, tenant: str,
             call_id: str = "") -> InvokeJob:
        limits = info.limits
        return InvokeJob(
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
                output_bytes=self.config.output_bytes,
            ),
            tenant=tenant,
            env=tuple(sorted(info.env.items())),
            call_id=call_id,
        )

    async def _after_failure(
        self, info: VersionInfo, mode: ArtifactKind, job: InvokeJob, exc: BaseException
    ) -> InvokeJob:
        """The job to run again after ``exc``, or raise: NOT_FOUND when the version is gone,
        ``exc`` itself when nothing moved (a real failure)."""
        await self.registry.refresh()
        try:
            current = self.registry.resolve(info.name, info.version)
            path = self.registry.artifact_path(current, mode)
        except NotFoundError:
            raise NotFoundError(
                f"version {info.version} of '{info.name}' was deleted while the call started",
                {"name": info.name, "version": info.version},
            ) from exc
        if path == job.artifact:
            raise exc
        # Another version held the same bytes and was deleted: the file is elsewhere now.
        return replace(job, artifact=path)
