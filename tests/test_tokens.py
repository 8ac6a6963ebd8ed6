"""Tokens, roles and the auth file (issue 11): real servers, real tokens, the real CLIs.

The auth file's rules are checked on the file itself; everything else goes through a server
on port 0 and TCP: HELLO with an absent, wrong, valid and revoked token, the role x operation
matrix, ``fn whoami``, the audit lines, the loopback-only default and a supervisor whose
serving processes (not root) read the auth file.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
import sys
from pathlib import Path

import pytest
from fnclient import AsyncClient, PermissionDeniedError, QuotaExceededError, UnauthenticatedError

from fnserver.auth import AuthBook, AuthFileError, add_token, load, revoke_token, token_id_of
from fnserver.config import TenantLimits
from fnserver.service import Caller
from tests import wasm_fixtures as wasm
from tests.conftest import ServerHandle, ServerProcess, run_fn, start_server_process


async def run_fnserver(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """``python -m fnserver ARGS`` to completion (the token commands, a refused start)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fnserver", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


# -- the auth file ----------------------------------------------------------------------------


def test_the_file_keeps_hashes_only_and_is_readable_by_unprivileged_processes(tmp_path: Path) -> None:
    path = tmp_path / "auth.toml"
    record, token = add_token(path, "acme", "deployer", "CI")
    raw = path.read_text()
    assert token not in raw and token.split("_", 2)[2] not in raw
    assert record.sha256 in raw
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert token_id_of(token) == record.id
    assert load(path).tokens == (record,)
    assert revoke_token(path, record.id) == record
    assert revoke_token(path, record.id) is None
    assert load(path).tokens == ()


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("tokens = 3", "array of tables"),
        ('[[tokens]]\nid = "zz"\n', "'id' must be 12"),
        ('[[tokens]]\nid = "0123456789ab"\nsha256 = "00"\n', "'sha256'"),
        ('[[tokens]]\nid = "0123456789ab"\nsha256 = "' + "0" * 64 + '"\ntenant = "Acme"\nrole = "admin"\n', "not a valid name"),
        ('[[tokens]]\nid = "0123456789ab"\nsha256 = "' + "0" * 64 + '"\ntenant = "a"\nrole = "root"\n', "not one of"),
        ("[tenants.acme]\nmax_funcs = 3\n", "unknown key"),
        ("[tenants.acme]\nmax_functions = -1\n", "0 or more"),
        ("not toml [", "not valid TOML"),
    ],
)
def test_a_broken_file_is_named_precisely(tmp_path: Path, text: str, says: str) -> None:
    path = tmp_path / "auth.toml"
    path.write_text(text)
    with pytest.raises(AuthFileError, match=says):
        load(path)


def test_a_broken_or_missing_file_never_opens_a_public_server(tmp_path: Path) -> None:
    path = tmp_path / "auth.toml"
    _, token = add_token(path, "acme", "admin")
    book = AuthBook(path, open_ok=False)
    assert isinstance(book.authenticate(token), Caller)
    path.write_text("half an edit [")
    assert not isinstance(book.authenticate(token), Caller)  # fail closed, not open
    path.unlink()
    assert not isinstance(book.authenticate(None), Caller)  # no tokens, not loopback: nobody
    assert isinstance(AuthBook(path, open_ok=True).authenticate(None), Caller)


def test_overrides_reach_the_quota_book(tmp_path: Path) -> None:
    path = tmp_path / "auth.toml"
    seen: list[dict[str, TenantLimits]] = []
    AuthBook(path, on_overrides=lambda o: seen.append(dict(o)))
    path.write_text("[tenants.acme]\nmax_functions = 2\nmax_rps = 5\n")
    book = AuthBook(path, on_overrides=lambda o: seen.append(dict(o)))
    book.refresh()
    assert seen[-1] == {"acme": TenantLimits(max_functions=2, max_rps=5.0)}


# -- the token command ----------------------------------------------------------------------


