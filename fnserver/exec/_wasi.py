"""fnserver's own WASI calls: ``poll_oneoff`` and ``sched_yield`` that wait, ``fd_write``.

wasmtime's epoch interruption stops a guest running wasm, but not one asleep inside a host
call: wasmtime's own ``poll_oneoff`` sleeps for as long as the guest asked (MEASURED.md: 3 s
against a 0.2 s deadline), so the only way to stop it was to kill the process running it.
:func:`install_waits` shadows those two imports on a Linker (``allow_shadowing``, after
``define_wasi``) with host functions that honour the call's deadline: a wait that would run
past it ends at the deadline with a trap whose code is ``INTERRUPT``, exactly the trap an
epoch deadline raises, so the caller reports it the same way (a TIMEOUT) and the process
lives on. Every other WASI call stays wasmtime's.

The deadline of the running call is per thread (a guest runs on the thread that called it,
and its host calls run there too): one :class:`CallDeadline` per thread, restarted by each
run, so a call allocates nothing for it. Host functions are registered through the C API with raw ("unchecked") arguments, as
``_guest.py`` calls wasm: no wasmtime-py ``Caller``/``Val`` wrappers, and no Python exception
crossing into wasmtime (wasmtime-py keeps those in a process-global slot for its own wrappers
to re-raise).

Semantics follow WASI preview1 as wasmtime 50 implements them (``crates/wasi/src/p1.rs``):

* ``nsubscriptions == 0`` -> ``EINVAL``; an unknown subscription tag, clock id or flag bit
  -> ``EINVAL``; the CPU-time clocks -> ``EINVAL``.
* Clock subscriptions, relative or absolute (``SUBSCRIPTION_CLOCK_ABSTIME``), on
  ``CLOCK_REALTIME`` or ``CLOCK_MONOTONIC``. The guest's monotonic clock counts from when
  wasmtime made its WASI context; :meth:`CallDeadline.start` records a host instant taken
  just after that, so an absolute monotonic time is never reached early by the guest's own
  clock (at most a few microseconds late). The precision field is a hint and is ignored.
* ``fd_read`` on stdin is always ready (stdin is the call's whole input, in memory): event
  ``nbytes`` 1, as wasmtime reports it. ``fd_write`` on stdout/stderr is always ready
  (``nbytes`` 1). Any other descriptor -> ``EBADF`` for the whole call, as wasmtime does (a
  command has no other descriptors: fnserver gives it no preopened directories).
* The call returns when at least one subscription is ready; an event is written for every
  subscription ready then, in subscription order, and their count to ``*nevents``. (One
  difference from wasmtime: its zero-length timers are not ready on their first poll, so
  beside a ready descriptor it leaves out timers that have expired; here they are reported.)
* A pointer outside the guest's memory, or misaligned, traps, as wiggle's checks do.
"""

from __future__ import annotations

import ctypes
import struct
import threading
import time
from typing import Any, Final

import wasmtime
from wasmtime import _bindings as _b
from wasmtime import _ffi

__all__ = ["CallDeadline", "fd_write", "install_output", "install_waits", "thread_deadline"]

# WASI preview1 constants (witx: typenames.witx).
ERRNO_SUCCESS: Final = 0
ERRNO_BADF: Final = 8
ERRNO_INVAL: Final = 28
CLOCK_REALTIME: Final = 0
CLOCK_MONOTONIC: Final = 1
EVENTTYPE_CLOCK: Final = 0
EVENTTYPE_FD_READ: Final = 1
EVENTTYPE_FD_WRITE: Final = 2
SUBSCRIPTION_CLOCK_ABSTIME: Final = 1

