"""Use cases over the registry that build nothing and run nothing: list, get, delete, alias."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TypeVar

from ..protocol import (
    AliasReply,
    AliasRequest,
    DeleteReply,
    DeleteRequest,
    GetReply,
    GetRequest,
    ListReply,
    ListRequest,
    NotFoundError,
)
from ..registry import Registry
from ._access import ALL_TENANTS, require
from ._context import RequestContext
from ._names import key_for, renamed, said_as, shown, tenant_of

__all__ = ["FunctionService", "catch_up", "fresh"]

T = TypeVar("T")


async def catch_up(registry: Registry) -> None:
    """Apply the change feed if another writer moved the store on (a memory read otherwise)."""
    if registry.stale():
        await registry.refresh()


async def fresh(registry: Registry, read: Callable[[], T]) -> T:
    """Run an index read on an index that has seen every change committed before it.

    Another serving process (or node) may have registered, aliased or deleted a moment ago:
    ``stale()`` is a memory read of the store's generation (no system call), and only when it
    moved does the read wait for the change feed. On NOT_FOUND the feed is consulted once more,
    for a write that landed between the check and the read.
    """
    await catch_up(registry)
    try:
        return read()
    except NotFoundError:
        await registry.refresh()
        return read()


class FunctionService:
    """list, get, delete and alias (PROTOCOL.md §5.4-§5.7)."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    async def list(self, ctx: RequestContext, req: ListRequest) -> ListReply:
        """Every function of the caller's tenant, sorted by name; with ``all`` (admins only),
        every tenant's, sorted by tenant and name."""
        caller = ctx.caller
        if req.all:
            require(caller, ALL_TENANTS, "list every tenant's functions")
        await catch_up(self.registry)
        mine = []
        for entry in self.registry.list().functions:
            tenant = tenant_of(entry.name)
            if req.all or tenant == caller.tenant:
                mine.append(dataclasses.replace(entry, name=shown(caller, entry.name), tenant=tenant))
        if req.all:
            mine.sort(key=lambda f: (f.tenant, split_name(f.name)))
        return ListReply(tuple(mine))

    async def get(self, ctx: RequestContext, req: GetRequest) -> GetReply:
        """One function and one page of its versions (build logs only when asked)."""
        key = key_for(ctx.caller, req.name)
        with said_as(ctx.caller, key, req.name):
            reply = await fresh(
                self.registry,
                lambda: self.registry.get(
                    key, version=req.version, limit=req.limit, cursor=req.cursor, log=req.log
                ),
            )
        return renamed(reply, ctx.caller, key)

    async def delete(self, ctx: RequestContext, req: DeleteRequest) -> DeleteReply:
        """One version, or every version; aliases pointing at them go too."""
        key = key_for(ctx.caller, req.name)
        with said_as(ctx.caller, key, req.name):
            reply = await self._delete(dataclasses.replace(req, name=key))
        return renamed(reply, ctx.caller, key)

    async def alias(self, ctx: RequestContext, req: AliasRequest) -> AliasReply:
        """Create or move an alias."""
        key = key_for(ctx.caller, req.name)
        with said_as(ctx.caller, key, req.name):
            reply = await self._alias(dataclasses.replace(req, name=key))
        return renamed(reply, ctx.caller, key)

    async def _delete(self, req: DeleteRequest) -> DeleteReply:
        await catch_up(self.registry)
        return await self.registry.delete(req.name, req.version)

    async def _alias(self, req: AliasRequest) -> AliasReply:
        await catch_up(self.registry)
        return await self.registry.set_alias(req.name, req.alias, req.version)


def split_name(name: str) -> str:
    """The bare name of a shown name (for sorting within a tenant)."""
    return name.rpartition("/")[2]
