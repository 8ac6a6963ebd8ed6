"""The node's compiled-module cache, parent side: compile once per key, store, remember.

Runs in the pool's process (the server uid), which runs no user code. A module is compiled
by a separate short-lived process (``python -m fnserver.exec._compile``) bounded in time and
memory and killed with its process group on overrun; its bytes come back over a pipe and
are written here, atomically (temp file + rename), 0644 in a 0755 directory of the server
uid: workers (unprivileged sandbox uids) can read them, never write them. See
``_cachefile.py`` for the file names and the check a worker makes before loading.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import os
import signal
import stat
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from ..artifacts import sha256_file
from ..protocol import (
    FnError,
    FrameDecoder,
    InternalError,
    InvalidArgumentError,
    TooLargeError,
    UnavailableError,
)
from ._cachefile import (
    DIGEST_RE,
    ModuleMismatch,
    module_file_name,
    open_verified,
    parse_module_file_name,
)
from ._engine import engine_key
from ._sandbox import child_env
from ._types import COMPILE_DATA
from ._wire import PIPE_MAX_FRAME, Compiled, PipeError, RunError, decode

__all__ = ["COMPILE_TIMEOUT_S", "CompiledModule", "ModuleCache"]

#: A Go module compiles in ~0.5-1.4 s (MEASURED.md); a compile bomb gets no further.
COMPILE_TIMEOUT_S: Final = 60.0
#: Compiles at once: each uses every core (parallel compilation) and up to 4 GiB.
COMPILE_CONCURRENCY: Final = 2
#: The largest compiled module accepted from the compiler (Go: ~4.8 MB).
MAX_CWASM: Final = 512 << 20
#: Temp files older than this in the cache dir are leftovers of a crash.
STALE_TEMP_S: Final = 3600.0
_TEMP_PREFIX: Final = ".tmp-"


@dataclass(frozen=True, slots=True)
class CompiledModule:
    """A verified file of the cache: its name (in the cache dir) and its bytes' sha256."""

    name: str
    sha256: str


