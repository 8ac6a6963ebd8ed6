"""Tokens and tenants in PostgreSQL (issue 14): every node of a registry shares them.

Against a real PostgreSQL (tests/_postgres.py): the ``fnserver token`` and ``fnserver tenant``
commands edit the database; real nodes (supervisors with their serving processes) see an
added token, a tenant's quota and a revoke without a restart; the live copy fails closed on a
bad row and catches up after its listening connection is cut; a public address is refused
while the database holds no token.

A node learns of an edit through NOTIFY, so the tests wait for the edit's effect (a HELLO
refused, a quota applied) in a loop bounded only to turn a hang into a failure.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest
from fnclient import AsyncClient, QuotaExceededError, UnauthenticatedError

from fnserver._authpg import LISTENER_NAME, PostgresAuthEditor, PostgresAuthFeed
from fnserver.auth import AuthBook, Refusal, add_token, exposure_problem
from fnserver.config import ServerConfig, TenantLimits
from fnserver.service import Caller
from tests import wasm_fixtures as wasm
from tests.conftest import ServerProcess, start_server_process
from tests.test_exec import until
from tests.test_tokens import run_fnserver

#: Bounds a wait for a NOTIFY's effect: a failure after this long, never a pass condition.
PATIENCE_S = 60.0


async def _until(what: str, check: Callable[[], Awaitable[bool]]) -> None:
    """Wait until ``check()`` holds: the order of events (an edit, then its effect)."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + PATIENCE_S
    while not await check():
        assert loop.time() < give_up, f"never happened: {what}"
        await asyncio.sleep(0.02)


async def _refused(address: str, token: str | None) -> bool:
    try:
        async with AsyncClient(address, token) as c:
            await c.ping()
    except UnauthenticatedError:
        return True
    return False


async def test_tokens_and_quotas_reach_every_node_without_a_restart(postgres_dsn: str, tmp_path: Path) -> None:
    one, address_one = await start_server_process(tmp_path / "one", "--registry", postgres_dsn, "--processes", "2")
    two, address_two = await start_server_process(tmp_path / "two", "--registry", postgres_dsn, "--processes", "1")
    nodes = [ServerProcess(one, address_one), ServerProcess(two, address_two)]
    try:
        # No token anywhere yet: loopback nodes serve everyone.
        assert not await _refused(address_two, None)
        code, out, err = await run_fnserver("token", "add", "acme", "deployer", "--registry", postgres_dsn, "--json")
        assert code == 0, err
        made = json.loads(out)
        assert "the database" in err and postgres_dsn.rsplit("/", 1)[1] in err
        # A second token, so that the revoke below does not leave a loopback node tokenless
        # (and so open to everyone again, as with an auth file).
        code, _, err = await run_fnserver("token", "add", "ops", "admin", "--registry", postgres_dsn)
        assert code == 0, err
        # Now every node wants a token (no node reads an auth file: none exists).
        for address in (address_one, address_two):
            await _until(f"{address} refuses a HELLO without a token", lambda a=address: _refused(a, None))
        async with AsyncClient(address_two, made["token"]) as b:
            me = await b.whoami()
            assert (me.tenant, me.role, me.token_id) == ("acme", "deployer", made["id"])
        # A tenant's quota, set once, holds on every node.
        code, out, err = await run_fnserver("tenant", "set", "acme", "--max-functions", "1", "--registry", postgres_dsn)
        assert code == 0 and "max_functions=1" in out, err
        code, out, _ = await run_fnserver("tenant", "list", "--json", "--registry", postgres_dsn)
        assert code == 0 and json.loads(out) == {"acme": {"max_functions": 1}}
        async with AsyncClient(address_one, made["token"]) as a, AsyncClient(address_two, made["token"]) as b:
            await a.register("first", wasm.echo(), filename="e.wasm")

            async def quota_holds() -> bool:
                try:
                    await b.register("second", wasm.echo(), filename="e.wasm")
                except QuotaExceededError as exc:
                    assert exc.details["quota"] == "functions" and exc.details["limit"] == 1
                    return True
                await b.delete("second")  # registered before node two heard of the quota
                return False

            await _until("node two applies acme's max_functions", quota_holds)
            assert (await b.invoke("first", b"hi")).output == b"hi"
            # A revoke: refused on every node, also on connections opened before it.
            code, out, _ = await run_fnserver("token", "revoke", made["id"], "--registry", postgres_dsn)
            assert code == 0 and made["id"] in out and "every node" in out

            async def gone(c: AsyncClient) -> bool:
                try:
                    await c.ping()
                except UnauthenticatedError:
                    return True
                return False

            await _until("an open connection to node one is refused", lambda: gone(a))
            await _until("an open connection to node two is refused", lambda: gone(b))
        for address in (address_one, address_two):
            assert await _refused(address, made["token"])
        code, out, _ = await run_fnserver("token", "list", "--json", "--registry", postgres_dsn)
        assert code == 0 and [t["tenant"] for t in json.loads(out)] == ["ops"]
        code, _, err = await run_fnserver("token", "revoke", made["id"], "--registry", postgres_dsn)
        assert code == 1 and "no token with id" in err
    finally:
        for node in nodes:
            assert await node.stop() == 0


