"""Typed messages of the pool <-> worker pipe and the pool <- compiler pipe.

Every message is a frozen record with ``to_wire()`` (the msgpack map) and ``from_wire()``;
the framing is the client protocol's (``fnserver.protocol.encode_frame`` / ``FrameDecoder``).
Each map carries its type in ``"t"``, so :func:`decode` is one dictionary lookup. Both ends
are fnserver's own code, so a malformed message is a bug (or a worker gone wrong): it raises
:class:`PipeError` and the pool kills the worker, never guesses.

Pool -> worker: :class:`RunRequest` (native calls only: wasm runs in the serving process).
Worker -> pool: :class:`Ready` once, then per request exactly one of :class:`RunOk` or
:class:`RunError`. Compiler -> pool: one :class:`Compiled` or :class:`RunError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, TypeAlias

from ..protocol import FnError, InvokeResult, error_from_wire

__all__ = [
    "Compiled",
    "PipeError",
    "PipeMessage",
    "Ready",
    "RunError",
    "RunOk",
    "RunRequest",
    "decode",
]

#: Frames on the pipes may carry a whole input or output (bounded by the server's limits).
PIPE_MAX_FRAME: Final = 1 << 30


class PipeError(Exception):
    """A pipe message that does not match its record: a bug on the other end."""


def _get(body: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = body.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise PipeError(f"pipe message {body.get('t')!r}: bad {key!r}: {type(value).__name__}")
    return value


@dataclass(frozen=True, slots=True)
class RunRequest:
    """One native call for a worker: ``path`` is the executable (the registry's artifact)."""

    TAG: ClassVar[str] = "run"
    function: str
    path: str
    input: bytes
    args: tuple[str, ...]
    timeout_ms: int
    memory_mb: int
    output_bytes: int
    #: The function's environment: all the binary gets (nothing of the server's own).
    env: tuple[tuple[str, str], ...] = ()

    def to_wire(self) -> dict[str, Any]:
        """The msgpack map of this record."""
        return {
            "t": self.TAG,
            "env": [list(pair) for pair in self.env],
            "function": self.function,
            "path": self.path,
            "input": self.input,
            "args": list(self.args),
            "timeout_ms": self.timeout_ms,
            "memory_mb": self.memory_mb,
            "output_bytes": self.output_bytes,
        }

    @classmethod
    def from_wire(cls, body: Mapping[str, Any]) -> RunRequest:
        """Rebuild from a decoded map; :class:`PipeError` if a field is wrong."""
        args = _get(body, "args", list)
        if not all(isinstance(a, str) for a in args):
            raise PipeError("pipe message 'run': args must be strings")
        return cls(
            function=_get(body, "function", str),
            path=_get(body, "path", str),
            input=_get(body, "input", bytes),
            args=tuple(args),
            timeout_ms=_get(body, "timeout_ms", int),
            memory_mb=_get(body, "memory_mb", int),
            output_bytes=_get(body, "output_bytes", int),
            env=_env_pairs(body.get("env")),
        )


def _env_pairs(value: object) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(
        isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in value
    ):
        raise PipeError("pipe message 'run': env must be [name, value] pairs of strings")
    return tuple((p[0], p[1]) for p in value)


#: Refusals (``SandboxInfo.refused``) that leave a native call without its sandbox.
_ESSENTIAL: Final = ("unshare(CLONE_NEWNET)", "loopback up", "private mounts", "seccomp",
                     "drop to uid", "no_new_privs", "capset")


@dataclass(frozen=True, slots=True)
class Ready:
    """Sent once by a worker after hardening itself: what the sandbox managed to apply."""

    TAG: ClassVar[str] = "ready"
    uid: int | None
    subreaper: bool
    netns: bool
    refused: tuple[str, ...] = field(default=())

    def gaps(self) -> list[str]:
        """What is missing from the native sandbox this worker set up (empty: all of it).
        The memory cgroup is not among them: without it rlimits bound memory (issue 9)."""
        gaps = [] if self.uid is not None else ["the server does not run as root (no sandbox uid)"]
        if not self.netns:
            gaps.append("no network namespace")
        gaps += [r for r in self.refused if r.startswith(_ESSENTIAL)]
        return gaps

    def to_wire(self) -> dict[str, Any]:
        """The msgpack map of this record."""
        return {
            "t": self.TAG,
            "uid": self.uid,
            "subreaper": self.subreaper,
            "netns": self.netns,
            "refused": list(self.refused),
        }

    @classmethod
    def from_wire(cls, body: Mapping[str, Any]) -> Ready:
        """Rebuild from a decoded map; :class:`PipeError` if a field is wrong."""
        uid = body.get("uid")
        if uid is not None and not isinstance(uid, int):
            raise PipeError("pipe message 'ready': bad 'uid'")
        refused = _get(body, "refused", list)
        return cls(
            uid=uid,
            subreaper=_get(body, "subreaper", bool),
            netns=_get(body, "netns", bool),
            refused=tuple(str(r) for r in refused),
        )

    def as_dict(self) -> dict[str, Any]:
        """For stats: the same fields as a plain map."""
        return {"uid": self.uid, "subreaper": self.subreaper, "netns": self.netns,
                "refused": list(self.refused)}


@dataclass(frozen=True, slots=True)
class RunOk:
    """A finished call. The worker fills output, stderr, exit_code, truncated, duration_us,
    memory_peak and mode; the pool adds version, queue_us and wall_us."""

    TAG: ClassVar[str] = "ok"
    result: InvokeResult

    def to_wire(self) -> dict[str, Any]:
        """The msgpack map of this record."""
        return {"t": self.TAG, "result": self.result.to_wire()}

    @classmethod
    def from_wire(cls, body: Mapping[str, Any]) -> RunOk:
        """Rebuild from a decoded map; :class:`PipeError` if a field is wrong."""
        return cls(InvokeResult.from_wire(_get(body, "result", dict)))


@dataclass(frozen=True, slots=True)
class RunError:
    """A call (or a compile) that failed with a wire error: the guest's fault or a bad module."""

    TAG: ClassVar[str] = "error"
    code: str
    message: str
    details: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, exc: FnError) -> RunError:
        """The record of a raised :class:`FnError`."""
        return cls(exc.code, exc.message, dict(exc.details))

    def error(self) -> FnError:
        """The exception class the code names, rebuilt as the client would."""
        return error_from_wire(self.code, self.message, dict(self.details))

    def to_wire(self) -> dict[str, Any]:
        """The msgpack map of this record."""
        return {"t": self.TAG, "code": self.code, "message": self.message,
                "details": dict(self.details)}

    @classmethod
    def from_wire(cls, body: Mapping[str, Any]) -> RunError:
        """Rebuild from a decoded map; :class:`PipeError` if a field is wrong."""
        return cls(_get(body, "code", str), _get(body, "message", str),
                   _get(body, "details", dict))