#: subscription (48 bytes): userdata u64, tag u8 at 8; the union at 16.
SUBSCRIPTION_SIZE: Final = 48
_SUB_HEAD: Final = struct.Struct("<QB")
#: subscription_clock at 16: id u32, timeout u64 at 24, precision u64 at 32, flags u16 at 40.
_SUB_CLOCK: Final = struct.Struct("<I4xQQH")
#: subscription_fd_readwrite at 16: fd u32.
_SUB_FD: Final = struct.Struct("<I")
#: event (32 bytes): userdata u64, errno u16 at 8, type u8 at 10; nbytes u64 at 16,
#: flags u16 at 24.
EVENT_SIZE: Final = 32
_EVENT: Final = struct.Struct("<QHB5xQH6x")
_U32: Final = struct.Struct("<I")
#: ciovec (8 bytes): buf u32, buf_len u32.
_IOVEC: Final = struct.Struct("<II")
#: A guest may pass a huge subscription array: the parse checks the deadline this often.
_DEADLINE_CHECK_EVERY: Final = 4096

_TRAP_INTERRUPT: Final = wasmtime.TrapCode.INTERRUPT.value
_EXTERN_MEMORY: Final = _ffi.WASMTIME_EXTERN_MEMORY.value
_NO_FINALIZER: Final = ctypes.CFUNCTYPE(None, ctypes.c_void_p)()
_MEMORY_NAME: Final = ctypes.create_string_buffer(b"memory", 6)


class CallDeadline:
    """The deadline of the guest call running on one thread, as the waiting host calls see it.

    One per thread, reused from call to call (:func:`thread_deadline`): ``run_guest`` calls
    :meth:`start` right after the Store's WASI context exists, which fixes the deadline and
    the origin of the guest's monotonic clock and forgets the previous call. :meth:`cancel`
    ends the running call's waits at once, from any thread (the runner does so at close). ``timed_out`` records that a wait ended the call at its
    deadline.
    """

    __slots__ = (
        "_cancelled",
        "_event",
        "deadline_ns",
        "err",
        "err_keep",
        "err_total",
        "flooded",
        "origin_ns",
        "out",
        "out_cap",
        "out_total",
        "timed_out",
        "waited_ns",
    )

    def __init__(self) -> None:
        self.origin_ns = time.monotonic_ns()
        self.deadline_ns: int | None = None
        self.timed_out = False
        self.waited_ns = 0
        self._cancelled = False
        # The call's output (fnserver's own fd_write, install_output):
        # stdout up to ``out_cap`` bytes, stderr up to ``err_keep``; ``*_total`` count what
        # the guest wrote; ``flooded`` records that it wrote past the cap and was stopped.
        self.out = bytearray()
        self.err = bytearray()
        self.out_cap = 0
        self.err_keep = 0
        self.out_total = 0
        self.err_total = 0
        self.flooded = False
        # Made on the first wait: most threads never wait, and an Event costs a lock and a
        # condition.
        self._event: threading.Event | None = None

    def start(self, timeout_ns: int | None, out_cap: int = 0, err_keep: int = 0) -> None:
        """A call starts now: its guest's clock, and its deadline ``timeout_ns`` from now
        (None: no deadline); its output is captured up to ``out_cap`` / ``err_keep`` bytes."""
        now = time.monotonic_ns()
        self.origin_ns = now
        self.deadline_ns = None if timeout_ns is None else now + timeout_ns
        self.timed_out = False
        self.waited_ns = 0
        self.out = bytearray()
        self.err = bytearray()
        self.out_cap, self.err_keep = out_cap, min(err_keep, out_cap)
        self.out_total = self.err_total = 0
        self.flooded = False
        if self._cancelled:
            self._cancelled = False
            if self._event is not None:
                self._event.clear()

    def drop_output(self) -> None:
        """Give the output buffers' memory back once the call's result holds a copy. A guest
        thread lives on between calls, and each kept its last call's output (up to the 4 MiB
        cap) until its next call: 14 such threads held 56 MB after the soak's clients had left
        (issue 10). ``clear`` frees the buffer and allocates nothing."""
        self.out.clear()
        self.err.clear()

    def cancel(self) -> None:
        """End the running call's waits now (and any it starts later). Thread-safe."""
        self._cancelled = True
        event = self._event
        if event is not None:
            event.set()

    @property
    def cancelled(self) -> bool:
        """True once :meth:`cancel` was called during this call."""
        return self._cancelled

    def wait_until(self, target_ns: int) -> bool:
        """Sleep until host monotonic time ``target_ns``; False if cancelled first.

        Never returns early (the timed wait is repeated until the monotonic clock reaches
        the target), so a guest's own clock never shows a sleep shorter than it asked for.
        """
        if self._event is None:
            self._event = threading.Event()
        # cancel() sets _cancelled before reading _event: checked after _event exists, one
        # of the two sides sees the other.
        event = self._event
        began = time.monotonic_ns()
        try:
            while not self._cancelled:
                left = target_ns - time.monotonic_ns()
                if left <= 0:
                    return True
                # Releases the GIL. A sleep of centuries is waited for in TIMEOUT_MAX pieces.
                event.wait(min(left / 1e9, threading.TIMEOUT_MAX))
            return False
        finally:
            # What the call spent asleep: it would hold a thread (or the loop) that long.
            self.waited_ns += time.monotonic_ns() - began


