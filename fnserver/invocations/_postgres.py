"""The shared invocation store: PostgreSQL through asyncpg, for several nodes at once.

It fills :class:`~fnserver.invocations.InvocationStore` with the meaning of the embedded
:class:`~fnserver.invocations.SqliteInvocationStore` (the same tests run against both), over a
connection pool:

- **Schema.** Created at :meth:`~PostgresInvocationStore.open` by versioned migrations
  (``fnserver._pgschema``: the ``schema_migrations`` table, component ``invocations``), in one
  transaction under an advisory lock, so nodes that start together do not race. The tables are
  ``async_calls``, ``invocation_records``, ``invocation_tallies`` and ``invocation_probe``.
- **Claims.** The calls to take are picked like SQLite's (the oldest of each tenant first, then
  the second oldest of each...: tenants take turns), then locked with ``FOR UPDATE SKIP
  LOCKED`` and marked running under a lease in the same statement, so two nodes never take the
  same call at once; a call another node is taking at that moment is skipped and the pick is
  made again without it. The process running a call renews its lease (``renew``, by owner);
  a running call whose lease ran out is claimable again (at least once), and the outcome of
  the run that lost it is then not recorded (``complete`` with the owner).
- **Results** are rows like any other: whichever node completes a call, any node reads it.
- **Records** keep the newest ``max_records`` (their ``seq`` comes from one identity sequence
  for all nodes) and **tallies** are added up per version in the transaction that stores the
  records, each tally row locked while it is updated (in key order: no deadlocks between nodes).

Differences from the embedded store, because several nodes share this one:

- ``open()`` does **not** put calls left ``running`` back in the queue: another node may be
  running them right now. A call whose node died is claimed again once its lease runs out.
- ``enqueue`` holds an advisory lock while it counts the queue, so ``max_queued`` holds across
  nodes; the count and the lease times use the callers' clocks (``now``), as with SQLite: keep
  the nodes' clocks in step (NTP).
- Records: a batch that rolled back leaves a gap in ``seq`` (sequences do not roll back), so a
  store can then keep slightly fewer than ``max_records``; two nodes storing batches at the
  same moment may keep one batch too many until the next batch. The bound never grows.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace
from typing import Any, Final

import msgpack

from .._pgschema import migrate
from ..protocol import (
    CallError,
    ClaimedCall,
    InvocationRecord,
    InvokeRequest,
    InvokeResult,
)
from ._store import NewCall, StoredCall, Tally

__all__ = ["PostgresInvocationStore"]

#: The component name in ``schema_migrations``.
COMPONENT: Final = "invocations"

#: Append only: a released migration is never edited, a change is a new one.
MIGRATIONS: Final[tuple[tuple[int, str], ...]] = (
    (1, """
CREATE TABLE invocation_probe (id integer PRIMARY KEY, at double precision NOT NULL);
CREATE TABLE async_calls (
    id text PRIMARY KEY,
    -- Breaks ties between calls queued at the same instant: the first queued goes first.
    seq bigint GENERATED ALWAYS AS IDENTITY,
    tenant text NOT NULL,
    key text NOT NULL,
    role text NOT NULL,
    token_id text,
    request bytea NOT NULL,
    state text NOT NULL CHECK (state IN ('queued', 'running', 'done', 'failed')),
    created double precision NOT NULL,
    version integer,
    started double precision,
    finished double precision,
    lease_until double precision,
    owner text,
    attempts integer NOT NULL DEFAULT 0,
    result bytea,
    error bytea
);
CREATE INDEX async_calls_waiting ON async_calls (state, created);
CREATE INDEX async_calls_finished ON async_calls (finished) WHERE state IN ('done', 'failed');
CREATE TABLE invocation_records (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant text NOT NULL,
    key text NOT NULL,
    version integer NOT NULL,
    doc bytea NOT NULL
);
CREATE INDEX invocation_records_by_function ON invocation_records (tenant, key, seq);
CREATE TABLE invocation_tallies (
    tenant text NOT NULL,
    key text NOT NULL,
    version integer NOT NULL,
    calls bigint NOT NULL DEFAULT 0,
    errors jsonb NOT NULL DEFAULT '{}',
    warm bigint NOT NULL DEFAULT 0,
    cold bigint NOT NULL DEFAULT 0,
    buckets bigint[] NOT NULL DEFAULT '{}',
    total_ms double precision NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, key, version)
);
"""),
)

#: Held (per transaction) while ``enqueue`` counts the queue and adds to it: "fnsv" "enqu".
_ENQUEUE_LOCK: Final = 0x666E7376_656E7175

_CLAIMABLE: Final = "(state = 'queued' OR (state = 'running' AND lease_until < $1))"

#: The fair pick of ``_sqlite.py`` ($1 now, $2 how many, $3 ids to leave out: those another
#: node had locked at the previous try).
_FAIR_PICK: Final = f"""
SELECT id FROM (
    SELECT id, created, seq, row_number() OVER (PARTITION BY tenant ORDER BY created, seq) AS turn
    FROM async_calls WHERE {_CLAIMABLE} AND NOT (id = ANY($3::text[]))
) AS waiting ORDER BY turn, created, seq LIMIT $2
"""

#: Takes what is still claimable of the picked ids ($4) and not being taken by someone else.
_TAKE: Final = f"""
UPDATE async_calls SET state = 'running', started = $1, lease_until = $2, owner = $3,
    attempts = attempts + 1
