"""The HTTP gateway (issue 13, docs/HTTP.md): real servers on port 0, real HTTP over TCP.

aiohttp's client, raw sockets where a misbehaving client is the point, and the real ``curl``
for the original routes, as their users drive them. Every route runs the services the TCP
front runs; the cross-front tests check that by registering over one front and invoking over
the other.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from fnclient import AsyncClient

from fnserver.auth import add_token
from fnserver.config import ServerConfig
from fnserver.gateway import STATUS
from fnserver.protocol import ERROR_CLASSES, UnavailableError
from fnserver.server import FnServer

from . import wasm_fixtures as wf
from .conftest import ServerHandle, start_server_process_line

ECHO = wf.echo()


class Gateway:
    """A running server with its gateway, and an HTTP session to it."""

    def __init__(self, server: FnServer, session: aiohttp.ClientSession) -> None:
        self.server = server
        self.session = session
        assert server.http is not None
        self.url = server.http.url

    async def call(self, method: str, path: str, **kw: Any) -> tuple[int, dict[str, str], bytes]:
        async with self.session.request(method, self.url + path, **kw) as r:
            return r.status, dict(r.headers), await r.read()

    async def json(self, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        status, headers, body = await self.call(method, path, **kw)
        assert headers["Content-Type"].startswith("application/json"), (status, body)
        return status, json.loads(body)

    async def register(self, name: str, module: bytes = ECHO, query: str = "", **kw: Any) -> Any:
        status, doc = await self.json("POST", f"/v1/functions/{name}?filename=f.wasm{query}", data=module, **kw)
        assert status == 201, doc
        return doc


async def _gateway(config: ServerConfig) -> AsyncIterator[Gateway]:
    handle = ServerHandle(config)
    server = await handle.start()
    try:
        async with aiohttp.ClientSession() as session:
            yield Gateway(server, session)
    finally:
        await handle.stop()


@pytest.fixture
async def gw(server_config: ServerConfig) -> AsyncIterator[Gateway]:
    async for g in _gateway(replace(server_config, http_port=0)):
        yield g


# -- /v1 -------------------------------------------------------------------------------------------


async def test_v1_register_and_invoke_raw_bytes_with_fn_headers(gw: Gateway) -> None:
    info = await gw.register("echo")
    assert (info["name"], info["version"], info["kind"]) == ("echo", 1, "wasm")
    data = bytes(range(256)) * 8  # not UTF-8: the raw reply carries it byte for byte
    status, headers, body = await gw.call("POST", "/v1/functions/echo/invoke", data=data)
    assert status == 200 and body == data
    assert headers["Content-Type"] == "application/octet-stream"
    assert headers["Fn-Exit-Code"] == "0" and headers["Fn-Version"] == "1"
    assert headers["Fn-Truncated"] == "false" and headers["Fn-Mode"] == "wasm"
    assert headers["Fn-Invocation-Id"].startswith("inv_")
    for key in ("Fn-Duration-Us", "Fn-Queue-Us", "Fn-Wall-Us", "Fn-Stderr-Bytes"):
        assert int(headers[key]) >= 0
    status, doc = await gw.json("POST", "/v1/functions/echo@1/invoke", data=b"hi",
                                headers={"Accept": "application/json"})
    assert status == 200 and doc["output"] == "hi" and doc["exit_code"] == 0 and doc["version"] == 1


async def test_v1_async_invoke_is_202_with_a_url_that_answers(gw: Gateway) -> None:
    await gw.register("echo")
    status, headers, body = await gw.call("POST", "/v1/functions/echo/invoke?async=1", data=b"later")
    doc = json.loads(body)
    assert status == 202 and doc["state"] == "queued"
    assert headers["Location"] == doc["url"] == f"/v1/invocations/{doc['id']}"
    status, call = await gw.json("GET", doc["url"] + "?wait=60")
    assert status == 200 and call["state"] == "done", call
    assert call["result"]["output"] == "later" and call["result"]["exit_code"] == 0


async def test_v1_multipart_register_with_options_and_versions(gw: Gateway) -> None:
    form = aiohttp.FormData()
    form.add_field("alias", "prod")
    form.add_field("timeout_ms", "700")
    form.add_field("env", "GREETING=hi")
    form.add_field("env", "OTHER=x")
    form.add_field("description", "an echo")
    form.add_field("file", ECHO, filename="echo.wasm")
    status, info = await gw.json("POST", "/v1/functions/echo", data=form)
    assert status == 201, info
    assert info["aliases"] == ["prod"] and info["limits"]["timeout_ms"] == 700
    assert info["env"] == ["GREETING", "OTHER"] and info["description"] == "an echo"
    await gw.register("echo")
    status, doc = await gw.json("GET", "/v1/functions/echo")
    assert status == 200 and doc["latest"] == 2 and doc["aliases"] == {"prod": 1}
    assert [v["version"] for v in doc["versions"]] == [1, 2]
    status, doc = await gw.json("GET", "/functions/echo")  # no version: the newest
    assert status == 200 and (doc["id"], doc["number"]) == ("echo@2", 2)
    status, doc = await gw.json("GET", "/v1/functions/echo@prod")
    assert status == 200 and doc["version"] == 1
    status, doc = await gw.json("PUT", "/v1/functions/echo/aliases/prod", json={"version": 2})
    assert status == 200 and (doc["version"], doc["previous"]) == (2, 1)
    status, doc = await gw.json("DELETE", "/v1/functions/echo@1")
    assert status == 200 and doc["deleted"] == [1]
    status, doc = await gw.json("DELETE", "/v1/functions/echo")
    assert status == 200 and doc["deleted"] == [2] and doc["aliases_removed"] == ["prod"]
    status, doc = await gw.json("GET", "/v1/functions")
    assert status == 200 and doc == {"functions": []}


async def test_v1_logs_stats_and_metrics_see_the_calls(gw: Gateway) -> None:
    await gw.register("echo")
    for _ in range(3):
        status, _h, _b = await gw.call("POST", "/v1/functions/echo/invoke", data=b"x")
        assert status == 200
    # Records are written in batches: logs waits for them, by their count.
    records: list[Any] = []
    after = 0
    while len(records) < 3:
        status, doc = await gw.json("GET", f"/v1/functions/echo/logs?after={after}")
        assert status == 200
        records += doc["records"]
        after = doc["last"]
    assert {r["exit_code"] for r in records} == {0} and records[0]["name"] == "echo"
    status, doc = await gw.json("GET", "/v1/functions/echo/stats")
    assert status == 200 and doc["functions"][0]["calls"] == 3
    status, doc = await gw.json("GET", "/v1/stats")
    assert status == 200 and [f["name"] for f in doc["functions"]] == ["echo"]
    status, headers, body = await gw.call("GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert 'fnserver_invocations_total{function="echo",tenant="default",version="1"} 3.0' in body.decode()


async def test_health_and_readiness(gw: Gateway) -> None:
    assert await gw.json("GET", "/healthz") == (200, {"status": "ok"})
    status, doc = await gw.json("GET", "/readyz")
    assert status == 200 and doc["status"] == "ready"
    assert doc["checks"] == {"workers": "ok", "store": "ok", "data_dir": "ok"}


async def test_readiness_says_which_check_failed(server_config: ServerConfig, tmp_path: Path) -> None:
    async for gw in _gateway(replace(server_config, http_port=0)):
        store = gw.server.services.calls.store  # type: ignore[union-attr]
        store._db.close()  # the store's database is gone: it takes no writes now
        status, doc = await gw.json("GET", "/readyz")
        assert status == 503 and doc["status"] == "unready"
        assert doc["checks"]["store"].startswith("the invocation store takes no writes")
        assert doc["checks"]["data_dir"] == "ok" and doc["checks"]["workers"] == "ok"
        # The deep ping of the binary protocol says the same.
        async with AsyncClient(gw.server.address) as client:
            with pytest.raises(UnavailableError, match="store"):
                await client.ping(deep=True)


# -- errors ----------------------------------------------------------------------------------------


def test_every_error_code_has_a_status() -> None:
    assert set(STATUS) == set(ERROR_CLASSES), "docs/HTTP.md's table must name every code"
    table = Path(__file__).parent.parent.joinpath("docs", "HTTP.md").read_text()
    for code, status in STATUS.items():
        assert f"| {code} | {status} " in table, code


async def test_errors_are_json_with_the_status_of_their_code(gw: Gateway) -> None:
    await gw.register("echo")
    await gw.register("loop", wf.infinite_loop(), "&timeout_ms=200")
    await gw.register("trap", wf.wat("(module (memory (export \"memory\") 1) (func (export \"_start\") unreachable))"))
    cases: list[tuple[str, str, dict[str, Any], int, str]] = [
        ("GET", "/v1/functions/nope", {}, 404, "NOT_FOUND"),
        ("GET", "/functions/nope@v1", {}, 404, "NOT_FOUND"),
        ("POST", "/invoke/nope", {"data": {"input": "x"}}, 404, "NOT_FOUND"),
        ("GET", "/v1/functions/Bad%20Name", {}, 400, "INVALID_ARGUMENT"),
        ("POST", "/v1/functions/echo/invoke?timeout_ms=abc", {}, 400, "INVALID_ARGUMENT"),
        ("POST", "/v1/functions/echo/invoke?timeout_ms=999999", {}, 400, "INVALID_ARGUMENT"),
        ("POST", "/v1/functions/bad?filename=bad.wat", {"data": b"(module"}, 422, "BUILD_FAILED"),
        ("POST", "/v1/functions/empty?filename=e.wasm", {"data": b""}, 400, "INVALID_ARGUMENT"),
        ("POST", "/v1/functions/loop/invoke", {}, 504, "TIMEOUT"),
        ("POST", "/v1/functions/trap/invoke", {}, 422, "TRAP"),
        ("GET", "/no/such/route", {}, 404, "NOT_FOUND"),
        ("PATCH", "/v1/functions/echo", {}, 405, "INVALID_ARGUMENT"),
        ("PUT", "/v1/functions/echo/aliases/latest", {"json": {"version": 1}}, 400, "INVALID_ARGUMENT"),
        ("PUT", "/v1/functions/echo/aliases/a", {"data": b"not json"}, 400, "INVALID_ARGUMENT"),
        ("POST", "/functions", {"data": {"name": "x"}}, 400, "INVALID_ARGUMENT"),
    ]
    for method, path, kw, status, code in cases:
        got, doc = await gw.json(method, path, **kw)
        assert (got, doc["code"]) == (status, code), (method, path, doc)
        assert set(doc) == {"code", "message", "details"} and doc["message"]
        assert "/tmp" not in doc["message"] and str(gw.server.config.data_dir) not in json.dumps(doc)
    # Everyone else is still served.
    status, _h, body = await gw.call("POST", "/v1/functions/echo/invoke", data=b"ok")
    assert (status, body) == (200, b"ok")


async def test_uploads_and_inputs_over_their_limits_are_413(server_config: ServerConfig) -> None:
    config = replace(server_config, http_port=0, max_upload=4096, max_frame=64 * 1024)
    async for gw in _gateway(config):
        big = b"\0" * 5000
        status, doc = await gw.json("POST", "/v1/functions/big?filename=b.wasm", data=big)
        assert (status, doc["code"]) == (413, "TOO_LARGE")

        async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: counted as it comes
            for _ in range(5):
                yield b"\0" * 1000

        status, doc = await gw.json("POST", "/v1/functions/big?filename=b.wasm", data=chunked())
        assert (status, doc["code"]) == (413, "TOO_LARGE")
        form = aiohttp.FormData()
        form.add_field("name", "big")
        form.add_field("file", big, filename="b.wasm")
        status, doc = await gw.json("POST", "/functions", data=form)
        assert (status, doc["code"]) == (413, "TOO_LARGE")
        await gw.register("echo")
        status, doc = await gw.json("POST", "/v1/functions/echo/invoke", data=b"x" * (65 * 1024))
        assert (status, doc["code"]) == (413, "TOO_LARGE")
        assert await gw.json("GET", "/v1/functions") == (200, {"functions": [
            {"name": "echo", "tenant": "default", "latest": 1, "versions": [1], "aliases": {},
             "kind": "wasm", "description": ""}]})


# -- tokens, roles, tenants --------------------------------------------------------------------------


async def test_bearer_tokens_roles_and_tenants(server_config: ServerConfig) -> None:
    auth = server_config.data_dir / "auth.toml"
    server_config.data_dir.mkdir(parents=True)
    _, admin = add_token(auth, "default", "admin")
    _, deployer = add_token(auth, "acme", "deployer")
    _, invoker = add_token(auth, "acme", "invoker")
    async for gw in _gateway(replace(server_config, http_port=0)):

        def bearer(token: str) -> dict[str, str]:
            return {"Authorization": f"Bearer {token}"}

        status, headers, body = await gw.call("GET", "/v1/functions")
        assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
        assert json.loads(body)["code"] == "UNAUTHENTICATED"
        status, doc = await gw.json("GET", "/v1/functions", headers=bearer("fn_000000000000_nope"))
        assert (status, doc["code"]) == (401, "UNAUTHENTICATED")
        status, doc = await gw.json("GET", "/v1/functions", headers={"Authorization": "Basic abc"})
        assert (status, doc["code"]) == (401, "UNAUTHENTICATED")
        # Health needs no token; nothing of any tenant shows there.
        assert (await gw.json("GET", "/healthz"))[0] == 200
        status, doc = await gw.json("POST", "/v1/functions/echo?filename=e.wasm", data=ECHO, headers=bearer(invoker))
        assert (status, doc["code"]) == (403, "PERMISSION_DENIED")
        await gw.register("echo", headers=bearer(deployer))
        status, _h, body = await gw.call("POST", "/v1/functions/echo/invoke", data=b"acme", headers=bearer(invoker))
        assert (status, body) == (200, b"acme")
        assert await gw.json("GET", "/v1/whoami", headers=bearer(invoker)) == (
            200, {"tenant": "acme", "role": "invoker", "token_id": invoker.split("_")[1]})
        # The default tenant's admin sees acme's function by its qualified name only.
        status, doc = await gw.json("GET", "/v1/functions/echo", headers=bearer(admin))
        assert (status, doc["code"]) == (404, "NOT_FOUND")
        status, _h, body = await gw.call("POST", "/v1/functions/acme%2Fecho/invoke", data=b"a", headers=bearer(admin))
        assert (status, body) == (200, b"a")
        status, doc = await gw.json("GET", "/v1/functions?all=1", headers=bearer(admin))
        assert [f["name"] for f in doc["functions"]] == ["acme/echo"]
        status, doc = await gw.json("GET", "/v1/functions?all=1", headers=bearer(invoker))
        assert (status, doc["code"]) == (403, "PERMISSION_DENIED")
        # /metrics: a tenant's token sees its own tenant; nobody without a token.
        assert (await gw.call("GET", "/metrics"))[0] == 401
        status, _h, body = await gw.call("GET", "/metrics", headers=bearer(invoker))
        assert status == 200 and b"fnserver_connections" in body


# -- connection limits and deadlines ----------------------------------------------------------------


async def test_http_connections_count_with_tcp_ones_against_the_limits(server_config: ServerConfig) -> None:
    config = replace(server_config, http_port=0, max_connections_per_peer=2)
    async for gw in _gateway(config):
        assert gw.server.http is not None
        port = gw.server.http.port
        async with AsyncClient(gw.server.address) as tcp:
            await tcp.ping()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            assert (await reader.readuntil(b"\r\n")).startswith(b"HTTP/1.1 200")
            # Two are open from this address (one TCP, one HTTP): the third is refused.
            r3, w3 = await asyncio.open_connection("127.0.0.1", port)
            answer = await r3.read()
            assert answer.startswith(b"HTTP/1.1 503") and b"too_many_connections_from_peer" in answer
            w3.close()
            writer.close()
            await writer.wait_closed()
            # A slot came free: served again.
            async with aiohttp.ClientSession() as fresh:
                async with fresh.get(gw.url + "/healthz") as r:
                    assert r.status == 200


async def test_a_client_trickling_its_headers_is_dropped(server_config: ServerConfig) -> None:
    config = replace(server_config, http_port=0, hello_timeout_s=0.5, frame_timeout_s=0.5)
    async for gw in _gateway(config):
        assert gw.server.http is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.server.http.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never ends its headers
        await writer.drain()
        assert await reader.read() == b""  # closed by the server, with nothing said
        writer.close()
        # A silent connection is dropped too; a well-behaved one is served meanwhile.
        silent = socket.create_connection(("127.0.0.1", gw.server.http.port))
        status, _h, _b = await gw.call("GET", "/healthz")
        assert status == 200
        silent.setblocking(False)
        loop = asyncio.get_running_loop()
        assert await loop.sock_recv(silent, 10) == b""
        silent.close()


# -- the original routes, with curl -------------------------------------------------------------------


async def curl(*args: str) -> tuple[int, bytes]:
    """The real curl; its exit status and stdout (the reply body)."""
    assert shutil.which("curl"), "curl is needed for the original routes' tests"
    proc = await asyncio.create_subprocess_exec("curl", "-sS", *args, stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), 300)
    assert proc.returncode is not None
    return proc.returncode, out


async def test_original_routes_with_curl(gw: Gateway, tmp_path: Path) -> None:
    (tmp_path / "echo.wasm").write_bytes(ECHO)
    code, out = await curl("-F", "name=echo", "-F", "version=v1", "-F", f"file=@{tmp_path / 'echo.wasm'}",
                           gw.url + "/functions")
    doc = json.loads(out)
    assert code == 0 and doc["id"] == "echo@v1" and (doc["name"], doc["version"], doc["number"]) == ("echo", "v1", 1)
    code, out = await curl("--data-urlencode", "input=hello wörld & more", gw.url + "/invoke/echo@v1")
    doc = json.loads(out)
    assert doc["Stdout"] == "hello wörld & more" and doc["ExitCode"] == 0 and doc["Stderr"] == ""
    assert isinstance(doc["DurationMs"], float | int)
    code, out = await curl("-F", "input=from a form", gw.url + "/invoke/echo")
    assert json.loads(out)["Stdout"] == "from a form"
    code, out = await curl(gw.url + "/functions")
    listed = json.loads(out)
    assert [v["id"] for v in listed] == ["echo@v1"]
    code, out = await curl(gw.url + "/functions/echo@1")
    assert json.loads(out)["id"] == "echo@v1"
    code, out = await curl("-X", "DELETE", gw.url + "/functions/echo@v1")
    assert json.loads(out)["deleted"] == [1]
    code, out = await curl(gw.url + "/functions")
    assert json.loads(out) == []
    code, out = await curl("-w", "%{http_code}", "-o", "/dev/null", gw.url + "/invoke/echo@v1", "-d", "input=x")
    assert out == b"404"  # the original said 500


async def test_original_register_refuses_a_numeric_label(gw: Gateway) -> None:
    form = aiohttp.FormData()
    form.add_field("name", "echo")
    form.add_field("version", "2")
    form.add_field("file", ECHO, filename="echo.wasm")
    status, doc = await gw.json("POST", "/functions", data=form)
    assert status == 400 and "numbers are given by the server" in doc["message"]
    assert await gw.json("GET", "/functions") == (200, [])


# -- the same services behind both fronts, under the supervisor ------------------------------------------


async def test_supervisor_shares_the_http_port_among_serving_processes(tmp_path: Path) -> None:
    proc, line = await start_server_process_line(tmp_path, "--processes", "2", "--http-port", "0")
    try:
        address = line.split("listening on ")[1].split()[0]
        url = line.split("HTTP gateway on ")[1].split()[0]
        # Registered over TCP, invoked over HTTP, on fresh connections each (the kernel
        # spreads them over both serving processes), and the other way round.
        async with AsyncClient(address) as client:
            await client.register("echo", ECHO, filename="echo.wasm")
            for i in range(8):
                async with aiohttp.ClientSession() as one:
                    async with one.post(f"{url}/v1/functions/echo/invoke", data=str(i).encode()) as r:
                        assert (r.status, await r.read()) == (200, str(i).encode())
            async with aiohttp.ClientSession() as session:
                async with session.post(f"{url}/v1/functions/other?filename=o.wasm", data=ECHO) as r:
                    assert r.status == 201
                async with session.get(f"{url}/readyz") as r:
                    doc = await r.json()
                    assert r.status == 200 and doc["checks"] == {"control": "ok"}, doc
                async with session.get(f"{url}/metrics") as r:  # relayed: the control process's
                    text = await r.text()
                    assert r.status == 200 and "# TYPE fnserver_processes gauge" in text, text
            assert (await client.invoke("other", b"tcp")).output == b"tcp"
    finally:
        proc.terminate()
        assert await proc.wait() == 0


async def test_a_client_that_never_reads_its_reply_is_dropped(server_config: ServerConfig) -> None:
    config = replace(server_config, http_port=0, write_timeout_s=1.0)
    async for gw in _gateway(config):
        assert gw.server.http is not None
        await gw.register("flood", wf.stdout_flood(), "&timeout_ms=2000")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, ("127.0.0.1", gw.server.http.port))
        await loop.sock_sendall(sock, b"POST /v1/functions/flood/invoke HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        http = gw.server.http

        def stuck(front: Any = http) -> list[Any]:
            return [c for c in front.conns if c.transport_ is not None and c.transport_.get_write_buffer_size()]

        async with asyncio.timeout(60):  # bounds only: a hang becomes a failure
            while not stuck():  # its 6 MiB reply waits in the server
                await asyncio.sleep(0.02)
            (victim,) = stuck()
            status, _h, _b = await gw.call("GET", "/healthz")  # everyone else is served
            assert status == 200
            while victim in http.conns:  # until the write deadline drops it
                await asyncio.sleep(0.02)
        assert victim.transport_ is not None and victim.transport_.is_closing()
        sock.close()


ECHO_GO = """package main

