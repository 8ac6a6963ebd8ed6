"""Run invocations in a pool of worker processes, never in the server process.

The service sees one narrow surface: :class:`ExecPool` (``start``, ``close``, ``precompile``,
``invoke``, ``stats``), :class:`InvokeJob` and :class:`Limits` in, the protocol's
:class:`InvokeResult` out. Workers (``python -m fnserver.exec._worker``) run wasm with
wasmtime (epoch deadlines, Store memory limits, capped output, modules loaded from the node's
compiled-module cache) and native binaries under OS limits; the parent owns the wall-clock
deadline and kills and replaces overrunning workers. Modules are compiled by a separate
bounded process (``python -m fnserver.exec._compile``) and stored by the pool.
"""

from __future__ import annotations

from ..protocol import InvokeResult
from ._pool import ExecPool
from ._types import InvokeJob, Limits

__all__ = ["ExecPool", "InvokeJob", "InvokeResult", "Limits"]