async def test_the_config_files_registry_is_where_the_commands_edit(postgres_dsn: str, tmp_path: Path) -> None:
    """``token`` and ``tenant`` find the database as the server does (here: FNSERVER_REGISTRY
    and --config), and ``token import`` moves an auth file's tokens and tenants into it."""
    auth = tmp_path / "auth.toml"
    record, token = add_token(auth, "acme", "invoker", "from the file")
    config = tmp_path / "fn.toml"
    config.write_text(f'registry = "{postgres_dsn}"\ndata_dir = "{tmp_path / "data"}"\n')
    code, out, err = await run_fnserver("token", "import", str(auth), "--config", str(config))
    assert code == 0 and "copied 1 of 1 token(s)" in out, err
    code, out, _ = await run_fnserver("token", "import", str(auth), env={"FNSERVER_REGISTRY": postgres_dsn})
    assert code == 0 and "copied 0 of 1 token(s)" in out  # the id is there already
    data = await asyncio.to_thread(PostgresAuthEditor(postgres_dsn).load)
    assert data.tokens == (record,)  # the same hash: the token made for the file works
    code, out, _ = await run_fnserver("token", "list", "--config", str(config))
    assert code == 0 and record.id in out and "from the file" in out
    # A token from the file, used against a node of the registry.
    node, address = await start_server_process(tmp_path / "node", "--config", str(config), "--processes", "1")
    server = ServerProcess(node, address)
    try:
        async with AsyncClient(address, token) as c:
            assert (await c.whoami()).role == "invoker"
        assert await _refused(address, None)
    finally:
        assert await server.stop() == 0
    code, _, err = await run_fnserver("token", "list", "--registry", "postgresql://nobody@127.0.0.1:1/none")
    assert code == 2 and "cannot reach" in err


