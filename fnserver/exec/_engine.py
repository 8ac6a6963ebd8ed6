"""Every wasmtime engine setting in one place, so the compiled-module key covers all of them.

Imports no wasmtime at module level: the pool (server process) only needs :func:`engine_key`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from functools import cache
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    import wasmtime

__all__ = ["EPOCH_TICK_S", "engine_key", "engine_settings", "make_engine"]

#: The ticker thread advances the epoch this often; deadlines are rounded up to it.
EPOCH_TICK_S: Final = 0.010

GiB: Final = 1 << 30
MiB: Final = 1 << 20


@cache
def engine_settings(fuel: bool = False) -> dict[str, Any]:
    """The engine configuration; any change here changes :func:`engine_key`.

    Two engines exist. The main one (``fuel=False``) runs every call that sets no fuel budget
    and is tuned for per-call cost. Measured on this 2-vCPU machine (bench/README.md), one
    fresh-sandbox call in the worker with a 100-byte stdin, tiny C echo / Go echo:

    ==========================================================  ===========  ===========
    setup                                                       C            Go
    ==========================================================  ===========  ===========
    before: default allocator, 256 MiB reservation, Python      142 us       907 us
    wrappers (Store, WasiConfig, Instance.exports, Func call)
    C API calls, default allocator                              ~75 us       ~760 us
    C API calls, pooling, no keep-resident                      ~53 us       ~730 us
    C API calls, pooling + 4 MiB linear_memory_keep_resident    ~63 us       ~340 us
    ==========================================================  ===========  ===========

    (medians under a load average of 5-7 from parallel test runs; quiet-machine figures are
    about half, MEASURED.md.) Go's runtime touches ~3 MiB of fresh memory per call: without
    keep-resident every call pays ~200 page faults when the slot is decommitted and
    re-faulted (call 580 us -> 197 us with it). Keep-resident instead memsets what was used
    when the Store goes. C modules are built with a 1 MiB stack (17 pages), so the memset is
    small.

    The pooling allocator reserves its slots once at engine creation: one per call that may
    run at once in the serving process (``WasmRunner``'s slots). Each slot is the whole
    32-bit space (4 GiB reservation = max memory), so every Store memory limit up to 4 GiB
    works and the memory never moves; growth past the Store limit still returns -1. That is
    address space, not memory: 64 slots reserve ~300 GiB of it, and the serving process has
    no RLIMIT_AS. A 4 GiB reservation also lets cranelift drop most bounds checks (static
    memory with a guard). The slot counts are not engine settings that change compiled code,
    so they are not part of the engine key (a module compiled on demand loads into a pool).

    The fuel engine (``fuel=True``) adds ``consume_fuel``, which instruments every loop and
    call (so it is never used for calls without a budget) and keeps the on-demand allocator
    with a 256 MiB reservation. Each engine has its own compiled file in the module cache.
    """
    settings: dict[str, Any] = {
        # Epoch interruption stops CPU loops (trap INTERRUPT) at a few ns per loop back-edge.
        # It cannot stop a guest asleep in a host call: the waiting WASI calls are fnserver's
        # own (_wasi.py) and end at the same deadline with the same trap.
        "epoch_interruption": True,
        "memory_reservation": 4 * GiB,
        "memory_guard_size": 32 * MiB,
        "memory_reservation_for_growth": 0,
        # Go's own wasip1 runner uses an 8 MiB wasm stack; less overflows Go's runtime.
        # wasmtime 50 refuses (panics!) a max_wasm_stack above async_stack_size (2 MiB default),
        # so that is raised too. The worker runs guests on a thread with a 32 MiB host stack.
        "max_wasm_stack": 8 * MiB,
        "async_stack_size": 9 * MiB,
        # Go modules compile in ~0.5 s in parallel; the worker is otherwise single-threaded.
        "parallel_compilation": True,
        "cranelift_opt_level": "speed",
        "consume_fuel": False,
        # Slot counts (total_memories, total_tables, total_core_instances) are given to
        # make_engine: they do not change compiled code, so a module compiled by an engine
        # without the pool loads into one with it.
        "pooling": {
            "total_stacks": 0,
            "total_component_instances": 0,
            "total_gc_heaps": 0,
            "max_memory_size": 4 * GiB,
            # At most warm_slots() unused slots keep it (make_engine).
            "linear_memory_keep_resident": 4 * MiB,
            "table_keep_resident": 64 * 1024,
            # Go's function table grows with the program (a few thousand entries for hello).
            "table_elements": 1 << 18,
            "max_core_instance_size": 8 * MiB,
        },
    }
    if fuel:
        settings.update(
            {
                # The default ~4 GiB virtual reservation per linear memory fails under
                # RLIMIT_AS next to the main engine's pool; 256 MiB covers the default
                # 128 MiB limit without moving. Bigger memories are still allowed: they move.
                "memory_reservation": 256 * MiB,
                "memory_reservation_for_growth": 16 * MiB,
                "consume_fuel": True,
                "pooling": None,
            }
        )
    return settings


@cache
def engine_key(fuel: bool = False) -> str:
    """16 hex digits naming one engine's settings, e.g. ``0123456789abcdef``.

    It hashes the wasmtime version and every engine setting: a serialized module only loads
    into an engine of the same version and settings, so the module cache keys files by it.
    """
    material = json.dumps(
        {"wasmtime": importlib.metadata.version("wasmtime"), "engine": engine_settings(fuel)},
        sort_keys=True,
    )
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def warm_slots(slots: int) -> int:
    """Unused slots the pool keeps warm (with their kept-resident memory), out of ``slots``.

    A slot freed by a call keeps up to ``linear_memory_keep_resident`` (4 MiB) resident, so
    the next call of the same module finds its pages mapped. wasmtime keeps up to 100 such
    slots by default, each tied to the module that last ran in it: after a crowd of distinct
    modules (or one burst of a hot one) the serving process held 4 MiB per slot for good
    (measured: 40 distinct modules that touch 3 MiB each left +168 MB resident; with 4 warm
    slots +17 MB, with none +5 MB). A sixteenth of the slots (4 of the default 64) keeps the
    hot modules warm and bounds what stays resident to about 16 MiB.
    """
    return max(2, slots // 16)


def make_engine(fuel: bool = False, *, slots: int = 0) -> wasmtime.Engine:
    """Build the engine from :func:`engine_settings`: with the pooling allocator holding
    ``slots`` instances at once when ``slots`` > 0 (calls), on demand otherwise (compiles)."""
    import wasmtime
    from wasmtime import _ffi

    config = wasmtime.Config()
    for key, value in engine_settings(fuel).items():
        if key == "async_stack_size":  # no Python property in wasmtime-py 50
            _ffi.wasmtime_config_async_stack_size_set(config.ptr(), value)
        elif key == "pooling":
            if value is not None and slots > 0:
                totals = ("total_memories", "total_tables", "total_core_instances")
                warm = {"max_unused_warm_slots": warm_slots(slots)}
                _set_pooling(config, {**value, **dict.fromkeys(totals, slots), **warm})
        else:
            setattr(config, key, value)
    return wasmtime.Engine(config)


def _set_pooling(config: wasmtime.Config, limits: dict[str, int]) -> None:
    """Pooling allocator (no Python property; the bound C functions work, MEASURED.md)."""
    from wasmtime import _ffi

    pool = _ffi.wasmtime_pooling_allocation_config_new()
    try:
        for key, value in limits.items():
            getattr(_ffi, f"wasmtime_pooling_allocation_config_{key}_set")(pool, value)
        _ffi.wasmtime_pooling_allocation_strategy_set(config.ptr(), pool)
    finally:
        _ffi.wasmtime_pooling_allocation_config_delete(pool)
