"""Records of the operations that follow calls after they ran: async results, invocation
records, statistics (docs/PROTOCOL.md §5.12-§5.15).

Same rules as ``_records.py``: ``from_wire`` checks every field it reads and ignores keys it
does not know; ``to_wire`` gives the map to encode.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, Literal

from ._records import (
    NAME_RE,
    InvokeRequest,
    InvokeResult,
    _bool,
    _int,
    _present,
    check_name,
)
from .errors import InvalidArgumentError, ProtocolError

__all__ = [
    "Ack",
    "CALL_STATES",
    "INVOCATION_ID_RE",
    "LATENCY_BUCKETS_MS",
    "MAX_LOGS",
    "MAX_RENEW",
    "CallError",
    "CallState",
    "CallStatus",
    "ClaimReply",
    "ClaimRequest",
    "ClaimedCall",
    "CompleteRequest",
    "InvocationRecord",
    "InvokeAccepted",
    "LogsReply",
    "LogsRequest",
    "RenewReply",
    "RenewRequest",
    "ReportRequest",
    "ResultRequest",
    "ServerStats",
    "StatsReply",
    "StatsRequest",
    "VersionStats",
]

CallState = Literal["queued", "running", "done", "failed"]
CALL_STATES: Final[tuple[CallState, ...]] = ("queued", "running", "done", "failed")
#: Invocation ids: ``inv_`` and 24 hex digits (96 random bits; unguessable, so a result is
#: only found by whoever was told its id, on top of the tenant check).
INVOCATION_ID_RE: Final = re.compile(r"^inv_[0-9a-f]{24}$")
#: The most records one ``logs`` reply carries.
MAX_LOGS: Final = 1000
#: The longest a ``result`` or ``logs`` request may wait on the server (ms).
MAX_WAIT_MS: Final = 60_000
#: Upper bounds (ms) of the latency histogram every statistic and the Prometheus exposition
#: share: 1, 1.5, 2, 3, 5, 7 per decade from 10 µs to 300 s (the longest time limit).
LATENCY_BUCKETS_MS: Final[tuple[float, ...]] = tuple(
    round(m * 10.0**e, 6) for e in range(-2, 6) for m in (1, 1.5, 2, 3, 5, 7)
)[:-2]


def _float(m: Mapping[str, Any], key: str) -> float | None:
    value = m.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProtocolError(f"malformed record: '{key}' is not a number")
    return float(value)


def _num(m: Mapping[str, Any], key: str) -> int:
    value = m.get(key)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"malformed record: '{key}' is not an integer")
    return value


def _text(m: Mapping[str, Any], key: str) -> str:
    value = m.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ProtocolError(f"malformed record: '{key}' is not a string")
    return value


def _opt_int(m: Mapping[str, Any], key: str) -> int | None:
    return None if m.get(key) is None else _num(m, key)


def _opt_text(m: Mapping[str, Any], key: str) -> str | None:
    return None if m.get(key) is None else _text(m, key)


def _check_id(value: object) -> str:
    if not isinstance(value, str) or not INVOCATION_ID_RE.match(value):
        raise InvalidArgumentError(
            f"invalid invocation id {value!r}: ids look like inv_ and 24 hex digits"
        )
    return value


# -- §5.8 invoke with async --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InvokeAccepted:
    """The reply to an ``invoke`` with ``async`` (§5.8): the call is queued under this id."""

    id: str
    state: CallState = "queued"

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.id, "state": self.state}

    @classmethod
    def from_wire(cls, m: Mapping[str, Any]) -> InvokeAccepted:
        return cls(_text(m, "id"), _text(m, "state") or "queued")  # type: ignore[arg-type]


# -- §5.12 result ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ResultRequest:
    """§5.12: an async call's state, and its result once it has one."""

    op: ClassVar[str] = "result"
    id: str
    #: Wait up to this long for the call to finish (None: answer at once).
    wait_ms: int | None = None

    @classmethod
    def from_wire(cls, body: Mapping[str, Any]) -> ResultRequest:
        return cls(_check_id(body.get("invocation")), _int(body, "wait_ms", 0, MAX_WAIT_MS))

    def to_wire(self) -> dict[str, Any]:
        # "invocation", not "id": a request's fields share the envelope, whose "id" is taken.
        return _present({"invocation": self.id, "wait_ms": self.wait_ms})