class _Current(threading.local):
    def __init__(self) -> None:
        self.call = CallDeadline()


_current: Final = _Current()


def thread_deadline() -> CallDeadline:
    """The :class:`CallDeadline` of the guest calls run on this thread."""
    return _current.call


# -- host functions ------------------------------------------------------------------------


class _GuestFault(Exception):
    """A pointer argument outside the guest's memory or misaligned: the host call traps."""


def _trap(message: str) -> int:
    msg = message.encode()
    return ctypes.cast(_b._wasmtime_trap_new(msg, len(msg)), ctypes.c_void_p).value or 0


def _interrupt() -> int:
    # The trap an epoch deadline raises: the runner maps it to a TIMEOUT whichever stopped
    # the guest.
    return ctypes.cast(_b._wasmtime_trap_new_code(_TRAP_INTERRUPT), ctypes.c_void_p).value or 0


def _memory(caller: ctypes._Pointer[_ffi.wasmtime_caller_t]) -> memoryview:
    """The caller's exported memory as a writable view (no copy). Valid only during this
    host call: nothing can grow the memory meanwhile."""
    ext = _ffi.wasmtime_extern_t()
    if (
        not _b._wasmtime_caller_export_get(caller, _MEMORY_NAME, 6, ctypes.byref(ext))
        or ext.kind != _EXTERN_MEMORY
    ):
        raise _GuestFault("missing required memory export")
    ctx = _b._wasmtime_caller_context(caller)
    size = _b._wasmtime_memory_data_size(ctx, ctypes.byref(ext.of.memory))
    base = ctypes.cast(_b._wasmtime_memory_data(ctx, ctypes.byref(ext.of.memory)), ctypes.c_void_p)
    if not size or base.value is None:
        return memoryview(b"")
    return memoryview((ctypes.c_char * size).from_address(base.value)).cast("B")


def _check(mem: memoryview, ptr: int, size: int) -> None:
    if ptr + size > len(mem):
        raise _GuestFault("pointer out of bounds")


