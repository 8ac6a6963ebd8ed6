"""Calls after the fact: async invocations, invocation records (``logs``) and statistics.

Two shapes, like the function service (``_functions.py`` / ``_control.py``):

- :class:`CallService` owns an :class:`~fnserver.invocations.InvocationStore` (an embedded
  server's one process, or the control process under the supervisor): it queues async calls,
  hands them to whoever claims them, keeps their results, stores records and adds up tallies;
- :class:`RelayedCallService` is a serving process's: it checks names and tenants here and
  asks the control process for the rest (PROTOCOL.md §5.15), since a process that runs guests
  must not be able to change what outlives it.

Every process that runs calls has a :class:`Recorder` (records go to the store in batches, off
the call's path) and a :class:`Dispatcher` (claims queued async calls and runs them through the
same invoke use case as a synchronous call, under the same limits and quotas).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Final, Protocol

from ..config import ServerConfig
from ..invocations import InvocationStore, NewCall, StoredCall
from ..protocol import (
    MAX_RENEW,
    Ack,
    CallError,
    CallStatus,
    ClaimedCall,
    ClaimReply,
    ClaimRequest,
    CompleteRequest,
    FnError,
    InvocationRecord,
    InvokeAccepted,
    InvokeRequest,
    InvokeResult,
    LogsReply,
    LogsRequest,
    NotFoundError,
    RenewReply,
    RenewRequest,
    ReportRequest,
    ResultRequest,
    ServerStats,
    StatsReply,
    StatsRequest,
    UnavailableError,
    VersionStats,
)
from ..registry import Registry
from ._access import ALL_TENANTS, require
from ._context import INTERNAL_ID, Caller, RequestContext
from ._functions import fresh
from ._names import key_for, said_as, shown, tenant_of

if TYPE_CHECKING:
    from ._control import ControlLink

__all__ = [
    "CallService",
    "CallSource",
    "Dispatcher",
    "Recorder",
    "RelayedCallService",
    "new_call_id",
]

log = logging.getLogger("fnserver.calls")

#: Records wait at most this long in a process before they are written (or handed over).
FLUSH_EVERY_S: Final = 0.25
#: A batch is written at once when it reaches this many records.
FLUSH_AT: Final = 512
#: Records kept in memory while the store (or the control process) cannot take them; past it
#: the oldest are dropped, with a warning: a record must never cost a call.
MAX_PENDING_RECORDS: Final = 20_000
#: The most stderr a record keeps (its tail).
STDERR_TAIL: Final = 1024
#: A claim waits this long for a queued call before it is asked again.
CLAIM_WAIT_MS: Final = 10_000
#: A dispatcher renews the leases of the calls it runs this many times per lease: one lost or
#: late renewal still leaves the lease alive.
RENEWALS_PER_LEASE: Final = 3
#: A serving process's gauges reach the control process at least this often.
REPORT_EVERY_S: Final = 1.0
#: Gauges older than this belong to a process that is gone.
REPORT_STALE_S: Final = 5.0
#: How often finished results past their time are forgotten.
EXPIRE_EVERY_S: Final = 60.0


def new_call_id() -> str:
    """A fresh invocation id (``inv_`` and 96 random bits)."""
    return "inv_" + secrets.token_hex(12)


class _Pulse:
    """Wakes every waiter at once when something changed (a queue, a result, the records)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def fire(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout)


async def _cancel(*tasks: asyncio.Task[None] | None) -> None:
    """Cancel background tasks and wait until they are done (their errors were logged)."""
    live = [t for t in tasks if t is not None]
    for t in live:
        t.cancel()
    for t in live:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await t


def _visible(caller: Caller, key: str, what: str) -> str:
    """``key`` as the caller says it, or NOT_FOUND if it is another tenant's (and the caller
    is no admin): another tenant's call or record must not be seen to exist."""
    name = shown(caller, key)
    if "/" in name:
        try:
            key_for(caller, name)
        except NotFoundError:
            raise NotFoundError(f"no invocation {what}", {"id": what}) from None
    return name


def _status(caller: Caller, call_id: str, stored: StoredCall | None) -> CallStatus:
    if stored is None:
        raise NotFoundError(
            f"no invocation {call_id} (unknown, or its result was kept past its time)", {"id": call_id}
        )
    return CallStatus(
        id=stored.id,
        state=stored.state,
        name=_visible(caller, stored.key, call_id),
        version=stored.version,
        created=stored.created,
        started=stored.started,
        finished=stored.finished,
        attempts=stored.attempts,
        result=stored.result,
        error=stored.error,
    )


