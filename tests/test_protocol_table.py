"""One table of operations: the spec, the codec's table, the server's dispatch and the client
must name the same operations (issue 7: an op in one and not the other used to raise KeyError
out of ``data_received``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fnclient import AsyncClient
from hypothesis import given
from hypothesis import strategies as st

from fnserver.protocol import (
    OPERATIONS,
    AliasRequest,
    DeleteRequest,
    FunctionLimits,
    GetRequest,
    HelloRequest,
    InvalidArgumentError,
    InvokeRequest,
    InvokeResult,
    ListRequest,
    PingRequest,
    RegisterOptions,
    RegisterRequest,
    RenewRequest,
    UploadChunk,
    VersionInfo,
)
from fnserver.transport import DISPATCHED_OPS

SPEC = Path(__file__).resolve().parent.parent / "docs" / "PROTOCOL.md"
#: Operations the client performs without a method of the same name.
CLIENT_IMPLICIT = {
    "hello": "connect",
    "upload": "register",
    # Internal (§5.15): a serving process sends them as typed records through request().
    "report": "request",
    "claim": "request",
    "renew": "request",
    "complete": "request",
}


def spec_sections() -> dict[str, str]:
    """``op -> §N`` from the headings of PROTOCOL.md (``### §5.4 `list` ``)."""
    text = SPEC.read_text()
    found: dict[str, str] = {}
    for section, ops in re.findall(r"^#{2,3} (§[0-9.]+) (.+)$", text, re.M):
        for op in re.findall(r"`([a-z]+)`", ops):
            found[op] = section
        if "HELLO" in ops:
            found["hello"] = section
    return found


def test_spec_table_server_and_client_agree() -> None:
    assert set(spec_sections()) == set(OPERATIONS)
    assert {op: o.section for op, o in OPERATIONS.items()} == spec_sections()
    assert DISPATCHED_OPS == set(OPERATIONS)
    for op in OPERATIONS:
        method = CLIENT_IMPLICIT.get(op, op)
        assert callable(getattr(AsyncClient, method, None)), f"AsyncClient has no {method}()"


def test_every_request_record_names_its_operation() -> None:
    for name, op in OPERATIONS.items():
        assert op.request.op == name


REQUESTS = [
    HelloRequest(1, "t", "c"),
    PingRequest(),
    RegisterRequest("echo", "echo.go", 10, "a" * 64, RegisterOptions(timeout_ms=5, alias="prod", fuel=9)),
    UploadChunk(b"\x00\x01"),
    ListRequest(),
    GetRequest("echo", 3, 10, 2, True),
    DeleteRequest("echo", None),
    DeleteRequest("echo", 4),
    AliasRequest("echo", "prod", 2),
    InvokeRequest("echo", "prod", b"hi", ("a", "b"), 100, "native"),
    InvokeRequest("echo"),
    RenewRequest(("inv_" + "0" * 24, "inv_" + "f" * 24)),
]


@pytest.mark.parametrize("req", REQUESTS, ids=lambda r: type(r).__name__)
def test_requests_round_trip(req: object) -> None:
    assert type(req).from_wire(req.to_wire()) == req  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("record", "body", "field"),
    [
        (InvokeRequest, {"name": "echo", "input": "text"}, "input"),
        (InvokeRequest, {"name": "echo", "args": "a"}, "args"),
        (InvokeRequest, {"name": "echo", "mode": "jit"}, "mode"),
        (InvokeRequest, {"name": "echo", "timeout_ms": True}, "timeout_ms"),
        (InvokeRequest, {"name": "Bad"}, "name"),
        (RegisterRequest, {"name": "e", "filename": "", "size": 1, "sha256": "a" * 64}, "filename"),
        (RegisterRequest, {"name": "e", "filename": "f", "size": 0, "sha256": "a" * 64}, "size"),
        (RegisterRequest, {"name": "e", "filename": "f", "size": 1, "sha256": "A" * 64}, "sha256"),
        (RegisterRequest, {"name": "e", "filename": "f", "size": 1, "sha256": "a" * 64, "options": []}, "options"),
        (RegisterRequest, {"name": "e", "filename": "f", "size": 1, "sha256": "a" * 64, "options": {"alias": "latest"}}, "latest"),
        (AliasRequest, {"name": "e", "alias": "prod"}, "version"),
        (GetRequest, {"name": "e", "limit": 1000}, "limit"),
        (GetRequest, {"name": "e", "log": 1}, "log"),
        (UploadChunk, {"data": "text"}, "data"),
        (RenewRequest, {"invocations": "inv_"}, "invocations"),
        (RenewRequest, {"invocations": ["inv_1"]}, "invocation id"),
    ],
)
def test_bad_fields_name_the_field(record: type, body: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgumentError, match=field):
        record.from_wire(body)  # type: ignore[attr-defined]


def test_hello_protocol_must_be_an_integer() -> None:
    assert HelloRequest.from_wire({"protocol": True}).protocol == -1
    assert HelloRequest.from_wire({"protocol": 1.0}).protocol == -1
    assert HelloRequest.from_wire({"protocol": 1}).protocol == 1


def test_version_info_reads_old_metadata_with_defaults() -> None:
    old = {"name": "echo", "version": 2, "kind": "go", "artifacts": ["wasm", "native"], "mode": "wasm"}
    info = VersionInfo.from_wire(old, timeout_ms=700, memory_mb=64)
    assert info.limits == FunctionLimits(700, 64)
    assert info.artifact_sha256 == {}
    assert info.to_wire()["artifacts"] == ["wasm", "native"]
    assert "build_log" not in VersionInfo.from_wire({**old, "build_log": "x"}).to_wire(log=False)


@given(
    output=st.binary(max_size=64),
    stderr=st.binary(max_size=64),
    exit_code=st.integers(-(2**31), 2**31),
    duration=st.integers(0, 2**40),
    truncated=st.booleans(),
)
def test_invoke_result_round_trips(output: bytes, stderr: bytes, exit_code: int, duration: int, truncated: bool) -> None:
    res = InvokeResult(output, stderr, exit_code, duration, 3, truncated, 1, 2, 4, "native")
    assert InvokeResult.from_wire(res.to_wire()) == res


def test_the_package_exports_every_public_record_and_error() -> None:
    # The package's __all__ is a literal (type checkers cannot follow a computed one): it must
    # still name everything its modules export.
    import fnclient.protocol as package
    from fnclient.protocol import _records, errors

    assert set(_records.__all__) | set(errors.__all__) <= set(package.__all__)
