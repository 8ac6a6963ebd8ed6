"""Tokens and tenants in PostgreSQL (issue 14): what the auth file holds, shared by every node.

With ``--registry postgresql://...`` the auth file is not read: the tokens (their hashes, as in
the file) and the tenants' quota overrides live in two tables of the registry's database, so a
token added or revoked once is known to every node. Schema: component ``auth`` of
``fnserver/_pgschema.py``.

- :class:`PostgresAuthFeed` is each server process's live copy. It LISTENs on
  ``fnserver_auth`` on a connection of its own (``application_name``
  ``fnserver-auth-listener``) and, after each notification, reads both tables again in one
  snapshot (they are small: a token is a hundred bytes). :class:`~fnserver.auth.AuthBook`
  compares a counter before each request, as it compares the file's identity: no I/O on the
  request path. The rows are checked by the auth file's own rules; a bad row makes every token
  refused until it is fixed (fail closed, as a broken file does).
- When the listening connection is lost, the copy read last stays in force (warm invokes go on
  while the database is away) and the feed reconnects each second and reads again before it
  trusts a notification. A revoke committed meanwhile applies when the node is back in touch:
  the database, which the revoke needs, is what the node cannot reach.
- :class:`PostgresAuthEditor` is ``fnserver token`` and ``fnserver tenant`` against the
  database: each edit is one transaction that ends with ``NOTIFY fnserver_auth``.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import fields
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

import asyncpg

from . import _pgschema
from .auth import (
    AuthData,
    TokenRecord,
    check_role,
    check_tenant,
    data_from_doc,
    digest_of,
    limits_doc,
    new_token,
)
from .config import TenantLimits
from .protocol import UnavailableError

__all__ = ["PostgresAuthEditor", "PostgresAuthFeed", "describe_dsn"]

log = logging.getLogger("fnserver.auth")

COMPONENT: Final = "auth"
CHANNEL: Final = "fnserver_auth"
LISTENER_NAME: Final = "fnserver-auth-listener"
#: Between two attempts to get the listener back.
RECONNECT_S: Final = 1.0
#: Every edit takes this transaction-scoped advisory lock ("fnsv" and "auth" in ASCII), so two
#: ``token add`` at once draw distinct ids without a retry loop.
_EDIT_LOCK: Final = 0x666E7376_61757468

#: Append only: a released migration is never edited, a change is a new one.
MIGRATIONS: Final[tuple[tuple[int, str], ...]] = (
    (1, """
    CREATE TABLE auth_tokens (
        id text PRIMARY KEY, tenant text NOT NULL, role text NOT NULL, sha256 text NOT NULL,
        description text NOT NULL DEFAULT '', created text NOT NULL DEFAULT '');
    CREATE TABLE auth_tenants (name text PRIMARY KEY, limits text NOT NULL);
    """),
)

_T = TypeVar("_T")


def describe_dsn(dsn: str) -> str:
    """``the database DB on HOST:PORT``, for messages: never the user's password."""
    try:
        parts = urlsplit(dsn)
        where = parts.hostname or "localhost"
        if parts.port:
            where += f":{parts.port}"
        db = parts.path.lstrip("/") or "(default)"
    except ValueError:
        return "the registry database"
    return f"the database {db} on {where}"


