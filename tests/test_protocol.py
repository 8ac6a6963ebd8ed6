"""Pure codec tests: whole input, byte by byte, and a hypothesis property (STYLE.md §6)."""

from __future__ import annotations

import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fnserver.protocol import (
    ERROR_CLASSES,
    FnError,
    FrameDecoder,
    FunctionTimeoutError,
    InvalidArgumentError,
    InvokeResult,
    NotFoundError,
    ProtocolError,
    TooLargeError,
    check_alias,
    check_name,
    encode_error,
    encode_event,
    encode_frame,
    encode_request,
    encode_response,
    error_from_wire,
    parse_request,
    parse_version_ref,
)

HELLO_BYTES = bytes.fromhex(
    "0000002c85a474797065a772657175657374a26f70a568656c6c6fa26964"
    "00a870726f746f636f6c01a5746f6b656ec0"
)
INVOKE_BYTES = bytes.fromhex(
    "0000003085a474797065a772657175657374a26f70a6696e766f6b65a26964"
    "07a46e616d65a46563686fa5696e707574c4026869"
)


def test_hello_bytes_match_protocol_md() -> None:
    # docs/PROTOCOL.md §8 shows these exact bytes; the spec and the code must agree.
    assert encode_request("hello", 0, protocol=1, token=None) == HELLO_BYTES
    assert encode_request("invoke", 7, name="echo", input=b"hi") == INVOKE_BYTES


def test_examples_in_protocol_md_decode() -> None:
    from pathlib import Path

    text = (Path(__file__).parent.parent / "docs" / "PROTOCOL.md").read_text()
    blocks = text.split("## §8")[1].split("```")[1::2]
    assert len(blocks) == 5
    for block in blocks:
        raw = bytes.fromhex(block.replace("\n", " "))
        dec = FrameDecoder()
        dec.feed(raw)
        frame = dec.next_frame()
        assert frame is not None and frame["type"] in {"request", "response", "error"}
        assert dec.buffered == 0


def test_length_prefix_is_big_endian_and_body_is_msgpack() -> None:
    frame = encode_frame({"a": b"\x00\x01"})
    (length,) = struct.unpack(">I", frame[:4])
    assert length == len(frame) - 4
    assert msgpack.unpackb(frame[4:]) == {"a": b"\x00\x01"}


def _frames() -> list[bytes]:
    return [
        encode_request("ping", 1),
        encode_request("invoke", 2, name="echo", input=b"\x00" * 300, args=["a", "b"]),
        encode_response(2, {"output": b"xyz", "exit_code": 0}),
        encode_error(3, NotFoundError("gone", {"name": "x"})),
        encode_event(4, "progress", stage="upload", received=10, size=20),
    ]


def test_whole_input_then_byte_by_byte() -> None:
    frames = _frames()
    stream = b"".join(frames)
    whole = FrameDecoder()
    whole.feed(stream)
    got_whole = whole.frames()
    assert len(got_whole) == len(frames)

    one = FrameDecoder()
    got_bytes = []
    for i in range(len(stream)):
        one.feed(stream[i : i + 1])
        got_bytes.extend(one.frames())
    assert got_bytes == got_whole
    assert got_whole[1]["input"] == b"\x00" * 300
    assert got_whole[3]["error"] == {"code": "NOT_FOUND", "message": "gone", "details": {"name": "x"}}


def test_oversized_prefix_rejected_before_body() -> None:
    dec = FrameDecoder(max_frame=1024)
    dec.feed(struct.pack(">I", 1025))  # no body at all: the prefix alone must be refused
    with pytest.raises(TooLargeError):
        dec.next_frame()
    with pytest.raises(TooLargeError):  # the decoder stays broken
        dec.feed(b"x")


def test_frame_at_the_limit_is_accepted() -> None:
    body = msgpack.packb({"d": b"x" * 100})
    dec = FrameDecoder(max_frame=len(body))
    dec.feed(struct.pack(">I", len(body)) + body)
    assert dec.next_frame() == {"d": b"x" * 100}


@pytest.mark.parametrize(
    "raw",
    [
        b"\x00\x00\x00\x00",  # empty body
        b"\x00\x00\x00\x01\xc1",  # 0xc1 is never valid msgpack
        b"\x00\x00\x00\x01\x01",  # an int, not a map
        b"\x00\x00\x00\x02\x91\x01",  # an array
        b"\x00\x00\x00\x03\x81\x01\x02",  # int map key
        b"\x00\x00\x00\x03\xd4\x01\x01",  # ext type
        b"\x00\x00\x00\x02\x82\xa1",  # truncated inside the body
    ],
)
def test_malformed_bodies_raise_protocol_error(raw: bytes) -> None:
    dec = FrameDecoder()
    dec.feed(raw)
    with pytest.raises(ProtocolError):
        dec.next_frame()


