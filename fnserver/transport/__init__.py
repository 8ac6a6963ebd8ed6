"""Fronts that call the services: the TCP front here, the HTTP gateway in fnserver.gateway."""

from __future__ import annotations

from ._tcp import DISPATCHED_OPS, TcpFront, access_line, big_blocks_from_mmap, os_error_reply

__all__ = ["DISPATCHED_OPS", "TcpFront", "access_line", "big_blocks_from_mmap", "os_error_reply"]
