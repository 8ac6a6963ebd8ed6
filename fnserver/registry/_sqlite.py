"""A second backend proving the seam: SQLite metadata and a digest-addressed artifact directory.

:class:`SqliteMetadataStore` keeps what ``function.json`` and ``meta.json`` keep in the local
layout in four tables of one database (WAL mode, so readers never wait for the writer), and
does each write in one ``BEGIN IMMEDIATE`` transaction: allocating a version number and
recording the version is one statement group that commits or does not, which is the shape the
PostgreSQL store will have. The change feed is a table with one row per name, re-inserted with
a fresh AUTOINCREMENT generation by every write; the cursor is the highest generation seen.
Several processes may share the database file: SQLite's own locks serialise their writers.

:class:`DigestArtifactStore` keeps each artifact once, at ``<root>/<digest[:2]>/<digest>``,
and the staging area at ``<staging>/``; ``path(digest)`` is pure arithmetic.

The stdlib ``sqlite3`` module blocks, so every call runs in a worker thread. One connection
per store, used by one thread at a time (a lock), is enough: SQLite serialises writers anyway.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import sqlite3
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Final, TypeVar

from fnserver.protocol import InternalError

from . import _fs
from ._interfaces import Deleted, FunctionRecord, no_function, no_version
from ._meta import artifact_digests

__all__ = ["DigestArtifactStore", "SqliteMetadataStore"]

log = logging.getLogger("fnserver.registry")

T = TypeVar("T")

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS functions (
    name TEXT PRIMARY KEY,
    next_version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS versions (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    doc TEXT NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS artifact_refs (
    digest TEXT NOT NULL,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (digest, name, version)
);
CREATE TABLE IF NOT EXISTS aliases (
    name TEXT NOT NULL,
    alias TEXT NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (name, alias)
);
CREATE TABLE IF NOT EXISTS changes (
    generation INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE
);
"""


