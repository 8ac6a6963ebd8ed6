"""Worker process: ``python -m fnserver.exec._worker <index> <module cache> <scratch> [<uid>]``.

Runs native calls, one at a time, for the pool. Speaks the typed pipe messages of
``_wire.py`` (length-prefixed msgpack frames) over its stdin/stdout pipes: a
:class:`~._wire.Ready` once at start, then per :class:`~._wire.RunRequest` one
:class:`~._wire.RunOk` or :class:`~._wire.RunError`.

Everything a native binary does happens under this process's own uid and limits, never in
the server: it spawns the binary in a new session with per-call rlimits and kills whatever it
left behind. wasm guests do not come here: they run in the serving process (``_inproc.py``).
The module cache path is passed only to report, at start, a cache this uid could write (a
native binary running here must never be able to plant code the serving process loads).
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
from typing import Final

from ..protocol import (
    FnError,
    FrameDecoder,
    FunctionTimeoutError,
    InternalError,
    InvalidArgumentError,
    InvokeResult,
    MemoryLimitError,
    encode_frame,
)
from ._sandbox import (
    HIDDEN_ENV,
    WORKER_FSIZE,
    SandboxInfo,
    kill_descendants,
    setup_worker,
    wipe_private_tmp,
)
from ._seccomp import protect_worker
from ._wire import (
    PIPE_MAX_FRAME,
    PipeError,
    PipeMessage,
    Ready,
    RunError,
    RunOk,
    RunRequest,
    decode,
)

PIPE_READ_SIZE: Final = 64 * 1024
#: stderr is diagnostics: returned up to this much (and never past the output cap).
STDERR_MAX: Final = 64 * 1024
#: Native processes a single call may run at once, on top of the worker's own threads.
NATIVE_NPROC: Final = 32
NATIVE_NOFILE: Final = 64


def _oom_kills(fd: int) -> int:
    for line in os.pread(fd, 4096, 0).decode().splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            return int(value)
    return 0


def _memfd(name: str) -> int:
    return os.memfd_create(name, os.MFD_CLOEXEC)


def _read_fd(fd: int, limit: int) -> tuple[bytes, int]:
    """Return up to ``limit`` bytes of a memfd from offset 0, and its total size."""
    size = os.fstat(fd).st_size
    return os.pread(fd, min(size, limit), 0), size


class Worker:
    """The job loop of one worker process."""

    def __init__(self, rfd: int, wfd: int, info: SandboxInfo, scratch: str) -> None:
        self.rfd, self.wfd, self.info = rfd, wfd, info
        self.out_fd = _memfd("stdout")
        self.err_fd = _memfd("stderr")
        self.scratch = scratch  # made (and removed) by the pool: a killed worker cleans nothing
        self._last_dir: str | None = None
        self._worker_nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
        self._pid = str(os.getpid()).encode()
        self._memcg_limit_mb = -1
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
        if self.info.uid is not None:
            # On this thread, which spawns every native call: they inherit it (_seccomp.py).
            refused = protect_worker(os.getpid(), threading.get_native_id())
            if refused is not None:
                self.info.refused.append(refused)
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
            # glibc serves that with mmap + mremap + munmap on every call.
            chunk = os.read(self.rfd, PIPE_READ_SIZE)
            if not chunk:
                return
            decoder.feed(chunk)
            while (body := decoder.next_frame()) is not None:
                self.send(self.handle(body))

    def handle(self, body: object) -> RunOk | RunError:
        """One request in, its reply out; never raises."""
        try:
            req = decode(body)
            if not isinstance(req, RunRequest):
                raise InternalError(f"a worker takes run requests, not {type(req).__name__}")
        except (FnError, PipeError) as exc:
            return RunError.of(InternalError(f"worker: bad request: {exc}"))
        try:
            return RunOk(self.run_native(req))
        except FnError as exc:
            return RunError.of(exc)
        except Exception as exc:  # a bug here must become an error reply, not a dead worker
            return RunError.of(InternalError(f"worker: {exc!r}"))

    def _reset_outputs(self) -> None:
        # A native child shares these file descriptions (dup2): rewind, or it writes at the
        # previous call's offset and leaves a hole.
        for fd in (self.out_fd, self.err_fd):
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)

    # -- native -----------------------------------------------------------------------------

    def run_native(self, req: RunRequest) -> InvokeResult:
        """Run the executable under rlimits in a new session; kill everything it left behind."""
        name = req.function
        path = req.path
        cap = req.output_bytes
        timeout_ms = req.timeout_ms
        cpu_s = max(1, math.ceil(timeout_ms / 1000))
        workdir = self._call_dir()
        exe_fd = self._open_binary(path)
        in_fd = _memfd("stdin")
        oom_before: int | None = None
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
            oom_before = self._memcg_arm(req.memory_mb)
            resource.setrlimit(resource.RLIMIT_FSIZE, (cap + 1, WORKER_FSIZE))
            if nproc is not None:
                resource.setrlimit(resource.RLIMIT_NPROC, (nproc, self._worker_nproc))
            started = time.perf_counter_ns()
            try:
                pid = os.posix_spawn(
                    f"/proc/self/fd/{exe_fd}" if exe_fd is not None else path,
                    [name, *req.args],
                    {k: v for k, v in req.env if "=" not in k},
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
                if oom_before is not None:
                    self._memcg_leave()
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
            if exe_fd is not None:
                os.close(exe_fd)
            oom_killed = self._memcg_oom_killed(oom_before)
            if self.info.private_tmp:
                # Nothing a call wrote outlives it (its processes are all dead by now).
                wipe_private_tmp(keep=self.scratch, keep_inside=self._last_dir)
        output, out_size = _read_fd(self.out_fd, cap)
        stderr, _ = _read_fd(self.err_fd, min(cap, STDERR_MAX))
        self._reset_outputs()
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
        cpu_used = usage.ru_utime + usage.ru_stime
        if oom_killed and not timed_out:
            raise MemoryLimitError(
                f"function {name!r} hit its memory limit of {req.memory_mb} MiB",
                {"memory_mb": req.memory_mb, "stderr": stderr},
            )
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

    def _memcg_arm(self, memory_mb: int) -> int | None:
        """Set the call group's limit to ``memory_mb`` and step the worker into it for the
        spawn (the child is born there; :meth:`_memcg_leave` steps back). Returns the
        group's OOM-kill count so far (None: no cgroup, or the host refused)."""
        g = self.info.memcg
        if g is None:
            return None
        try:
            if memory_mb != self._memcg_limit_mb:
                os.write(g.call_limit, str(memory_mb << 20).encode())
                self._memcg_limit_mb = memory_mb
            before = _oom_kills(g.call_oom)
            os.write(g.call_procs, self._pid)
        except (OSError, ValueError):
            return None
        return before

    def _memcg_leave(self) -> None:
        """The worker back in its own group, right after the spawn."""
        if self.info.memcg is not None:
            os.write(self.info.memcg.own_procs, self._pid)

    def _memcg_oom_killed(self, before: int | None) -> bool:
        """True if the call group's OOM killer ended a process of this call."""
        g = self.info.memcg
        if g is None or before is None:
            return False
        try:
            return _oom_kills(g.call_oom) > before
        except (OSError, ValueError):
            return False

    def _open_binary(self, path: str) -> int | None:
        """With a private /tmp the host's tree is reached through the worker's own handle on
        it (an artifact may live under the host's /tmp): the binary, opened close-on-exec,
        is run as /proc/self/fd/N. None: run it by its path."""
        root = self.info.host_root
        if root is None:
            return None
        try:
            return os.open(path.lstrip("/"), os.O_RDONLY | os.O_CLOEXEC, dir_fd=root)
        except OSError as exc:
            raise InvalidArgumentError(
                f"cannot open the function's binary: {exc.strerror}", {"errno": exc.errno}
            ) from None

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
        # The worker's own threads (its Python threads: it starts no other), without the
        # listing of /proc/self/task that cost ~30 us a call.
        return threading.active_count() + NATIVE_NPROC

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
            (resource.RLIMIT_AS, (max(4096, req.memory_mb * 2) << 20,) * 2),
            (resource.RLIMIT_FSIZE, (cap + 1, cap + 1)),
            (resource.RLIMIT_NOFILE, (NATIVE_NOFILE, NATIVE_NOFILE)),
            (resource.RLIMIT_CORE, (0, 0)),
        ]
        if nproc is not None:
            limits.append((resource.RLIMIT_NPROC, (nproc, nproc)))
        if self.info.memcg is None:
            # Without a memory cgroup, the data segment is the best bound there is (it misses
            # shared mappings, and a child forked before this line escapes it).
            limits.append((resource.RLIMIT_DATA, (req.memory_mb << 20,) * 2))
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
    hidden = tuple(p for p in os.environ.get(HIDDEN_ENV, "").split(os.pathsep) if p)
    info = setup_worker(uid, scratch, hidden)
    root = info.host_root  # the cache as it is on the host, not the empty cover seen here
    if info.uid is not None and (
        os.access(cache_dir.lstrip("/"), os.W_OK, dir_fd=root)
        if root is not None
        else os.access(cache_dir, os.W_OK)
    ):
        # Reported, not fatal: the pool's stats (and a test) show it.
        info.refused.append("the module cache is writable by the worker")
    worker = Worker(rfd, wfd, info, scratch)
    thread = threading.Thread(target=worker.serve, name="serve")
    thread.start()
    thread.join()


if __name__ == "__main__":
    main()
