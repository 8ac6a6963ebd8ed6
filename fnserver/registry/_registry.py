"""The versioned function store: an in-memory index over :class:`LocalStore`.

Mutations (commit, delete, set_alias) run in worker threads under one lock; reads (resolve,
list, get) run on the event-loop thread without it. Readers never see a half-updated state
because writers publish copy-on-write: a new immutable ``_Entry`` per changed name inside a new
index dict, swapped in with one attribute assignment.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

from fnserver.protocol import ALIAS_RE, RESERVED_ALIASES, check_alias, check_name
from fnserver.protocol.errors import InternalError, InvalidArgumentError, NotFoundError

from ._store import LocalStore

__all__ = ["Registry", "VersionRecord"]

log = logging.getLogger("fnserver.registry")


@dataclass(frozen=True)
class VersionRecord:
    """One committed version: ``path`` is its directory, ``meta`` its (read-only) meta.json."""

    name: str
    version: int
    path: Path
    meta: Mapping[str, Any]


@dataclass(frozen=True)
class _Entry:
    """Everything known about one name; replaced, never mutated."""

    name: str
    next_version: int
    versions: Mapping[int, VersionRecord]  # ascending
    aliases: Mapping[str, int]
    latest: int | None

    @classmethod
    def build(
        cls,
        name: str,
        next_version: int,
        versions: Mapping[int, VersionRecord],
        aliases: Mapping[str, int],
    ) -> _Entry:
        ordered = {v: versions[v] for v in sorted(versions)}
        return cls(
            name=name,
            next_version=next_version,
            versions=MappingProxyType(ordered),
            aliases=MappingProxyType(dict(sorted(aliases.items()))),
            latest=max(ordered) if ordered else None,
        )

    def record(self) -> dict[str, Any]:
        """The function.json content for this entry."""
        return {"next_version": self.next_version, "aliases": dict(self.aliases)}

    def aliases_of(self, version: int) -> list[str]:
        return sorted(a for a, v in self.aliases.items() if v == version)

    def full_meta(self, version: int) -> dict[str, Any]:
        """A private copy of a version's metadata plus the aliases pointing at it."""
        meta = copy.deepcopy(dict(self.versions[version].meta))
        meta["aliases"] = self.aliases_of(version)
        return meta

    def versions_text(self) -> str:
        return ", ".join(map(str, self.versions))


