"""Version metadata as stored: schema 2, written and read in one place (registry/_meta.py)."""

from __future__ import annotations

import pytest

from fnserver.protocol import FunctionLimits, InvalidArgumentError
from fnserver.registry import SCHEMA, NewVersion, _meta

NEW = NewVersion(
    filename="f.go",
    size=9,
    sha256="ab" * 32,
    kind="go",
    limits=FunctionLimits(timeout_ms=100, memory_mb=16, fuel=5),
    description="d",
    toolchain="go",
    build_ms=3,
    build_log="log",
)


def test_round_trip_keeps_everything_but_aliases() -> None:
    info = NEW.to_info("f", 4, "2026-01-01T00:00:00.000Z", {"native": "c" * 64, "wasm": "d" * 64})
    assert (info.artifacts, info.mode) == (("wasm", "native"), "wasm")
    doc = _meta.encode(info)
    assert doc["schema"] == SCHEMA == 2
    assert "aliases" not in doc
    assert doc["build_log"] == "log"
    assert _meta.decode(doc, timeout_ms=1, memory_mb=1) == info
    assert _meta.decode({**doc, "aliases": ["x"]}, timeout_ms=1, memory_mb=1) == info


def test_native_only_is_native_mode() -> None:
    info = NEW.to_info("f", 1, "", {"native": "c" * 64})
    assert (info.artifacts, info.mode) == (("native",), "native")


def test_a_version_needs_an_artifact() -> None:
    with pytest.raises(InvalidArgumentError):
        NEW.to_info("f", 1, "", {})


def test_old_record_takes_default_limits() -> None:
    info = _meta.decode(
        {"name": "f", "version": 2, "limits": {"timeout_ms": 5}}, timeout_ms=7, memory_mb=8
    )
    assert info.limits == FunctionLimits(timeout_ms=5, memory_mb=8)
    assert info.artifact_sha256 == {}


def test_artifact_digests_keeps_valid_entries_only() -> None:
    doc = {"artifact_sha256": {"wasm": "a" * 64, "native": "A" * 64, "jar": "b" * 64}}
    assert _meta.artifact_digests(doc) == {"wasm": "a" * 64}
    assert _meta.artifact_digests({"artifact_sha256": "nope"}) == {}
    assert _meta.artifact_digests({}) == {}