async def _read(conn: asyncpg.Connection) -> AuthData:
    """Both tables in one snapshot, checked by the auth file's rules."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        tokens = await conn.fetch(
            "SELECT id, tenant, role, sha256, description, created FROM auth_tokens ORDER BY created, id"
        )
        tenants = await conn.fetch("SELECT name, limits FROM auth_tenants ORDER BY name")
    doc: dict[str, Any] = {"tokens": [dict(row) for row in tokens], "tenants": {}}
    for row in tenants:
        try:
            doc["tenants"][row["name"]] = json.loads(row["limits"])
        except ValueError:
            doc["tenants"][row["name"]] = None  # data_from_doc names it
    return data_from_doc(doc)


class PostgresAuthFeed:
    """One process's live copy of the tokens and tenants (see the module docstring).

    ``serial`` grows with each read; ``data`` and ``broken`` are what the last read found.
    Before :meth:`open` it holds no token and says why (an AuthBook over it refuses every
    token until then; the server opens it before it listens).
    """

    def __init__(self, dsn: str, *, read_only: bool = False) -> None:
        self.dsn = dsn
        #: A reader only (a serving process): it applies no migration.
        self.read_only = read_only
        self.serial = 0
        self.data = AuthData()
        self.broken: str | None = "the tokens have not been read from the database yet"
        self._conn: asyncpg.Connection | None = None
        self._dirty = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    async def open(self) -> None:
        """Migrate (unless a reader), listen, read; UNAVAILABLE if the database is unreachable."""
        if self._task is not None:
            return
        self._closing = False
        if not self.read_only:
            try:
                conn = await asyncpg.connect(self.dsn)
            except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
                raise UnavailableError(f"cannot reach {describe_dsn(self.dsn)} for the tokens: {exc}") from None
            try:
                await _pgschema.migrate(conn, COMPONENT, MIGRATIONS)
            finally:
                await conn.close()
        if not await self._connect():
            raise UnavailableError(f"cannot read the tokens from {describe_dsn(self.dsn)}")
        self._task = asyncio.ensure_future(self._run())

    async def close(self) -> None:
        """Stop listening; idempotent."""
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])
            self._task = None
        await self._drop()

    async def _connect(self) -> bool:
        """LISTEN first, then read: an edit between the two is notified and read, never
        neither. False (and logged) if the database cannot be reached."""
        try:
            conn = await asyncpg.connect(self.dsn, server_settings={"application_name": LISTENER_NAME})
        except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
            log.warning("cannot reach %s for the tokens (%s); keeping the copy read last", describe_dsn(self.dsn), exc)
            return False
        try:
            await conn.add_listener(CHANNEL, self._on_notify)
            self._conn = conn
            await self._reload()
        except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
            log.warning("cannot read the tokens from %s (%s); keeping the copy read last", describe_dsn(self.dsn), exc)
            await self._drop()
            return False
        return True

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            try:
                await asyncio.wait_for(conn.close(), 5)
            except (TimeoutError, OSError, asyncpg.PostgresError):
                conn.terminate()

    def _on_notify(self, _conn: object, _pid: int, _channel: str, _payload: str) -> None:
        self._dirty.set()

    async def _reload(self) -> None:
        assert self._conn is not None
        self._dirty.clear()  # before the read: a notification during it reads again
        try:
            data = await _read(self._conn)
        except ValueError as exc:  # AuthFileError: a row the rules refuse
            self.data, self.broken = AuthData(), f"{describe_dsn(self.dsn)} holds a bad entry: {exc}"
        else:
            self.data, self.broken = data, None
        self.serial += 1

    async def _run(self) -> None:
        while not self._closing:
            conn = self._conn
            if conn is None or conn.is_closed():
                await self._drop()
                if not await self._connect():
                    await asyncio.sleep(RECONNECT_S)  # a retry tick, not a synchronisation
                continue
            try:
                # A notification, or a tick to notice a connection that died quietly.
                await asyncio.wait_for(self._dirty.wait(), RECONNECT_S)
            except TimeoutError:
                continue
            try:
                await self._reload()
            except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
                log.warning("lost %s while reading the tokens (%s); reconnecting", describe_dsn(self.dsn), exc)
                await self._drop()


class PostgresAuthEditor:
    """``fnserver token`` / ``fnserver tenant`` against the database (synchronous: a command)."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.where = describe_dsn(dsn)

    def _run(self, work: Callable[[asyncpg.Connection], Awaitable[_T]], *, edit: bool) -> _T:
        async def main() -> _T:
            try:
                conn = await asyncpg.connect(self.dsn, timeout=30)
            except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
                raise OSError(f"cannot reach it: {exc}") from None
            try:
                await _pgschema.migrate(conn, COMPONENT, MIGRATIONS)
                if not edit:
                    return await work(conn)
                async with conn.transaction():
                    await conn.execute("SELECT pg_advisory_xact_lock($1)", _EDIT_LOCK)
                    result = await work(conn)
                    await conn.execute(f"NOTIFY {CHANNEL}")  # delivered at commit
                return result
            finally:
                await conn.close()

        try:
            return asyncio.run(main())
        except (asyncpg.PostgresError, _pgschema.SchemaTooNewError) as exc:
            raise OSError(str(exc)) from None

    def load(self) -> AuthData:
        """The tokens and tenants as the database holds them."""
        return self._run(_read, edit=False)

    def add_token(self, tenant: str, role: str, description: str = "") -> tuple[TokenRecord, str]:
        """Create a token, record its hash; the record and the token (shown once)."""
        check_tenant(tenant)
        check_role(role)

        async def work(conn: asyncpg.Connection) -> tuple[TokenRecord, str]:
            while True:
                token_id, token = new_token()
                if not await conn.fetchval("SELECT 1 FROM auth_tokens WHERE id = $1", token_id):
                    break
            created = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            record = TokenRecord(token_id, tenant, role, digest_of(token), description, created)
            await _insert(conn, record)
            return record, token

        return self._run(work, edit=True)

    def revoke_token(self, token_id: str) -> TokenRecord | None:
        """Remove a token; the removed record, or None if there was none."""

        async def work(conn: asyncpg.Connection) -> TokenRecord | None:
            row = await conn.fetchrow(
                "DELETE FROM auth_tokens WHERE id = $1 RETURNING id, tenant, role, sha256, description, created",
                token_id,
            )
            return None if row is None else TokenRecord(**dict(row))

        return self._run(work, edit=True)

    def set_tenant(self, name: str, limits: TenantLimits | None) -> None:
        """Give ``name`` these quota overrides (None: none, the flags' defaults apply)."""
        check_tenant(name)

        async def work(conn: asyncpg.Connection) -> None:
            if limits is None or not limits_doc(limits):
                await conn.execute("DELETE FROM auth_tenants WHERE name = $1", name)
            else:
                await conn.execute(
                    "INSERT INTO auth_tenants (name, limits) VALUES ($1, $2)"
                    " ON CONFLICT (name) DO UPDATE SET limits = EXCLUDED.limits",
                    name, json.dumps(limits_doc(limits)),
                )

        self._run(work, edit=True)

    def merge(self, data: AuthData) -> tuple[int, int]:
        """Copy tokens whose id is new and tenants not yet present; how many of each."""

        async def work(conn: asyncpg.Connection) -> tuple[int, int]:
            added = 0
            for record in data.tokens:
                if not await conn.fetchval("SELECT 1 FROM auth_tokens WHERE id = $1", record.id):
                    await _insert(conn, record)
                    added += 1
            tenants = 0
            for name, limits in data.tenants.items():
                status = await conn.execute(
                    "INSERT INTO auth_tenants (name, limits) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
                    name, json.dumps(limits_doc(limits)),
                )
                tenants += status.endswith(" 1")
            return added, tenants

        return self._run(work, edit=True)


async def _insert(conn: asyncpg.Connection, record: TokenRecord) -> None:
    await conn.execute(
        "INSERT INTO auth_tokens (id, tenant, role, sha256, description, created) VALUES ($1, $2, $3, $4, $5, $6)",
        *(getattr(record, f.name) for f in fields(record)),
    )
