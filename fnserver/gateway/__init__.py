"""The HTTP gateway (docs/HTTP.md): the original REST routes, ``/v1`` with its OpenAPI
document, ``/healthz``, ``/readyz``, ``/metrics`` and the dashboard, over the same services as
the TCP front."""

from __future__ import annotations

from ._common import STATUS
from ._front import HttpFront

__all__ = ["STATUS", "HttpFront"]