@dataclass(frozen=True, slots=True)
class CallError:
    """How a call failed: the error it would have raised if it had been synchronous."""

    code: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "details": self.details}

    @classmethod
    def from_wire(cls, m: object) -> CallError:
        if not isinstance(m, Mapping):
            raise ProtocolError("malformed call error: not a map")
        details = m.get("details")
        return cls(_text(m, "code"), _text(m, "message"), dict(details) if isinstance(details, Mapping) else {})


@dataclass(frozen=True, slots=True)
class CallStatus:
    """The reply to ``result`` (§5.12)."""

    id: str
    state: CallState
    name: str
    version: int | None = None
    created: float = 0.0
    started: float | None = None
    finished: float | None = None
    attempts: int = 0
    result: InvokeResult | None = None
    error: CallError | None = None

    def to_wire(self) -> dict[str, Any]:
        return _present(
            {
                "id": self.id,
                "state": self.state,
                "name": self.name,
                "version": self.version,
                "created": self.created,
                "started": self.started,
                "finished": self.finished,
                "attempts": self.attempts,
                "result": self.result.to_wire() if self.result is not None else None,
                "error": self.error.to_wire() if self.error is not None else None,
            }
        )

    @classmethod
    def from_wire(cls, m: Mapping[str, Any]) -> CallStatus:
        state = _text(m, "state")
        if state not in CALL_STATES:
            raise ProtocolError(f"malformed result: unknown state {state!r}")
        result = m.get("result")
        error = m.get("error")
        return cls(
            id=_text(m, "id"),
            state=state,  # type: ignore[arg-type]
            name=_text(m, "name"),
            version=_opt_int(m, "version"),
            created=_float(m, "created") or 0.0,
            started=_float(m, "started"),
            finished=_float(m, "finished"),
            attempts=_num(m, "attempts"),
            result=InvokeResult.from_wire(result) if isinstance(result, Mapping) else None,
            error=CallError.from_wire(error) if error is not None else None,
        )


