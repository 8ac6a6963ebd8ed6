"""The registry facade: an in-memory index of versions and aliases over the two stores.

Reads (:meth:`Registry.resolve`, :meth:`~Registry.get`, :meth:`~Registry.list`,
:meth:`~Registry.artifact_path`) are synchronous, lock-free lookups in the index: they sit on
the invoke path. Writes go to the stores (which do their I/O in threads) and then reload the
one name they touched. :meth:`~Registry.refresh` applies the metadata store's change feed, so
what another writer did (another serving process, later another node) shows up too.

The index is copy-on-write: a new immutable ``_Entry`` per changed name inside a new mapping,
swapped in with one attribute assignment, so a reader never sees half an update. Reloads and
their publication are serialised by one asyncio lock, so an older read never replaces a newer
one.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType

from fnserver.artifacts import sha256_file
from fnserver.protocol import (
    ARTIFACT_KINDS,
    MAX_PAGE,
    AliasReply,
    ArtifactKind,
    DeleteReply,
    FnError,
    FunctionSummary,
    GetReply,
    InvalidArgumentError,
    ListReply,
    NotFoundError,
    VersionInfo,
    VersionRef,
    check_alias,
    check_name,
    parse_version_ref,
    split_qualified,
)

from . import _fs, _meta
from ._interfaces import ArtifactStore, FunctionRecord, MetadataStore, no_function, no_version
from ._local import LocalStore
from ._meta import NewVersion, artifact_digests
from ._sqlite import DigestArtifactStore, SqliteMetadataStore

__all__ = ["Registry"]

log = logging.getLogger("fnserver.registry")


@dataclass(frozen=True)
class _Entry:
    """Everything the index knows about one name with at least one version; never mutated."""

    name: str
    #: version -> metadata as stored (no aliases): what a reload can reuse.
    stored: Mapping[int, VersionInfo]
    #: version -> metadata with the aliases pointing at it: what readers get.
    versions: Mapping[int, VersionInfo]
    order: tuple[int, ...]
    aliases: Mapping[str, int]
    latest: int
    summary: FunctionSummary

    @classmethod
    def build(
        cls, name: str, stored: Mapping[int, VersionInfo], aliases: Mapping[str, int]
    ) -> _Entry:
        order = tuple(sorted(stored))
        pointing: dict[int, list[str]] = {}
        for alias, v in sorted(aliases.items()):
            pointing.setdefault(v, []).append(alias)
        versions = {
            v: replace(stored[v], aliases=tuple(pointing[v])) if v in pointing else stored[v]
            for v in order
        }
        latest = versions[order[-1]]
        aliases = MappingProxyType(dict(sorted(aliases.items())))
        return cls(
            name=name,
            stored=MappingProxyType({v: stored[v] for v in order}),
            versions=MappingProxyType(versions),
            order=order,
            aliases=aliases,
            latest=latest.version,
            summary=FunctionSummary(
                name=name,
                latest=latest.version,
                versions=order,
                aliases=aliases,
                kind=latest.kind,
                description=latest.description,
                tenant=split_qualified(name)[0],
            ),
        )


class Registry:
    """Names, integer versions (never reused) and aliases over a metadata and an artifact store."""

    def __init__(
        self,
        metadata: MetadataStore,
        artifacts: ArtifactStore,
        *,
        default_timeout_ms: int = 5000,
        default_memory_mb: int = 128,
    ) -> None:
        self.metadata = metadata
        self.artifacts = artifacts
        self._defaults = {"timeout_ms": default_timeout_ms, "memory_mb": default_memory_mb}
        self._index: Mapping[str, _Entry] = MappingProxyType({})
        self._cursor: int | None = None
        self._sync = asyncio.Lock()
        # Numbers of refreshes begun and of the last one that completed (see refresh()).
        self._refreshes_started = 0
        self._refresh_done = 0
        # Staging directories whose removal failed, retried by the next staging call.
        self._leftovers: set[Path] = set()
        #: Refresh as soon as the metadata store says another writer changed something (a
        #: store with a ``changed`` event: PostgreSQL's notifications).
        self._follow = False
        self._follower: asyncio.Task[None] | None = None

    @classmethod
    def local(cls, data_dir: Path, *, read_only: bool = False, **defaults: int) -> Registry:
        """The seed's layout under ``data_dir`` (``<name>/<version>/main.wasm`` ...);
        ``read_only``: another process writes it (a serving process's view)."""
        store = LocalStore(Path(data_dir), read_only=read_only)
        return cls(store, store, **defaults)

    @classmethod
    def sqlite(cls, root: Path, **defaults: int) -> Registry:
        """SQLite metadata at ``root/registry.db``, artifacts by digest under ``root/artifacts``."""
        root = Path(root)
        return cls(
            SqliteMetadataStore(root / "registry.db"),
            DigestArtifactStore(root / "artifacts", root / "staging"),
            **defaults,
        )

    @classmethod
    def postgres(cls, dsn: str, root: Path, *, read_only: bool = False, follow: bool | None = None,
                 **defaults: int) -> Registry:
        """Metadata and artifacts in the PostgreSQL database at ``dsn``, shared by every node;
        this node's artifact cache under ``root/artifacts`` (``fnserver/registry/_postgres.py``).

        A writer (the control process) also follows the other nodes' writes as they are
        notified, fetching their artifacts into the node's cache; ``read_only`` (a serving
        process, which cannot write the cache) waits for those files instead. ``follow``
        overrides whether it follows (default: a writer does)."""
        from ._postgres import PostgresArtifactStore, PostgresMetadataStore

        root = Path(root)
        metadata = PostgresMetadataStore(dsn, read_only=read_only)
        artifacts = PostgresArtifactStore(metadata, root / "artifacts", root / "staging", read_only=read_only)
        registry = cls(metadata, artifacts, **defaults)
        registry._follow = (not read_only) if follow is None else follow
        return registry

    # -- life cycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Prepare storage, clean leftovers, load the index."""
        async with self._storage("open the registry"):
            await self.metadata.open()
            if self.artifacts is not self.metadata:
                await self.artifacts.open()
        async with self._sync, self._storage("load the registry"):
            await self._reload_all()
        changed = getattr(self.metadata, "changed", None)
        if self._follow and isinstance(changed, asyncio.Event) and self._follower is None:
            self._follower = asyncio.ensure_future(self._follow_changes(changed))
        log.info("registry open: %d functions", len(self._index))

    async def _follow_changes(self, changed: asyncio.Event) -> None:
        """Refresh after each notified change, so this node's cache holds a version's
        artifacts before anyone here asks for it."""
        while True:
            await changed.wait()
            changed.clear()
            try:
                await self.refresh()
            except FnError as exc:  # the next notification, or a read's refresh, tries again
                log.warning("registry: could not follow a change: %s", exc.message)

    async def close(self) -> None:
        """Close both stores; idempotent."""
        if self._follower is not None:
            self._follower.cancel()
            await asyncio.wait([self._follower])
            self._follower = None
        await self.metadata.close()
        if self.artifacts is not self.metadata:
            await self.artifacts.close()

    async def refresh(self) -> None:
        """Apply what changed in the metadata store since the last look (any writer's changes).

        Cheap when nothing changed: one look at the change feed. Callers that arrive while a
        refresh runs share the next one, so a burst of misses costs two looks, not a queue.
        """
        ticket = self._refreshes_started
        async with self._sync:
            if self._refresh_done > ticket:
                # A refresh that began after this call arrived has completed meanwhile: it saw
                # everything that had happened before this call.
                return
            self._refreshes_started += 1
            number = self._refreshes_started
            async with self._storage("refresh the registry"):
                cursor, names = await self.metadata.changes(self._cursor)
                if names is None:
                    await self._reload_all()
                else:
                    if names:
                        records = {n: await self.metadata.load(n) for n in sorted(names)}
                        await self._fetch(records.values())
                        self._publish(records)
                    self._cursor = cursor
            self._refresh_done = number

    async def _reload_all(self) -> None:
        # Caller holds _sync. The cursor is taken first: a write that lands during the load is
        # then reported again by the next refresh instead of being missed.
        cursor, _ = await self.metadata.changes(None)
        records = await self.metadata.load_all()
        await self._fetch(records.values())
        old = self._index
        entries = await asyncio.to_thread(self._entries, records, old)
        self._index = MappingProxyType({n: e for n, e in sorted(entries.items()) if e is not None})
        self._cursor = cursor

    async def _fetch(self, records: Iterable[FunctionRecord | None]) -> None:
        """Bring the artifacts of ``records``' versions to this node before they are shown
        (a shared store's other writers put them; a local store has them already)."""
        digests = [
            digest
            for record in records
            if record is not None
            for doc in record.versions.values()
            for digest in artifact_digests(doc).values()
        ]
        if digests:
            await self.artifacts.fetch(digests)

    def stale(self) -> bool:
        """Whether another writer may have changed the store since the last refresh; no I/O.

        The hot path can afford it (a memory read): ``if registry.stale(): await
        registry.refresh()`` before a resolve sees another process's delete or alias move,
        which the "refresh on NOT_FOUND" pattern alone would miss.
        """
        hint = self.metadata.peek()
        return hint is None or hint != self._cursor

    async def _reload(self, name: str) -> None:
        """Catch up after this registry changed ``name``: through the feed, which records the
        write, so the cursor moves past it too and ``stale()`` stays false."""
        await self.refresh()

    def _publish(self, records: Mapping[str, FunctionRecord | None]) -> None:
        # A new mapping, never an in-place update: readers may be iterating the old one.
        index = dict(self._index)
        for name, entry in self._entries(records, self._index, keep_missing=True).items():
            if entry is None:
                index.pop(name, None)
            else:
                index[name] = entry
        self._index = MappingProxyType(dict(sorted(index.items())))

    def _entries(
        self,
        records: Mapping[str, FunctionRecord | None],
        old: Mapping[str, _Entry],
        *,
        keep_missing: bool = False,
    ) -> dict[str, _Entry | None]:
        """Index entries for ``records``; names with no version map to None if keep_missing."""
        out: dict[str, _Entry | None] = {}
        for name, record in records.items():
            entry = self._entry(name, record, old.get(name))
            if entry is not None or keep_missing:
                out[name] = entry
        return out

    def _entry(self, name: str, record: FunctionRecord | None, old: _Entry | None) -> _Entry | None:
        if record is None:
            return None
        stored: dict[int, VersionInfo] = {}
        for v, doc in record.versions.items():
            # Versions are immutable: what was decoded once is reused.
            known = old.stored.get(v) if old is not None else None
            if known is not None:
                stored[v] = known
                continue
            try:
                info = _meta.decode(doc, **self._defaults)
            except FnError as exc:
                log.warning("ignoring version %d of %r: %s", v, name, exc)
                continue
            if (info.name, info.version) != (name, v):
                log.warning("ignoring version %d of %r: its record names another", v, name)
                continue
            stored[v] = info
        if not stored:
            return None
        aliases = {a: v for a, v in record.aliases.items() if v in stored}
        return _Entry.build(name, stored, aliases)

    # -- staging ------------------------------------------------------------------------------

    async def new_staging(self) -> Path:
        """A fresh, unique, empty directory (0755) to upload and build into."""
        if self._leftovers:
            await self._discard_all(set())
        async with self._storage("create a staging directory"):
            return await self.artifacts.new_staging()

    async def discard(self, path: Path) -> None:
        """Remove a staging directory; never raises. One that cannot be removed now (no
        descriptor left for rmtree, say) is tried again with the next staging call, so the
        server cleans up after itself once the pressure is gone, without a restart."""
        await self._discard_all({Path(path)})

    async def _discard_all(self, paths: set[Path]) -> None:
        todo = paths | self._leftovers
        self._leftovers -= todo
        try:
            for path in todo:
                await self.artifacts.discard(path)
            # The stores log and swallow what they could not remove: look for it.
            left = await asyncio.to_thread(lambda: {p for p in todo if p.exists()})
        except Exception as exc:  # a cleanup must not hide the error that led to it
            log.warning("could not discard a staging directory: %s", exc)
            left = todo
        self._leftovers |= left

    # -- writes -------------------------------------------------------------------------------

    async def commit(
        self,
        name: str,
        artifacts: Mapping[ArtifactKind, Path],
        meta: NewVersion,
        *,
        alias: str | None = None,
    ) -> VersionInfo:
        """Publish ``artifacts`` as the next version of ``name``; return its metadata.

        The version number is allocated by the metadata store in the same step that records
        the version. On any failure nothing is left behind, and a number that was allocated
        stays burnt. The files in ``artifacts`` are copied, not moved: the caller discards
        its staging directory afterwards as always.
        """
        check_name(name)
        if alias is not None:
            check_alias(alias)
        if not isinstance(meta, NewVersion):
            raise InvalidArgumentError("commit needs a NewVersion")
        if not artifacts or any(k not in ARTIFACT_KINDS for k in artifacts):
            raise InvalidArgumentError(
                f"artifacts must be a non-empty map of {', '.join(ARTIFACT_KINDS)} to files"
            )
        files = {k: Path(p) for k, p in artifacts.items()}
        async with self._storage(f"read the artifacts of {name!r}"):
            digests = await asyncio.to_thread(
                lambda: {k: sha256_file(p) for k, p in files.items()}
            )
        draft = meta.to_info(name, 1, _meta.utc_now(), digests)
        doc = _meta.encode(draft)
        del doc["version"]  # assigned by the store
        put: list[str] = []
        try:
            async with self._storage(f"store the artifacts of {name!r}"):
                for kind in draft.artifacts:
                    await self.artifacts.put(digests[kind], files[kind])
                    put.append(digests[kind])
            try:
                async with self._storage(f"store a version of {name!r}"):
                    version = await self.metadata.put_version(name, doc, alias=alias)
            except BaseException:
                await self._collect(put)
                raise
        finally:
            for digest in put:
                with contextlib.suppress(Exception):
                    await self.artifacts.release(digest)
        await self._reload(name)
        entry = self._index.get(name)
        if entry is not None and version in entry.versions:
            return entry.versions[version]
        # Deleted by another writer before we could read it back.
        return replace(draft, version=version, aliases=(alias,) if alias else ())

    async def delete(self, name: str, version: int | None = None) -> DeleteReply:
        """Delete one version, or every version when ``version`` is None; drop their aliases.

        The name's counter survives: a deleted number is never handed out again.
        """
        check_name(name)
        if version is not None:
            _check_version(version)
        try:
            async with self._storage(f"delete {name!r}"):
                deleted = await self.metadata.delete(name, version)
        finally:
            await self._reload(name)
        await self._collect(deleted.digests)
        return DeleteReply(
            name=name, deleted=deleted.versions, aliases_removed=deleted.aliases_removed
        )

    async def set_alias(self, name: str, alias: str, version: int) -> AliasReply:
        """Point ``alias`` at ``version`` of ``name``, creating or moving it."""
        check_name(name)
        check_alias(alias)
        _check_version(version)
        async with self._storage(f"record alias {alias!r} of {name!r}"):
            previous = await self.metadata.set_alias(name, alias, version)
        await self._reload(name)
        return AliasReply(name=name, alias=alias, version=version, previous=previous)

    async def _collect(self, digests: Iterable[str]) -> None:
        """Delete the artifacts of ``digests`` that no version refers to any more; never raises."""
        wanted = set(digests)
        if not wanted:
            return
        try:
            in_use = await self.metadata.digests_in_use(wanted)
            for digest in sorted(wanted - in_use):
                await self.artifacts.forget(digest)
        except Exception as exc:  # an orphaned artifact costs space, never correctness
            log.warning("could not remove unused artifacts: %s", exc)

    @contextlib.asynccontextmanager
    async def _storage(self, what: str) -> AsyncIterator[None]:
        """Storage failures the stores did not word themselves: RESOURCE_EXHAUSTED for a full
        disk or exhausted descriptors, else INTERNAL; never with a path."""
        try:
            yield
        except FnError:
            raise
        except OSError as exc:
            raise _fs.storage_error(what, exc) from exc

    # -- reads (event-loop thread, lock-free, no I/O) -----------------------------------------

    def resolve(self, name: str, ref: VersionRef = None) -> VersionInfo:
        """The version ``ref`` names: None/"latest" = newest, a number or digit string, or an alias.

        Only the in-memory index is consulted; a caller that gets NOT_FOUND may ``refresh()``
        and try once more to see what another writer did meanwhile.
        """
        entry = self._existing(name)
        ref = parse_version_ref(ref)
        if ref is None:
            return entry.versions[entry.latest]
        if isinstance(ref, int):
            info = entry.versions.get(ref)
            if info is None:
                raise no_version(name, entry.order, ref)
            return info
        target = entry.aliases.get(ref)
        if target is None:
            raise NotFoundError(
                f"function {name!r} has no alias {ref!r}", {"name": name, "alias": ref}
            )
        return entry.versions[target]

    def artifact_path(self, info: VersionInfo, kind: ArtifactKind) -> Path:
        """A local readable file holding ``info``'s artifact of ``kind``."""
        digest = info.artifact_sha256.get(kind)
        if digest is None or kind not in info.artifacts:
            raise NotFoundError(
                f"version {info.version} of {info.name!r} has no {kind} artifact",
                {"name": info.name, "version": info.version},
            )
        try:
            return self.artifacts.path(digest)
        except LookupError:
            raise NotFoundError(
                f"version {info.version} of {info.name!r} is no longer stored",
                {"name": info.name, "version": info.version},
            ) from None

    def versions_of(self, name: str) -> tuple[VersionInfo, ...]:
        """Every live version of ``name``, ascending (empty for an unknown name)."""
        entry = self._index.get(name)
        return () if entry is None else tuple(entry.stored[v] for v in entry.order)

    def list(self) -> ListReply:
        """Every function with at least one version, sorted by name."""
        return ListReply(tuple(entry.summary for entry in self._index.values()))

    def get(
        self,
        name: str,
        *,
        version: VersionRef = None,
        limit: int = 50,
        cursor: int | None = None,
        log: bool = False,
    ) -> GetReply:
        """One function and one page of its versions, ascending.

        At most ``limit`` (1..100) versions after version ``cursor`` (None: from the first);
        ``next_cursor`` is the last version returned when more remain. With ``version`` set,
        just that version (an alias or "latest" works too). Build logs only with ``log``.
        """
        entry = self._existing(name)
        if type(limit) is not int or not 1 <= limit <= MAX_PAGE:
            raise InvalidArgumentError(
                f"'limit' must be an integer from 1 to {MAX_PAGE}, got {limit!r}"
            )
        if cursor is not None and (type(cursor) is not int or cursor < 0):
            raise InvalidArgumentError(f"'cursor' must be a version number, got {cursor!r}")
        next_cursor: int | None = None
        if version is not None:
            page: tuple[VersionInfo, ...] = (self.resolve(name, version),)
        else:
            start = bisect.bisect_right(entry.order, cursor or 0)
            numbers = entry.order[start : start + limit]
            page = tuple(entry.versions[v] for v in numbers)
            if start + limit < len(entry.order):
                next_cursor = numbers[-1]
        return GetReply(
            name=name,
            latest=entry.latest,
            aliases=entry.aliases,
            versions=page,
            next_cursor=next_cursor,
            log=log,
        )

    def _existing(self, name: str) -> _Entry:
        entry = self._index.get(name)
        if entry is None:
            check_name(name)  # only on a miss: the hit path stays one dict lookup
            raise no_function(name)
        return entry


def _check_version(version: object) -> None:
    if type(version) is not int or version < 1:
        raise InvalidArgumentError(f"invalid version {version!r}: expected an integer >= 1")
