"""Serving processes over a role that may only read (issue 14; docs/SCALING.md "A role that
only reads"): the recipe of the docs, applied to a real PostgreSQL, serves everything, and the
role it gives serving processes cannot write."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

import asyncpg
import pytest
from fnclient import AsyncClient

from tests import wasm_fixtures as wasm
from tests._postgres import PostgresCluster
from tests.conftest import ServerProcess, start_server_process
from tests.test_auth_postgres import _refused, _until
from tests.test_tokens import run_fnserver


async def test_serving_processes_read_through_a_role_that_cannot_write(postgres_cluster: PostgresCluster, tmp_path: Path) -> None:
    tag = secrets.token_hex(4)
    owner, reader, db = f"fn_owner_{tag}", f"fn_reader_{tag}", f"fn_ro_{tag}"
    # The docs' recipe: an owner that migrates and writes, a reader with SELECT on whatever
    # the owner creates, granted before the first start.
    postgres_cluster.psql(f"CREATE ROLE {owner} LOGIN; CREATE ROLE {reader} LOGIN")
    postgres_cluster.psql(f"CREATE DATABASE {db} OWNER {owner}")
    postgres_cluster.psql(
        f"REVOKE ALL ON DATABASE {db} FROM PUBLIC; GRANT CONNECT ON DATABASE {db} TO {owner}, {reader};"
        f" ALTER DEFAULT PRIVILEGES FOR ROLE {owner} IN SCHEMA public GRANT SELECT ON TABLES TO {reader}",
        database=db,
    )
    base = postgres_cluster.dsn(db)
    as_owner = base.replace(f"{postgres_cluster.user}@", f"{owner}@", 1)
    as_reader = base.replace(f"{postgres_cluster.user}@", f"{reader}@", 1)
    proc, address = await start_server_process(
        tmp_path, "--registry", as_owner, "--registry-reader", as_reader, "--processes", "2"
    )
    node = ServerProcess(proc, address)
    try:
        async with AsyncClient(address) as c:
            await c.register("echo", wasm.echo(), filename="echo.wasm", alias="prod")
            for _ in range(4):  # over several connections: both serving processes
                async with AsyncClient(address) as d:
                    assert (await d.invoke("echo", b"ro", version="prod")).output == b"ro"
            call_id = await c.invoke_async("echo", b"later")
            status = await c.result(call_id, wait=60)
            assert status.result is not None and status.result.output == b"later"
            assert [f["name"] for f in await c.list()] == ["echo"]
        # Tokens reach the serving processes through the reader too.
        code, out, err = await run_fnserver("token", "add", "default", "deployer", "--registry", as_owner)
        assert code == 0, err
        await _until("the serving processes read the new token", lambda: _refused(address, None))
        async with AsyncClient(address, out.strip()) as c:
            assert (await c.invoke("echo", b"t")).output == b"t"
        conn = await asyncpg.connect(base)
        try:
            users = {
                (row["usename"], row["application_name"])
                for row in await conn.fetch(
                    "SELECT usename, application_name FROM pg_stat_activity WHERE datname = $1", db
                )
            }
        finally:
            await conn.close()
        # Each serving process listens as the reader; the control process as the owner.
        assert (reader, "fnserver-registry-listener") in users and (reader, "fnserver-auth-listener") in users
        assert (owner, "fnserver-registry-listener") in users
    finally:
        assert await node.stop() == 0
    # And the reader really cannot write what the serving processes read.
    conn = await asyncpg.connect(as_reader)
    try:
        for sql in (
            "INSERT INTO reg_functions (name, next_version) VALUES ('x', 1)",
            "DELETE FROM reg_versions",
            "UPDATE auth_tokens SET role = 'admin'",
            "DELETE FROM async_calls",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(sql)
        assert await conn.fetchval("SELECT count(*) FROM reg_versions") == 1
    finally:
        await conn.close()
        await asyncio.to_thread(postgres_cluster.drop_database, db)
        postgres_cluster.psql(f"DROP OWNED BY {reader}; DROP ROLE {reader}; DROP ROLE {owner}")


async def test_a_reader_url_without_a_registry_is_refused(tmp_path: Path) -> None:
    code, _, err = await run_fnserver("--registry-reader", "postgresql://r@127.0.0.1/db", "--data-dir", str(tmp_path))
    assert code == 2 and "needs --registry" in err
