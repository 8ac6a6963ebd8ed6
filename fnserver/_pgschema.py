"""Versioned schema migrations for the PostgreSQL backends (the scale-out issue).

Each backend (the invocation store now, the registry's stores later) names itself a
*component* and lists its migrations as ``(version, sql)`` pairs, numbered from 1 and never
edited once released: a change to the schema is a new pair. :func:`migrate` runs, at open,
those not yet in the ``schema_migrations`` table, all in one transaction.

Several nodes may start at once against one database: the transaction first takes a
transaction-scoped advisory lock (``pg_advisory_xact_lock``, released at commit or rollback,
also if the connection drops), so one node applies the migrations and the others, once they
get the lock, find them applied. A database migrated by a newer fnserver (a version this one
does not know) is refused rather than used with a schema the code does not understand.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Final

__all__ = ["MIGRATIONS_LOCK", "SchemaTooNewError", "migrate"]

#: The advisory lock key every migration takes (advisory locks are per database): "fnsv" and
#: "migr" in ASCII, so an operator reading ``pg_locks`` can tell whose it is.
MIGRATIONS_LOCK: Final = 0x666E7376_6D696772

_TABLE: Final = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    component text NOT NULL,
    version integer NOT NULL,
    applied double precision NOT NULL,
    PRIMARY KEY (component, version)
)
"""


class SchemaTooNewError(RuntimeError):
    """The database holds migrations of a component that this fnserver does not know."""


async def migrate(conn: Any, component: str, migrations: Sequence[tuple[int, str]]) -> list[int]:
    """Apply ``component``'s missing ``migrations`` on ``conn`` (an asyncpg connection, not in
    a transaction) in one transaction under the migrations lock; return the versions applied
    now (empty when the schema was already current)."""
    versions = [v for v, _ in migrations]
    if versions != sorted(set(versions)) or (versions and versions[0] < 1):
        raise ValueError(f"{component}: migration versions must be distinct, increasing and from 1: {versions}")
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATIONS_LOCK)
        await conn.execute(_TABLE)
        rows = await conn.fetch("SELECT version FROM schema_migrations WHERE component = $1", component)
        applied = {int(row[0]) for row in rows}
        unknown = sorted(applied - set(versions))
        if unknown:
            raise SchemaTooNewError(
                f"the database's {component} schema has migrations {unknown} that this fnserver "
                f"does not know (it knows up to {max(versions, default=0)}): upgrade this node"
            )
        done = []
        for version, sql in migrations:
            if version in applied:
                continue
            await conn.execute(sql)
            await conn.execute(
                "INSERT INTO schema_migrations (component, version, applied) VALUES ($1, $2, $3)",
                component, version, time.time(),
            )
            done.append(version)
        return done
