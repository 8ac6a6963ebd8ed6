"""The execution side of the server: wasm in this process, native in worker processes.

:class:`ExecPool` is the composition. A wasm call gets its compiled module from the node's
cache (``_modules.py``, compiled in a bounded subprocess) and runs in this process on the
:class:`~._inproc.WasmRunner`. A native call goes to a worker process (``_handle.py``,
``_worker.py``) chosen by the pure :class:`~._policy.Scheduler`, which spawns the binary under
per-call limits; pipe replies become the protocol's :class:`InvokeResult`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import threading
import time
from collections import Counter, deque
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

from ..protocol import (
    MAX_FUEL,
    FnError,
    FunctionTimeoutError,
    InternalError,
    InvalidArgumentError,
    InvokeResult,
    UnavailableError,
    encode_frame,
)
from ._handle import Call, NotStarted, WorkerDied, WorkerHandle
from ._inproc import DEFAULT_SLOTS, ModuleRejected, WasmRunner
from ._modules import COMPILE_TIMEOUT_S, CompiledModule, ModuleCache
from ._policy import Placement, PolicyConfig, QueueFull, Scheduler, Ticket
from ._sandbox import claim_uids, memcg_dir
from ._types import InvokeJob
from ._wire import RunError, RunOk, RunRequest

__all__ = ["Delegate", "ExecPool"]

#: Past a native call's own deadline (the worker kills the binary at it): room for the reply
#: before the parent kills the worker. The parent's kill is a backstop for a worker that
#: stopped answering; it must not race a worker that is only slow to be scheduled on a loaded
#: machine (0.25 s did, under a load average of 6 on 2 cores).
NATIVE_GRACE_S: Final = 2.0
START_TIMEOUT_S: Final = 30.0
#: Worker time around a guest's own run (request decode, Store setup and teardown, reply).
WORKER_OVERHEAD_S: Final = 0.0001
#: A call queued behind one that killed its worker never ran: it is retried this often.
NOT_STARTED_RETRIES: Final = 2

_Placement = Placement[WorkerHandle, "_Waiter"]


class Delegate(Protocol):
    """What a serving process without privileges hands to its control process: native calls
    (workers need uids and namespaces) and compiles (the module cache is not its to write)."""

    async def invoke_native(self, job: InvokeJob) -> InvokeResult:
        """Run a native call in the control process's workers."""
        ...

    async def compile(self, function: str, version: int) -> None:
        """Have the control process put (function, version)'s module in the node's cache."""
        ...


@dataclass(eq=False)
class _Waiter:
    """A call waiting for its place: resolved with the :class:`Call` once written."""

    frame: bytes
    timeout_s: float
    fut: asyncio.Future[Call]


