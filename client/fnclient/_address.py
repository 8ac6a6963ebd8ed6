"""Server address parsing: ``host:port``, ``[v6]:port`` or a bare host (port 8080), each
optionally prefixed ``tls://`` (the connection is then TLS)."""

from __future__ import annotations

from typing import Final

from .protocol import InvalidArgumentError

__all__ = ["DEFAULT_PORT", "TLS_SCHEME", "parse_address", "split_scheme"]

DEFAULT_PORT: Final = 8080
TLS_SCHEME: Final = "tls://"


def split_scheme(address: str) -> tuple[bool, str]:
    """``(tls, rest)``: whether ``address`` asks for TLS, and the address without the scheme.
    Any other scheme is refused with a message (``http://`` is not this protocol)."""
    text = address.strip()
    if text.lower().startswith(TLS_SCHEME):
        return True, text[len(TLS_SCHEME) :]
    scheme, sep, _ = text.partition("://")
    if sep:
        raise InvalidArgumentError(
            f"invalid server address {address!r}: '{scheme}://' is not a scheme fnserver speaks;"
            " use HOST:PORT, or tls://HOST:PORT for a server started with --tls-cert"
        )
    return False, text


def parse_address(address: str) -> tuple[str, int]:
    """Split ``address`` into ``(host, port)``; a missing port means :data:`DEFAULT_PORT`
    (a ``tls://`` prefix is allowed and ignored here: see :func:`split_scheme`)."""
    text = split_scheme(address)[1]
    if not text:
        raise InvalidArgumentError("empty server address")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not host:
            raise InvalidArgumentError(f"invalid server address {address!r}: unclosed '['")
        if not rest:
            return host, DEFAULT_PORT
        if not rest.startswith(":"):
            raise InvalidArgumentError(f"invalid server address {address!r}")
        return host, _port(rest[1:], address)
    if text.count(":") > 1:
        # An unbracketed IPv6 literal cannot carry a port: the last group would be ambiguous.
        return text, DEFAULT_PORT
    host, sep, port = text.partition(":")
    if not host:
        raise InvalidArgumentError(f"invalid server address {address!r}: missing host")
    return host, _port(port, address) if sep else DEFAULT_PORT


def _port(text: str, address: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise InvalidArgumentError(f"invalid port in server address {address!r}")
    return int(text)
