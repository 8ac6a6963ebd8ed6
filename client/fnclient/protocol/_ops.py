"""The one table of operations (docs/PROTOCOL.md §4-§5).

The server's dispatch, the client and the spec are checked against this table by a test
(``tests/test_protocol_table.py``): an operation cannot exist in one and not the others.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, Protocol

from ._calls import (
    ClaimRequest,
    CompleteRequest,
    LogsRequest,
    RenewRequest,
    ReportRequest,
    ResultRequest,
    StatsRequest,
)
from ._records import (
    AliasRequest,
    CompileRequest,
    DeleteRequest,
    GetRequest,
    HelloRequest,
    InvokeRequest,
    ListRequest,
    PingRequest,
    RegisterRequest,
    UploadChunk,
)

__all__ = ["OPERATIONS", "OPS", "Operation", "RequestRecord"]


class RequestRecord(Protocol):
    """What every request record offers: built from and turned into a wire map."""

    @property
    def op(self) -> str: ...

    def to_wire(self) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class Operation:
    """One operation: its wire name, the spec section and the record its fields decode into.

    ``streams`` marks the register, whose upload chunks follow under the same id;
    ``chunk`` marks the upload frames themselves, which get no reply of their own.
    """

    name: str
    section: str
    request: Any  # a record class with ``from_wire``
    streams: bool = False
    chunk: bool = False
    reply: bool = True


OPERATIONS: Final[Mapping[str, Operation]] = MappingProxyType(
    {
        op.name: op
        for op in (
            Operation("hello", "§4", HelloRequest),
            Operation("ping", "§5.1", PingRequest),
            Operation("register", "§5.2", RegisterRequest, streams=True),
            Operation("upload", "§5.2", UploadChunk, chunk=True, reply=False),
            Operation("list", "§5.4", ListRequest),
            Operation("get", "§5.5", GetRequest),
            Operation("delete", "§5.6", DeleteRequest),
            Operation("alias", "§5.7", AliasRequest),
            Operation("invoke", "§5.8", InvokeRequest),
            Operation("compile", "§5.10", CompileRequest),
            Operation("result", "§5.12", ResultRequest),
            Operation("logs", "§5.13", LogsRequest),
            Operation("stats", "§5.14", StatsRequest),
            Operation("report", "§5.15", ReportRequest),
            Operation("claim", "§5.15", ClaimRequest),
            Operation("renew", "§5.15", RenewRequest),
            Operation("complete", "§5.15", CompleteRequest),
        )
    }
)
OPS: Final = frozenset(OPERATIONS)
