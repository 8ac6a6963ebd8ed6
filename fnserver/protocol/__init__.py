"""The fnserver wire protocol: pure codec, message envelopes and error codes.

Nothing here touches sockets, asyncio, wasmtime or the registry; the server, the client
library and the server<->worker pipe all use it. docs/PROTOCOL.md is the normative spec.
"""

from __future__ import annotations

from ._framing import DEFAULT_MAX_FRAME, HEADER_SIZE, FrameDecoder, encode_frame
from ._messages import (
    ALIAS_RE,
    CHUNK_SIZE,
    NAME_RE,
    OPS,
    PROTOCOL_VERSION,
    RESERVED_ALIASES,
    check_alias,
    check_name,
    encode_error,
    encode_event,
    encode_request,
    encode_response,
    parse_request,
    parse_version_ref,
)
from .errors import *  # noqa: F403
from .errors import __all__ as _errors_all

__all__ = [
    "ALIAS_RE",
    "CHUNK_SIZE",
    "DEFAULT_MAX_FRAME",
    "HEADER_SIZE",
    "NAME_RE",
    "OPS",
    "PROTOCOL_VERSION",
    "RESERVED_ALIASES",
    "FrameDecoder",
    "check_alias",
    "check_name",
    "encode_error",
    "encode_event",
    "encode_frame",
    "encode_request",
    "encode_response",
    "parse_request",
    "parse_version_ref",
    *_errors_all,
]
