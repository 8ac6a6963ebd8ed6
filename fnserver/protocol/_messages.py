"""Message envelopes and per-operation field checks (docs/PROTOCOL.md §3-§5). Pure."""

from __future__ import annotations

import re
from typing import Any, Final

from ._framing import encode_frame
from .errors import FnError, InvalidArgumentError, ProtocolError

__all__ = [
    "ALIAS_RE",
    "CHUNK_SIZE",
    "NAME_RE",
    "OPS",
    "PROTOCOL_VERSION",
    "RESERVED_ALIASES",
    "check_alias",
    "check_name",
    "encode_error",
    "encode_event",
    "encode_request",
    "encode_response",
    "parse_request",
    "parse_version_ref",
]

PROTOCOL_VERSION: Final = 1
CHUNK_SIZE: Final = 1024 * 1024
OPS: Final = frozenset(
    {"hello", "ping", "register", "upload", "list", "get", "delete", "alias", "invoke"}
)
NAME_RE: Final = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
#: Aliases may not be all digits, so ``name@3`` is always a version and ``name@prod`` an alias.
ALIAS_RE: Final = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
RESERVED_ALIASES: Final = frozenset({"latest"})


def encode_request(op: str, req_id: int, **fields: Any) -> bytes:
    """A request frame (§3)."""
    return encode_frame({"type": "request", "op": op, "id": req_id, **fields})


def encode_response(req_id: int, result: dict[str, Any]) -> bytes:
    """A success response frame (§3)."""
    return encode_frame({"type": "response", "id": req_id, "result": result})


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


def check_name(name: object) -> str:
    """Validate a function name against :data:`NAME_RE`."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidArgumentError(
            f"invalid function name {name!r}: use 1-63 characters a-z, 0-9, '_' or '-',"
            " starting with a letter or digit"
        )
    return name


def check_alias(alias: object) -> str:
    """Validate a user alias name; ``latest`` is reserved."""
    if not isinstance(alias, str) or not ALIAS_RE.match(alias):
        raise InvalidArgumentError(
            f"invalid alias {alias!r}: use 1-63 characters a-z, 0-9, '_' or '-',"
            " starting with a letter"
        )
    if alias in RESERVED_ALIASES:
        raise InvalidArgumentError(f"alias {alias!r} is reserved and always names the newest version")
    return alias


def parse_version_ref(ref: object) -> int | str | None:
    """A version reference: None (latest), a positive int, a digit string, or an alias."""
    if ref is None:
        return None
    if isinstance(ref, bool):
        raise InvalidArgumentError(f"invalid version {ref!r}")
    if isinstance(ref, int):
        if ref < 1:
            raise InvalidArgumentError(f"invalid version {ref}: versions start at 1")
        return ref
    if isinstance(ref, str):
        if ref.isdigit():
            return parse_version_ref(int(ref))
        if ref == "latest":
            return None
        if not ALIAS_RE.match(ref):
            raise InvalidArgumentError(f"invalid version or alias {ref!r}")
        return ref
    raise InvalidArgumentError(f"invalid version {ref!r}: expected an integer or an alias")
