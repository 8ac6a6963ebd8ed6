"""Warm wasm calls in the serving process: no process hop between the request and the guest.

The wasm sandbox is the isolation boundary (DESIGN.md, execution model): a guest touches no
memory outside its Store. What used to need a worker process is answered here:

* CPU loops: epoch interruption. One ticker thread advances the engines' epoch every
  ``EPOCH_TICK_S`` while calls run (it parks when idle); each Store gets a deadline in ticks.
* Waiting host calls: ``poll_oneoff`` and ``sched_yield`` are fnserver's own (``_wasi.py``)
  and end at the call's deadline with the same INTERRUPT trap.
* Output: ``fd_write`` is fnserver's own too and writes into the call's bounded buffers; a
  write past the cap stops the guest (no per-process file size limit exists to do it here).
* Memory, tables, stack: per Store (limiter, pooled slots, ``max_wasm_stack``).

Where a call runs (``_admission.py``): a function whose recent calls were all short runs inline
on the event loop's thread, under a short slice, and is re-run on a thread from the start if
it outlives it; everything else runs on a guest thread. Guest threads release the GIL while
wasm runs (ctypes) and run at a lower CPU priority than the loop, so the kernel shares the
cores among long calls round robin while the loop and its short calls go first.

Compiled modules come from the node's cache (``_modules.py``, written only by the pool after a
bounded compile process); each file is hashed against the recorded sha256 before it is mapped.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import math
import os
import resource
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import wasmtime

from ..protocol import (
    FnError,
    FunctionTimeoutError,
    InvalidArgumentError,
    InvokeResult,
    MemoryLimitError,
    TrapError,
    UnavailableError,
)
from ._admission import Admission, InlinePolicy, Waiting
from ._cachefile import ModuleMismatch, open_verified
from ._engine import EPOCH_TICK_S, engine_key, make_engine
from ._guest import GuestRun, run_guest
from ._modules import CompiledModule
from ._policy import QueueFull
from ._types import InvokeJob
from ._wasi import CallDeadline, install_output, install_waits, thread_deadline

__all__ = ["DEFAULT_SLOTS", "ModuleRejected", "WasmRunner"]

log = logging.getLogger(__name__)

#: Calls running at once in one serving process (each holds a pooled memory slot, reserved as
#: 4 GiB of address space, and at most one guest thread).
DEFAULT_SLOTS: Final = 64
#: An inline call's slice, in epoch ticks (10-20 ms): the longest it may hold the loop.
INLINE_SLICE_TICKS: Final = 2
#: Ready modules kept (Go modules are ~5 MB mmapped, C ones ~15 KB).
CACHE_MAX_MODULES: Final = 256
#: stderr is diagnostics: returned up to this much (and never past the output cap).
STDERR_MAX: Final = 64 * 1024
#: Host stack for guests: wasm may use up to max_wasm_stack (8 MiB) on top of host frames.
GUEST_THREAD_STACK: Final = 32 * 1024 * 1024
#: The main thread's stack limit needed to run guests inline on it.
INLINE_STACK: Final = 64 * 1024 * 1024
#: Guest threads run this much nicer than the loop: the loop preempts them when it wakes.
GUEST_NICE: Final = 10
#: The epoch ticker parks after this long without a running call.
PARK_AFTER_S: Final = 1.0


class ModuleRejected(Exception):
    """The compiled file is not the one the pool recorded: never loaded; recompile it."""


@dataclass
class _Ready:
    pre: wasmtime.InstancePre
    module: wasmtime.Module


class _Engine:
    """One engine with its linker (fnserver's waiting calls and output) and cache key."""

    def __init__(self, fuel: bool, slots: int) -> None:
        self.fuel = fuel
        self.engine = make_engine(fuel, slots=slots)
        self.linker = wasmtime.Linker(self.engine)
        self.linker.define_wasi()
        install_waits(self.linker)
        install_output(self.linker)
        self.key = engine_key(fuel)


class _Overran(Exception):
    """An inline call outlived its slice (it is run again on a thread)."""



class WasmRunner:
    """Runs wasm calls in this process: inline on the loop's thread or on guest threads.

    ``slots`` bounds the calls running at once, ``per_function`` those of one function;
    up to ``max_queue`` more wait their turn (round robin across functions), past that a
    call fails fast with UNAVAILABLE. ``cache_dir`` holds the compiled modules.
    """

    def __init__(
        self,
        *,
        cache_dir: Path,
        slots: int = DEFAULT_SLOTS,
        per_function: int | None = None,
        max_queue: int = 1024,
    ) -> None:
        self.cache_dir = str(cache_dir)
        self.slots = slots
        self.per_function = per_function if per_function is not None else max(1, slots // 4)
        self._adm: Admission[asyncio.Future[None]] = Admission(
            slots, self.per_function, max_queue
        )
        self.inline_policy = InlinePolicy()
        self._engines: dict[bool, _Engine] = {}
        self._engines_lock = threading.Lock()
        self._ready: OrderedDict[str, _Ready] = OrderedDict()
        self._loading: dict[str, asyncio.Future[_Ready]] = {}
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._inline_ok = False
        self._closed = False
        # Guest calls running now (inline or threaded): their deadlines, to cancel at close.
        self._calls: set[CallDeadline] = set()
        self._ticker: threading.Thread | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._last_call = time.monotonic()
        self.inline_calls = 0
        self.thread_calls = 0
        self.overruns = 0

    # -- life cycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Build the main engine, the guest threads' pool and the epoch ticker."""
        self._inline_ok = _prepare_inline_stack()
        self._engine(False)
        # Guest threads need room for the 8 MiB wasm stack; the setting applies to threads
        # created from now on (the pool's, all started below).
        threading.stack_size(GUEST_THREAD_STACK)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.slots, thread_name_prefix="guest", initializer=_lower_priority
        )
        _start_every_thread(self._executor, self.slots)
        self._ticker = threading.Thread(target=self._tick, name="epoch", daemon=True)
        self._ticker.start()

    async def close(self) -> None:
        """Fail waiting calls, stop running ones at once, and join the guest threads."""
        if self._closed:
            return
        self._closed = True
        for call in self._adm.drain():
            if not call.payload.done():
                call.payload.set_exception(UnavailableError("the server is shutting down"))
        self._stop_all()
        self._stop.set()
        self._wake.set()
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)
        if self._ticker is not None:
            await asyncio.to_thread(self._ticker.join)
        self._ready.clear()

    def _stop_all(self) -> None:
        for call in list(self._calls):
            call.cancel()
        # Past every deadline a call can have (300 s max at 10 ms ticks is 30,001 ticks).
        for eng in self._engines.values():
            for _ in range(40_000):
                eng.engine.increment_epoch()

    def _engine(self, fuel: bool) -> _Engine:
        eng = self._engines.get(fuel)
        if eng is None:
            # Under a lock: the first two fuel modules loading at once, on two guest threads,
            # each made an engine, and the module loaded into the engine that lost was then
            # run in the one that won ("cross-Engine usage is not supported").
            with self._engines_lock:
                eng = self._engines.get(fuel)
                if eng is None:
                    # The fuel engine keeps the on-demand allocator (slots are for the main one).
                    eng = self._engines[fuel] = _Engine(fuel, 0 if fuel else self.slots)
        return eng

    def _tick(self) -> None:
        while not self._stop.is_set():
            time.sleep(EPOCH_TICK_S)
            for eng in list(self._engines.values()):
                eng.engine.increment_epoch()
            if not self._adm.running and time.monotonic() - self._last_call > PARK_AFTER_S:
                self._wake.clear()
                # Re-checked after clearing: run() sets _last_call before _wake, close() sets
                # _stop before _wake (a wake-up cleared here would park the ticker for good,
                # and close() would wait for it forever).
                if (
                    not self._stop.is_set()
                    and not self._adm.running
                    and time.monotonic() - self._last_call > PARK_AFTER_S
                ):
                    self._wake.wait()

    def running(self) -> dict[str, int]:
        """Calls running now, per function."""
        return self._adm.running_by_key()

    def stats(self) -> dict[str, int]:
        """Counters for monitoring and tests."""
        return {
            "slots": self.slots,
            "running": self._adm.running,
            "queued": self._adm.queued,
            "modules": len(self._ready),
            "inline_calls": self.inline_calls,
            "thread_calls": self.thread_calls,
            "inline_overruns": self.overruns,
        }

    # -- modules --------------------------------------------------------------------------

    async def _module(self, module: CompiledModule, fuel: bool) -> _Ready:
        ready = self._ready.get(module.name)
        if ready is not None:
            self._ready.move_to_end(module.name)
            return ready
        pending = self._loading.get(module.name)
        if pending is None:
            pending = asyncio.ensure_future(asyncio.to_thread(self._load, module, fuel))
            self._loading[module.name] = pending
            pending.add_done_callback(lambda _f: self._loading.pop(module.name, None))
        ready = await asyncio.shield(pending)
        self._ready[module.name] = ready
        while len(self._ready) > CACHE_MAX_MODULES:
            self._ready.popitem(last=False)
        return ready

    def _load(self, module: CompiledModule, fuel: bool) -> _Ready:
        """Hash the cache file against the record, then map it (a guest thread's work)."""
        eng = self._engine(fuel)
        try:
            fd = open_verified(self.cache_dir, module.name, eng.key, module.sha256)
        except ModuleMismatch as exc:
            raise ModuleRejected(str(exc)) from None
        try:
            # Through the checked fd: the inode hashed is the inode mapped.
            loaded = wasmtime.Module.deserialize_file(eng.engine, f"/proc/self/fd/{fd}")
        except wasmtime.WasmtimeError as exc:
            raise ModuleRejected(f"cannot load {module.name}: {exc}") from None
        finally:
            os.close(fd)
        try:
            pre = eng.linker.instantiate_pre(loaded)
        except wasmtime.WasmtimeError as exc:
            raise InvalidArgumentError(f"not a WASI command: {exc}") from None
        return _Ready(pre, loaded)

    # -- calls ----------------------------------------------------------------------------

    async def run(self, job: InvokeJob, module: CompiledModule) -> InvokeResult:
        """Run one wasm call; guest faults raise the matching FnError."""
        if self._closed or self._executor is None:
            raise UnavailableError("the server is shutting down")
        fuel = job.limits.fuel
        cold = module.name not in self._ready
        ready = await self._module(module, fuel is not None)
        loop = asyncio.get_running_loop()
        key = job.function
        self._last_call = time.monotonic()
        if not self._wake.is_set():
            self._wake.set()
        try:
            place = self._adm.submit(key, loop.create_future(), group=job.tenant)
        except QueueFull as exc:
            raise UnavailableError(
                f"too many calls waiting ({self._adm.queued}); try again later",
                {"queued": self._adm.queued},
            ) from exc
        if not place.admitted:
            try:
                await place.payload
            except asyncio.CancelledError:
                if place.admitted:
                    self._release(place)
                else:
                    self._adm.withdraw(place)
                raise
        result = await self._place_and_run(job, ready, key, loop, place)
        # A cold start: this call had to map its module first (stats count them, §5.14).
        return dataclasses.replace(result, cold=True) if cold else result

    def _release(self, place: Waiting[asyncio.Future[None]]) -> None:
        for nxt in self._adm.finished(place):
            if not nxt.payload.done():
                nxt.payload.set_result(None)
            else:  # its caller is gone; give the slot on
                self._release(nxt)

    async def _place_and_run(
        self,
        job: InvokeJob,
        ready: _Ready,
        key: str,
        loop: asyncio.AbstractEventLoop,
        place: Waiting[asyncio.Future[None]],
    ) -> InvokeResult:
        """Run an admitted call inline or on a guest thread; its slot is given back when
        its guest has ended (for a caller cancelled mid-call, when the thread is done: the
        Store holds a pooled slot until then)."""
        handed_over = False
        try:
            fuel = job.limits.fuel
            eng = self._engine(fuel is not None)
            now = time.monotonic()
            if self._inline_ok and fuel is None and self.inline_policy.inline(key, now):
                try:
                    outcome, seconds = self._execute(eng, ready, job, inline=True)
                except _Overran:
                    self.overruns += 1
                    self.inline_policy.overran(key, time.monotonic())
                else:
                    self.inline_calls += 1
                    return self._noted(key, outcome, seconds)
            executor = self._executor
            if executor is None:
                raise UnavailableError("the server is shutting down")
            self.thread_calls += 1
            running = executor.submit(self._execute, eng, ready, job, inline=False)
            try:
                outcome, seconds = await asyncio.wrap_future(running, loop=loop)
            except asyncio.CancelledError:
                if not running.done():
                    # The guest runs on to its own end (a deadline stops it): its slot is given
                    # back then, not now, or a new call would find every pooled slot taken.
                    running.add_done_callback(
                        lambda _f: loop.call_soon_threadsafe(self._release, place)
                    )
                    handed_over = True
                raise
            return self._noted(key, outcome, seconds)
        finally:
            if not handed_over:
                self._release(place)

    def _noted(self, key: str, outcome: InvokeResult | FnError, seconds: float) -> InvokeResult:
        """Learn what the call cost (a call that failed after holding its thread for long
        counts as long too), then return its result or raise its error."""
        self.inline_policy.note(key, seconds, time.monotonic())
        if isinstance(outcome, FnError):
            raise outcome
        return outcome

    def _execute(
        self, eng: _Engine, ready: _Ready, job: InvokeJob, *, inline: bool
    ) -> tuple[InvokeResult | FnError, float]:
        """One fresh-Store run on this thread; its result (or the error the guest's failure
        means) and what it cost the thread in seconds: its CPU time plus its sleeps in host
        calls, not the wall time, which on a busy guest thread also counts waiting for the
        GIL and the cores (and would make every function look long, and keep it off the
        inline path, under load)."""
        lim = job.limits
        cap = lim.output_bytes
        ticks = math.ceil(lim.timeout_ms / 1000 / EPOCH_TICK_S) + 1
        timeout_ns = lim.timeout_ms * 1_000_000
        sliced = inline and ticks > INLINE_SLICE_TICKS
        if sliced:
            ticks = INLINE_SLICE_TICKS
            timeout_ns = min(timeout_ns, int(INLINE_SLICE_TICKS * EPOCH_TICK_S * 1e9))
        call = thread_deadline()
        self._calls.add(call)
        started = time.perf_counter_ns()
        cpu_started = time.thread_time_ns()
        try:
            if self._closed:
                raise UnavailableError("the server is shutting down")
            run = run_guest(
                eng.engine,
                ready.pre,
                args=(job.function, *job.args),
                stdin=job.input,
                memory_limit=lim.memory_mb * 1024 * 1024,
                deadline_ticks=ticks,
                fuel=lim.fuel,
                timeout_ns=timeout_ns,
                out_cap=cap,
                err_keep=STDERR_MAX,
                env=job.env,
            )
        finally:
            self._calls.discard(call)
        duration_ns = time.perf_counter_ns() - started
        cost_s = (time.thread_time_ns() - cpu_started + call.waited_ns) / 1e9
        try:
            if _interrupted(run) and not call.flooded:
                if self._closed:
                    # Stopped by close(), not by its own deadline.
                    raise UnavailableError("the server is shutting down")
                if sliced:
                    raise _Overran
            try:
                return _result(job, run, call, duration_ns // 1000), cost_s
            except FnError as exc:  # the guest's own failure: a TIMEOUT, a trap, MEMORY
                return exc, cost_s
        finally:
            call.drop_output()  # read by now (or never: an overrun's, a failure's)
            run.close()


def _interrupted(run: GuestRun) -> bool:
    failure = run.failure
    return isinstance(failure, wasmtime.Trap) and failure.trap_code == wasmtime.TrapCode.INTERRUPT


def _result(job: InvokeJob, run: GuestRun, call: CallDeadline, duration_us: int) -> InvokeResult:
    """The protocol's result of a finished run, or the FnError its failure means."""
    name = job.function
    lim = job.limits
    mem_limit = lim.memory_mb * 1024 * 1024
    memory, exit_code, failure = run.memory, run.exit_code, run.failure
    output, stderr = bytes(call.out), bytes(call.err)
    flooded = call.flooded
    near_limit = mem_limit - memory < max(1 << 20, mem_limit // 16)
    if failure is not None:
        if flooded:
            exit_code = -1  # stopped for flooding its output; see InvokeResult docs
        elif isinstance(failure, wasmtime.Trap):
            code = failure.trap_code
            if code == wasmtime.TrapCode.OUT_OF_FUEL:
                raise FunctionTimeoutError(
                    f"function {name!r} ran out of fuel ({lim.fuel} units)",
                    {"fuel": lim.fuel, "timeout_ms": lim.timeout_ms, "stderr": stderr},
                )
            if code == wasmtime.TrapCode.INTERRUPT:
                raise FunctionTimeoutError(
                    f"function {name!r} timed out after {lim.timeout_ms} ms",
                    {"timeout_ms": lim.timeout_ms, "stderr": stderr},
                )
            if near_limit:
                raise _memory_error(name, lim.memory_mb, memory, stderr)
            kind = code.name.lower() if code is not None else "unknown"
            raise TrapError(
                f"function {name!r} trapped: {kind}",
                {"trap": kind, "stderr": stderr, "message": failure.message[:2000]},
            )
        else:
            msg = str(failure)
            if not run.instantiated and "memory" in msg and "limit" in msg:
                # Instantiation refused: the declared minimum is over the Store limit.
                raise _memory_error(name, lim.memory_mb, memory, stderr)
            if not run.instantiated and "concurrent" in msg:
                # Every pooled slot taken (cannot happen while slots bound admission).
                raise UnavailableError("no free sandbox slot; try again")
            raise TrapError(
                f"function {name!r} failed: {msg[:500]}",
                {"trap": "error", "stderr": stderr, "message": msg[:2000]},
            )
    elif exit_code != 0 and near_limit:
        raise _memory_error(name, lim.memory_mb, memory, stderr)
    return InvokeResult(
        output=output,
        stderr=stderr,
        exit_code=exit_code,
        truncated=flooded,
        duration_us=duration_us,
        memory_peak=memory,
        mode="wasm",
    )


def _memory_error(name: str, memory_mb: int, memory: int, stderr: bytes) -> MemoryLimitError:
    return MemoryLimitError(
        f"function {name!r} hit its memory limit of {memory_mb} MiB",
        {"memory_mb": memory_mb, "memory": memory, "stderr": stderr},
    )


def _start_every_thread(executor: concurrent.futures.ThreadPoolExecutor, count: int) -> None:
    """Start the pool's ``count`` threads now rather than one by one on the loop when calls
    first need them: starting a thread waits until it runs, and with two saturated cores that
    wait held the loop for over 100 ms (the soak's loop-lag warnings named
    ``_adjust_thread_count``). Each task waits for all the others, so each gets a new thread;
    they end together once the last one has started (or give up after a minute)."""
    together = threading.Barrier(count)

    def wait() -> None:
        with contextlib.suppress(threading.BrokenBarrierError):
            together.wait(timeout=60)

    for _ in range(count):
        executor.submit(wait)


def _lower_priority() -> None:
    """Guest thread initializer: nicer than the loop, so a waking loop preempts it."""
    with contextlib.suppress(OSError):
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + GUEST_NICE)


def _prepare_inline_stack() -> bool:
    """True if guests may run on this (the loop's) thread: it must be the main thread, whose
    stack grows up to RLIMIT_STACK, raised here to room for the 8 MiB wasm stack. Any other
    thread's stack size is unknown, so calls made there always go to guest threads."""
    if threading.current_thread() is not threading.main_thread():
        return False
    soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
    if soft == resource.RLIM_INFINITY or soft >= INLINE_STACK:
        return True
    if hard != resource.RLIM_INFINITY and hard < INLINE_STACK:
        log.warning("RLIMIT_STACK hard limit %d is too small to run guests inline", hard)
        return False
    try:
        resource.setrlimit(resource.RLIMIT_STACK, (INLINE_STACK, hard))
    except (OSError, ValueError):
        return False
    return True

