"""Public value types of the exec pool: limits and jobs (results are the protocol's record)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final

from ..protocol import ArtifactKind

__all__ = ["InvokeJob", "Limits"]


@dataclass(frozen=True)
class Limits:
    """Per-invocation limits; the service clamps them to its maxima before they get here."""

    timeout_ms: int = 5000
    memory_mb: int = 128
    output_bytes: int = 6 * 1024 * 1024
    #: wasm only: an instruction budget (wasmtime fuel units, about one per wasm operator).
    #: A call with a budget runs on the worker's second engine, built with ``consume_fuel``
    #: (its own compiled file, compiled on the first such call); running out raises
    #: FunctionTimeoutError with ``details["fuel"]``. None: no budget, the fast engine.
    fuel: int | None = None


@dataclass(frozen=True)
class InvokeJob:
    """One call of one function version."""

    function: str  # argv[0], and the key for per-function concurrency
    version: int
    mode: ArtifactKind
    #: The readable file to run: the version's main.wasm or main.bin.
    artifact: Path
    #: sha256 hex of the artifact's bytes as recorded at register (wasm: the module cache key;
    #: empty for versions registered before digests were recorded: then it is computed).
    digest: str
    input: bytes
    args: tuple[str, ...]
    limits: Limits
    #: The caller's tenant: calls waiting for a slot take turns by tenant first (fairness).
    tenant: str = ""
    #: The version's environment variables, as (name, value) pairs.
    env: tuple[tuple[str, str], ...] = ()
    #: The invocation's id, set on its result (PROTOCOL.md §5.8 ``id``).
    call_id: str = ""


#: RLIMIT_DATA of a compile process (``_compile.py``): what the compiler may really allocate
#: (a Go module needs a few hundred MiB). Here, not there: importing ``_compile`` from the
#: package would make ``python -m fnserver.exec._compile`` warn that it ran twice.
COMPILE_DATA: Final = 4 << 30