import (
	"io"
	"os"
)

func main() {
	data, _ := io.ReadAll(os.Stdin)
	os.Stdout.Write(data)
}
"""


@pytest.mark.slow
async def test_done_when_a_go_echo_with_curl_only(gw: Gateway, tmp_path: Path) -> None:
    """The issue's "done when", as a user of the original platform would do it."""
    (tmp_path / "echo.go").write_text(ECHO_GO)
    code, out = await curl("-F", "name=echo", "-F", "version=v1", "-F", f"file=@{tmp_path / 'echo.go'}",
                           gw.url + "/functions")
    doc = json.loads(out)
    assert code == 0 and doc["id"] == "echo@v1" and doc["kind"] == "go", doc
    code, out = await curl("--data-urlencode", "input=hello", gw.url + "/invoke/echo@v1")
    doc = json.loads(out)
    assert (doc["Stdout"], doc["ExitCode"], doc["Stderr"]) == ("hello", 0, "")
    (tmp_path / "in.bin").write_bytes(b"\x00\xffraw\n")
    code, out = await curl("--data-binary", f"@{tmp_path / 'in.bin'}", gw.url + "/v1/functions/echo/invoke")
    assert out == b"\x00\xffraw\n"
    code, out = await curl("--data-binary", f"@{tmp_path / 'in.bin'}",
                           gw.url + "/v1/functions/echo/invoke?mode=native")
    assert out == b"\x00\xffraw\n"
    code, out = await curl(gw.url + "/functions")
    assert [v["id"] for v in json.loads(out)] == ["echo@v1"]
    code, out = await curl("-X", "DELETE", gw.url + "/functions/echo")
    assert json.loads(out)["deleted"] == [1]
    code, out = await curl(gw.url + "/functions")
    assert json.loads(out) == []


async def test_with_a_certificate_the_gateway_serves_https(server_config: ServerConfig, tmp_path: Path) -> None:
    import ssl

    from .test_tls import Pki

    pki = Pki(tmp_path / "pki")
    config = replace(server_config, http_port=0, tls_cert=pki.cert, tls_key=pki.key)
    handle = ServerHandle(config)
    server = await handle.start()
    try:
        assert server.http is not None and server.http.url.startswith("https://")
        trust = ssl.create_default_context(cafile=str(pki.ca_file))
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trust)) as session:
            async with session.post(f"{server.http.url}/v1/functions/echo?filename=e.wasm", data=ECHO) as r:
                assert r.status == 201
            async with session.post(f"{server.http.url}/v1/functions/echo/invoke", data=b"sealed") as r:
                assert (r.status, await r.read()) == (200, b"sealed")
        # Plain HTTP on the TLS port gets nowhere.
        async with aiohttp.ClientSession() as plain:
            with pytest.raises(aiohttp.ClientError):
                async with plain.get(server.http.url.replace("https://", "http://") + "/healthz") as r:
                    await r.read()
    finally:
        await handle.stop()
