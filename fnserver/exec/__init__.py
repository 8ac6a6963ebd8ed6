"""Run invocations in a pool of worker processes, never in the server process.

Workers (``python -m fnserver.exec._worker``) run wasm with wasmtime (epoch deadlines, Store
memory limits, capped output, a warm cache of precompiled modules) and native binaries under
OS limits; the parent owns the wall-clock deadline and kills and replaces overrunning workers.
"""

from __future__ import annotations

from ._engine import precompiled_name
from ._pool import ExecPool
from ._types import InvokeJob, InvokeResult, Limits

__all__ = ["ExecPool", "InvokeJob", "InvokeResult", "Limits", "precompiled_name"]
