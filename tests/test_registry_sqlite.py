"""The second backend: SQLite metadata and a digest-addressed artifact directory."""

from __future__ import annotations

import errno
import hashlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from fnserver.protocol import InternalError
from fnserver.registry import DigestArtifactStore, Registry, SqliteMetadataStore

from .test_registry import read, upload


@pytest.fixture
async def reg(tmp_path: Path) -> AsyncIterator[Registry]:
    r = Registry.sqlite(tmp_path / "data")
    await r.open()
    yield r
    await r.close()


def blobs(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "data" / "artifacts").glob("*/*"))


async def test_stores_are_the_sqlite_pair(reg: Registry, tmp_path: Path) -> None:
    assert isinstance(reg.metadata, SqliteMetadataStore)
    assert isinstance(reg.artifacts, DigestArtifactStore)
    with sqlite3.connect(tmp_path / "data" / "registry.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_artifacts_are_stored_once_by_digest(reg: Registry, tmp_path: Path) -> None:
    a = await upload(reg, "a", b"same")
    b = await upload(reg, "b", b"same")
    digest = hashlib.sha256(b"same").hexdigest()
    assert blobs(tmp_path) == [digest]
    assert reg.artifact_path(a, "wasm") == reg.artifact_path(b, "wasm")
    assert reg.artifact_path(a, "wasm") == tmp_path / "data" / "artifacts" / digest[:2] / digest


async def test_unreferenced_artifacts_are_removed(reg: Registry, tmp_path: Path) -> None:
    await upload(reg, "a", b"shared")
    await upload(reg, "b", b"shared")
    await upload(reg, "b", b"own")
    await reg.delete("b", 2)
    assert blobs(tmp_path) == [hashlib.sha256(b"shared").hexdigest()]
    await reg.delete("a")
    assert blobs(tmp_path) == [hashlib.sha256(b"shared").hexdigest()]
    await reg.delete("b")
    assert blobs(tmp_path) == []


async def test_failed_commit_leaves_no_artifact(
    reg: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kept = await upload(reg, "f", b"kept")

    async def broken(*args: object, **kwargs: object) -> int:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(reg.metadata, "put_version", broken)
    with pytest.raises(InternalError, match="Input/output error"):
        await upload(reg, "f", b"lost")
    with pytest.raises(InternalError):
        await upload(reg, "f", b"kept")  # same bytes as a committed version: must survive
    monkeypatch.undo()
    assert blobs(tmp_path) == [hashlib.sha256(b"kept").hexdigest()]
    assert read(reg, kept) == b"kept"


async def test_a_failed_record_still_burns_its_number(
    reg: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    await upload(reg, "f")
    real = sqlite3.Connection.execute

    db = reg.metadata._db
    assert db is not None

    class Failing:
        """The connection, except that recording a version fails."""

        def __getattr__(self, name: str) -> object:
            return getattr(db, name)

        def execute(self, sql: str, *args: object) -> sqlite3.Cursor:
            if sql.startswith("INSERT INTO versions"):
                raise sqlite3.OperationalError("disk I/O error")
            return real(db, sql, *args)

    monkeypatch.setattr(reg.metadata, "_db", Failing())
    with pytest.raises(InternalError, match=r"^could not store version 2 of 'f': disk I/O error$"):
        await upload(reg, "f")
    monkeypatch.undo()
    assert reg.list().functions[0].versions == (1,)
    assert (await upload(reg, "f")).version == 3