async def test_the_live_copy_fails_closed_and_catches_up(postgres_dsn: str, postgres_cluster: object) -> None:
    editor = PostgresAuthEditor(postgres_dsn)
    record, token = await asyncio.to_thread(editor.add_token, "acme", "admin")
    await asyncio.to_thread(editor.add_token, "ops", "admin")  # the revoke below leaves one
    feed = PostgresAuthFeed(postgres_dsn)
    book = AuthBook(None, open_ok=True, feed=feed)
    assert isinstance(book.authenticate(token), Refusal)  # not read yet: nobody, not everyone
    assert isinstance(book.authenticate(None), Refusal)
    await feed.open()
    try:
        caller = book.authenticate(token)
        assert isinstance(caller, Caller) and caller.tenant == "acme"
        conn = await asyncpg.connect(postgres_dsn)
        try:
            # A row the rules refuse (written around the commands): every token is refused.
            serial = feed.serial
            await conn.execute(
                f"INSERT INTO auth_tokens (id, tenant, role, sha256) VALUES ('0123456789ab', 'acme', 'root', '{'0' * 64}');"
                " NOTIFY fnserver_auth"
            )
            await until(lambda: feed.serial > serial, "the feed reads the bad row")
            refused = book.authenticate(token)
            assert isinstance(refused, Refusal) and "cannot be used" in refused.message
            assert feed.broken is not None and "'root'" in feed.broken
            await conn.execute("DELETE FROM auth_tokens WHERE id = '0123456789ab'; NOTIFY fnserver_auth")
            await until(lambda: feed.broken is None, "the feed reads the fix")
            assert isinstance(book.authenticate(token), Caller)
            # Cut the listening connection, then revoke: the feed reconnects and reads again.
            cut = await conn.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1"
                " AND datname = current_database()", LISTENER_NAME,
            )
            assert cut == 1
            await asyncio.to_thread(editor.revoke_token, record.id)
            await until(lambda: isinstance(book.authenticate(token), Refusal), "the revoke reaches the reconnected feed")
            # Quotas ride along.
            await asyncio.to_thread(editor.set_tenant, "acme", TenantLimits(max_rps=2.5))
            await until(lambda: "acme" in feed.data.tenants, "the tenant's quotas arrive")
            assert feed.data.tenants["acme"] == TenantLimits(max_rps=2.5)
            await asyncio.to_thread(editor.set_tenant, "acme", None)
            await until(lambda: not feed.data.tenants, "the tenant's quotas are removed")
        finally:
            await conn.close()
    finally:
        await feed.close()


async def test_a_public_node_needs_a_token_in_the_database(postgres_dsn: str, tmp_path: Path) -> None:
    config = ServerConfig(host="0.0.0.0", data_dir=tmp_path, registry=postgres_dsn)
    problem = await asyncio.to_thread(exposure_problem, config)
    assert problem is not None and "without tokens" in problem
    await asyncio.to_thread(PostgresAuthEditor(postgres_dsn).add_token, "ops", "admin")
    assert await asyncio.to_thread(exposure_problem, config) is None
    unreachable = ServerConfig(host="0.0.0.0", data_dir=tmp_path, registry="postgresql://u:secret@127.0.0.1:1/db")
    problem = await asyncio.to_thread(exposure_problem, unreachable)
    assert problem is not None and "cannot read the tokens" in problem and "secret" not in problem


@pytest.mark.parametrize("flag", ["--max-rps=0", "--max-functions=-1"])
async def test_tenant_set_refuses_nonsense(flag: str, tmp_path: Path) -> None:
    code, _, err = await run_fnserver("tenant", "set", "acme", flag, "--auth-file", str(tmp_path / "a.toml"))
    assert code == 2 and "must be" in err
    assert not (tmp_path / "a.toml").exists()


async def test_tenant_set_and_list_on_an_auth_file(tmp_path: Path) -> None:
    auth = tmp_path / "auth.toml"
    code, out, err = await run_fnserver("tenant", "set", "acme", "--max-versions", "3", "--max-rps", "1.5", "--auth-file", str(auth))
    assert code == 0 and "max_versions=3" in out and "next request" in out, err
    code, out, _ = await run_fnserver("tenant", "list", "--json", "--auth-file", str(auth))
    assert json.loads(out) == {"acme": {"max_versions": 3, "max_rps": 1.5}}
    code, out, _ = await run_fnserver("tenant", "set", "acme", "--auth-file", str(auth))
    assert code == 0 and "defaults only" in out
    code, out, _ = await run_fnserver("tenant", "list", "--auth-file", str(auth))
    assert code == 0 and "no tenant has quotas" in out
