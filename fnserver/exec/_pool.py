"""The parent side: a pool of worker processes, a bounded queue and wall-clock deadlines."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import fnserver

from ..protocol import FrameDecoder, encode_frame
from ..protocol.errors import (
    FnError,
    FunctionTimeoutError,
    InternalError,
    InvalidArgumentError,
    UnavailableError,
    error_from_wire,
)
from ._sandbox import claim_uids
from ._types import InvokeJob, InvokeResult

__all__ = ["ExecPool"]

#: Past the guest's own deadline (epoch at timeout + one 10 ms tick, or the native kill):
#: room for Store teardown and the reply before the parent kills the worker.
GRACE_S: Final = 0.25
NATIVE_GRACE_S: Final = 1.0
#: Extra time granted once a worker reports a cold compile (Go: ~0.5 s, MEASURED.md).
COMPILE_BUDGET_S: Final = 60.0
PRECOMPILE_TIMEOUT_S: Final = 120.0
START_TIMEOUT_S: Final = 30.0
PIPE_MAX_FRAME: Final = 1 << 30
WARM_TRACKED: Final = 64
#: A function at its per-function cap may still take an idle worker nobody else is waiting
#: for, while its recent calls are this short: one more of its calls then delays a newcomer by
#: at most about this long. (Without this, with 2 workers one function uses 1 core.)
BORROW_MAX_S: Final = 0.05
#: Functions whose recent call time is remembered (an exponential average per function).
RECENT_TRACKED: Final = 4096
#: Pipelining: when every worker is busy, a call may be written into a busy worker's pipe
#: behind the calls it holds, so the worker goes from one call to the next without waiting
#: for the parent, and reads and answers several per wake-up. Allowed while every function
#: involved averages under PIPELINE_MAX_S a call and the calls already held are expected to
#: take under PIPELINE_BUDGET_S in all (what the newcomer may wait for that it could not
#: have waited for in the pool's queue). Measured (bench/README.md) with 64 calls in flight
#: on 2 workers: depth 2 / 4 / 8 / 16 gave C echo 4.0k / 4.9-5.9k / 6.7k / 7.2k calls/s and
#: Go echo 1.7k / 1.8-2.1k / 2.4k / 2.4k: fewer wake-ups per call.
PIPELINE_MAX_S: Final = 0.01
PIPELINE_BUDGET_S: Final = 0.006
PIPELINE_MAX_DEPTH: Final = 16
#: Worker time around a guest's own run (request decode, Store setup and teardown, reply).
WORKER_OVERHEAD_S: Final = 0.0001
#: A call queued behind one that killed its worker never ran: it is retried this often.
NOT_STARTED_RETRIES: Final = 2
_PRECOMPILE_KEY: Final = "\0precompile"


class _WorkerDied(Exception):
    pass


class _NotStarted(Exception):
    """A call queued behind another in a worker that died first: it never ran; retry it."""


@dataclass(eq=False)
class _Call:
    """One request written to a worker's pipe, answered in order (the worker is sequential)."""

    worker: _Worker
    key: str  # the function it counts against
    timeout_s: float
    fut: asyncio.Future[dict[str, Any]]
    started_ns: int = 0  # when it reached the head of the worker's queue (its guest started)


class _Reader(asyncio.Protocol):
    def __init__(self, worker: _Worker) -> None:
        self.worker = worker

    def data_received(self, data: bytes) -> None:  # type: ignore[override]
        self.worker.on_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.worker.on_eof()