class SqliteMetadataStore:
    """Function records in one SQLite database file (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        # Stored inside each write transaction, under SQLite's write lock, so hints from
        # several processes are stored in generation order (see _fs.GenerationHint).
        self._hint = _fs.GenerationHint(self.path.with_suffix(".generation"))

    async def open(self) -> None:
        """Create the database and its tables if they are missing."""
        if self._db is None:
            await asyncio.to_thread(self._open)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we write BEGIN/COMMIT ourselves, so a transaction is exactly
        # the statements we group; check_same_thread=False: worker threads take turns.
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=60)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
            self._hint.open()
        except BaseException:
            db.close()
            raise
        self._db = db

    async def close(self) -> None:
        """Close the connection; idempotent."""
        db, self._db = self._db, None
        if db is not None:
            await asyncio.to_thread(db.close)
        self._hint.close()

    async def _run(self, what: str, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in a thread with the connection; storage errors become InternalError."""

        def call() -> T:
            with self._lock:
                if self._db is None:
                    raise InternalError(f"could not {what}: the metadata store is closed")
                try:
                    return fn(self._db)
                except sqlite3.Error as exc:
                    raise InternalError(f"could not {what}: {exc}") from exc
                except OSError as exc:
                    raise _fs.storage_error(what, exc) from exc

        return await asyncio.to_thread(call)

    # -- reads --------------------------------------------------------------------------------

    async def load(self, name: str) -> FunctionRecord | None:
        """One name's record."""
        return await self._run(f"read {name!r}", lambda db: _read(db, [name]).get(name))

    async def load_all(self) -> dict[str, FunctionRecord]:
        """Every name's record."""
        return await self._run("read the registry", lambda db: _read(db, None))

    async def names(self) -> list[str]:
        """Every known name, tombstones included."""
        return await self._run(
            "list functions",
            lambda db: [r[0] for r in db.execute("SELECT name FROM functions ORDER BY name")],
        )

    async def digests_in_use(self, digests: Iterable[str]) -> frozenset[str]:
        """Those of ``digests`` some recorded version refers to."""
        wanted = list(dict.fromkeys(digests))

        def query(db: sqlite3.Connection) -> frozenset[str]:
            return frozenset(
                d
                for d in wanted
                if db.execute(
                    "SELECT 1 FROM artifact_refs WHERE digest = ? LIMIT 1", (d,)
                ).fetchone()
            )

        return await self._run("check artifact references", query)

    def peek(self) -> int | None:
        """The newest generation a writer stored in the mapped hint file; no I/O."""
        return self._hint.read()

    async def changes(self, since: int | None) -> tuple[int, frozenset[str] | None]:
        """Names whose rows carry a generation above ``since``."""

        def query(db: sqlite3.Connection) -> tuple[int, frozenset[str] | None]:
            row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'changes'").fetchone()
            top = int(row[0]) if row else 0
            if since is None or top < since:
                return (top, None)
            if top == since:
                return (top, frozenset())
            rows = db.execute("SELECT name FROM changes WHERE generation > ?", (since,))
            return (top, frozenset(r[0] for r in rows))

        return await self._run("read the change feed", query)

    # -- writes -------------------------------------------------------------------------------

    async def put_version(
        self, name: str, doc: Mapping[str, Any], *, alias: str | None = None
    ) -> int:
        """Allocate and record in one transaction."""
        digests = artifact_digests(doc)
        if not digests:
            raise InternalError(f"could not store a version of {name!r}: it names no artifact")

        def txn(db: sqlite3.Connection) -> int:
            # The counter moves in its own transaction first, so a version whose record then
            # fails to commit still burns its number (the local store does the same).
            with _transaction(db):
                db.execute(
                    "INSERT INTO functions (name, next_version) VALUES (?, 1)"
                    " ON CONFLICT (name) DO NOTHING",
                    (name,),
                )
                (version,) = db.execute(
                    "UPDATE functions SET next_version = next_version + 1 WHERE name = ?"
                    " RETURNING next_version - 1",
                    (name,),
                ).fetchone()
                _touch(db, name, self._hint)
            try:
                with _transaction(db):
                    text = json.dumps({**doc, "name": name, "version": version}, sort_keys=True)
                    db.execute(
                        "INSERT INTO versions (name, version, doc) VALUES (?, ?, ?)",
                        (name, version, text),
                    )
                    db.executemany(
                        "INSERT OR IGNORE INTO artifact_refs (digest, name, version) VALUES (?, ?, ?)",
                        [(d, name, version) for d in set(digests.values())],
                    )
                    if alias is not None:
                        _set_alias(db, name, alias, version)
                    _touch(db, name, self._hint)
            except sqlite3.Error as exc:
                raise InternalError(
                    f"could not store version {version} of {name!r}: {exc}"
                ) from exc
            return int(version)

        return await self._run(f"store a version of {name!r}", txn)

    async def set_alias(self, name: str, alias: str, version: int) -> int | None:
        """Create or move an alias in one transaction."""

        def txn(db: sqlite3.Connection) -> int | None:
            with _transaction(db):
                versions = _versions(db, name)
                if not versions:
                    raise no_function(name)
                if version not in versions:
                    raise no_version(name, versions, version)
                row = db.execute(
                    "SELECT version FROM aliases WHERE name = ? AND alias = ?", (name, alias)
                ).fetchone()
                _set_alias(db, name, alias, version)
                _touch(db, name, self._hint)
                return int(row[0]) if row else None

        return await self._run(f"record alias {alias!r} of {name!r}", txn)

    async def delete(self, name: str, version: int | None = None) -> Deleted:
        """Delete one or every version of ``name`` and their aliases, in one transaction."""

        def txn(db: sqlite3.Connection) -> Deleted:
            with _transaction(db):
                versions = _versions(db, name)
                if not versions:
                    raise no_function(name)
                if version is not None and version not in versions:
                    raise no_version(name, versions, version)
                gone = versions if version is None else [version]
                marks = ",".join("?" * len(gone))
                removed = tuple(
                    r[0]
                    for r in db.execute(
                        f"SELECT alias FROM aliases WHERE name = ? AND version IN ({marks})"
                        " ORDER BY alias",
                        (name, *gone),
                    )
                )
                digests = frozenset(
                    r[0]
                    for r in db.execute(
                        f"SELECT digest FROM artifact_refs WHERE name = ? AND version IN ({marks})",
                        (name, *gone),
                    )
                )
                for table in ("aliases", "artifact_refs", "versions"):
                    db.execute(
                        f"DELETE FROM {table} WHERE name = ? AND version IN ({marks})",
                        (name, *gone),
                    )
                _touch(db, name, self._hint)
                return Deleted(versions=tuple(gone), aliases_removed=removed, digests=digests)

        return await self._run(f"delete {name!r}", txn)


