"""``fnserver`` command: start the server on its embedded defaults (see ``--help``)."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import math
import os
import signal
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from . import __version__
from ._configfile import ConfigError, defaults_from, environ, options_of, to_toml
from ._logs import setup_logging
from ._tls import TlsConfigError, server_context
from .config import ServerConfig, TenantLimits
from .protocol import FnError

__all__ = ["Command", "main", "parse_args"]


@dataclass(frozen=True)
class Command:
    """The parsed command line: the server's settings and how this process takes part."""

    config: ServerConfig
    #: Serving processes the supervisor starts (``--processes``).
    processes: int
    #: Set in a process the supervisor started: the pipe to report ready on.
    ready_fd: int | None = None
    #: Set in a process the supervisor started: the pipe holding the control process's secret.
    secret_fd: int | None = None
    #: The deprecated ``--token`` flag was given (warned about once, by the supervisor).
    token_flag: bool = False


def parse_args(argv: list[str] | None = None) -> ServerConfig:
    """Turn the command line into a :class:`ServerConfig`."""
    return parse_command(argv).config


def parse_command(argv: list[str] | None = None) -> Command:
    """Turn the command line into a :class:`Command`."""
    d = ServerConfig()
    p = argparse.ArgumentParser(
        prog="fnserver",
        description="Self-hosted serverless functions: register WebAssembly, Go, C, Zig or native "
        "functions and invoke them in a sandbox over a msgpack/TCP protocol.",
    )
    p.add_argument("--host", default=d.host, help=f"address to listen on (default {d.host})")
    p.add_argument("--port", type=int, default=d.port, help=f"TCP port, 0 for any (default {d.port})")
    p.add_argument("--data-dir", type=Path, default=d.data_dir, help="where functions are stored (default ./functions)")
    p.add_argument("--auth-file", type=Path, default=None, help="tokens, tenants and tenant quotas (default <data-dir>/auth.toml; edit with 'fnserver token')")
    p.add_argument("--tls-cert", type=Path, default=None, help="serve TLS: the PEM certificate chain (with --tls-key); clients dial tls://HOST:PORT")
    p.add_argument("--tls-key", type=Path, default=None, help="the PEM private key of --tls-cert (read before the serving processes give up root)")
    p.add_argument("--insecure", action="store_true", help="serve a non-loopback address even though no token exists (anyone who reaches the port may run code)")
    p.add_argument("--token", default=None, help=argparse.SUPPRESS)  # deprecated: visible in /proc; FNSERVER_TOKEN
    p.add_argument("--processes", type=int, default=None, help="serving processes sharing the port, restarted if they die (default: one per CPU)")
    p.add_argument("--slots", type=int, default=d.wasm_slots, help=f"wasm calls running at once per serving process (default {d.wasm_slots})")
    p.add_argument("--slots-per-function", type=int, default=None, help="wasm calls of one function running at once per serving process (default: a quarter of --slots)")
    p.add_argument("--workers", type=int, default=None, help="native-mode worker processes per serving process (default: the CPUs divided among the serving processes, at least 2)")
    p.add_argument("--max-queue", type=int, default=d.max_queue, help=f"invocations that may wait for a slot or a worker, per serving process (default {d.max_queue})")
    p.add_argument("--per-function", type=int, default=None, help="native workers one function may use at once (default: all workers but one, at least 1)")
    p.add_argument("--max-upload-mb", type=int, default=d.max_upload // (1024 * 1024), help="largest upload in MiB (default 64)")
    p.add_argument("--default-timeout-ms", type=int, default=d.default_timeout_ms, help=f"function time limit when none is set (default {d.default_timeout_ms})")
    p.add_argument("--max-timeout-ms", type=int, default=d.max_timeout_ms, help=f"largest time limit a function may ask for (default {d.max_timeout_ms})")
    p.add_argument("--default-memory-mb", type=int, default=d.default_memory_mb, help=f"function memory limit when none is set (default {d.default_memory_mb})")
    p.add_argument("--max-memory-mb", type=int, default=d.max_memory_mb, help=f"largest memory limit a function may ask for (default {d.max_memory_mb})")
    p.add_argument("--max-artifact-mb", type=int, default=d.max_artifact // (1024 * 1024), help=f"largest artifact a build may make, in MiB (default {d.max_artifact // (1024 * 1024)})")
    p.add_argument("--max-builds", type=int, default=d.max_builds, help=f"builds running at once (default {d.max_builds})")
    p.add_argument("--build-timeout", type=float, default=d.build_timeout_s, help=f"seconds a build may take (default {d.build_timeout_s:g})")
    p.add_argument("--cache-dir", type=Path, default=None, help="build caches (default <data-dir>/.cache)")
    p.add_argument("--unsandboxed-native", action="store_true", help="run native functions even where their sandbox is incomplete (not root, no namespaces or seccomp); refused by default")
    p.add_argument("--no-warm", action="store_true", help="do not warm the C toolchain cache at start")
    # Connection limits, per serving process (OPERATIONS.md "Connection limits").
    p.add_argument("--max-connections", type=int, default=d.max_connections, help=f"connections open at once per serving process (default {d.max_connections})")
    p.add_argument("--max-connections-per-peer", type=int, default=d.max_connections_per_peer, help=f"connections from one address per serving process (default {d.max_connections_per_peer})")
    p.add_argument("--hello-timeout", type=float, default=d.hello_timeout_s, help=f"seconds a new connection has to send HELLO (default {d.hello_timeout_s:g})")
    p.add_argument("--frame-timeout", type=float, default=d.frame_timeout_s, help=f"seconds one frame may take to arrive (default {d.frame_timeout_s:g})")
    p.add_argument("--idle-timeout", type=float, default=d.idle_timeout_s, help=f"seconds a connection with nothing in flight may stay silent (default {d.idle_timeout_s:g})")
    p.add_argument("--write-timeout", type=float, default=d.write_timeout_s, help=f"seconds a connection may leave replies unread before it is dropped (default {d.write_timeout_s:g})")
    p.add_argument("--max-buffered-mb", type=int, default=d.max_buffered // (1024 * 1024), help=f"MiB of unfinished frames all connections may buffer (default {d.max_buffered // (1024 * 1024)})")
    p.add_argument("--max-reply-mb", type=int, default=d.max_reply_buffer // (1024 * 1024), help=f"MiB of unread replies one connection may hold (default {d.max_reply_buffer // (1024 * 1024)})")
    p.add_argument("--max-reply-total-mb", type=int, default=d.max_reply_total // (1024 * 1024), help=f"MiB of unread replies all connections may hold (default {d.max_reply_total // (1024 * 1024)})")
    p.add_argument("--max-registers-per-connection", type=int, default=d.max_registers_per_connection, help=f"registers one connection may have in progress (default {d.max_registers_per_connection})")
    # Tenant quotas, defaults for every tenant (OPERATIONS.md "Quotas"; the auth file overrides).
    p.add_argument("--tenant-max-functions", type=int, default=None, help="functions one tenant may have (default: no limit)")
    p.add_argument("--tenant-max-versions", type=int, default=None, help="versions one function of a tenant may keep (default: no limit)")
    p.add_argument("--tenant-max-storage-mb", type=int, default=None, help="MiB of uploads and artifacts one tenant may store (default: no limit)")
    p.add_argument("--tenant-max-concurrency", type=int, default=None, help="invocations of one tenant running at once, server-wide (default: no limit)")
    p.add_argument("--tenant-max-rps", type=float, default=None, help="invocations per second of one tenant, server-wide (default: no limit)")
    p.add_argument("--tenant-max-builds", type=int, default=None, help="registers of one tenant building at once (default: no limit)")
    # Operations (OPERATIONS.md "Async invocations", "Invocation logs", "Metrics", "Logs").
    p.add_argument("--async-max-queue", type=int, default=d.async_max_queue, help=f"async invocations that may wait, server-wide; past it UNAVAILABLE (default {d.async_max_queue})")
    p.add_argument("--async-concurrency", type=int, default=d.async_concurrency, help=f"async invocations one serving process runs at once (default {d.async_concurrency})")
    p.add_argument("--async-lease", type=float, default=d.async_lease_s, help=f"seconds a claimed async invocation is leased for, renewed while it runs; a call whose node died runs again elsewhere once its lease runs out (default {d.async_lease_s:g})")
    p.add_argument("--result-ttl", type=float, default=d.result_ttl_s, help=f"seconds an async result is kept after it finished (default {d.result_ttl_s:g})")
    p.add_argument("--max-records", type=int, default=d.max_records, help=f"invocation records kept for 'fn logs', server-wide (default {d.max_records})")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics over HTTP on this port (default: off)")
    p.add_argument("--metrics-host", default=None, help="address of the metrics port (default: --host)")
    p.add_argument("--registry", default=None, help="keep the registry, async calls and records in this PostgreSQL database, shared by every node naming it: postgresql://USER@HOST:PORT/DB (default: the data directory; docs/SCALING.md)")
    p.add_argument("--registry-reader", default=None, metavar="URL", help="serving processes connect to the registry with this URL instead, as a role that may only read (default: --registry; docs/SCALING.md \"A role that only reads\")")
    p.add_argument("--http-port", type=int, default=None, help="serve the HTTP gateway (REST API, dashboard, /healthz, /metrics) on this port (default: off; docs/HTTP.md)")
    p.add_argument("--http-host", default=None, help="address of the HTTP gateway (default: --host)")
    p.add_argument("--log-level", default=d.log_level, choices=["debug", "info", "warning", "error"], help="info logs one access line per request (default info)")
    p.add_argument("--log-format", default=d.log_format, choices=["text", "json"], help="text: human lines; json: one JSON object per line (default text)")
    p.add_argument("--config", type=Path, default=None, help="read options from this TOML file (keys: the flags' names with underscores); FNSERVER_<KEY> variables override it, flags override both")
    p.add_argument("--print-config", action="store_true", help="print the effective configuration as TOML and exit")
    p.add_argument("--version", action="version", version=f"fnserver {__version__}")
    # Set by the supervisor for the serving processes it starts (fnserver/supervisor.py).
    p.add_argument("--serve-fd", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--http-fd", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--role", choices=["serving", "control"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--control", default=None, help=argparse.SUPPRESS)
    p.add_argument("--secret-fd", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--usage-fd", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--usage-column", type=int, default=None, help=argparse.SUPPRESS)
    # Defaults < the --config file < FNSERVER_* variables < flags (OPERATIONS.md "Configuration").
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path, default=None)
    known, _rest = pre.parse_known_args(argv)
    options = options_of(p)
    try:
        p.set_defaults(**defaults_from(options, known.config, environ()))
    except ConfigError as exc:
        p.exit(2, f"fnserver: error: {exc}\n")  # the file or variable to fix, without the usage
    a = p.parse_args(argv)
    for flag in ("workers", "processes", "slots", "slots_per_function", "per_function", "max_artifact_mb"):
        value = getattr(a, flag)
        if value is not None and value < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    for flag in ("max_connections", "max_connections_per_peer", "max_buffered_mb", "max_reply_mb", "max_reply_total_mb", "max_registers_per_connection"):
        if getattr(a, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    for flag in ("tenant_max_functions", "tenant_max_versions", "tenant_max_storage_mb", "tenant_max_concurrency", "tenant_max_builds"):
        if getattr(a, flag) is not None and getattr(a, flag) < 0:
            p.error(f"--{flag.replace('_', '-')} must be 0 or more")
    for flag in ("async_max_queue", "async_concurrency", "max_records"):
        if getattr(a, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if not 1 <= a.async_lease < math.inf:
        # Renewed every third of it: below a second, a busy event loop could miss a renewal.
        p.error("--async-lease must be a number of seconds, at least 1")
    if not a.result_ttl > 0:
        p.error("--result-ttl must be more than 0")
    if a.metrics_port is not None and not 0 <= a.metrics_port <= 65535:
        p.error("--metrics-port must be a port number from 0 to 65535")
    if a.registry is not None and not a.registry.startswith(("postgresql://", "postgres://")):
        p.error("--registry must be a PostgreSQL URL: postgresql://USER@HOST:PORT/DB")
    if a.registry_reader is not None:
        if a.registry is None:
            p.error("--registry-reader needs --registry: it is how serving processes reach that database")
        if not a.registry_reader.startswith(("postgresql://", "postgres://")):
            p.error("--registry-reader must be a PostgreSQL URL: postgresql://USER@HOST:PORT/DB")
    if a.http_port is not None and not 0 <= a.http_port <= 65535:
        p.error("--http-port must be a port number from 0 to 65535")
    if a.print_config:
        sys.stdout.write(to_toml(options, a))
        raise SystemExit(0)
    if a.tenant_max_rps is not None and not a.tenant_max_rps > 0:
        p.error("--tenant-max-rps must be more than 0")
    for flag in ("hello_timeout", "frame_timeout", "idle_timeout", "write_timeout"):
        if not getattr(a, flag) > 0:
            p.error(f"--{flag.replace('_', '-')} must be more than 0")
    processes = a.processes or os.cpu_count() or 1
    shared = os.environ.get("FNSERVER_TOKEN") or None
    if a.token:
        shared = a.token
    config = ServerConfig(
        host=a.host,
        port=a.port,
        data_dir=a.data_dir,
        token=shared,
        auth_file=a.auth_file,
        insecure=a.insecure,
        tls_cert=a.tls_cert,
        tls_key=a.tls_key,
        processes=processes,
        wasm_slots=a.slots,
        wasm_per_function=a.slots_per_function,
        listen_fd=a.serve_fd,
        workers=a.workers,
        max_queue=a.max_queue,
        per_function=a.per_function,
        max_upload=a.max_upload_mb * 1024 * 1024,
        default_timeout_ms=a.default_timeout_ms,
        max_timeout_ms=a.max_timeout_ms,
        default_memory_mb=a.default_memory_mb,
        max_memory_mb=a.max_memory_mb,
        max_builds=a.max_builds,
        build_timeout_s=a.build_timeout,
        max_artifact=a.max_artifact_mb * 1024 * 1024,
        warm_builds=not a.no_warm,
        unsandboxed_native=a.unsandboxed_native,
        build_cache_dir=a.cache_dir,
        role=a.role or "all",
        control_address=a.control,
        max_connections=a.max_connections,
        max_connections_per_peer=a.max_connections_per_peer,
        hello_timeout_s=a.hello_timeout,
        frame_timeout_s=a.frame_timeout,
        idle_timeout_s=a.idle_timeout,
        write_timeout_s=a.write_timeout,
        max_buffered=a.max_buffered_mb * 1024 * 1024,
        max_reply_buffer=a.max_reply_mb * 1024 * 1024,
        max_reply_total=a.max_reply_total_mb * 1024 * 1024,
        max_registers_per_connection=a.max_registers_per_connection,
        tenant_limits=TenantLimits(
            max_functions=a.tenant_max_functions,
            max_versions=a.tenant_max_versions,
            max_storage_mb=a.tenant_max_storage_mb,
            max_concurrency=a.tenant_max_concurrency,
            max_rps=a.tenant_max_rps,
            max_builds=a.tenant_max_builds,
        ),
        usage_fd=a.usage_fd,
        usage_column=a.usage_column,
        async_max_queue=a.async_max_queue,
        async_concurrency=a.async_concurrency,
        async_lease_s=a.async_lease,
        result_ttl_s=a.result_ttl,
        max_records=a.max_records,
        metrics_port=a.metrics_port,
        metrics_host=a.metrics_host,
        http_port=a.http_port,
        registry=a.registry,
        registry_reader=a.registry_reader,
        http_host=a.http_host,
        http_fd=a.http_fd,
        log_level=a.log_level,
        log_format=a.log_format,
    )
    return Command(config, processes, a.ready_fd, a.secret_fd, token_flag=bool(a.token))


def _read_secret(fd: int) -> str:
    """The control process's secret, from the pipe the supervisor filled (not argv or env:
    those are readable in /proc)."""
    with os.fdopen(fd, "rb") as f:
        return f.read(4096).decode().strip()


async def _serve(config: ServerConfig, ready_fd: int | None) -> None:
    from .server import FnServer

    try:
        tls = server_context(config) if config.role != "control" else None
        if config.role == "serving":
            from ._privileges import drop_root

            config = drop_root(config).config
        server = FnServer(config, tls)
        await server.start()
    except (OSError, FnError, TlsConfigError) as exc:
        # The operator's to fix (a port in use, a data directory that is not one): one line.
        logging.getLogger("fnserver").error("cannot start: %s", exc)
        raise SystemExit(1) from None
    # What starting made (modules, engines, caches) lives as long as the process: frozen out
    # of the cyclic collector, a full collection scans only what came later. Unfrozen, one
    # took 16-25 ms here, holding the loop and landing inside inline guest calls, which then
    # looked long and were sent to threads (issue 8). Collected first: garbage frozen now
    # would never be freed.
    gc.collect()
    gc.freeze()
    if ready_fd is not None:
        os.write(ready_fd, b"r")  # tell the supervisor this serving process is up
        os.close(ready_fd)
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task[None]] = []

    def on_signal() -> None:
        # A second signal while stopping is ignored: the first one already bounds the wait.
        if not stopping:
            stopping.append(loop.create_task(server.stop()))

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    await server.serve_until_stopped()
    for task in stopping:
        await task


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``fnserver`` console script: the supervisor, or (started by it with
    ``--serve-fd``) one serving process."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["token"]:
        from ._tokencli import token_main

        sys.exit(token_main(args[1:]))
    if args[:1] == ["tenant"]:
        from ._tokencli import tenant_main

        sys.exit(tenant_main(args[1:]))
    cmd = parse_command(argv)
    config = cmd.config
    # Here, not in parse_command: parsing must not reconfigure an embedding program's logging.
    setup_logging(config.log_level, config.log_format)
    if cmd.token_flag and config.role == "all":  # once, in the supervisor, not in its children
        logging.getLogger("fnserver").warning(
            "--token is deprecated: every local user can read it in /proc/PID/cmdline."
            " Create tokens with 'fnserver token add TENANT ROLE', or put a shared secret in"
            " FNSERVER_TOKEN"
        )
    if config.listen_fd is None:
        from .auth import exposure_problem
        from .supervisor import Supervisor

        problem = exposure_problem(config)
        if problem is None:
            try:
                server_context(config)  # a bad certificate stops the start here, once
            except TlsConfigError as exc:
                problem = str(exc)
        if problem is not None:
            print(f"fnserver: {problem}", file=sys.stderr)
            sys.exit(2)

        sys.exit(Supervisor(config, cmd.processes, args).run())
    from .transport import big_blocks_from_mmap

    big_blocks_from_mmap()
    if cmd.secret_fd is not None:
        secret = _read_secret(cmd.secret_fd)
        config = replace(config, control_token=secret)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; stay usable without it
        asyncio.run(_serve(config, cmd.ready_fd))
    else:
        uvloop.run(_serve(config, cmd.ready_fd))


if __name__ == "__main__":
    main()
