"""Use cases over the registry that build nothing and run nothing: list, get, delete, alias."""

from __future__ import annotations

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
from ._context import RequestContext

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
        """Every function of the caller's tenant, sorted by name."""
        await catch_up(self.registry)
        return self.registry.list()

    async def get(self, ctx: RequestContext, req: GetRequest) -> GetReply:
        """One function and one page of its versions (build logs only when asked)."""
        return await fresh(
            self.registry,
            lambda: self.registry.get(
                req.name, version=req.version, limit=req.limit, cursor=req.cursor, log=req.log
            ),
        )

    async def delete(self, ctx: RequestContext, req: DeleteRequest) -> DeleteReply:
        """One version, or every version; aliases pointing at them go too."""
        await catch_up(self.registry)
        return await self.registry.delete(req.name, req.version)

    async def alias(self, ctx: RequestContext, req: AliasRequest) -> AliasReply:
        """Create or move an alias."""
        await catch_up(self.registry)
        return await self.registry.set_alias(req.name, req.alias, req.version)
