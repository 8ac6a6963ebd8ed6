"""The facade every front calls: one object holding the use cases and the HELLO facts."""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from .. import __version__
from .._quotas import LocalUsage, QuotaBook, SharedUsage, UsageTable
from ..builder import Builder
from ..config import ServerConfig
from ..exec import ExecPool
from ..invocations import InvocationStore, PostgresInvocationStore, SqliteInvocationStore
from ..protocol import (
    PROTOCOL_VERSION,
    Ack,
    ClaimReply,
    ClaimRequest,
    CompileReply,
    CompileRequest,
    CompleteRequest,
    FnError,
    HelloReply,
    InvalidArgumentError,
    InvocationRecord,
    InvokeAccepted,
    InvokeRequest,
    InvokeResult,
    PingReply,
    PingRequest,
    RenewReply,
    RenewRequest,
    ReportRequest,
    ServerLimits,
    ServerStats,
    UnavailableError,
)
from ..registry import Registry
from ._access import audit_event, authorize
from ._calls import CallService, Dispatcher, LinkSource, LocalSource, Recorder, RelayedCallService
from ._context import INTERNAL_ID, Caller, RequestContext
from ._control import ControlLink, RelayedFunctionService, RelayedRegisterService
from ._functions import FunctionService, fresh
from ._invoke import InvokeService
from ._names import key_for, said_as, shown
from ._register import RegisterService

if TYPE_CHECKING:
    from ..auth import AuthBook

__all__ = ["Services"]

_R = TypeVar("_R")


