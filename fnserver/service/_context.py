"""Who is asking, for which tenant, under which request id and deadline: the request context.

Every use case takes one. Fronts (TCP today, HTTP later) build it from what they know about
the connection; the services never see a socket, a frame or a header.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Final

from ..protocol import DEFAULT_TENANT

__all__ = ["DEFAULT_TENANT", "INTERNAL_ID", "ROLES", "SHARED_ID", "Caller", "RequestContext"]

#: What a token may do (``service/_access.py``): admin (every tenant, everything), deployer
#: (its tenant: register, alias, delete, invoke, read), invoker (its tenant: invoke, read).
ROLES: Final = ("admin", "deployer", "invoker")
#: Token ids of the two callers that hold no token of the auth file: a client with the shared
#: secret (FNSERVER_TOKEN), and a serving process relaying to its control process.
SHARED_ID: Final = "shared"
INTERNAL_ID: Final = "internal"

_ids = itertools.count(1)


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated identity: ``token_id`` names the credential (never the secret); None
    on a server without tokens, where every caller is the default tenant's admin."""

    token_id: str | None = None
    tenant: str = DEFAULT_TENANT
    role: str = "admin"


@dataclass(frozen=True, slots=True)
class RequestContext:
    """One request as the services see it.

    ``deadline`` is a :func:`time.monotonic` instant after which nobody waits for the answer
    (None: the operation's own limits apply); ``peer`` is for logs only.
    """

    caller: Caller = field(default_factory=Caller)
    request_id: str = ""
    deadline: float | None = None
    peer: str = ""

    @classmethod
    def new(cls, caller: Caller, *, peer: str = "", deadline: float | None = None, tag: str = "") -> RequestContext:
        """A context with a server-unique request id (``tag`` is the front's own id, for logs)."""
        rid = f"{next(_ids)}" if not tag else f"{next(_ids)}:{tag}"
        return cls(caller=caller, request_id=rid, deadline=deadline, peer=peer)

    def remaining(self) -> float | None:
        """Seconds left before the deadline, or None when there is none."""
        if self.deadline is None:
            return None
        return self.deadline - time.monotonic()
