"""Typed results of client calls: the protocol's own records (docs/PROTOCOL.md §5.8)."""

from __future__ import annotations

from .protocol import InvokeResult

__all__ = ["InvokeResult"]
