"""The registry in PostgreSQL (issue 14): metadata and artifacts shared by every node.

:class:`PostgresMetadataStore` keeps the SQLite backend's four tables in PostgreSQL and does each
write in one transaction. Every write first takes one transaction-scoped advisory lock, so
writes commit in the order of the generations they draw from the change feed's sequence: a
reader that saw generation N has seen every write numbered up to N (without the lock, a write
numbered 5 could commit after one numbered 6, and a reader that moved its cursor to 6 would
never see it). Writes are rare (registers, aliases, deletes); reads take no lock. Each write
also sends ``NOTIFY fnserver_registry, '<generation>'`` (delivered at commit); a dedicated
listening connection turns those into :meth:`peek`'s hint, so every node's index learns of a
change at once. When that connection is lost, :meth:`peek` says "cannot tell" (None), which
makes the registry look at the feed before each read until the listener is back: it catches
up, never misses.

:class:`PostgresArtifactStore` keeps artifact bytes content-addressed in PostgreSQL, in 1 MiB
chunks streamed in and out (never one value the size of an artifact), and a local cache of
them on each node at ``<root>/<digest[:2]>/<digest>`` (the digest store's layout, which it
extends): ``put`` writes both before the version is committed, :meth:`fetch` brings a
digest another node stored into the cache before the registry shows its version.

Migrations are those of ``fnserver/_pgschema.py`` (component ``registry``): numbered, recorded,
applied at open under an advisory lock, so two nodes starting at once apply each exactly once.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import secrets
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

import asyncpg

from fnserver.protocol import InternalError, UnavailableError

from .. import _pgschema
from . import _fs
from ._interfaces import Deleted, FunctionRecord, no_function, no_version
from ._meta import artifact_digests
from ._sqlite import DigestArtifactStore

__all__ = ["PostgresArtifactStore", "PostgresMetadataStore", "connect_pool"]

log = logging.getLogger("fnserver.registry")

CHANNEL: Final = "fnserver_registry"
#: The listening connection's ``application_name`` (what ``pg_stat_activity`` shows).
LISTENER_NAME: Final = "fnserver-registry-listener"
#: The advisory lock key every registry write takes: "fnsv" and "regw" in ASCII.
_WRITE_LOCK: Final = 0x666E7376_72656777
CHUNK: Final = 1024 * 1024
#: How long closing waits for the pool's connections before it cuts them.
CLOSE_TIMEOUT_S: Final = 10.0
#: How long a serving process waits for its node's writer to fetch an artifact.
READER_WAIT_S: Final = 30.0

#: Schema migrations (``fnserver/_pgschema.py``), component ``registry``. Never edit one that
#: shipped: add the next.
MIGRATIONS: Final[tuple[tuple[int, str], ...]] = (
    (1, """
    CREATE TABLE reg_functions (name text PRIMARY KEY, next_version integer NOT NULL);
    CREATE TABLE reg_versions (
        name text NOT NULL, version integer NOT NULL, doc text NOT NULL,
        PRIMARY KEY (name, version));
    CREATE TABLE reg_artifact_refs (
        digest text NOT NULL, name text NOT NULL, version integer NOT NULL,
        PRIMARY KEY (digest, name, version));
    CREATE INDEX reg_artifact_refs_by_version ON reg_artifact_refs (name, version);
    CREATE TABLE reg_aliases (
        name text NOT NULL, alias text NOT NULL, version integer NOT NULL,
        PRIMARY KEY (name, alias));
    CREATE SEQUENCE reg_generation;
    CREATE TABLE reg_changes (name text PRIMARY KEY, generation bigint NOT NULL);
    CREATE TABLE reg_artifacts (digest text PRIMARY KEY, size bigint NOT NULL, chunks integer NOT NULL);
    CREATE TABLE reg_artifact_chunks (
        digest text NOT NULL REFERENCES reg_artifacts (digest) ON DELETE CASCADE,
        seq integer NOT NULL, data bytea NOT NULL, PRIMARY KEY (digest, seq));
    """),
)


async def connect_pool(dsn: str) -> asyncpg.Pool:
    """A small connection pool to ``dsn``; UNAVAILABLE (without the password) if unreachable."""
    try:
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=4, command_timeout=60)
    except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
        raise UnavailableError(f"cannot reach the registry database: {type(exc).__name__}: {exc}") from None
    assert pool is not None
    return pool


class PostgresMetadataStore:
    """Function records in PostgreSQL (see the module docstring)."""

    def __init__(self, dsn: str, *, read_only: bool = False) -> None:
        self.dsn = dsn
        #: A reader only (a serving process): it applies no migration.
        self.read_only = read_only
        #: Set by each notified write (another node's or this one's).
        self.changed = asyncio.Event()
        self._pool: asyncpg.Pool | None = None
        self._listener: asyncpg.Connection | None = None
        self._notified: int | None = None
        self._listen_task: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise InternalError("the metadata store is closed")
        return self._pool

    async def open(self) -> None:
        """Connect, apply migrations, start listening for other nodes' writes."""
        if self._pool is not None:
            return
        self._closing = False
        self._pool = await connect_pool(self.dsn)
        if not self.read_only:
            async with self._pool.acquire() as conn:
                await _pgschema.migrate(conn, "registry", MIGRATIONS)
        await self._listen()
        self._listen_task = asyncio.ensure_future(self._keep_listening())

    async def close(self) -> None:
        """Stop listening, close the pool; idempotent."""
        self._closing = True
        if self._listen_task is not None:
            self._listen_task.cancel()
            await asyncio.wait([self._listen_task])
            self._listen_task = None
        await self._unlisten()
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                # close() waits for every connection to come back; one held by a request that
                # never finishes must not hold the shutdown.
                await asyncio.wait_for(pool.close(), CLOSE_TIMEOUT_S)
            except (TimeoutError, OSError, asyncpg.PostgresError):
                pool.terminate()

    # -- the change feed's push half ------------------------------------------------------

    async def _listen(self) -> None:
        """LISTEN first, then read the top generation: a write between the two is both
        notified and read, never neither."""
        try:
            conn = await asyncpg.connect(self.dsn, server_settings={"application_name": LISTENER_NAME})
            await conn.add_listener(CHANNEL, self._on_notify)
            top = await conn.fetchval("SELECT coalesce(max(generation), 0) FROM reg_changes")
        except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
            log.warning("registry: cannot listen for changes (%s); reading the feed before each read", exc)
            return
        self._listener = conn
        self._notified = max(self._notified or 0, int(top))

    async def _unlisten(self) -> None:
        conn, self._listener = self._listener, None
        self._notified = None
        if conn is not None and not conn.is_closed():
            try:
                await asyncio.wait_for(conn.close(), 5)
            except (TimeoutError, OSError, asyncpg.PostgresError):
                conn.terminate()

    async def _keep_listening(self) -> None:
        """Reconnect the listener whenever it is lost (the hint is None meanwhile)."""
        while not self._closing:
            await asyncio.sleep(1.0)  # a tick, not a synchronisation
            conn = self._listener
            if conn is None or conn.is_closed():
                await self._unlisten()
                await self._listen()

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        try:
            generation = int(payload)
        except ValueError:
            return
        if self._notified is not None and generation > self._notified:
            self._notified = generation
            self.changed.set()

    def peek(self) -> int | None:
        """The newest generation a write notified, while the listener is up; no I/O."""
        conn = self._listener
        if conn is None or conn.is_closed():
            return None
        return self._notified

    async def changes(self, since: int | None) -> tuple[int, frozenset[str] | None]:
        """Names whose rows carry a generation above ``since``."""
        async with self._reading("read the change feed") as conn:
            top = int(await conn.fetchval("SELECT coalesce(max(generation), 0) FROM reg_changes"))
            if self._notified is not None and top > self._notified:
                # The hint is never behind what was read: a NOTIFY still on its way must not
                # make a caught-up index look stale.
                self._notified = top
            if since is None or top < since:
                return (top, None)
            if top == since:
                return (top, frozenset())
            rows = await conn.fetch("SELECT name FROM reg_changes WHERE generation > $1 AND generation <= $2", since, top)
        return (top, frozenset(r["name"] for r in rows))

    # -- reads --------------------------------------------------------------------------------

    @asynccontextmanager
    async def _reading(self, what: str) -> AsyncIterator[asyncpg.Connection]:
        try:
            async with self.pool.acquire() as conn:
                yield conn
        except asyncpg.PostgresError as exc:
            raise InternalError(f"could not {what}: {exc}") from exc
        except (TimeoutError, OSError) as exc:
            raise UnavailableError(f"could not {what}: the registry database is unreachable") from exc

    async def load(self, name: str) -> FunctionRecord | None:
        """One name's record."""
        return (await self._read([name])).get(name)

    async def load_all(self) -> dict[str, FunctionRecord]:
        """Every name's record."""
        return await self._read(None)

    async def names(self) -> list[str]:
        """Every known name, tombstones included."""
        async with self._reading("list functions") as conn:
            return [r["name"] for r in await conn.fetch("SELECT name FROM reg_functions ORDER BY name")]

    async def digests_in_use(self, digests: Iterable[str]) -> frozenset[str]:
        """Those of ``digests`` some recorded version refers to."""
        wanted = list(dict.fromkeys(digests))
        async with self._reading("check artifact references") as conn:
            rows = await conn.fetch("SELECT DISTINCT digest FROM reg_artifact_refs WHERE digest = ANY($1::text[])", wanted)
        return frozenset(r["digest"] for r in rows)

    async def _read(self, names: list[str] | None) -> dict[str, FunctionRecord]:
        """Records of ``names`` (None: all) from one snapshot (a repeatable-read transaction)."""
        where, args = ("", []) if names is None else (" WHERE name = ANY($1::text[])", [names])
        async with self._reading("read the registry") as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            counters = {r["name"]: r["next_version"] for r in await conn.fetch(f"SELECT name, next_version FROM reg_functions{where}", *args)}
            docs: dict[str, dict[int, dict[str, Any]]] = {}
            for r in await conn.fetch(f"SELECT name, version, doc FROM reg_versions{where} ORDER BY name, version", *args):
                try:
                    doc = json.loads(r["doc"])
                except ValueError:
                    log.warning("ignoring version %d of %r: unreadable record", r["version"], r["name"])
                    continue
                docs.setdefault(r["name"], {})[r["version"]] = doc
            aliases: dict[str, dict[str, int]] = {}
            for r in await conn.fetch(f"SELECT name, alias, version FROM reg_aliases{where} ORDER BY name, alias", *args):
                aliases.setdefault(r["name"], {})[r["alias"]] = r["version"]
        return {
            name: FunctionRecord(name=name, next_version=counter, versions=docs.get(name, {}), aliases=aliases.get(name, {}))
            for name, counter in sorted(counters.items())
        }

    # -- writes -------------------------------------------------------------------------------

    @asynccontextmanager
    async def _writing(self, what: str) -> AsyncIterator[asyncpg.Connection]:
        """One write transaction holding the write lock (see the module docstring)."""
        async with self._reading(what) as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _WRITE_LOCK)
            yield conn

    @staticmethod
    async def _touch(conn: asyncpg.Connection, name: str) -> None:
        generation = await conn.fetchval(
            "INSERT INTO reg_changes (name, generation) VALUES ($1, nextval('reg_generation'))"
            " ON CONFLICT (name) DO UPDATE SET generation = excluded.generation RETURNING generation",
            name,
        )
        await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, str(generation))

    async def put_version(self, name: str, doc: Mapping[str, Any], *, alias: str | None = None) -> int:
        """Allocate the number, then record the version: the number is burnt even if the
        record then fails, as in the other stores."""
        digests = artifact_digests(doc)
        if not digests:
            raise InternalError(f"could not store a version of {name!r}: it names no artifact")
        async with self._writing(f"store a version of {name!r}") as conn:
            await conn.execute("INSERT INTO reg_functions (name, next_version) VALUES ($1, 1) ON CONFLICT (name) DO NOTHING", name)
            version = int(await conn.fetchval(
                "UPDATE reg_functions SET next_version = next_version + 1 WHERE name = $1 RETURNING next_version - 1", name))
            await self._touch(conn, name)
        async with self._writing(f"store version {version} of {name!r}") as conn:
            text = json.dumps({**doc, "name": name, "version": version}, sort_keys=True)
            await conn.execute("INSERT INTO reg_versions (name, version, doc) VALUES ($1, $2, $3)", name, version, text)
            await conn.executemany(
                "INSERT INTO reg_artifact_refs (digest, name, version) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                [(d, name, version) for d in sorted(set(digests.values()))],
            )
            if alias is not None:
                await _set_alias(conn, name, alias, version)
            await self._touch(conn, name)
        return version

    async def set_alias(self, name: str, alias: str, version: int) -> int | None:
        """Create or move an alias in one transaction."""
        async with self._writing(f"record alias {alias!r} of {name!r}") as conn:
            versions = await _versions(conn, name)
            if not versions:
                raise no_function(name)
            if version not in versions:
                raise no_version(name, versions, version)
            before = await conn.fetchval("SELECT version FROM reg_aliases WHERE name = $1 AND alias = $2", name, alias)
            await _set_alias(conn, name, alias, version)
            await self._touch(conn, name)
        return int(before) if before is not None else None

    async def delete(self, name: str, version: int | None = None) -> Deleted:
        """Delete one or every version of ``name`` and their aliases, in one transaction."""
        async with self._writing(f"delete {name!r}") as conn:
            versions = await _versions(conn, name)
            if not versions:
                raise no_function(name)
            if version is not None and version not in versions:
                raise no_version(name, versions, version)
            gone = versions if version is None else [version]
            removed = tuple(r["alias"] for r in await conn.fetch(
                "SELECT alias FROM reg_aliases WHERE name = $1 AND version = ANY($2::int[]) ORDER BY alias", name, gone))
            digests = frozenset(r["digest"] for r in await conn.fetch(
                "SELECT digest FROM reg_artifact_refs WHERE name = $1 AND version = ANY($2::int[])", name, gone))
            for table in ("reg_aliases", "reg_artifact_refs", "reg_versions"):
                await conn.execute(f"DELETE FROM {table} WHERE name = $1 AND version = ANY($2::int[])", name, gone)
            await self._touch(conn, name)
        return Deleted(versions=tuple(gone), aliases_removed=removed, digests=digests)


