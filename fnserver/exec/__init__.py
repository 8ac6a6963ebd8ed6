"""Run invocations: wasm in the serving process, native binaries in worker processes.

The service sees one narrow surface: :class:`ExecPool` (``start``, ``close``, ``precompile``,
``invoke``, ``stats``), :class:`InvokeJob` and :class:`Limits` in, the protocol's
:class:`InvokeResult` out. wasm guests run in this process (``_inproc.py``), each in a fresh
Store: epoch deadlines stop loops, fnserver's own waiting WASI calls end at the deadline,
output goes into capped buffers, memory is bounded per Store; modules come from the node's
compiled-module cache, compiled by a separate bounded process
(``python -m fnserver.exec._compile``). Native binaries run under OS limits, spawned by
worker processes (``python -m fnserver.exec._worker``) under their own uids; the parent owns
the wall-clock deadline and kills and replaces overrunning workers.
"""

from __future__ import annotations

from ..protocol import InvokeResult
from ._pool import ExecPool
from ._types import InvokeJob, Limits

__all__ = ["ExecPool", "InvokeJob", "InvokeResult", "Limits"]
