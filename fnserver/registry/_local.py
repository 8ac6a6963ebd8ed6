"""The local file system as both metadata store and artifact store, in the seed's layout.

Layout (DESIGN.md)::

    <root>/<name>/function.json          {"next_version": N, "aliases": {"prod": 3}}
    <root>/<name>/<version>/meta.json    the version's record (``_meta``)
    <root>/<name>/<version>/main.wasm    artifacts, one fixed file name per kind
    <root>/<name>/<version>/main.bin       (``fnserver.artifacts.ARTIFACT_FILES``)
    <root>/.staging/<unique>/            uploads and builds in progress, versions being
                                         assembled, deleted versions being removed
    <root>/.lock                         flock(2) target: exclusive for writers, shared for readers
    <root>/.changes                      the change feed: "<generation> <name>" lines
    <root>/.generation                   the newest generation, 8 bytes, read through mmap

Function names never start with '.', so the dot entries cannot clash with one.

Why one class is both stores: in this layout a version's artifacts live *inside* its version
directory, and the directory appears in one rename, which is also what records the version.
So ``put`` (artifact side) copies the bytes, checked against their digest, into a pending
file under ``.staging``; ``put_version`` (metadata side) links the pending files into a fresh
directory under ``.staging``, writes ``meta.json`` there and renames it to
``<name>/<version>``. ``path(digest)`` resolves a digest to a file in some version directory
holding those bytes, from a map this store keeps of every version it has loaded.

Crash safety. Every record is written to a temp file, fsynced and renamed; directories are
fsynced after a rename. ``put_version`` first burns the number (``function.json`` with the
next counter) and then renames the version into place: a crash between the two leaves a gap,
never a reused number. ``open`` removes staging entries of dead processes (each entry's name
starts with its owner's pid: serving processes share the area) and leftover temp files, and
repairs ``function.json`` from the version directories (the counter never falls below the highest
directory + 1; aliases to missing versions are dropped).

Change feed across processes. Every write holds an exclusive ``flock`` on ``.lock`` and, before
releasing it, appends ``"<generation> <name>\\n"`` to ``.changes`` with the next generation
(the last line's + 1). Readers take the lock shared, so they never see a write half done. A
reader's cursor is the generation it has seen; ``changes(since)`` stats the log (one syscall
when nothing changed), reads only the bytes appended since its last call, and reports the names
of lines with a generation above ``since``. When the log passes ``_COMPACT_BYTES`` a writer
rewrites it keeping only each name's last line (same generations, so cursors stay valid) and
renames it into place; a reader notices the new inode and rereads it from the start.
Writers also store the new generation in ``.generation``, which readers map: ``peek()`` tells
whether anything changed with one memory read, so the invoke path can afford to ask.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import re
import secrets
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from fnserver.artifacts import ARTIFACT_FILES, META_FILE, sha256_file
from fnserver.protocol import (
    ALIAS_RE,
    ARTIFACT_KINDS,
    QUALIFIED_NAME_RE,
    RESERVED_ALIASES,
    ArtifactKind,
    FnError,
    InternalError,
)

from . import _fs
from ._interfaces import Deleted, FunctionRecord, no_function, no_version
from ._meta import artifact_digests

__all__ = ["LocalStore"]

log = logging.getLogger("fnserver.registry")

FUNCTION_FILE: Final = "function.json"
STAGING_DIR: Final = ".staging"
LOCK_FILE: Final = ".lock"
CHANGES_FILE: Final = ".changes"
GENERATION_FILE: Final = ".generation"
_PENDING_SUFFIX: Final = ".object"
_VERSION_DIR_RE: Final = re.compile(r"^[1-9][0-9]{0,17}$")
#: Past this size a writer compacts the change log to one line per name.
_COMPACT_BYTES: Final = 256 * 1024


@dataclass
class _FeedState:
    """Where this process's reader of ``.changes`` stopped."""

    inode: int = -1
    offset: int = 0
    generation: int = 0


