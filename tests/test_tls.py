"""TLS on the public port (issue 11): a CA made at test time (trustme), real servers, the real
client and CLI. Certificates verified against the CA, refused without it; plain and TLS peers
that do not match fail cleanly while others are served; a connection that never handshakes
is dropped at the HELLO deadline; bad flags stop the start with a message.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path

import pytest
import trustme
from fnclient import AsyncClient, UnavailableError

from tests import wasm_fixtures as wasm
from tests.conftest import ServerHandle, ServerProcess, run_fn, start_server_process


class Pki:
    """A test CA and a server certificate for 127.0.0.1 and localhost, as PEM files."""

    def __init__(self, root: Path) -> None:
        self.ca = trustme.CA()
        cert = self.ca.issue_cert("127.0.0.1", "localhost")
        root.mkdir(exist_ok=True)
        self.ca_file = root / "ca.pem"
        self.cert = root / "server.pem"
        self.key = root / "server.key"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        cert.cert_chain_pems[0].write_to_path(str(self.cert))
        for extra in cert.cert_chain_pems[1:]:
            extra.write_to_path(str(self.cert), append=True)
        cert.private_key_pem.write_to_path(str(self.key))


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


@pytest.fixture
async def tls_handle(handle: ServerHandle, pki: Pki) -> ServerHandle:
    await handle.stop()
    await handle.start(tls_cert=pki.cert, tls_key=pki.key, hello_timeout_s=2.0)
    return handle


async def test_a_client_with_the_ca_registers_and_invokes(tls_handle: ServerHandle, pki: Pki) -> None:
    async with AsyncClient(f"tls://{tls_handle.address}", ca_file=pki.ca_file) as c:
        await c.ping()
        await c.register("echo", wasm.echo(), filename="e.wasm")
        assert (await c.invoke("echo", b"over tls")).output == b"over tls"
        big = bytes(range(256)) * 8192  # 2 MiB: many TLS records each way
        assert (await c.invoke("echo", big)).output == big


async def test_the_cli_with_ca_file_and_fn_ca_file(tls_handle: ServerHandle, pki: Pki) -> None:
    address = f"tls://{tls_handle.address}"
    code, out, err = await run_fn(address, "ping", "--ca-file", str(pki.ca_file))
    assert code == 0, err
    assert b"pong" in out
    code, out, err = await run_fn(address, "whoami", env={"FN_CA_FILE": str(pki.ca_file)})
    assert code == 0, err
    code, _, err = await run_fn(address, "ping")  # the system's roots do not know the test CA
    assert code == 125
    assert b"certificate could not be verified" in err and b"--ca-file" in err


async def test_mismatched_peers_fail_cleanly_and_others_are_served(tls_handle: ServerHandle, pki: Pki) -> None:
    # A TLS client that does not trust the certificate.
    with pytest.raises(UnavailableError, match="certificate could not be verified") as caught:
        async with AsyncClient(f"tls://{tls_handle.address}") as c:
            await c.ping()
    assert caught.value.details == {"reason": "certificate"}
    # A plain client on the TLS port.
    with pytest.raises(UnavailableError):
        async with AsyncClient(tls_handle.address, connect_timeout=5.0) as c:
            await c.ping()
    async with AsyncClient(f"tls://{tls_handle.address}", ca_file=pki.ca_file) as c:
        await c.ping()
    # And the other way round: a TLS client on a plain port.
    await tls_handle.stop()
    await tls_handle.start(tls_cert=None, tls_key=None)
    with pytest.raises(UnavailableError, match="TLS handshake failed"):
        async with AsyncClient(f"tls://{tls_handle.address}", ca_file=pki.ca_file) as c:
            await c.ping()
    async with AsyncClient(tls_handle.address) as c:
        await c.ping()


async def test_a_connection_that_never_handshakes_is_dropped(tls_handle: ServerHandle, pki: Pki) -> None:
    host, port = tls_handle.address.rsplit(":", 1)
    loop = asyncio.get_running_loop()
    with socket.create_connection((host, int(port))) as raw:
        raw.setblocking(False)
        # Nothing sent: the server closes the connection at the handshake deadline.
        data = await asyncio.wait_for(loop.sock_recv(raw, 1024), 120)
        assert data == b""
    async with AsyncClient(f"tls://{tls_handle.address}", ca_file=pki.ca_file) as c:
        await c.ping()


async def test_other_schemes_are_refused_with_a_hint() -> None:
    from fnclient import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="tls://HOST:PORT"):
        AsyncClient("http://127.0.0.1:8080")


async def test_the_supervisor_serves_tls(tmp_path: Path, pki: Pki) -> None:
    proc, address = await start_server_process(
        tmp_path, "--processes", "2", "--tls-cert", str(pki.cert), "--tls-key", str(pki.key)
    )
    server = ServerProcess(proc, address)
    try:
        clients = [AsyncClient(f"tls://{address}", ca_file=pki.ca_file) for _ in range(4)]
        await clients[0].register("echo", wasm.echo(), filename="e.wasm")
        for c in clients:
            assert (await c.invoke("echo", b"hi")).output == b"hi"
            await c.close()
    finally:
        assert await server.stop() == 0


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--tls-cert", "CERT"], "--tls-key is missing"),
        (["--tls-key", "KEY"], "--tls-cert is missing"),
        (["--tls-cert", "NOPE", "--tls-key", "KEY"], "--tls-cert: no such file"),
        (["--tls-cert", "CERT", "--tls-key", "CA"], "matching"),
    ],
)
async def test_bad_tls_flags_stop_the_start(tmp_path: Path, pki: Pki, flags: list[str], says: str) -> None:
    paths = {"CERT": str(pki.cert), "KEY": str(pki.key), "CA": str(pki.ca_file), "NOPE": str(tmp_path / "nope.pem")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fnserver", "--port", "0", "--data-dir", str(tmp_path / "data"), "--no-warm",
        *[paths.get(f, f) for f in flags],
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 2
    assert says in err.decode() and "Traceback" not in err.decode()