class Registry:
    """Names, integer versions (never reused) and aliases over a data directory."""

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self._store = LocalStore(Path(data_dir))
        self._lock = threading.Lock()
        self._index: Mapping[str, _Entry] = MappingProxyType({})

    @property
    def data_dir(self) -> Path:
        """The root directory of the store."""
        return self._store.root

    # -- start-up ---------------------------------------------------------------------------

    def open(self) -> None:
        """Prepare the data directory and rebuild the index from disk, repairing what a crash left."""
        with self._lock:
            self._store.prepare()
            index: dict[str, _Entry] = {}
            for name in self._store.names():
                entry = self._load(name)
                if entry is not None:
                    index[name] = entry
            self._index = MappingProxyType(index)
        log.info("registry open at %s: %d functions", self.data_dir, len(index))

    def _load(self, name: str) -> _Entry | None:
        record = self._store.read_function(name)
        on_disk = self._store.version_numbers(name)
        if record is None and not on_disk:
            return None
        versions: dict[int, VersionRecord] = {}
        for v in on_disk:
            meta = self._store.read_meta(name, v)
            if meta is None or meta.get("name") != name or meta.get("version") != v:
                log.warning("ignoring %s: no valid meta.json", self._store.version_path(name, v))
                continue
            versions[v] = VersionRecord(
                name, v, self._store.version_path(name, v), MappingProxyType(meta)
            )
        counter = record.get("next_version") if record else None
        if not isinstance(counter, int) or isinstance(counter, bool):
            counter = 1
        # Even an invalid version directory keeps its number: it must never be handed out again.
        next_version = max([counter, *(v + 1 for v in on_disk)])
        raw_aliases = record.get("aliases") if record else None
        aliases = {
            a: v
            for a, v in (raw_aliases.items() if isinstance(raw_aliases, dict) else ())
            if isinstance(a, str)
            and ALIAS_RE.match(a)
            and a not in RESERVED_ALIASES
            and type(v) is int
            and v in versions
        }
        entry = _Entry.build(name, next_version, versions, aliases)
        if record != entry.record():
            log.warning("repairing %s/function.json", name)
            self._store.write_function(name, entry.record())
        return entry

    # -- staging ----------------------------------------------------------------------------

    def new_staging(self) -> Path:
        """A fresh, unique, empty directory to upload and build into."""
        return self._store.new_staging()

    def discard(self, staging: Path) -> None:
        """Remove a staging directory; never raises."""
        self._store.discard(staging)

    # -- mutations (worker threads) ---------------------------------------------------------

    def commit(
        self, name: str, staging: Path, meta: dict[str, Any], *, alias: str | None = None
    ) -> dict[str, Any]:
        """Publish ``staging`` as the next version of ``name``; return its metadata."""
        check_name(name)
        if alias is not None:
            check_alias(alias)
        staging = Path(staging)
        if not self._store.is_staging(staging):
            raise InternalError(f"{staging} is not a staging directory of this registry")
        try:
            json.dumps(meta)
        except (TypeError, ValueError) as exc:
            raise InvalidArgumentError(f"metadata is not JSON-serialisable: {exc}") from exc
        # Flushing artifacts needs no version number, so it stays outside the lock.
        self._store.sync_artifacts(staging)
        with self._lock:
            old = self._index.get(name)
            version = old.next_version if old else 1
            # "aliases" is live state kept in function.json, not part of the immutable meta.
            full = {k: v for k, v in meta.items() if k != "aliases"}
            full.update(name=name, version=version, created=_utc_now())
            try:
                path = self._store.publish(name, version, staging, full)
            except OSError as exc:
                raise InternalError(f"could not store {name} version {version}: {exc}") from exc
            versions = dict(old.versions) if old else {}
            versions[version] = VersionRecord(name, version, path, MappingProxyType(full))
            aliases = dict(old.aliases) if old else {}
            if alias is not None:
                aliases[alias] = version
            entry = _Entry.build(name, version + 1, versions, aliases)
            try:
                self._store.write_function(name, entry.record())
            except OSError as exc:
                self._rollback(name, version)
                raise InternalError(f"could not record {name} version {version}: {exc}") from exc
            self._publish(entry)
        return entry.full_meta(version)

    def delete(self, name: str, version: int | None = None) -> dict[str, Any]:
        """Delete one version, or every version if ``version`` is None; drop dangling aliases."""
        check_name(name)
        if version is not None:
            _check_version(version)
        graves: list[Path] = []
        try:
            with self._lock:
                old = self._existing(name)
                if version is not None and version not in old.versions:
                    raise _no_version(old, version)
                gone: list[int] = []
                failure: OSError | None = None
                for v in old.versions if version is None else [version]:
                    try:
                        graves.append(self._store.unpublish(name, v))
                    except OSError as exc:
                        failure = exc
                        break
                    gone.append(v)
                # Whatever was moved out is gone from disk, even after a failure: the index follows.
                removed = sorted(a for a, v in old.aliases.items() if v in gone)
                entry = _Entry.build(
                    name,
                    old.next_version,
                    {v: r for v, r in old.versions.items() if v not in gone},
                    {a: v for a, v in old.aliases.items() if v not in gone},
                )
                self._publish(entry)
                try:
                    self._store.write_function(name, entry.record())
                except OSError as exc:
                    # open() drops aliases to missing versions, so disk repairs itself later.
                    log.warning("could not update %s/function.json: %s", name, exc)
                if failure is not None:
                    raise InternalError(f"could not delete {name}: {failure}") from failure
        finally:
            # The slow part, outside the lock: the directories are already invisible.
            for grave in graves:
                self._store.discard(grave)
        return {"name": name, "deleted": gone, "aliases_removed": removed}

    def set_alias(self, name: str, alias: str, version: int) -> dict[str, Any]:
        """Point ``alias`` at ``version`` of ``name``, creating or moving it."""
        check_name(name)
        check_alias(alias)
        _check_version(version)
        with self._lock:
            old = self._existing(name)
            if version not in old.versions:
                raise _no_version(old, version)
            previous = old.aliases.get(alias)
            entry = _Entry.build(
                name, old.next_version, old.versions, {**old.aliases, alias: version}
            )
            try:
                self._store.write_function(name, entry.record())
            except OSError as exc:
                raise InternalError(f"could not record alias {alias!r} of {name}: {exc}") from exc
            self._publish(entry)
        return {"name": name, "alias": alias, "version": version, "previous": previous}

    def _rollback(self, name: str, version: int) -> None:
        # Take a half-committed version back so that disk and index agree. If even that fails
        # the directory stays: open() will find it, and publish() refuses to overwrite it.
        try:
            self._store.discard(self._store.unpublish(name, version))
        except OSError as exc:
            log.error("could not roll back %s version %d: %s", name, version, exc)

    def _publish(self, entry: _Entry) -> None:
        # Caller holds the lock. A new dict, never an in-place update: readers may be iterating.
        self._index = MappingProxyType({**self._index, entry.name: entry})

    # -- reads (event-loop thread, lock-free) -----------------------------------------------

    def resolve(self, name: str, ref: int | str | None = None) -> VersionRecord:
        """The version ``ref`` names: None/"latest" = newest, an int or digit string, or an alias."""
        entry = self._existing(name)
        if ref is None or ref == "latest":
            assert entry.latest is not None  # _existing guarantees at least one version
            return entry.versions[entry.latest]
        if isinstance(ref, bool):
            raise InvalidArgumentError(f"invalid version {ref!r}")
        if isinstance(ref, str) and ref.isascii() and ref.isdigit():
            ref = int(ref)
        if isinstance(ref, int):
            record = entry.versions.get(ref)
            if record is None:
                raise _no_version(entry, ref)
            return record
        if isinstance(ref, str):
            target = entry.aliases.get(ref)
            if target is None:
                raise NotFoundError(
                    f"function {name!r} has no alias {ref!r}", {"name": name, "alias": ref}
                )
            return entry.versions[target]
        raise InvalidArgumentError(f"invalid version {ref!r}: expected an integer or an alias")

    def list(self) -> list[dict[str, Any]]:
        """Every function with at least one version, sorted by name."""
        out = []
        for name, entry in sorted(self._index.items()):
            if entry.latest is None:
                continue
            latest = entry.versions[entry.latest].meta
            out.append(
                {
                    "name": name,
                    "latest": entry.latest,
                    "versions": list(entry.versions),
                    "aliases": dict(entry.aliases),
                    "kind": latest.get("kind"),
                    "description": latest.get("description") or "",
                }
            )
        return out

    def get(self, name: str) -> dict[str, Any]:
        """One function: its aliases and the full metadata of every version, ascending."""
        entry = self._existing(name)
        return {
            "name": name,
            "latest": entry.latest,
            "aliases": dict(entry.aliases),
            "versions": [entry.full_meta(v) for v in entry.versions],
        }

    def _existing(self, name: str) -> _Entry:
        entry = self._index.get(name)
        if entry is None or entry.latest is None:
            raise NotFoundError(f"no function named {name!r}", {"name": name})
        return entry


def _check_version(version: object) -> None:
    if type(version) is not int or version < 1:
        raise InvalidArgumentError(f"invalid version {version!r}: expected an integer >= 1")


def _no_version(entry: _Entry, version: int) -> NotFoundError:
    return NotFoundError(
        f"function {entry.name!r} has no version {version} (versions: {entry.versions_text()})",
        {"name": entry.name, "version": version},
    )


def _utc_now() -> str:
    """UTC ISO-8601 with milliseconds and a Z, e.g. 2026-11-25T10:43:17.123Z."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