def test_need_data_returns_none() -> None:
    dec = FrameDecoder()
    assert dec.next_frame() is None
    dec.feed(b"\x00\x00")
    assert dec.next_frame() is None
    dec.feed(b"\x00\x05")
    assert dec.next_frame() is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512), st.integers(min_value=1, max_value=64))
def test_any_bytes_yield_frames_or_protocol_error(data: bytes, step: int) -> None:
    dec = FrameDecoder(max_frame=256)
    try:
        for i in range(0, len(data), step):
            dec.feed(data[i : i + step])
            for frame in dec.frames():
                assert isinstance(frame, dict)
    except (ProtocolError, TooLargeError):
        pass


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.text(max_size=10),
        st.one_of(st.binary(max_size=50), st.integers(-(2**63), 2**63 - 1), st.text(max_size=20), st.none()),
        max_size=8,
    ),
    st.integers(min_value=1, max_value=17),
)
def test_roundtrip_any_map(body: dict[str, object], step: int) -> None:
    raw = encode_frame(body) * 2
    dec = FrameDecoder()
    out = []
    for i in range(0, len(raw), step):
        dec.feed(raw[i : i + step])
        out.extend(dec.frames())
    assert out == [body, body]


def test_parse_request_envelope() -> None:
    assert parse_request({"type": "request", "op": "ping", "id": 5})[:2] == ("ping", 5)
    with pytest.raises(ProtocolError):
        parse_request({"type": "response", "op": "ping", "id": 5})
    with pytest.raises(ProtocolError):
        parse_request({"type": "request", "op": "ping", "id": "5"})
    with pytest.raises(ProtocolError):
        parse_request({"type": "request", "op": "ping", "id": True})
    with pytest.raises(InvalidArgumentError):
        parse_request({"type": "request", "op": "explode", "id": 5})


@pytest.mark.parametrize("name", ["a", "hello", "0x", "a-b_c", "x" * 63])
def test_valid_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "A", "-a", "_a", "x" * 64, "../x", "a/b/c", "a+b", "/b", "a/", "a.b", ".hidden", None, 3])
def test_invalid_names(name: object) -> None:
    with pytest.raises(InvalidArgumentError):
        check_name(name)


def test_aliases_and_version_refs() -> None:
    assert check_alias("prod") == "prod"
    for bad in ("latest", "1", "Prod", ""):
        with pytest.raises(InvalidArgumentError):
            check_alias(bad)
    assert parse_version_ref(None) is None
    assert parse_version_ref("latest") is None
    assert parse_version_ref(3) == 3
    assert parse_version_ref("3") == 3
    assert parse_version_ref("prod") == "prod"
    for bad in (0, -1, True, "a b", 1.5):
        with pytest.raises(InvalidArgumentError):
            parse_version_ref(bad)


def test_error_classes_rebuilt_from_codes() -> None:
    for code, cls in ERROR_CLASSES.items():
        err = error_from_wire(code, "m", {"k": 1})
        assert type(err) is cls and err.code == code and err.details == {"k": 1}
    assert isinstance(error_from_wire("TIMEOUT", "t"), TimeoutError)
    assert isinstance(error_from_wire("TIMEOUT", "t"), FunctionTimeoutError)
    assert isinstance(error_from_wire("INVALID_ARGUMENT", "v"), ValueError)
    unknown = error_from_wire("SOMETHING_NEW", "x")
    assert type(unknown) is FnError and unknown.code == "SOMETHING_NEW"


@pytest.mark.parametrize(
    "bad",
    [{"output": 2**31}, {"stderr": "text"}, {"exit_code": "x"}, {"duration_us": 1.5},
     {"version": True}, {"wall_us": 2**70}, {"mode": 3}],
    ids=lambda m: next(iter(m)),
)
def test_a_malformed_invoke_result_is_a_protocol_error(bad: dict[str, object]) -> None:
    """A hostile or broken server cannot make the client allocate ``bytes(2**31)`` or raise
    anything but the protocol's own error (found by bench/fuzz_protocol.py's review)."""
    with pytest.raises(ProtocolError):
        InvokeResult.from_wire(bad)