class LocalStore:
    """Metadata and artifacts under one data directory (see the module docstring)."""

    def __init__(self, root: Path, *, read_only: bool = False) -> None:
        self.root = Path(root)
        #: A serving process's view: it reads the store another process writes (and may not
        #: write it at all), so opening cleans and repairs nothing.
        self.read_only = read_only
        self.staging_root = self.root / STAGING_DIR
        self._lock_path = self.root / LOCK_FILE
        self._log_path = self.root / CHANGES_FILE
        self._opened = False
        # Guards the in-process maps below; never held across I/O that waits on other processes.
        self._mutex = threading.Lock()
        # (name, version) -> (inode of the version dir, its record): versions are immutable and
        # numbers never reused, so a record read once stays right while its directory lives.
        self._docs: dict[tuple[str, int], tuple[int, dict[str, Any]]] = {}
        # digest -> {(name, version): file}: where path() finds an artifact's bytes.
        self._files: dict[str, dict[tuple[str, int], Path]] = {}
        self._files_of: dict[str, set[str]] = {}
        # digest -> pending files this process put and has not released yet.
        self._pending: dict[str, list[Path]] = {}
        self._feed = _FeedState()
        self._hint = _fs.GenerationHint(self.root / GENERATION_FILE)

    # -- both: start-up -----------------------------------------------------------------------

    async def open(self) -> None:
        """Create the root, clean leftovers, repair every ``function.json``."""
        if self._opened:
            return
        await asyncio.to_thread(self._open)
        self._opened = True

    async def close(self) -> None:
        """Nothing is held between calls; forget the pending puts."""
        with self._mutex:
            pending = [p for ps in self._pending.values() for p in ps]
            self._pending.clear()
        for p in pending:
            await asyncio.to_thread(_discard, p)
        self._hint.close()

    def _open(self) -> None:
        if self.read_only:
            self._hint.open()
            return
        self.root.mkdir(parents=True, exist_ok=True)
        with self._locked(exclusive=True):
            _fs.sweep_staging(self.staging_root)
            self.staging_root.mkdir(exist_ok=True)
            for name in self._names():
                for tmp in (self._dir(name)).glob("*" + _fs.TMP_SUFFIX):
                    log.info("removing leftover temp file %s", tmp)
                    _fs.remove(tmp)
                record = self._scan(name)
                if record is None:
                    continue
                stored = _fs.read_json(self._dir(name) / FUNCTION_FILE)
                wanted = _function_json(record.next_version, record.aliases)
                if stored != wanted:
                    log.warning("repairing %s/%s", name, FUNCTION_FILE)
                    _fs.write_json_atomic(self._dir(name) / FUNCTION_FILE, wanted)
            self._hint.open()

    # -- metadata: reads ----------------------------------------------------------------------

    async def load(self, name: str) -> FunctionRecord | None:
        """One name's record, read under a shared lock."""
        return await asyncio.to_thread(self._load_one, name)

    async def load_all(self) -> dict[str, FunctionRecord]:
        """Every name's record, read under one shared lock."""
        return await asyncio.to_thread(self._load_all)

    async def names(self) -> list[str]:
        """The function directories present, valid names only."""
        return await asyncio.to_thread(self._names)

    async def digests_in_use(self, digests: Iterable[str]) -> frozenset[str]:
        """Digests some loaded version holds. Here only advisory: ``forget`` is a no-op."""
        with self._mutex:
            return frozenset(d for d in digests if self._files.get(d))

    def _load_one(self, name: str) -> FunctionRecord | None:
        with self._locked(exclusive=False):
            return self._scan(name)

    def _load_all(self) -> dict[str, FunctionRecord]:
        with self._locked(exclusive=False):
            out = {}
            for name in self._names():
                record = self._scan(name)
                if record is not None:
                    out[name] = record
            return out

    def _names(self) -> list[str]:
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return []
        keys = (_key_of(e.name) for e in entries if e.is_dir())
        return sorted(k for k in keys if QUALIFIED_NAME_RE.match(k))

    def _dir(self, name: str) -> Path:
        """A function's directory: its key with a tenant's '/' written '+' (one level, so a
        tenant never looks like a function; '+' is in no name)."""
        return self.root / name.replace("/", "+")

    def _scan(self, name: str) -> FunctionRecord | None:
        """Read one name from disk (the caller holds the lock) and refresh the artifact map."""
        base = self._dir(name)
        try:
            entries = [e for e in os.scandir(base) if _VERSION_DIR_RE.match(e.name) and e.is_dir()]
        except (FileNotFoundError, NotADirectoryError):
            entries = []
        stored = _fs.read_json(base / FUNCTION_FILE)
        if stored is None and not entries:
            self._forget_files(name)
            return None
        on_disk = sorted(int(e.name) for e in entries)
        inodes = {int(e.name): e.inode() for e in entries}
        docs: dict[int, dict[str, Any]] = {}
        for v in on_disk:
            doc = self._doc(name, v, inodes[v])
            if doc is not None:
                docs[v] = doc
        counter = stored.get("next_version") if stored else None
        if type(counter) is not int or counter < 1:
            counter = 1
        # Even an invalid version directory keeps its number: it must never be handed out again.
        next_version = max([counter, *(v + 1 for v in on_disk)])
        raw = stored.get("aliases") if stored else None
        aliases = {
            a: v
            for a, v in (raw.items() if isinstance(raw, dict) else ())
            if isinstance(a, str)
            and ALIAS_RE.match(a)
            and a not in RESERVED_ALIASES
            and type(v) is int
            and v in docs
        }
        self._remember_files(name, docs)
        return FunctionRecord(
            name=name,
            next_version=next_version,
            versions={v: docs[v] for v in sorted(docs)},
            aliases=dict(sorted(aliases.items())),
        )

    def _doc(self, name: str, version: int, inode: int) -> dict[str, Any] | None:
        """One version's record, from the cache while its directory is the same one."""
        with self._mutex:
            cached = self._docs.get((name, version))
        if cached is not None and cached[0] == inode:
            return cached[1]
        vdir = self._dir(name) / str(version)
        doc = _fs.read_json(vdir / META_FILE)
        if doc is None or doc.get("name") != name or doc.get("version") != version:
            log.warning("ignoring %s: no valid %s", vdir, META_FILE)
            return None
        doc = _complete_digests(doc, vdir)
        if doc is None:
            log.warning("ignoring %s: none of its artifacts is there", vdir)
            return None
        with self._mutex:
            self._docs[(name, version)] = (inode, doc)
        return doc

    def _remember_files(self, name: str, docs: Mapping[int, Mapping[str, Any]]) -> None:
        with self._mutex:
            self._drop_files_locked(name)
            for n, v in [k for k in self._docs if k[0] == name and k[1] not in docs]:
                del self._docs[(n, v)]
            held: set[str] = set()
            for v, doc in docs.items():
                for kind, digest in artifact_digests(doc).items():
                    path = self._dir(name) / str(v) / ARTIFACT_FILES[kind]
                    self._files.setdefault(digest, {})[(name, v)] = path
                    held.add(digest)
            self._files_of[name] = held

    def _forget_files(self, name: str) -> None:
        with self._mutex:
            self._drop_files_locked(name)
            for key in [k for k in self._docs if k[0] == name]:
                del self._docs[key]

    def _drop_files_locked(self, name: str) -> None:
        for digest in self._files_of.pop(name, ()):
            where = self._files.get(digest, {})
            for key in [k for k in where if k[0] == name]:
                del where[key]
            if not where:
                self._files.pop(digest, None)

    # -- metadata: writes ---------------------------------------------------------------------

    async def put_version(
        self, name: str, doc: Mapping[str, Any], *, alias: str | None = None
    ) -> int:
        """Assemble the version under staging, burn its number, rename it into place."""
        return await asyncio.to_thread(self._put_version, name, dict(doc), alias)

    def _put_version(self, name: str, doc: dict[str, Any], alias: str | None) -> int:
        digests = artifact_digests(doc)
        kinds = [k for k in ARTIFACT_KINDS if k in digests]
        if not kinds:
            raise InternalError(f"could not store a version of {name!r}: it names no artifact")
        assembly = Path(tempfile.mkdtemp(prefix=_fs.staging_prefix() + "v-", dir=self.staging_root))
        version: int | None = None
        try:
            # Readable by the invocation workers, which run under another uid.
            assembly.chmod(0o755)
            for kind in kinds:
                self._link_artifact(digests[kind], assembly / ARTIFACT_FILES[kind])
            with self._locked(exclusive=True):
                base = self._dir(name)
                record = self._scan(name)
                version = record.next_version if record else 1
                aliases = dict(record.aliases) if record else {}
                full = {**doc, "name": name, "version": version}
                _fs.write_json_atomic(assembly / META_FILE, full)
                _fs.fsync_dir(assembly)
                created = not base.exists()
                base.mkdir(exist_ok=True)
                if created:
                    _fs.fsync_dir(self.root)
                target = base / str(version)
                if target.exists():
                    # os.rename would silently replace an empty directory; never reuse a number.
                    raise FileExistsError(errno.EEXIST, "version directory exists already")
                # Burn the number first: a crash after this leaves a gap, never a reuse. The
                # alias may point at the version a moment before it exists; readers hold the
                # lock shared and so never see that, and open() drops it after a crash.
                new_aliases = {**aliases, alias: version} if alias is not None else aliases
                _fs.write_json_atomic(
                    base / FUNCTION_FILE, _function_json(version + 1, new_aliases)
                )
                try:
                    os.rename(assembly, target)
                    _fs.fsync_dir(base)
                    _fs.fsync_dir(self.staging_root)
                finally:
                    self._append_change(name)
                    if not target.exists() and alias is not None:
                        with contextlib.suppress(OSError):
                            _fs.write_json_atomic(
                                base / FUNCTION_FILE, _function_json(version + 1, aliases)
                            )
                self._scan(name)
            return version
        except FnError:
            raise
        except OSError as exc:
            what = (
                f"version {version} of {name!r}"
                if version is not None
                else f"a version of {name!r}"
            )
            raise _fs.storage_error(f"store {what}", exc) from exc
        finally:
            _discard(assembly)

    def _link_artifact(self, digest: str, target: Path) -> None:
        """Put ``digest``'s bytes at ``target``: a link to a pending or committed file."""
        with self._mutex:
            sources = [*self._pending.get(digest, ()), *self._files.get(digest, {}).values()]
        for source in sources:
            try:
                os.link(source, target)
                return
            except FileNotFoundError:
                continue  # released or deleted meanwhile: try the next holder
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                    raise
                try:
                    _fs.copy_verified(source, target, digest)
                    return
                except FileNotFoundError:
                    continue
        raise InternalError(f"artifact {digest} was not stored before its version")

    async def set_alias(self, name: str, alias: str, version: int) -> int | None:
        """Point ``alias`` at ``version``; return the version it pointed at before."""
        return await asyncio.to_thread(self._set_alias, name, alias, version)

    def _set_alias(self, name: str, alias: str, version: int) -> int | None:
        try:
            with self._locked(exclusive=True):
                record = self._scan(name)
                if record is None or not record.versions:
                    raise no_function(name)
                if version not in record.versions:
                    raise no_version(name, record.versions, version)
                previous = record.aliases.get(alias)
                aliases = {**record.aliases, alias: version}
                _fs.write_json_atomic(
                    self._dir(name) / FUNCTION_FILE, _function_json(record.next_version, aliases)
                )
                self._append_change(name)
                return previous
        except OSError as exc:
            raise _fs.storage_error(f"record alias {alias!r} of {name!r}", exc) from exc

    async def delete(self, name: str, version: int | None = None) -> Deleted:
        """Move the version directories out (atomic), record, then remove them."""
        graves: list[Path] = []
        try:
            return await asyncio.to_thread(self._delete, name, version, graves)
        finally:
            # The slow part, outside the lock: the directories are already invisible.
            for grave in graves:
                await asyncio.to_thread(_discard, grave)

    def _delete(self, name: str, version: int | None, graves: list[Path]) -> Deleted:
        with self._locked(exclusive=True):
            record = self._scan(name)
            if record is None or not record.versions:
                raise no_function(name)
            if version is not None and version not in record.versions:
                raise no_version(name, record.versions, version)
            gone: list[int] = []
            failure: OSError | None = None
            for v in record.versions if version is None else [version]:
                grave = self.staging_root / (
                    f"{_fs.staging_prefix()}deleted-{self._dir(name).name}-{v}-{secrets.token_hex(6)}"
                )
                try:
                    os.rename(self._dir(name) / str(v), grave)
                except OSError as exc:
                    failure = exc
                    break
                graves.append(grave)
                gone.append(v)
            # Whatever was moved out is gone from disk, even after a failure: the record follows.
            with contextlib.suppress(OSError):
                _fs.fsync_dir(self._dir(name))
            removed = tuple(sorted(a for a, v in record.aliases.items() if v in gone))
            kept = {a: v for a, v in record.aliases.items() if v not in gone}
            try:
                _fs.write_json_atomic(
                    self._dir(name) / FUNCTION_FILE, _function_json(record.next_version, kept)
                )
            except OSError as exc:
                # Loaders drop aliases to missing versions, so the record repairs itself later.
                log.warning("could not update %s/%s: %s", name, FUNCTION_FILE, exc)
            self._append_change(name)
            digests = frozenset(
                d for v in gone for d in artifact_digests(record.versions[v]).values()
            )
            self._scan(name)
            if failure is not None:
                raise _fs.storage_error(f"delete {name!r}", failure) from failure
            return Deleted(versions=tuple(gone), aliases_removed=removed, digests=digests)

    # -- metadata: change feed ----------------------------------------------------------------

    async def changes(self, since: int | None) -> tuple[int, frozenset[str] | None]:
        """Names changed after generation ``since``, by any process (module docstring)."""
        return await asyncio.to_thread(self._changes, since)

    def peek(self) -> int | None:
        """The newest generation any writer stored, from the mapped hint; no I/O."""
        return self._hint.read()

    def _changes(self, since: int | None) -> tuple[int, frozenset[str] | None]:
        if self._hint.read() is None:
            with contextlib.suppress(OSError):
                self._hint.open()
        with self._mutex:
            feed = _FeedState(self._feed.inode, self._feed.offset, self._feed.generation)
        try:
            fd = os.open(self._log_path, os.O_RDONLY)
        except FileNotFoundError:
            return (0, None if since is None or since > 0 else frozenset())
        try:
            st = os.fstat(fd)
            if st.st_ino == feed.inode and st.st_size == feed.offset and since == feed.generation:
                return (since, frozenset())
            incremental = (
                st.st_ino == feed.inode and st.st_size > feed.offset and since == feed.generation
            )
            start = feed.offset if incremental else 0
            data = os.pread(fd, st.st_size - start, start)
        finally:
            os.close(fd)
        # Only whole lines: a writer may be between its write and its newline.
        end = data.rfind(b"\n") + 1
        names: set[str] = set()
        top = feed.generation if incremental else 0
        for gen, name in _parse_changes(data[:end]):
            top = max(top, gen)
            if since is not None and gen > since:
                names.add(name)
        with self._mutex:
            self._feed = _FeedState(st.st_ino, start + end, top)
        if since is None:
            return (top, None)
        if top < since:
            # The log was removed or replaced by an older one: generations restarted.
            return (top, None)
        return (top, frozenset(names))

    def _append_change(self, name: str) -> None:
        """Record that ``name`` changed; the caller holds the exclusive lock."""
        fd = os.open(self._log_path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            size = os.fstat(fd).st_size
            tail = os.pread(fd, min(size, 256), size - min(size, 256))
            if tail and not tail.endswith(b"\n"):
                # A crash cut the last line short: drop it rather than glue the next one on.
                size -= len(tail) - (tail.rfind(b"\n") + 1)
                os.ftruncate(fd, size)
                tail = tail[: tail.rfind(b"\n") + 1]
            last = _parse_changes(tail[tail.rfind(b"\n", 0, len(tail) - 1) + 1 :])
            generation = (last[-1][0] if last else 0) + 1
            os.write(fd, f"{generation} {name}\n".encode())
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        self._hint.store(generation)
        if size > _COMPACT_BYTES:
            self._compact_changes()

    def _compact_changes(self) -> None:
        latest: dict[str, int] = {}
        for gen, name in _parse_changes(self._log_path.read_bytes()):
            latest[name] = gen
        lines = "".join(f"{g} {n}\n" for n, g in sorted(latest.items(), key=lambda i: i[1]))
        tmp = self._log_path.with_name(f"{CHANGES_FILE}.{secrets.token_hex(6)}{_fs.TMP_SUFFIX}")
        tmp.write_text(lines)
        os.replace(tmp, self._log_path)

    @contextlib.contextmanager
    def _locked(self, *, exclusive: bool) -> Iterator[None]:
        """flock on ``.lock``: a fresh open file description per call, so threads of this
        process exclude each other exactly as other processes do."""
        if exclusive:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        else:
            try:
                fd = os.open(self._lock_path, os.O_RDONLY)
            except FileNotFoundError:
                # Nothing was ever written here (open() creates it): nothing to be consistent with.
                yield
                return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    # -- artifacts ----------------------------------------------------------------------------

    async def new_staging(self) -> Path:
        """A fresh, unique, empty directory under ``.staging`` (0755)."""
        return await asyncio.to_thread(self._new_staging)

    def _new_staging(self) -> Path:
        path = Path(tempfile.mkdtemp(prefix=_fs.staging_prefix(), dir=self.staging_root))
        # mkdtemp makes it 0700; builders and workers may run under another uid.
        path.chmod(0o755)
        return path

    async def discard(self, path: Path) -> None:
        """Remove a staging directory; never raises."""
        await asyncio.to_thread(_discard, Path(path))

    async def put(self, digest: str, source: Path) -> None:
        """Copy ``source`` to a pending file under ``.staging``, checking its digest."""
        await asyncio.to_thread(self._put, digest, Path(source))

    def _put(self, digest: str, source: Path) -> None:
        pending = self.staging_root / (
            f"{_fs.staging_prefix()}{digest}.{secrets.token_hex(6)}{_PENDING_SUFFIX}"
        )
        try:
            _fs.copy_verified(source, pending, digest)
        except OSError as exc:
            raise _fs.storage_error("store an artifact", exc) from exc
        with self._mutex:
            self._pending.setdefault(digest, []).append(pending)

    async def fetch(self, digests: Iterable[str]) -> None:
        """Nothing to do: every process on this data directory reads the same files."""

    async def release(self, digest: str) -> None:
        """Drop one pending file of ``digest`` (its version is committed or abandoned)."""
        with self._mutex:
            files = self._pending.get(digest)
            pending = files.pop() if files else None
            if files == []:
                del self._pending[digest]
        if pending is not None:
            await asyncio.to_thread(_discard, pending)

    def path(self, digest: str) -> Path:
        """A file in a version directory holding ``digest``'s bytes (no I/O)."""
        with self._mutex:
            where = self._files.get(digest)
            if not where:
                raise LookupError(digest)
            return next(iter(where.values()))

    async def forget(self, digest: str) -> None:
        """Nothing to do: committed bytes live in version directories and go with them."""


def _function_json(next_version: int, aliases: Mapping[str, int]) -> dict[str, Any]:
    return {"next_version": next_version, "aliases": dict(sorted(aliases.items()))}


def _complete_digests(doc: dict[str, Any], vdir: Path) -> dict[str, Any] | None:
    """Fill in the artifact digests a record from before schema 2 lacks, from the files.

    Records without an ``artifacts`` list (the oldest) get whatever artifact files exist.
    Returns None when the version has no artifact file at all.
    """
    digests: dict[ArtifactKind, str] = artifact_digests(doc)
    listed = doc.get("artifacts")
    if isinstance(listed, list) and any(k in ARTIFACT_KINDS for k in listed):
        kinds = [k for k in ARTIFACT_KINDS if k in listed]
    else:
        kinds = [k for k in ARTIFACT_KINDS if (vdir / ARTIFACT_FILES[k]).is_file()]
    if all(k in digests for k in kinds) and kinds:
        return doc
    for kind in kinds:
        if kind not in digests:
            try:
                digests[kind] = sha256_file(vdir / ARTIFACT_FILES[kind])
            except OSError as exc:
                log.warning("ignoring the %s artifact of %s: %s", kind, vdir, exc)
    present = [k for k in kinds if k in digests]
    if not present:
        return None
    return {**doc, "artifacts": present, "artifact_sha256": {k: digests[k] for k in present}}


def _key_of(dirname: str) -> str:
    """The function key a directory of the store holds (see ``LocalStore._dir``)."""
    return dirname.replace("+", "/", 1)


def _parse_changes(data: bytes) -> list[tuple[int, str]]:
    out = []
    for line in data.splitlines():
        gen, _, name = line.decode("ascii", "replace").partition(" ")
        if gen.isdigit() and QUALIFIED_NAME_RE.match(name):
            out.append((int(gen), name))
    return out


def _discard(path: Path) -> None:
    try:
        _fs.remove(path)
    except OSError as exc:
        log.warning("could not remove %s: %s", path, exc)
