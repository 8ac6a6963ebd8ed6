"""Namespaces: between the name a caller says and the key the registry keeps.

A tenant sees only its own functions: ``echo`` said by a caller of tenant ``acme`` is the
registry key ``acme/echo`` (``protocol.qualify``; the default tenant's keys are bare names, so
data written before tenants existed is the default tenant's). An admin may name another
tenant's function ``TENANT/NAME``. Anyone else naming another tenant's function gets the very
NOT_FOUND a missing function gets: existence does not leak. Replies show names the way the
caller would say them: its own functions bare, another tenant's qualified.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any, TypeVar

from ..protocol import FnError, VersionInfo, qualify, split_qualified
from ..registry._interfaces import no_function
from ._access import ALL_TENANTS, allowed
from ._context import Caller

__all__ = ["key_for", "renamed", "shown", "tenant_of"]

R = TypeVar("R")


def key_for(caller: Caller, name: str) -> str:
    """The registry key ``name`` means for ``caller``; NOT_FOUND for another tenant's function
    unless the caller is an admin."""
    if "/" not in name:
        return qualify(caller.tenant, name)
    tenant, bare = split_qualified(name)
    if tenant != caller.tenant and not allowed(caller, ALL_TENANTS):
        raise no_function(name)
    return qualify(tenant, bare)


def tenant_of(key: str) -> str:
    """The tenant a registry key belongs to (whose quotas and share it counts against)."""
    return split_qualified(key)[0]


def shown(caller: Caller, key: str) -> str:
    """A registry key as ``caller`` would say it."""
    tenant, bare = split_qualified(key)
    return bare if tenant == caller.tenant else f"{tenant}/{bare}"


def renamed(reply: R, caller: Caller, key: str) -> R:
    """``reply`` (a record with a ``name`` and perhaps ``versions``) with names shown for
    ``caller``."""
    name = shown(caller, key)
    if name == key:
        return reply
    changes: dict[str, Any] = {"name": name}
    versions = getattr(reply, "versions", None)
    if isinstance(versions, tuple) and versions and isinstance(versions[0], VersionInfo):
        changes["versions"] = tuple(dataclasses.replace(v, name=name) for v in versions)
    return dataclasses.replace(reply, **changes)  # type: ignore[type-var]


@contextlib.contextmanager
def said_as(caller: Caller, key: str, given: str) -> Iterator[None]:
    """Errors raised inside name the function as the caller said it, not by its key."""
    try:
        yield
    except FnError as err:
        if key != given:
            err.message = err.message.replace(repr(key), repr(given)).replace(f"'{key}'", f"'{given}'")
            err.args = (err.message,)
            if err.details.get("name") == key:
                err.details["name"] = given
        raise