def _shown_record(caller: Caller, r: InvocationRecord) -> InvocationRecord:
    name = shown(caller, r.name)
    return r if name == r.name else replace(r, name=name)


class CallService:
    """The store's owner (see the module docs)."""

    def __init__(self, config: ServerConfig, registry: Registry, store: InvocationStore,
                 gauges: Callable[[], ServerStats]) -> None:
        self.config = config
        self.registry = registry
        self.store = store
        #: This process's own gauges (``Services.gauges``).
        self.gauges = gauges
        self._queued = _Pulse()
        self._finished = _Pulse()
        self._recorded = _Pulse()
        self._reports: dict[int, tuple[float, ServerStats]] = {}
        self._expiry: asyncio.Task[None] | None = None
        self._async_queued = 0
        #: Tells this store owner's claimers from every other's: an owner is written to a store
        #: that other nodes may share, where a peer address or a pid of this node may well be
        #: one of another node's too (containers all have a pid 1).
        self._instance = secrets.token_hex(6)

    async def start(self) -> None:
        """Open the store and start forgetting expired results."""
        await self.store.open()
        self._async_queued = await self.store.queued()
        self._expiry = asyncio.ensure_future(self._expire_forever())

    async def close(self) -> None:
        """Stop and close the store."""
        await _cancel(self._expiry)
        await self.store.close()

    async def _expire_forever(self) -> None:
        while True:
            try:
                gone = await self.store.expire(time.time() - self.config.result_ttl_s)
                if gone:
                    log.info("forgot %d async results older than %g s", gone, self.config.result_ttl_s)
            except Exception:  # a full disk must not end the expiry for good
                log.exception("expiring async results failed")
            await asyncio.sleep(min(EXPIRE_EVERY_S, max(1.0, self.config.result_ttl_s)))

    # -- §5.8 invoke with async, §5.12 result ---------------------------------------------------

    async def submit(self, ctx: RequestContext, req: InvokeRequest) -> InvokeAccepted:
        """Queue an async call after checking its function exists (NOT_FOUND now, not later)."""
        key = key_for(ctx.caller, req.name)
        with said_as(ctx.caller, key, req.name):
            await fresh(self.registry, lambda: self.registry.resolve(key, req.version))
        call = NewCall(
            id=new_call_id(),
            tenant=tenant_of(key),
            role=ctx.caller.role,
            token_id=ctx.caller.token_id,
            request=replace(req, name=key, async_=False),
            created=time.time(),
        )
        if not await self.store.enqueue(call, self.config.async_max_queue):
            raise UnavailableError(
                f"the async queue is full ({self.config.async_max_queue} calls wait); try again later",
                {"reason": "async_queue_full", "limit": self.config.async_max_queue},
            )
        self._async_queued += 1
        self._queued.fire()
        return InvokeAccepted(call.id)

    async def result(self, ctx: RequestContext, req: ResultRequest) -> CallStatus:
        """§5.12: the call's state, waiting up to ``wait_ms`` for it to finish."""
        deadline = time.monotonic() + (req.wait_ms or 0) / 1000
        while True:
            stored = await self.store.status(req.id)
            if stored is not None and stored.finished is not None and (
                stored.finished < time.time() - self.config.result_ttl_s
            ):
                stored = None  # past its time: gone, whether or not the sweep removed it yet
            status = _status(ctx.caller, req.id, stored)
            left = deadline - time.monotonic()
            if status.state in ("done", "failed") or left <= 0:
                return status
            await self._finished.wait(min(left, 1.0))

    # -- §5.15: the serving processes' side of the queue ----------------------------------------

    def _claimer(self, ctx: RequestContext) -> str:
        """The owner a claim, a renewal and an outcome are made under: this process and the
        asker's connection (a serving process's link, or an embedded server's own process).
        They must agree: a renewal or an outcome from another owner is not the claim's."""
        return f"{self._instance} {ctx.peer or ctx.request_id}"

    async def claim(self, ctx: RequestContext, req: ClaimRequest) -> ClaimReply:
        """Queued calls for the asker to run, waiting up to ``wait_ms`` for one. Each is
        leased for ``--async-lease`` seconds, which the asker renews while it runs the call."""
        owner = self._claimer(ctx)
        lease_s = self.config.async_lease_s
        deadline = time.monotonic() + req.wait_ms / 1000
        while True:
            calls = await self.store.claim(owner, req.max, lease_s, time.time())
            left = deadline - time.monotonic()
            if calls or left <= 0:
                self._async_queued = max(0, self._async_queued - len(calls))
                return ClaimReply(tuple(calls))
            # Woken by a new call; leases that ran out are found by asking again each second.
            await self._queued.wait(min(left, 1.0))

    async def renew(self, ctx: RequestContext, req: RenewRequest) -> RenewReply:
        """Extend the leases of the calls the asker still holds; the reply names them."""
        held = await self.store.renew(self._claimer(ctx), list(req.ids), self.config.async_lease_s, time.time())
        return RenewReply(tuple(held))

    async def complete(self, ctx: RequestContext, req: CompleteRequest) -> Ack:
        """A claimed call's outcome, recorded only while the asker still holds the call."""
        version = req.result.version if req.result is not None else None
        if await self.store.complete(req.id, version, req.result, req.error, time.time(), self._claimer(ctx)):
            self._finished.fire()
        else:
            # At least once, honestly: this run lost its lease (a partition, a stalled process,
            # a control process restarted since the claim) and the call was claimed again or
            # put back in the queue. The run that holds it now records its outcome; this one
            # must not replace an outcome a client may already have read.
            log.warning("async call %s: an outcome came from a run that no longer holds the call;"
                        " not recorded (the call runs, or ran, again)", req.id)
        return Ack()

    async def report(self, ctx: RequestContext, req: ReportRequest) -> Ack:
        """A serving process's records and gauges."""
        if req.process is not None:
            self._reports[req.pid] = (time.monotonic(), req.process)
        if req.records:
            await self.add_records(list(req.records))
        return Ack()

    async def add_records(self, records: list[InvocationRecord]) -> None:
        """Store records and wake ``logs --follow`` readers."""
        await self.store.add_records(records, self.config.max_records)
        self._recorded.fire()

    # -- §5.13 logs, §5.14 stats ---------------------------------------------------------------

    async def logs(self, ctx: RequestContext, req: LogsRequest) -> LogsReply:
        """A function's records, newest ``limit``, oldest first; waiting up to ``wait_ms``
        for one when there is none yet."""
        key = key_for(ctx.caller, req.name)
        tenant = tenant_of(key)
        deadline = time.monotonic() + (req.wait_ms or 0) / 1000
        while True:
            found = await self.store.records(tenant, key, req.version, req.after, req.limit)
            left = deadline - time.monotonic()
            if found or left <= 0:
                break
            await self._recorded.wait(min(left, 1.0))
        if not found and req.after is None:
            await self._must_exist(ctx, key, req.name)
        # With nothing found the cursor stays where it was (0 for a first call): every later
        # record of this function is after it. The store's newest seq would race a batch
        # stored between the two reads, and that batch's records would never be seen.
        last = found[-1].seq if found else (req.after or 0)
        return LogsReply(tuple(_shown_record(ctx.caller, r) for r in found), last)

    async def stats(self, ctx: RequestContext, req: StatsRequest) -> StatsReply:
        """§5.14: tallies of the caller's tenant (or one function), and the server's gauges."""
        if req.name is not None:
            key = key_for(ctx.caller, req.name)
            rows = await self.store.tallies(tenant_of(key), key)
            if not rows:
                await self._must_exist(ctx, key, req.name)
        elif req.all:
            require(ctx.caller, ALL_TENANTS, "see every tenant's statistics")
            rows = await self.store.tallies(None, None)
        else:
            tenant = req.tenant or ctx.caller.tenant
            if tenant != ctx.caller.tenant:
                require(ctx.caller, ALL_TENANTS, "see another tenant's statistics")
            rows = await self.store.tallies(tenant, None)
        functions = tuple(t.to_stats(tenant, shown(ctx.caller, key), version) for tenant, key, version, t in rows)
        return StatsReply(functions, await self.server_stats())

    async def _must_exist(self, ctx: RequestContext, key: str, name: str) -> None:
        """NOT_FOUND for a function that neither exists nor left anything behind: a typo
        deserves an error, not an empty answer."""
        with said_as(ctx.caller, key, name):
            await fresh(self.registry, lambda: self.registry.resolve(key, None))

    async def server_stats(self) -> ServerStats:
        """This process's gauges with the serving processes' latest reports."""
        now = time.monotonic()
        total = self.gauges()
        for pid, (at, stats) in list(self._reports.items()):
            if now - at > REPORT_STALE_S:
                del self._reports[pid]
            else:
                total = total.plus(stats)
        return replace(total, async_queued=self._async_queued)

    async def all_stats(self) -> tuple[list[VersionStats], ServerStats]:
        """Every tenant's tallies and the gauges: what the metrics endpoint exposes."""
        rows = await self.store.tallies(None, None)
        return [t.to_stats(tenant, key, version) for tenant, key, version, t in rows], await self.server_stats()


