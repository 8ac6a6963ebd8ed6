"""Version metadata, written and read in this one place.

A stored version record (``meta.json`` in the local layout, a JSON column elsewhere) is
``VersionInfo.to_wire()`` without ``aliases`` (live state, kept with the function) and with
``"schema": 2``; the build log is part of it. Records written before schema 2 have no
``schema`` and no ``artifact_sha256``: they still decode (``VersionInfo.from_wire`` is lenient),
and the local store fills in the missing digests from the files when it loads them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Final

from fnserver.protocol import (
    ARTIFACT_KINDS,
    ArtifactKind,
    FunctionLimits,
    InvalidArgumentError,
    VersionInfo,
)

__all__ = ["SCHEMA", "NewVersion", "artifact_digests", "decode", "encode", "utc_now"]

#: The version of the stored record's shape. 1 (implicit: no ``schema`` key) was a free dict.
SCHEMA: Final = 2


@dataclass(frozen=True, slots=True)
class NewVersion:
    """What a new version's metadata holds besides what :meth:`Registry.commit` assigns.

    The registry assigns ``name``, ``version``, ``created``, ``artifacts``, ``mode`` and
    ``artifact_sha256`` itself, from the name and the artifact files it is given.
    """

    filename: str
    size: int
    sha256: str
    kind: str
    limits: FunctionLimits
    description: str = ""
    toolchain: str | None = None
    build_ms: int = 0
    build_log: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)

    def to_info(
        self, name: str, version: int, created: str, digests: Mapping[ArtifactKind, str]
    ) -> VersionInfo:
        """The full record of this version once its number and artifacts are known."""
        artifacts = tuple(k for k in ARTIFACT_KINDS if k in digests)
        if not artifacts:
            raise InvalidArgumentError("a version needs at least one artifact")
        return VersionInfo(
            name=name,
            version=version,
            created=created,
            filename=self.filename,
            size=self.size,
            sha256=self.sha256,
            kind=self.kind,
            artifacts=artifacts,
            mode="wasm" if "wasm" in artifacts else "native",
            limits=self.limits,
            description=self.description,
            toolchain=self.toolchain,
            build_ms=self.build_ms,
            artifact_sha256={k: digests[k] for k in artifacts},
            build_log=self.build_log,
            env=dict(self.env),
        )


def encode(info: VersionInfo) -> dict[str, Any]:
    """The stored record of ``info``: its wire form with the log, without aliases, schema 2."""
    doc = info.to_wire(log=True)
    del doc["aliases"]
    # The values too (the wire form has the names only): the function needs them to run.
    doc["env"] = dict(info.env)
    doc["schema"] = SCHEMA
    return doc


def decode(doc: Mapping[str, Any], *, timeout_ms: int, memory_mb: int) -> VersionInfo:
    """A stored record of any schema as a :class:`VersionInfo` without aliases.

    Limits an old record lacks take the given defaults. Raises InvalidArgumentError when the
    record has no valid name or version.
    """
    info = VersionInfo.from_wire(doc, timeout_ms=timeout_ms, memory_mb=memory_mb)
    if info.aliases:
        # Aliases are never stored with a version; an old record that had them is stale.
        info = replace(info, aliases=())
    return info


def artifact_digests(doc: Mapping[str, Any]) -> dict[ArtifactKind, str]:
    """The ``kind -> sha256`` map of a stored record, valid entries only."""
    raw = doc.get("artifact_sha256")
    if not isinstance(raw, Mapping):
        return {}
    return {
        k: v
        for k in ARTIFACT_KINDS
        if isinstance(v := raw.get(k), str)
        and len(v) == 64
        and all(c in "0123456789abcdef" for c in v)
    }


def utc_now() -> str:
    """UTC ISO-8601 with milliseconds and a Z, e.g. 2026-11-25T10:43:17.123Z."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
