"""§5.10 ``compile`` on a real server: a version's module put (back) in the node's cache."""

from __future__ import annotations

from pathlib import Path

import pytest
from fnclient import AsyncClient
from fnclient.protocol import InvalidArgumentError, NotFoundError

from fnserver.config import ServerConfig

from . import wasm_fixtures as wf
from .conftest import ServerHandle


def _modules(config: ServerConfig) -> list[Path]:
    return sorted(config.modules_dir.glob("*.cwasm"))


async def test_compile_puts_a_removed_module_back(handle: ServerHandle, client: AsyncClient) -> None:
    await client.register("echo", wf.echo(), filename="echo.wasm")
    (module,) = _modules(handle.config)
    good = module.read_bytes()
    module.unlink()
    assert await client.compile("echo", 1) == {"name": "echo", "version": 1}
    assert [p.read_bytes() for p in _modules(handle.config)] == [good]
    assert (await client.invoke("echo", b"x")).output == b"x"


async def test_compile_replaces_a_damaged_module(handle: ServerHandle, client: AsyncClient) -> None:
    await client.register("echo", wf.echo(), filename="echo.wasm")
    (module,) = _modules(handle.config)
    good = module.read_bytes()
    module.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    # Known to this process already: compile checks the file's bytes again all the same.
    await client.compile("echo")
    assert [p.read_bytes() for p in _modules(handle.config)] == [good]


async def test_compile_refuses_what_it_cannot_compile(client: AsyncClient, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        await client.compile("nothing")
    elf = Path("/bin/true").read_bytes()
    await client.register("tool", elf, filename="true")
    with pytest.raises(InvalidArgumentError, match="no wasm artifact"):
        await client.compile("tool")
