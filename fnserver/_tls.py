"""TLS on the public port (``--tls-cert``/``--tls-key``; docs/OPERATIONS.md "TLS").

The context is made before a serving process gives up root (the key may be readable by root
only) and handed to the TCP front, which hands it to the event loop's server with the HELLO
deadline as the handshake deadline: a client that opens a connection and never completes the
handshake is dropped like one that never sends HELLO. Inside TLS the framing is unchanged.
"""

from __future__ import annotations

import ssl

from .config import ServerConfig

__all__ = ["TlsConfigError", "server_context"]


class TlsConfigError(ValueError):
    """The TLS flags cannot be used; the message names the flag and what is wrong."""


def server_context(config: ServerConfig) -> ssl.SSLContext | None:
    """The server's TLS context, or None without ``--tls-cert``; TlsConfigError if unusable."""
    cert, key = config.tls_cert, config.tls_key
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        missing = "--tls-cert" if cert is None else "--tls-key"
        raise TlsConfigError(f"{missing} is missing: --tls-cert and --tls-key go together")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(certfile=cert, keyfile=key)
    except FileNotFoundError:
        flag, path = ("--tls-cert", cert) if not cert.exists() else ("--tls-key", key)
        raise TlsConfigError(f"{flag}: no such file: {path}") from None
    except PermissionError as exc:
        raise TlsConfigError(f"--tls-cert/--tls-key: cannot read {exc.filename}: permission denied") from None
    except ssl.SSLError as exc:
        raise TlsConfigError(
            f"--tls-cert {cert} / --tls-key {key}: not a PEM certificate chain and its matching"
            f" private key ({exc.reason or exc})"
        ) from None
    return ctx
