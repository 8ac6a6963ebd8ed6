"""The versioned function store: names, integer versions, aliases, staging and recovery.

Each committed version is an immutable directory ``<data>/<name>/<version>/``; resolving a
name to a version is an in-memory lookup. See :class:`Registry`.
"""

from __future__ import annotations

from ._registry import Registry, VersionRecord

__all__ = ["Registry", "VersionRecord"]
