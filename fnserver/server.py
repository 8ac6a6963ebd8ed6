"""The composition root: one serving process's registry, exec pool, builder, services and fronts.

Nothing here is a use case (see :mod:`fnserver.service`) or a wire concern (see
:mod:`fnserver.transport`): it builds the parts, starts them in order and stops them in reverse.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import ssl
import time
from collections.abc import Awaitable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from . import __version__
from ._quotas import QuotaBook
from ._tls import server_context
from .auth import auth_book_for
from .builder import Builder
from .config import ServerConfig
from .exec import ExecPool
from .metrics import MetricsServer
from .registry import Registry
from .service import ControlLink, Services
from .transport import TcpFront

if TYPE_CHECKING:
    from ._authpg import PostgresAuthFeed
    from .gateway import HttpFront

__all__ = ["FnServer"]

log = logging.getLogger("fnserver")


class FnServer:
    """The fnserver service: registry, builder and exec pool behind the TCP front."""

    def __init__(self, config: ServerConfig, tls: ssl.SSLContext | None = None) -> None:
        # Absolute paths (no file system access): compile processes and workers run with
        # cwd "/", so a relative --data-dir (the default ./functions) must not reach them.
        config = replace(
            config,
            data_dir=config.data_dir.absolute(),
            build_cache_dir=config.build_cache_dir and config.build_cache_dir.absolute(),
            compile_cache_dir=config.compile_cache_dir and config.compile_cache_dir.absolute(),
        )
        if config.role == "control":
            # Its socket is loopback, reachable with the supervisor's secret only, and its
            # clients are the serving processes (all from 127.0.0.1, one shared connection
            # each that may stay quiet, plus one per relayed register): the limits that guard
            # a public port against hostile clients would only refuse them.
            config = replace(
                config,
                max_connections_per_peer=config.max_connections,
                idle_timeout_s=math.inf,
            )
        self.config = config
        serving = config.role == "serving"
        limits = {"default_timeout_ms": config.default_timeout_ms, "default_memory_mb": config.default_memory_mb}
        dsn = config.registry_url  # the reader's URL in a serving process that was given one
        if dsn is not None:
            # Shared by every node; this node's artifact cache in its data directory, filled
            # by the process that writes it (a serving process waits for it: it cannot write).
            self.registry = Registry.postgres(
                dsn, config.data_dir / ".node", read_only=serving,
                default_timeout_ms=config.default_timeout_ms, default_memory_mb=config.default_memory_mb,
            )
        else:
            self.registry = Registry.local(config.data_dir, read_only=serving, **limits)
        # A serving process hands native calls, compiles and every write to its control
        # process (service/_control.py); the other roles do them here.
        self.link: ControlLink | None = None
        if serving:
            if config.control_address is None or config.control_token is None:
                raise ValueError("a serving process needs its control process's address and token")
            self.link = ControlLink(config.control_address, config.control_token)
        cpus = os.cpu_count() or 1
        # One bound for builds and wasm compiles together (issue 9: compiles are counted with
        # the builds), held by whichever process builds and compiles.
        heavy = asyncio.Semaphore(config.max_builds)
        # Native workers: the control process holds the node's; a lone process gets a share.
        workers = config.workers or (
            max(2, cpus) if config.role == "control" else max(2, cpus // (config.processes or cpus))
        )
        self.pool = ExecPool(
            workers=workers,
            max_queue=config.max_queue,
            per_function=config.per_function,
            cache_dir=config.modules_dir,
            wasm_slots=config.wasm_slots,
            wasm_per_function=config.wasm_per_function,
            hidden=(config.data_dir, config.cache_dir),
            delegate=self.link,
            unsandboxed_native=config.unsandboxed_native,
            compile_slots=heavy,
        )
        self.builder: Builder | None = None
        if not serving:
            self.builder = Builder(
                config.cache_dir,
                max_concurrent=config.max_builds,
                timeout_s=config.build_timeout_s,
                memory_mb=config.build_memory_mb,
                max_artifact=config.max_artifact,
                slots=heavy,
            )
        quotas = QuotaBook(config.tenant_limits)
        # Tokens and tenants: in the registry's database when it has one (every node sees an
        # edit at once), else in the auth file.
        self.auth_feed: PostgresAuthFeed | None = None
        if dsn is not None:
            from ._authpg import PostgresAuthFeed

            self.auth_feed = PostgresAuthFeed(dsn, read_only=serving)
        self.services = Services(
            config, self.registry, self.pool, self.builder, self.link,
            quotas=quotas, auth=auth_book_for(config, quotas, self.auth_feed),
        )
        if tls is None and config.role != "control":
            # Made here when nobody made it before a privilege drop (role "all": tests,
            # embedding). The control process's socket is loopback, for its serving processes.
            tls = server_context(config)
        self.tcp = TcpFront(config, self.services, tls if config.role != "control" else None)
        # The HTTP gateway (docs/HTTP.md): the same services, on the same loop; serving
        # processes only (the control process's socket is for them, not for clients).
        self.http: HttpFront | None = None
        if config.http_port is not None and config.role != "control":
            from .gateway import HttpFront

            self.http = HttpFront(config, self.services, self.tcp, tls)
        self.services.connection_count = lambda: len(self.tcp.connections()) + self.tcp.others
        self.services.loop_lag_s = self.tcp.lag.recent_lag_s
        self.metrics: MetricsServer | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._stopping = False
        self._stopped = asyncio.Event()

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop` began."""
        return self._stopping

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        return self.tcp.port

    @property
    def address(self) -> str:
        """``host:port`` as a client would dial it."""
        host = self.config.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    async def start(self) -> None:
        """Open the registry, start workers, then listen."""
        if self.config.role != "serving":
            await asyncio.to_thread(self.config.data_dir.mkdir, parents=True, exist_ok=True)
        await self.registry.open()
        if self.auth_feed is not None:
            await self.auth_feed.open()
        await self.pool.start()
        await self.services.start()
        await self.tcp.start()
        if self.http is not None:
            await self.http.start()
        if self.config.metrics_port is not None and self.config.role != "serving":
            self.metrics = MetricsServer(self.services, self.config)
            await self.metrics.start()
        if self.config.warm_builds and self.builder is not None:
            self.spawn(self._warm_builds())
        if self.config.listen_fd is None:
            log.info("fnserver %s listening on %s (data %s)", __version__, self.address, self.config.data_dir)
        else:  # the supervisor says "listening" once every serving process is up
            log.info("%s process %d up on %s", self.config.role, os.getpid(), self.address)

    async def _warm_builds(self) -> None:
        assert self.builder is not None
        log.info("warming the C toolchain cache in the background (a C or Zig build started now waits for it)")
        started = time.monotonic()
        try:
            await self.builder.warm()
        except Exception as exc:  # a failed warm-up only means a slower first build
            log.warning("warming the C toolchain cache failed: %s", exc)
        else:
            log.info("C toolchain cache warm in %.1f s", time.monotonic() - started)

    def spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        """Run a server-owned background task; it is cancelled at stop."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

    async def serve_until_stopped(self) -> None:
        """Block until :meth:`stop` has finished."""
        await self._stopped.wait()

    async def stop(self) -> None:
        """Stop cleanly (PROTOCOL.md §7): the front first, then background work, the pool and
        the registry."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        grace = self.config.shutdown_grace_s
        if self.http is not None:
            await asyncio.gather(self.tcp.stop(grace), self.http.stop(grace))
        else:
            await self.tcp.stop(grace)
        current = asyncio.current_task()
        others = [t for t in self._background if t is not current]
        for task in others:
            task.cancel()
        if others:
            await asyncio.wait(others, timeout=2.0)
        if self.metrics is not None:
            self.metrics.stop()
        await self.services.close()
        await self.pool.close()
        if self.builder is not None:
            self.builder.close()
        if self.link is not None:
            await self.link.close()
        if self.auth_feed is not None:
            await self.auth_feed.close()
        await self.registry.close()
        self._stopped.set()
        log.info("fnserver stopped")
