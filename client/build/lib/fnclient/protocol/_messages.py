"""Message envelopes and per-operation field checks (docs/PROTOCOL.md §3-§5). Pure."""

from __future__ import annotations

from typing import Any, Final

from ._framing import encode_frame
from ._ops import OPS
from .errors import FnError, InvalidArgumentError, ProtocolError

__all__ = [
    "CHUNK_SIZE",
    "PROTOCOL_VERSION",
    "encode_error",
    "encode_event",
    "encode_request",
    "encode_response",
    "parse_request",
]

PROTOCOL_VERSION: Final = 1
CHUNK_SIZE: Final = 1024 * 1024


def encode_request(op: str, req_id: int, **fields: Any) -> bytes:
    """A request frame (§3)."""
    return encode_frame({"type": "request", "op": op, "id": req_id, **fields})


def encode_response(req_id: int, result: dict[str, Any], max_frame: int | None = None) -> bytes:
    """A success response frame (§3); over ``max_frame`` it raises :class:`TooLargeError`."""
    return encode_frame({"type": "response", "id": req_id, "result": result}, max_frame)


def encode_error(req_id: int | None, err: FnError) -> bytes:
    """An error frame (§6); ``req_id`` is None for connection-level errors."""
    return encode_frame({"type": "error", "id": req_id, "error": err.to_wire()})


def encode_event(req_id: int, event: str, **fields: Any) -> bytes:
    """A progress event for a request still running (§3)."""
    return encode_frame({"type": "event", "id": req_id, "event": event, **fields})


def parse_request(body: dict[str, Any]) -> tuple[str, int, dict[str, Any]]:
    """Check the envelope of a request frame; return ``(op, id, body)``.

    A missing or wrong envelope is a :class:`ProtocolError` (the peer is not speaking the
    protocol); a bad field inside a known operation is left to the operation's handler.
    """
    if body.get("type") != "request":
        raise ProtocolError(f"expected a frame of type 'request', got {body.get('type')!r}")
    req_id = body.get("id")
    if not isinstance(req_id, int) or isinstance(req_id, bool) or not 0 <= req_id < 2**63:
        raise ProtocolError("request 'id' must be an integer in [0, 2**63)")
    op = body.get("op")
    if not isinstance(op, str) or op not in OPS:
        raise InvalidArgumentError(f"unknown operation {op!r}", {"ops": sorted(OPS)})
    return op, req_id, body