class Services:
    """The use cases of one serving process, over its registry, exec pool and builder."""

    def __init__(self, config: ServerConfig, registry: Registry, pool: ExecPool,
                 builder: Builder | None, link: ControlLink | None = None, *,
                 quotas: QuotaBook | None = None, auth: AuthBook | None = None) -> None:
        self.config = config
        self.registry = registry
        self.pool = pool
        self.link = link
        #: Every tenant's quotas: the flags' defaults, with the auth file's overrides.
        self.quotas = quotas if quotas is not None else QuotaBook(config.tenant_limits)
        if auth is None:
            from ..auth import AuthBook  # here: fnserver.auth imports this package

            auth = AuthBook(None)
        #: Who may connect, as the auth file says now (``fnserver/auth.py``).
        self.auth = auth
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
        # Async calls, records and tallies (``_calls.py``): the store lives where writes do.
        self.calls: CallService | RelayedCallService
        self.recorder: Recorder | None = None
        self.dispatcher: Dispatcher | None = None
        if link is not None:
            self.calls = RelayedCallService(registry, link)

            async def hand_over(records: list[InvocationRecord], gauges: ServerStats | None) -> None:
                await link.call(ReportRequest(tuple(records), gauges, os.getpid()))

            self.recorder = Recorder(hand_over, self.gauges)
            self.dispatcher = Dispatcher(LinkSource(link), self._run_queued, config.async_concurrency,
                                         self.recorder, lease_s=config.async_lease_s)
        else:
            # Hidden like the build caches: not a function directory of the local store.
            store: InvocationStore = (
                PostgresInvocationStore(config.registry)
                if config.registry is not None
                else SqliteInvocationStore(config.data_dir / ".invocations" / "calls.sqlite3")
            )
            local = CallService(config, registry, store, self.gauges)
            self.calls = local
            if config.role == "all":

                async def store_records(records: list[InvocationRecord], gauges: ServerStats | None) -> None:
                    if records:
                        await local.add_records(records)

                self.recorder = Recorder(store_records)
                self.dispatcher = Dispatcher(LocalSource(local), self._run_queued, config.async_concurrency,
                                             self.recorder, lease_s=config.async_lease_s)
        self.invocations.recorder = self.recorder
        #: Set by the server: its connections, loop lag and builder, for the gauges.
        self.connection_count: Callable[[], int] = lambda: 0
        self.loop_lag_s: Callable[[], float] = lambda: 0.0
        self.builder = builder

    async def start(self) -> None:
        """Open the invocation store (where it lives here) and start recording and running
        queued async calls."""
        if isinstance(self.calls, CallService):
            await self.calls.start()
        if self.recorder is not None:
            self.recorder.start()
        if self.dispatcher is not None:
            self.dispatcher.start()

    async def close(self) -> None:
        """Stop running async calls, write the last records, close the store."""
        if self.dispatcher is not None:
            await self.dispatcher.close()
        if self.recorder is not None:
            await self.recorder.close()
        if isinstance(self.calls, CallService):
            await self.calls.close()

    def gauges(self) -> ServerStats:
        """This process's gauges (§5.14)."""
        pool = self.pool.stats()
        wasm = pool["wasm"]
        workers = pool["workers"] if self.config.role != "serving" else 0
        idle = pool["idle"] if self.config.role != "serving" else 0
        return ServerStats(
            processes=1 if self.config.role != "control" else 0,
            connections=self.connection_count() if self.config.role != "control" else 0,
            waiting=pool["queued"],
            workers_total=workers,
            workers_busy=max(0, workers - idle),
            workers_idle=idle,
            wasm_slots=wasm["slots"] if self.config.role != "control" else 0,
            wasm_running=wasm["running"],
            builds_running=self.builder.running if self.builder is not None else 0,
            loop_lag_ms=round(self.loop_lag_s() * 1e3, 3),
        )

    async def invoke(self, ctx: RequestContext, req: InvokeRequest) -> InvokeResult | InvokeAccepted:
        """§5.8: run the call, or with ``async`` queue it and answer with its id."""
        if req.async_:
            return await self.calls.submit(ctx, req)
        return await self.invocations.invoke(ctx, req)

    async def _run_queued(self, ctx: RequestContext, req: InvokeRequest, call_id: str,
                          created: float) -> InvokeResult:
        return await self.invocations.invoke(ctx, req, call_id=call_id, queued_since=created)

    async def report(self, ctx: RequestContext, req: ReportRequest) -> Ack:
        """§5.15 (the control process's side)."""
        return await self._owner().report(ctx, req)

    async def claim(self, ctx: RequestContext, req: ClaimRequest) -> ClaimReply:
        """§5.15."""
        return await self._owner().claim(ctx, req)

    async def renew(self, ctx: RequestContext, req: RenewRequest) -> RenewReply:
        """§5.15."""
        return await self._owner().renew(ctx, req)

    async def complete(self, ctx: RequestContext, req: CompleteRequest) -> Ack:
        """§5.15."""
        return await self._owner().complete(ctx, req)

    def _owner(self) -> CallService:
        if not isinstance(self.calls, CallService):
            raise InvalidArgumentError("this process does not hold the invocation store")
        return self.calls

    def authorize(self, ctx: RequestContext, op: str) -> None:
        """Raise PermissionDeniedError if the caller's role may not do ``op`` (``_access.py``)."""
        authorize(ctx.caller, op)

    async def audited(self, ctx: RequestContext, op: str, name: str, work: Awaitable[_R]) -> _R:
        """Run a write (register, alias, delete) and leave an audit line with its outcome.

        Not for a serving process's relay to the control process: the serving process, which
        knows the real caller, writes that write's line."""
        if ctx.caller.token_id == INTERNAL_ID:
            return await work
        try:
            reply = await work
        except BaseException as exc:
            code = getattr(exc, "code", None) or type(exc).__name__
            audit_event(ctx, op, code, function=name)
            raise
        deleted = getattr(reply, "deleted", None)
        version = ",".join(map(str, deleted)) if deleted is not None else getattr(reply, "version", None)
        audit_event(ctx, op, "ok", function=name, version=version)
        return reply

    def hello(self, caller: Caller | None = None) -> HelloReply:
        """What this server speaks and allows, and whom it took the caller for (§4)."""
        caller = caller or Caller()
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
            tenant=caller.tenant,
            role=caller.role,
            token_id=caller.token_id,
        )

    async def ping(self, ctx: RequestContext, req: PingRequest) -> PingReply:
        """§5.1; with ``deep``, UNAVAILABLE unless :meth:`readiness` finds everything ready."""
        if req.deep:
            checks = await self.readiness()
            failed = {name: why for name, why in checks.items() if why != "ok"}
            if failed:
                raise UnavailableError(
                    "not ready: " + "; ".join(f"{name}: {why}" for name, why in failed.items()),
                    {"reason": "not_ready", "checks": checks},
                )
        return PingReply()

    async def readiness(self) -> dict[str, str]:
        """Each readiness check by name: ``"ok"`` or what is wrong (``GET /readyz``).

        Where native calls run, a worker is up; where the stores are written, the invocation
        store commits a write and the data directory is writable; a serving process asks its
        control process for the same (a deep ping), which is what it relays its writes to.
        """
        checks: dict[str, str] = {}
        if self.config.role != "serving":
            pool = self.pool.stats()
            checks["workers"] = "ok" if pool["pids"] or not pool["workers"] else "no native worker is running"
        if isinstance(self.calls, CallService):
            try:
                await self.calls.store.probe()
                checks["store"] = "ok"
            except Exception as exc:  # any failure to write is the answer, not an error
                checks["store"] = f"the invocation store takes no writes ({type(exc).__name__})"
            checks["data_dir"] = await asyncio.to_thread(_writable, self.config.data_dir)
        if self.link is not None:
            try:
                await self.link.call(PingRequest(deep=True))
                checks["control"] = "ok"
            except FnError as err:
                checks["control"] = err.message
        return checks

    async def compile(self, ctx: RequestContext, req: CompileRequest) -> CompileReply:
        """§5.10: the version's module compiled into the node's cache (checked again if there)."""
        key = key_for(ctx.caller, req.name)
        with said_as(ctx.caller, key, req.name):
            info = await fresh(self.registry, lambda: self.registry.resolve(key, req.version))
        if "wasm" not in info.artifacts:
            raise InvalidArgumentError(
                f"function '{req.name}' version {info.version} has no wasm artifact to compile"
            )
        await self.pool.compile(
            info.name,
            info.version,
            self.registry.artifact_path(info, "wasm"),
            info.artifact_sha256.get("wasm", ""),
            info.limits.fuel is not None,
        )
        return CompileReply(shown(ctx.caller, key), info.version)


def _writable(path: Path) -> str:
    """``"ok"`` if a file can be created in ``path`` now, else why not."""
    try:
        with tempfile.TemporaryFile(dir=path, prefix=".ready-"):
            pass
    except OSError as exc:
        return f"the data directory is not writable ({exc.strerror or type(exc).__name__})"
    return "ok"


class NativeOnlyInvokeService(InvokeService):
    """The control process's invoke: native calls relayed by the serving processes, never a
    wasm guest (guests run only in the unprivileged serving processes)."""

    async def invoke(self, ctx: RequestContext, req: InvokeRequest, *, call_id: str | None = None,
                     queued_since: float | None = None) -> InvokeResult:
        """§5.8, mode ``native`` only."""
        if req.mode != "native":
            raise InvalidArgumentError("the control process runs native calls only")
        return await super().invoke(ctx, req, call_id=call_id, queued_since=queued_since)
