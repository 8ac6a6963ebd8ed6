"""Fronts that call the services: the TCP front today, an HTTP front later (DESIGN.md)."""

from __future__ import annotations

from ._tcp import DISPATCHED_OPS, TcpFront, big_blocks_from_mmap

__all__ = ["DISPATCHED_OPS", "TcpFront", "big_blocks_from_mmap"]