class RelayedCallService:
    """A serving process's: names and tenants checked here, the store reached through the
    control process (which sees the link's admin caller and registry keys)."""

    def __init__(self, registry: Registry, link: ControlLink) -> None:
        self.registry = registry
        self.link = link

    async def submit(self, ctx: RequestContext, req: InvokeRequest) -> InvokeAccepted:
        """Relayed with the registry key."""
        key = key_for(ctx.caller, req.name)
        with said_as(ctx.caller, key, req.name):
            await fresh(self.registry, lambda: self.registry.resolve(key, req.version))
            reply = await self.link.call(replace(req, name=key))
        return InvokeAccepted.from_wire(reply)

    async def result(self, ctx: RequestContext, req: ResultRequest) -> CallStatus:
        """Relayed; another tenant's call is NOT_FOUND here, as in the control process."""
        status = CallStatus.from_wire(await self.link.call(req))
        # The link's caller is the default tenant's admin: its names are registry keys.
        return replace(status, name=_visible(ctx.caller, status.name, req.id))

    async def logs(self, ctx: RequestContext, req: LogsRequest) -> LogsReply:
        """Relayed with the registry key."""
        key = key_for(ctx.caller, req.name)
        reply = LogsReply.from_wire(await self.link.call(replace(req, name=key, follow=False)))
        return replace(reply, records=tuple(_shown_record(ctx.caller, r) for r in reply.records))

    async def stats(self, ctx: RequestContext, req: StatsRequest) -> StatsReply:
        """Relayed by registry key, or for the caller's tenant."""
        if req.name is not None:
            relayed = StatsRequest(key_for(ctx.caller, req.name))
        elif req.all:
            require(ctx.caller, ALL_TENANTS, "see every tenant's statistics")
            relayed = req
        else:
            relayed = StatsRequest(None, req.tenant or ctx.caller.tenant)
            if relayed.tenant != ctx.caller.tenant:
                require(ctx.caller, ALL_TENANTS, "see another tenant's statistics")
        reply = StatsReply.from_wire(await self.link.call(relayed))
        # The link's caller is the default tenant's admin: its names are registry keys.
        return replace(reply, functions=tuple(replace(f, name=shown(ctx.caller, f.name)) for f in reply.functions))