class ModuleCache:
    """Compiled modules keyed by (artifact digest, engine key), memoized once known good."""

    def __init__(
        self,
        directory: Path,
        *,
        compiler_uid: int | None = None,
        timeout_s: float = COMPILE_TIMEOUT_S,
        concurrency: int = COMPILE_CONCURRENCY,
        slots: asyncio.Semaphore | None = None,
    ) -> None:
        """``slots``: a semaphore shared with the builder (``Builder(slots=...)``) so compiles
        and builds together stay under one bound; each compile process holds one permit.
        Without it the cache bounds its own compiles to ``concurrency``."""
        self.directory = Path(directory)
        self.timeout_s = timeout_s
        self._compiler_uid = compiler_uid
        self._known: dict[tuple[str, bool], CompiledModule] = {}
        self._inflight: dict[tuple[str, bool], asyncio.Task[CompiledModule]] = {}
        self._digests: dict[tuple[str, int, int, int], str] = {}
        self._slots = slots if slots is not None else asyncio.Semaphore(concurrency)
        self._waiters: dict[tuple[str, bool], int] = {}
        self._closed = False
        self.compiles = 0  # compiler processes started: for stats and tests

    # -- life cycle -----------------------------------------------------------------------------

    def prepare(self) -> None:
        """Create the directory 0755 (server uid) and check nobody else can write it."""
        os.makedirs(self.directory, mode=0o755, exist_ok=True)
        st = os.lstat(self.directory)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            raise InternalError("the module cache directory is not a directory of the server uid")
        if stat.S_IMODE(st.st_mode) != 0o755:
            os.chmod(self.directory, 0o755)  # umask or an old mode: workers read, never write
        now = time.time()
        for name in os.listdir(self.directory):
            if name.startswith(_TEMP_PREFIX):
                path = self.directory / name
                with contextlib.suppress(OSError):
                    if now - path.lstat().st_mtime > STALE_TEMP_S:
                        path.unlink()

    async def close(self) -> None:
        """Cancel compiles in flight (their processes are killed). Idempotent."""
        self._closed = True
        tasks = list(self._inflight.values())
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- lookups --------------------------------------------------------------------------------

    def known(self, digest: str, fuel: bool) -> CompiledModule | None:
        """The memoized module of (digest, engine), without any I/O."""
        return self._known.get((digest, fuel))

    def __len__(self) -> int:
        return len(self._known)

    async def lookup(self, digest: str, fuel: bool) -> CompiledModule | None:
        """A good file of (digest, engine) already in the cache, memoized; never compiles
        (a serving process's read-only view: its control process writes the cache)."""
        hit = self._known.get((digest, fuel))
        if hit is None:
            hit = await asyncio.to_thread(self._find, digest, engine_key(fuel))
            if hit is not None:
                self._known[(digest, fuel)] = hit
        return hit

    def forget(self, digest: str, fuel: bool) -> None:
        """Drop the memo of (digest, engine): the next :meth:`ensure` checks the file again."""
        self._known.pop((digest, fuel), None)

    async def digest_of(self, artifact: Path) -> str:
        """sha256 of a file, memoized by (path, inode, mtime, size): only for jobs that came
        without the digest recorded at register (versions older than digests)."""
        st = await asyncio.to_thread(os.stat, artifact)
        key = (str(artifact), st.st_ino, st.st_mtime_ns, st.st_size)
        hit = self._digests.get(key)
        if hit is None:
            hit = await asyncio.to_thread(sha256_file, artifact)
            if len(self._digests) > 4096:
                self._digests.clear()
            self._digests[key] = hit
        return hit

    async def ensure(self, artifact: Path, digest: str, fuel: bool) -> CompiledModule:
        """The cache file of ``digest`` for the engine, compiling it first if needed: one
        compile per key even with concurrent callers. Raises :class:`InvalidArgumentError`
        for a module that does not validate or compiles too slowly."""
        if DIGEST_RE.match(digest) is None:
            raise InternalError(f"not a sha256 hex digest: {digest[:80]!r}")
        key = (digest, fuel)
        hit = self._known.get(key)
        if hit is not None:
            return hit
        if self._closed:
            raise InternalError("the module cache is closed")
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._obtain(artifact, digest, fuel))
            self._inflight[key] = task
            task.add_done_callback(functools.partial(self._settled, key))
        # shield: one caller giving up does not cancel the compile the others wait for; the
        # last one giving up does (a register whose build failed: its process is killed).
        self._waiters[key] = self._waiters.get(key, 0) + 1
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if task.cancelled() and self._closed and (me is None or not me.cancelling()):
                raise UnavailableError("the exec pool is shutting down") from None
            if self._waiters.get(key) == 1 and not task.done():
                task.cancel()
            raise
        finally:
            left = self._waiters.get(key, 1) - 1
            if left:
                self._waiters[key] = left
            else:
                self._waiters.pop(key, None)

    def _settled(self, key: tuple[str, bool], task: asyncio.Task[CompiledModule]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved here: every caller may have gone away

    def reject(self, module: CompiledModule) -> None:
        """A worker refused ``module`` (bytes changed, or gone): forget it, remove the file."""
        for key, known in list(self._known.items()):
            if known == module:
                del self._known[key]
        if parse_module_file_name(module.name) is not None:
            with contextlib.suppress(OSError):
                (self.directory / module.name).unlink()

    # -- compile and store ----------------------------------------------------------------------

    async def _obtain(self, artifact: Path, digest: str, fuel: bool) -> CompiledModule:
        ekey = engine_key(fuel)
        found = await asyncio.to_thread(self._find, digest, ekey)
        if found is None:
            cwasm = await self._compile(artifact, digest, fuel)
            found = await asyncio.to_thread(self._store, digest, ekey, cwasm)
        self._known[(digest, fuel)] = found
        return found

    def _find(self, digest: str, ekey: str) -> CompiledModule | None:
        """A good file already in the cache (another pool, or before a restart); bad ones
        (bytes no longer matching their name) are removed."""
        prefix = f"{digest}.{ekey}."
        for name in os.listdir(self.directory):
            if not name.startswith(prefix):
                continue
            parsed = parse_module_file_name(name)
            if parsed is None:
                continue
            try:
                os.close(open_verified(str(self.directory), name, ekey, parsed[2]))
            except ModuleMismatch:
                with contextlib.suppress(OSError):
                    (self.directory / name).unlink()
                continue
            return CompiledModule(name, parsed[2])
        return None

    def _store(self, digest: str, ekey: str, cwasm: bytes) -> CompiledModule:
        sha = hashlib.sha256(cwasm).hexdigest()
        name = module_file_name(digest, ekey, sha)
        fd, tmp = tempfile.mkstemp(prefix=_TEMP_PREFIX, suffix=".cwasm", dir=self.directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(cwasm)
                os.fchmod(f.fileno(), 0o644)
            os.replace(tmp, self.directory / name)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return CompiledModule(name, sha)

    async def _compile(self, artifact: Path, digest: str, fuel: bool) -> bytes:
        """Run the compiler process under the deadline; its one frame, or an FnError."""
        async with self._slots:
            uid = [str(self._compiler_uid)] if self._compiler_uid is not None else []
            self.compiles += 1
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "fnserver.exec._compile",
                str(artifact), digest, "1" if fuel else "0", *uid,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=None,
                close_fds=True,
                start_new_session=True,
                cwd="/",
                env=child_env(),
            )
            try:
                async with asyncio.timeout(self.timeout_s):
                    out = await _read_capped(proc.stdout, MAX_CWASM + 4096)
                    await proc.wait()
            except TimeoutError:
                raise InvalidArgumentError(
                    f"compiling the module took over the {self.timeout_s:g} s compile time limit",
                    {"compile_timeout_s": self.timeout_s},
                ) from None
            finally:
                if proc.returncode is None:
                    # The whole group: wasmtime's compile threads die with the process, but
                    # nothing it might have started may outlive the deadline either.
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    await proc.wait()
        return _parse_compiler_output(out, proc.returncode)


async def _read_capped(stream: asyncio.StreamReader | None, cap: int) -> bytes:
    assert stream is not None
    buf = bytearray()
    while chunk := await stream.read(1 << 20):
        buf += chunk
        if len(buf) > cap:
            raise InternalError(f"the compiler wrote over {cap} bytes")
    return bytes(buf)


def _parse_compiler_output(out: bytes, status: int | None) -> bytes:
    decoder = FrameDecoder(PIPE_MAX_FRAME)
    try:
        decoder.feed(out)
        frame = decoder.next_frame()
        msg = decode(frame) if frame is not None else None
    except (FnError, PipeError):
        msg = None
    if isinstance(msg, Compiled):
        return msg.cwasm
    if isinstance(msg, RunError):
        raise msg.error()
    # No answer: it died. Over RLIMIT_DATA wasmtime's allocator aborts (SIGABRT); the
    # kernel's OOM killer sends SIGKILL: both are the memory limit, and say so.
    if status is not None and -status in (signal.SIGABRT, signal.SIGKILL):
        raise TooLargeError(
            "the module could not be compiled within the compile memory limit of "
            f"{COMPILE_DATA >> 20} MiB (the compiler was killed by {signal.Signals(-status).name})",
            {"status": status, "compile_memory_bytes": COMPILE_DATA},
        )
    raise InvalidArgumentError(
        f"the module could not be compiled: the compiler ended with status {status}",
        {"status": status},
    )