class _Worker:
    """One worker process and its pipes, seen from the event loop.

    Calls are written to the pipe as soon as they are assigned, so a worker with a call queued
    behind the running one starts it the moment it has replied, without waiting for the
    parent's next write (pipelining: this halves the wake-ups per call under load). Only the
    head of ``calls`` is running; its wall-clock deadline starts when it becomes the head.
    """

    def __init__(self, pool: ExecPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.loop = asyncio.get_running_loop()
        self.decoder = FrameDecoder(PIPE_MAX_FRAME)
        self.ready = self.loop.create_future()
        self.exited = self.loop.create_future()
        self.calls: deque[_Call] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self.dead = False
        self.uid: int | None = None
        self.info: dict[str, Any] = {}
        self.warm: OrderedDict[str, None] = OrderedDict()
        self._wtransport: asyncio.WriteTransport | None = None
        self._rtransport: asyncio.ReadTransport | None = None
        pkg_root = str(Path(fnserver.__file__).resolve().parent.parent)
        uid_arg = [str(pool._uids[index])] if pool._uids else []
        # Minimal explicit environment; close_fds keeps every server fd out of the worker.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fnserver.exec._worker", str(index), *uid_arg],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,
            close_fds=True,
            start_new_session=True,
            cwd="/",
            env={
                "PATH": "/usr/bin:/bin",
                "LANG": "C.UTF-8",
                "PYTHONPATH": pkg_root,
                "PYTHONDONTWRITEBYTECODE": "1",
            },
        )
        self.pid = self.proc.pid
        self.pidfd = os.pidfd_open(self.pid)
        self.loop.add_reader(self.pidfd, self._on_exit)

    @property
    def busy(self) -> bool:
        """True while any call is written to this worker and not answered."""
        return bool(self.calls)

    async def connect(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._wtransport, _ = await self.loop.connect_write_pipe(asyncio.Protocol, self.proc.stdin)
        self._rtransport, _ = await self.loop.connect_read_pipe(
            lambda: _Reader(self), self.proc.stdout
        )

    # -- events from the loop ---------------------------------------------------------------

    def on_data(self, data: bytes) -> None:
        try:
            self.decoder.feed(data)
            frames = self.decoder.frames()
        except FnError:
            self.kill()
            return
        for frame in frames:
            if frame.get("ready"):
                self.uid = frame.get("uid")
                self.info = frame
                if not self.ready.done():
                    self.ready.set_result(None)
                self.pool._on_ready(self)
            elif "compiling" in frame:
                # A cold compile does not count against the guest's time: allow the compile
                # budget, then restart the guest's deadline when the module is ready.
                if self.calls:
                    head = self.calls[0]
                    self._arm(COMPILE_BUDGET_S if frame["compiling"] else head.timeout_s)
            elif self.calls:
                head = self.calls.popleft()
                if not head.fut.done():  # cancelled while queued: its reply is dropped
                    head.fut.set_result(frame)
                if self.calls:
                    self._start_head()
                elif self._timer is not None:
                    self._timer.cancel()
                    self._timer = None
                # Right here, not when the caller's task resumes: the next queued job is
                # written in this same loop iteration, so the worker does not sit idle.
                self.pool._call_done(head)

    def on_eof(self) -> None:
        # A worker closing its pipe is dead to us, whatever it is doing.
        self.kill()

    def _on_exit(self) -> None:
        self.loop.remove_reader(self.pidfd)
        os.close(self.pidfd)
        self.proc.wait()
        self._mark_dead()
        for t in (self._rtransport, self._wtransport):
            if t is not None:
                t.close()
        if not self.exited.done():
            self.exited.set_result(self.proc.returncode)
        self.pool._on_exit(self)

    def _mark_dead(self, head_error: BaseException | None = None) -> None:
        if self.dead:
            return
        self.dead = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        err = _WorkerDied(f"worker {self.index} (pid {self.pid}) died")
        if not self.ready.done():
            self.ready.set_exception(err)
            self.ready.exception()
        calls, self.calls = list(self.calls), deque()
        for i, call in enumerate(calls):
            if not call.fut.done():
                # Only the head ran; the calls behind it never reached the guest.
                call.fut.set_exception((head_error or err) if i == 0 else _NotStarted())
                call.fut.exception()  # retrieved: the caller may be gone already
        self.pool._on_dead(self, calls)

    def kill(self, head_error: BaseException | None = None) -> None:
        """SIGKILL the worker's whole process group (it is a session leader)."""
        self._mark_dead(head_error)
        if self.exited.done():
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)

    # -- calls ------------------------------------------------------------------------------

    def _arm(self, seconds: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_at(self.loop.time() + seconds, self._overrun)

    def _start_head(self) -> None:
        head = self.calls[0]
        head.started_ns = time.perf_counter_ns()
        self._arm(head.timeout_s)

    def _overrun(self) -> None:
        self._timer = None
        # The parent's wall clock: the only limit a guest asleep in a host call cannot ignore.
        self.kill(TimeoutError())

    def submit(self, key: str, frame: bytes, timeout_s: float) -> _Call:
        """Write one request; its reply arrives in ``fut`` after those queued before it."""
        call = _Call(self, key, timeout_s, self.loop.create_future())
        if self.dead or self._wtransport is None:
            call.fut.set_exception(_NotStarted())
            call.fut.exception()
            return call
        self._wtransport.write(frame)
        self.calls.append(call)
        if len(self.calls) == 1:
            self._start_head()
        return call

    def abandon(self, call: _Call) -> None:
        """The caller is gone (cancelled): a running job takes its worker with it; a queued
        one still runs, and its reply is dropped."""
        if self.calls and self.calls[0] is call:
            self.kill()


@dataclass(eq=False)
class _Waiter:
    key: str
    warm_hint: str | None
    frame: bytes
    timeout_s: float
    fut: asyncio.Future[_Call]


class ExecPool:
    """Runs invocations in worker processes, never in the server process.

    ``per_function`` (default ``max(1, workers - 1)``) caps how many workers one function may
    hold at once, so one hot or stuck function always leaves a worker for the others when
    there are two or more. Jobs over capacity wait in a FIFO of at most ``max_queue`` entries
    (a job whose function is at its cap does not block the ones behind it); past that they
    fail fast with :class:`UnavailableError`.
    """

    def __init__(
        self, *, workers: int | None = None, max_queue: int = 256, per_function: int | None = None
    ) -> None:
        self.size = workers if workers is not None else (os.cpu_count() or 1)
        if self.size < 1:
            raise ValueError("workers must be at least 1")
        self.max_queue = max_queue
        self.per_function = per_function if per_function is not None else max(1, self.size - 1)
        self._workers: list[_Worker | None] = [None] * self.size
        self._idle: list[_Worker] = []
        self._queue: deque[_Waiter] = deque()
        self._running: Counter[str] = Counter()
        self._recent_s: OrderedDict[str, float] = OrderedDict()
        self._vdirs: dict[Path | str, str] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._started = False
        self._closed = False
        self._uids: list[int] = []
        self._uid_locks: list[int] = []
        # Set at close: sweeps still running in threads must not outlive the uid claim.
        self._stop_sweeps = threading.Event()

    # -- life cycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start every worker and wait until each reports ready."""
        if self._started:
            return
        self._started = True
        try:
            self._uids, self._uid_locks = claim_uids(self.size)
        except OSError as exc:
            self._closed = True
            raise InternalError(f"cannot claim sandbox uids for the exec workers: {exc}") from None
        workers = [await self._spawn(i) for i in range(self.size)]
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                await asyncio.gather(*(w.ready for w in workers))
        except (TimeoutError, _WorkerDied) as exc:
            await self.close()
            raise InternalError(f"exec workers failed to start: {exc!r}") from None

    async def _spawn(self, index: int) -> _Worker:
        worker = _Worker(self, index)
        self._workers[index] = worker
        try:
            await worker.connect()
        except OSError:
            worker.kill()
        return worker

    async def close(self) -> None:
        """Kill every worker (whole process groups); fail waiting jobs. Idempotent."""
        if self._closed:
            return
        self._closed = True
        while self._queue:
            waiter = self._queue.popleft()
            if not waiter.fut.done():
                waiter.fut.set_exception(UnavailableError("the exec pool is shutting down"))
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        workers = [w for w in self._workers if w is not None]
        for w in workers:
            w.kill()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                await asyncio.gather(*(w.exited for w in workers), return_exceptions=True)
        self._stop_sweeps.set()
        if self._uids:
            # Native processes in their own sessions outlive their worker: end them by uid.
            await asyncio.to_thread(_sweep_uids, set(self._uids), None)
        for fd in self._uid_locks:
            os.close(fd)
        self._uid_locks = []
        self._idle.clear()

    def _on_ready(self, worker: _Worker) -> None:
        if self._closed or worker.dead:
            return
        self._idle.append(worker)
        self._pump()

    def _on_dead(self, worker: _Worker, calls: list[_Call]) -> None:
        """A worker is gone (killed or exited): it takes no more calls; free its calls' places."""
        with contextlib.suppress(ValueError):
            self._idle.remove(worker)
        for call in calls:
            self._call_done(call)

    def _on_exit(self, worker: _Worker) -> None:
        if self._closed or self._workers[worker.index] is not worker:
            return
        self._track(self._replace(worker))

    def _track(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # Never silent: a replacement that failed in an unexpected way is a bug.
            asyncio.get_running_loop().call_exception_handler(
                {"message": "exec pool task failed", "exception": task.exception(), "task": task}
            )

    async def _replace(self, dead: _Worker) -> None:
        """Start a worker in the dead one's slot, retrying with backoff while the pool is open."""
        delay = 0.05
        while not self._closed:
            if dead.uid is not None:
                await asyncio.to_thread(_sweep_uids, {dead.uid}, self._stop_sweeps)
            worker = await self._spawn(dead.index)
            try:
                async with asyncio.timeout(START_TIMEOUT_S):
                    await worker.ready
                return
            except (TimeoutError, _WorkerDied):
                worker.kill()
                await worker.exited
                if self._workers[dead.index] is worker:
                    self._workers[dead.index] = dead  # keep the slot ours; retry below
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    # -- scheduling ---------------------------------------------------------------------------

    def _may_run(self, key: str, *, borrow: bool) -> bool:
        if self._running[key] < self.per_function:
            return True
        return borrow and self._recent_s.get(key, BORROW_MAX_S) < BORROW_MAX_S

    def _short(self, key: str) -> bool:
        return self._recent_s.get(key, PIPELINE_MAX_S) < PIPELINE_MAX_S

    def _pipeline_target(self, key: str, warm_hint: str | None) -> _Worker | None:
        """The busy worker to queue a call of ``key`` in behind the short calls it holds: the
        one holding fewest, then one with the module warm; None if none may take it."""
        if not self._short(key):
            return None
        best: _Worker | None = None
        for w in self._workers:
            if w is None or w.dead or not 0 < len(w.calls) < PIPELINE_MAX_DEPTH:
                continue
            recent = [self._recent_s.get(c.key, PIPELINE_MAX_S) for c in w.calls]
            if max(recent) >= PIPELINE_MAX_S or sum(recent) >= PIPELINE_BUDGET_S:
                continue
            # The shortest queue, then the one that has the module warm.
            if (
                best is None
                or len(w.calls) < len(best.calls)
                or (
                    len(w.calls) == len(best.calls)
                    and warm_hint is not None
                    and warm_hint in w.warm
                )
            ):
                best = w
        return best

    def _pump(self) -> None:
        # First pass: functions under their cap, in FIFO order. Second pass: idle workers left
        # over go to short functions over their cap (nobody under a cap is waiting then).
        for borrow in (False, True):
            if not self._idle or not self._queue:
                break
            for waiter in list(self._queue):
                if not self._idle:
                    break
                if waiter.fut.done():
                    self._queue.remove(waiter)
                    continue
                if not self._may_run(waiter.key, borrow=borrow):
                    continue
                self._queue.remove(waiter)
                self._assign(self._pick_idle(waiter.warm_hint), waiter)
        if self._idle:
            return
        # Third pass, every worker busy: queue short calls behind short running ones, in FIFO
        # order up to the first call that may run but not be pipelined (no overtaking it).
        for waiter in list(self._queue):
            if waiter.fut.done():
                self._queue.remove(waiter)
                continue
            if not self._may_run(waiter.key, borrow=True):
                continue
            target = self._pipeline_target(waiter.key, waiter.warm_hint)
            if target is None:
                return
            self._queue.remove(waiter)
            self._assign(target, waiter)

    def _note_time(self, key: str, seconds: float) -> None:
        old = self._recent_s.pop(key, None)
        self._recent_s[key] = seconds if old is None else 0.7 * old + 0.3 * seconds
        if len(self._recent_s) > RECENT_TRACKED:
            self._recent_s.popitem(last=False)

    def _pick_idle(self, warm_hint: str | None) -> _Worker:
        chosen = self._idle[-1]  # most recently used: its caches are hottest
        if warm_hint is not None:
            for w in reversed(self._idle):
                if warm_hint in w.warm:
                    chosen = w
                    break
        self._idle.remove(chosen)
        return chosen

    def _assign(self, worker: _Worker, waiter: _Waiter) -> None:
        call = worker.submit(waiter.key, waiter.frame, waiter.timeout_s)
        if not call.fut.done():  # else the worker was dead: the caller sees _NotStarted
            self._running[waiter.key] += 1
        waiter.fut.set_result(call)

    def _call_done(self, call: _Call) -> None:
        """A call left its worker (answered, or the worker died): free its place."""
        if call.started_ns:
            seconds = (time.perf_counter_ns() - call.started_ns) / 1e9
            fut = call.fut
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                # The worker's own figure: what seen from here also counts the time its reply
                # waited for this loop, which grows with load and would end pipelining then.
                reported = fut.result().get("duration_us")
                if isinstance(reported, int):
                    seconds = min(seconds, reported / 1e6 + WORKER_OVERHEAD_S)
            self._note_time(call.key, seconds)
        self._running[call.key] -= 1
        if self._running[call.key] <= 0:
            del self._running[call.key]
        worker = call.worker
        if not worker.calls and not worker.dead and not self._closed and worker not in self._idle:
            self._idle.append(worker)
        self._pump()

    async def _submit(
        self, key: str, warm_hint: str | None, body: dict[str, Any], timeout_s: float
    ) -> _Call:
        """Write a job to a worker now, or queue it until one may take it."""
        if self._closed or not self._started:
            raise UnavailableError("the exec pool is not running")
        fut: asyncio.Future[_Call] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(key, warm_hint, encode_frame(body), timeout_s, fut)
        if not self._queue and self._may_run(key, borrow=True):
            target = (
                self._pick_idle(warm_hint) if self._idle else self._pipeline_target(key, warm_hint)
            )
            if target is not None:
                self._assign(target, waiter)
                return fut.result()
        if len(self._queue) >= self.max_queue:
            raise UnavailableError(
                f"all workers are busy and {len(self._queue)} calls are queued; retry later",
                {"max_queue": self.max_queue},
            )
        self._queue.append(waiter)
        self._pump()
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                fut.result().worker.abandon(fut.result())
            else:
                with contextlib.suppress(ValueError):
                    self._queue.remove(waiter)
            raise

    @staticmethod
    async def _wait(call: _Call) -> dict[str, Any]:
        try:
            return await call.fut
        except asyncio.CancelledError:
            call.worker.abandon(call)
            raise

    def _version_dir(self, path: Path | str) -> str:
        """Absolute, symlink-free path of a version dir (the worker's cache key); memoized,
        since ``Path.resolve`` costs ~20 us of syscalls on every call otherwise."""
        hit = self._vdirs.get(path)
        if hit is None:
            if len(self._vdirs) >= RECENT_TRACKED:
                self._vdirs.clear()
            hit = self._vdirs[path] = str(Path(path).resolve())
        return hit

    # -- public calls -------------------------------------------------------------------------

    async def precompile(self, version_dir: Path) -> None:
        """Validate and precompile ``version_dir/main.wasm`` in a worker (hostile-safe)."""
        vdir = str(Path(version_dir).resolve())
        body = {"op": "precompile", "dir": vdir}
        call = await self._submit(_PRECOMPILE_KEY, None, body, PRECOMPILE_TIMEOUT_S)
        try:
            reply = await self._wait(call)
        except TimeoutError:
            raise InvalidArgumentError(
                f"compiling the module took over {PRECOMPILE_TIMEOUT_S:.0f} s"
            ) from None
        except (_WorkerDied, _NotStarted) as exc:
            raise self._died(exc, "precompiling") from None
        if not reply.get("ok"):
            raise error_from_wire(reply.get("code"), reply.get("message"), reply.get("details"))
        self._note_warm(call.worker, vdir)

    async def invoke(self, job: InvokeJob) -> InvokeResult:
        """Run one invocation; guest failures raise the matching :class:`FnError`."""
        if job.mode not in ("wasm", "native"):
            raise InvalidArgumentError(f"unknown mode {job.mode!r}", {"mode": job.mode})
        fuel = job.limits.fuel
        if fuel is not None and (not isinstance(fuel, int) or isinstance(fuel, bool) or fuel < 1):
            raise InvalidArgumentError(f"fuel must be a positive integer, got {fuel!r}")
        t0 = time.perf_counter_ns()
        vdir = self._version_dir(job.version_dir)
        lim = job.limits
        body = {
            "op": "invoke",
            "function": job.function,
            "version": job.version,
            "mode": job.mode,
            "dir": vdir,
            "input": job.input,
            "args": list(job.args),
            "timeout_ms": lim.timeout_ms,
            "memory_mb": lim.memory_mb,
            "output_bytes": lim.output_bytes,
        }
        if lim.fuel is not None and job.mode == "wasm":
            body["fuel"] = lim.fuel
        timeout_s = lim.timeout_ms / 1000 + (GRACE_S if job.mode == "wasm" else NATIVE_GRACE_S)
        warm_hint = vdir if job.mode == "wasm" else None
        for _attempt in range(NOT_STARTED_RETRIES + 1):
            call = await self._submit(job.function, warm_hint, body, timeout_s)
            try:
                reply = await self._wait(call)
                break
            except _NotStarted:
                continue  # queued behind a call that killed its worker: it never ran
            except TimeoutError:
                raise FunctionTimeoutError(
                    f"function {job.function!r} timed out after {lim.timeout_ms} ms",
                    {"timeout_ms": lim.timeout_ms},
                ) from None
            except _WorkerDied as exc:
                raise self._died(exc, f"the call to {job.function!r}") from None
        else:
            raise UnavailableError(
                f"the call to {job.function!r} could not be started: its workers kept dying"
            )
        if not reply.get("ok"):
            raise error_from_wire(reply.get("code"), reply.get("message"), reply.get("details"))
        if job.mode == "wasm":
            self._note_warm(call.worker, vdir)
        return InvokeResult(
            output=reply["output"],
            stderr=reply["stderr"],
            exit_code=reply["exit_code"],
            truncated=reply["truncated"],
            duration_us=reply["duration_us"],
            queue_us=(call.started_ns - t0) // 1000,
            wall_us=(time.perf_counter_ns() - t0) // 1000,
            memory_peak=reply["memory_peak"],
            mode=job.mode,
        )

    def _died(self, exc: Exception, what: str) -> FnError:
        if self._closed:
            return UnavailableError("the exec pool is shutting down")
        return InternalError(f"the worker died during {what}: {exc}")

    @staticmethod
    def _note_warm(worker: _Worker, vdir: str) -> None:
        worker.warm[vdir] = None
        worker.warm.move_to_end(vdir)
        while len(worker.warm) > WARM_TRACKED:
            worker.warm.popitem(last=False)

    def stats(self) -> dict[str, Any]:
        """Counters for monitoring and tests."""
        return {
            "workers": self.size,
            "idle": len(self._idle),
            "queued": len(self._queue),
            "running": dict(self._running),
            "pids": [w.pid for w in self._workers if w is not None and not w.dead],
            "sandbox": [w.info for w in self._workers if w is not None],
        }


def _sweep_uids(uids: set[int], stop: threading.Event | None) -> None:
    """SIGKILL every process owned by one of the pool's dedicated uids (parent side)."""
    for _ in range(20):
        found = False
        for name in os.listdir("/proc"):
            if not name.isdigit() or (stop is not None and stop.is_set()):
                continue
            try:
                if os.stat(f"/proc/{name}").st_uid in uids:
                    os.kill(int(name), signal.SIGKILL)
                    found = True
            except (OSError, ValueError):
                continue
        if not found:
            return
        time.sleep(0.01)
