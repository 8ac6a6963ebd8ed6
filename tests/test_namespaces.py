"""Namespaces and the quotas a register holds (issue 11), through real servers and tokens.

Two tenants register the same name: two functions. Another tenant's function is NOT_FOUND with
the very message a missing one gets; an admin reaches it as ``TENANT/NAME`` and lists every
tenant. Data written before tenants existed is the default tenant's. The functions, versions
and storage quotas refuse with QUOTA_EXCEEDED and the documented details, and a delete frees
them; under the supervisor, where the control process holds them.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from fnclient import AsyncClient, FnError, NotFoundError, PermissionDeniedError, QuotaExceededError

from fnserver.auth import add_token
from fnserver.config import TenantLimits
from tests import wasm_fixtures as wasm
from tests.conftest import ServerHandle, ServerProcess, run_fn, start_server_process


def tokens(path: Path) -> dict[str, str]:
    """acme and globex deployers, an acme invoker and an admin of the default tenant."""
    return {
        "acme": add_token(path, "acme", "deployer")[1],
        "acme-invoker": add_token(path, "acme", "invoker")[1],
        "globex": add_token(path, "globex", "deployer")[1],
        "admin": add_token(path, "default", "admin")[1],
    }


async def error_of(call: Callable[[], Awaitable[Any]]) -> FnError:
    with pytest.raises(FnError) as caught:
        await call()
    return caught.value


async def test_the_same_name_in_two_tenants_is_two_functions(handle: ServerHandle) -> None:
    t = tokens(handle.config.auth_path)
    async with (
        AsyncClient(handle.address, t["acme"]) as acme,
        AsyncClient(handle.address, t["globex"]) as globex,
        AsyncClient(handle.address, t["acme-invoker"]) as reader,
    ):
        a = await acme.register("hello", wasm.echo(), filename="h.wasm")
        await acme.register("hello", wasm.exit_code(3), filename="h.wasm")
        g = await globex.register("hello", wasm.exit_code(7), filename="h.wasm", alias="prod")
        assert (a["name"], a["version"], g["name"], g["version"]) == ("hello", 1, "hello", 1)
        await acme.alias("hello", "prod", 1)
        assert (await acme.invoke("hello", b"x", version="prod")).output == b"x"
        assert (await globex.invoke("hello", b"x")).exit_code == 7
        assert (await reader.invoke("hello", b"x")).exit_code == 3  # acme's latest
        assert [f["name"] for f in await acme.list()] == ["hello"]
        assert [(f["tenant"], f["versions"]) for f in await acme.list()] == [("acme", [1, 2])]
        assert [(f["tenant"], f["versions"]) for f in await globex.list()] == [("globex", [1])]
        await globex.delete("hello")
        assert await globex.list() == []
        assert [f["versions"] for f in await acme.list()] == [[1, 2]]


async def test_another_tenants_function_is_not_found_like_a_missing_one(handle: ServerHandle) -> None:
    t = tokens(handle.config.auth_path)
    async with (
        AsyncClient(handle.address, t["acme"]) as acme,
        AsyncClient(handle.address, t["globex"]) as globex,
    ):
        await acme.register("secret", wasm.echo(), filename="s.wasm")
        calls: dict[str, Callable[[str], Awaitable[Any]]] = {
            "invoke": lambda n: globex.invoke(n, b""),
            "get": lambda n: globex.get(n),
            "delete": lambda n: globex.delete(n),
            "alias": lambda n: globex.alias(n, "prod", 1),
            "compile": lambda n: globex.compile(n),
        }
        for op, call in calls.items():
            theirs = await error_of(lambda c=call: c("acme/secret"))
            missing = await error_of(lambda c=call: c("acme/nothing-here"))
            assert isinstance(theirs, NotFoundError), op
            assert isinstance(missing, NotFoundError), op
            assert theirs.message.replace("secret", "X") == missing.message.replace("nothing-here", "X"), op
            bare = await error_of(lambda c=call: c("secret"))
            assert isinstance(bare, NotFoundError) and "acme" not in bare.message, op
        # Nothing of acme's moved.
        assert [f["versions"] for f in await acme.list()] == [[1]]
        with pytest.raises(PermissionDeniedError):
            await globex.list(all=True)


async def test_an_admin_reaches_every_tenant(handle: ServerHandle) -> None:
    t = tokens(handle.config.auth_path)
    async with (
        AsyncClient(handle.address, t["acme"]) as acme,
        AsyncClient(handle.address, t["admin"]) as admin,
    ):
        await acme.register("hello", wasm.echo(), filename="h.wasm")
        await admin.register("hello", wasm.exit_code(1), filename="h.wasm")  # the default tenant's
        assert (await admin.invoke("acme/hello", b"hi")).output == b"hi"
        got = await admin.get("acme/hello")
        assert got["name"] == "acme/hello" and got["versions"][0]["name"] == "acme/hello"
        reply = await admin.register("acme/tool", wasm.echo(), filename="t.wasm")
        assert reply["name"] == "acme/tool"
        assert sorted(f["name"] for f in await acme.list()) == ["hello", "tool"]
        assert [(f["tenant"], f["name"]) for f in await admin.list(all=True)] == [
            ("acme", "acme/hello"), ("acme", "acme/tool"), ("default", "hello"),
        ]
        assert [f["name"] for f in await admin.list()] == ["hello"]
        code, out, err = await run_fn(handle.address, "list", "--all", env={"FN_TOKEN": t["admin"]})
        assert code == 0, err
        lines = out.decode().splitlines()
        assert lines[0].split()[:2] == ["TENANT", "NAME"] and lines[1].split()[:2] == ["acme", "acme/hello"]
        code, out, _ = await run_fn(handle.address, "list", "--json", env={"FN_TOKEN": t["acme"]})
        assert [f["name"] for f in json.loads(out)] == ["hello", "tool"]
        await admin.delete("acme/tool")
        assert [f["name"] for f in await acme.list()] == ["hello"]


async def test_data_written_before_tenants_is_the_default_tenants(handle: ServerHandle) -> None:
    async with AsyncClient(handle.address) as before:  # no tokens yet: everyone is default
        await before.register("old", wasm.echo(), filename="o.wasm")
    await handle.stop()
    t = tokens(handle.config.auth_path)
    await handle.start()
    async with AsyncClient(handle.address, t["admin"]) as admin:
        assert (await admin.invoke("old", b"still")).output == b"still"
        assert (await admin.invoke("default/old", b"here")).output == b"here"
    async with AsyncClient(handle.address, t["acme"]) as acme:
        with pytest.raises(NotFoundError):
            await acme.invoke("old", b"")


def _quota(err: FnError, quota: str, limit: float, current: float, tenant: str = "acme") -> None:
    assert isinstance(err, QuotaExceededError)
    assert err.details == {"quota": quota, "tenant": tenant, "limit": limit, "current": current}


async def test_functions_versions_and_storage_quotas(handle: ServerHandle) -> None:
    t = tokens(handle.config.auth_path)
    await handle.stop()
    await handle.start(tenant_limits=TenantLimits(max_functions=2, max_versions=2, max_storage_mb=1))
    module = wasm.echo()
    async with (
        AsyncClient(handle.address, t["acme"]) as acme,
        AsyncClient(handle.address, t["globex"]) as globex,
    ):
        await acme.register("one", module, filename="m.wasm")
        await acme.register("two", module, filename="m.wasm")
        _quota(await error_of(lambda: acme.register("three", module, filename="m.wasm")), "functions", 2, 2)
        await globex.register("three", module, filename="m.wasm")  # another tenant's count
        await acme.register("one", module, filename="m.wasm")
        _quota(await error_of(lambda: acme.register("one", module, filename="m.wasm")), "versions", 2, 2)
        await acme.delete("one", 1)
        await acme.register("one", module, filename="m.wasm")  # a delete frees the place
        await acme.delete("two")
        await acme.register("three", module, filename="m.wasm")
        # Storage: about 1 MiB more than the quota leaves.
        big = wasm.wat(f'(module (memory 1) (data (i32.const 0) "{"x" * (1024 * 1024)}") (func (export "_start")))')
        err = await error_of(lambda: acme.register("three", big, filename="b.wasm"))
        assert isinstance(err, QuotaExceededError) and err.details["quota"] == "storage_mb"
        assert err.details["limit"] == 1 and 0 < err.details["current"] < 1
        assert [f["name"] for f in await acme.list()] == ["one", "three"]


async def test_the_control_process_holds_the_quotas_under_the_supervisor(tmp_path: Path) -> None:
    t = tokens(tmp_path / "data" / "auth.toml")
    proc, address = await start_server_process(tmp_path, "--processes", "2", "--tenant-max-functions", "1")
    server = ServerProcess(proc, address)
    try:
        async with (
            AsyncClient(address, t["acme"]) as acme,
            AsyncClient(address, t["globex"]) as globex,
        ):
            await acme.register("one", wasm.echo(), filename="m.wasm")
            await globex.register("one", wasm.exit_code(4), filename="m.wasm")
            _quota(await error_of(lambda: acme.register("two", wasm.echo(), filename="m.wasm")), "functions", 1, 1)
            assert (await acme.invoke("one", b"a")).output == b"a"
            assert (await globex.invoke("one", b"a")).exit_code == 4
            code, _, err = await run_fn(address, "register", "two", str(_write(tmp_path)), env={"FN_TOKEN": t["acme"]})
            assert code == 125 and b"QUOTA_EXCEEDED" in err
            await acme.delete("one")
            await acme.register("two", wasm.echo(), filename="m.wasm")
    finally:
        assert await server.stop() == 0


def _write(tmp_path: Path) -> Path:
    path = tmp_path / "m.wasm"
    path.write_bytes(wasm.echo())
    return path