@dataclass(frozen=True, slots=True)
class Compiled:
    """The compiler's answer: the serialized module (the pool hashes and stores it)."""

    TAG: ClassVar[str] = "compiled"
    cwasm: bytes

    def to_wire(self) -> dict[str, Any]:
        """The msgpack map of this record."""
        return {"t": self.TAG, "cwasm": self.cwasm}

    @classmethod
    def from_wire(cls, body: Mapping[str, Any]) -> Compiled:
        """Rebuild from a decoded map; :class:`PipeError` if a field is wrong."""
        return cls(_get(body, "cwasm", bytes))


PipeMessage: TypeAlias = RunRequest | Ready | RunOk | RunError | Compiled

_BY_TAG: Final[dict[str, Any]] = {
    cls.TAG: cls
    for cls in (RunRequest, Ready, RunOk, RunError, Compiled)
}


def decode(body: object) -> PipeMessage:
    """The record of one decoded frame; :class:`PipeError` for anything else."""
    if not isinstance(body, Mapping):
        raise PipeError(f"pipe frame is a {type(body).__name__}, not a map")
    cls = _BY_TAG.get(body.get("t"))  # type: ignore[arg-type]
    if cls is None:
        raise PipeError(f"unknown pipe message type {body.get('t')!r}")
    msg: PipeMessage = cls.from_wire(body)
    return msg