# -- recording -------------------------------------------------------------------------------------


class RecordSink(Protocol):
    """Where a process's records go: the store, or the control process."""

    async def __call__(self, records: list[InvocationRecord], gauges: ServerStats | None) -> None: ...


class Recorder:
    """Collects this process's invocation records and writes them in batches, off the path of
    the calls that made them."""

    def __init__(self, sink: RecordSink, gauges: Callable[[], ServerStats] | None = None) -> None:
        self._sink = sink
        self._gauges = gauges
        self._pending: list[InvocationRecord] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0

    def start(self) -> None:
        """Start the background writer."""
        self._task = asyncio.ensure_future(self._run())

    async def close(self) -> None:
        """Write what is pending (once more) and stop."""
        await _cancel(self._task)
        self._task = None
        if self._pending:
            with contextlib.suppress(Exception):
                await self._sink(self._pending, None)
            self._pending = []

    def add(self, record: InvocationRecord) -> None:
        """Keep a record for the next batch."""
        self._pending.append(record)
        if len(self._pending) > MAX_PENDING_RECORDS:
            drop = len(self._pending) - MAX_PENDING_RECORDS
            del self._pending[:drop]
            self.dropped += drop
            if self.dropped % 1000 < drop:
                log.warning("the invocation store is not keeping up: %d records dropped", self.dropped)
        if len(self._pending) >= FLUSH_AT:
            self._wake.set()

    async def flush(self) -> None:
        """Write the pending records now."""
        batch, self._pending = self._pending, []
        gauges = self._gauges() if self._gauges is not None else None
        if not batch and gauges is None:
            return
        try:
            await self._sink(batch, gauges)
        except Exception as exc:
            # Kept for the next try: a control process that restarts loses none of them.
            self._pending[:0] = batch
            if not isinstance(exc, FnError):
                log.exception("writing %d invocation records failed", len(batch))

    async def _run(self) -> None:
        last = 0.0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), FLUSH_EVERY_S)
            self._wake.clear()
            now = time.monotonic()
            if self._pending or (self._gauges is not None and now - last >= REPORT_EVERY_S):
                last = now
                await self.flush()


