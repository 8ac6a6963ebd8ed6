"""Tenant quotas (issue 11, OPERATIONS.md "Quotas"): what each tenant may hold and use.

Two kinds of quota:

* **Held** (functions, versions per function, stored bytes): checked by the register use case
  in the control process, the only writer, against the registry's counts.
* **In use** (calls running at once, calls per second, builds running at once): calls are
  admitted by the serving processes, several of them, so the counts live in one shared table
  (:class:`SharedUsage`: a ``memfd`` the supervisor makes and every serving process maps),
  updated under a lock (``lockf`` on the table: held for a few microseconds, by one thread
  of each process, the event loop's). Each process counts its own calls in a column of its
  own, so when the supervisor restarts a process that died mid-call it zeroes that column
  and no call of the dead process counts against its tenant any more. Builds run in the
  control process only, so their count is a plain in-process one (:class:`BuildCounter`).

The calls-per-second quota is a token bucket per tenant: it holds up to one second's worth of
calls (at least one), refilled continuously at the quota's rate; a call takes one token or is
refused. Only tenants with a concurrency or rate quota touch the table: the default (no
quota) costs nothing on the call path.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import mmap
import os
import struct
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Final, Protocol

from .config import TenantLimits
from .protocol import QuotaExceededError

__all__ = [
    "BuildCounter",
    "LocalUsage",
    "QuotaBook",
    "SharedUsage",
    "TenantLimits",
    "UsageTable",
]


class QuotaBook:
    """The quotas of every tenant: the server-wide defaults (flags), with the overrides the
    auth file gives some tenants (replaced whenever the auth file is read again)."""

    def __init__(self, defaults: TenantLimits, overrides: Mapping[str, TenantLimits] | None = None) -> None:
        self.defaults = defaults
        self._limits: dict[str, TenantLimits] = {}
        self.set_overrides(overrides or {})

    def set_overrides(self, overrides: Mapping[str, TenantLimits]) -> None:
        """Take a new set of per-tenant overrides (the auth file changed)."""
        self._limits = {t: self.defaults.overridden_by(o) for t, o in overrides.items()}

    def limits(self, tenant: str) -> TenantLimits:
        """The quotas that apply to ``tenant``."""
        return self._limits.get(tenant, self.defaults)


def exceeded(tenant: str, quota: str, limit: float, current: float, what: str) -> QuotaExceededError:
    """The error for one quota, with the limit and the current use in ``details``."""
    shown = f"{limit:g}" if isinstance(limit, float) else str(limit)
    return QuotaExceededError(
        f"tenant '{tenant}' is over its {quota} quota: {what} (limit {shown})",
        {"quota": quota, "tenant": tenant, "limit": limit, "current": current},
    )


class UsageTable(Protocol):
    """Calls running and recent call rate, per tenant (see the module docstring)."""

    def enter(self, tenant: str, limits: TenantLimits) -> None:
        """Count one call of ``tenant`` as running, or raise QuotaExceededError."""

    def leave(self, tenant: str) -> None:
        """The call counted by :meth:`enter` ended."""


@dataclass
class _Bucket:
    tokens: float
    last: float


def _take_token(tokens: float, last: float, rps: float, now: float) -> tuple[float, bool]:
    """Refill a bucket holding up to one second's worth of calls (at least one) at ``rps``
    per second since ``last``, then take one token if there is one: (tokens left, taken)."""
    capacity = max(1.0, rps)
    tokens = min(capacity, tokens + max(0.0, now - last) * rps)
    if tokens >= 1.0:
        return tokens - 1.0, True
    return tokens, False


def _check(tenant: str, limits: TenantLimits, running: int) -> None:
    cap = limits.max_concurrency
    if cap is not None and running >= cap:
        raise exceeded(tenant, "concurrency", cap, running, f"{running} calls are running")


def _rate_refused(tenant: str, rps: float) -> QuotaExceededError:
    return exceeded(tenant, "rps", rps, max(1.0, rps), f"{max(1.0, rps):g} calls in the last second")


class LocalUsage:
    """The table for a server that is one process (``role all``: tests, embedding)."""

    def __init__(self) -> None:
        self._running: Counter[str] = Counter()
        self._buckets: dict[str, _Bucket] = {}

    def enter(self, tenant: str, limits: TenantLimits) -> None:
        """See :class:`UsageTable`."""
        _check(tenant, limits, self._running[tenant])
        if limits.max_rps is not None:
            now = time.monotonic()
            b = self._buckets.setdefault(tenant, _Bucket(max(1.0, limits.max_rps), now))
            b.tokens, taken = _take_token(b.tokens, b.last, limits.max_rps, now)
            b.last = now
            if not taken:
                raise _rate_refused(tenant, limits.max_rps)
        self._running[tenant] += 1

    def leave(self, tenant: str) -> None:
        """See :class:`UsageTable`."""
        self._running[tenant] -= 1
        if self._running[tenant] <= 0:
            del self._running[tenant]


# The shared table's layout: ROWS rows, one per tenant, found by open addressing on a 16-byte
# digest of the tenant's name. A row: the digest, the bucket's tokens and last refill
# (CLOCK_MONOTONIC, the same clock in every process), then one running count per process.
ROWS: Final = 4096
COLUMNS: Final = 64
_HEAD: Final = struct.Struct("=16sdd")
_COUNT: Final = struct.Struct("=i")
_ROW: Final = _HEAD.size + COLUMNS * _COUNT.size
SIZE: Final = ROWS * _ROW
_EMPTY: Final = bytes(16)


class SharedUsage:
    """The table shared by the serving processes: a ``memfd`` every one of them maps.

    ``column`` is this process's (the supervisor's slot index); the supervisor itself opens
    the table with ``column=None`` to create it and to zero the column of a process it
    restarts.
    """

    def __init__(self, fd: int, column: int | None) -> None:
        if column is not None and not 0 <= column < COLUMNS:
            raise ValueError(f"usage column must be from 0 to {COLUMNS - 1}, got {column}")
        self.fd = fd
        self.column = column
        self._map = mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._rows: dict[str, int] = {}  # tenant -> row offset, once found

    @classmethod
    def create(cls) -> SharedUsage:
        """A new, zeroed table (the supervisor's), inheritable by the processes it starts."""
        fd = os.memfd_create("fnserver-usage", 0)  # no MFD_CLOEXEC: passed on with pass_fds
        os.ftruncate(fd, SIZE)
        return cls(fd, None)

    def close(self) -> None:
        """Unmap the table and close its descriptor."""
        self._map.close()
        os.close(self.fd)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fcntl.lockf(self.fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def _row(self, tenant: str) -> int:
        """The tenant's row offset, claiming a free row the first time (under the lock)."""
        off = self._rows.get(tenant)
        if off is not None:
            return off
        key = hashlib.blake2b(tenant.encode(), digest_size=16).digest()
        start = int.from_bytes(key[:8], "little") % ROWS
        m = self._map
        for i in range(ROWS):
            off = ((start + i) % ROWS) * _ROW
            found = m[off : off + 16]
            if found == key:
                break
            if found == _EMPTY:
                _HEAD.pack_into(m, off, key, -1.0, 0.0)  # tokens < 0: a bucket not yet filled
                break
        else:
            raise exceeded(tenant, "tenants", ROWS, ROWS, "the usage table has no free row")
        self._rows[tenant] = off
        return off

    def _running(self, off: int) -> int:
        base = off + _HEAD.size
        return sum(
            _COUNT.unpack_from(self._map, base + i * _COUNT.size)[0] for i in range(COLUMNS)
        )

    def _add(self, off: int, delta: int) -> None:
        assert self.column is not None, "the supervisor's view runs no calls"
        at = off + _HEAD.size + self.column * _COUNT.size
        _COUNT.pack_into(self._map, at, _COUNT.unpack_from(self._map, at)[0] + delta)

    def enter(self, tenant: str, limits: TenantLimits) -> None:
        """See :class:`UsageTable`."""
        with self._locked():
            off = self._row(tenant)
            if limits.max_concurrency is not None:
                _check(tenant, limits, self._running(off))
            if limits.max_rps is not None:
                _key, tokens, last = _HEAD.unpack_from(self._map, off)
                now = time.monotonic()
                if tokens < 0:
                    tokens, last = max(1.0, limits.max_rps), now
                tokens, taken = _take_token(tokens, last, limits.max_rps, now)
                _HEAD.pack_into(self._map, off, _key, tokens, now)
                if not taken:
                    raise _rate_refused(tenant, limits.max_rps)
            self._add(off, 1)

    def leave(self, tenant: str) -> None:
        """See :class:`UsageTable`."""
        with self._locked():
            self._add(self._row(tenant), -1)

    def running(self, tenant: str) -> int:
        """Calls of ``tenant`` running in every process (tests, monitoring)."""
        with self._locked():
            return self._running(self._row(tenant))

    def reset_column(self, column: int) -> None:
        """Forget every call counted by the process in ``column`` (it died; the supervisor
        calls this before starting its successor there)."""
        with self._locked():
            for row in range(ROWS):
                at = row * _ROW + _HEAD.size + column * _COUNT.size
                _COUNT.pack_into(self._map, at, 0)


class BuildCounter:
    """Builds running per tenant, in the control process (the only one that builds)."""

    def __init__(self) -> None:
        self._running: Counter[str] = Counter()

    @contextlib.contextmanager
    def hold(self, tenant: str, limits: TenantLimits) -> Iterator[None]:
        """Count one build of ``tenant`` while the block runs, or raise QuotaExceededError."""
        cap = limits.max_builds
        now = self._running[tenant]
        if cap is not None and now >= cap:
            raise exceeded(tenant, "builds", cap, now, f"{now} builds are running")
        self._running[tenant] += 1
        try:
            yield
        finally:
            self._running[tenant] -= 1
            if self._running[tenant] <= 0:
                del self._running[tenant]
