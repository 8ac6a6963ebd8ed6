"""The versioned function store, against every backend (local layout and SQLite + digests).

Layout-specific crash and repair tests live in test_registry_local.py; the SQLite backend's
own in test_registry_sqlite.py.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from fnserver.protocol import (
    FunctionLimits,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    VersionInfo,
)
from fnserver.registry import NewVersion, Registry

CREATED_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
BACKENDS: dict[str, Callable[..., Registry]] = {"local": Registry.local, "sqlite": Registry.sqlite}


@pytest.fixture(params=[*sorted(BACKENDS), "postgres"])
def make(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[..., Registry]:
    """A factory of registries over one shared store location, as separate processes would be
    (PostgreSQL: processes of one node over one database; test_registry_postgres.py has the
    nodes with caches of their own)."""
    if request.param == "postgres":
        dsn = request.getfixturevalue("postgres_dsn")
        # Not following notifications: the suite checks the pull side (refresh, stale) the way
        # it does for every backend; test_registry_postgres.py checks the push side.
        return lambda **defaults: Registry.postgres(dsn, tmp_path / "node", follow=False, **defaults)
    factory = BACKENDS[request.param]
    return lambda **defaults: factory(tmp_path / "data", **defaults)


@pytest.fixture
async def reg(make: Callable[..., Registry]) -> AsyncIterator[Registry]:
    r = make()
    await r.open()
    yield r
    await r.close()


@pytest.fixture
async def other(make: Callable[..., Registry]) -> AsyncIterator[Registry]:
    """A second registry over the same store: another serving process."""
    r = make()
    await r.open()
    yield r
    await r.close()


def new_version(**changes: object) -> NewVersion:
    fields: dict[str, object] = {
        "filename": "main.wasm",
        "size": 4,
        "sha256": "0" * 64,
        "kind": "wasm",
        "limits": FunctionLimits(timeout_ms=1000, memory_mb=64),
    }
    fields.update(changes)
    return NewVersion(**fields)  # type: ignore[arg-type]


async def upload(
    reg: Registry,
    name: str,
    body: bytes = b"\0asm",
    *,
    alias: str | None = None,
    native: bytes | None = None,
    wasm: bool = True,
    **meta: object,
) -> VersionInfo:
    """Stage artifacts and commit them, as the register use case does after a build."""
    staging = await reg.new_staging()
    try:
        files = {}
        if wasm:
            (staging / "out.wasm").write_bytes(body)
            files["wasm"] = staging / "out.wasm"
        if native is not None:
            (staging / "out.bin").write_bytes(native)
            files["native"] = staging / "out.bin"
        return await reg.commit(name, files, new_version(**meta), alias=alias)
    finally:
        await reg.discard(staging)


async def reopen(make: Callable[..., Registry], **defaults: int) -> Registry:
    fresh = make(**defaults)
    await fresh.open()
    return fresh


def read(reg: Registry, info: VersionInfo, kind: str = "wasm") -> bytes:
    return reg.artifact_path(info, kind).read_bytes()  # type: ignore[arg-type]


async def becomes_stale(reg: Registry) -> None:
    """``reg.stale()`` after another writer's write: at once for stores whose hint is shared
    memory or a file; for PostgreSQL's, once the write's NOTIFY has reached its listening
    connection (asynchronous, so waited for, bounded only to turn a hang into a failure)."""
    if getattr(reg.metadata, "changed", None) is None:
        assert reg.stale()
        return
    async with asyncio.timeout(60):
        while not reg.stale():
            await asyncio.sleep(0.01)


def snapshot(reg: Registry) -> object:
    return (reg.list(), {f.name: reg.get(f.name, limit=100) for f in reg.list().functions})


# -- versions ---------------------------------------------------------------------------------


async def test_versions_count_up_and_latest_follows(reg: Registry) -> None:
    assert [(await upload(reg, "echo", bytes([i]))).version for i in range(3)] == [1, 2, 3]
    info = reg.resolve("echo")
    assert isinstance(info, VersionInfo)
    assert (info.name, info.version) == ("echo", 3)
    assert read(reg, info) == bytes([2])
    assert reg.resolve("echo", "latest").version == 3
    assert reg.resolve("echo", 2).version == 2
    assert reg.resolve("echo", "1").version == 1
    assert read(reg, reg.resolve("echo", 1)) == bytes([0])


async def test_names_are_independent(reg: Registry) -> None:
    await upload(reg, "a")
    await upload(reg, "a")
    assert (await upload(reg, "b")).version == 1


async def test_version_never_reused_after_deleting_newest(
    reg: Registry, make: Callable[..., Registry]
) -> None:
    for _ in range(3):
        await upload(reg, "f")
    reply = await reg.delete("f", 3)
    assert reply.to_wire() == {"name": "f", "deleted": [3], "aliases_removed": []}
    assert reg.resolve("f").version == 2
    assert (await upload(reg, "f")).version == 4
    fresh = await reopen(make)
    assert fresh.resolve("f").version == 4
    assert (await upload(fresh, "f")).version == 5
    await fresh.close()


async def test_version_never_reused_after_deleting_all(
    reg: Registry, make: Callable[..., Registry]
) -> None:
    await upload(reg, "f")
    await upload(reg, "f")
    assert (await reg.delete("f")).deleted == (1, 2)
    assert reg.list().functions == ()
    with pytest.raises(NotFoundError, match="no function named 'f'"):
        reg.resolve("f")
    with pytest.raises(NotFoundError):
        reg.get("f")
    # The tombstone survives a restart and keeps the counter.
    fresh = await reopen(make)
    assert fresh.list().functions == ()
    with pytest.raises(NotFoundError):
        fresh.resolve("f")
    assert (await upload(fresh, "f")).version == 3
    await fresh.close()


async def test_resolve_not_found_messages(reg: Registry) -> None:
    await upload(reg, "x")
    await upload(reg, "x")
    with pytest.raises(NotFoundError, match=r"^no function named 'nope'$"):
        reg.resolve("nope")
    with pytest.raises(NotFoundError, match=r"^function 'x' has no version 7 \(versions: 1, 2\)$"):
        reg.resolve("x", 7)
    with pytest.raises(NotFoundError, match=r"has no version 7"):
        reg.resolve("x", "7")
    with pytest.raises(NotFoundError, match=r"^function 'x' has no alias 'prod'$"):
        reg.resolve("x", "prod")
    with pytest.raises(InvalidArgumentError):
        reg.resolve("x", 0)
    with pytest.raises(InvalidArgumentError):
        reg.resolve("x", True)


async def test_delete_not_found(reg: Registry) -> None:
    with pytest.raises(NotFoundError, match="no function named 'ghost'"):
        await reg.delete("ghost")
    await upload(reg, "f")
    with pytest.raises(NotFoundError, match=r"^function 'f' has no version 2 \(versions: 1\)$"):
        await reg.delete("f", 2)
    await reg.delete("f")
    with pytest.raises(NotFoundError):
        await reg.delete("f")
    with pytest.raises(InvalidArgumentError):
        await reg.delete("f", 0)


# -- artifacts --------------------------------------------------------------------------------


async def test_artifacts_modes_and_digests(reg: Registry) -> None:
    wasm = await upload(reg, "w", b"wasm bytes")
    both = await upload(reg, "b", b"wasm part", native=b"native part")
    native = await upload(reg, "n", wasm=False, native=b"elf")
    assert (wasm.artifacts, wasm.mode) == (("wasm",), "wasm")
    assert (both.artifacts, both.mode) == (("wasm", "native"), "wasm")
    assert (native.artifacts, native.mode) == (("native",), "native")
    assert both.artifact_sha256 == {
        "wasm": hashlib.sha256(b"wasm part").hexdigest(),
        "native": hashlib.sha256(b"native part").hexdigest(),
    }
    assert read(reg, both, "native") == b"native part"
    assert read(reg, native, "native") == b"elf"
    with pytest.raises(NotFoundError, match="has no wasm artifact"):
        reg.artifact_path(native, "wasm")


async def test_same_bytes_in_two_versions_survive_deleting_one(reg: Registry) -> None:
    await upload(reg, "a", b"shared")
    await upload(reg, "b", b"shared")
    await reg.delete("a")
    assert read(reg, reg.resolve("b")) == b"shared"
    await upload(reg, "a", b"shared")
    await reg.delete("b")
    assert read(reg, reg.resolve("a")) == b"shared"


async def test_commit_copies_the_artifacts(reg: Registry) -> None:
    staging = await reg.new_staging()
    (staging / "m.wasm").write_bytes(b"original")
    info = await reg.commit("f", {"wasm": staging / "m.wasm"}, new_version())
    # What the builder's directory holds afterwards is no longer the function's code.
    (staging / "m.wasm").write_bytes(b"tampered")
    await reg.discard(staging)
    assert read(reg, info) == b"original"


async def test_commit_rejects_bad_artifacts(reg: Registry, tmp_path: Path) -> None:
    before = snapshot(reg)
    with pytest.raises(InvalidArgumentError):
        await reg.commit("f", {}, new_version())
    with pytest.raises(InvalidArgumentError):
        await reg.commit("f", {"jar": tmp_path}, new_version())  # type: ignore[dict-item]
    with pytest.raises(InternalError, match="could not read the artifacts of 'f'") as info:
        await reg.commit("f", {"wasm": tmp_path / "missing.wasm"}, new_version())
    assert str(tmp_path) not in str(info.value)
    assert snapshot(reg) == before


async def test_a_full_disk_is_resource_exhausted_without_paths(
    reg: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    await upload(reg, "f")

    async def full(*args: object, **kwargs: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device", "/srv/secret/f/2")

    monkeypatch.setattr(reg.metadata, "put_version", full)
    # What the host ran out of is not a server bug: its own code (issue 10), never INTERNAL.
    with pytest.raises(ResourceExhaustedError) as info:
        await upload(reg, "f", b"new bytes")
    assert str(info.value) == "could not store a version of 'f': No space left on device"
    monkeypatch.undo()
    # Nothing of the failed commit shows, and its artifact was not kept.
    assert reg.list().functions[0].versions == (1,)
    after = await upload(reg, "f", b"newer")
    assert after.version >= 2
    assert read(reg, after) == b"newer"


# -- aliases ----------------------------------------------------------------------------------


async def test_alias_set_move_and_resolve(reg: Registry, make: Callable[..., Registry]) -> None:
    await upload(reg, "f")
    await upload(reg, "f")
    reply = await reg.set_alias("f", "prod", 1)
    assert reply.to_wire() == {"name": "f", "alias": "prod", "version": 1, "previous": None}
    assert reg.resolve("f", "prod").version == 1
    assert reg.resolve("f", "prod").aliases == ("prod",)
    assert reg.resolve("f", 2).aliases == ()
    assert (await reg.set_alias("f", "prod", 2)).previous == 1
    assert reg.resolve("f", "prod").version == 2
    assert reg.resolve("f", 1).aliases == ()
    fresh = await reopen(make)
    assert fresh.resolve("f", "prod").version == 2
    await fresh.close()


async def test_alias_given_at_commit(reg: Registry) -> None:
    await upload(reg, "f")
    info = await upload(reg, "f", alias="beta")
    assert info.aliases == ("beta",)
    assert reg.resolve("f", "beta").version == 2
    assert reg.get("f").aliases == {"beta": 2}


@pytest.mark.parametrize("alias", ["latest", "Prod", "1", "9abc", "", "a" * 64, "../x", ".x"])
async def test_alias_invalid_or_reserved(reg: Registry, alias: str) -> None:
    await upload(reg, "f")
    before = snapshot(reg)
    with pytest.raises(InvalidArgumentError):
        await reg.set_alias("f", alias, 1)
    with pytest.raises(InvalidArgumentError):
        await upload(reg, "f", alias=alias)
    assert snapshot(reg) == before
    assert reg.resolve("f").version == 1


async def test_alias_unknown_version_or_function(reg: Registry) -> None:
    await upload(reg, "f")
    with pytest.raises(NotFoundError, match=r"has no version 5 \(versions: 1\)"):
        await reg.set_alias("f", "prod", 5)
    with pytest.raises(NotFoundError, match="no function named 'g'"):
        await reg.set_alias("g", "prod", 1)
    with pytest.raises(InvalidArgumentError):
        await reg.set_alias("f", "prod", 0)
    assert reg.get("f").aliases == {}


async def test_delete_removes_dangling_aliases(
    reg: Registry, make: Callable[..., Registry]
) -> None:
    for _ in range(3):
        await upload(reg, "f")
    await reg.set_alias("f", "prod", 1)
    await reg.set_alias("f", "old", 1)
    await reg.set_alias("f", "beta", 3)
    reply = await reg.delete("f", 1)
    assert reply.to_wire() == {"name": "f", "deleted": [1], "aliases_removed": ["old", "prod"]}
    assert reg.get("f").aliases == {"beta": 3}
    with pytest.raises(NotFoundError):
        reg.resolve("f", "prod")
    fresh = await reopen(make)
    assert fresh.get("f").aliases == {"beta": 3}
    await fresh.close()
    assert (await reg.delete("f")).aliases_removed == ("beta",)


# -- names ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../x", "A", "", "x" * 64, ".hidden", ".staging", "a/b/c", "a+b", "/b", "-x"])
async def test_invalid_names_touch_nothing(reg: Registry, name: str) -> None:
    await upload(reg, "ok")
    await reg.set_alias("ok", "prod", 1)
    before = snapshot(reg)
    with pytest.raises(InvalidArgumentError):
        await upload(reg, name)
    with pytest.raises(InvalidArgumentError):
        await reg.delete(name)
    with pytest.raises(InvalidArgumentError):
        await reg.set_alias(name, "prod", 1)
    assert snapshot(reg) == before


async def test_longest_valid_name(reg: Registry) -> None:
    assert (await upload(reg, "x" * 63)).version == 1


# -- metadata, list, get ----------------------------------------------------------------------


async def test_version_metadata(reg: Registry, make: Callable[..., Registry]) -> None:
    info = await upload(
        reg,
        "f",
        b"code",
        description="says hi",
        kind="go",
        filename="main.go",
        size=123,
        sha256="ab" * 32,
        limits=FunctionLimits(timeout_ms=250, memory_mb=32, fuel=10**6),
        toolchain="go1.24",
        build_ms=42,
        build_log="compiling...\nok\n",
    )
    assert (info.name, info.version, info.kind, info.description) == ("f", 1, "go", "says hi")
    assert (info.filename, info.size, info.sha256) == ("main.go", 123, "ab" * 32)
    assert info.limits == FunctionLimits(timeout_ms=250, memory_mb=32, fuel=10**6)
    assert (info.toolchain, info.build_ms, info.build_log) == ("go1.24", 42, "compiling...\nok\n")
    assert info.artifact_sha256 == {"wasm": hashlib.sha256(b"code").hexdigest()}
    assert CREATED_RE.match(info.created)
    assert reg.resolve("f") == info
    fresh = await reopen(make)
    assert fresh.resolve("f") == info
    await fresh.close()


async def test_get_leaves_logs_out_unless_asked(reg: Registry) -> None:
    await upload(reg, "f", build_log="a long log")
    assert "build_log" not in reg.get("f").to_wire()["versions"][0]
    assert reg.get("f", log=True).to_wire()["versions"][0]["build_log"] == "a long log"
    assert reg.get("f", version=1, log=True).to_wire()["versions"][0]["build_log"] == "a long log"


async def test_list_and_get(reg: Registry) -> None:
    await upload(reg, "zeta", kind="c")
    await upload(reg, "alpha", kind="wasm")
    await upload(reg, "alpha", kind="go", description="v2")
    await reg.set_alias("alpha", "prod", 1)
    assert reg.list().to_wire() == {
        "functions": [
            {
                "name": "alpha",
                "tenant": "default",
                "latest": 2,
                "versions": [1, 2],
                "aliases": {"prod": 1},
                "kind": "go",
                "description": "v2",
            },
            {
                "name": "zeta",
                "tenant": "default",
                "latest": 1,
                "versions": [1],
                "aliases": {},
                "kind": "c",
                "description": "",
            },
        ]
    }
    got = reg.get("alpha")
    assert (got.name, got.latest, dict(got.aliases), got.next_cursor) == (
        "alpha",
        2,
        {"prod": 1},
        None,
    )
    assert [(v.version, v.kind, v.aliases) for v in got.versions] == [
        (1, "wasm", ("prod",)),
        (2, "go", ()),
    ]
    # The reply is a copy: changing its wire form changes nothing stored.
    wire = got.to_wire()
    wire["versions"][0]["kind"] = "tampered"
    wire["aliases"]["x"] = 9
    assert reg.get("alpha").versions[0].kind == "wasm"
    assert reg.get("alpha").aliases == {"prod": 1}


async def test_get_one_version(reg: Registry) -> None:
    for _ in range(3):
        await upload(reg, "f")
    await reg.set_alias("f", "prod", 2)
    assert [v.version for v in reg.get("f", version=2).versions] == [2]
    assert [v.version for v in reg.get("f", version="prod").versions] == [2]
    assert [v.version for v in reg.get("f", version="latest").versions] == [3]
    assert reg.get("f", version=2).next_cursor is None
    with pytest.raises(NotFoundError, match=r"has no version 9 \(versions: 1, 2, 3\)"):
        reg.get("f", version=9)
    with pytest.raises(NotFoundError, match="has no alias 'beta'"):
        reg.get("f", version="beta")


async def test_get_pages_300_versions(reg: Registry) -> None:
    for i in range(300):
        await upload(reg, "big", str(i).encode(), build_log="x" * 1000)
    await reg.delete("big", 150)
    seen: list[int] = []
    cursor: int | None = None
    pages = 0
    while True:
        page = reg.get("big", limit=100, cursor=cursor)
        assert len(page.versions) <= 100
        assert all("build_log" not in v for v in page.to_wire()["versions"])
        seen += [v.version for v in page.versions]
        pages += 1
        if page.next_cursor is None:
            break
        assert page.next_cursor == page.versions[-1].version
        cursor = page.next_cursor
    assert seen == [v for v in range(1, 301) if v != 150]
    assert pages == 3
    assert [v.version for v in reg.get("big").versions] == list(range(1, 51))
    assert reg.get("big").next_cursor == 50
    assert [v.version for v in reg.get("big", cursor=148, limit=3).versions] == [149, 151, 152]
    last = reg.get("big", cursor=299)
    assert ([v.version for v in last.versions], last.next_cursor) == ([300], None)
    assert reg.get("big", cursor=300).versions == ()


@pytest.mark.parametrize(("limit", "cursor"), [(0, None), (101, None), (True, None), (10, -1)])
async def test_get_rejects_bad_paging(reg: Registry, limit: int, cursor: int | None) -> None:
    await upload(reg, "f")
    with pytest.raises(InvalidArgumentError):
        reg.get("f", limit=limit, cursor=cursor)


# -- staging ----------------------------------------------------------------------------------


async def test_staging_dirs_are_unique_and_discard_never_raises(
    reg: Registry, tmp_path: Path
) -> None:
    a, b = await reg.new_staging(), await reg.new_staging()
    assert a != b
    assert a.parent == b.parent
    assert list(a.iterdir()) == []
    assert a.stat().st_mode & 0o777 == 0o755
    (a / "file").write_bytes(b"x")
    await reg.discard(a)
    assert not a.exists()
    await reg.discard(a)  # twice: still no error
    await reg.discard(tmp_path / "never-existed")


async def test_open_removes_leftover_staging(reg: Registry, make: Callable[..., Registry]) -> None:
    await upload(reg, "f")
    half = await reg.new_staging()
    (half / "main.wasm").write_bytes(b"partial upload")
    fresh = await reopen(make)
    assert not half.exists()
    assert fresh.resolve("f").version == 1
    await fresh.close()


# -- restart ----------------------------------------------------------------------------------


async def test_restart_keeps_everything(reg: Registry, make: Callable[..., Registry]) -> None:
    await upload(reg, "f", b"one")
    await upload(reg, "f", b"two", description="second", build_log="log")
    await upload(reg, "g", native=b"elf")
    await reg.set_alias("f", "prod", 1)
    fresh = await reopen(make)
    assert snapshot(fresh) == snapshot(reg)
    assert fresh.get("f", log=True) == reg.get("f", log=True)
    assert read(fresh, fresh.resolve("f", "prod")) == b"one"
    assert read(fresh, fresh.resolve("g"), "native") == b"elf"
    assert (await upload(fresh, "f")).version == 3
    await fresh.close()


async def test_default_limits_come_from_the_constructor(make: Callable[..., Registry]) -> None:
    reg = await reopen(make, default_timeout_ms=7000, default_memory_mb=99)
    info = await upload(reg, "f", limits=FunctionLimits(timeout_ms=1, memory_mb=2))
    # Stored limits win; defaults only fill what a record lacks (see test_registry_local.py).
    assert info.limits == FunctionLimits(timeout_ms=1, memory_mb=2)
    await reg.close()


# -- concurrency ------------------------------------------------------------------------------


async def test_concurrent_commits_get_distinct_versions(
    reg: Registry, make: Callable[..., Registry]
) -> None:
    n = 16
    infos = await asyncio.gather(
        *(upload(reg, "f", str(i).encode(), description=str(i)) for i in range(n))
    )
    assert sorted(i.version for i in infos) == list(range(1, n + 1))
    # Each version holds the artifact its own commit staged.
    for v in range(1, n + 1):
        info = reg.resolve("f", v)
        assert read(reg, info) == info.description.encode()
    fresh = await reopen(make)
    assert fresh.list().functions[0].versions == tuple(range(1, n + 1))
    await fresh.close()


async def test_concurrent_commits_through_two_registries(reg: Registry, other: Registry) -> None:
    infos = await asyncio.gather(
        *(
            upload(r, "f", f"{k}{i}".encode())
            for i in range(6)
            for k, r in (("a", reg), ("b", other))
        )
    )
    assert sorted(i.version for i in infos) == list(range(1, 13))
    await reg.refresh()
    await other.refresh()
    assert reg.list() == other.list()
    assert reg.list().functions[0].versions == tuple(range(1, 13))


async def test_readers_see_consistent_index_during_writes(reg: Registry) -> None:
    await upload(reg, "f")
    done = asyncio.Event()

    async def writer() -> None:
        try:
            for i in range(20):
                await upload(reg, f"n{i}")
                await upload(reg, "f")
                await reg.delete("f", reg.resolve("f").version - 1)
        finally:
            done.set()

    task = asyncio.create_task(writer())
    while not done.is_set():
        for item in reg.list().functions:
            assert item.latest == item.versions[-1]
        info = reg.resolve("f")
        assert read(reg, info) == b"\0asm"
        await asyncio.sleep(0)  # a yield, not a wait: lets the writer's steps complete
    await task
    assert len(reg.list().functions) == 21


# -- change feed ------------------------------------------------------------------------------


async def test_change_feed_commit_alias_delete_seen_by_another_registry(
    reg: Registry, other: Registry
) -> None:
    await upload(reg, "f", b"one")
    # resolve() reads only the index: another writer's commit is not seen before a refresh...
    with pytest.raises(NotFoundError):
        other.resolve("f")
    # ...and the service's "refresh and retry once" finds it.
    await other.refresh()
    assert read(other, other.resolve("f")) == b"one"

    await reg.set_alias("f", "prod", 1)
    await upload(reg, "f", b"two")
    await other.refresh()
    assert other.resolve("f", "prod").version == 1
    assert other.resolve("f").version == 2
    assert other.resolve("f", 1).aliases == ("prod",)

    await other.set_alias("f", "prod", 2)
    await other.delete("f", 1)
    await reg.refresh()
    assert reg.get("f").to_wire() == other.get("f").to_wire()
    assert reg.resolve("f", "prod").version == 2
    with pytest.raises(NotFoundError):
        reg.resolve("f", 1)

    await reg.delete("f")
    await other.refresh()
    assert other.list().functions == ()
    with pytest.raises(NotFoundError, match="no function named 'f'"):
        other.resolve("f")
    assert (await upload(other, "f")).version == 3


async def test_refresh_without_changes_keeps_the_index(reg: Registry, other: Registry) -> None:
    await upload(reg, "f")
    await other.refresh()
    index = other._index
    await other.refresh()
    await other.refresh()
    assert other._index is index


async def test_refresh_reloads_only_changed_names(reg: Registry, other: Registry) -> None:
    await upload(reg, "a")
    await upload(reg, "b")
    await other.refresh()
    before = other._index
    await upload(reg, "b")
    await other.refresh()
    assert other._index["a"] is before["a"]
    assert other._index["b"] is not before["b"]
    assert other.resolve("b").version == 2


async def test_a_burst_of_refreshes_shares_looks_at_the_feed(
    reg: Registry, other: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    await upload(reg, "f")
    looks = 0
    real = other.metadata.changes

    async def counted(since: int | None) -> tuple[int, frozenset[str] | None]:
        nonlocal looks
        looks += 1
        return await real(since)

    monkeypatch.setattr(other.metadata, "changes", counted)
    await asyncio.gather(*(other.refresh() for _ in range(10)))
    # The first, and one more for every caller that arrived while it ran.
    assert looks == 2
    assert other.resolve("f").version == 1
    await other.refresh()
    assert looks == 3


async def test_stale_tells_without_io_that_another_writer_changed_something(
    reg: Registry, other: Registry
) -> None:
    await upload(reg, "f")
    await upload(reg, "f")
    await reg.set_alias("f", "prod", 2)
    assert not reg.stale()  # its own writes moved its cursor
    await becomes_stale(other)
    await other.refresh()
    assert not other.stale()
    assert other.resolve("f", "prod").version == 2
    # A stale *hit*: the other registry still resolves what was just deleted...
    await reg.delete("f", 2)
    assert other.resolve("f", 2).version == 2
    # ...until the hot path's cheap check sends it to the feed.
    await becomes_stale(other)
    await other.refresh()
    with pytest.raises(NotFoundError):
        other.resolve("f", 2)
    with pytest.raises(NotFoundError):
        other.resolve("f", "prod")
    assert not other.stale()


async def test_a_tenants_key_is_a_function_of_its_own(
    reg: Registry, other: Registry, make: Callable[..., Registry]
) -> None:
    """Namespaces: ``acme/echo`` and ``echo`` (the default tenant's) are two functions, with
    their own version numbers and aliases, seen by another reader and after a reopen."""
    await upload(reg, "echo")
    await upload(reg, "acme/echo")
    await upload(reg, "acme/echo")
    await reg.set_alias("acme/echo", "prod", 2)
    assert [f.name for f in reg.list().functions] == ["acme/echo", "echo"]
    assert reg.get("echo").latest == 1 and reg.get("acme/echo").latest == 2
    await other.refresh()
    assert other.resolve("acme/echo", "prod").version == 2
    fresh = await reopen(make)
    assert fresh.get("acme/echo").aliases == {"prod": 2} and fresh.get("echo").aliases == {}
    await fresh.close()
    await reg.delete("acme/echo")
    await other.refresh()
    with pytest.raises(NotFoundError):
        other.resolve("acme/echo")
    assert other.resolve("echo").version == 1