class _transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, or ``ROLLBACK`` on any exception.

    IMMEDIATE takes the write lock at the start, so two processes allocating a version of the
    same name queue up instead of both reading the same counter.
    """

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, exc: object, tb: object) -> None:
        self.db.execute("COMMIT" if kind is None else "ROLLBACK")


def _touch(db: sqlite3.Connection, name: str, hint: _fs.GenerationHint) -> None:
    # REPLACE deletes the old row and inserts one with a new, higher generation: one row per
    # name, so the table stays as small as the set of names.
    (generation,) = db.execute(
        "INSERT OR REPLACE INTO changes (name) VALUES (?) RETURNING generation", (name,)
    ).fetchone()
    # Before COMMIT: a reader that looks now refreshes too early and stays "stale" until the
    # commit is visible, which is safe; storing it after COMMIT could reorder two writers.
    hint.store(generation)


def _set_alias(db: sqlite3.Connection, name: str, alias: str, version: int) -> None:
    db.execute(
        "INSERT INTO aliases (name, alias, version) VALUES (?, ?, ?)"
        " ON CONFLICT (name, alias) DO UPDATE SET version = excluded.version",
        (name, alias, version),
    )


def _versions(db: sqlite3.Connection, name: str) -> list[int]:
    return [
        r[0]
        for r in db.execute("SELECT version FROM versions WHERE name = ? ORDER BY version", (name,))
    ]


def _read(db: sqlite3.Connection, names: list[str] | None) -> dict[str, FunctionRecord]:
    """Records of ``names`` (None: all) from one consistent snapshot."""
    where, args = (
        ("", ())
        if names is None
        else (
            f" WHERE name IN ({','.join('?' * len(names))})",
            tuple(names),
        )
    )
    db.execute("BEGIN")  # a read transaction: the three queries see one snapshot
    try:
        counters = dict(db.execute(f"SELECT name, next_version FROM functions{where}", args))
        docs: dict[str, dict[int, dict[str, Any]]] = {}
        for name, version, text in db.execute(
            f"SELECT name, version, doc FROM versions{where} ORDER BY name, version", args
        ):
            try:
                doc = json.loads(text)
            except ValueError:
                log.warning("ignoring version %d of %r: unreadable record", version, name)
                continue
            docs.setdefault(name, {})[version] = doc
        aliases: dict[str, dict[str, int]] = {}
        for name, alias, version in db.execute(
            f"SELECT name, alias, version FROM aliases{where} ORDER BY name, alias", args
        ):
            aliases.setdefault(name, {})[alias] = version
    finally:
        db.execute("COMMIT")
    return {
        name: FunctionRecord(
            name=name,
            next_version=counter,
            versions=docs.get(name, {}),
            aliases=aliases.get(name, {}),
        )
        for name, counter in sorted(counters.items())
    }


class DigestArtifactStore:
    """Artifacts at ``<root>/<digest[:2]>/<digest>``, staging at ``<staging>/<unique>/``."""

    def __init__(self, root: Path, staging: Path) -> None:
        self.root = Path(root)
        self.staging_root = Path(staging)

    async def open(self) -> None:
        """Create the directories and empty the staging area."""
        await asyncio.to_thread(self._open)

    def _open(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        _fs.sweep_staging(self.staging_root)
        self.staging_root.mkdir(parents=True, exist_ok=True)
        for tmp in self.root.glob("*/*" + _fs.TMP_SUFFIX):
            _fs.remove(tmp)

    async def close(self) -> None:
        """Nothing is held between calls."""

    async def new_staging(self) -> Path:
        """A fresh, unique, empty directory (0755)."""

        def make() -> Path:
            path = Path(tempfile.mkdtemp(prefix=_fs.staging_prefix(), dir=self.staging_root))
            path.chmod(0o755)
            return path

        return await asyncio.to_thread(make)

    async def discard(self, path: Path) -> None:
        """Remove a staging directory; never raises."""
        await asyncio.to_thread(_discard, Path(path))

    async def put(self, digest: str, source: Path) -> None:
        """Copy ``source`` in under its digest unless those bytes are there already."""
        await asyncio.to_thread(self._put, digest, Path(source))

    def _put(self, digest: str, source: Path) -> None:
        target = self.path(digest)
        if target.exists():
            return
        try:
            target.parent.mkdir(exist_ok=True)
            tmp = target.with_name(f"{digest}.{secrets.token_hex(6)}{_fs.TMP_SUFFIX}")
            _fs.copy_verified(source, tmp, digest)
            # Same bytes under the same name: a concurrent put of the same digest may win.
            os.replace(tmp, target)
            _fs.fsync_dir(target.parent)
        except OSError as exc:
            raise _fs.storage_error("store an artifact", exc) from exc

    async def release(self, digest: str) -> None:
        """Nothing pending to drop: ``put`` stored the bytes under their digest directly."""

    async def fetch(self, digests: Iterable[str]) -> None:
        """Nothing to do: every writer shares this directory."""

    def path(self, digest: str) -> Path:
        """Where ``digest``'s bytes live (no I/O)."""
        if len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
            raise LookupError(digest)
        return self.root / digest[:2] / digest

    async def forget(self, digest: str) -> None:
        """Remove ``digest``'s file; a missing one is fine."""
        path = self.path(digest)
        try:
            await asyncio.to_thread(path.unlink, True)
        except OSError as exc:
            log.warning("could not remove artifact %s: %s", digest, exc)


def _discard(path: Path) -> None:
    try:
        _fs.remove(path)
    except OSError as exc:
        log.warning("could not remove %s: %s", path, exc)
