"""The ``fn`` command line as a new user meets it (issue 12 item 6): real ``fn`` processes
against real servers, on a pseudo-terminal where the behaviour depends on one."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from fnclient import AsyncClient

from .conftest import ServerHandle, run_fn
from .wasm_fixtures import wat

BINARY = wat(
    """
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 100) "\\00\\ff\\fe binary")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 100))
    (i32.store (i32.const 4) (i32.const 10))
    (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
"""
)


class Terminal:
    """``fn`` on a pseudo-terminal: what it prints, and keys typed into it."""

    def __init__(self, *args: str, address: str) -> None:
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fnclient.cli", *args],
            stdin=slave, stdout=slave, stderr=slave, close_fds=True, start_new_session=True,
            env={**os.environ, "FN_SERVER": address},
        )
        os.close(slave)
        self.seen = b""

    def read_until(self, text: bytes) -> bytes:
        """Read what the terminal shows until ``text`` appears (or the program ends)."""
        while text not in self.seen:
            try:
                chunk = os.read(self.master, 4096)
            except OSError:  # EIO: the program ended and closed the terminal
                break
            if not chunk:
                break
            self.seen += chunk
        return self.seen

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def wait(self) -> int:
        code = self.proc.wait(timeout=120)
        self.read_until(b"\0never")
        os.close(self.master)
        return code


async def test_fn_new_and_register_a_directory(handle: ServerHandle, tmp_path: Path) -> None:
    os.chdir(tmp_path)
    code, out, err = await run_fn(handle.address, "new", "hello", "--lang", "wat")
    assert code == 0, err
    assert (tmp_path / "hello" / "main.wat").is_file() and (tmp_path / "hello" / "README.md").is_file()
    assert b"fn register hello hello" in out
    code, out, err = await run_fn(handle.address, "register", "hello", "hello")
    assert code == 0, err
    assert b"registered hello version 1 (wat" in out and b"its one source file, main.wat" in err
    code, out, err = await run_fn(handle.address, "invoke", "hello", "--input", "world")
    assert (code, out) == (0, b"hello, world\n"), err
    # Not over an existing directory; nor from a folder that holds two sources.
    code, _out, err = await run_fn(handle.address, "new", "hello", "--lang", "c")
    assert code == 2 and b"not empty" in err
    (tmp_path / "hello" / "other.c").write_text("int main(void){return 0;}\n")
    code, _out, err = await run_fn(handle.address, "register", "hello", "hello")
    assert code == 2 and b"main.wat, other.c" in err


@pytest.mark.slow
async def test_fn_new_go_registers_as_a_module(handle: ServerHandle, tmp_path: Path) -> None:
    os.chdir(tmp_path)
    assert (await run_fn(handle.address, "new", "hello", "--lang", "go"))[0] == 0
    code, out, err = await run_fn(handle.address, "register", "hello", "hello")
    assert code == 0, err
    assert b"(go-module, wasm+native" in out and b"a Go module, zipped" in err
    code, out, err = await run_fn(handle.address, "invoke", "hello", "--input", "world")
    assert (code, out) == (0, b"hello, world\n"), err


async def test_delete_of_a_whole_function_asks_or_needs_yes(handle: ServerHandle, tmp_path: Path) -> None:
    async with AsyncClient(handle.address) as c:
        for _ in range(2):
            await c.register("twice", BINARY, filename="b.wasm")
    code, _out, err = await run_fn(handle.address, "delete", "twice")
    assert code == 2 and b"--yes" in err
    term = Terminal("delete", "twice", address=handle.address)
    await asyncio.to_thread(term.read_until, b"[y/N]")
    term.type(b"n\n")
    assert await asyncio.to_thread(term.wait) == 1
    async with AsyncClient(handle.address) as c:
        assert [v["version"] for v in (await c.get("twice"))["versions"]] == [1, 2]
    term = Terminal("delete", "twice", address=handle.address)
    await asyncio.to_thread(term.read_until, b"[y/N]")
    term.type(b"y\n")
    assert await asyncio.to_thread(term.wait) == 0
    assert b"deleted twice versions 1, 2" in term.seen
    async with AsyncClient(handle.address) as c:
        await c.register("again", BINARY, filename="b.wasm")
    code, out, err = await run_fn(handle.address, "delete", "again", "--yes")
    assert code == 0 and b"deleted again version 1" in out, err


async def test_invoke_reading_a_terminal_says_so_and_ctrl_c_ends_it(handle: ServerHandle) -> None:
    async with AsyncClient(handle.address) as c:
        await c.register("bin", BINARY, filename="b.wasm")
    term = Terminal("invoke", "bin", address=handle.address)
    await asyncio.to_thread(term.read_until, b"Ctrl-D")
    assert b"reading the input from the terminal" in term.seen
    term.proc.send_signal(signal.SIGINT)
    assert await asyncio.to_thread(term.wait) == 130
    assert b"Traceback" not in term.seen
    # Ctrl-D ends the input instead: the call runs.
    term = Terminal("invoke", "bin", address=handle.address)
    await asyncio.to_thread(term.read_until, b"Ctrl-D")
    term.type(b"\x04")
    assert await asyncio.to_thread(term.wait) == 0
    assert b"binary" in term.seen


async def test_json_keeps_binary_output(handle: ServerHandle) -> None:
    async with AsyncClient(handle.address) as c:
        await c.register("bin", BINARY, filename="b.wasm")
    code, out, err = await run_fn(handle.address, "invoke", "bin", "--input", "", "--json")
    assert code == 0, err
    doc = json.loads(out)
    import base64

    assert "output" not in doc and base64.b64decode(doc["output_base64"]) == b"\0\xff\xfe binary"
    assert doc["stderr"] == ""


async def test_ping_and_addresses_that_are_not_fnserver(handle: ServerHandle) -> None:
    code, out, err = await run_fn(handle.address, "ping", "--count", "3")
    assert code == 0, err
    assert b"pong from fnserver" in out and b"median" in out and b" ms over 3" in out
    code, _out, err = await run_fn("http://" + handle.address, "ping")
    assert code == 2 and b"'http://' is not a scheme fnserver speaks" in err
    assert b"tls://HOST:PORT" in err

    async def http_like(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(http_like, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        code, _out, err = await run_fn(f"127.0.0.1:{port}", "ping")
    finally:
        server.close()
        await server.wait_closed()
    assert code == 125
    assert b"does not speak the fnserver protocol" in err and b"HTTP server" in err
    assert b"TOO_LARGE" not in err


async def test_register_help_lists_the_kinds() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fnclient.cli", "register", "--help", stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    for kind in (b"wasm", b"wat", b"go-module", b"native", b".zig", b"--env KEY=VALUE"):
        assert kind in out


async def test_logs_stats_and_async_from_the_command_line(handle: ServerHandle) -> None:
    async with AsyncClient(handle.address) as c:
        await c.register("bin", BINARY, filename="b.wasm")
    code, out, err = await run_fn(handle.address, "invoke", "bin", "--async", "--input", "")
    assert code == 0, err
    call_id = out.decode().strip()
    assert call_id.startswith("inv_")
    code, out, err = await run_fn(handle.address, "result", call_id, "--wait")
    assert (code, out) == (0, b"\0\xff\xfe binary"), err
    code, out, err = await run_fn(handle.address, "result", call_id, "--json")
    assert code == 0 and json.loads(out)["state"] == "done"
    while True:
        code, out, err = await run_fn(handle.address, "logs", "bin", "--json")
        if out:
            break
    record = json.loads(out.splitlines()[-1])
    assert record["id"] == call_id and record["mode"] == "async" and record["output_size"] == 10
    code, out, err = await run_fn(handle.address, "logs", "bin")
    assert code == 0 and b"bin@1  async" in out and call_id.encode() in out
    code, out, err = await run_fn(handle.address, "stats")
    assert code == 0, err
    header, row = out.splitlines()[:2]
    assert header.split()[:3] == [b"FUNCTION", b"VERSION", b"CALLS"]
    assert row.split()[:3] == [b"bin", b"1", b"1"]
    assert b"server: 1 serving process" in out
    code, _out, err = await run_fn(handle.address, "logs", "nope")
    assert code == 125 and b"NOT_FOUND" in err


async def test_ctrl_c_at_the_delete_question_deletes_nothing(handle: ServerHandle) -> None:
    async with AsyncClient(handle.address) as c:
        await c.register("kept", BINARY, filename="b.wasm")
    term = Terminal("delete", "kept", address=handle.address)
    await asyncio.to_thread(term.read_until, b"[y/N]")
    term.proc.send_signal(signal.SIGINT)
    assert await asyncio.to_thread(term.wait) == 130
    assert b"Traceback" not in term.seen
    async with AsyncClient(handle.address) as c:
        assert [v["version"] for v in (await c.get("kept"))["versions"]] == [1]


async def test_a_folder_that_cannot_be_packed_is_said_before_connecting(tmp_path: Path) -> None:
    # A port nobody listens on: the caller's mistake still comes first, as a usage error.
    with socket.socket() as idle:
        idle.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{idle.getsockname()[1]}"
        (tmp_path / "notes.txt").write_text("not a function\n")
        (tmp_path / "sub").mkdir()
        code, _out, err = await run_fn(address, "register", "x", str(tmp_path))
    assert code == 2, err
    assert b"found no .go, .c, .zig, .wat or .wasm file (notes.txt, sub/)" in err
    assert b"UNAVAILABLE" not in err
