"""The register use case: stage the upload, build, precompile, commit (PROTOCOL.md §5.2).

A front hands the service a :class:`RegisterRequest`; the service gives back an
:class:`UploadSink` to feed the chunks into as they arrive, and :meth:`RegisterService.register`
does the rest. The sink asks its producer to pause (``on_backlog(True)``) while more than
``UPLOAD_HIGH_WATER`` bytes wait for the disk, so a fast client cannot fill the server's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Final

import aiofiles

from .._quotas import BuildCounter, QuotaBook, exceeded
from ..artifacts import sha256_file
from ..builder import KINDS, Builder
from ..config import ServerConfig
from ..exec import ExecPool
from ..protocol import (
    ArtifactKind,
    ChecksumMismatchError,
    FnError,
    FunctionLimits,
    InvalidArgumentError,
    ProgressEvent,
    RegisterRequest,
    TooLargeError,
    UnavailableError,
    VersionInfo,
)
from ..registry import NewVersion, Registry
from ._context import RequestContext
from ._names import key_for, renamed, said_as, tenant_of

__all__ = ["Progress", "RegisterService", "UploadSink"]

#: Upload bytes one register may have queued for the disk writer before its producer pauses.
UPLOAD_HIGH_WATER: Final = 8 * 1024 * 1024
UPLOAD_LOW_WATER: Final = 2 * 1024 * 1024
#: A progress event at least every this many bytes received.
PROGRESS_EVERY: Final = 4 * 1024 * 1024
UPLOAD_FILE: Final = "upload"

Progress = Callable[[ProgressEvent], None]


class UploadSink:
    """Where a front puts upload chunks; the register use case drains it to a staging file."""

    def __init__(self, size: int, chunk_size: int, on_backlog: Callable[[bool], None]) -> None:
        self.size = size
        self.chunk_size = chunk_size
        self.received = 0
        self._queued = 0
        self._queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._failed: FnError | None = None
        self._on_backlog = on_backlog
        # Set by the first chunk (or a failure): the register opens its staging directory only
        # then, so announced-but-silent registers hold no directory and no descriptor.
        self._started = asyncio.Event()
        if size == 0:
            self._started.set()

    def feed(self, data: bytes) -> None:
        """Take the next chunk; never blocks. A bad chunk fails the register, not the caller."""
        if self._failed is not None:
            return
        if self.received + len(data) > self.size:
            self.abort(
                TooLargeError(f"upload sent more than the announced {self.size} bytes", {"size": self.size})
            )
            return
        if len(data) > self.chunk_size:
            self.abort(
                InvalidArgumentError(f"upload chunk of {len(data)} bytes is over chunk_size {self.chunk_size}")
            )
            return
        self.received += len(data)
        self._queued += len(data)
        self._queue.put_nowait(data)
        self._started.set()
        if self._queued > UPLOAD_HIGH_WATER:
            self._on_backlog(True)

    def abort(self, err: FnError) -> None:
        """Fail the register with ``err`` (a bad chunk, or the connection went away)."""
        if self._failed is None:
            self._failed = err
        self._queue.put_nowait(b"")  # wake the writer so it reports the failure
        self._started.set()

    async def started(self) -> None:
        """Wait for the first chunk; raise the register's failure if it failed first."""
        await self._started.wait()
        if self._failed is not None:
            raise self._failed

    async def write_to(self, path: Path, sha256: str, progress: Progress) -> None:
        """Drain every announced byte into ``path`` and check the digest."""
        digest = hashlib.sha256()
        written = 0
        last_event = 0
        try:
            async with aiofiles.open(path, "wb") as f:
                while written < self.size:
                    chunk = await self._queue.get()
                    if self._failed is not None:
                        raise self._failed
                    await f.write(chunk)
                    digest.update(chunk)
                    written += len(chunk)
                    self._queued -= len(chunk)
                    if self._queued < UPLOAD_LOW_WATER:
                        self._on_backlog(False)
                    if written - last_event >= PROGRESS_EVERY or written == self.size:
                        last_event = written
                        progress(
                            ProgressEvent(
                                "upload", f"received {written} of {self.size} bytes", written, self.size
                            )
                        )
        finally:
            self._on_backlog(False)
        if digest.hexdigest() != sha256:
            raise ChecksumMismatchError(
                f"upload sha256 is {digest.hexdigest()}, the register request announced {sha256}",
                {"expected": sha256, "actual": digest.hexdigest()},
            )


    async def chunks(self) -> AsyncIterator[bytes]:
        """The announced bytes as they arrive, for a register relayed to the control process
        (which stages and checks them); the same backlog accounting as :meth:`write_to`."""
        passed = 0
        try:
            while passed < self.size:
                chunk = await self._queue.get()
                if self._failed is not None:
                    raise self._failed
                passed += len(chunk)
                self._queued -= len(chunk)
                if self._queued < UPLOAD_LOW_WATER:
                    self._on_backlog(False)
                yield chunk
        finally:
            self._on_backlog(False)


