"""One guest run through wasmtime's C API directly.

wasmtime-py's wrappers cost more than the sandbox itself on a tiny call: ``Store``,
``WasiConfig`` properties, ``Instance.exports`` (a dict of every export) and ``Func.__call__``
(type checks, ``Val`` conversions) add ~60 us to a ~20 us call. Here each step is one ctypes
call into the same C functions those wrappers use; errors and traps are handed back to the
wrappers (``WasmtimeError``/``Trap``) only on the rare failure path, so messages and trap codes
come out exactly as before. Pinned to wasmtime-py 50 (pyproject.toml), whose ``_bindings``
module holds the raw ctypes functions.
"""

from __future__ import annotations

import ctypes
from collections import OrderedDict
from dataclasses import dataclass
from typing import Final, TypeAlias

import wasmtime
from wasmtime import _bindings as _b
from wasmtime import _ffi

from ._wasi import thread_deadline

__all__ = ["GuestRun", "run_guest"]

_NO_FINALIZER: Final = ctypes.CFUNCTYPE(None, ctypes.c_void_p)()
_EXTERN_FUNC: Final = _ffi.WASMTIME_EXTERN_FUNC.value
_EXTERN_MEMORY: Final = _ffi.WASMTIME_EXTERN_MEMORY.value
_CHAR_P: TypeAlias = ctypes.POINTER(ctypes.c_char)  # type: ignore[valid-type]
#: argv arrays are rebuilt only for new argument lists; most calls repeat ``[name]``.
_ARGV_CACHE_MAX: Final = 256
_argv_cache: OrderedDict[tuple[str, ...], tuple[int, ctypes.Array[_CHAR_P], list[bytes]]] = (
    OrderedDict()
)


@dataclass
class GuestRun:
    """What one run left behind. ``store`` is still alive: the caller reads what it needs,
    then calls :meth:`close` (giving the pooled memory back memsets what the guest used)."""

    store: ctypes._Pointer[_ffi.wasmtime_store_t] | None
    instantiated: bool
    exit_code: int
    failure: BaseException | None  # wasmtime.Trap or wasmtime.WasmtimeError
    memory: int  # bytes of the exported memory at the end
    fuel_left: int | None

    def close(self) -> None:
        """Delete the Store (idempotent): frees its instance, memory slot and WASI files."""
        store, self.store = self.store, None
        if store is not None:
            _b._wasmtime_store_delete(store)


#: Environments are rebuilt only for new ones: every call of a version repeats its own.
_env_cache: OrderedDict[
    tuple[tuple[str, str], ...],
    tuple[int, ctypes.Array[_CHAR_P], ctypes.Array[_CHAR_P], list[tuple[bytes, bytes]]],
] = OrderedDict()


def _argv(args: tuple[str, ...]) -> tuple[int, ctypes.Array[_CHAR_P]]:
    hit = _argv_cache.get(args)
    if hit is None:
        keep = [a.encode() for a in args]
        arr = (_CHAR_P * len(keep))(*(ctypes.cast(ctypes.c_char_p(k), _CHAR_P) for k in keep))
        hit = (len(keep), arr, keep)
        _argv_cache[args] = hit
        if len(_argv_cache) > _ARGV_CACHE_MAX:
            _argv_cache.popitem(last=False)
    return hit[0], hit[1]


def _env(env: tuple[tuple[str, str], ...]) -> tuple[int, ctypes.Array[_CHAR_P], ctypes.Array[_CHAR_P]]:
    hit = _env_cache.get(env)
    if hit is None:
        keep = [(k.encode(), v.encode()) for k, v in env]
        names = (_CHAR_P * len(keep))(*(ctypes.cast(ctypes.c_char_p(k), _CHAR_P) for k, _ in keep))
        values = (_CHAR_P * len(keep))(*(ctypes.cast(ctypes.c_char_p(v), _CHAR_P) for _, v in keep))
        hit = (len(keep), names, values, keep)
        _env_cache[env] = hit
        if len(_env_cache) > _ARGV_CACHE_MAX:
            _env_cache.popitem(last=False)
    return hit[0], hit[1], hit[2]


def _wasi(args: tuple[str, ...], data: bytes, env: tuple[tuple[str, str], ...] = ()) -> ctypes._Pointer:
    wasi = _b._wasi_config_new()
    argc, argv = _argv(args)
    _b._wasi_config_set_argv(wasi, argc, argv)
    if env:  # the version's environment (§5.2 options.env), copied by wasmtime
        envc, names, values = _env(env)
        _b._wasi_config_set_env(wasi, envc, names, values)
    vec = _ffi.wasm_byte_vec_t()
    _b._wasm_byte_vec_new_uninitialized(ctypes.byref(vec), len(data))
    if data:
        ctypes.memmove(vec.data, data, len(data))
    # Takes ownership of the vector (MEASURED.md): no temp file for stdin. No output files:
    # output goes through fnserver's own fd_write into the call's buffers.
    _b._wasi_config_set_stdin_bytes(wasi, ctypes.byref(vec))
    return wasi