def make_record(call_id: str, tenant: str, key: str, version: int, mode: str, runtime: str,
                started: float, outcome: InvokeResult | FnError, wall_us: int,
                queued_us: int = 0) -> InvocationRecord:
    """The record of one call (its result, or the error it failed with)."""
    if isinstance(outcome, InvokeResult):
        return InvocationRecord(
            id=call_id, tenant=tenant, name=key, version=outcome.version or version, mode=mode,
            runtime=outcome.mode or runtime, started=started,
            queue_us=outcome.queue_us + queued_us, run_us=outcome.duration_us,
            wall_us=outcome.wall_us or wall_us, exit_code=outcome.exit_code, error=None,
            output_size=len(outcome.output), stderr_tail=outcome.stderr[-STDERR_TAIL:],
            cold=outcome.cold,
        )
    tail = outcome.details.get("stderr") if isinstance(outcome.details, dict) else None
    return InvocationRecord(
        id=call_id, tenant=tenant, name=key, version=version, mode=mode, runtime=runtime,
        started=started, queue_us=queued_us, run_us=0, wall_us=wall_us, exit_code=None,
        error=outcome.code, output_size=0,
        stderr_tail=tail[-STDERR_TAIL:] if isinstance(tail, bytes) else b"",
    )


# -- running async calls -------------------------------------------------------------------------


class CallSource(Protocol):
    """Where a dispatcher gets queued calls, renews their leases and leaves their outcomes."""

    async def claim(self, limit: int, wait_ms: int) -> list[ClaimedCall]: ...

    async def renew(self, ids: list[str]) -> list[str]: ...

    async def complete(self, req: CompleteRequest) -> None: ...


class LocalSource:
    """The store of this very process (an embedded server)."""

    def __init__(self, calls: CallService) -> None:
        self.calls = calls
        self._ctx = RequestContext(Caller(INTERNAL_ID), peer=f"pid {os.getpid()}")

    async def claim(self, limit: int, wait_ms: int) -> list[ClaimedCall]:
        """Claim directly."""
        return list((await self.calls.claim(self._ctx, ClaimRequest(limit, wait_ms))).calls)

    async def renew(self, ids: list[str]) -> list[str]:
        """Renew directly."""
        return list((await self.calls.renew(self._ctx, RenewRequest(tuple(ids)))).held)

    async def complete(self, req: CompleteRequest) -> None:
        """Complete directly."""
        await self.calls.complete(self._ctx, req)


class LinkSource:
    """The control process's store, through the link."""

    def __init__(self, link: ControlLink) -> None:
        self.link = link

    async def claim(self, limit: int, wait_ms: int) -> list[ClaimedCall]:
        """A long poll on the link."""
        return list(ClaimReply.from_wire(await self.link.call(ClaimRequest(limit, wait_ms))).calls)

    async def renew(self, ids: list[str]) -> list[str]:
        """Relayed, on the link that claimed them (the owner is the link's connection)."""
        return list(RenewReply.from_wire(await self.link.call(RenewRequest(tuple(ids)))).held)

    async def complete(self, req: CompleteRequest) -> None:
        """Relayed."""
        await self.link.call(req)


RunCall = Callable[[RequestContext, InvokeRequest, str, float], Awaitable[InvokeResult]]


