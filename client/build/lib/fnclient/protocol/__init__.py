"""The fnserver wire protocol: pure codec, typed records per operation, error codes.

Nothing here touches sockets, asyncio, wasmtime or the registry; the server, the client
library and the server<->worker pipe all use it. docs/PROTOCOL.md is the normative spec.
"""

from __future__ import annotations

from . import _records
from ._framing import DEFAULT_MAX_FRAME, HEADER_SIZE, FrameDecoder, encode_frame
from ._messages import (
    CHUNK_SIZE,
    PROTOCOL_VERSION,
    encode_error,
    encode_event,
    encode_request,
    encode_response,
    parse_request,
)
from ._ops import OPERATIONS, OPS, Operation, RequestRecord
from ._records import *  # noqa: F403
from .errors import *  # noqa: F403
from .errors import __all__ as _errors_all

__all__ = [
    "CHUNK_SIZE",
    "DEFAULT_MAX_FRAME",
    "HEADER_SIZE",
    "OPERATIONS",
    "OPS",
    "PROTOCOL_VERSION",
    "FrameDecoder",
    "Operation",
    "RequestRecord",
    "encode_error",
    "encode_event",
    "encode_frame",
    "encode_request",
    "encode_response",
    "parse_request",
    *_records.__all__,
    *_errors_all,
]
