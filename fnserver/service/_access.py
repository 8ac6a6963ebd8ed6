"""Who may do what: the one table of roles and operations, and the audit log.

Every front asks :func:`authorize` before it starts an operation, with the operation's wire
name (the HTTP gateway maps its routes to the same names). Which *functions* a caller may see
is a separate question, answered by the names module of the service layer: another tenant's
function is NOT_FOUND there, so that its existence does not leak.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from ..protocol import OPS, PermissionDeniedError
from ._context import INTERNAL_ID, ROLES, Caller, RequestContext

__all__ = ["OP_NEEDS", "ROLE_GRANTS", "audit_event", "audit_refused_hello", "authorize"]

audit = logging.getLogger("fnserver.audit")

READ: Final = "read"
INVOKE: Final = "invoke"
DEPLOY: Final = "deploy"
#: Reaching every tenant's functions (``TENANT/NAME``, ``list`` with ``all``).
ALL_TENANTS: Final = "all_tenants"
#: The serving processes' own operations with their control process (PROTOCOL.md §5.15).
INTERNAL: Final = "internal"

#: What each role may do.
ROLE_GRANTS: Final[Mapping[str, frozenset[str]]] = MappingProxyType(
    {
        "admin": frozenset({READ, INVOKE, DEPLOY, ALL_TENANTS}),
        "deployer": frozenset({READ, INVOKE, DEPLOY}),
        "invoker": frozenset({READ, INVOKE}),
    }
)
#: What each operation needs (None: any authenticated caller). HELLO is where the caller is
#: established, so it needs nothing; a test checks this table against the operations table.
OP_NEEDS: Final[Mapping[str, str | None]] = MappingProxyType(
    {
        "hello": None,
        "ping": None,
        "list": READ,
        "get": READ,
        "invoke": INVOKE,
        # Compiling a version into the node's cache is part of deploying it.
        "compile": DEPLOY,
        "register": DEPLOY,
        "upload": DEPLOY,
        "alias": DEPLOY,
        "delete": DEPLOY,
        # An async call's result is read by whoever may invoke; records and tallies are reads.
        "result": INVOKE,
        "logs": READ,
        "stats": READ,
        # A serving process and its control process (§5.15): no token of the auth file.
        "report": INTERNAL,
        "claim": INTERNAL,
        "renew": INTERNAL,
        "complete": INTERNAL,
    }
)
if set(OP_NEEDS) != OPS or set(ROLE_GRANTS) != set(ROLES):  # pragma: no cover - caught at import
    raise ImportError("the access table and the operations or roles disagree")

_ROLE_HINT: Final = {READ: "invoker", INVOKE: "invoker", DEPLOY: "deployer", ALL_TENANTS: "admin", INTERNAL: "internal"}


def allowed(caller: Caller, grant: str) -> bool:
    """Whether ``caller``'s role carries ``grant``."""
    if grant == INTERNAL:
        return caller.token_id == INTERNAL_ID
    return grant in ROLE_GRANTS.get(caller.role, frozenset())


def authorize(caller: Caller, op: str) -> None:
    """Raise PermissionDeniedError if ``caller``'s role may not do ``op``."""
    need = OP_NEEDS.get(op)
    if need is None or allowed(caller, need):
        return
    raise PermissionDeniedError(
        f"role '{caller.role}' may not {op}: that needs a token with role"
        f" '{_ROLE_HINT[need]}' or higher",
        {"role": caller.role, "operation": op},
    )


def require(caller: Caller, grant: str, what: str) -> None:
    """Raise PermissionDeniedError unless ``caller`` has ``grant``; ``what`` is the action."""
    if not allowed(caller, grant):
        raise PermissionDeniedError(
            f"role '{caller.role}' may not {what}: that needs role '{_ROLE_HINT[grant]}'",
            {"role": caller.role, "operation": what},
        )


def audit_event(ctx: RequestContext, event: str, outcome: str, **fields: object) -> None:
    """One audit line: what happened, to what, by which token (its id, never the token),
    of which tenant, from where. Key=value, so that it greps and parses."""
    extra = "".join(f" {k}={v}" for k, v in fields.items() if v is not None)
    audit.info(
        "%s outcome=%s tenant=%s token=%s role=%s peer=%s%s",
        event,
        outcome,
        ctx.caller.tenant,
        ctx.caller.token_id or "-",
        ctx.caller.role,
        ctx.peer or "-",
        extra,
    )


def audit_refused_hello(peer: str, token_id: str | None, reason: str) -> None:
    """The audit line of a HELLO refused for its token (``reason``: missing or invalid)."""
    audit.info(
        "hello_refused outcome=UNAUTHENTICATED tenant=- token=%s role=- peer=%s reason=%s",
        token_id or "-",
        peer or "-",
        reason,
    )