class Dispatcher:
    """Claims queued async calls, runs up to ``concurrency`` of them at once and renews their
    leases (``lease_s``) while they run.

    The leases are renewed here, by the process running the calls, and not by the store's
    owner on its behalf: only this process knows that a call still runs. A control process
    renewing what it handed out would keep alive, for good, the calls of a serving process
    that died alone (the supervisor replaces it, the control process lives on), and they
    would never run again. So a call runs again elsewhere once its lease runs out, whichever
    process died: this one, or the whole node.
    """

    def __init__(self, source: CallSource, run: RunCall, concurrency: int,
                 recorder: Recorder | None = None, *, lease_s: float = 30.0) -> None:
        self.source = source
        #: Flushed before a result is stored: a call that is ``done`` has its record in ``logs``.
        self.recorder = recorder
        self._run_call = run
        self.concurrency = concurrency
        self.lease_s = lease_s
        #: Each running call's task and the call's id, the leases to renew.
        self._running: dict[asyncio.Task[None], str] = {}
        #: Tasks past their run, storing the outcome: never cancelled for a lost lease (the
        #: store decides whether the outcome counts).
        self._finishing: set[asyncio.Task[None]] = set()
        self._freed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._renewer: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start claiming and renewing."""
        self._task = asyncio.ensure_future(self._loop())
        self._renewer = asyncio.ensure_future(self._renew_forever())

    async def close(self) -> None:
        """Stop claiming; calls running now are cancelled (their leases run out and they run
        again, at least once)."""
        await _cancel(self._task, self._renewer, *self._running)

    @property
    def running(self) -> int:
        """Async calls running now in this process."""
        return len(self._running)

    async def _loop(self) -> None:
        while True:
            free = self.concurrency - len(self._running)
            if free <= 0:
                self._freed.clear()
                await self._freed.wait()
                continue
            try:
                calls = await self.source.claim(free, CLAIM_WAIT_MS)
            except FnError as exc:
                log.debug("claiming async calls failed: %s", exc)
                await asyncio.sleep(1.0)  # the control process is restarting
                continue
            except Exception:
                log.exception("claiming async calls failed")
                await asyncio.sleep(1.0)
                continue
            for call in calls:
                task = asyncio.ensure_future(self._one(call))
                task.set_name(f"async {call.id}")
                self._running[task] = call.id
                task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._running.pop(task, None)
        self._finishing.discard(task)
        self._freed.set()

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s / RENEWALS_PER_LEASE)
            await self.renew()

    async def renew(self) -> None:
        """Renew the leases of the calls running here, once. A call whose lease was lost (it
        ran out during a partition or a stall and the call was claimed again, or the control
        process that claimed it was restarted) is stopped: its outcome would not be recorded."""
        running = dict(self._running)
        if not running:
            return
        ids = list(dict.fromkeys(running.values()))
        held: set[str] = set()
        try:
            for start in range(0, len(ids), MAX_RENEW):
                held.update(await self.source.renew(ids[start:start + MAX_RENEW]))
        except FnError as exc:
            # The store or the control process is away: the leases may run out meanwhile, and
            # the calls then run again (at least once); the next renewal says which.
            log.warning("renewing the leases of %d async calls failed: %s", len(ids), exc)
            return
        except Exception:
            log.exception("renewing the leases of %d async calls failed", len(ids))
            return
        for task, call_id in running.items():
            if call_id not in held and not task.done() and task not in self._finishing:
                log.warning("async call %s: its lease was lost (the call was claimed again or"
                            " requeued); this run stops", call_id)
                task.cancel()

    async def _one(self, call: ClaimedCall) -> None:
        # Run as the store's own admin with the registry key: the tenant whose quotas and
        # share the call counts against is the key's, whoever runs it.
        ctx = RequestContext.new(Caller(INTERNAL_ID), peer="async", tag=call.id)
        outcome: CompleteRequest
        try:
            result = await self._run_call(ctx, call.request, call.id, call.created)
            outcome = CompleteRequest(call.id, result=result)
        except FnError as exc:
            outcome = CompleteRequest(call.id, error=CallError(exc.code, exc.message, _plain(exc.details)))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("async call %s failed", call.id)
            outcome = CompleteRequest(call.id, error=CallError("INTERNAL", f"internal error: {type(exc).__name__}"))
        task = asyncio.current_task()
        if task is not None:
            self._finishing.add(task)
        if self.recorder is not None:
            await self.recorder.flush()
        for attempt in range(30):
            try:
                await self.source.complete(outcome)
                return
            except FnError:
                await asyncio.sleep(min(1.0 * (attempt + 1), 5.0))
        log.error("async call %s: its result could not be stored; it will run again", call.id)


def _plain(details: dict[str, Any]) -> dict[str, Any]:
    """Details that can be stored (bytes and nested maps are fine for msgpack)."""
    return {str(k): v for k, v in details.items() if isinstance(v, str | int | float | bool | bytes | list | dict | None)}


async def follow_records(logs: Callable[[LogsRequest], Awaitable[LogsReply]], req: LogsRequest
                         ) -> AsyncIterator[InvocationRecord]:
    """``logs --follow``: the newest ``limit`` records, then every new one as it is stored."""
    first = await logs(replace(req, follow=False, wait_ms=None))
    for r in first.records:
        yield r
    after = first.last
    while True:
        more = await logs(replace(req, follow=False, after=after, limit=200, wait_ms=CLAIM_WAIT_MS))
        for r in more.records:
            yield r
        after = max(after, more.last)
