"""The embedded invocation store: one SQLite file (WAL) in the data directory.

Only the process that owns the store writes it (the control process under the supervisor, or
the one process of an embedded server): serving processes, which run guests and may be
compromised by one, hand their records and results over (PROTOCOL.md §5.15) and never hold
the file. The stdlib ``sqlite3`` module blocks, so every call runs on one thread of its own.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, Final, TypeVar

import msgpack

from ..protocol import (
    CallError,
    ClaimedCall,
    InvocationRecord,
    InvokeRequest,
    InvokeResult,
)
from ._store import NewCall, StoredCall, Tally

__all__ = ["SqliteInvocationStore"]

T = TypeVar("T")

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS probe (id INTEGER PRIMARY KEY, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS calls (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    key TEXT NOT NULL,
    role TEXT NOT NULL,
    token_id TEXT,
    request BLOB NOT NULL,
    state TEXT NOT NULL,
    created REAL NOT NULL,
    version INTEGER,
    started REAL,
    finished REAL,
    lease_until REAL,
    owner TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    result BLOB,
    error BLOB
);
CREATE INDEX IF NOT EXISTS calls_waiting ON calls (state, created);
CREATE INDEX IF NOT EXISTS calls_finished ON calls (finished);
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant TEXT NOT NULL,
    key TEXT NOT NULL,
    version INTEGER NOT NULL,
    doc BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS records_by_function ON records (tenant, key, seq);
CREATE TABLE IF NOT EXISTS tallies (
    tenant TEXT NOT NULL,
    key TEXT NOT NULL,
    version INTEGER NOT NULL,
    doc BLOB NOT NULL,
    PRIMARY KEY (tenant, key, version)
);
"""

#: Picks the calls to claim: the oldest of each tenant first, then the second oldest of
#: each, and so on, so one tenant's flood of async calls does not starve the others'.
_FAIR_PICK: Final = """
SELECT id FROM (
    SELECT id, created, ROW_NUMBER() OVER (PARTITION BY tenant ORDER BY created) AS turn
    FROM calls WHERE state = 'queued' OR (state = 'running' AND lease_until < ?)
) ORDER BY turn, created LIMIT ?
"""


#: Ids per ``renew`` statement (SQLite bounds a statement's parameters).
_RENEW_SLICE: Final = 500


def _pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def _unpack(blob: bytes) -> Any:
    return msgpack.unpackb(blob, raw=False, strict_map_key=False)


