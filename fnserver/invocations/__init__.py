"""Async calls, invocation records and per-version tallies: the interface and its embedded
SQLite backend (docs/ARCHITECTURE.md, "Calls after the fact")."""

from __future__ import annotations

from ._sqlite import SqliteInvocationStore
from ._store import InvocationStore, NewCall, StoredCall, Tally, percentile

__all__ = ["InvocationStore", "NewCall", "SqliteInvocationStore", "StoredCall", "Tally", "percentile"]
