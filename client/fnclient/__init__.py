"""fnclient: the Python client library for fnserver (docs/PROTOCOL.md) and the ``fn`` CLI.

``AsyncClient`` is the implementation; ``Client`` is its blocking wrapper. Errors are the
protocol's own classes, rebuilt from the wire code.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _dist_version

from ._address import DEFAULT_PORT, parse_address, parse_addresses
from ._async import AsyncClient, ProgressCallback, UploadStream
from ._results import InvokeResult
from ._sync import Client
from .protocol import (
    AlreadyExistsError,
    BuildError,
    CallStatus,
    ChecksumMismatchError,
    FnError,
    FunctionTimeoutError,
    Identity,
    InternalError,
    InvalidArgumentError,
    InvocationRecord,
    MemoryLimitError,
    NotFoundError,
    PermissionDeniedError,
    ProtocolError,
    QuotaExceededError,
    ResourceExhaustedError,
    StatsReply,
    TooLargeError,
    TrapError,
    UnauthenticatedError,
    UnavailableError,
    VersionStats,
    error_from_wire,
)

try:
    # Installed alone (``pip install ./client``) or as part of the server's distribution.
    __version__ = _dist_version("fnclient")
except PackageNotFoundError:
    try:
        __version__ = _dist_version("fnserver")
    except PackageNotFoundError:  # running from a source tree that was never installed
        __version__ = "0.0.0"

__all__ = [
    "CallStatus",
    "InvocationRecord",
    "StatsReply",
    "VersionStats",
    "DEFAULT_PORT",
    "AlreadyExistsError",
    "AsyncClient",
    "BuildError",
    "ChecksumMismatchError",
    "Client",
    "FnError",
    "FunctionTimeoutError",
    "Identity",
    "InternalError",
    "InvalidArgumentError",
    "InvokeResult",
    "MemoryLimitError",
    "NotFoundError",
    "PermissionDeniedError",
    "ProgressCallback",
    "ProtocolError",
    "QuotaExceededError",
    "ResourceExhaustedError",
    "TooLargeError",
    "TrapError",
    "UnauthenticatedError",
    "UnavailableError",
    "UploadStream",
    "__version__",
    "error_from_wire",
    "parse_address",
    "parse_addresses",
]