class SqliteInvocationStore:
    """``InvocationStore`` over one SQLite file (see the module docs)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fnserver-calls")

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            assert self._db is not None, "store not open"
            return fn(self._db)

        return await asyncio.get_running_loop().run_in_executor(self._thread, call)

    async def open(self) -> None:
        """Create the file and tables; put calls left running back in the queue."""

        def setup() -> None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA busy_timeout=10000")
            db.executescript(_SCHEMA)
            # Whoever ran them is gone with the process that owned this store: run them again
            # (at least once, PROTOCOL.md §5.12).
            db.execute("UPDATE calls SET state = 'queued', lease_until = NULL, owner = NULL WHERE state = 'running'")
            self._db = db

        await asyncio.get_running_loop().run_in_executor(self._thread, setup)

    async def close(self) -> None:
        """Close the database after the writes already asked for."""

        def shut() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        if self._db is not None:
            await asyncio.get_running_loop().run_in_executor(self._thread, shut)
        self._thread.shutdown(wait=True)

    # -- async calls ---------------------------------------------------------------------------

    async def enqueue(self, call: NewCall, max_queued: int) -> bool:
        """Queue ``call`` unless ``max_queued`` calls already wait."""

        def put(db: sqlite3.Connection) -> bool:
            db.execute("BEGIN IMMEDIATE")
            try:
                (waiting,) = db.execute("SELECT COUNT(*) FROM calls WHERE state = 'queued'").fetchone()
                if waiting >= max_queued:
                    db.execute("ROLLBACK")
                    return False
                db.execute(
                    "INSERT INTO calls (id, tenant, key, role, token_id, request, state, created)"
                    " VALUES (?, ?, ?, ?, ?, ?, 'queued', ?)",
                    (call.id, call.tenant, call.request.name, call.role, call.token_id,
                     _pack(call.request.to_wire()), call.created),
                )
                db.execute("COMMIT")
                return True
            except BaseException:
                db.execute("ROLLBACK")
                raise

        return await self._run(put)

    async def claim(self, owner: str, limit: int, lease_s: float, now: float) -> list[ClaimedCall]:
        """Mark up to ``limit`` calls running under a lease (see the interface)."""

        def take(db: sqlite3.Connection) -> list[ClaimedCall]:
            db.execute("BEGIN IMMEDIATE")
            try:
                ids = [row[0] for row in db.execute(_FAIR_PICK, (now, limit))]
                claimed: list[ClaimedCall] = []
                for call_id in ids:
                    row = db.execute(
                        "UPDATE calls SET state = 'running', started = ?, lease_until = ?, owner = ?,"
                        " attempts = attempts + 1 WHERE id = ?"
                        " RETURNING tenant, role, token_id, request, created, attempts",
                        (now, now + lease_s, owner, call_id),
                    ).fetchone()
                    tenant, role, token_id, request, created, attempts = row
                    claimed.append(
                        ClaimedCall(call_id, tenant, role, token_id,
                                    InvokeRequest.from_wire(_unpack(request)), created, attempts)
                    )
                db.execute("COMMIT")
                return claimed
            except BaseException:
                db.execute("ROLLBACK")
                raise

        return await self._run(take)

    async def renew(self, owner: str, ids: list[str], lease_s: float, now: float) -> list[str]:
        """Extend the leases ``owner`` still holds among ``ids`` (see the interface)."""

        def extend(db: sqlite3.Connection) -> list[str]:
            held: set[str] = set()
            # In slices: a statement takes a bounded number of parameters.
            for start in range(0, len(ids), _RENEW_SLICE):
                part = ids[start:start + _RENEW_SLICE]
                held.update(row[0] for row in db.execute(
                    f"UPDATE calls SET lease_until = ? WHERE owner = ? AND state = 'running'"
                    f" AND id IN ({', '.join('?' * len(part))}) RETURNING id",
                    (now + lease_s, owner, *part),
                ))
            return [i for i in ids if i in held]

        return await self._run(extend)

    async def complete(self, call_id: str, version: int | None, result: InvokeResult | None,
                       error: CallError | None, now: float, owner: str | None = None) -> bool:
        """Record the outcome of a running call (with ``owner``, only if it still holds it)."""
        state = "done" if error is None else "failed"

        def finish(db: sqlite3.Connection) -> bool:
            cur = db.execute(
                "UPDATE calls SET state = ?, finished = ?, version = COALESCE(?, version),"
                " result = ?, error = ?, lease_until = NULL WHERE id = ? AND (? IS NULL OR owner = ?)",
                (state, now, version,
                 _pack(result.to_wire()) if result is not None else None,
                 _pack(error.to_wire()) if error is not None else None,
                 call_id, owner, owner),
            )
            return cur.rowcount > 0

        return await self._run(finish)

    async def status(self, call_id: str) -> StoredCall | None:
        """One call as stored."""

        def read(db: sqlite3.Connection) -> StoredCall | None:
            row = db.execute(
                "SELECT tenant, key, state, created, version, started, finished, attempts,"
                " result, error FROM calls WHERE id = ?",
                (call_id,),
            ).fetchone()
            if row is None:
                return None
            tenant, key, state, created, version, started, finished, attempts, result, error = row
            return StoredCall(
                call_id, tenant, key, state, created, version, started, finished, attempts,
                InvokeResult.from_wire(_unpack(result)) if result is not None else None,
                CallError.from_wire(_unpack(error)) if error is not None else None,
            )

        return await self._run(read)

    async def queued(self) -> int:
        """Calls waiting."""
        return await self._run(
            lambda db: int(db.execute("SELECT COUNT(*) FROM calls WHERE state = 'queued'").fetchone()[0])
        )

    async def probe(self) -> None:
        """One row rewritten in its own transaction: the file takes writes now."""
        await self._run(lambda db: db.execute("INSERT OR REPLACE INTO probe (id, at) VALUES (1, ?)", (time.time(),)))

    async def expire(self, finished_before: float) -> int:
        """Forget old results."""
        return await self._run(
            lambda db: db.execute(
                "DELETE FROM calls WHERE state IN ('done', 'failed') AND finished < ?",
                (finished_before,),
            ).rowcount
        )

    # -- records and tallies -------------------------------------------------------------------

    async def add_records(self, records: list[InvocationRecord], max_records: int) -> list[InvocationRecord]:
        """Store a batch in one transaction, tallies included."""
        tallies: dict[tuple[str, str, int], Tally] = {}
        for r in records:
            tallies.setdefault((r.tenant, r.name, r.version), Tally()).add(r)

        def write(db: sqlite3.Connection) -> list[InvocationRecord]:
            db.execute("BEGIN IMMEDIATE")
            try:
                stored = []
                for r in records:
                    cur = db.execute(
                        "INSERT INTO records (tenant, key, version, doc) VALUES (?, ?, ?, ?)",
                        (r.tenant, r.name, r.version, _pack(r.to_wire())),
                    )
                    stored.append(replace(r, seq=int(cur.lastrowid or 0)))
                for (tenant, key, version), add in tallies.items():
                    row = db.execute(
                        "SELECT doc FROM tallies WHERE tenant = ? AND key = ? AND version = ?",
                        (tenant, key, version),
                    ).fetchone()
                    tally = _tally(_unpack(row[0])) if row is not None else Tally()
                    tally.merge(add)
                    db.execute(
                        "INSERT OR REPLACE INTO tallies (tenant, key, version, doc) VALUES (?, ?, ?, ?)",
                        (tenant, key, version, _pack(_tally_doc(tally))),
                    )
                if stored:
                    db.execute("DELETE FROM records WHERE seq <= ?", (stored[-1].seq - max_records,))
                db.execute("COMMIT")
                return stored
            except BaseException:
                db.execute("ROLLBACK")
                raise

        return await self._run(write)

    async def records(self, tenant: str, key: str, version: int | None, after: int | None,
                      limit: int) -> list[InvocationRecord]:
        """Newest ``limit`` after the cursor, oldest first."""

        def read(db: sqlite3.Connection) -> list[InvocationRecord]:
            sql = "SELECT seq, doc FROM records WHERE tenant = ? AND key = ? AND seq > ?"
            args: list[Any] = [tenant, key, after or 0]
            if version is not None:
                sql += " AND version = ?"
                args.append(version)
            sql += " ORDER BY seq DESC LIMIT ?"
            args.append(limit)
            rows = db.execute(sql, args).fetchall()
            out = []
            for seq, doc in reversed(rows):
                m = _unpack(doc)
                m["seq"] = seq
                out.append(InvocationRecord.from_wire(m))
            return out

        return await self._run(read)

    async def tallies(self, tenant: str | None, key: str | None) -> list[tuple[str, str, int, Tally]]:
        """Tallies, sorted by tenant, function and version."""

        def read(db: sqlite3.Connection) -> list[tuple[str, str, int, Tally]]:
            sql = "SELECT tenant, key, version, doc FROM tallies"
            args: list[Any] = []
            if tenant is not None:
                sql += " WHERE tenant = ?"
                args.append(tenant)
                if key is not None:
                    sql += " AND key = ?"
                    args.append(key)
            sql += " ORDER BY tenant, key, version"
            return [(t, k, v, _tally(_unpack(doc))) for t, k, v, doc in db.execute(sql, args)]

        return await self._run(read)


def _tally_doc(t: Tally) -> dict[str, Any]:
    return {"calls": t.calls, "errors": t.errors, "warm": t.warm, "cold": t.cold,
            "buckets": t.buckets, "total_ms": t.total_ms}


def _tally(doc: dict[str, Any]) -> Tally:
    t = Tally(
        calls=int(doc.get("calls", 0)),
        errors={str(k): int(v) for k, v in (doc.get("errors") or {}).items()},
        warm=int(doc.get("warm", 0)),
        cold=int(doc.get("cold", 0)),
        total_ms=float(doc.get("total_ms", 0.0)),
    )
    saved = list(doc.get("buckets") or [])
    # A histogram written with fewer bounds (an older server) keeps what it can.
    for i, n in enumerate(saved[: len(t.buckets)]):
        t.buckets[i] = int(n)
    return t
