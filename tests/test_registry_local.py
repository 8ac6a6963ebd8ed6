"""The local store: the seed's on-disk layout, crash repair, old records, the cross-process feed."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from fnserver.artifacts import ARTIFACT_FILES, META_FILE
from fnserver.protocol import (
    FunctionLimits,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
)
from fnserver.registry import LocalStore, Registry, _local

from .test_registry import CREATED_RE, upload


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
async def reg(data: Path) -> AsyncIterator[Registry]:
    r = Registry.local(data)
    await r.open()
    yield r
    await r.close()


async def reopen(data: Path, **defaults: int) -> Registry:
    fresh = Registry.local(data, **defaults)
    await fresh.open()
    return fresh


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def staging(data: Path) -> list[Path]:
    return list((data / ".staging").iterdir())


# -- layout -----------------------------------------------------------------------------------


async def test_layout(reg: Registry, data: Path) -> None:
    info = await upload(reg, "f", b"code", native=b"elf", description="hi", build_log="log")
    vdir = data / "f" / "1"
    assert sorted(p.name for p in vdir.iterdir()) == sorted(
        [ARTIFACT_FILES["wasm"], ARTIFACT_FILES["native"], META_FILE]
    )
    assert reg.artifact_path(info, "wasm") == vdir / ARTIFACT_FILES["wasm"]
    assert reg.artifact_path(info, "native") == vdir / ARTIFACT_FILES["native"]
    assert (vdir / ARTIFACT_FILES["native"]).read_bytes() == b"elf"
    assert vdir.stat().st_mode & 0o777 == 0o755
    assert (vdir / ARTIFACT_FILES["wasm"]).stat().st_mode & 0o777 == 0o644
    assert json.loads((data / "f" / "function.json").read_text()) == {
        "next_version": 2,
        "aliases": {},
    }
    assert staging(data) == []


async def test_an_executable_artifact_stays_executable(reg: Registry, data: Path) -> None:
    # Native artifacts are run by the sandbox uids: read and execute for all, write for none.
    info = await upload(reg, "n", b"code", native=b"\x7fELF\x02\x01\x01")
    assert reg.artifact_path(info, "native").stat().st_mode & 0o777 == 0o755
    assert reg.artifact_path(info, "wasm").stat().st_mode & 0o777 == 0o644


async def test_meta_json_content(reg: Registry, data: Path) -> None:
    info = await upload(reg, "f", alias="prod", build_log="compiled", description="says hi")
    on_disk = json.loads((data / "f" / "1" / META_FILE).read_text())
    assert on_disk["schema"] == 2
    assert "aliases" not in on_disk
    assert on_disk["build_log"] == "compiled"
    assert CREATED_RE.match(on_disk["created"])
    expected = info.to_wire(log=True)
    del expected["aliases"]
    # The environment is stored with its values (the wire form has the names only).
    assert on_disk == {**expected, "env": dict(info.env), "schema": 2}
    assert json.loads((data / "f" / "function.json").read_text())["aliases"] == {"prod": 1}


async def test_delete_removes_directory_and_leaves_no_staging(reg: Registry, data: Path) -> None:
    await upload(reg, "f")
    await upload(reg, "f")
    await reg.delete("f", 1)
    assert not (data / "f" / "1").exists()
    assert (data / "f" / "2" / "main.wasm").exists()
    assert staging(data) == []
    assert [v.version for v in reg.get("f").versions] == [2]


@pytest.mark.parametrize("name", ["../x", "A", ".staging", "a/b/c", "a+b", "/b"])
async def test_invalid_names_touch_no_file(reg: Registry, data: Path, name: str) -> None:
    await upload(reg, "ok")
    before = tree(data.parent)
    with pytest.raises(InvalidArgumentError):
        await upload(reg, name)
    with pytest.raises(InvalidArgumentError):
        await reg.delete(name)
    assert tree(data.parent) == before


async def test_failed_rename_burns_the_number_and_leaves_nothing(
    reg: Registry, data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await upload(reg, "f")

    def refuse(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device", str(dst))

    monkeypatch.setattr(_local.os, "rename", refuse)
    with pytest.raises(ResourceExhaustedError) as info:
        await upload(reg, "f", alias="prod")
    monkeypatch.undo()
    assert str(info.value) == "could not store version 2 of 'f': No space left on device"
    assert str(data) not in str(info.value)
    assert staging(data) == []
    assert sorted(p.name for p in (data / "f").iterdir()) == ["1", "function.json"]
    assert json.loads((data / "f" / "function.json").read_text()) == {
        "next_version": 3,
        "aliases": {},
    }
    assert (await upload(reg, "f")).version == 3


# -- open: leftovers and repair ---------------------------------------------------------------


async def test_open_removes_leftover_staging_and_temp_files(reg: Registry, data: Path) -> None:
    await upload(reg, "f")
    half = await reg.new_staging()
    (half / "main.wasm").write_bytes(b"partial upload")
    tmp = data / "f" / "function.json.abc123.tmp"
    tmp.write_text('{"next_ver')
    fresh = await reopen(data)
    assert staging(data) == []
    assert not tmp.exists()
    assert fresh.resolve("f").version == 1


async def test_open_ignores_version_without_meta(
    reg: Registry, data: Path, caplog: pytest.LogCaptureFixture
) -> None:
    await upload(reg, "f")
    await upload(reg, "f")
    # A crash left version 3's directory without its meta.json.
    crashed = data / "f" / "3"
    crashed.mkdir()
    (crashed / "main.wasm").write_bytes(b"junk")
    with caplog.at_level(logging.WARNING, logger="fnserver.registry"):
        fresh = await reopen(data)
    assert any(META_FILE in r.getMessage() for r in caplog.records)
    assert fresh.resolve("f").version == 2
    assert fresh.list().functions[0].versions == (1, 2)
    with pytest.raises(NotFoundError):
        fresh.resolve("f", 3)
    # Its number is burnt anyway: the next upload does not land on the broken directory.
    assert (await upload(fresh, "f")).version == 4


async def test_open_ignores_version_with_corrupt_meta(reg: Registry, data: Path) -> None:
    await upload(reg, "f")
    await upload(reg, "f")
    (data / "f" / "2" / META_FILE).write_text('{"name": "f", "vers')
    fresh = await reopen(data)
    assert fresh.resolve("f").version == 1
    assert (await upload(fresh, "f")).version == 3


async def test_open_rebuilds_truncated_function_json(reg: Registry, data: Path) -> None:
    for _ in range(3):
        await upload(reg, "f")
    await reg.delete("f", 3)
    fj = data / "f" / "function.json"
    fj.write_text('{"next_version": 4, "ali')
    fresh = await reopen(data)
    assert fresh.resolve("f").version == 2
    assert fresh.get("f").aliases == {}
    # Rebuilt from the directories that remain: max + 1.
    assert json.loads(fj.read_text()) == {"next_version": 3, "aliases": {}}
    assert (await upload(fresh, "f")).version == 3


async def test_open_rebuilds_missing_function_json(reg: Registry, data: Path) -> None:
    await upload(reg, "f")
    await upload(reg, "f")
    (data / "f" / "function.json").unlink()
    fresh = await reopen(data)
    assert fresh.list().functions[0].versions == (1, 2)
    assert (await upload(fresh, "f")).version == 3


async def test_open_counts_past_a_version_committed_before_function_json(
    reg: Registry, data: Path
) -> None:
    await upload(reg, "f")
    await upload(reg, "f")
    fj = data / "f" / "function.json"
    fj.write_text(json.dumps({"next_version": 2, "aliases": {"prod": 1, "gone": 9}}))
    fresh = await reopen(data)
    assert fresh.resolve("f").version == 2
    assert fresh.get("f").aliases == {"prod": 1}
    assert json.loads(fj.read_text()) == {"next_version": 3, "aliases": {"prod": 1}}
    assert (await upload(fresh, "f")).version == 3


async def test_open_creates_data_dir(tmp_path: Path) -> None:
    data = tmp_path / "a" / "b"
    reg = Registry.local(data)
    await reg.open()
    assert data.is_dir()
    assert reg.list().functions == ()


# -- records from before schema 2 -------------------------------------------------------------


def write_old_version(
    data: Path, name: str, version: int, meta: dict[str, object], files: dict[str, bytes]
) -> None:
    vdir = data / name / str(version)
    vdir.mkdir(parents=True)
    for file, body in files.items():
        (vdir / file).write_bytes(body)
    (vdir / META_FILE).write_text(json.dumps({"name": name, "version": version, **meta}))


async def test_old_meta_json_loads_with_digests_and_default_limits(data: Path) -> None:
    # What the seed's server wrote: no schema, no artifact_sha256, limits partly missing.
    write_old_version(
        data,
        "old",
        1,
        {
            "created": "2025-01-02T03:04:05.678Z",
            "filename": "main.go",
            "size": 10,
            "sha256": "cd" * 32,
            "kind": "go",
            "artifacts": ["wasm", "native"],
            "mode": "wasm",
            "limits": {"memory_mb": 64},
            "description": "from the seed",
            "build_log": "ok",
        },
        {"main.wasm": b"old wasm", "main.bin": b"old elf"},
    )
    (data / "old" / "function.json").write_text(
        json.dumps({"next_version": 2, "aliases": {"prod": 1}})
    )
    # The oldest shape: no artifacts list at all, only a wasm file.
    write_old_version(data, "older", 1, {"kind": "wasm"}, {"main.wasm": b"oldest"})

    reg = await reopen(data, default_timeout_ms=7000, default_memory_mb=99)
    info = reg.resolve("old", "prod")
    assert info.artifact_sha256 == {
        "wasm": hashlib.sha256(b"old wasm").hexdigest(),
        "native": hashlib.sha256(b"old elf").hexdigest(),
    }
    assert info.limits == FunctionLimits(timeout_ms=7000, memory_mb=64)
    assert (info.kind, info.description, info.build_log) == ("go", "from the seed", "ok")
    assert reg.artifact_path(info, "native").read_bytes() == b"old elf"
    oldest = reg.resolve("older")
    assert (oldest.artifacts, oldest.mode) == (("wasm",), "wasm")
    assert oldest.limits == FunctionLimits(timeout_ms=7000, memory_mb=99)
    assert reg.artifact_path(oldest, "wasm").read_bytes() == b"oldest"
    # New versions of an old function are written in the new schema, next to the old ones.
    new = await upload(reg, "old", b"new")
    assert new.version == 2
    assert json.loads((data / "old" / "2" / META_FILE).read_text())["schema"] == 2
    await reg.close()


async def test_version_whose_artifacts_are_all_missing_is_ignored(data: Path) -> None:
    write_old_version(data, "f", 1, {"kind": "wasm", "artifacts": ["wasm"]}, {})
    write_old_version(data, "f", 2, {"kind": "wasm"}, {"main.wasm": b"fine"})
    reg = await reopen(data)
    assert reg.list().functions[0].versions == (2,)
    assert (await upload(reg, "f")).version == 3


# -- change feed ------------------------------------------------------------------------------


async def test_change_log_is_compacted_and_cursors_stay_valid(
    reg: Registry, data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_local, "_COMPACT_BYTES", 200)
    other = await reopen(data)
    for i in range(30):
        await upload(reg, f"n{i % 3}")
    assert (data / ".changes").stat().st_size < 400
    await other.refresh()
    assert other.list() == reg.list()
    await reg.set_alias("n1", "prod", 1)
    await other.refresh()
    assert other.resolve("n1", "prod").version == 1
    await other.close()


async def test_a_torn_last_change_line_is_dropped(reg: Registry, data: Path) -> None:
    await upload(reg, "a")
    other = await reopen(data)
    with open(data / ".changes", "ab") as f:
        f.write(b"99 b")  # a crash mid-append
    await upload(reg, "b")
    await other.refresh()
    assert other.resolve("b").version == 1
    lines = (data / ".changes").read_bytes().splitlines()
    assert lines[-1].endswith(b" b") and not lines[-1].startswith(b"99")
    await other.close()


async def test_feed_reports_nothing_when_nothing_changed(data: Path) -> None:
    store = LocalStore(data)
    await store.open()
    cursor, names = await store.changes(None)
    assert (cursor, names) == (0, None)
    assert await store.changes(cursor) == (0, frozenset())
    writer = Registry.local(data)
    await writer.open()
    await upload(writer, "f")
    await upload(writer, "g")
    cursor2, names2 = await store.changes(cursor)
    assert names2 == {"f", "g"}
    assert await store.changes(cursor2) == (cursor2, frozenset())
    # Another reader with an older cursor gets its own answer from the same store.
    assert (await store.changes(cursor))[1] == {"f", "g"}


_CHILD = """
import asyncio, sys
from pathlib import Path
from fnserver.protocol import FunctionLimits
from fnserver.registry import NewVersion, Registry