def poll_oneoff(
    call: CallDeadline, mem: memoryview, subs: int, events: int, n: int, nevents_ptr: int
) -> int | None:
    """WASI ``poll_oneoff`` against ``mem``: the errno, or None when ``call``'s deadline (or
    cancellation) ended the wait. Raises :class:`_GuestFault` for a bad pointer."""
    if n == 0:
        return ERRNO_INVAL  # an indefinite sleep is not supported in preview1
    # Misaligned pointers fault as wiggle's checks make them (witx: "the function shall trap").
    if subs % 8 or events % 8 or nevents_ptr % 4:
        raise _GuestFault("pointer not aligned")
    _check(mem, subs, SUBSCRIPTION_SIZE * n)
    now = time.monotonic_ns()
    # Each subscription as (userdata, event type, host monotonic time it is ready at).
    parsed: list[tuple[int, int, int]] = []
    for i in range(n):
        if i and i % _DEADLINE_CHECK_EVERY == 0 and _past(call):
            return None
        off = subs + SUBSCRIPTION_SIZE * i
        userdata, tag = _SUB_HEAD.unpack_from(mem, off)
        if tag == EVENTTYPE_CLOCK:
            clock, timeout, _precision, flags = _SUB_CLOCK.unpack_from(mem, off + 16)
            # Unknown flag bits, unknown clocks and the CPU-time clocks: as wasmtime.
            if flags & ~SUBSCRIPTION_CLOCK_ABSTIME or clock not in (
                CLOCK_REALTIME,
                CLOCK_MONOTONIC,
            ):
                return ERRNO_INVAL
            if not flags & SUBSCRIPTION_CLOCK_ABSTIME:
                at = now + timeout
            elif clock == CLOCK_MONOTONIC:
                at = call.origin_ns + timeout
            else:
                at = now + (timeout - time.time_ns())
            parsed.append((userdata, EVENTTYPE_CLOCK, at))
        elif tag in (EVENTTYPE_FD_READ, EVENTTYPE_FD_WRITE):
            (fd,) = _SUB_FD.unpack_from(mem, off + 16)
            # stdin is the only readable descriptor, stdout and stderr the only writable
            # ones: a command gets no preopens.
            readable = tag == EVENTTYPE_FD_READ and fd == 0
            writable = tag == EVENTTYPE_FD_WRITE and fd in (1, 2)
            if not (readable or writable):
                return ERRNO_BADF
            parsed.append((userdata, tag, now))  # always ready
        else:
            return ERRNO_INVAL
    first = min(at for _, _, at in parsed)
    if first > now:
        deadline = call.deadline_ns
        if deadline is not None and first > deadline:
            call.wait_until(deadline)
            call.timed_out = not call.cancelled
            return None
        if not call.wait_until(first):
            return None
        now = time.monotonic_ns()
    ready = [(u, t) for u, t, at in parsed if at <= now]
    _check(mem, events, EVENT_SIZE * len(ready))
    _check(mem, nevents_ptr, 4)
    for i, (userdata, etype) in enumerate(ready):
        nbytes = 0 if etype == EVENTTYPE_CLOCK else 1
        _EVENT.pack_into(mem, events + EVENT_SIZE * i, userdata, ERRNO_SUCCESS, etype, nbytes, 0)
    _U32.pack_into(mem, nevents_ptr, len(ready))
    return ERRNO_SUCCESS


def fd_write(
    call: CallDeadline, mem: memoryview, fd: int, iovs: int, n: int, nwritten_ptr: int
) -> int | None:
    """WASI ``fd_write`` on stdout/stderr into ``call``'s bounded buffers: the errno, or None
    when the write takes the guest past its output cap (the guest is stopped; what fitted is
    kept) or runs past the call's deadline (INTERRUPT, a timeout). Raises
    :class:`_GuestFault` for a bad pointer.

    Writing past the cap stops the guest rather than failing the write: a guest that ignores
    write errors would otherwise spin until its deadline. stdout and stderr each count against
    the cap; stderr is kept up to ``err_keep`` bytes (it is diagnostics)."""
    if fd not in (1, 2):
        # A command has no other writable descriptors (no preopens); stdin is not writable.
        return ERRNO_BADF
    if iovs % 4 or nwritten_ptr % 4:
        raise _GuestFault("pointer not aligned")
    _check(mem, iovs, _IOVEC.size * n)
    sink, keep = (call.out, call.out_cap) if fd == 1 else (call.err, call.err_keep)
    total = 0
    for i in range(n):
        # Millions of (empty) iovecs cost Python time that no epoch deadline can interrupt:
        # the call's deadline is checked as poll_oneoff checks it.
        if i and i % _DEADLINE_CHECK_EVERY == 0 and _past(call):
            return None
        ptr, length = _IOVEC.unpack_from(mem, iovs + _IOVEC.size * i)
        _check(mem, ptr, length)
        room = keep - len(sink)
        if room > 0 and length:
            sink += mem[ptr : ptr + min(length, room)]
        total += length
    if fd == 1:
        call.out_total += total
        over = call.out_total > call.out_cap
    else:
        call.err_total += total
        over = call.err_total > call.out_cap
    if over:
        call.flooded = True
        return None
    _check(mem, nwritten_ptr, 4)
    _U32.pack_into(mem, nwritten_ptr, total)
    return ERRNO_SUCCESS


