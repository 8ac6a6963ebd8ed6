"""Server settings: one frozen record, built from the command line (``fnserver --help``)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Literal

from .protocol import CHUNK_SIZE, DEFAULT_MAX_FRAME

__all__ = ["ServerConfig", "TenantLimits", "is_loopback"]

MiB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class TenantLimits:
    """One tenant's quotas (``service/_quotas.py``); None is no limit."""

    max_functions: int | None = None
    #: Versions kept per function.
    max_versions: int | None = None
    max_storage_mb: int | None = None
    #: Invocations running at once, across every serving process.
    max_concurrency: int | None = None
    #: Invocations per second (a token bucket holding one second's worth).
    max_rps: float | None = None
    #: Registers building at once.
    max_builds: int | None = None

    def overridden_by(self, other: TenantLimits) -> TenantLimits:
        """These limits with every quota ``other`` sets taken from it."""
        changes = {f.name: getattr(other, f.name) for f in fields(other) if getattr(other, f.name) is not None}
        return replace(self, **changes)

    @property
    def metered(self) -> bool:
        """True if calls count against the shared table (a concurrency or rate quota)."""
        return self.max_concurrency is not None or self.max_rps is not None


@dataclass(frozen=True)
class ServerConfig:
    """Everything the server needs to know at start; the defaults are the embedded setup."""

    host: str = "127.0.0.1"
    port: int = 8080
    data_dir: Path = Path("./functions")
    #: A secret every client may send instead of a token (FNSERVER_TOKEN): the caller is then
    #: the default tenant's admin. Tokens (the auth file) are the way to give out access.
    token: str | None = None
    #: Tokens, tenants and per-tenant quotas (``fnserver/auth.py``); None: <data-dir>/auth.toml.
    auth_file: Path | None = None
    #: Serve a non-loopback address without any token (refused otherwise).
    insecure: bool = False
    #: TLS on the public port: a PEM certificate chain and its private key (both or neither).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    max_frame: int = DEFAULT_MAX_FRAME
    max_upload: int = 64 * MiB
    chunk_size: int = CHUNK_SIZE
    #: Function limits: defaults when a register names none, and the most a register may ask.
    default_timeout_ms: int = 5_000
    max_timeout_ms: int = 300_000
    default_memory_mb: int = 128
    max_memory_mb: int = 2048
    output_bytes: int = 6 * MiB
    #: Serving processes sharing the port (``fnserver.supervisor``); None means one per CPU.
    processes: int | None = None
    #: Native-mode worker processes per serving process; None means the CPUs divided among
    #: the serving processes, at least 2 (so one stuck function always leaves one free).
    workers: int | None = None
    max_queue: int = 1024
    #: Native workers one function may use at once; None means all but one, at least 1.
    per_function: int | None = None
    #: wasm calls running at once per serving process, and per function (None: a quarter).
    wasm_slots: int = 64
    wasm_per_function: int | None = None
    #: A serving process started by the supervisor: the listening socket's descriptor (the
    #: supervisor's, shared with the processes that came before), instead of binding one.
    listen_fd: int | None = None
    #: What this process is (``fnserver/supervisor.py``): ``all`` (one process doing
    #: everything: tests, embedding), ``serving`` (runs wasm calls, relays writes, builds,
    #: compiles and native calls to the control process) or ``control`` (the privileged rest).
    role: Literal["all", "serving", "control"] = "all"
    #: A serving process's control process: ``host:port`` on loopback and the secret HELLO
    #: token it accepts (from the supervisor, never on a command line).
    control_address: str | None = None
    control_token: str | None = None
    #: Run native functions even where their sandbox is incomplete (not root, no namespaces).
    unsandboxed_native: bool = False
    max_builds: int = 2
    build_timeout_s: float = 120.0
    build_memory_mb: int = 4096
    #: The largest artifact a build may produce (bytes); over it a register is TOO_LARGE.
    max_artifact: int = 64 * MiB
    #: How long in-flight requests may run on after SIGINT/SIGTERM before they get UNAVAILABLE.
    shutdown_grace_s: float = 3.0
    #: Warm zig's wasi-libc cache in the background at start (the first C build costs ~20 s).
    warm_builds: bool = True
    #: Build caches (Go build cache, zig cache, scratch dirs); None means ``<data-dir>/.cache``.
    build_cache_dir: Path | None = None

    #: Precompiled modules (node-local, written only by the compile processes); None means
    #: ``<cache-dir>/modules``.
    compile_cache_dir: Path | None = None

    # Connection limits, per serving process (PROTOCOL.md §1.1, OPERATIONS.md "Connection
    # limits"): what one client may make the server hold.
    #: Connections open at once, and from one peer address; past either, a new connection gets
    #: one UNAVAILABLE error frame and is closed. Keep the sum well under the open-files limit.
    max_connections: int = 1024
    max_connections_per_peer: int = 256
    #: Seconds a connection has to complete HELLO, and the largest frame before it (bytes).
    hello_timeout_s: float = 10.0
    hello_max_frame: int = 64 * 1024
    #: Seconds one frame may take to arrive once its first byte has (a trickling client is
    #: dropped), and seconds a connection with nothing in flight may stay silent.
    frame_timeout_s: float = 30.0
    idle_timeout_s: float = 300.0
    #: Bytes of unfinished frames all connections together may buffer; past it, connections
    #: holding more than 64 KiB of an unfinished frame are not read until it falls.
    max_buffered: int = 128 * MiB
    #: Unread reply bytes per connection past which the server stops reading (and so starts
    #: nothing new for) it; the most one connection and all of them may hold (a reply that
    #: would pass either is replaced by RESOURCE_EXHAUSTED); seconds a connection with unread
    #: replies may go without reading any before it is dropped.
    reply_high_water: int = 16 * MiB
    max_reply_buffer: int = 64 * MiB
    max_reply_total: int = 512 * MiB
    write_timeout_s: float = 30.0
    #: Registers one connection may have in progress at once (each holds a staging directory
    #: and, while it uploads, a file descriptor).
    max_registers_per_connection: int = 16

    # Operations (OPERATIONS.md "Async invocations", "Invocation logs", "Metrics").
    #: Async invocations waiting to run, server-wide; past it an async invoke is UNAVAILABLE.
    async_max_queue: int = 10_000
    #: Async invocations one serving process runs at once.
    async_concurrency: int = 8
    #: Seconds a claimed async invocation is leased for; the process running it renews the
    #: lease every third of that, so a call whose node died runs again elsewhere within it.
    async_lease_s: float = 30.0
    #: Seconds an async invocation's result is kept after it finished.
    result_ttl_s: float = 86_400.0
    #: Invocation records kept (``fn logs``), server-wide; the oldest go first.
    max_records: int = 100_000
    #: Serve Prometheus metrics over HTTP on this port (None: off), on ``metrics_host``
    #: (None: ``host``).
    metrics_port: int | None = None
    metrics_host: str | None = None
    #: Keep functions, versions, aliases, artifacts, async calls and invocation records in
    #: this PostgreSQL database (``postgresql://USER@HOST:PORT/DB``), shared with every node that
    #: names it; None: the data directory (the embedded default). docs/SCALING.md.
    registry: str | None = None
    #: What serving processes connect to the registry with instead of ``registry``: a role
    #: that may only read (they never write it). None: ``registry``.
    registry_reader: str | None = None
    #: Serve the HTTP gateway (docs/HTTP.md) on this port (None: off), on ``http_host``
    #: (None: ``host``); under the supervisor, on the socket it passes (``http_fd``).
    http_port: int | None = None
    http_host: str | None = None
    http_fd: int | None = None
    #: ``text`` (human lines) or ``json`` (one JSON object per line).
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    #: Quotas every tenant gets unless the auth file overrides them (``service/_quotas.py``).
    tenant_limits: TenantLimits = field(default_factory=lambda: TenantLimits())
    #: A serving process under the supervisor: the shared usage table (a memfd) and this
    #: process's column in it. None: a table of this process's own.
    usage_fd: int | None = None
    usage_column: int | None = None

    @property
    def auth_path(self) -> Path:
        """The auth file: ``--auth-file``, or ``auth.toml`` in the data directory."""
        return self.auth_file if self.auth_file is not None else self.data_dir / "auth.toml"

    @property
    def registry_url(self) -> str | None:
        """The database URL this process connects with: the reader's in a serving process."""
        if self.role == "serving" and self.registry_reader is not None:
            return self.registry_reader
        return self.registry

    @property
    def open_ok(self) -> bool:
        """Whether this server may serve clients without tokens: on loopback, or when the
        operator said ``--insecure``."""
        return self.insecure or (
            is_loopback(self.host) and (self.http_port is None or is_loopback(self.http_address_host))
        )

    @property
    def http_address_host(self) -> str:
        """Where the HTTP gateway listens: ``http_host``, or ``host``."""
        return self.http_host if self.http_host is not None else self.host

    @property
    def modules_dir(self) -> Path:
        """Where precompiled modules are cached, keyed by artifact digest and engine settings."""
        return self.compile_cache_dir if self.compile_cache_dir is not None else self.cache_dir / "modules"

    @property
    def cache_dir(self) -> Path:
        """Where builds keep their caches: beside the functions unless configured."""
        return self.build_cache_dir if self.build_cache_dir is not None else self.data_dir / ".cache"


def is_loopback(host: str) -> bool:
    """True if ``host`` is a loopback address (or ``localhost``): only this machine reaches it."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name, or "" (every interface): assume the world can reach it
