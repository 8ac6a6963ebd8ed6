"""Length-prefixed msgpack frames (docs/PROTOCOL.md §2). Pure: bytes in, frames out."""

from __future__ import annotations

import struct
from typing import Any, Final

import msgpack

from .errors import ProtocolError, TooLargeError

__all__ = ["DEFAULT_MAX_FRAME", "HEADER_SIZE", "FrameDecoder", "encode_frame"]

HEADER_SIZE: Final = 4
#: Largest body accepted unless HELLO negotiated otherwise (§2). Big enough for a 6 MiB output
#: plus its stderr and envelope.
DEFAULT_MAX_FRAME: Final = 8 * 1024 * 1024
_HEADER = struct.Struct(">I")


def encode_frame(body: dict[str, Any], max_frame: int | None = None) -> bytes:
    """Encode one frame: 4-byte big-endian length, then the msgpack body.

    With ``max_frame``, a body over it raises :class:`TooLargeError` instead of producing a
    frame the peer must refuse (§2: no side ever sends a frame over the negotiated maximum).
    """
    payload = msgpack.packb(body, use_bin_type=True)
    if max_frame is not None and len(payload) > max_frame:
        raise TooLargeError(
            f"reply of {len(payload)} bytes is over the frame limit of {max_frame} bytes",
            {"max_frame": max_frame, "length": len(payload)},
        )
    return _HEADER.pack(len(payload)) + payload


class FrameDecoder:
    """Incremental frame parser in the style of h11: ``feed`` bytes, then ``next_frame``.

    ``next_frame`` returns the next decoded body (a dict) or ``None`` when more bytes are
    needed. The length prefix is checked against ``max_frame`` before any of the body is
    buffered, so a hostile prefix costs nothing. Every malformed input raises
    :class:`ProtocolError` (or :class:`TooLargeError` for an oversized prefix); after an error
    the decoder is unusable, as the connection must be closed.
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._need: int | None = None  # body length of the frame being read
        self._broken: ProtocolError | TooLargeError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return len(self._buf)

    @property
    def frame_length(self) -> int | None:
        """Body length of the frame being read, once its length prefix has arrived."""
        return self._need

    def feed(self, data: bytes) -> None:
        """Append received bytes."""
        if self._broken is not None:
            raise self._broken
        self._buf += data

    def next_frame(self) -> dict[str, Any] | None:
        """Return the next complete frame body, or ``None`` if more data is needed."""
        if self._broken is not None:
            raise self._broken
        if self._need is None:
            if len(self._buf) < HEADER_SIZE:
                return None
            (length,) = _HEADER.unpack_from(self._buf)
            if length > self.max_frame:
                self._fail(
                    TooLargeError(
                        f"frame of {length} bytes is over the maximum of {self.max_frame}",
                        {"max_frame": self.max_frame, "length": length},
                    )
                )
            if length == 0:
                self._fail(ProtocolError("empty frame: a frame body must be a msgpack map"))
            self._need = length
            del self._buf[:HEADER_SIZE]
        if len(self._buf) < self._need:
            return None
        body = bytes(self._buf[: self._need])
        del self._buf[: self._need]
        self._need = None
        return self._decode(body)

    def frames(self) -> list[dict[str, Any]]:
        """Every complete frame currently buffered."""
        out: list[dict[str, Any]] = []
        while (frame := self.next_frame()) is not None:
            out.append(frame)
        return out

    def _decode(self, body: bytes) -> dict[str, Any]:
        limit = self.max_frame
        try:
            obj = msgpack.unpackb(
                body,
                raw=False,
                strict_map_key=True,
                use_list=True,
                max_bin_len=limit,
                max_str_len=limit,
                max_array_len=min(limit, 1 << 16),
                max_map_len=min(limit, 1 << 12),
                max_ext_len=0,
            )
        except Exception as exc:  # msgpack raises several unrelated classes
            self._fail(ProtocolError(f"frame body is not valid msgpack: {exc}"), exc)
        if not isinstance(obj, dict):
            self._fail(ProtocolError(f"frame body must be a msgpack map, got {type(obj).__name__}"))
        return obj

    def _fail(self, err: ProtocolError | TooLargeError, cause: BaseException | None = None) -> Any:
        self._broken = err
        raise err from cause
