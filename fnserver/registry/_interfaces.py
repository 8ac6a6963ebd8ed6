"""The storage seam: what the registry needs from a metadata store and an artifact store.

Two narrow interfaces, so that a database can fill them (DESIGN.md "Scale-out"):

* :class:`MetadataStore` holds, per function name, a version counter that never goes back,
  one immutable record per version (a JSON object: ``_meta.encode``'s output) and the aliases.
  ``put_version`` allocates the number *and* records the version in one step, which a database
  does in one transaction. ``changes`` is the change feed: it tells a reader which names another
  writer (another process on the same data dir, later another node) changed since its cursor.
* :class:`ArtifactStore` holds artifact bytes by sha256 digest and hands out a local readable
  path for one. It also owns the staging area uploads and builds land in, because a store puts
  an artifact most cheaply from the same file system.

Every method that may touch storage is async and does its blocking work in a thread. Failures
surface as :mod:`fnserver.protocol` errors (NotFoundError, InternalError) whose messages never
name a server path.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from fnserver.protocol import NotFoundError

__all__ = [
    "ArtifactStore",
    "Deleted",
    "FunctionRecord",
    "MetadataStore",
    "no_function",
    "no_version",
]

#: One stored version record: a JSON object (see ``_meta``), name and version included.
Doc = Mapping[str, Any]


@dataclass(frozen=True)
class FunctionRecord:
    """Everything a metadata store keeps about one name.

    A name whose versions were all deleted still has a record (a tombstone): its
    ``next_version`` keeps counting, so a number is never handed out twice.
    """

    name: str
    next_version: int
    #: version -> stored record, ascending.
    versions: Mapping[int, Doc] = field(default_factory=dict)
    aliases: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Deleted:
    """What one ``delete`` removed."""

    versions: tuple[int, ...]
    aliases_removed: tuple[str, ...]
    #: The artifact digests the deleted versions referred to (some may still be in use).
    digests: frozenset[str] = frozenset()


@runtime_checkable
class MetadataStore(Protocol):
    """Version counters, version records and aliases per function name, plus a change feed."""

    async def open(self) -> None:
        """Prepare storage, repair what a crash left; idempotent."""
        ...

    async def close(self) -> None:
        """Release what ``open`` took; idempotent."""
        ...

    async def put_version(self, name: str, doc: Doc, *, alias: str | None = None) -> int:
        """Allocate the next version number of ``name`` and record ``doc`` under it, atomically.

        ``doc``'s ``name`` and ``version`` are set by the store. With ``alias``, the alias
        points at the new version in the same step. The number is burnt even if this fails
        after allocating it. The artifacts ``doc`` names must have been put before.
        """
        ...

    async def load(self, name: str) -> FunctionRecord | None:
        """One name's record, or None if the store never saw it."""
        ...

    async def load_all(self) -> dict[str, FunctionRecord]:
        """Every name's record."""
        ...

    async def names(self) -> list[str]:
        """Every name the store knows (tombstones included), sorted."""
        ...

    async def set_alias(self, name: str, alias: str, version: int) -> int | None:
        """Point ``alias`` at an existing ``version``; return the version it pointed at before."""
        ...

    async def delete(self, name: str, version: int | None = None) -> Deleted:
        """Delete one version, or all of them when ``version`` is None; drop their aliases."""
        ...

    async def digests_in_use(self, digests: Iterable[str]) -> frozenset[str]:
        """Those of ``digests`` that some recorded version still refers to."""
        ...

    def peek(self) -> int | None:
        """The newest cursor, if the store can tell without I/O (a mapped counter, a pushed
        notification); None when it cannot. A hint: it may run ahead of what ``changes``
        reports, never behind it."""
        ...

    async def changes(self, since: int | None) -> tuple[int, frozenset[str] | None]:
        """The change feed: ``(cursor, names changed after since)``.

        ``since=None`` asks for the current cursor only (the answer's names are None). A None
        in the answer also means "the feed cannot say, reload everything". Cheap when nothing
        changed: it is called before every read that misses.
        """
        ...


@runtime_checkable
class ArtifactStore(Protocol):
    """Artifact bytes addressed by sha256, and the staging area uploads are built in."""

    async def open(self) -> None:
        """Prepare storage and remove leftover staging entries; idempotent."""
        ...

    async def close(self) -> None:
        """Release what ``open`` took; idempotent."""
        ...

    async def new_staging(self) -> Path:
        """A fresh, unique, empty directory (mode 0755) to upload and build into."""
        ...

    async def discard(self, path: Path) -> None:
        """Remove a staging directory; never raises."""
        ...

    async def put(self, digest: str, source: Path) -> None:
        """Store the bytes of ``source`` under ``digest``, refusing them if the digest differs.

        ``source`` is left in place (its staging directory is the caller's to discard).
        """
        ...

    async def release(self, digest: str) -> None:
        """The registry is done with one ``put`` of ``digest`` (committed or abandoned).

        Called once per ``put``, after ``put_version`` or instead of it: a store that keeps
        pending copies (the local one) drops one here; a content-addressed one does nothing.
        """
        ...

    async def fetch(self, digests: Iterable[str]) -> None:
        """Make each digest readable at :meth:`path` on this node (a shared store copies what
        another node put into its local cache; a local store has nothing to do). Called
        before the registry shows a version another writer recorded."""
        ...

    def path(self, digest: str) -> Path:
        """A local readable file holding ``digest``'s bytes; no I/O (it is on the invoke path).

        Raises LookupError when the store does not know the digest.
        """
        ...

    async def forget(self, digest: str) -> None:
        """Delete ``digest``'s bytes: the registry calls this only when no version refers to it.

        (Not ``delete``: one class may implement both interfaces, as the local store does.)
        """
        ...


def no_function(name: str) -> NotFoundError:
    """The NOT_FOUND error for an unknown name (or one with no version left)."""
    return NotFoundError(f"no function named {name!r}", {"name": name})


def no_version(name: str, versions: Iterable[int], version: int) -> NotFoundError:
    """The NOT_FOUND error for a missing version, listing the versions there are."""
    listed = ", ".join(map(str, sorted(versions)))
    return NotFoundError(
        f"function {name!r} has no version {version} (versions: {listed})",
        {"name": name, "version": version},
    )
