"""A version's environment (issue 12, PROTOCOL.md §5.2 ``options.env``): seen by the guest in
wasm mode (WASI environ) and native mode, shown by name only."""

from __future__ import annotations

from pathlib import Path

import pytest
from fnclient import AsyncClient, InvalidArgumentError

from .conftest import ServerHandle, run_fn
from .wasm_fixtures import wat

#: Writes its whole WASI environ block ("K=V\0K=V\0") to stdout.
ENVIRON_DUMP = wat(
    """
(module
  (import "wasi_snapshot_preview1" "environ_sizes_get" (func $sizes (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_get" (func $get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    (drop (call $sizes (i32.const 0) (i32.const 4)))
    (drop (call $get (i32.const 1024) (i32.const 4096)))
    (i32.store (i32.const 16) (i32.const 4096))
    (i32.store (i32.const 20) (i32.load (i32.const 4)))
    (drop (call $write (i32.const 1) (i32.const 16) (i32.const 1) (i32.const 32)))))
"""
)


async def test_wasm_guest_sees_its_environment_and_get_shows_names_only(client: AsyncClient) -> None:
    meta = await client.register(
        "envdump", ENVIRON_DUMP, filename="envdump.wasm", env={"GREETING": "hi there", "SECRET": "s3cr=t"}
    )
    assert meta["env"] == ["GREETING", "SECRET"]
    result = await client.invoke("envdump")
    assert sorted(result.output.split(b"\0")[:-1]) == [b"GREETING=hi there", b"SECRET=s3cr=t"]
    got = await client.get("envdump")
    assert got["versions"][0]["env"] == ["GREETING", "SECRET"]
    assert b"s3cr=t" not in repr(got).encode()
    # A version without an environment gets none (not the server's).
    await client.register("envdump", ENVIRON_DUMP, filename="envdump.wasm")
    assert (await client.invoke("envdump")).output == b""
    assert (await client.invoke("envdump", version=1)).output.count(b"\0") == 2


async def test_the_environment_survives_a_restart(handle: ServerHandle) -> None:
    async with AsyncClient(handle.address) as c:
        await c.register("envdump", ENVIRON_DUMP, filename="envdump.wasm", env={"A": "1"})
    await handle.stop()
    await handle.start()
    async with AsyncClient(handle.address) as c:
        assert (await c.invoke("envdump")).output == b"A=1\0"


@pytest.mark.parametrize(
    "env",
    [{"1BAD": "x"}, {"A=B": "x"}, {"A": "nul\x00"}, {f"V{i}": "x" for i in range(65)}, {"A": "x" * 40_000}],
)
async def test_bad_environments_are_invalid_arguments(client: AsyncClient, env: dict[str, str]) -> None:
    with pytest.raises(InvalidArgumentError):
        await client.register("envdump", ENVIRON_DUMP, filename="envdump.wasm", env=env)


async def test_fn_register_env_and_env_file(handle: ServerHandle, tmp_path: Path) -> None:
    module = tmp_path / "envdump.wasm"
    module.write_bytes(ENVIRON_DUMP)
    env_file = tmp_path / "settings.env"
    env_file.write_text("# settings\nFROM_FILE=yes\nexport QUOTED=\"a b\"\n\nOVERRIDDEN=file\n")
    code, _out, err = await run_fn(
        handle.address, "register", "envdump", str(module), "--env-file", str(env_file),
        "--env", "OVERRIDDEN=flag", "--env", "PLAIN=1",
    )
    assert code == 0, err
    code, out, err = await run_fn(handle.address, "invoke", "envdump", "--input", "")
    assert code == 0, err
    assert sorted(out.split(b"\0")[:-1]) == [b"FROM_FILE=yes", b"OVERRIDDEN=flag", b"PLAIN=1", b"QUOTED=a b"]
    code, out, err = await run_fn(handle.address, "get", "envdump")
    assert code == 0, err
    assert b"FROM_FILE" in out and b"yes" not in out.replace(b"FROM_FILE", b"")
    code, _out, err = await run_fn(handle.address, "register", "envdump", str(module), "--env", "NOEQUALS")
    assert code == 2 and b"KEY=VALUE" in err


GO_ENV = """package main

import (
	"fmt"
	"os"
)

func main() {
	fmt.Printf("greeting=%s home=%q", os.Getenv("GREETING"), os.Getenv("FNSERVER_TOKEN"))
}
"""


@pytest.mark.slow
async def test_go_function_sees_its_environment_in_both_modes(server_config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import os

    handle = ServerHandle(server_config)
    native_ok = os.geteuid() == 0
    await handle.start(unsandboxed_native=not native_ok)
    try:
        async with AsyncClient(handle.address) as c:
            await c.register("goenv", GO_ENV.encode(), filename="main.go", env={"GREETING": "hello"})
            wasm = await c.invoke("goenv", mode="wasm")
            native = await c.invoke("goenv", mode="native")
        assert wasm.output == b'greeting=hello home=""'
        assert native.output == b'greeting=hello home=""'
    finally:
        await handle.stop()
