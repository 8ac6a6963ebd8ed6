"""Worker process: ``python -m fnserver.exec._worker <index> <module cache> <scratch> [<uid>]``.

Speaks the typed pipe messages of ``_wire.py`` (length-prefixed msgpack frames) over its
stdin/stdout pipes with the pool, one call at a time: :class:`~._wire.RunRequest` in; a
:class:`~._wire.Ready` once at start, then per call :class:`~._wire.RunOk`,
:class:`~._wire.RunError` or :class:`~._wire.ModuleRejected` out. Before loading a module
it has not seen it sends ``Loading(done=False)``, and ``Loading(done=True)`` once the
module is ready, so the parent's deadline covers the guest and not the load.

Everything hostile happens here, never in the server: running guests, spawning native
binaries. The worker compiles nothing and writes no file: it only deserializes compiled
modules from the node's cache directory (read-only to it), after checking that the file's
bytes hash to what the pool recorded (``_cachefile.open_verified``). A crash costs one
worker, which the pool replaces.
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import select
import shutil
import signal
import stat
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

import wasmtime

from ..protocol import (
    FnError,
    FrameDecoder,
    FunctionTimeoutError,
    InternalError,
    InvalidArgumentError,
    InvokeResult,
    MemoryLimitError,
    TrapError,
    encode_frame,
)
from ._cachefile import ModuleMismatch, open_verified
from ._engine import EPOCH_TICK_S, engine_key, make_engine
from ._guest import GuestRun, run_guest
from ._sandbox import WORKER_FSIZE, SandboxInfo, kill_descendants, setup_worker
from ._wasi import CallDeadline, imports_waits, install_waits, thread_deadline
from ._wire import (
    PIPE_MAX_FRAME,
    Loading,
    ModuleRejected,
    PipeError,
    PipeMessage,
    Ready,
    RunError,
    RunOk,
    RunRequest,
    decode,
)

PIPE_READ_SIZE: Final = 64 * 1024
#: Ready modules kept per worker; Go modules are ~5 MB mmapped, C ones ~15 KB.
CACHE_MAX_MODULES: Final = 64
CACHE_MAX_BYTES: Final = 512 * 1024 * 1024
#: stderr is diagnostics: returned up to this much (and never past the output cap).
STDERR_MAX: Final = 64 * 1024
#: Native processes a single call may run at once, on top of the worker's own threads.
NATIVE_NPROC: Final = 32
NATIVE_NOFILE: Final = 64
#: Host stack for guests: wasm may use up to max_wasm_stack (8 MiB) on top of the host frames.
GUEST_THREAD_STACK: Final = 32 * 1024 * 1024
#: The epoch ticker stops after this long without a call (and is woken by the next one).
PARK_AFTER_S: Final = 1.0


class _Rejected(Exception):
    """The compiled module named by the request is not the one the pool recorded."""


@dataclass
class _Ready:
    pre: wasmtime.InstancePre
    module: wasmtime.Module
    size: int
    #: It imports poll_oneoff or sched_yield, so its calls need their deadline set up.
    waits: bool


class _Engine:
    """One engine with its WASI linker and its key in the module cache."""

    def __init__(self, fuel: bool) -> None:
        self.fuel = fuel
        self.engine = make_engine(fuel, slots=1)  # one guest at a time
        self.linker = wasmtime.Linker(self.engine)
        self.linker.define_wasi()
        # poll_oneoff and sched_yield become fnserver's own: a guest asleep in them ends at
        # its deadline (an INTERRUPT trap, as an epoch deadline raises) instead of holding
        # the worker until the pool kills it.
        install_waits(self.linker)
        self.key = engine_key(fuel)


def _memfd(name: str) -> int:
    return os.memfd_create(name, os.MFD_CLOEXEC)


def _read_fd(fd: int, limit: int) -> tuple[bytes, int]:
    """Return up to ``limit`` bytes of a memfd from offset 0, and its total size."""
    size = os.fstat(fd).st_size
    return os.pread(fd, min(size, limit), 0), size


class Worker:
    """The job loop of one worker process."""

    def __init__(
        self, rfd: int, wfd: int, info: SandboxInfo, cache_dir: str, scratch: str
    ) -> None:
        self.rfd, self.wfd, self.info = rfd, wfd, info
        self.cache_dir = cache_dir
        self.main = _Engine(fuel=False)
        # Built on the first call with a fuel budget: most workers never need it.
        self._fuel_engine: _Engine | None = None
        # Keyed by the cache file name: artifact digest, engine key and compiled sha256.
        self.cache: OrderedDict[str, _Ready] = OrderedDict()
        self.cache_bytes = 0
        self.out_fd = _memfd("stdout")
        self.err_fd = _memfd("stderr")
        self._out_path = f"/proc/self/fd/{self.out_fd}".encode()
        self._err_path = f"/proc/self/fd/{self.err_fd}".encode()
        # The Store of the last call, deleted after its reply went out (see serve()).
        self._pending: GuestRun | None = None
        self._ticking = self.main.engine
        # Ticker state: the ticker advances the epoch every tick while calls keep coming, and
        # forces the deadline when the guest's output passed its cap (a flooding guest ignores
        # EFBIG). It runs freely rather than being woken per call: a wake-up per call costs a
        # futex wake and a GIL hand-over on the latency path; it parks after PARK_AFTER_S idle.
        self._guest_running = False
        self._last_call = 0.0
        self._parked = False
        self._wake = threading.Event()
        self._cap = 0
        self._deadline_ticks = 0
        # The deadline of the waiting host calls on the thread running guests; the ticker
        # cancels their waits when the guest floods its output.
        self._call: CallDeadline = thread_deadline()
        self.flooded = False
        self._ticker = threading.Thread(target=self._tick, name="epoch-ticker", daemon=True)
        self._ticker.start()
        self.scratch = scratch  # made (and removed) by the pool: a killed worker cleans nothing
        self._last_dir: str | None = None
        self._worker_nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
        os.chdir(self.scratch)

    # -- pipe -------------------------------------------------------------------------------

    def send(self, msg: PipeMessage) -> None:
        """Write one message to the pool (blocking: the pool always reads)."""
        view = memoryview(encode_frame(msg.to_wire()))
        while view:
            n = os.write(self.wfd, view)
            view = view[n:]

    def serve(self) -> None:
        """Read requests until the parent closes the pipe."""
        decoder = FrameDecoder(PIPE_MAX_FRAME)
        self.send(
            Ready(
                uid=self.info.uid,
                subreaper=self.info.subreaper,
                netns=self.info.netns,
                refused=tuple(self.info.refused),
            )
        )
        while True:
            # 64 KiB, not more: os.read allocates its whole size first, and from 128 KiB up
            # glibc serves that with mmap + mremap + munmap on every call (a TLB shootdown
            # across the worker's threads each time).
            chunk = os.read(self.rfd, PIPE_READ_SIZE)
            if not chunk:
                return
            decoder.feed(chunk)
            while (body := decoder.next_frame()) is not None:
                self.send(self.handle(body))
                # Giving the Store back (memset of the pooled memory, closing the WASI files)
                # costs 10-60 us: done here, while the parent handles the reply.
                self._release_store()

    def _release_store(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.close()

    def engine_for(self, fuel: bool) -> _Engine:
        """The main engine, or the fuel-metering one (built on first use)."""
        if not fuel:
            return self.main
        if self._fuel_engine is None:
            self._fuel_engine = _Engine(fuel=True)
        return self._fuel_engine

    def handle(self, body: object) -> RunOk | RunError | ModuleRejected:
        """One request in, its reply out; never raises."""
        try:
            req = decode(body)
            if not isinstance(req, RunRequest):
                raise InternalError(f"a worker takes run requests, not {type(req).__name__}")
        except (FnError, PipeError) as exc:
            return RunError.of(InternalError(f"worker: bad request: {exc}"))
        try:
            if req.mode == "native":
                return RunOk(self.run_native(req))
            return RunOk(self.run_wasm(req))
        except _Rejected as exc:
            return ModuleRejected(req.module, str(exc))
        except FnError as exc:
            return RunError.of(exc)
        except Exception as exc:  # a bug here must become an error reply, not a dead worker
            return RunError.of(InternalError(f"worker: {exc!r}"))

    # -- modules ----------------------------------------------------------------------------

    def _remember(self, key: str, ready: _Ready) -> None:
        old = self.cache.pop(key, None)
        if old is not None:
            self.cache_bytes -= old.size
        self.cache[key] = ready
        self.cache_bytes += ready.size
        while len(self.cache) > CACHE_MAX_MODULES or (
            self.cache_bytes > CACHE_MAX_BYTES and len(self.cache) > 1
        ):
            _, gone = self.cache.popitem(last=False)
            self.cache_bytes -= gone.size

    def ready_module(self, req: RunRequest, eng: _Engine) -> _Ready:
        """The warm module of a request: LRU hit, else loaded from the module cache after
        checking its bytes. Never compiles: a module the pool did not compile is refused."""
        ready = self.cache.get(req.module)
        if ready is not None:
            self.cache.move_to_end(req.module)
            return ready
        self.send(Loading(done=False))
        try:
            fd = open_verified(self.cache_dir, req.module, eng.key, req.module_sha256)
        except ModuleMismatch as exc:
            raise _Rejected(str(exc)) from None
        try:
            size = os.fstat(fd).st_size
            # Through the checked fd: the inode hashed is the inode mapped, whatever happens
            # to the name meanwhile. Same wasmtime version and settings: the name's engine key.
            module = wasmtime.Module.deserialize_file(eng.engine, f"/proc/self/fd/{fd}")
        except wasmtime.WasmtimeError as exc:
            raise _Rejected(f"cannot load {req.module}: {exc}") from None
        finally:
            os.close(fd)
        try:
            pre = eng.linker.instantiate_pre(module)
        except wasmtime.WasmtimeError as exc:
            raise InvalidArgumentError(f"not a WASI command: {exc}") from None
        self.send(Loading(done=True))
        ready = _Ready(pre, module, size, imports_waits(module))
        self._remember(req.module, ready)
        return ready

    # -- wasm -------------------------------------------------------------------------------

    def _tick(self) -> None:
        while True:
            time.sleep(EPOCH_TICK_S)
            engine = self._ticking
            engine.increment_epoch()
            if not self._guest_running:
                if time.monotonic() - self._last_call > PARK_AFTER_S:
                    self._park()
                continue
            if self.flooded:
                continue
            try:
                over = (
                    os.fstat(self.out_fd).st_size > self._cap
                    or os.fstat(self.err_fd).st_size > self._cap
                )
            except OSError:
                continue
            if over:
                # RLIMIT_FSIZE already makes further writes fail; stop the guest now.
                self.flooded = True
                self._call.cancel()  # a guest asleep in poll_oneoff stops too
                for _ in range(self._deadline_ticks + 2):
                    engine.increment_epoch()

    def _park(self) -> None:
        """Sleep until the next call (see run_wasm, which checks ``_parked`` after setting
        ``_last_call``; the re-check here closes the race)."""
        self._wake.clear()
        self._parked = True
        if not self._guest_running and time.monotonic() - self._last_call > PARK_AFTER_S:
            self._wake.wait()
        self._parked = False

    def _reset_outputs(self) -> None:
        # A native child shares these file descriptions (dup2): rewind, or it writes at the
        # previous call's offset and leaves a hole.
        for fd in (self.out_fd, self.err_fd):
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)

    def run_wasm(self, req: RunRequest) -> InvokeResult:
        """Run one wasm call in a fresh Store; guest faults raise the matching FnError."""
        fuel = req.fuel
        eng = self.engine_for(fuel is not None)
        ready = self.ready_module(req, eng)
        cap = req.output_bytes
        mem_limit = req.memory_mb * 1024 * 1024
        timeout_ms = req.timeout_ms
        name = req.function
        ticks = math.ceil(timeout_ms / 1000 / EPOCH_TICK_S) + 1
        self._release_store()  # normally done already, right after the previous reply
        self._cap, self._deadline_ticks, self.flooded = cap, ticks, False
        self._call = thread_deadline()  # run_guest restarts it on this thread
        self._ticking = eng.engine
        # Writes past cap+1 bytes fail with EFBIG (SIGXFSZ is ignored in the worker).
        resource.setrlimit(resource.RLIMIT_FSIZE, (cap + 1, WORKER_FSIZE))
        started = time.perf_counter_ns()
        self._last_call = time.monotonic()
        self._guest_running = True
        if self._parked:
            self._wake.set()
        try:
            run = run_guest(
                eng.engine,
                ready.pre,
                args=(name, *req.args),
                stdin=req.input,
                stdout_path=self._out_path,
                stderr_path=self._err_path,
                memory_limit=mem_limit,
                deadline_ticks=ticks,
                fuel=fuel,
                timeout_ns=timeout_ms * 1_000_000,
                waits=ready.waits,
            )
        finally:
            self._guest_running = False
            resource.setrlimit(resource.RLIMIT_FSIZE, (WORKER_FSIZE, WORKER_FSIZE))
        duration_us = (time.perf_counter_ns() - started) // 1000
        self._pending = run
        memory, exit_code, failure = run.memory, run.exit_code, run.failure
        output, out_size = _read_fd(self.out_fd, cap)
        stderr, err_size = _read_fd(self.err_fd, min(cap, STDERR_MAX))
        if out_size > cap or err_size > cap:
            # The next call truncates them only once its guest starts: until then the ticker
            # would see this call's flood and stop that call for it.
            self._reset_outputs()
        truncated = out_size > cap or self.flooded
        instantiated = run.instantiated
        near_limit = mem_limit - memory < max(1 << 20, mem_limit // 16)
        if failure is not None:
            if self.flooded:
                exit_code = -1  # stopped for flooding its output; see InvokeResult docs
            elif isinstance(failure, wasmtime.Trap):
                code = failure.trap_code
                if code == wasmtime.TrapCode.OUT_OF_FUEL:
                    raise FunctionTimeoutError(
                        f"function {name!r} ran out of fuel ({fuel} units)",
                        {"fuel": fuel, "timeout_ms": timeout_ms, "stderr": stderr},
                    )
                if code == wasmtime.TrapCode.INTERRUPT:
                    raise FunctionTimeoutError(
                        f"function {name!r} timed out after {timeout_ms} ms",
                        {"timeout_ms": timeout_ms, "stderr": stderr},
                    )
                if near_limit:
                    raise self._memory_error(name, req.memory_mb, memory, stderr)
                kind = code.name.lower() if code is not None else "unknown"
                raise TrapError(
                    f"function {name!r} trapped: {kind}",
                    {"trap": kind, "stderr": stderr, "message": failure.message[:2000]},
                )
            else:
                msg = str(failure)
                if not instantiated and "memory" in msg and "limit" in msg:
                    # Instantiation refused: the declared minimum is over the Store limit.
                    raise self._memory_error(name, req.memory_mb, memory, stderr)
                raise TrapError(
                    f"function {name!r} failed: {msg[:500]}",
                    {"trap": "error", "stderr": stderr, "message": msg[:2000]},
                )
        elif exit_code != 0 and near_limit:
            raise self._memory_error(name, req.memory_mb, memory, stderr)
        return InvokeResult(
            output=output,
            stderr=stderr,
            exit_code=exit_code,
            truncated=truncated,
            duration_us=duration_us,
            memory_peak=memory,
            mode="wasm",
        )

    @staticmethod
    def _memory_error(name: str, memory_mb: int, memory: int, stderr: bytes) -> MemoryLimitError:
        return MemoryLimitError(
            f"function {name!r} hit its memory limit of {memory_mb} MiB",
            {"memory_mb": memory_mb, "memory": memory, "stderr": stderr},
        )

    # -- native -----------------------------------------------------------------------------

    def run_native(self, req: RunRequest) -> InvokeResult:
        """Run the executable under rlimits in a new session; kill everything it left behind."""
        name = req.function
        path = req.module
        cap = req.output_bytes
        timeout_ms = req.timeout_ms
        cpu_s = max(1, math.ceil(timeout_ms / 1000))
        workdir = self._call_dir()
        in_fd = _memfd("stdin")
        try:
            data = req.input
            view = memoryview(data)
            while view:
                view = view[os.write(in_fd, view) :]
            os.lseek(in_fd, 0, os.SEEK_SET)
            self._reset_outputs()
            os.chdir(workdir)
            # The child inherits soft FSIZE = cap + 1 and soft NPROC = its per-call process
            # budget from its first instruction; prlimit then lowers its hard limits so it
            # cannot raise them back. Without this, a fork storm that ran before prlimit got
            # the worker's own NPROC (72 here): seen as 67 storm processes, 12 calls in 300
            # started with it (tests/test_exec.py::test_native_limits_hold_from_the_start).
            nproc = self._native_nproc()
            resource.setrlimit(resource.RLIMIT_FSIZE, (cap + 1, WORKER_FSIZE))
            if nproc is not None:
                resource.setrlimit(resource.RLIMIT_NPROC, (nproc, self._worker_nproc))
            started = time.perf_counter_ns()
            try:
                pid = os.posix_spawn(
                    path,
                    [name, *req.args],
                    {},
                    file_actions=[
                        (os.POSIX_SPAWN_DUP2, in_fd, 0),
                        (os.POSIX_SPAWN_DUP2, self.out_fd, 1),
                        (os.POSIX_SPAWN_DUP2, self.err_fd, 2),
                    ],
                    setsid=True,
                    setsigmask=(),
                    setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
                )
            except OSError as exc:
                raise InvalidArgumentError(
                    f"cannot execute the function's binary: {exc.strerror}", {"errno": exc.errno}
                ) from None
            finally:
                resource.setrlimit(resource.RLIMIT_FSIZE, (WORKER_FSIZE, WORKER_FSIZE))
                if nproc is not None:
                    resource.setrlimit(resource.RLIMIT_NPROC, (self._worker_nproc,) * 2)
                os.chdir(self.scratch)
            self._limit_child(pid, req, cpu_s, cap, nproc)
            timed_out = self._wait(pid, timeout_ms)
            _, status, usage = os.wait4(pid, 0)
            duration_us = (time.perf_counter_ns() - started) // 1000
        finally:
            kill_descendants(self.info)
            os.close(in_fd)
        output, out_size = _read_fd(self.out_fd, cap)
        stderr, _ = _read_fd(self.err_fd, min(cap, STDERR_MAX))
        self._reset_outputs()
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
        cpu_used = usage.ru_utime + usage.ru_stime
        if timed_out or sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu_used >= cpu_s):
            raise FunctionTimeoutError(
                f"function {name!r} timed out after {timeout_ms} ms",
                {"timeout_ms": timeout_ms, "stderr": stderr},
            )
        # Shell convention for signal deaths (SIGXFSZ after flooding stdout: 153).
        exit_code = 128 + sig if sig else os.WEXITSTATUS(status)
        return InvokeResult(
            output=output,
            stderr=stderr,
            exit_code=exit_code,
            truncated=out_size > cap or sig == signal.SIGXFSZ,
            duration_us=duration_us,
            # ru_maxrss: posix_spawn's vfork-style child starts on the worker's pages, so this
            # is an upper bound that includes the worker's RSS at spawn (~30 MiB).
            memory_peak=usage.ru_maxrss * 1024,
            mode="native",
        )

    def _call_dir(self) -> str:
        """An empty working directory for a native call.

        The last call's directory is reused when it is still empty and untouched (mode 0700,
        ours), which saves a mkdir and an rmdir (~130 us) per call; anything the binary left
        in it, or changed about it, gets it replaced. Its processes are all dead by now.
        """
        d = self._last_dir
        if d is not None:
            try:
                st = os.lstat(d)
                if (
                    stat.S_ISDIR(st.st_mode)
                    and stat.S_IMODE(st.st_mode) == 0o700
                    and st.st_uid == os.geteuid()
                    and not os.listdir(d)
                ):
                    return d
            except OSError:
                pass
            with contextlib.suppress(OSError):
                os.chmod(d, 0o700)  # a binary may have locked its own directory
            shutil.rmtree(d, ignore_errors=True)
        self._last_dir = tempfile.mkdtemp(prefix="call-", dir=self.scratch)
        return self._last_dir

    def _native_nproc(self) -> int | None:
        """The RLIMIT_NPROC of a native call: the worker's own tasks plus NATIVE_NPROC (it
        counts every task of the uid). None when the worker has no dedicated uid (then the
        limit would count every process of the server's uid, and root ignores it anyway)."""
        if self.info.uid is None:
            return None
        return len(os.listdir("/proc/self/task")) + NATIVE_NPROC

    def _limit_child(
        self, pid: int, req: RunRequest, cpu_s: int, cap: int, nproc: int | None
    ) -> None:
        """Per-call limits, applied microseconds after spawn (MEASURED.md: costs nothing)."""
        limits = [
            (resource.RLIMIT_CPU, (cpu_s, cpu_s + 1)),
            # memory_mb bounds the data segment (heap, anonymous private memory): Go's runtime
            # reserves ~0.5 GiB of PROT_NONE address space at start and dies under a 128 MiB
            # RLIMIT_AS, while RLIMIT_DATA counts what it really allocates. Measured with a
            # static Go hello: DATA 128 MiB alone runs, DATA 128 MiB + AS 1152 MiB dies at
            # start, AS >= 2 GiB runs; so address space gets a fixed 4 GiB backstop.
            (resource.RLIMIT_DATA, (req.memory_mb << 20,) * 2),
            (resource.RLIMIT_AS, (max(4096, req.memory_mb * 2) << 20,) * 2),
            (resource.RLIMIT_FSIZE, (cap + 1, cap + 1)),
            (resource.RLIMIT_NOFILE, (NATIVE_NOFILE, NATIVE_NOFILE)),
            (resource.RLIMIT_CORE, (0, 0)),
        ]
        if nproc is not None:
            limits.append((resource.RLIMIT_NPROC, (nproc, nproc)))
        for which, value in limits:
            with contextlib.suppress(OSError, ValueError):
                resource.prlimit(pid, which, value)

    @staticmethod
    def _wait(pid: int, timeout_ms: int) -> bool:
        """Wait for the child's exit; on the deadline kill its process group. True if killed."""
        pidfd = os.pidfd_open(pid)
        try:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            deadline = time.monotonic() + timeout_ms / 1000
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                if poller.poll(max(1, math.ceil(left * 1000))):
                    return False
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            return True
        finally:
            os.close(pidfd)


def main() -> None:
    """Entry point: harden the process, then serve the pipe on a big-stack thread."""
    cache_dir, scratch = sys.argv[2], sys.argv[3]
    uid = int(sys.argv[4]) if len(sys.argv) > 4 else None
    # Keep the pipes off fds 0/1 so nothing (a stray print, a native child) can touch them.
    rfd = os.dup(0)
    wfd = os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(2, 1)
    os.close(null)
    sys.stdout = sys.stderr
    info = setup_worker(uid)
    if info.uid is not None and os.access(cache_dir, os.W_OK):
        # Reported, not fatal: the pool's stats (and a test) show it.
        info.refused.append("the module cache is writable by the worker")
    worker = Worker(rfd, wfd, info, cache_dir, scratch)
    # wasm runs on the calling host thread: give it room for the 8 MiB wasm stack.
    threading.stack_size(GUEST_THREAD_STACK)
    thread = threading.Thread(target=worker.serve, name="serve")
    thread.start()
    thread.join()


if __name__ == "__main__":
    main()
