"""Async calls, invocation records and per-version tallies: the interface, its embedded SQLite
backend and its PostgreSQL backend for several nodes (docs/ARCHITECTURE.md, "Calls after the
fact")."""

from __future__ import annotations

from ._postgres import PostgresInvocationStore
from ._sqlite import SqliteInvocationStore
from ._store import InvocationStore, NewCall, StoredCall, Tally, percentile

__all__ = [
    "InvocationStore",
    "NewCall",
    "PostgresInvocationStore",
    "SqliteInvocationStore",
    "StoredCall",
    "Tally",
    "percentile",
]
