"""The invocation store's contract, run against both backends: the embedded SQLite file and a
real PostgreSQL (``tests/_postgres.py`` starts one; nothing is mocked, nothing is skipped).

The first part is one set of tests for both; the second is what only a store shared by several
nodes has (two stores over one database stand for two nodes); the last checks the test
cluster itself.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path

import asyncpg
import pytest

from fnserver._pgschema import SchemaTooNewError
from fnserver.invocations import (
    InvocationStore,
    NewCall,
    PostgresInvocationStore,
    SqliteInvocationStore,
    Tally,
)
from fnserver.protocol import (
    LATENCY_BUCKETS_MS,
    CallError,
    InvocationRecord,
    InvokeRequest,
    InvokeResult,
)

from . import _postgres
from ._postgres import PostgresCluster


@dataclass
class Backend:
    """Makes stores over one backend's storage: each new store is another opener (a restart,
    or with PostgreSQL another node)."""

    name: str
    make: Callable[[], InvocationStore]

    async def open(self) -> InvocationStore:
        store = self.make()
        await store.open()
        return store


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        path = tmp_path / "calls.sqlite3"
        return Backend("sqlite", lambda: SqliteInvocationStore(path))
    dsn: str = request.getfixturevalue("postgres_dsn")
    return Backend("postgres", lambda: PostgresInvocationStore(dsn))


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[InvocationStore]:
    s = await backend.open()
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
def pg_backend(postgres_dsn: str) -> Backend:
    return Backend("postgres", lambda: PostgresInvocationStore(postgres_dsn))


def call(n: int | str, tenant: str = "default", created: float = 1000.0, name: str = "echo") -> NewCall:
    key = name if tenant == "default" else f"{tenant}/{name}"
    return NewCall(
        id=f"inv_{n:0>24}", tenant=tenant, role="invoker", token_id=f"tok_{tenant}",
        request=InvokeRequest(name=key, version=2, input=b"in\x00put", args=("-v", "x"), timeout_ms=500, async_=True),
        created=created,
    )


def record(n: int, tenant: str = "default", name: str = "echo", version: int = 1, *, wall_us: int = 2000,
           error: str | None = None, cold: bool = False) -> InvocationRecord:
    key = name if tenant == "default" else f"{tenant}/{name}"
    return InvocationRecord(
        id=f"inv_{n:024d}", tenant=tenant, name=key, version=version, mode="sync", runtime="wasm",
        started=1000.0 + n, queue_us=10, run_us=wall_us - 10, wall_us=wall_us,
        exit_code=None if error else 0, error=error, output_size=n, stderr_tail=b"tail\xff", cold=cold,
    )


async def _claim_ids(store: InvocationStore, limit: int, now: float, owner: str = "node-a", lease_s: float = 60) -> list[str]:
    return [c.id for c in await store.claim(owner, limit, lease_s, now)]


# -- async calls ---------------------------------------------------------------------------------


async def test_a_queued_call_is_found_by_its_id(store: InvocationStore) -> None:
    assert await store.enqueue(call(1, created=1234.5), max_queued=10)
    got = await store.status(call(1).id)
    assert got is not None
    assert (got.id, got.tenant, got.key, got.state, got.created) == (call(1).id, "default", "echo", "queued", 1234.5)
    assert (got.version, got.started, got.finished, got.attempts, got.result, got.error) == (None, None, None, 0, None, None)
    assert await store.status("inv_" + "f" * 24) is None
    assert await store.queued() == 1


async def test_a_full_queue_refuses_and_writes_nothing(store: InvocationStore) -> None:
    assert await store.enqueue(call(1), max_queued=2)
    assert await store.enqueue(call(2), max_queued=2)
    assert not await store.enqueue(call(3), max_queued=2)
    assert await store.status(call(3).id) is None
    assert await store.queued() == 2
    # Only calls that wait count: one running leaves room for one more.
    assert await _claim_ids(store, 1, now=2000) == [call(1).id]
    assert await store.enqueue(call(3), max_queued=2)
    assert await store.queued() == 2


async def test_a_claim_takes_a_call_once_under_a_lease(store: InvocationStore) -> None:
    await store.enqueue(call(1, tenant="acme", created=10.0), max_queued=10)
    [claimed] = await store.claim("node-a", 5, 30.0, 100.0)
    assert claimed.id == call(1).id
    assert (claimed.tenant, claimed.role, claimed.token_id, claimed.created, claimed.attempts) == ("acme", "invoker", "tok_acme", 10.0, 1)
    assert claimed.request == call(1, tenant="acme").request
    got = await store.status(claimed.id)
    assert got is not None and (got.state, got.started, got.attempts) == ("running", 100.0, 1)
    assert await store.queued() == 0
    assert await store.claim("node-b", 5, 30.0, 101.0) == []


async def test_a_call_whose_lease_ran_out_is_claimed_again(store: InvocationStore) -> None:
    await store.enqueue(call(1), max_queued=10)
    assert await _claim_ids(store, 1, now=100.0, lease_s=10.0) == [call(1).id]
    assert await _claim_ids(store, 1, now=110.0, owner="node-b") == []  # the lease runs until 110
    [again] = await store.claim("node-b", 1, 10.0, 110.5)
    assert (again.id, again.attempts) == (call(1).id, 2)
    got = await store.status(call(1).id)
    assert got is not None and (got.state, got.started, got.attempts) == ("running", 110.5, 2)
    # Running under a lease is not waiting.
    assert await store.queued() == 0


async def test_a_renewed_lease_is_kept_and_one_not_renewed_runs_out(store: InvocationStore) -> None:
    for n in (1, 2):
        await store.enqueue(call(n, created=float(n)), max_queued=10)
    assert await _claim_ids(store, 2, now=100.0, lease_s=10.0) == [call(1).id, call(2).id]
    # Call 1's lease is renewed before it runs out (now until 118); call 2's is not (until 110).
    assert await store.renew("node-a", [call(1).id], 10.0, 108.0) == [call(1).id]
    assert await _claim_ids(store, 5, now=111.0, owner="node-b") == [call(2).id]
    assert await _claim_ids(store, 5, now=118.0, owner="node-b") == []
    got = await store.status(call(1).id)
    assert got is not None and (got.state, got.started, got.attempts) == ("running", 100.0, 1)
    # Not renewed again: it runs out in its turn.
    [again] = await store.claim("node-b", 5, 10.0, 118.5)
    assert (again.id, again.attempts) == (call(1).id, 2)
    # The first owner holds neither now; the second holds both, named in the order asked.
    assert await store.renew("node-a", [call(1).id, call(2).id], 10.0, 119.0) == []
    unknown = "inv_" + "f" * 24
    assert await store.renew("node-b", [call(2).id, unknown, call(1).id], 10.0, 119.0) == [call(2).id, call(1).id]
    assert await store.renew("node-b", [], 10.0, 119.0) == []
    assert await _claim_ids(store, 5, now=128.5, owner="node-c") == []  # renewed until 129
    assert await _claim_ids(store, 5, now=129.5, owner="node-c") == [call(1).id, call(2).id]


async def test_only_the_holder_of_a_call_records_its_outcome(store: InvocationStore) -> None:
    await store.enqueue(call(1), max_queued=10)
    assert await _claim_ids(store, 1, now=100.0, lease_s=10.0) == [call(1).id]
    assert await _claim_ids(store, 1, now=111.0, owner="node-b") == [call(1).id]  # a's ran out
    late = InvokeResult(b"late", b"", 0, 1, 2)
    held = InvokeResult(b"held", b"", 0, 1, 2)
    # node-a's run finishes after losing the call: not recorded, the call still runs on b.
    assert not await store.complete(call(1).id, 2, late, None, 112.0, owner="node-a")
    got = await store.status(call(1).id)
    assert got is not None and (got.state, got.result, got.finished) == ("running", None, None)
    assert await store.complete(call(1).id, 2, held, None, 113.0, owner="node-b")
    # Nor after b's outcome: a result a client may have read is not replaced.
    assert not await store.complete(call(1).id, None, None, CallError("TIMEOUT", "too slow"), 114.0, owner="node-a")
    # The holder's outcome sent again (a retried request) is the same outcome.
    assert await store.complete(call(1).id, 2, held, None, 113.0, owner="node-b")
    done = await store.status(call(1).id)
    assert done is not None
    assert (done.state, done.result, done.error, done.finished, done.attempts) == ("done", held, None, 113.0, 2)
    # A finished call's lease is nobody's to renew.
    assert await store.renew("node-b", [call(1).id], 10.0, 115.0) == []
    assert not await store.complete("inv_" + "f" * 24, None, None, CallError("TRAP", "x"), 116.0, owner="node-b")


async def test_tenants_take_turns_oldest_first(store: InvocationStore) -> None:
    queued = [call("a1", "a", 1.0), call("a2", "a", 2.0), call("a3", "a", 3.0), call("a4", "a", 4.0),
              call("b1", "b", 5.0), call("b2", "b", 6.0), call("c1", "c", 7.0)]
    for c in reversed(queued):  # the order of arrival does not matter, their times do
        assert await store.enqueue(c, max_queued=100)
    ids = {c.id: c.id[-2:] for c in queued}
    first = await _claim_ids(store, 3, now=100.0)
    assert [ids[i] for i in first] == ["a1", "b1", "c1"]
    rest = await _claim_ids(store, 10, now=100.0)
    assert [ids[i] for i in rest] == ["a2", "b2", "a3", "a4"]


async def test_an_expired_lease_takes_its_turn_among_the_waiting(store: InvocationStore) -> None:
    await store.enqueue(call("a1", "a", 1.0), max_queued=10)
    assert await _claim_ids(store, 1, now=10.0, lease_s=5.0) == [call("a1").id]
    await store.enqueue(call("a2", "a", 2.0), max_queued=10)
    await store.enqueue(call("b1", "b", 3.0), max_queued=10)
    # a1's lease ran out: it is a's oldest again, ahead of a2; b takes its turn between.
    assert await _claim_ids(store, 3, now=20.0) == [call("a1").id, call("b1").id, call("a2").id]


async def test_an_outcome_is_kept_with_its_call(store: InvocationStore) -> None:
    for n in (1, 2):
        await store.enqueue(call(n), max_queued=10)
    await store.claim("node-a", 2, 60.0, 100.0)
    result = InvokeResult(output=b"out\x00", stderr=b"err", exit_code=3, duration_us=1500, version=2,
                          queue_us=7, wall_us=1600, mode="wasm", id=call(1).id, cold=True)
    await store.complete(call(1).id, 2, result, None, 105.0)
    await store.complete(call(2).id, None, None, CallError("NOT_FOUND", "no such function", {"name": "echo"}), 106.0)
    done = await store.status(call(1).id)
    assert done is not None
    assert (done.state, done.version, done.started, done.finished, done.attempts) == ("done", 2, 100.0, 105.0, 1)
    assert done.result == result and done.error is None
    failed = await store.status(call(2).id)
    assert failed is not None
    assert (failed.state, failed.version, failed.finished, failed.result) == ("failed", None, 106.0, None)
    assert failed.error == CallError("NOT_FOUND", "no such function", {"name": "echo"})
    # A later outcome without a version keeps the one known.
    await store.complete(call(1).id, None, None, CallError("TIMEOUT", "too slow"), 107.0)
    again = await store.status(call(1).id)
    assert again is not None and (again.state, again.version, again.result) == ("failed", 2, None)
    # Finished calls are not claimed again.
    assert await store.claim("node-a", 5, 60.0, 10_000.0) == []


async def test_expiry_forgets_finished_results_only(store: InvocationStore) -> None:
    for n in range(1, 5):
        await store.enqueue(call(n, created=float(n)), max_queued=10)
    await store.claim("node-a", 3, 1000.0, 5.0)  # 1, 2, 3 run; 4 waits
    await store.complete(call(1).id, 1, InvokeResult(b"", b"", 0, 1), None, 10.0)
    await store.complete(call(2).id, 1, None, CallError("TRAP", "trapped"), 20.0)
    assert await store.expire(15.0) == 1
    assert await store.status(call(1).id) is None
    assert await store.expire(15.0) == 0
    assert await store.expire(1e12) == 1
    states = [(await store.status(call(n).id)) for n in (2, 3, 4)]
    assert [s.state if s else None for s in states] == [None, "running", "queued"]


async def test_a_probe_writes(store: InvocationStore) -> None:
    await store.probe()
    await store.probe()


async def test_reopening_keeps_everything_and_decides_about_running_calls(backend: Backend) -> None:
    store = await backend.open()
    for n in (1, 2):
        await store.enqueue(call(n, created=float(n)), max_queued=10)
    assert await _claim_ids(store, 1, now=100.0, lease_s=50.0) == [call(1).id]
    [stored] = await store.add_records([record(1)], max_records=10)
    await store.close()

    store = await backend.open()
    try:
        assert await store.records("default", "echo", None, None, 10) == [stored]
        assert [t[:3] for t in await store.tallies(None, None)] == [("default", "echo", 1)]
        running = await store.status(call(1).id)
        assert running is not None
        if backend.name == "sqlite":
            # One owner: whoever ran it is gone with the process, so it waits again at once.
            assert (running.state, await store.queued()) == ("queued", 2)
            assert await _claim_ids(store, 5, now=101.0) == [call(1).id, call(2).id]
        else:
            # Shared: another node may be running it; it comes back when its lease runs out.
            assert (running.state, await store.queued()) == ("running", 1)
            assert await _claim_ids(store, 5, now=101.0) == [call(2).id]
            assert await _claim_ids(store, 5, now=151.0) == [call(1).id]
    finally:
        await store.close()


# -- records and tallies -------------------------------------------------------------------------


async def test_records_come_newest_last_after_a_cursor(store: InvocationStore) -> None:
    batch = [record(1, version=1), record(2, version=2), record(3, name="other"),
             record(4, tenant="acme"), record(5, version=1), record(6, version=2)]
    stored = await store.add_records(batch, max_records=100)
    seqs = [r.seq for r in stored]
    assert seqs == sorted(seqs) and len(set(seqs)) == 6 and seqs[0] > 0
    assert [r.id for r in stored] == [r.id for r in batch]
    assert stored[0].stderr_tail == b"tail\xff" and stored[0].seq != 0

    mine = [stored[0], stored[1], stored[4], stored[5]]
    assert await store.records("default", "echo", None, None, 100) == mine
    assert await store.records("default", "echo", None, None, 2) == mine[2:]  # the newest two
    assert await store.records("default", "echo", None, stored[1].seq, 100) == mine[2:]
    assert await store.records("default", "echo", 2, None, 100) == [stored[1], stored[5]]
    assert await store.records("default", "echo", 2, stored[5].seq, 100) == []
    assert await store.records("acme", "acme/echo", None, None, 100) == [stored[3]]
    assert await store.records("acme", "echo", None, None, 100) == []
    more = await store.add_records([record(7)], max_records=100)
    assert more[0].seq > stored[-1].seq
    assert await store.add_records([], max_records=100) == []


async def test_records_keep_the_newest_max_records(store: InvocationStore) -> None:
    kept: list[InvocationRecord] = []
    for b in range(3):
        kept += await store.add_records([record(b * 4 + i) for i in range(4)], max_records=6)
    assert await store.records("default", "echo", None, None, 100) == kept[-6:]


async def test_tallies_add_up_per_version(store: InvocationStore) -> None:
    await store.add_records([
        record(1, wall_us=800), record(2, wall_us=2_000, cold=True), record(3, wall_us=40_000, error="TIMEOUT"),
        record(4, version=2, wall_us=10**9), record(5, tenant="acme", wall_us=1_000),
    ], max_records=100)
    await store.add_records([record(6, wall_us=2_000, error="TIMEOUT"), record(7, wall_us=3_000, error="TRAP")],
                            max_records=100)
    rows = await store.tallies(None, None)
    assert [r[:3] for r in rows] == [("acme", "acme/echo", 1), ("default", "echo", 1), ("default", "echo", 2)]
    v1 = rows[1][3]
    expected = Tally()
    for r in [record(1, wall_us=800), record(2, wall_us=2_000, cold=True), record(3, wall_us=40_000, error="TIMEOUT"),
              record(6, wall_us=2_000, error="TIMEOUT"), record(7, wall_us=3_000, error="TRAP")]:
        expected.add(r)
    assert replace(v1, total_ms=0.0) == replace(expected, total_ms=0.0)
    assert (v1.calls, v1.errors, v1.warm, v1.cold) == (5, {"TIMEOUT": 2, "TRAP": 1}, 4, 1)
    assert v1.total_ms == pytest.approx(47.8)
    assert len(v1.buckets) == len(LATENCY_BUCKETS_MS) + 1 and sum(v1.buckets) == 5
    over = rows[2][3]
    assert over.buckets[-1] == 1  # past the last bound
    stats = v1.to_stats("default", "echo", 1)
    assert stats.p50_ms is not None and 1.5 <= stats.p50_ms <= 3.0

    assert [r[:3] for r in await store.tallies("default", None)] == [("default", "echo", 1), ("default", "echo", 2)]
    assert [r[:3] for r in await store.tallies("acme", "acme/echo")] == [("acme", "acme/echo", 1)]
    assert await store.tallies("acme", "echo") == []
    assert await store.tallies("nobody", None) == []
    # A function without its tenant means every tenant's, as the embedded store has it.
    assert len(await store.tallies(None, "echo")) == 3


# -- only a store shared by several nodes --------------------------------------------------------


async def test_a_call_queued_on_one_node_runs_on_another_and_its_result_is_everywhere(pg_backend: Backend) -> None:
    a, b = await pg_backend.open(), await pg_backend.open()
    try:
        assert await a.enqueue(call(1), max_queued=10)
        assert await b.queued() == 1
        [claimed] = await b.claim("node-b", 4, 60.0, 100.0)
        assert await a.claim("node-a", 4, 60.0, 100.0) == []
        await b.complete(claimed.id, 2, InvokeResult(b"ok", b"", 0, 10, version=2), None, 101.0)
        got = await a.status(call(1).id)
        assert got is not None and got.state == "done" and got.result is not None and got.result.output == b"ok"
        stored = await a.add_records([record(1)], max_records=10)
        assert await b.records("default", "echo", None, None, 10) == stored
        assert [t[3].calls for t in await b.tallies(None, None)] == [1]
    finally:
        await a.close()
        await b.close()


async def test_nodes_claiming_at_once_never_take_a_call_twice(pg_backend: Backend) -> None:
    nodes = [await pg_backend.open() for _ in range(4)]
    try:
        ids = set()
        for n in range(120):
            c = call(n, tenant=f"t{n % 3}", created=float(n))
            ids.add(c.id)
            assert await nodes[n % 4].enqueue(c, max_queued=1000)

        async def drain(i: int, node: InvocationStore) -> list[str]:
            taken: list[str] = []
            while got := await _claim_ids(node, 7, now=100.0, owner=f"node-{i}"):
                taken += got
            return taken

        per_node = await asyncio.gather(*(drain(i, node) for i, node in enumerate(nodes)))
        everything = [i for taken in per_node for i in taken]
        assert len(everything) == len(set(everything)) == 120
        assert set(everything) == ids
        assert await nodes[0].queued() == 0
    finally:
        for node in nodes:
            await node.close()


async def test_nodes_queueing_at_once_respect_max_queued(pg_backend: Backend) -> None:
    nodes = [await pg_backend.open() for _ in range(6)]
    try:
        for n in range(45):
            assert await nodes[0].enqueue(call(f"x{n:03d}"), max_queued=50)

        async def flood(i: int, node: InvocationStore) -> int:
            tries = [node.enqueue(call(f"{i}{n:03d}"), max_queued=50) for n in range(3)]
            return sum(await asyncio.gather(*tries))

        # Eighteen calls arrive at once for the five places left.
        assert sum(await asyncio.gather(*(flood(i, node) for i, node in enumerate(nodes)))) == 5
        assert await nodes[0].queued() == 50
    finally:
        for node in nodes:
            await node.close()


async def test_nodes_recording_at_once_lose_no_count(pg_backend: Backend) -> None:
    nodes = [await pg_backend.open() for _ in range(3)]
    try:
        async def report(i: int, node: InvocationStore) -> None:
            for b in range(10):
                # Two versions in opposite orders: row locks taken in one order, no deadlock.
                batch = [record(i * 100 + b, version=1), record(i * 100 + b, version=2, error="TRAP")]
                await node.add_records(batch if i % 2 else batch[::-1], max_records=1000)

        await asyncio.gather(*(report(i, node) for i, node in enumerate(nodes)))
        rows = await nodes[0].tallies("default", "echo")
        assert [(r[2], r[3].calls, r[3].errors) for r in rows] == [(1, 30, {}), (2, 30, {"TRAP": 30})]
        assert len(await nodes[0].records("default", "echo", None, None, 1000)) == 60
    finally:
        for node in nodes:
            await node.close()


async def test_nodes_opening_at_once_migrate_the_schema_once(postgres_dsn: str) -> None:
    stores = [PostgresInvocationStore(postgres_dsn) for _ in range(4)]
    await asyncio.gather(*(s.open() for s in stores))
    for s in stores:
        await s.close()
    conn = await asyncpg.connect(postgres_dsn)
    try:
        rows = await conn.fetch("SELECT component, version FROM schema_migrations ORDER BY version")
        assert [tuple(r) for r in rows] == [("invocations", 1)]
        # A database that a newer fnserver migrated is refused, not misread.
        await conn.execute("INSERT INTO schema_migrations VALUES ('invocations', 99, 0)")
    finally:
        await conn.close()
    newer = PostgresInvocationStore(postgres_dsn)
    with pytest.raises(SchemaTooNewError, match=r"\[99\]"):
        await newer.open()
    with pytest.raises(RuntimeError, match="not open"):
        await newer.queued()


async def test_a_store_without_its_database_fails_to_open(postgres_cluster: PostgresCluster) -> None:
    store = PostgresInvocationStore(postgres_cluster.dsn("no_such_database"))
    with pytest.raises(asyncpg.InvalidCatalogNameError):
        await store.open()


# -- the test cluster ----------------------------------------------------------------------------


async def test_the_cluster_is_a_real_server_that_does_not_run_as_root(postgres_cluster: PostgresCluster, postgres_dsn: str) -> None:
    assert postgres_dsn.startswith(f"postgresql://{postgres_cluster.user}@127.0.0.1:{postgres_cluster.port}/fntest_")
    conn = await asyncpg.connect(postgres_dsn)
    try:
        assert await conn.fetchval("SHOW fsync") == "off"
        assert await conn.fetchval("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == 0
        backend_pid = await conn.fetchval("SELECT pg_backend_pid()")
        # Read while the connection is open: its backend process exits with it.
        uid = next(int(line.split()[1]) for line in Path(f"/proc/{backend_pid}/status").read_text().splitlines()
                   if line.startswith("Uid:"))
    finally:
        await conn.close()
    assert uid != 0 and (os.geteuid() != 0 or uid == _postgres.pwd.getpwnam(_postgres.SERVER_USER).pw_uid)
    assert postgres_cluster.running and (postgres_cluster.root / "data" / "PG_VERSION").is_file()


def test_no_postgresql_and_no_way_to_install_it_is_a_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_postgres, "find_bin_dir", lambda: None)
    monkeypatch.setattr(_postgres.os, "geteuid", lambda: 1000)
    with pytest.raises(RuntimeError, match="apt-get install postgresql"):
        _postgres.postgres_bin_dir()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_cluster_stops_and_leaves_nothing_behind() -> None:
    cluster = _postgres.start_cluster()
    proc = cluster._proc
    assert proc is not None and cluster.running
    children = _postgres._children(proc.pid)
    assert children  # the checkpointer, the WAL writer...
    cluster.stop()
    assert proc.poll() is not None and not cluster.running and not cluster.root.exists()
    assert not any(_alive(pid) for pid in children)
    cluster.stop()  # twice is harmless


def test_a_cluster_that_does_not_stop_in_time_is_killed(monkeypatch: pytest.MonkeyPatch) -> None:
    cluster = _postgres.start_cluster()
    proc = cluster._proc
    assert proc is not None
    children = _postgres._children(proc.pid)
    os.kill(proc.pid, signal.SIGSTOP)  # deaf to the shutdown request
    monkeypatch.setattr(_postgres, "_STOP_TIMEOUT_S", 0.5)
    cluster.stop()
    assert proc.poll() is not None and not cluster.root.exists()
    assert not any(_alive(pid) for pid in children)
