"""Server address parsing: ``host:port``, ``[v6]:port`` or a bare host (port 8080), each
optionally prefixed ``tls://`` (the connection is then TLS); several nodes of one deployment
are a comma-separated list of those (``h1:8080,tls://h2:8080``) or a sequence of them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from .protocol import InvalidArgumentError

__all__ = ["DEFAULT_PORT", "TLS_SCHEME", "parse_address", "parse_addresses", "split_scheme"]

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


def parse_addresses(addresses: str | Sequence[str]) -> tuple[str, ...]:
    """The node addresses in ``addresses``: one address, a comma-separated list of them, or a
    sequence (each item may itself be a comma-separated list). Each is checked with
    :func:`parse_address` and returned stripped, in the order given; an empty list, or an empty
    item in one (``"a:1,,b:2"``), is an :class:`InvalidArgumentError`."""
    if isinstance(addresses, str):
        items: Sequence[str] = [addresses]
    elif isinstance(addresses, Sequence):
        items = addresses
    else:
        raise InvalidArgumentError(
            f"server addresses must be a string or a list of strings, not {type(addresses).__name__}"
        )
    parts: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise InvalidArgumentError(f"a server address must be a string, not {item!r}")
        parts.extend(item.split(","))
    if not parts:
        raise InvalidArgumentError("no server address given")
    if len(parts) == 1:
        parse_address(parts[0])  # a single address keeps its own messages
        return (parts[0].strip(),)
    listed = ",".join(items)
    result: list[str] = []
    for position, part in enumerate(parts, 1):
        if not part.strip():
            raise InvalidArgumentError(
                f"invalid server address list {listed!r}: address {position} of {len(parts)} is"
                " empty; separate HOST:PORT addresses with single commas"
            )
        parse_address(part)
        result.append(part.strip())
    return tuple(result)


def _port(text: str, address: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise InvalidArgumentError(f"invalid port in server address {address!r}")
    return int(text)