WHERE id IN (
    SELECT id FROM async_calls WHERE id = ANY($4::text[]) AND {_CLAIMABLE}
    FOR UPDATE SKIP LOCKED
)
RETURNING id, tenant, role, token_id, request, created, attempts
"""

#: How many times a claim picks again after finding calls locked by another node.
_CLAIM_ROUNDS: Final = 3


def _pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def _unpack(blob: bytes) -> Any:
    return msgpack.unpackb(blob, raw=False, strict_map_key=False)


def _rowcount(status: str) -> int:
    """The row count of a command tag (``DELETE 3``)."""
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else 0


class PostgresInvocationStore:
    """``InvocationStore`` over a PostgreSQL database shared by every node (see the module
    docs). ``dsn`` is ``postgresql://USER[:PASSWORD]@HOST:PORT/DB``."""

    def __init__(self, dsn: str, *, min_connections: int = 1, max_connections: int = 8,
                 connect_timeout_s: float = 10.0, close_timeout_s: float = 10.0) -> None:
        self.dsn = dsn
        self._min = min_connections
        self._max = max_connections
        self._connect_timeout = connect_timeout_s
        self._close_timeout = close_timeout_s
        self._pool: Any = None

    @property
    def pool(self) -> Any:
        """The open ``asyncpg.Pool``."""
        if self._pool is None:
            raise RuntimeError("store not open")
        return self._pool

    async def open(self) -> None:
        """Connect and bring the schema up to date. Calls left running stay so: their leases
        decide (see the module docs)."""
        import asyncpg  # here: an embedded server never pays for importing it

        pool = await asyncpg.create_pool(
            self.dsn, min_size=self._min, max_size=self._max, timeout=self._connect_timeout,
            server_settings={"application_name": "fnserver"},
        )
        try:
            async with pool.acquire() as conn:
                await migrate(conn, COMPONENT, MIGRATIONS)
        except BaseException:
            pool.terminate()
            raise
        self._pool = pool

    async def close(self) -> None:
        """Wait for the queries under way (a bounded while), then close every connection."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), self._close_timeout)
        except TimeoutError:
            pool.terminate()

    # -- async calls ---------------------------------------------------------------------------

    async def enqueue(self, call: NewCall, max_queued: int) -> bool:
        """Queue ``call`` unless ``max_queued`` calls already wait (counted under a lock that
        every node's ``enqueue`` takes)."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _ENQUEUE_LOCK)
            waiting = await conn.fetchval(
                "SELECT count(*) FROM (SELECT 1 FROM async_calls WHERE state = 'queued' LIMIT $1) AS q",
                max(0, max_queued),
            )
            if waiting >= max_queued:
                return False
            await conn.execute(
                "INSERT INTO async_calls (id, tenant, key, role, token_id, request, state, created)"
                " VALUES ($1, $2, $3, $4, $5, $6, 'queued', $7)",
                call.id, call.tenant, call.request.name, call.role, call.token_id,
                _pack(call.request.to_wire()), float(call.created),
            )
            return True

    async def claim(self, owner: str, limit: int, lease_s: float, now: float) -> list[ClaimedCall]:
        """Mark up to ``limit`` calls running under a lease (see the interface and the module
        docs); in the order they were picked."""
        claimed: list[ClaimedCall] = []
        if limit <= 0:
            return claimed
        now = float(now)
        passed: list[str] = []
        async with self.pool.acquire() as conn, conn.transaction():
            for _ in range(_CLAIM_ROUNDS):
                ids = [row[0] for row in await conn.fetch(_FAIR_PICK, now, limit - len(claimed), passed)]
                if not ids:
                    break
                rows = {row["id"]: row for row in
                        await conn.fetch(_TAKE, now, now + lease_s, owner, ids)}
                for call_id in ids:
                    row = rows.get(call_id)
                    if row is not None:
                        claimed.append(ClaimedCall(
                            call_id, row["tenant"], row["role"], row["token_id"],
                            InvokeRequest.from_wire(_unpack(row["request"])), row["created"],
                            row["attempts"],
                        ))
                if len(rows) == len(ids) or len(claimed) >= limit:
                    break
                passed.extend(ids)
        return claimed

    async def renew(self, owner: str, ids: list[str], lease_s: float, now: float) -> list[str]:
        """Extend the leases ``owner`` still holds among ``ids`` (see the interface)."""
        if not ids:
            return []
        rows = await self.pool.fetch(
            "UPDATE async_calls SET lease_until = $1"
            " WHERE id = ANY($2::text[]) AND owner = $3 AND state = 'running' RETURNING id",
            float(now) + lease_s, ids, owner,
        )
        held = {row[0] for row in rows}
        return [i for i in ids if i in held]

    async def complete(self, call_id: str, version: int | None, result: InvokeResult | None,
                       error: CallError | None, now: float, owner: str | None = None) -> bool:
        """Record the outcome of a running call (with ``owner``, only if it still holds it)."""
        status = await self.pool.execute(
            "UPDATE async_calls SET state = $1, finished = $2, version = COALESCE($3, version),"
            " result = $4, error = $5, lease_until = NULL"
            " WHERE id = $6 AND ($7::text IS NULL OR owner = $7::text)",
            "done" if error is None else "failed", float(now), version,
            _pack(result.to_wire()) if result is not None else None,
            _pack(error.to_wire()) if error is not None else None,
            call_id, owner,
        )
        return _rowcount(status) > 0

    async def status(self, call_id: str) -> StoredCall | None:
        """One call as stored."""
        row = await self.pool.fetchrow(
            "SELECT tenant, key, state, created, version, started, finished, attempts, result, error"
            " FROM async_calls WHERE id = $1",
            call_id,
        )
        if row is None:
            return None
        return StoredCall(
            call_id, row["tenant"], row["key"], row["state"], row["created"], row["version"],
            row["started"], row["finished"], row["attempts"],
            InvokeResult.from_wire(_unpack(row["result"])) if row["result"] is not None else None,
            CallError.from_wire(_unpack(row["error"])) if row["error"] is not None else None,
        )

    async def queued(self) -> int:
        """Calls waiting (on every node)."""
        return int(await self.pool.fetchval("SELECT count(*) FROM async_calls WHERE state = 'queued'"))

    async def probe(self) -> None:
        """One row rewritten in its own transaction: the database takes writes now."""
        await self.pool.execute(
            "INSERT INTO invocation_probe (id, at) VALUES (1, $1)"
            " ON CONFLICT (id) DO UPDATE SET at = excluded.at",
            time.time(),
        )

    async def expire(self, finished_before: float) -> int:
        """Forget old results."""
        status = await self.pool.execute(
            "DELETE FROM async_calls WHERE state IN ('done', 'failed') AND finished < $1",
            float(finished_before),
        )
        return _rowcount(status)

    # -- records and tallies -------------------------------------------------------------------

    async def add_records(self, records: list[InvocationRecord], max_records: int) -> list[InvocationRecord]:
        """Store a batch in one transaction, tallies included."""
        if not records:
            return []
        adds: dict[tuple[str, str, int], Tally] = {}
        for r in records:
            adds.setdefault((r.tenant, r.name, r.version), Tally()).add(r)
        keys = sorted(adds)  # every node locks tally rows in this order
        tenants = [k[0] for k in keys]
        names = [k[1] for k in keys]
        versions = [k[2] for k in keys]
        async with self.pool.acquire() as conn, conn.transaction():
            # One statement, its rows numbered in the batch's order: the identity values are
            # drawn in that order, so the sorted seqs are the records' own.
            rows = await conn.fetch(
                "INSERT INTO invocation_records (tenant, key, version, doc)"
                " SELECT tenant, key, version, doc"
                " FROM unnest($1::text[], $2::text[], $3::integer[], $4::bytea[])"
                "   WITH ORDINALITY AS batch (tenant, key, version, doc, n)"
                " ORDER BY n RETURNING seq",
                [r.tenant for r in records], [r.name for r in records],
                [r.version for r in records], [_pack(r.to_wire()) for r in records],
            )
            seqs = sorted(int(row[0]) for row in rows)
            stored = [replace(r, seq=seq) for r, seq in zip(records, seqs, strict=True)]
            await conn.execute(
                "INSERT INTO invocation_tallies (tenant, key, version)"
                " SELECT * FROM unnest($1::text[], $2::text[], $3::integer[])"
                " ON CONFLICT DO NOTHING",
                tenants, names, versions,
            )
            current = await conn.fetch(
                "SELECT t.tenant, t.key, t.version, t.calls, t.errors, t.warm, t.cold, t.buckets, t.total_ms"
                " FROM invocation_tallies AS t"
                " JOIN unnest($1::text[], $2::text[], $3::integer[]) AS k (tenant, key, version)"
                "   USING (tenant, key, version)"
                " ORDER BY t.tenant, t.key, t.version FOR UPDATE OF t",
                tenants, names, versions,
            )
            updates = []
            for row in current:
                tally = _tally(row)
                tally.merge(adds[(row["tenant"], row["key"], row["version"])])
                updates.append((row["tenant"], row["key"], row["version"], tally.calls,
                                json.dumps(tally.errors), tally.warm, tally.cold, tally.buckets,
                                tally.total_ms))
            await conn.executemany(
                "UPDATE invocation_tallies SET calls = $4, errors = $5::jsonb, warm = $6, cold = $7,"
                " buckets = $8, total_ms = $9 WHERE tenant = $1 AND key = $2 AND version = $3",
                updates,
            )
            await conn.execute("DELETE FROM invocation_records WHERE seq <= $1", stored[-1].seq - max_records)
        return stored

    async def records(self, tenant: str, key: str, version: int | None, after: int | None,
                      limit: int) -> list[InvocationRecord]:
        """Newest ``limit`` after the cursor, oldest first."""
        sql = "SELECT seq, doc FROM invocation_records WHERE tenant = $1 AND key = $2 AND seq > $3"
        args: list[Any] = [tenant, key, after or 0]
        if version is not None:
            sql += " AND version = $4"
            args.append(version)
        sql += f" ORDER BY seq DESC LIMIT ${len(args) + 1}"
        args.append(max(0, limit))
        rows = await self.pool.fetch(sql, *args)
        out = []
        for row in reversed(rows):
            m = _unpack(row["doc"])
            m["seq"] = row["seq"]
            out.append(InvocationRecord.from_wire(m))
        return out

    async def tallies(self, tenant: str | None, key: str | None) -> list[tuple[str, str, int, Tally]]:
        """Tallies, sorted by tenant, function and version (``key`` counts only with a
        ``tenant``, as in the embedded store)."""
        sql = ("SELECT tenant, key, version, calls, errors, warm, cold, buckets, total_ms"
               " FROM invocation_tallies")
        args: list[Any] = []
        if tenant is not None:
            sql += " WHERE tenant = $1"
            args.append(tenant)
            if key is not None:
                sql += " AND key = $2"
                args.append(key)
        sql += " ORDER BY tenant, key, version"
        return [(row["tenant"], row["key"], row["version"], _tally(row))
                for row in await self.pool.fetch(sql, *args)]


def _tally(row: Any) -> Tally:
    """A tally from its row (a row inserted empty has no buckets yet: all zero)."""
    errors = json.loads(row["errors"]) if isinstance(row["errors"], str) else dict(row["errors"] or {})
    t = Tally(
        calls=int(row["calls"]),
        errors={str(k): int(v) for k, v in errors.items()},
        warm=int(row["warm"]),
        cold=int(row["cold"]),
        total_ms=float(row["total_ms"]),
    )
    # A histogram written with fewer bounds (an older server) keeps what it can.
    for i, n in enumerate(list(row["buckets"] or [])[: len(t.buckets)]):
        t.buckets[i] = int(n)
    return t