async def main(data, tag, n):
    reg = Registry.local(Path(data))
    # Not open(): that would clean the staging area under the parent's feet; a serving
    # process attaches to a store that the supervisor opened.
    await reg.refresh()
    for i in range(n):
        staging = await reg.new_staging()
        f = staging / "m.wasm"
        f.write_bytes(f"{tag}{i}".encode())
        meta = NewVersion("m.wasm", 1, "0" * 64, "wasm", FunctionLimits(1000, 64), description=f"{tag}{i}")
        await reg.commit("shared", {"wasm": f}, meta, alias=tag if i == n - 1 else None)
        await reg.discard(staging)

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


async def test_feed_and_allocation_across_processes(reg: Registry, data: Path) -> None:
    await upload(reg, "shared", b"parent")
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _CHILD,
            str(data),
            tag,
            "8",
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        for tag in ("aa", "bb")
    ]
    # Meanwhile this process commits too: three writers share the counter.
    for i in range(4):
        await upload(reg, "shared", f"p{i}".encode())
    assert [await p.wait() for p in procs] == [0, 0]
    await reg.refresh()
    versions = reg.list().functions[0].versions
    assert versions == tuple(range(1, 22))
    descriptions = sorted(reg.resolve("shared", v).description for v in versions)
    assert descriptions.count("") == 5  # the parent's five
    assert {f"aa{i}" for i in range(8)} <= set(descriptions)
    assert {f"bb{i}" for i in range(8)} <= set(descriptions)
    for v in versions:
        info = reg.resolve("shared", v)
        if info.description:
            assert reg.artifact_path(info, "wasm").read_bytes() == info.description.encode()
    assert reg.resolve("shared", "aa").description == "aa7"
    assert reg.resolve("shared", "bb").description == "bb7"
