"""The versioned function store, against a real temporary directory."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from pathlib import Path

import pytest

from fnserver.protocol.errors import InternalError, InvalidArgumentError, NotFoundError
from fnserver.registry import Registry, VersionRecord

CREATED_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    r = Registry(tmp_path / "data")
    r.open()
    return r


def upload(
    reg: Registry,
    name: str,
    body: bytes = b"\0asm",
    *,
    alias: str | None = None,
    **meta: object,
) -> dict[str, object]:
    """Stage one artifact and commit it, as the server does after a build."""
    staging = reg.new_staging()
    (staging / "main.wasm").write_bytes(body)
    return reg.commit(name, staging, {"kind": "wasm", **meta}, alias=alias)


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def reopen(reg: Registry) -> Registry:
    fresh = Registry(reg.data_dir)
    fresh.open()
    return fresh


# -- versions ------------------------------------------------------------------------------


def test_versions_count_up_and_latest_follows(reg: Registry) -> None:
    assert [upload(reg, "echo", bytes([i]))["version"] for i in range(3)] == [1, 2, 3]
    rec = reg.resolve("echo")
    assert isinstance(rec, VersionRecord)
    assert (rec.name, rec.version) == ("echo", 3)
    assert rec.path == reg.data_dir / "echo" / "3"
    assert (rec.path / "main.wasm").read_bytes() == bytes([2])
    assert reg.resolve("echo", "latest").version == 3
    assert reg.resolve("echo", 2).version == 2
    assert reg.resolve("echo", "1").version == 1
    assert (reg.resolve("echo", 1).path / "main.wasm").read_bytes() == bytes([0])


def test_names_are_independent(reg: Registry) -> None:
    upload(reg, "a")
    upload(reg, "a")
    assert upload(reg, "b")["version"] == 1


def test_version_never_reused_after_deleting_newest(reg: Registry) -> None:
    for _ in range(3):
        upload(reg, "f")
    assert reg.delete("f", 3) == {"name": "f", "deleted": [3], "aliases_removed": []}
    assert reg.resolve("f").version == 2
    assert upload(reg, "f")["version"] == 4
    assert reopen(reg).resolve("f").version == 4
    assert upload(reopen(reg), "f")["version"] == 5


def test_version_never_reused_after_deleting_all(reg: Registry) -> None:
    upload(reg, "f")
    upload(reg, "f")
    assert reg.delete("f")["deleted"] == [1, 2]
    assert reg.list() == []
    with pytest.raises(NotFoundError, match="no function named 'f'"):
        reg.resolve("f")
    with pytest.raises(NotFoundError):
        reg.get("f")
    # The tombstone survives a restart and keeps the counter.
    fresh = reopen(reg)
    assert fresh.list() == []
    with pytest.raises(NotFoundError):
        fresh.resolve("f")
    assert upload(fresh, "f")["version"] == 3


def test_resolve_not_found_messages(reg: Registry) -> None:
    upload(reg, "x")
    upload(reg, "x")
    with pytest.raises(NotFoundError, match=r"^no function named 'nope'$"):
        reg.resolve("nope")
    with pytest.raises(NotFoundError, match=r"^function 'x' has no version 7 \(versions: 1, 2\)$"):
        reg.resolve("x", 7)
    with pytest.raises(NotFoundError, match=r"has no version 7"):
        reg.resolve("x", "7")
    with pytest.raises(NotFoundError, match=r"^function 'x' has no alias 'prod'$"):
        reg.resolve("x", "prod")


def test_delete_not_found(reg: Registry) -> None:
    with pytest.raises(NotFoundError):
        reg.delete("ghost")
    upload(reg, "f")
    with pytest.raises(NotFoundError, match="has no version 2"):
        reg.delete("f", 2)
    reg.delete("f")
    with pytest.raises(NotFoundError):
        reg.delete("f")


def test_delete_removes_directory_and_leaves_no_staging(reg: Registry) -> None:
    upload(reg, "f")
    upload(reg, "f")
    reg.delete("f", 1)
    assert not (reg.data_dir / "f" / "1").exists()
    assert (reg.data_dir / "f" / "2" / "main.wasm").exists()
    assert list((reg.data_dir / ".staging").iterdir()) == []
    assert [v["version"] for v in reg.get("f")["versions"]] == [2]


# -- aliases -------------------------------------------------------------------------------


def test_alias_set_move_and_resolve(reg: Registry) -> None:
    upload(reg, "f")
    upload(reg, "f")
    assert reg.set_alias("f", "prod", 1) == {
        "name": "f",
        "alias": "prod",
        "version": 1,
        "previous": None,
    }
    assert reg.resolve("f", "prod").version == 1
    assert reg.set_alias("f", "prod", 2)["previous"] == 1
    assert reg.resolve("f", "prod").version == 2
    assert reopen(reg).resolve("f", "prod").version == 2


def test_alias_given_at_commit(reg: Registry) -> None:
    upload(reg, "f")
    meta = upload(reg, "f", alias="beta")
    assert meta["aliases"] == ["beta"]
    assert reg.resolve("f", "beta").version == 2
    assert json.loads((reg.data_dir / "f" / "function.json").read_text())["aliases"] == {"beta": 2}


@pytest.mark.parametrize("alias", ["latest", "Prod", "1", "9abc", "", "a" * 64, "../x", ".x"])
def test_alias_invalid_or_reserved(reg: Registry, alias: str) -> None:
    upload(reg, "f")
    with pytest.raises(InvalidArgumentError):
        reg.set_alias("f", alias, 1)
    before = tree(reg.data_dir)
    staging = reg.new_staging()
    with pytest.raises(InvalidArgumentError):
        reg.commit("f", staging, {}, alias=alias)
    reg.discard(staging)
    assert tree(reg.data_dir) == before
    assert reg.resolve("f").version == 1


def test_alias_unknown_version_or_function(reg: Registry) -> None:
    upload(reg, "f")
    with pytest.raises(NotFoundError, match=r"has no version 5 \(versions: 1\)"):
        reg.set_alias("f", "prod", 5)
    with pytest.raises(NotFoundError, match="no function named 'g'"):
        reg.set_alias("g", "prod", 1)
    with pytest.raises(InvalidArgumentError):
        reg.set_alias("f", "prod", 0)
    assert reg.get("f")["aliases"] == {}


def test_delete_removes_dangling_aliases(reg: Registry) -> None:
    for _ in range(3):
        upload(reg, "f")
    reg.set_alias("f", "prod", 1)
    reg.set_alias("f", "old", 1)
    reg.set_alias("f", "beta", 3)
    result = reg.delete("f", 1)
    assert result == {"name": "f", "deleted": [1], "aliases_removed": ["old", "prod"]}
    assert reg.get("f")["aliases"] == {"beta": 3}
    with pytest.raises(NotFoundError):
        reg.resolve("f", "prod")
    assert reopen(reg).get("f")["aliases"] == {"beta": 3}
    assert reg.delete("f")["aliases_removed"] == ["beta"]


# -- names ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../x", "A", "", "x" * 64, ".hidden", ".staging", "a/b", "-x"])
def test_invalid_names_touch_nothing(reg: Registry, name: str) -> None:
    upload(reg, "ok")
    reg.set_alias("ok", "prod", 1)
    staging = reg.new_staging()
    (staging / "main.wasm").write_bytes(b"x")
    before = tree(reg.data_dir)
    with pytest.raises(InvalidArgumentError):
        reg.commit(name, staging, {"kind": "wasm"})
    with pytest.raises(InvalidArgumentError):
        reg.delete(name)
    with pytest.raises(InvalidArgumentError):
        reg.set_alias(name, "prod", 1)
    assert tree(reg.data_dir) == before
    assert tree(reg.data_dir.parent) == sorted(["data", *(str(Path("data") / p) for p in before)])


def test_longest_valid_name(reg: Registry) -> None:
    assert upload(reg, "x" * 63)["version"] == 1


def test_commit_refuses_foreign_directory(reg: Registry, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with pytest.raises(InternalError):
        reg.commit("f", elsewhere, {})
    assert elsewhere.is_dir()
    assert reg.list() == []


# -- metadata, list, get -------------------------------------------------------------------


def test_meta_json_content(reg: Registry) -> None:
    meta = upload(reg, "f", description="says hi", kind="go", limits={"memory": 64})
    on_disk = json.loads((reg.data_dir / "f" / "1" / "meta.json").read_text())
    assert on_disk["name"] == "f"
    assert on_disk["version"] == 1
    assert on_disk["kind"] == "go"
    assert on_disk["description"] == "says hi"
    assert on_disk["limits"] == {"memory": 64}
    assert CREATED_RE.match(on_disk["created"])
    assert "aliases" not in on_disk
    assert meta == {**on_disk, "aliases": []}
    assert dict(reg.resolve("f").meta) == on_disk


def test_commit_meta_cannot_override_identity(reg: Registry) -> None:
    staging = reg.new_staging()
    meta = reg.commit("f", staging, {"name": "evil", "version": 99, "aliases": ["x"]})
    assert (meta["name"], meta["version"], meta["aliases"]) == ("f", 1, [])


def test_commit_rejects_unserialisable_meta(reg: Registry) -> None:
    staging = reg.new_staging()
    with pytest.raises(InvalidArgumentError):
        reg.commit("f", staging, {"bad": object()})
    assert staging.is_dir()
    assert not (reg.data_dir / "f").exists()


def test_list_and_get(reg: Registry) -> None:
    upload(reg, "zeta", kind="c")
    upload(reg, "alpha", kind="wasm")
    upload(reg, "alpha", kind="go", description="v2")
    reg.set_alias("alpha", "prod", 1)
    assert reg.list() == [
        {
            "name": "alpha",
            "latest": 2,
            "versions": [1, 2],
            "aliases": {"prod": 1},
            "kind": "go",
            "description": "v2",
        },
        {
            "name": "zeta",
            "latest": 1,
            "versions": [1],
            "aliases": {},
            "kind": "c",
            "description": "",
        },
    ]
    got = reg.get("alpha")
    assert (got["name"], got["latest"], got["aliases"]) == ("alpha", 2, {"prod": 1})
    assert [(v["version"], v["kind"], v["aliases"]) for v in got["versions"]] == [
        (1, "wasm", ["prod"]),
        (2, "go", []),
    ]
    # get() hands out copies: changing them does not change the store.
    got["versions"][0]["kind"] = "tampered"
    assert reg.get("alpha")["versions"][0]["kind"] == "wasm"


# -- staging -------------------------------------------------------------------------------


def test_staging_dirs_are_unique_and_discard_never_raises(reg: Registry) -> None:
    a, b = reg.new_staging(), reg.new_staging()
    assert a != b
    assert a.parent == b.parent == reg.data_dir / ".staging"
    assert list(a.iterdir()) == []
    (a / "file").write_bytes(b"x")
    reg.discard(a)
    assert not a.exists()
    reg.discard(a)  # twice: still no error
    reg.discard(reg.data_dir / "never-existed")


# -- restart and recovery ------------------------------------------------------------------


def test_restart_keeps_everything(reg: Registry) -> None:
    upload(reg, "f", b"one")
    upload(reg, "f", b"two", description="second")
    upload(reg, "g")
    reg.set_alias("f", "prod", 1)
    fresh = reopen(reg)
    assert fresh.list() == reg.list()
    assert fresh.get("f") == reg.get("f")
    assert (fresh.resolve("f", "prod").path / "main.wasm").read_bytes() == b"one"
    assert upload(fresh, "f")["version"] == 3


def test_open_removes_leftover_staging_and_temp_files(reg: Registry) -> None:
    upload(reg, "f")
    half = reg.new_staging()
    (half / "main.wasm").write_bytes(b"partial upload")
    tmp = reg.data_dir / "f" / "function.json.abc123.tmp"
    tmp.write_text('{"next_ver')
    fresh = reopen(reg)
    assert list((fresh.data_dir / ".staging").iterdir()) == []
    assert not tmp.exists()
    assert fresh.resolve("f").version == 1


def test_open_ignores_version_without_meta(reg: Registry, caplog: pytest.LogCaptureFixture) -> None:
    upload(reg, "f")
    upload(reg, "f")
    # A crash left version 3's directory without its meta.json.
    crashed = reg.data_dir / "f" / "3"
    crashed.mkdir()
    (crashed / "main.wasm").write_bytes(b"junk")
    with caplog.at_level(logging.WARNING, logger="fnserver.registry"):
        fresh = reopen(reg)
    assert any("meta.json" in r.getMessage() for r in caplog.records)
    assert fresh.resolve("f").version == 2
    assert fresh.list()[0]["versions"] == [1, 2]
    with pytest.raises(NotFoundError):
        fresh.resolve("f", 3)
    # Its number is burnt anyway: the next upload does not land on the broken directory.
    assert upload(fresh, "f")["version"] == 4


def test_open_ignores_version_with_corrupt_meta(reg: Registry) -> None:
    upload(reg, "f")
    upload(reg, "f")
    (reg.data_dir / "f" / "2" / "meta.json").write_text('{"name": "f", "vers')
    fresh = reopen(reg)
    assert fresh.resolve("f").version == 1
    assert upload(fresh, "f")["version"] == 3


def test_open_rebuilds_truncated_function_json(reg: Registry) -> None:
    upload(reg, "f")
    upload(reg, "f")
    upload(reg, "f")
    reg.delete("f", 3)
    fj = reg.data_dir / "f" / "function.json"
    fj.write_text('{"next_version": 4, "ali')
    fresh = reopen(reg)
    assert fresh.resolve("f").version == 2
    assert fresh.get("f")["aliases"] == {}
    # Rebuilt from the directories that remain: max + 1.
    assert json.loads(fj.read_text()) == {"next_version": 3, "aliases": {}}
    assert upload(fresh, "f")["version"] == 3


def test_open_rebuilds_missing_function_json(reg: Registry) -> None:
    upload(reg, "f")
    upload(reg, "f")
    (reg.data_dir / "f" / "function.json").unlink()
    fresh = reopen(reg)
    assert fresh.list()[0]["versions"] == [1, 2]
    assert upload(fresh, "f")["version"] == 3


def test_open_counts_past_a_version_committed_before_function_json(reg: Registry) -> None:
    # Crash between the rename and the function.json update: the version is complete on disk.
    upload(reg, "f")
    upload(reg, "f")
    fj = reg.data_dir / "f" / "function.json"
    fj.write_text(json.dumps({"next_version": 2, "aliases": {"prod": 1, "gone": 9}}))
    fresh = reopen(reg)
    assert fresh.resolve("f").version == 2
    assert fresh.get("f")["aliases"] == {"prod": 1}
    assert upload(fresh, "f")["version"] == 3


def test_open_creates_data_dir(tmp_path: Path) -> None:
    data = tmp_path / "a" / "b"
    reg = Registry(data)
    reg.open()
    assert reg.data_dir == data
    assert data.is_dir()
    assert reg.list() == []


# -- concurrency ---------------------------------------------------------------------------


def test_concurrent_commits_get_distinct_versions(reg: Registry) -> None:
    n = 16
    barrier = threading.Barrier(n)
    results: list[int] = []
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            staging = reg.new_staging()
            (staging / "main.wasm").write_bytes(str(i).encode())
            barrier.wait()
            results.append(reg.commit("f", staging, {"kind": "wasm", "i": i})["version"])
        except BaseException as exc:  # collected and re-checked below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(results) == list(range(1, n + 1))
    # Each version directory holds the artifact its own commit staged.
    for v in range(1, n + 1):
        rec = reg.resolve("f", v)
        assert (rec.path / "main.wasm").read_bytes() == str(rec.meta["i"]).encode()
    assert reopen(reg).list()[0]["versions"] == list(range(1, n + 1))


def test_readers_see_consistent_index_during_writes(reg: Registry) -> None:
    upload(reg, "f")
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for i in range(30):
                upload(reg, f"n{i}")
                upload(reg, "f")
                reg.delete("f", reg.resolve("f").version - 1)
        except BaseException as exc:  # collected and re-checked below
            errors.append(exc)
        finally:
            stop.set()

    t = threading.Thread(target=writer)
    t.start()
    while not stop.is_set():
        for item in reg.list():
            assert item["latest"] == item["versions"][-1]
        rec = reg.resolve("f")
        assert rec.path.name == str(rec.version) == str(rec.meta["version"])
        time.sleep(0)  # let the writer have the GIL now and then
    t.join()
    assert errors == []
    assert len(reg.list()) == 31