async def _set_alias(conn: asyncpg.Connection, name: str, alias: str, version: int) -> None:
    await conn.execute(
        "INSERT INTO reg_aliases (name, alias, version) VALUES ($1, $2, $3)"
        " ON CONFLICT (name, alias) DO UPDATE SET version = excluded.version",
        name, alias, version,
    )


async def _versions(conn: asyncpg.Connection, name: str) -> list[int]:
    return [r["version"] for r in await conn.fetch("SELECT version FROM reg_versions WHERE name = $1 ORDER BY version", name)]


class PostgresArtifactStore(DigestArtifactStore):
    """Artifacts in PostgreSQL by digest, cached on this node's disk (module docstring).

    Shares the metadata store's pool: the registry opens the metadata store first.
    """

    def __init__(self, metadata: PostgresMetadataStore, root: Path, staging: Path, *,
                 read_only: bool = False) -> None:
        super().__init__(root, staging)
        self.metadata = metadata
        #: A reader of the node's cache that cannot write it (a serving process): it waits
        #: for the node's writer to fetch what it needs.
        self.read_only = read_only

    async def open(self) -> None:
        """Create the cache and staging directories (a reader finds them made)."""
        if not self.read_only:
            await super().open()

    async def put(self, digest: str, source: Path) -> None:
        """Into the local cache (checked against the digest), then into the database in
        chunks, unless it holds those bytes already."""
        await super().put(digest, source)
        pool = self.metadata.pool
        async with pool.acquire() as conn, conn.transaction():
            # Two nodes putting the same digest: the second waits here, then finds it stored.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", digest)
            if await conn.fetchval("SELECT 1 FROM reg_artifacts WHERE digest = $1", digest):
                return
            size = await asyncio.to_thread(lambda: self.path(digest).stat().st_size)
            chunks = 0
            await conn.execute("INSERT INTO reg_artifacts (digest, size, chunks) VALUES ($1, $2, 0)", digest, size)
            async for data in _read_chunks(self.path(digest)):
                await conn.execute("INSERT INTO reg_artifact_chunks (digest, seq, data) VALUES ($1, $2, $3)", digest, chunks, data)
                chunks += 1
            await conn.execute("UPDATE reg_artifacts SET chunks = $2 WHERE digest = $1", digest, chunks)

    async def fetch(self, digests: Iterable[str]) -> None:
        """Bring each digest into the local cache if it is not there yet (from the database,
        chunk by chunk, checked against its digest). A digest the database does not hold is
        logged and skipped: its version cannot run here, and says so when invoked."""
        for digest in dict.fromkeys(digests):
            target = self.path(digest)
            if await asyncio.to_thread(target.exists):
                continue
            if self.read_only:
                await self._wait_for(target)
                continue
            try:
                await self._fetch(digest, target)
            except (OSError, asyncpg.PostgresError, ValueError) as exc:
                log.warning("registry: could not fetch artifact %s: %s", digest, exc)

    async def _wait_for(self, target: Path) -> None:
        """A reader's fetch: the node's writer follows the same notifications and fetches
        the file; wait for it, up to ``READER_WAIT_S`` (then the version shows, and an
        invoke of it says its artifact is missing)."""
        deadline = asyncio.get_running_loop().time() + READER_WAIT_S
        while not await asyncio.to_thread(target.exists):
            if asyncio.get_running_loop().time() > deadline:
                log.warning("registry: artifact %s did not reach this node's cache", target.name)
                return
            await asyncio.sleep(0.02)  # polling a file another process writes

    async def _fetch(self, digest: str, target: Path) -> None:
        await asyncio.to_thread(target.parent.mkdir, exist_ok=True)
        tmp = target.with_name(f"{digest}.{secrets.token_hex(6)}{_fs.TMP_SUFFIX}")
        pool = self.metadata.pool
        hasher = hashlib.sha256()
        try:
            fd = await asyncio.to_thread(os.open, tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                async with pool.acquire() as conn:
                    chunks = await conn.fetchval("SELECT chunks FROM reg_artifacts WHERE digest = $1", digest)
                    if chunks is None:
                        raise ValueError("the database does not hold it")
                    for seq in range(chunks):  # one chunk in memory at a time
                        data = await conn.fetchval(
                            "SELECT data FROM reg_artifact_chunks WHERE digest = $1 AND seq = $2", digest, seq)
                        if data is None:
                            raise ValueError(f"chunk {seq} is missing")
                        hasher.update(data)
                        await asyncio.to_thread(os.write, fd, data)
                await asyncio.to_thread(os.fsync, fd)
            finally:
                await asyncio.to_thread(os.close, fd)
            if hasher.hexdigest() != digest:
                raise ValueError("its bytes do not match its digest")
            await asyncio.to_thread(os.replace, tmp, target)
        finally:
            await asyncio.to_thread(lambda: tmp.unlink(missing_ok=True))

    async def forget(self, digest: str) -> None:
        """Delete ``digest`` from the database (unless a version took it again meanwhile) and
        from this node's cache."""
        pool = self.metadata.pool
        try:
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _WRITE_LOCK)
                if not await conn.fetchval("SELECT 1 FROM reg_artifact_refs WHERE digest = $1 LIMIT 1", digest):
                    await conn.execute("DELETE FROM reg_artifacts WHERE digest = $1", digest)
        except (OSError, asyncpg.PostgresError) as exc:
            log.warning("could not remove artifact %s from the database: %s", digest, exc)
        await super().forget(digest)


async def _read_chunks(path: Path) -> AsyncIterator[bytes]:
    fd = await asyncio.to_thread(os.open, path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        while data := await asyncio.to_thread(os.read, fd, CHUNK):
            yield data
    finally:
        await asyncio.to_thread(os.close, fd)
