"""The use cases: register, invoke, list/get/delete/alias, behind one facade for every front.

Each takes a :class:`RequestContext` and a typed request record and returns a typed reply
record; none knows a socket, a frame or an HTTP header. See docs/ARCHITECTURE.md.
"""

from __future__ import annotations

from ._access import audit_event, audit_refused_hello, authorize
from ._calls import CallService, RelayedCallService
from ._context import DEFAULT_TENANT, ROLES, Caller, RequestContext
from ._control import ControlLink
from ._functions import FunctionService
from ._invoke import InvokeService
from ._register import Progress, RegisterService, UploadSink
from ._services import Services

__all__ = [
    "CallService",
    "RelayedCallService",
    "DEFAULT_TENANT",
    "ROLES",
    "Caller",
    "ControlLink",
    "FunctionService",
    "InvokeService",
    "Progress",
    "RegisterService",
    "RequestContext",
    "Services",
    "UploadSink",
    "audit_event",
    "audit_refused_hello",
    "authorize",
]