async def test_token_add_list_revoke_commands(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    code, out, err = await run_fnserver("token", "add", "acme", "deployer", "--data-dir", data, "--description", "CI", "--json")
    assert code == 0, err
    made = json.loads(out)
    assert set(made) == {"id", "token", "tenant", "role"}
    assert (made["tenant"], made["role"]) == ("acme", "deployer")
    assert made["token"].startswith(f"fn_{made['id']}_")
    assert "shown only this once" in err
    code, out, _ = await run_fnserver("token", "add", "acme", "invoker", "--data-dir", data)
    assert code == 0 and out.startswith("fn_") and len(out.split()) == 1  # the token alone
    code, out, _ = await run_fnserver("token", "list", "--data-dir", data, "--json")
    listed = json.loads(out)
    assert [t["id"] for t in listed][0] == made["id"]
    assert all("token" not in t and "sha256" not in t for t in listed)
    assert listed[0]["description"] == "CI"
    code, out, _ = await run_fnserver("token", "list", "--data-dir", data)
    assert code == 0 and made["id"] in out and made["token"] not in out
    code, out, _ = await run_fnserver("token", "revoke", made["id"], "--auth-file", f"{data}/auth.toml")
    assert code == 0 and made["id"] in out
    code, _, err = await run_fnserver("token", "revoke", made["id"], "--data-dir", data)
    assert code == 1 and "no token with id" in err
    code, _, err = await run_fnserver("token", "add", "Bad Name", "admin", "--data-dir", data)
    assert code == 2 and "not a valid name" in err
    code, _, err = await run_fnserver("token", "add", "acme", "root", "--data-dir", data)
    assert code == 2 and "invalid choice" in err


# -- a real server -----------------------------------------------------------------------------


@pytest.fixture
def auth_path(handle: ServerHandle) -> Path:
    return handle.config.auth_path


async def _tokens(path: Path) -> dict[str, str]:
    return {
        role: add_token(path, tenant, role)[1]
        for tenant, role in (("default", "admin"), ("default", "deployer"), ("default", "invoker"))
    }


async def test_hello_needs_a_valid_token_once_one_exists(handle: ServerHandle, auth_path: Path) -> None:
    async with AsyncClient(handle.address) as before:  # no token yet: an open loopback server
        await before.ping()
        record, token = add_token(auth_path, "acme", "deployer")
        add_token(auth_path, "acme", "admin")  # so that revoking the first leaves the server closed
        # The first token closes the server, for connections already open too.
        with pytest.raises(UnauthenticatedError):
            await before.ping()
    with pytest.raises(UnauthenticatedError, match="requires a token"):
        async with AsyncClient(handle.address) as c:
            await c.ping()
    with pytest.raises(UnauthenticatedError, match="unknown or revoked"):
        async with AsyncClient(handle.address, token + "x") as c:
            await c.ping()
    with pytest.raises(UnauthenticatedError, match="unknown or revoked"):
        async with AsyncClient(handle.address, "fn_000000000000_" + "A" * 43) as c:
            await c.ping()
    async with AsyncClient(handle.address, token) as c:
        me = await c.whoami()
        assert (me.tenant, me.role, me.token_id) == ("acme", "deployer", record.id)
        await c.ping()
        revoke_token(auth_path, record.id)
        # Revoked: the very next request on the open connection is refused.
        with pytest.raises(UnauthenticatedError, match="revoked"):
            await c.ping()
    with pytest.raises(UnauthenticatedError):
        async with AsyncClient(handle.address, token) as c:
            await c.ping()


async def test_role_by_operation(handle: ServerHandle, auth_path: Path) -> None:
    tokens = await _tokens(auth_path)
    async with AsyncClient(handle.address, tokens["admin"]) as admin:
        await admin.register("seed", wasm.echo(), filename="seed.wasm")
    allowed = {
        "admin": {"ping", "list", "get", "invoke", "register", "alias", "compile", "delete"},
        "deployer": {"ping", "list", "get", "invoke", "register", "alias", "compile", "delete"},
        "invoker": {"ping", "list", "get", "invoke"},
    }
    for role, token in tokens.items():
        async with AsyncClient(handle.address, token) as c:
            name = f"f-{role}"
            calls = {
                "ping": lambda c=c: c.ping(),
                "list": lambda c=c: c.list(),
                "get": lambda c=c: c.get("seed"),
                "invoke": lambda c=c: c.invoke("seed", b"hi"),
                "register": lambda c=c, n=name: c.register(n, wasm.echo(), filename="e.wasm"),
                "alias": lambda c=c: c.alias("seed", "prod", 1),
                "compile": lambda c=c: c.compile("seed"),
                "delete": lambda c=c, n=name: c.delete(n),
            }
            for op, call in calls.items():
                if op in allowed[role]:
                    await call()
                else:
                    with pytest.raises(PermissionDeniedError) as caught:
                        await call()
                    assert caught.value.details == {"role": role, "operation": op}
            await c.ping()  # a refusal does not close the connection


async def test_fn_whoami_and_exit_125_on_permission_denied(handle: ServerHandle, auth_path: Path, tmp_path: Path) -> None:
    record, token = add_token(auth_path, "acme", "invoker")
    code, out, err = await run_fn(handle.address, "whoami", env={"FN_TOKEN": token})
    assert code == 0, err
    assert "acme" in out.decode() and "invoker" in out.decode() and record.id in out.decode()
    code, out, _ = await run_fn(handle.address, "whoami", "--json", "--token", token)
    assert json.loads(out) == {"tenant": "acme", "role": "invoker", "token_id": record.id}
    module = tmp_path / "e.wasm"
    module.write_bytes(wasm.echo())
    code, _, err = await run_fn(handle.address, "register", "e", str(module), env={"FN_TOKEN": token})
    assert code == 125
    assert b"PERMISSION_DENIED" in err and b"deployer" in err
    code, _, err = await run_fn(handle.address, "whoami", env={"FN_TOKEN": "nope"})
    assert code == 125 and b"UNAUTHENTICATED" in err


async def test_audit_lines_name_the_token_never_the_secret(
    handle: ServerHandle, auth_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fnserver.audit")
    record, token = add_token(auth_path, "default", "deployer")
    async with AsyncClient(handle.address, token) as c:
        await c.register("audited", wasm.echo(), filename="a.wasm")
        await c.alias("audited", "prod", 1)
        await c.delete("audited")
    with pytest.raises(UnauthenticatedError):
        async with AsyncClient(handle.address, token[:-2] + "zz") as c:
            await c.ping()
    lines = [r.getMessage() for r in caplog.records if r.name == "fnserver.audit"]
    assert all(token not in line and token[20:] not in line for line in lines)
    for event in ("register", "alias", "delete"):
        assert any(
            line.startswith(f"{event} outcome=ok tenant=default token={record.id} role=deployer peer=127.0.0.1:")
            and "function=audited" in line
            for line in lines
        ), (event, lines)
    assert any(line.startswith(f"hello_refused outcome=UNAUTHENTICATED tenant=- token={record.id}") for line in lines)


async def test_the_auth_files_overrides_set_a_tenants_quota(handle: ServerHandle, auth_path: Path) -> None:
    _, slow = add_token(auth_path, "acme", "admin")
    _, other = add_token(auth_path, "default", "admin")
    for token in (slow, other):
        async with AsyncClient(handle.address, token) as c:
            await c.register("echo", wasm.echo(), filename="e.wasm")  # one in each tenant
    with auth_path.open("a") as f:
        f.write("\n[tenants.acme]\nmax_rps = 0.001\n")  # one call, then one per 1000 s
    async with AsyncClient(handle.address, slow) as a, AsyncClient(handle.address, other) as o:
        await a.invoke("echo", b"1")
        with pytest.raises(QuotaExceededError) as caught:
            await a.invoke("echo", b"2")
        assert caught.value.details["quota"] == "rps" and caught.value.details["tenant"] == "acme"
        for _ in range(3):
            await o.invoke("echo", b"x")  # another tenant is not held back


# -- safe defaults and the supervisor -------------------------------------------------------------


async def test_a_public_address_needs_a_token_or_insecure(tmp_path: Path) -> None:
    data = tmp_path / "data"
    code, _, err = await run_fnserver("--host", "0.0.0.0", "--port", "0", "--data-dir", str(data), "--no-warm")
    assert code == 2
    assert "without tokens" in err and "fnserver token add" in err and "--insecure" in err
    for extra in (["--insecure"], []):
        if not extra:
            add_token(data / "auth.toml", "acme", "admin")
        proc, address = await start_server_process(tmp_path, "--host", "0.0.0.0", "--processes", "1", *extra)
        server = ServerProcess(proc, address)
        assert await server.stop() == 0


async def test_serving_processes_read_the_auth_file_and_see_a_revoke(tmp_path: Path) -> None:
    """Under the supervisor (serving processes without root, when run as root): a token
    works on every connection and a revoke applies to the next request."""
    auth = tmp_path / "private" / "auth.toml"
    # Searchable, not listable, by other users; the directories above stay private to root
    # (pytest's are 0700): serving processes reach them through a descriptor held from before.
    auth.parent.mkdir()
    auth.parent.chmod(0o711)
    record, token = add_token(auth, "acme", "deployer")
    proc, address = await start_server_process(tmp_path, "--processes", "2", "--auth-file", str(auth))
    server = ServerProcess(proc, address)
    try:
        clients = [AsyncClient(address, token) for _ in range(6)]
        for c in clients:
            assert (await c.whoami()).tenant == "acme"
        await clients[0].register("echo", wasm.echo(), filename="e.wasm")
        for c in clients:
            assert (await c.invoke("echo", b"hi")).output == b"hi"
        revoke_token(auth, record.id)
        for c in clients:
            with pytest.raises(UnauthenticatedError):
                await c.ping()
            await c.close()
    finally:
        assert await server.stop() == 0


async def test_an_auth_file_serving_processes_could_not_read_is_refused_at_start(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("only a server started as root drops privileges before reading the file")
    auth = tmp_path / "private" / "auth.toml"
    auth.parent.mkdir(mode=0o700)
    add_token(auth, "acme", "admin")
    code, _, err = await run_fnserver("--port", "0", "--data-dir", str(tmp_path / "d"), "--no-warm", "--auth-file", str(auth))
    assert code == 2 and "chmod o+x" in err


async def _serve(data: Path, *extra: str, env: dict[str, str] | None = None) -> tuple[ServerProcess, list[str]]:
    """A supervisor on port 0, and what it printed up to its "listening on" line."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fnserver", "--port", "0", "--data-dir", str(data), "--no-warm",
        "--processes", "1", "--workers", "2", *extra,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, **(env or {})},
    )
    assert proc.stderr is not None
    early: list[str] = []
    while "listening on " not in (line := (await asyncio.wait_for(proc.stderr.readline(), 120)).decode()):
        assert line, "the server exited before listening"
        early.append(line)
    return ServerProcess(proc, line.split("listening on ")[1].split()[0]), early


async def test_the_deprecated_flag_warns_and_the_environment_works(tmp_path: Path) -> None:
    server, early = await _serve(tmp_path / "d1", "--token", "s3cret")
    try:
        with pytest.raises(UnauthenticatedError):
            async with AsyncClient(server.address) as c:
                await c.ping()
        async with AsyncClient(server.address, "s3cret") as c:
            me = await c.whoami()
            assert (me.tenant, me.role) == ("default", "admin")
    finally:
        await server.stop()
    assert sum("--token is deprecated" in line for line in early + server.log) == 1
    server, early = await _serve(tmp_path / "d2", env={"FNSERVER_TOKEN": "from-env"})
    try:
        async with AsyncClient(server.address, "from-env") as c:
            await c.ping()
        with pytest.raises(UnauthenticatedError):
            async with AsyncClient(server.address, "s3cret") as c:
                await c.ping()
    finally:
        await server.stop()
    assert not any("deprecated" in line for line in early + server.log)
