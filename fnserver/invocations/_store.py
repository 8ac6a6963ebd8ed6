"""What the async queue, the invocation records and the statistics need from a store.

The embedded backend is :class:`~fnserver.invocations.SqliteInvocationStore`, one file in the
data directory; :class:`~fnserver.invocations.PostgresInvocationStore` fills the same interface
for several nodes sharing one database (claims there are ``FOR UPDATE SKIP LOCKED`` under the
same lease rule; its module docs say where it must differ).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Protocol

from ..protocol import (
    LATENCY_BUCKETS_MS,
    CallError,
    CallState,
    ClaimedCall,
    InvocationRecord,
    InvokeRequest,
    InvokeResult,
    VersionStats,
)

__all__ = ["InvocationStore", "NewCall", "StoredCall", "Tally", "percentile"]


@dataclass(frozen=True, slots=True)
class NewCall:
    """An async call to queue: who asked (its tenant, role and token) and what, by registry
    key (``request.name``)."""

    id: str
    tenant: str
    role: str
    token_id: str | None
    request: InvokeRequest
    created: float


@dataclass(frozen=True, slots=True)
class StoredCall:
    """An async call as the store holds it now."""

    id: str
    tenant: str
    #: The registry key of the function called.
    key: str
    state: CallState
    created: float
    version: int | None = None
    started: float | None = None
    finished: float | None = None
    attempts: int = 0
    result: InvokeResult | None = None
    error: CallError | None = None


@dataclass(slots=True)
class Tally:
    """One version's statistics, as they are added up (the store keeps one per version)."""

    calls: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    warm: int = 0
    cold: int = 0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_MS) + 1))
    total_ms: float = 0.0

    def add(self, record: InvocationRecord) -> None:
        """Count one call."""
        self.calls += 1
        if record.error is not None:
            self.errors[record.error] = self.errors.get(record.error, 0) + 1
        if record.cold:
            self.cold += 1
        else:
            self.warm += 1
        ms = record.wall_us / 1000
        self.buckets[bisect.bisect_left(LATENCY_BUCKETS_MS, ms)] += 1
        self.total_ms += ms

    def merge(self, other: Tally) -> None:
        """Add another tally's counts to this one."""
        self.calls += other.calls
        for code, n in other.errors.items():
            self.errors[code] = self.errors.get(code, 0) + n
        self.warm += other.warm
        self.cold += other.cold
        for i, n in enumerate(other.buckets):
            self.buckets[i] += n
        self.total_ms += other.total_ms

    def to_stats(self, tenant: str, name: str, version: int) -> VersionStats:
        """The wire record, with p50 and p99 estimated from the buckets."""
        return VersionStats(
            tenant=tenant,
            name=name,
            version=version,
            calls=self.calls,
            errors=dict(self.errors),
            warm=self.warm,
            cold=self.cold,
            p50_ms=percentile(self.buckets, 0.50),
            p99_ms=percentile(self.buckets, 0.99),
            buckets=tuple(self.buckets),
            total_ms=round(self.total_ms, 3),
        )


def percentile(buckets: list[int] | tuple[int, ...], q: float) -> float | None:
    """The ``q`` quantile of a histogram over ``LATENCY_BUCKETS_MS``, interpolated linearly
    inside its bucket (the way Prometheus's ``histogram_quantile`` does)."""
    total = sum(buckets)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(buckets):
        if n and seen + n >= rank:
            lo = LATENCY_BUCKETS_MS[i - 1] if i > 0 else 0.0
            if i >= len(LATENCY_BUCKETS_MS):
                return LATENCY_BUCKETS_MS[-1]  # above the last bound: say the bound
            hi = LATENCY_BUCKETS_MS[i]
            return round(lo + (hi - lo) * (rank - seen) / n, 3)
        seen += n
    return LATENCY_BUCKETS_MS[-1]


class InvocationStore(Protocol):
    """Async calls, invocation records and per-version tallies (see the module docs)."""

    async def open(self) -> None:
        """Create what is missing; calls left running by a process that stopped go back to
        the queue (they run at least once). A store shared by several nodes leaves them to
        their leases instead: another node may be running them."""

    async def close(self) -> None:
        """Finish pending writes and let go of the store."""

    async def enqueue(self, call: NewCall, max_queued: int) -> bool:
        """Queue a call; False (nothing written) when ``max_queued`` calls already wait."""

    async def claim(self, owner: str, limit: int, lease_s: float, now: float) -> list[ClaimedCall]:
        """Take up to ``limit`` queued calls (and calls whose lease ran out), oldest first with
        tenants taking turns, marking them running under a lease until ``now + lease_s``."""

    async def renew(self, owner: str, ids: list[str], lease_s: float, now: float) -> list[str]:
        """Extend to ``now + lease_s`` the leases of those of ``ids`` that are still running
        under ``owner``'s claim; return them (in the order of ``ids``). A call missing from
        the answer is no longer ``owner``'s: it finished, went back to the queue, or its lease
        ran out and someone else claimed it."""

    async def complete(self, call_id: str, version: int | None, result: InvokeResult | None,
                       error: CallError | None, now: float, owner: str | None = None) -> bool:
        """Record a claimed call's outcome; return whether it was recorded.

        With ``owner``, only while the call is that owner's (its last claim was ``owner``'s):
        a run whose lease ran out and whose call was claimed again elsewhere is a late
        finisher, and its outcome must not replace the one of the run that holds the call now
        (or has finished it). The call still ran at least once; it may have run twice.
        Without ``owner`` the outcome is recorded whoever holds the call."""

    async def status(self, call_id: str) -> StoredCall | None:
        """One call, or None if unknown (or expired)."""

    async def queued(self) -> int:
        """Calls waiting to be claimed."""

    async def probe(self) -> None:
        """Write something small and commit it: raises if the store cannot take writes
        (readiness, ``GET /readyz``)."""

    async def expire(self, finished_before: float) -> int:
        """Forget results that finished before the given time; return how many."""

    async def add_records(self, records: list[InvocationRecord], max_records: int) -> list[InvocationRecord]:
        """Store records (and add them to their versions' tallies), keep the newest
        ``max_records``; return them with their ``seq``."""

    async def records(self, tenant: str, key: str, version: int | None, after: int | None,
                      limit: int) -> list[InvocationRecord]:
        """A function's newest ``limit`` records after cursor ``after``, oldest first."""

    async def tallies(self, tenant: str | None, key: str | None) -> list[tuple[str, str, int, Tally]]:
        """(tenant, key, version, tally) of one function, one tenant's or (None) every one."""
