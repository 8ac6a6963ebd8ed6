"""One exception root with stable wire codes (docs/PROTOCOL.md §6).

Each class carries its wire ``code`` as a class attribute; peers rebuild the class from the
code alone (:func:`error_from_wire`) and never look at the message text.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "ERROR_CLASSES",
    "AlreadyExistsError",
    "BuildError",
    "ChecksumMismatchError",
    "FnError",
    "FunctionTimeoutError",
    "InternalError",
    "InvalidArgumentError",
    "MemoryLimitError",
    "NotFoundError",
    "PermissionDeniedError",
    "ProtocolError",
    "QuotaExceededError",
    "ResourceExhaustedError",
    "TooLargeError",
    "TrapError",
    "UnauthenticatedError",
    "UnavailableError",
    "error_from_wire",
]


class FnError(Exception):
    """Root of every fnserver error; ``code`` is the stable wire code."""

    code: ClassVar[str] = "INTERNAL"

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = dict(details or {})

    def __str__(self) -> str:
        return self.message

    def to_wire(self) -> dict[str, Any]:
        """The error as the map carried in an error frame (PROTOCOL.md §6)."""
        return {"code": self.code, "message": self.message, "details": self.details}


class NotFoundError(FnError):
    """The function, version or alias does not exist."""

    code = "NOT_FOUND"


class InvalidArgumentError(FnError, ValueError):
    """A request field is malformed or refers to something unusable."""

    code = "INVALID_ARGUMENT"


class AlreadyExistsError(FnError):
    """The thing being created exists already."""

    code = "ALREADY_EXISTS"


class TooLargeError(FnError):
    """An upload, frame, input or output is over its limit."""

    code = "TOO_LARGE"


class ChecksumMismatchError(FnError):
    """The uploaded bytes do not match the announced size or sha256."""

    code = "CHECKSUM_MISMATCH"


class BuildError(FnError):
    """The toolchain rejected the upload; ``details["log"]`` holds its messages."""

    code = "BUILD_FAILED"


class FunctionTimeoutError(FnError, TimeoutError):
    """The function overran its wall-clock or CPU deadline."""

    code = "TIMEOUT"


class MemoryLimitError(FnError, MemoryError):
    """The function hit its memory limit."""

    code = "MEMORY_LIMIT"


class TrapError(FnError):
    """The guest trapped (stack overflow, unreachable, out-of-bounds access...)."""

    code = "TRAP"


class UnavailableError(FnError):
    """The server cannot take the request now (queue full, shutting down); retry later."""

    code = "UNAVAILABLE"


class ResourceExhaustedError(FnError):
    """The server ran short of something it shares among callers: disk space, file descriptors,
    memory for replies, or a per-connection allowance. Nothing was changed; retrying later (or
    with less in flight) may work."""

    code = "RESOURCE_EXHAUSTED"


class PermissionDeniedError(FnError):
    """The caller is authenticated but its role does not allow the operation; ``details``
    name the role and the operation."""

    code = "PERMISSION_DENIED"


class QuotaExceededError(FnError):
    """The caller's tenant is over one of its quotas; ``details`` name the quota, its limit and
    the current use."""

    code = "QUOTA_EXCEEDED"


class ProtocolError(FnError):
    """A frame broke the wire protocol; the connection is closed after this error."""

    code = "PROTOCOL_ERROR"


class UnauthenticatedError(FnError):
    """HELLO is missing, or its token is wrong."""

    code = "UNAUTHENTICATED"


class InternalError(FnError):
    """A bug or an unexpected failure inside the server."""

    code = "INTERNAL"


ERROR_CLASSES: dict[str, type[FnError]] = {
    cls.code: cls
    for cls in (
        NotFoundError,
        InvalidArgumentError,
        AlreadyExistsError,
        TooLargeError,
        ChecksumMismatchError,
        BuildError,
        FunctionTimeoutError,
        MemoryLimitError,
        TrapError,
        UnavailableError,
        ResourceExhaustedError,
        PermissionDeniedError,
        QuotaExceededError,
        ProtocolError,
        UnauthenticatedError,
        InternalError,
    )
}


def error_from_wire(code: object, message: object, details: object = None) -> FnError:
    """Rebuild the exception class named by ``code``; unknown codes become :class:`FnError`."""
    cls = ERROR_CLASSES.get(code) if isinstance(code, str) else None
    msg = message if isinstance(message, str) else str(message)
    det = details if isinstance(details, dict) else {}
    if cls is None:
        err = FnError(msg, det)
        # Keep an unknown code visible instead of pretending it was INTERNAL.
        err.code = str(code)  # type: ignore[misc]
        return err
    return cls(msg, det)
