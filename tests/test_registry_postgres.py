"""The registry in PostgreSQL across nodes (issue 14): each node has its own artifact cache and
learns of the others' writes through the database (LISTEN/NOTIFY, and the change feed when the
listener is lost). A real PostgreSQL (tests/_postgres.py); nothing is mocked.

The contract every backend keeps is in test_registry.py, which runs against PostgreSQL too.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from fnserver.protocol import NotFoundError
from fnserver.registry import Registry

from .test_registry import read, upload


class Nodes:
    def __init__(self, dsn: str, root: Path) -> None:
        self.dsn = dsn
        self.root = root
        self.open: list[Registry] = []

    async def node(self, name: str) -> Registry:
        reg = Registry.postgres(self.dsn, self.root / name)
        await reg.open()
        self.open.append(reg)
        return reg


@pytest.fixture
async def nodes(postgres_dsn: str, tmp_path: Path) -> AsyncIterator[Nodes]:
    n = Nodes(postgres_dsn, tmp_path)
    try:
        yield n
    finally:
        for reg in n.open:
            await reg.close()


async def until(check: object, what: str) -> None:
    """Wait for ``check()`` (bounded only to turn a hang into a failure)."""
    async with asyncio.timeout(60):
        while not check():  # type: ignore[operator]
            await asyncio.sleep(0.01)


async def test_a_version_registered_on_one_node_is_fetched_by_another(nodes: Nodes) -> None:
    a, b = await nodes.node("a"), await nodes.node("b")
    body = bytes(range(256)) * 9000  # over 2 MiB: several chunks each way
    info = await upload(a, "f", body, native=b"\x7fELF native", alias="prod")
    assert b.artifact_path(info, "wasm") != a.artifact_path(info, "wasm")
    await b.refresh()
    got = b.resolve("f", "prod")
    assert (got.version, got.aliases) == (1, ("prod",))
    assert read(b, got) == body and read(b, got, "native") == b"\x7fELF native"
    # A node started later serves everything at once.
    c = await nodes.node("c")
    assert read(c, c.resolve("f")) == body


def latest(reg: Registry, name: str) -> int | None:
    """The newest version ``reg``'s index holds for ``name`` (no I/O), or None."""
    try:
        return reg.resolve(name).version
    except NotFoundError:
        return None


async def test_another_nodes_write_reaches_the_index_by_itself(nodes: Nodes) -> None:
    a, b = await nodes.node("a"), await nodes.node("b")
    await upload(a, "f", b"pushed")
    # No refresh asked for: b's listener hears the NOTIFY and b refreshes on its own.
    await until(lambda: latest(b, "f") == 1, "node b's index has the version")
    assert read(b, b.resolve("f")) == b"pushed"  # and the artifact is in b's cache already
    await a.set_alias("f", "prod", 1)
    await until(lambda: b.get("f").aliases == {"prod": 1}, "the alias move reached node b")


async def test_a_lost_listener_catches_up(nodes: Nodes, postgres_dsn: str) -> None:
    a, b = await nodes.node("a"), await nodes.node("b")
    conn = await asyncpg.connect(postgres_dsn)
    try:
        # Cut every listening connection of this database (node a's and node b's).
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = 'fnserver-registry-listener'"
        )
    finally:
        await conn.close()
    await until(lambda: b.metadata.peek() is None, "node b saw its listener go")
    assert b.stale()  # cannot tell: every read looks at the feed first
    await upload(a, "f")  # its NOTIFY reaches nobody
    await b.refresh()
    assert latest(b, "f") == 1
    await until(lambda: b.metadata.peek() is not None, "node b listens again")
    await upload(a, "f")
    await until(lambda: latest(b, "f") == 2, "the next write reached node b by itself")


async def test_versions_allocated_on_two_nodes_at_once_are_distinct(nodes: Nodes) -> None:
    a, b = await nodes.node("a"), await nodes.node("b")
    made = await asyncio.gather(*(upload(r, "f", bytes([i])) for i in range(10) for r in (a, b)))
    assert sorted(v.version for v in made) == list(range(1, 21))
    await a.refresh()
    await b.refresh()
    assert a.list() == b.list() and a.get("f", limit=100) == b.get("f", limit=100)


async def test_a_delete_on_one_node_is_seen_by_another_and_frees_the_bytes(nodes: Nodes, postgres_dsn: str) -> None:
    a, b = await nodes.node("a"), await nodes.node("b")
    info = await upload(a, "f", b"only here")
    await b.refresh()
    await b.delete("f")
    await a.refresh()
    with pytest.raises(NotFoundError):
        a.resolve("f")
    digest = info.artifact_sha256["wasm"]
    conn = await asyncpg.connect(postgres_dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM reg_artifacts WHERE digest = $1", digest) == 0
        assert await conn.fetchval("SELECT count(*) FROM reg_artifact_chunks WHERE digest = $1", digest) == 0
    finally:
        await conn.close()