class ExecPool:
    """Runs wasm calls in this process and native calls in worker processes.

    wasm: ``wasm_slots`` calls run at once, ``wasm_per_function`` (default a quarter of the
    slots) of one function; up to ``max_queue`` more wait, served round robin across
    functions (``_admission.py``). Native: ``per_function`` (default ``max(1, workers - 1)``)
    caps how many workers one function may hold at once, so one hot or stuck function always
    leaves a worker for the others when there are two or more; up to ``max_queue`` more wait
    in a FIFO (a job whose function is at its cap does not block the ones behind it). Past the
    queue both fail fast with :class:`UnavailableError`. ``cache_dir`` is the node's
    compiled-module cache (created 0755; written only by this process after a compile,
    never by a worker); it and the ``hidden`` directories (the store, the build caches) are
    out of sight of native calls. ``policy`` overrides the scheduler's knobs (tests, benchmarks);
    ``compile_timeout_s`` bounds one compile.
    """

    def __init__(
        self,
        *,
        workers: int | None = None,
        max_queue: int = 256,
        per_function: int | None = None,
        cache_dir: Path,
        policy: PolicyConfig | None = None,
        compile_timeout_s: float = COMPILE_TIMEOUT_S,
        wasm_slots: int = DEFAULT_SLOTS,
        wasm_per_function: int | None = None,
        hidden: Sequence[Path] = (),
        delegate: Delegate | None = None,
        unsandboxed_native: bool = False,
        compile_slots: asyncio.Semaphore | None = None,
    ) -> None:
        # Shared with the builder: builds and compiles together stay under one bound.
        self._compile_slots = compile_slots
        # Native calls run only in a complete sandbox unless the operator said otherwise
        # (``--unsandboxed-native``): a host that refuses a piece gets a clear refusal.
        self.unsandboxed_native = unsandboxed_native
        self._gaps: list[str] = []  # what the ready workers' sandboxes lack (worker_ready)
        # A delegate takes the native calls and the compiles: this pool then runs wasm only,
        # with no worker, no compiler and no write to the module cache.
        self._delegate = delegate
        self.size = 0 if delegate is not None else (workers or os.cpu_count() or 1)
        if delegate is None and workers is not None and workers < 1:
            raise ValueError("workers must be at least 1")
        self.max_queue = max_queue
        self.per_function = per_function if per_function is not None else max(1, self.size - 1)
        self.cache_dir = Path(cache_dir)
        if policy is None:
            policy = PolicyConfig(per_function=self.per_function, max_queue=max_queue)
        else:
            policy = dataclasses.replace(
                policy, per_function=self.per_function, max_queue=max_queue
            )
        self._sched: Scheduler[WorkerHandle, _Waiter] = Scheduler(policy)
        self._compile_timeout_s = compile_timeout_s
        # Directories no native call may see (the store, the caches): see _sandbox.py.
        self._hidden = tuple(Path(p).absolute() for p in (*hidden, cache_dir))
        self.wasm = WasmRunner(
            cache_dir=self.cache_dir,
            slots=wasm_slots,
            per_function=wasm_per_function,
            max_queue=max_queue,
        )
        self._modules: ModuleCache | None = None
        self._workers: list[WorkerHandle | None] = [None] * self.size
        self._tasks: set[asyncio.Task[None]] = set()
        self._started = False
        self._closed = False
        self._uids: list[int] = []
        self._uid_locks: list[int] = []
        # Set at close: sweeps still running in threads must not outlive the uid claim.
        self._stop_sweeps = threading.Event()
        # Delegated compiles in flight, one per (digest, fuel) however many calls wait.
        self._asked: dict[tuple[str, bool], asyncio.Future[None]] = {}

    # -- life cycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Prepare the module cache, start every worker and wait until each reports ready."""
        if self._started:
            return
        self._started = True
        if self._delegate is not None:
            # Read only: the control process prepared the cache and writes it.
            self._modules = ModuleCache(self.cache_dir, timeout_s=self._compile_timeout_s)
            self.wasm.start()
            return
        try:
            # One uid per worker, one more for the compiler: nothing a native function does
            # under its worker's uid can reach a compile in flight.
            self._uids, self._uid_locks = claim_uids(self.size + 1)
        except OSError as exc:
            self._closed = True
            raise InternalError(f"cannot claim sandbox uids for the exec workers: {exc}") from None
        self._modules = ModuleCache(
            self.cache_dir,
            compiler_uid=self._uids[self.size] if self._uids else None,
            timeout_s=self._compile_timeout_s,
            slots=self._compile_slots,
        )
        try:
            await asyncio.to_thread(self._modules.prepare)
        except OSError as exc:
            await self.close()
            raise InternalError(f"cannot prepare the module cache: {exc.strerror}") from None
        except FnError:
            await self.close()
            raise
        self.wasm.start()
        workers = [await self._spawn(i) for i in range(self.size)]
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                await asyncio.gather(*(w.ready for w in workers))
        except (TimeoutError, WorkerDied) as exc:
            await self.close()
            raise InternalError(f"exec workers failed to start: {exc!r}") from None

    async def _spawn(self, index: int) -> WorkerHandle:
        uid = self._uids[index] if self._uids else None
        worker = WorkerHandle(
            index, self, cache_dir=self.cache_dir, uid=uid, hidden=self._hidden
        )
        self._workers[index] = worker
        await worker.connect()
        return worker

    async def close(self) -> None:
        """Kill every worker (whole process groups) and compiler; fail waiting jobs.
        Idempotent."""
        if self._closed:
            return
        self._closed = True
        for waiter in self._sched.drain():
            if not waiter.payload.fut.done():
                waiter.payload.fut.set_exception(
                    UnavailableError("the exec pool is shutting down")
                )
        await self.wasm.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._modules is not None:
            await self._modules.close()
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
            await asyncio.to_thread(_remove_memcgs, self._uids)
        for w in workers:
            await asyncio.to_thread(w.remove_scratch)
        for fd in self._uid_locks:
            os.close(fd)
        self._uid_locks = []

    # -- WorkerListener: events from the handles -----------------------------------------------

    def worker_ready(self, worker: WorkerHandle) -> None:
        """A worker reported ready: it takes calls."""
        if self._closed:
            return
        self._gaps = sorted({g for w in self._workers if w is not None and w.info is not None
                             for g in w.info.gaps()})
        self._carry_out(self._sched.add_worker(worker))

    def call_finished(self, worker: WorkerHandle, call: Call) -> None:
        """A call left its worker answered: free its place, learn its run time."""
        seconds: float | None = None
        if call.started_ns:
            seconds = (time.perf_counter_ns() - call.started_ns) / 1e9
            fut = call.fut
            if fut.done() and not fut.cancelled():
                reply = fut.result()
                if isinstance(reply, RunOk):
                    # The worker's own figure: what is seen from here also counts the time
                    # its reply waited for this loop, which grows with load and would end
                    # pipelining exactly when it helps most.
                    seconds = min(seconds, reply.result.duration_us / 1e6 + WORKER_OVERHEAD_S)
        self._carry_out(self._sched.finished(worker, call.ticket, seconds))

    def worker_dead(self, worker: WorkerHandle, calls: list[Call]) -> None:
        """A worker takes no more calls (killed or exited): free its calls' places."""
        head_s: float | None = None
        if calls and calls[0].started_ns:
            # A call that overran or crashed its worker: remembered as long, so it is
            # neither pipelined nor allowed to borrow the spare worker next time.
            head_s = (time.perf_counter_ns() - calls[0].started_ns) / 1e9
        _, placements = self._sched.remove_worker(worker, head_seconds=head_s)
        self._carry_out(placements)

    def worker_exited(self, worker: WorkerHandle) -> None:
        """A worker process is gone: start its replacement."""
        if self._closed or self._workers[worker.index] is not worker:
            return
        self._track(self._replace(worker))

    # -- plumbing -----------------------------------------------------------------------------

    def _track(self, coro: Coroutine[Any, Any, None]) -> None:
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

    async def _replace(self, dead: WorkerHandle) -> None:
        """Start a worker in the dead one's slot, retrying with backoff while the pool is open."""
        delay = 0.05
        while not self._closed:
            if dead.uid is not None:
                await asyncio.to_thread(_sweep_uids, {dead.uid}, self._stop_sweeps)
            await asyncio.to_thread(dead.remove_scratch)
            worker = await self._spawn(dead.index)
            try:
                async with asyncio.timeout(START_TIMEOUT_S):
                    await worker.ready
                return
            except (TimeoutError, WorkerDied):
                worker.kill()
                await worker.exited
                await asyncio.to_thread(worker.remove_scratch)
                if self._workers[dead.index] is worker:
                    self._workers[dead.index] = dead  # keep the slot ours; retry below
                await asyncio.sleep(delay)  # backoff between restarts, not synchronisation
                delay = min(delay * 2, 2.0)

    def _carry_out(self, placements: list[_Placement]) -> None:
        """Write each placed call into its worker; give back places of callers gone since."""
        work = deque(placements)
        while work:
            p = work.popleft()
            waiter = p.ticket.payload
            if waiter.fut.done():  # the caller was cancelled while queued
                work.extend(self._sched.finished(p.worker, p.ticket, None))
                continue
            waiter.fut.set_result(p.worker.submit(p.ticket, waiter.frame, waiter.timeout_s))

    async def _submit(self, key: str, frame: bytes, timeout_s: float, tenant: str = "") -> Call:
        """Write a job to a worker now, or queue it until one may take it (``tenant``: whose
        share of the workers it counts against)."""
        if self._closed or not self._started:
            raise UnavailableError("the exec pool is not running")
        fut: asyncio.Future[Call] = asyncio.get_running_loop().create_future()
        ticket = Ticket(key, _Waiter(frame, timeout_s, fut), group=tenant)
        try:
            placements = self._sched.submit(ticket)
        except QueueFull as exc:
            raise UnavailableError(
                f"all workers are busy and {exc.queued} calls are queued; retry later",
                {"max_queue": exc.max_queue},
            ) from None
        self._carry_out(placements)
        if fut.done():
            return fut.result()
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                call = fut.result()
                call.worker.abandon(call)
            else:
                self._carry_out(self._sched.withdraw(ticket))
            raise

    @staticmethod
    async def _wait(call: Call) -> RunOk | RunError:
        try:
            return await call.fut
        except asyncio.CancelledError:
            call.worker.abandon(call)
            raise

    def _died(self, exc: Exception, what: str) -> FnError:
        if self._closed:
            return UnavailableError("the exec pool is shutting down")
        return InternalError(f"the worker died during {what}: {exc}")

    def _cache(self) -> ModuleCache:
        if self._modules is None or self._closed:
            raise UnavailableError("the exec pool is not running")
        return self._modules

    # -- the service's calls ------------------------------------------------------------------

    async def precompile(self, artifact: Path, digest: str) -> None:
        """Validate and compile a wasm module into the node's cache, in a separate bounded
        process. Raises :class:`InvalidArgumentError` for a module that is not a WASI
        command or takes over the compile limit."""
        # Absolute: the compile process and the workers run with cwd "/".
        await self._cache().ensure(Path(artifact).absolute(), digest.lower(), fuel=False)

    async def compile(self, function: str, version: int, artifact: Path, digest: str,
                      fuel: bool) -> None:
        """§5.10: make sure the module is in the node's cache, checking a cached copy's bytes
        again (a caller found it missing or damaged) and compiling when needed."""
        if self._delegate is not None:
            await self._delegate.compile(function, version)
            return
        cache = self._cache()
        digest = digest.lower() or await cache.digest_of(artifact)
        cache.forget(digest, fuel)
        await cache.ensure(Path(artifact).absolute(), digest, fuel)

    async def _module(self, job: InvokeJob) -> CompiledModule:
        cache = self._cache()
        digest = job.digest.lower() or await cache.digest_of(job.artifact)
        fuel = job.limits.fuel is not None
        hit = cache.known(digest, fuel)
        if hit is not None:
            return hit
        if self._delegate is None:
            return await cache.ensure(job.artifact.absolute(), digest, fuel)
        found = await cache.lookup(digest, fuel)
        if found is None:
            await self._ask_compile(job, digest, fuel)
            found = await cache.lookup(digest, fuel)
        if found is None:
            raise InternalError(
                f"the module of {job.function!r} version {job.version} is not in the cache "
                "after its compile"
            )
        return found

    async def _ask_compile(self, job: InvokeJob, digest: str, fuel: bool) -> None:
        """One delegated compile per key, shared by every call that waits for it."""
        assert self._delegate is not None
        key = (digest, fuel)
        fut = self._asked.get(key)
        if fut is None:
            fut = asyncio.ensure_future(self._delegate.compile(job.function, job.version))
            self._asked[key] = fut
            fut.add_done_callback(lambda f: _forget_asked(self._asked, key, f))
        await asyncio.shield(fut)

    async def invoke(self, job: InvokeJob) -> InvokeResult:
        """Run one invocation; guest failures raise the matching :class:`FnError`."""
        if job.mode not in ("wasm", "native"):
            raise InvalidArgumentError(f"unknown mode {job.mode!r}", {"mode": job.mode})
        lim = job.limits
        fuel = lim.fuel if job.mode == "wasm" else None
        if fuel is not None and (
            not isinstance(fuel, int) or isinstance(fuel, bool) or not 1 <= fuel <= MAX_FUEL
        ):
            raise InvalidArgumentError(f"fuel must be an integer from 1 to {MAX_FUEL}, got {fuel!r}")
        t0 = time.perf_counter_ns()
        if job.mode == "wasm":
            return await self._invoke_wasm(job, t0)
        return await self._invoke_native(job, t0)

    async def _invoke_native(self, job: InvokeJob, t0: int) -> InvokeResult:
        """A native call runs in a worker process, which spawns the binary for it."""
        if self._delegate is not None:
            return await self._delegate.invoke_native(job)
        self._check_sandbox()
        lim = job.limits
        request = RunRequest(
            function=job.function,
            path=str(job.artifact.absolute()),
            input=job.input,
            args=tuple(job.args),
            timeout_ms=lim.timeout_ms,
            memory_mb=lim.memory_mb,
            output_bytes=lim.output_bytes,
            env=job.env,
        )
        frame = encode_frame(request.to_wire())
        timeout_s = lim.timeout_ms / 1000 + NATIVE_GRACE_S
        for _attempt in range(NOT_STARTED_RETRIES + 1):
            call = await self._submit(job.function, frame, timeout_s, job.tenant)
            try:
                reply = await self._wait(call)
            except NotStarted:
                continue  # queued behind a call that killed its worker: it never ran
            except TimeoutError:
                raise FunctionTimeoutError(
                    f"function {job.function!r} timed out after {lim.timeout_ms} ms",
                    {"timeout_ms": lim.timeout_ms},
                ) from None
            except WorkerDied as exc:
                raise self._died(exc, f"the call to {job.function!r}") from None
            break
        else:
            raise UnavailableError(
                f"the call to {job.function!r} could not be started: its workers kept failing"
            )
        if isinstance(reply, RunError):
            raise reply.error()
        wall_us = (time.perf_counter_ns() - t0) // 1000
        # Seen from here, a pipelined call "starts" when the reply before it is read, which
        # under load is after the worker really started it: never report more queue time than
        # the wall time leaves beside the guest's own run (PROTOCOL.md §5.8: queue + run <= wall).
        queue_us = max(0, call.started_ns - t0) // 1000
        queue_us = max(0, min(queue_us, wall_us - reply.result.duration_us))
        return dataclasses.replace(
            reply.result, version=job.version, queue_us=queue_us, wall_us=wall_us, id=job.call_id
        )

    async def _invoke_wasm(self, job: InvokeJob, t0: int) -> InvokeResult:
        """A wasm call runs in this process (``_inproc.py``), its module from the cache."""
        module = await self._module(job)
        try:
            result = await self.wasm.run(job, module)
        except ModuleRejected:
            # The cached file changed after it was written: never loaded; compile anew.
            self._cache().reject(module)
            result = await self.wasm.run(job, await self._module(job))
        wall_us = (time.perf_counter_ns() - t0) // 1000
        queue_us = max(0, wall_us - result.duration_us)
        return dataclasses.replace(
            result, version=job.version, queue_us=queue_us, wall_us=wall_us, id=job.call_id
        )

    def _check_sandbox(self) -> None:
        if self.unsandboxed_native:
            return
        gaps = self._gaps
        if gaps:
            raise UnavailableError(
                "native functions are refused on this server: their sandbox is incomplete ("
                + "; ".join(gaps) + "). Start the server as root on a host that allows "
                "namespaces and seccomp, or pass --unsandboxed-native to run them anyway",
                {"sandbox_gaps": gaps},
            )

    def stats(self) -> dict[str, Any]:
        """Counters for monitoring and tests."""
        live = [w for w in self._workers if w is not None and not w.dead]
        return {
            "workers": self.size,
            "idle": self._sched.idle,
            # Waiting for a worker (native) or a slot (wasm).
            "queued": self._sched.queued + self.wasm.stats()["queued"],
            # Per function: native calls in workers and wasm calls in this process.
            "running": dict(Counter(self._sched.running()) + Counter(self.wasm.running())),
            "pids": [w.pid for w in live],
            "sandbox": [w.info.as_dict() for w in live if w.info is not None],
            "modules": len(self._modules) if self._modules is not None else 0,
            "compiles": self._modules.compiles if self._modules is not None else 0,
            "wasm": self.wasm.stats(),
        }


def _forget_asked(
    asked: dict[tuple[str, bool], asyncio.Future[None]], key: tuple[str, bool],
    fut: asyncio.Future[None],
) -> None:
    if asked.get(key) is fut:
        del asked[key]
    if not fut.cancelled():
        fut.exception()  # retrieved: every caller may have gone away


def _remove_memcgs(uids: list[int]) -> None:
    """Remove the workers' memory cgroups (empty once their processes are gone)."""
    for uid in uids:
        d = memcg_dir(uid)
        if d is not None:
            for group in (os.path.join(d, "call"), d):
                with contextlib.suppress(OSError):
                    os.rmdir(group)


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
        time.sleep(0.01)  # let the kernel finish the kills before looking again