class RegisterService:
    """Stage, build, precompile and commit one new version."""

    def __init__(
        self,
        registry: Registry,
        builder: Builder,
        pool: ExecPool,
        config: ServerConfig,
        quotas: QuotaBook | None = None,
    ) -> None:
        self.registry = registry
        self.builder = builder
        self.pool = pool
        self.config = config
        #: Tenant quotas (the Services facade's book) and the builds running per tenant.
        self.quotas = quotas if quotas is not None else QuotaBook(config.tenant_limits)
        self.builds = BuildCounter()
        #: One commit at a time per tenant, so two registers cannot both take a quota's last
        #: place (functions, versions, storage are counted again right before the commit).
        self._commits: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    def open_upload(
        self, ctx: RequestContext, req: RegisterRequest, on_backlog: Callable[[bool], None]
    ) -> UploadSink:
        """Check the request against this server's limits (no file is touched) and return the
        sink its chunks go into. Raises FnError when the register is refused outright."""
        c = self.config
        if req.size > c.max_upload:
            raise TooLargeError(
                f"upload of {req.size} bytes is over the maximum of {c.max_upload} bytes",
                {"size": req.size, "max_upload": c.max_upload},
            )
        o = req.options
        if o.kind is not None and o.kind not in KINDS:
            raise InvalidArgumentError(f"unknown kind {o.kind!r}; kinds are: {', '.join(KINDS)}")
        for key, value, hi in (
            ("timeout_ms", o.timeout_ms, c.max_timeout_ms),
            ("memory_mb", o.memory_mb, c.max_memory_mb),
        ):
            if value is not None and value > hi:
                raise InvalidArgumentError(f"'{key}' must be an integer from 1 to {hi}, got {value}")
        return UploadSink(req.size, c.chunk_size, on_backlog)

    async def register(
        self, ctx: RequestContext, req: RegisterRequest, sink: UploadSink, progress: Progress
    ) -> VersionInfo:
        """Receive the upload from ``sink``, build it, precompile, commit; return the version.

        The wasm compile starts the moment the build has placed the wasm module (for Go, while
        the native build still runs); on any failure it is cancelled and awaited, and its own
        error counts only if the build succeeded. A failure at any step leaves nothing
        behind: the staging directory goes in every case. A tenant over its builds quota is
        refused before anything is staged.
        """
        key = key_for(ctx.caller, req.name)
        with said_as(ctx.caller, key, req.name):
            info = await self._register_key(ctx, dataclasses.replace(req, name=key), sink, progress)
        return renamed(info, ctx.caller, key)

    async def _register_key(
        self, ctx: RequestContext, req: RegisterRequest, sink: UploadSink, progress: Progress
    ) -> VersionInfo:
        """The register of registry key ``req.name``; quotas are the key's tenant's (in the
        control process the caller is the serving processes' link, not the tenant)."""
        tenant = tenant_of(req.name)
        await self.check_held(tenant, req.name, req.size)
        with self.builds.hold(tenant, self.quotas.limits(tenant)):
            return await self._register(ctx, req, sink, progress)

    async def check_held(self, tenant: str, key: str, adding: int) -> None:
        """Raise QuotaExceededError if one more version of ``key`` (``adding`` bytes) would
        take ``tenant`` over its functions, versions or storage quota."""
        limits = self.quotas.limits(tenant)
        if limits.max_functions is None and limits.max_versions is None and limits.max_storage_mb is None:
            return
        versions = self.registry.versions_of(key)
        if limits.max_functions is not None and not versions:
            have = sum(1 for f in self.registry.list().functions if tenant_of(f.name) == tenant)
            if have >= limits.max_functions:
                raise exceeded(tenant, "functions", limits.max_functions, have, f"it has {have} functions")
        if limits.max_versions is not None and len(versions) >= limits.max_versions:
            raise exceeded(
                tenant, "versions", limits.max_versions, len(versions),
                f"function '{key.rpartition('/')[2]}' keeps {len(versions)} versions; delete one first",
            )
        if limits.max_storage_mb is not None:
            stored = await self._stored_bytes(tenant)
            cap = limits.max_storage_mb * 1024 * 1024
            if stored + adding > cap:
                used_mb = round(stored / (1024 * 1024), 3)
                raise exceeded(
                    tenant, "storage_mb", limits.max_storage_mb, used_mb,
                    f"{used_mb:g} MiB stored, and this version adds {adding} bytes",
                )

    async def _stored_bytes(self, tenant: str) -> int:
        """Upload and artifact bytes of every live version of ``tenant`` (artifact sizes from
        the files, off the event loop)."""
        paths: list[Path] = []
        total = 0
        for f in self.registry.list().functions:
            if tenant_of(f.name) != tenant:
                continue
            for info in self.registry.versions_of(f.name):
                total += info.size
                paths.extend(self.registry.artifact_path(info, kind) for kind in info.artifacts)

        def sizes() -> int:
            n = 0
            for path in paths:
                with contextlib.suppress(OSError):  # deleted meanwhile: no longer stored
                    n += path.stat().st_size
            return n

        return total + await asyncio.to_thread(sizes)

    async def _register(
        self, ctx: RequestContext, req: RegisterRequest, sink: UploadSink, progress: Progress
    ) -> VersionInfo:
        c = self.config
        try:
            await sink.started()
        except asyncio.CancelledError:
            sink.abort(UnavailableError("server is shutting down"))
            raise
        staging = await self.registry.new_staging()
        compiling: asyncio.Task[None] | None = None

        def on_artifact(kind: ArtifactKind, path: Path) -> None:
            nonlocal compiling
            if kind == "wasm" and compiling is None:
                progress(ProgressEvent("compile", "precompiling the WebAssembly module"))
                compiling = asyncio.ensure_future(self._precompile(path))

        try:
            upload = staging / UPLOAD_FILE
            await sink.write_to(upload, req.sha256, progress)
            built = await self.builder.build(
                upload,
                req.filename,
                staging / "out",
                kind=req.options.kind,
                progress=lambda msg: progress(ProgressEvent("build", msg)),
                on_artifact=on_artifact,
            )
            await asyncio.to_thread(upload.unlink)
            if compiling is not None:
                await compiling
            o = req.options
            meta = NewVersion(
                filename=os.path.basename(req.filename),
                size=req.size,
                sha256=req.sha256,
                kind=built.kind,
                limits=FunctionLimits(
                    timeout_ms=o.timeout_ms or c.default_timeout_ms,
                    memory_mb=o.memory_mb or c.default_memory_mb,
                    fuel=o.fuel,
                ),
                description=o.description,
                env=dict(o.env),
                toolchain=built.toolchain,
                build_ms=built.build_ms,
                build_log=built.log or None,
            )
            tenant = tenant_of(req.name)
            async with self._commits[tenant]:
                built_bytes = await asyncio.to_thread(
                    lambda: sum(p.stat().st_size for p in built.files.values())
                )
                await self.check_held(tenant, req.name, req.size + built_bytes)
                return await self.registry.commit(req.name, built.files, meta, alias=o.alias)
        except asyncio.CancelledError:
            sink.abort(UnavailableError("server is shutting down"))
            raise
        finally:
            if compiling is not None:
                if not compiling.done():
                    compiling.cancel()
                    await asyncio.wait([compiling])
                if not compiling.cancelled():
                    compiling.exception()  # seen: a failed build's error is the one reported
            await self.registry.discard(staging)

    async def _precompile(self, wasm: Path) -> None:
        digest = await asyncio.to_thread(sha256_file, wasm)
        await self.pool.precompile(wasm, digest)
