"""Public value types of the exec pool: limits, jobs and results."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["InvokeJob", "InvokeResult", "Limits"]


@dataclass(frozen=True)
class Limits:
    """Per-invocation limits; the server clamps them to its maxima before they get here."""

    timeout_ms: int = 5000
    memory_mb: int = 128
    output_bytes: int = 6 * 1024 * 1024
    #: wasm only: an instruction budget (wasmtime fuel units, about one per wasm operator).
    #: A call with a budget runs on the worker's second engine, built with ``consume_fuel``
    #: (its own precompiled file, compiled on the first such call); running out raises
    #: FunctionTimeoutError with ``details["fuel"]``. None: no budget, the fast engine.
    fuel: int | None = None


@dataclass(frozen=True)
class InvokeJob:
    """One call of one function version."""

    function: str  # argv[0], and the key for per-function concurrency
    version: int
    mode: str  # "wasm" | "native"
    version_dir: Path  # holds main.wasm, main.<key>.cwasm, main.bin
    input: bytes
    args: tuple[str, ...]
    limits: Limits


@dataclass(frozen=True)
class InvokeResult:
    """What a finished call produced; guest failures are exceptions, not results."""

    output: bytes
    stderr: bytes
    exit_code: int
    truncated: bool
    duration_us: int  # guest run time
    queue_us: int  # time waiting for a worker
    wall_us: int  # total, parent side
    memory_peak: int  # bytes of linear memory at the end (wasm) / max RSS (native)
    mode: str
