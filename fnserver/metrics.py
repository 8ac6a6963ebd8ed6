"""``--metrics-port``: the statistics of ``stats`` (PROTOCOL.md §5.14) as Prometheus text.

The exposition and its HTTP server are the ``prometheus-client`` library's (its threaded WSGI
server); what is exposed comes from one collector that asks the event loop for the same
snapshot the ``stats`` operation answers with, so the two never disagree. Under the
supervisor the control process serves it: it holds the store and the serving processes'
reports.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Final

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector

from .config import ServerConfig
from .protocol import LATENCY_BUCKETS_MS, ServerStats, VersionStats

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from .service import Services

__all__ = ["MetricsServer", "families"]

log = logging.getLogger("fnserver")

#: How long a scrape waits for the event loop's snapshot.
SCRAPE_TIMEOUT_S: Final = 10.0


def families(functions: list[VersionStats], server: ServerStats) -> Iterator[Metric]:
    """The metric families of one snapshot."""
    labels = ["tenant", "function", "version"]
    calls = CounterMetricFamily("fnserver_invocations", "Invocations, by function version.", labels=labels)
    errors = CounterMetricFamily(
        "fnserver_invocation_errors", "Failed invocations, by function version and error code.",
        labels=[*labels, "code"],
    )
    starts = CounterMetricFamily(
        "fnserver_invocation_starts", "Invocations by start: cold (the module was loaded first) or warm.",
        labels=[*labels, "start"],
    )
    latency = HistogramMetricFamily(
        "fnserver_invocation_duration_seconds", "Wall time of invocations, by function version.",
        labels=labels,
    )
    for f in functions:
        key = [f.tenant, f.name, str(f.version)]
        calls.add_metric(key, f.calls)
        for code, n in sorted(f.errors.items()):
            errors.add_metric([*key, code], n)
        starts.add_metric([*key, "cold"], f.cold)
        starts.add_metric([*key, "warm"], f.warm)
        cumulative = 0
        buckets: list[tuple[str, float]] = []
        counts = list(f.buckets) or [0] * (len(LATENCY_BUCKETS_MS) + 1)
        for bound, n in zip((*LATENCY_BUCKETS_MS, None), counts, strict=False):
            cumulative += n
            buckets.append(("+Inf" if bound is None else repr(bound / 1000), cumulative))
        latency.add_metric(key, buckets, sum_value=f.total_ms / 1000)
    yield from (calls, errors, starts, latency)
    gauges = {
        "fnserver_processes": ("Serving processes reporting.", server.processes),
        "fnserver_connections": ("Client connections open.", server.connections),
        "fnserver_async_queue_depth": ("Async invocations waiting to run.", server.async_queued),
        "fnserver_waiting_calls": ("Calls waiting for a wasm slot or a native worker.", server.waiting),
        "fnserver_workers_total": ("Native worker processes.", server.workers_total),
        "fnserver_wasm_slots": ("wasm calls that may run at once.", server.wasm_slots),
        "fnserver_wasm_running": ("wasm calls running.", server.wasm_running),
        "fnserver_builds_running": ("Builds running.", server.builds_running),
        "fnserver_event_loop_lag_seconds": ("Longest event loop stall of the last seconds.", server.loop_lag_ms / 1000),
    }
    for name, (doc, value) in gauges.items():
        yield GaugeMetricFamily(name, doc, value=value)
    workers = GaugeMetricFamily("fnserver_workers", "Native worker processes by state.", labels=["state"])
    workers.add_metric(["busy"], server.workers_busy)
    workers.add_metric(["idle"], server.workers_idle)
    yield workers


class _Snapshot(Collector):
    """Collects by asking the server's event loop (scrapes run on the HTTP server's threads)."""

    def __init__(self, services: Services, loop: asyncio.AbstractEventLoop) -> None:
        self.services = services
        self.loop = loop

    def collect(self) -> Iterator[Metric]:
        from .service import CallService

        calls = self.services.calls
        if not isinstance(calls, CallService):  # pragma: no cover - only the store's owner serves
            return
        future = asyncio.run_coroutine_threadsafe(calls.all_stats(), self.loop)
        functions, server = future.result(SCRAPE_TIMEOUT_S)
        yield from families(functions, server)


class MetricsServer:
    """The Prometheus endpoint (any path; ``/metrics`` by convention)."""

    def __init__(self, services: Services, config: ServerConfig) -> None:
        self.services = services
        self.config = config
        self._httpd: WSGIServer | None = None

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        assert self._httpd is not None
        return int(self._httpd.server_port)

    async def start(self) -> None:
        """Bind and serve on a thread of the library's."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Snapshot(self.services, asyncio.get_running_loop()))
        host = self.config.metrics_host or self.config.host
        assert self.config.metrics_port is not None
        self._httpd, _thread = await asyncio.to_thread(
            start_http_server, self.config.metrics_port, host, registry
        )
        log.info("Prometheus metrics on http://%s:%d/metrics", host, self.port)

    def stop(self) -> None:
        """Stop accepting scrapes (the library's serving thread ends within its poll)."""
        if self._httpd is not None:
            httpd, self._httpd = self._httpd, None
            def shut() -> None:
                httpd.shutdown()
                httpd.server_close()

            # shutdown() waits for serve_forever to notice; it must not hold the loop.
            threading.Thread(target=shut, daemon=True).start()
