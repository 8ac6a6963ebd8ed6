"""Every wasmtime engine setting in one place, so the precompiled-file key covers all of them.

Imports no wasmtime at module level: the server process only needs :func:`precompiled_name`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from functools import cache
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    import wasmtime

__all__ = ["EPOCH_TICK_S", "engine_settings", "make_engine", "precompiled_name"]

#: The ticker thread advances the epoch this often; deadlines are rounded up to it.
EPOCH_TICK_S: Final = 0.010


@cache
def engine_settings() -> dict[str, Any]:
    """The engine configuration; any change here changes :func:`precompiled_name`."""
    return {
        # Epoch interruption stops CPU loops (trap INTERRUPT) at a few ns per loop back-edge;
        # it cannot stop a guest asleep in poll_oneoff, so the parent also kills on wall time.
        "epoch_interruption": True,
        # The default ~4 GiB virtual reservation per linear memory fails under RLIMIT_AS
        # ("mmap failed to reserve" at 1 GiB, MEASURED.md); 256 MiB works and covers the
        # default 128 MiB limit without moving. Bigger memories are still allowed: they move.
        "memory_reservation": 256 * 1024 * 1024,
        "memory_guard_size": 32 * 1024 * 1024,
        "memory_reservation_for_growth": 16 * 1024 * 1024,
        # Go's own wasip1 runner uses an 8 MiB wasm stack; less overflows Go's runtime.
        # wasmtime 50 refuses (panics!) a max_wasm_stack above async_stack_size (2 MiB default),
        # so that is raised too. The worker runs guests on a thread with a 32 MiB host stack.
        "max_wasm_stack": 8 * 1024 * 1024,
        "async_stack_size": 9 * 1024 * 1024,
        # Go modules compile in ~0.5 s in parallel; the worker is otherwise single-threaded.
        "parallel_compilation": True,
        "cranelift_opt_level": "speed",
        # Fuel is deliberately off: consume_fuel costs on every call and is keyed here.
        "consume_fuel": False,
    }


@cache
def precompiled_name() -> str:
    """File name of the precompiled module, e.g. ``main.0123456789abcdef.cwasm``.

    The key hashes the wasmtime version and every engine setting: a serialized module only
    loads into an engine of the same version and settings.
    """
    material = json.dumps(
        {"wasmtime": importlib.metadata.version("wasmtime"), "engine": engine_settings()},
        sort_keys=True,
    )
    return f"main.{hashlib.sha256(material.encode()).hexdigest()[:16]}.cwasm"


def make_engine() -> wasmtime.Engine:
    """Build the engine from :func:`engine_settings` (worker side)."""
    import wasmtime
    from wasmtime import _ffi

    config = wasmtime.Config()
    for key, value in engine_settings().items():
        if key == "async_stack_size":  # no Python property in wasmtime-py 50
            _ffi.wasmtime_config_async_stack_size_set(config.ptr(), value)
        else:
            setattr(config, key, value)
    return wasmtime.Engine(config)