def _past(call: CallDeadline) -> bool:
    if call.cancelled:
        return True
    deadline = call.deadline_ns
    if deadline is not None and time.monotonic_ns() >= deadline:
        call.timed_out = True
        return True
    return False


def _four_i32_call(
    name: str,
    impl: Any,
    caller: ctypes._Pointer[_ffi.wasmtime_caller_t],
    args: ctypes._Pointer[_ffi.wasmtime_val_raw_t],
) -> int:
    """Run ``impl(call, memory, a, b, c, d)`` for a host call taking four i32 and returning
    an errno (None: stop the guest with INTERRUPT). Never lets an exception out: ctypes
    would print it and return 0 (success) to wasmtime."""
    try:
        # i32 arguments are pointers/sizes: unsigned.
        a, b, c, d = (args[i].i32 & 0xFFFFFFFF for i in range(4))
        errno = impl(_current.call, _memory(caller), a, b, c, d)
        if errno is None:
            return _interrupt()
        args[0].i32 = errno
        return 0
    except _GuestFault as exc:
        return _trap(f"{name}: {exc}")
    except BaseException as exc:  # a bug here must not pass for a successful call
        return _trap(f"{name}: host error: {exc!r}")


@_ffi.wasmtime_func_unchecked_callback_t
def _poll_oneoff_cb(
    env: int | None,
    caller: ctypes._Pointer[_ffi.wasmtime_caller_t],
    args: ctypes._Pointer[_ffi.wasmtime_val_raw_t],
    nargs: int,
) -> int:
    return _four_i32_call("poll_oneoff", poll_oneoff, caller, args)


@_ffi.wasmtime_func_unchecked_callback_t
def _fd_write_cb(
    env: int | None,
    caller: ctypes._Pointer[_ffi.wasmtime_caller_t],
    args: ctypes._Pointer[_ffi.wasmtime_val_raw_t],
    nargs: int,
) -> int:
    return _four_i32_call("fd_write", fd_write, caller, args)


@_ffi.wasmtime_func_unchecked_callback_t
def _sched_yield_cb(
    env: int | None,
    caller: ctypes._Pointer[_ffi.wasmtime_caller_t],
    args: ctypes._Pointer[_ffi.wasmtime_val_raw_t],
    nargs: int,
) -> int:
    try:
        # Lets other threads of this process run (a guest spinning on sched_yield waits
        # for them); its CPU time is bounded by the epoch deadline like any loop.
        time.sleep(0)
        args[0].i32 = ERRNO_SUCCESS
        return 0
    except BaseException as exc:
        return _trap(f"sched_yield: host error: {exc!r}")


def _define(
    linker: wasmtime.Linker, name: str, ty: wasmtime.FuncType, cb: Any
) -> None:
    module = b"wasi_snapshot_preview1"
    raw = name.encode()
    err = _b._wasmtime_linker_define_func_unchecked(
        linker.ptr(), module, len(module), raw, len(raw), ty.ptr(), cb, None, _NO_FINALIZER
    )
    if err:
        raise wasmtime.WasmtimeError._from_ptr(err)


def install_waits(linker: wasmtime.Linker) -> None:
    """Replace wasmtime's ``poll_oneoff`` and ``sched_yield`` on ``linker`` (which must
    already hold WASI, from ``define_wasi``). Shadowing is on only for these."""
    i32 = wasmtime.ValType.i32()
    linker.allow_shadowing = True
    try:
        _define(linker, "poll_oneoff", wasmtime.FuncType([i32] * 4, [i32]), _poll_oneoff_cb)
        _define(linker, "sched_yield", wasmtime.FuncType([], [i32]), _sched_yield_cb)
    finally:
        linker.allow_shadowing = False


def install_output(linker: wasmtime.Linker) -> None:
    """Replace wasmtime's ``fd_write`` on ``linker``: output goes into the running call's
    bounded buffers (in the serving process no per-process file size limit can cap it)."""
    i32 = wasmtime.ValType.i32()
    linker.allow_shadowing = True
    try:
        _define(linker, "fd_write", wasmtime.FuncType([i32] * 4, [i32]), _fd_write_cb)
    finally:
        linker.allow_shadowing = False