def run_guest(
    engine: wasmtime.Engine,
    pre: wasmtime.InstancePre,
    *,
    args: tuple[str, ...],
    stdin: bytes,
    memory_limit: int,
    deadline_ticks: int,
    fuel: int | None,
    timeout_ns: int | None = None,
    out_cap: int = 0,
    err_keep: int = 0,
    env: tuple[tuple[str, str], ...] = (),
) -> GuestRun:
    """Instantiate ``pre`` in a fresh Store and run ``_start``; never raises for guest faults.

    ``timeout_ns`` is the deadline of fnserver's own waiting WASI calls (``_wasi.py``), for
    a linker that has them, counted from the guest's start (None: they wait as long as the
    guest asks). CPU loops are stopped by ``deadline_ticks`` of the engine's epoch. Output is
    captured by fnserver's own ``fd_write`` (``_wasi.install_output``) up to ``out_cap`` /
    ``err_keep`` bytes, in this thread's :class:`~._wasi.CallDeadline`.
    """
    store = _b._wasmtime_store_new(engine.ptr(), None, _NO_FINALIZER)
    run = GuestRun(store, False, 0, None, 0, None)
    try:
        ctx = _b._wasmtime_store_context(store)
        _b._wasmtime_store_limiter(store, memory_limit, -1, -1, -1, -1)
        err = _b._wasmtime_context_set_wasi(ctx, _wasi(args, stdin, env))
        if err:
            raise wasmtime.WasmtimeError._from_ptr(err)
        # Right after the WASI context (so the guest's monotonic clock) exists: the waiting
        # calls read absolute monotonic times against this instant.
        thread_deadline().start(timeout_ns, out_cap, err_keep)
        _b._wasmtime_context_set_epoch_deadline(ctx, deadline_ticks)
        if fuel is not None:
            err = _b._wasmtime_context_set_fuel(ctx, fuel)
            if err:
                raise wasmtime.WasmtimeError._from_ptr(err)
        instance = _ffi.wasmtime_instance_t()
        trap = ctypes.POINTER(_ffi.wasm_trap_t)()
        err = _b._wasmtime_instance_pre_instantiate(
            pre.ptr(), ctx, ctypes.byref(instance), ctypes.byref(trap)
        )
        if err or trap:
            _fail(run, err, trap)
            return run
        run.instantiated = True
        ext = _ffi.wasmtime_extern_t()
        if (
            not _b._wasmtime_instance_export_get(
                ctx, ctypes.byref(instance), b"_start", 6, ctypes.byref(ext)
            )
            or ext.kind != _EXTERN_FUNC
        ):
            run.failure = wasmtime.WasmtimeError("not a WASI command: no exported _start function")
            return run
        err = _b._wasmtime_func_call(
            ctx, ctypes.byref(ext.of.func), None, 0, None, 0, ctypes.byref(trap)
        )
        if err or trap:
            _fail(run, err, trap)
        if _b._wasmtime_instance_export_get(
            ctx, ctypes.byref(instance), b"memory", 6, ctypes.byref(ext)
        ) and ext.kind == _EXTERN_MEMORY:
            run.memory = _b._wasmtime_memory_data_size(ctx, ctypes.byref(ext.of.memory))
        if fuel is not None:
            left = ctypes.c_uint64()
            err = _b._wasmtime_context_get_fuel(ctx, ctypes.byref(left))
            if err:
                _b._wasmtime_error_delete(err)
            else:
                run.fuel_left = left.value
        return run
    except BaseException:
        run.close()
        raise


def _fail(
    run: GuestRun,
    err: ctypes._Pointer[_ffi.wasmtime_error_t] | None,
    trap: ctypes._Pointer[_ffi.wasm_trap_t],
) -> None:
    if err:
        status = ctypes.c_int()
        if _b._wasmtime_error_exit_status(err, ctypes.byref(status)):
            # proc_exit: every Go guest ends here, so no wrapper object on this path.
            _b._wasmtime_error_delete(err)
            run.exit_code = status.value
            return
        run.failure = wasmtime.WasmtimeError._from_ptr(err)
    elif trap:
        run.failure = wasmtime.Trap._from_ptr(trap)
