"""Several nodes over one PostgreSQL (issue 14): real ``fnserver`` processes, each with its own
data directory (its artifact cache), sharing the registry, the async queue and the records
through a real PostgreSQL (tests/_postgres.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from fnclient import AsyncClient

from . import wasm_fixtures as wf
from .conftest import start_server_process


async def test_registered_on_one_node_invoked_on_another(postgres_dsn: str, tmp_path: Path) -> None:
    one, address_one = await start_server_process(tmp_path / "one", "--registry", postgres_dsn, "--processes", "1")
    two, address_two = await start_server_process(tmp_path / "two", "--registry", postgres_dsn, "--processes", "1")
    try:
        async with AsyncClient(address_one) as a, AsyncClient(address_two) as b:
            info = await a.register("echo", wf.echo(), filename="echo.wasm", alias="prod")
            assert info["version"] == 1
            assert (await b.invoke("echo", b"across")).output == b"across"
            assert (await b.invoke("echo", b"alias", version="prod")).output == b"alias"
            await b.register("echo", wf.exit_code(3), filename="exit.wasm")
            assert (await a.invoke("echo")).exit_code == 3  # node two's version, on node one
            listed = await a.list()
            assert [(f["name"], f["latest"]) for f in listed] == [("echo", 2)]
            # An async call queued through node one: its result is visible on node two.
            call_id = await a.invoke_async("echo", b"later", version=1)
            status = await b.result(call_id, wait=60)
            assert status.result is not None and status.result.output == b"later"
            # A delete on node two is seen by node one.
            await b.delete("echo", 2)
            assert (await a.invoke("echo", b"back")).output == b"back"
    finally:
        for proc in (one, two):
            proc.terminate()
        for proc in (one, two):
            assert await asyncio.wait_for(proc.wait(), 120) == 0