# -- §5.13 logs ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InvocationRecord:
    """What one invocation left behind (§5.13)."""

    id: str
    tenant: str
    name: str
    version: int
    #: ``sync`` or ``async``.
    mode: str
    #: ``wasm`` or ``native``.
    runtime: str
    #: Unix time (s) the server received the call.
    started: float
    queue_us: int
    run_us: int
    wall_us: int
    #: The guest's exit code, or None when the call failed (``error`` says how).
    exit_code: int | None
    error: str | None
    output_size: int
    #: The last bytes the guest wrote to stderr (at most 1 KiB).
    stderr_tail: bytes = b""
    #: True when the call had to load its module first (a cold start).
    cold: bool = False
    #: The record's place in the store: increasing, the cursor of ``logs`` (0 before stored).
    seq: int = 0

    def to_wire(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "id": self.id,
            "tenant": self.tenant,
            "name": self.name,
            "version": self.version,
            "mode": self.mode,
            "runtime": self.runtime,
            "started": self.started,
            "queue_us": self.queue_us,
            "run_us": self.run_us,
            "wall_us": self.wall_us,
            "exit_code": self.exit_code,
            "error": self.error,
            "output_size": self.output_size,
            "stderr_tail": self.stderr_tail,
            "cold": self.cold,
        }

    @classmethod
    def from_wire(cls, m: object) -> InvocationRecord:
        if not isinstance(m, Mapping):
            raise ProtocolError("malformed invocation record: not a map")
        tail = m.get("stderr_tail") or b""
        if not isinstance(tail, bytes):
            raise ProtocolError("malformed invocation record: 'stderr_tail' is not bin")
        return cls(
            id=_text(m, "id"),
            tenant=_text(m, "tenant"),
            name=_text(m, "name"),
            version=_num(m, "version"),
            mode=_text(m, "mode"),
            runtime=_text(m, "runtime"),
            started=_float(m, "started") or 0.0,
            queue_us=_num(m, "queue_us"),
            run_us=_num(m, "run_us"),
            wall_us=_num(m, "wall_us"),
            exit_code=_opt_int(m, "exit_code"),
            error=_opt_text(m, "error"),
            output_size=_num(m, "output_size"),
            stderr_tail=tail,
            cold=bool(m.get("cold", False)),
            seq=_num(m, "seq"),
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready map (stderr decoded as UTF-8 with replacement)."""
        out = self.to_wire()
        out["stderr_tail"] = self.stderr_tail.decode("utf-8", "replace")
        return out


@dataclass(frozen=True, slots=True)
class LogsRequest:
    """§5.13: a function's invocation records, oldest first."""

    op: ClassVar[str] = "logs"
    name: str
    version: int | None = None
    limit: int = 20
    #: Only records after this cursor (a ``seq``).
    after: int | None = None
    #: Keep the request open and send each new record as an ``event`` (``record``).
    follow: bool = False
    #: With nothing to return yet, wait up to this long for a record (ms).
    wait_ms: int | None = None

    @classmethod
    def from_wire(cls, body: Mapping[str, Any]) -> LogsRequest:
        return cls(
            name=check_name(body.get("name")),
            version=_int(body, "version", 1, 2**62),
            limit=_int(body, "limit", 1, MAX_LOGS) or 20,
            after=_int(body, "after", 0, 2**63 - 1),
            follow=_bool(body, "follow"),
            wait_ms=_int(body, "wait_ms", 0, MAX_WAIT_MS),
        )

    def to_wire(self) -> dict[str, Any]:
        return _present(
            {
                "name": self.name,
                "version": self.version,
                "limit": self.limit,
                "after": self.after,
                "follow": self.follow or None,
                "wait_ms": self.wait_ms,
            }
        )


@dataclass(frozen=True, slots=True)
class LogsReply:
    """§5.13: the records, oldest first, and the cursor to ask for newer ones with."""

    records: tuple[InvocationRecord, ...]
    last: int

    def to_wire(self) -> dict[str, Any]:
        return {"records": [r.to_wire() for r in self.records], "last": self.last}

    @classmethod
    def from_wire(cls, m: Mapping[str, Any]) -> LogsReply:
        records = m.get("records") or []
        if not isinstance(records, list):
            raise ProtocolError("malformed logs reply: 'records' is not a list")
        return cls(tuple(InvocationRecord.from_wire(r) for r in records), _num(m, "last"))


# -- §5.14 stats -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StatsRequest:
    """§5.14: per-version statistics of one function (or every function) and the server's."""

    op: ClassVar[str] = "stats"
    name: str | None = None
    #: Without a name: this tenant's functions (admins; default: the caller's tenant).
    tenant: str | None = None
    #: Without a name: every tenant's functions, named by tenant (admins).
    all: bool = False

    @classmethod
    def from_wire(cls, body: Mapping[str, Any]) -> StatsRequest:
        name = body.get("name")
        tenant = body.get("tenant")
        if tenant is not None and (not isinstance(tenant, str) or not NAME_RE.match(tenant)):
            raise InvalidArgumentError(f"invalid tenant {tenant!r}")
        return cls(check_name(name) if name is not None else None, tenant, _bool(body, "all"))

    def to_wire(self) -> dict[str, Any]:
        return _present({"name": self.name, "tenant": self.tenant, "all": self.all or None})


@dataclass(frozen=True, slots=True)
class VersionStats:
    """One version's calls since the store began (§5.14)."""

    tenant: str
    name: str
    version: int
    calls: int = 0
    #: Failed calls by error code (a non-zero exit code is not an error).
    errors: dict[str, int] = field(default_factory=dict)
    warm: int = 0
    cold: int = 0
    #: Estimated from the histogram (ms); None before the first call.
    p50_ms: float | None = None
    p99_ms: float | None = None
    #: Wall time: calls per upper bound of ``LATENCY_BUCKETS_MS`` (one more: above the last),
    #: and the total (ms), for the Prometheus histogram.
    buckets: tuple[int, ...] = ()
    total_ms: float = 0.0

    def to_wire(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant,
            "name": self.name,
            "version": self.version,
            "calls": self.calls,
            "errors": dict(self.errors),
            "warm": self.warm,
            "cold": self.cold,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "buckets": list(self.buckets),
            "total_ms": self.total_ms,
        }

    @classmethod
    def from_wire(cls, m: object) -> VersionStats:
        if not isinstance(m, Mapping):
            raise ProtocolError("malformed stats: not a map")
        errors = m.get("errors") or {}
        buckets = m.get("buckets") or []
        if not isinstance(errors, Mapping) or not isinstance(buckets, list):
            raise ProtocolError("malformed stats: 'errors' or 'buckets'")
        return cls(
            tenant=_text(m, "tenant"),
            name=_text(m, "name"),
            version=_num(m, "version"),
            calls=_num(m, "calls"),
            errors={str(k): int(v) for k, v in errors.items()},
            warm=_num(m, "warm"),
            cold=_num(m, "cold"),
            p50_ms=_float(m, "p50_ms"),
            p99_ms=_float(m, "p99_ms"),
            buckets=tuple(int(b) for b in buckets),
            total_ms=_float(m, "total_ms") or 0.0,
        )


@dataclass(frozen=True, slots=True)
class ServerStats:
    """The server's gauges (§5.14), summed over its serving processes (lag: the worst)."""

    processes: int = 1
    connections: int = 0
    #: Async calls waiting in the store's queue, and calls waiting for a slot or worker.
    async_queued: int = 0
    waiting: int = 0
    #: Native workers and wasm slots: how many exist and how many run a call now.
    workers_total: int = 0
    workers_busy: int = 0
    workers_idle: int = 0
    wasm_slots: int = 0
    wasm_running: int = 0
    builds_running: int = 0
    #: The longest the event loop was held (ms) in the last few seconds.
    loop_lag_ms: float = 0.0

    def to_wire(self) -> dict[str, Any]:
        return {
            "processes": self.processes,
            "connections": self.connections,
            "async_queued": self.async_queued,
            "waiting": self.waiting,
            "workers_total": self.workers_total,
            "workers_busy": self.workers_busy,
            "workers_idle": self.workers_idle,
            "wasm_slots": self.wasm_slots,
            "wasm_running": self.wasm_running,
            "builds_running": self.builds_running,
            "loop_lag_ms": self.loop_lag_ms,
        }

    @classmethod
    def from_wire(cls, m: object) -> ServerStats:
        if not isinstance(m, Mapping):
            raise ProtocolError("malformed server stats: not a map")
        return cls(
            processes=_num(m, "processes"),
            connections=_num(m, "connections"),
            async_queued=_num(m, "async_queued"),
            waiting=_num(m, "waiting"),
            workers_total=_num(m, "workers_total"),
            workers_busy=_num(m, "workers_busy"),
            workers_idle=_num(m, "workers_idle"),
            wasm_slots=_num(m, "wasm_slots"),
            wasm_running=_num(m, "wasm_running"),
            builds_running=_num(m, "builds_running"),
            loop_lag_ms=_float(m, "loop_lag_ms") or 0.0,
        )

    def plus(self, other: ServerStats) -> ServerStats:
        """Both processes' gauges together (counts add up; the lag is the worse one's)."""
        return ServerStats(
            processes=self.processes + other.processes,
            connections=self.connections + other.connections,
            async_queued=max(self.async_queued, other.async_queued),
            waiting=self.waiting + other.waiting,
            workers_total=self.workers_total + other.workers_total,
            workers_busy=self.workers_busy + other.workers_busy,
            workers_idle=self.workers_idle + other.workers_idle,
            wasm_slots=self.wasm_slots + other.wasm_slots,
            wasm_running=self.wasm_running + other.wasm_running,
            builds_running=self.builds_running + other.builds_running,
            loop_lag_ms=max(self.loop_lag_ms, other.loop_lag_ms),
        )


@dataclass(frozen=True, slots=True)
class StatsReply:
    """§5.14."""

    functions: tuple[VersionStats, ...]
    server: ServerStats

    def to_wire(self) -> dict[str, Any]:
        return {"functions": [f.to_wire() for f in self.functions], "server": self.server.to_wire()}

    @classmethod
    def from_wire(cls, m: Mapping[str, Any]) -> StatsReply:
        functions = m.get("functions") or []
        if not isinstance(functions, list):
            raise ProtocolError("malformed stats reply: 'functions' is not a list")
        return cls(
            tuple(VersionStats.from_wire(f) for f in functions),
            ServerStats.from_wire(m.get("server") or {}),
        )


# -- §5.15 internal: a serving process and its control process ---------------------------------


@dataclass(frozen=True, slots=True)
class Ack:
    """An empty reply: the request was carried out."""

    def to_wire(self) -> dict[str, Any]:
        return {}


@dataclass(frozen=True, slots=True)
class ReportRequest:
    """§5.15: a serving process's new invocation records and its gauges."""

    op: ClassVar[str] = "report"
    records: tuple[InvocationRecord, ...] = ()
    process: ServerStats | None = None
    pid: int = 0

    @classmethod
    def from_wire(cls, body: Mapping[str, Any]) -> ReportRequest:
        records = body.get("records") or []
        if not isinstance(records, list):
            raise InvalidArgumentError("'records' must be a list")
        try:
            process = body.get("process")
            return cls(
                tuple(InvocationRecord.from_wire(r) for r in records),
                ServerStats.from_wire(process) if process is not None else None,
                _int(body, "pid", 0, 2**31) or 0,
            )
        except ProtocolError as exc:
            raise InvalidArgumentError(exc.message) from None

    def to_wire(self) -> dict[str, Any]:
        return _present(
            {
                "records": [r.to_wire() for r in self.records],
                "process": self.process.to_wire() if self.process is not None else None,
                "pid": self.pid,
            }
        )


@dataclass(frozen=True, slots=True)
class ClaimRequest:
    """§5.15: up to ``max`` queued async calls to run, waiting up to ``wait_ms`` for one."""

    op: ClassVar[str] = "claim"
    max: int = 1
    wait_ms: int = 0

    @classmethod
    def from_wire(cls, body: Mapping[str, Any]) -> ClaimRequest:
        return cls(_int(body, "max", 1, 1024) or 1, _int(body, "wait_ms", 0, MAX_WAIT_MS) or 0)

    def to_wire(self) -> dict[str, Any]:
        return {"max": self.max, "wait_ms": self.wait_ms}


@dataclass(frozen=True, slots=True)
class ClaimedCall:
    """A queued async call, claimed: who asked for it and what they asked."""

    id: str
    tenant: str
    role: str
    token_id: str | None
    request: InvokeRequest
    created: float
    attempts: int

    def to_wire(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "tenant": self.tenant,
            "role": self.role,
            "token_id": self.token_id,
            "request": self.request.to_wire(),
            "created": self.created,
            "attempts": self.attempts,
        }

    @classmethod
    def from_wire(cls, m: object) -> ClaimedCall:
        if not isinstance(m, Mapping) or not isinstance(m.get("request"), Mapping):
            raise ProtocolError("malformed claimed call")
        return cls(
            id=_text(m, "id"),
            tenant=_text(m, "tenant"),
            role=_text(m, "role"),
            token_id=_opt_text(m, "token_id"),
            request=InvokeRequest.from_wire(m["request"]),
            created=_float(m, "created") or 0.0,
            attempts=_num(m, "attempts"),
        )


@dataclass(frozen=True, slots=True)
class ClaimReply:
    """§5.15."""

    calls: tuple[ClaimedCall, ...]

    def to_wire(self) -> dict[str, Any]:
        return {"calls": [c.to_wire() for c in self.calls]}

    @classmethod
    def from_wire(cls, m: Mapping[str, Any]) -> ClaimReply:
        calls = m.get("calls") or []
        if not isinstance(calls, list):
            raise ProtocolError("malformed claim reply")
        return cls(tuple(ClaimedCall.from_wire(c) for c in calls))


#: The most invocation ids one ``renew`` names (a process runs far fewer async calls at once).
MAX_RENEW: Final = 4096


@dataclass(frozen=True, slots=True)
class RenewRequest:
    """§5.15: extend the leases of claimed calls the asker is still running."""

    op: ClassVar[str] = "renew"
    ids: tuple[str, ...] = ()

    @classmethod
    def from_wire(cls, body: Mapping[str, Any]) -> RenewRequest:
        ids = body.get("invocations") or []
        if not isinstance(ids, list) or len(ids) > MAX_RENEW:
            raise InvalidArgumentError(f"'invocations' must be a list of at most {MAX_RENEW} ids")
        return cls(tuple(_check_id(i) for i in ids))

    def to_wire(self) -> dict[str, Any]:
        return {"invocations": list(self.ids)}


@dataclass(frozen=True, slots=True)
class RenewReply:
    """§5.15: the calls whose leases were extended: those the asker still holds."""

    held: tuple[str, ...]

    def to_wire(self) -> dict[str, Any]:
        return {"held": list(self.held)}

    @classmethod
    def from_wire(cls, m: Mapping[str, Any]) -> RenewReply:
        held = m.get("held") or []
        if not isinstance(held, list) or not all(isinstance(i, str) for i in held):
            raise ProtocolError("malformed renew reply")
        return cls(tuple(held))


@dataclass(frozen=True, slots=True)
class CompleteRequest:
    """§5.15: a claimed call's outcome: its result, or the error it failed with."""

    op: ClassVar[str] = "complete"
    id: str
    result: InvokeResult | None = None
    error: CallError | None = None

    @classmethod
    def from_wire(cls, body: Mapping[str, Any]) -> CompleteRequest:
        result = body.get("result")
        error = body.get("error")
        try:
            return cls(
                _check_id(body.get("invocation")),
                InvokeResult.from_wire(result) if isinstance(result, Mapping) else None,
                CallError.from_wire(error) if error is not None else None,
            )
        except ProtocolError as exc:
            raise InvalidArgumentError(exc.message) from None

    def to_wire(self) -> dict[str, Any]:
        return _present(
            {
                "invocation": self.id,
                "result": self.result.to_wire() if self.result is not None else None,
                "error": self.error.to_wire() if self.error is not None else None,
            }
        )

