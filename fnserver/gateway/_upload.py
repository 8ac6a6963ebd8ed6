"""Uploads over HTTP: the body streamed to a spool file, then handed to the register use case.

The register use case (``service/_register.py``) wants what the binary protocol announces up
front: the upload's size and sha256. An HTTP body says neither (chunked bodies do not even say
their size), so the gateway first streams it to a private spool file, counting and hashing as
it goes and stopping at the upload limit, then feeds that file to the very sink a TCP upload
feeds, with the same backlog rule. Nothing holds a whole body in memory; the spool file is
removed in every case.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final, TypeVar

from ..protocol import TooLargeError, UnavailableError
from ..service import UploadSink

__all__ = ["Backlog", "Spool", "feed_sink", "spooled"]

R = TypeVar("R")

#: Body bytes gathered in memory before one write to the spool file (one thread hop each).
WRITE_BATCH: Final = 1024 * 1024


@dataclass(frozen=True)
class Spool:
    """A body on disk: where, how big, its sha256."""

    path: Path
    size: int
    sha256: str


class _SpoolFile:
    """A spool file being written off the event loop, in batches."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "body"
        self._file: BinaryIO | None = None
        self._pending: list[bytes] = []
        self._pending_bytes = 0

    async def add(self, data: bytes) -> None:
        self._pending.append(data)
        self._pending_bytes += len(data)
        if self._pending_bytes >= WRITE_BATCH:
            await self.flush()

    async def flush(self) -> None:
        batch, self._pending, self._pending_bytes = b"".join(self._pending), [], 0
        await asyncio.to_thread(self._write, batch)

    def _write(self, batch: bytes) -> None:
        if self._file is None:
            self._file = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self._file.write(batch)

    async def close(self) -> None:
        if self._file is not None:
            await asyncio.to_thread(self._file.close)
            self._file = None


@contextlib.asynccontextmanager
async def spooled(chunks: AsyncIterator[bytes], limit: int, what: str = "upload") -> AsyncIterator[Spool]:
    """Stream ``chunks`` to a private temporary file; yield it; remove it on the way out.

    TOO_LARGE as soon as more than ``limit`` bytes came (the rest is never read)."""
    directory = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="fnserver-http-"))
    try:
        spool = _SpoolFile(directory)
        digest = hashlib.sha256()
        size = 0
        try:
            async for chunk in chunks:
                size += len(chunk)
                if size > limit:
                    raise TooLargeError(
                        f"{what} is over the limit of {limit} bytes",
                        {"limit": limit},
                    )
                digest.update(chunk)
                await spool.add(chunk)
            await spool.flush()
        finally:
            await spool.close()
        if not size:
            await asyncio.to_thread(spool.path.touch)
        yield Spool(spool.path, size, digest.hexdigest())
    finally:
        await asyncio.to_thread(shutil.rmtree, directory, True)


class Backlog:
    """The sink's backlog signal (``on_backlog`` of ``open_upload``) as an event to wait on."""

    def __init__(self) -> None:
        self.clear = asyncio.Event()
        self.clear.set()

    def __call__(self, on: bool) -> None:
        if on:
            self.clear.clear()
        else:
            self.clear.set()


async def feed_sink(spool: Spool, sink: UploadSink, backlog: Backlog, chunk_size: int,
                    register: Awaitable[R]) -> R:
    """Await ``register`` while feeding it the spool file's bytes through ``sink``, pausing
    while the sink's ``backlog`` says so; the feeder ends with the register either way."""
    go = backlog.clear

    async def feed() -> None:
        fd = await asyncio.to_thread(os.open, spool.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            left = spool.size
            while left > 0:
                await go.wait()
                data = await asyncio.to_thread(os.read, fd, min(chunk_size, left))
                if not data:  # the file shrank under us: nothing sensible to send
                    sink.abort(UnavailableError("the upload's spool file was cut short"))
                    return
                left -= len(data)
                sink.feed(data)
        except OSError:
            sink.abort(UnavailableError("the upload's spool file could not be read"))
        finally:
            await asyncio.to_thread(os.close, fd)

    feeder = asyncio.ensure_future(feed())
    try:
        return await register
    finally:
        if not feeder.done():
            feeder.cancel()
        await asyncio.wait([feeder])
        if not feeder.cancelled():
            feeder.exception()  # its failure already reached the register through the sink
