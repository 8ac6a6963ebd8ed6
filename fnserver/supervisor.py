"""The supervisor: N serving processes on one port, each restarted at once if it dies.

``fnserver --processes N`` (default one per CPU) runs this. It binds N listening sockets to
the same address with ``SO_REUSEPORT`` (the kernel spreads new connections across them) and
starts one serving process per socket (``python -m fnserver ... --serve-fd FD``), which runs a
whole :class:`~fnserver.server.FnServer` on that socket. The supervisor keeps every socket
open itself, so when a serving process dies only the connections it had accepted are lost:
connections still waiting in its socket's backlog are accepted by its replacement, which gets
the same socket. Serving processes see one another's registrations through the registry's
change feed (``fnserver.registry``), so any of them can serve any call.

Start-up fails as a whole: if a serving process exits before it reported ready the first
time (a port in use, an unusable data directory), every other one is stopped and the
supervisor exits 1. Later, a process that dies is replaced at once, or after a growing pause
(up to ``MAX_BACKOFF_S``) while replacements keep dying young. SIGINT/SIGTERM stop them all:
each gets SIGTERM and its own shutdown grace, then SIGKILL past ``STOP_TIMEOUT_S``.

Nothing here runs on an event loop: it is a small blocking loop over pidfds and a wake-up
pipe for signals.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import selectors
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Final

from . import __version__
from ._lifeline import die_with_parent
from ._quotas import COLUMNS as USAGE_COLUMNS
from ._quotas import SharedUsage
from .config import ServerConfig

__all__ = ["Supervisor"]

log = logging.getLogger("fnserver.supervisor")

#: Listen backlog of each socket: connections wait here while a replacement starts.
BACKLOG: Final = 1024
#: A serving process that lived shorter than this died young: its replacement waits.
YOUNG_S: Final = 10.0
MAX_BACKOFF_S: Final = 5.0
#: Past the serving processes' own shutdown grace, before they are killed.
STOP_TIMEOUT_S: Final = 20.0
#: How long a serving process may take to report ready (imports, registry, workers).
READY_TIMEOUT_S: Final = 120.0


@dataclass(eq=False)
class _Slot:
    """One listening socket and the process currently on it (a serving process, or the
    control process on its loopback socket)."""

    index: int
    sock: socket.socket
    role: str = "serving"
    #: The HTTP gateway's socket of this serving process (``--http-port``), or None.
    http_sock: socket.socket | None = None
    proc: subprocess.Popen[bytes] | None = None
    pidfd: int = -1
    ready_r: int = -1
    ready: bool = False
    ever_ready: bool = False
    started: float = 0.0
    restart_at: float | None = None
    backoff: float = 0.0
    restarts: int = field(default=0)


class Supervisor:
    """Binds the sockets, starts and restarts the serving processes; see the module docs.

    ``child_args`` is the command line every serving process gets (the supervisor's own,
    less nothing: the serving process ignores ``--processes`` once it has ``--serve-fd``).
    """

    def __init__(self, config: ServerConfig, processes: int, child_args: list[str]) -> None:
        if processes < 1:
            raise ValueError("processes must be at least 1")
        self.config = config
        self.processes = processes
        self.child_args = child_args
        self.slots: list[_Slot] = []
        self.control: _Slot | None = None
        # The control process's HELLO token: handed to each process through a pipe.
        self._secret = secrets.token_urlsafe(32)
        # Tenants' running calls and call rates, shared by the serving processes (one column
        # each: the slot index), so quotas hold server-wide (service/_quotas.py).
        if processes > USAGE_COLUMNS:
            raise ValueError(f"processes must be at most {USAGE_COLUMNS}")
        self.usage = SharedUsage.create()
        self.port = 0
        self.http_port: int | None = None
        self._stopping = False
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # -- sockets ----------------------------------------------------------------------------

    def bind(self) -> None:
        """Bind and listen on every socket (port 0: the first one picks the port)."""
        host, port = self.config.host, self.config.port
        http_host, http_port = self.config.http_address_host, self.config.http_port
        for i in range(self.processes):
            sock = _listener(host, port)
            port = sock.getsockname()[1]  # port 0: the first socket picks it
            http_sock = None
            if http_port is not None:
                http_sock = _listener(http_host, http_port)
                http_port = http_sock.getsockname()[1]
            self.slots.append(_Slot(i, sock, http_sock=http_sock))
        self.port = port
        self.http_port = http_port
        # The control process's socket: loopback only, kept open across its restarts.
        ctl = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ctl.bind(("127.0.0.1", 0))
        ctl.listen(BACKLOG)
        ctl.setblocking(False)
        self.control = _Slot(-1, ctl, role="control")

    @property
    def _all(self) -> list[_Slot]:
        return ([self.control] if self.control is not None else []) + self.slots

    @property
    def http_url(self) -> str | None:
        """The HTTP gateway's base URL, or None when it is off."""
        if self.http_port is None:
            return None
        host = self.config.http_address_host
        host = f"[{host}]" if ":" in host else host
        scheme = "https" if self.config.tls_cert is not None else "http"
        return f"{scheme}://{host}:{self.http_port}"

    @property
    def address(self) -> str:
        """``host:port`` as a client would dial it."""
        host = self.config.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    # -- processes --------------------------------------------------------------------------

    def _start(self, slot: _Slot) -> None:
        fd = slot.sock.fileno()
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        secret_r, secret_w = os.pipe2(os.O_CLOEXEC)
        os.write(secret_w, self._secret.encode())
        os.close(secret_w)
        args = [
            *self.child_args, "--serve-fd", str(fd), "--ready-fd", str(ready_w),
            "--secret-fd", str(secret_r), "--role", slot.role,
        ]
        passed = [fd, ready_w, secret_r]
        if slot.role == "serving":
            assert self.control is not None
            args += ["--control", f"127.0.0.1:{self.control.sock.getsockname()[1]}"]
            # A successor must not inherit the counts of the calls its predecessor died in.
            self.usage.reset_column(slot.index)
            args += ["--usage-fd", str(self.usage.fd), "--usage-column", str(slot.index)]
            passed.append(self.usage.fd)
            if slot.http_sock is not None:
                args += ["--http-fd", str(slot.http_sock.fileno())]
                passed.append(slot.http_sock.fileno())
        if slot.role != "control" or slot.restarts:
            args.append("--no-warm")  # the control process warms the build cache, once
        me = os.getpid()
        slot.proc = subprocess.Popen(
            # preexec_fn is safe here: the supervisor runs no threads. A child dies with it.
            [sys.executable, "-m", "fnserver", *args], pass_fds=passed,
            preexec_fn=lambda: die_with_parent(me),
        )
        os.close(ready_w)
        os.close(secret_r)
        slot.ready_r = ready_r
        slot.ready = False
        slot.started = time.monotonic()
        slot.restart_at = None
        slot.pidfd = os.pidfd_open(slot.proc.pid)
        self._sel.register(slot.pidfd, selectors.EVENT_READ, ("exit", slot))
        self._sel.register(ready_r, selectors.EVENT_READ, ("ready", slot))

    def _on_ready(self, slot: _Slot) -> None:
        try:
            said = os.read(slot.ready_r, 16)
        except OSError:
            said = b""
        self._sel.unregister(slot.ready_r)
        if not said:  # the pipe closed: the process exited without saying ready
            os.close(slot.ready_r)
            slot.ready_r = -1
            return
        os.close(slot.ready_r)
        slot.ready_r = -1
        slot.ready = slot.ever_ready = True
        assert slot.proc is not None
        log.info("%s (pid %d) ready", _name(slot), slot.proc.pid)

    def _on_exit(self, slot: _Slot) -> None:
        assert slot.proc is not None
        self._sel.unregister(slot.pidfd)
        os.close(slot.pidfd)
        slot.pidfd = -1
        if slot.ready_r >= 0:
            self._sel.unregister(slot.ready_r)
            os.close(slot.ready_r)
            slot.ready_r = -1
        code = slot.proc.wait()
        pid = slot.proc.pid
        slot.proc = None
        if self._stopping:
            return
        lived = time.monotonic() - slot.started
        how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
        if not slot.ever_ready:
            log.error("%s (pid %d) failed to start (%s)", _name(slot), pid, how)
            raise _StartFailed
        slot.backoff = 0.0 if lived >= YOUNG_S else min(MAX_BACKOFF_S, slot.backoff * 2 or 0.1)
        log.warning(
            "%s (pid %d) died (%s); starting another%s", _name(slot), pid, how,
            f" in {slot.backoff:.1f} s" if slot.backoff else "",
        )
        slot.restarts += 1
        slot.restart_at = time.monotonic() + slot.backoff

    # -- the loop ---------------------------------------------------------------------------

    def _signal(self, signum: int, _frame: object) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"s")

    def run(self) -> int:
        """Serve until SIGINT/SIGTERM; the exit status (0, or 1 if start-up failed)."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._signal)
        self._sel.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        try:
            self.bind()
        except OSError as exc:
            log.error("cannot listen on %s:%d: %s", self.config.host, self.config.port, exc)
            return 1
        status = 0
        try:
            # The control process first: it opens (and repairs) the store and prepares the
            # module cache that the serving processes then read.
            assert self.control is not None
            self._start(self.control)
            serving = False
            announced = False
            start_deadline = time.monotonic() + READY_TIMEOUT_S
            while not self._stopping:
                if not serving and self.control.ready:
                    serving = True
                    for slot in self.slots:
                        self._start(slot)
                if not announced and serving and all(s.ready for s in self.slots):
                    announced = True
                    log.info(
                        "fnserver %s listening on %s (%d serving processes, data %s)%s",
                        __version__, self.address, self.processes, self.config.data_dir,
                        f"; HTTP gateway on {self.http_url}" if self.http_url else "",
                    )
                if not announced and time.monotonic() > start_deadline:
                    log.error("serving processes did not start within %d s", READY_TIMEOUT_S)
                    raise _StartFailed
                self._step()
        except _StartFailed:
            status = 1
        finally:
            self._stop_all()
        return status

    def _step(self) -> None:
        now = time.monotonic()
        pending = [s.restart_at for s in self._all if s.restart_at is not None]
        timeout = max(0.0, min(pending) - now) if pending else 1.0
        for key, _ in self._sel.select(timeout):
            kind, slot = key.data
            if kind == "wake":
                with contextlib.suppress(OSError):
                    os.read(self._wake_r, 64)
            elif kind == "ready":
                self._on_ready(slot)
            elif kind == "exit":
                self._on_exit(slot)
        now = time.monotonic()
        for slot in self._all:
            if (
                not self._stopping
                and slot.proc is None
                and slot.restart_at is not None
                and slot.restart_at <= now
            ):
                self._start(slot)

    def _stop_all(self) -> None:
        """SIGTERM every serving process, wait for their graceful stop, kill the rest; then
        the control process (the serving processes' requests in flight may need it)."""
        self._stopping = True
        self._stop(self.slots)
        if self.control is not None:
            self._stop([self.control])
        for slot in self._all:
            for fd in (slot.pidfd, slot.ready_r):
                if fd >= 0:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            slot.sock.close()
            if slot.http_sock is not None:
                slot.http_sock.close()
        self._sel.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        log.info("fnserver stopped")


    def _stop(self, slots: list[_Slot]) -> None:
        live = [s for s in slots if s.proc is not None]
        for slot in live:
            assert slot.proc is not None
            with contextlib.suppress(ProcessLookupError):
                slot.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.config.shutdown_grace_s + STOP_TIMEOUT_S
        for slot in live:
            assert slot.proc is not None
            try:
                slot.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop; killing it", _name(slot))
                slot.proc.kill()
                slot.proc.wait()


def _listener(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` that more sockets may share (``SO_REUSEPORT``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(BACKLOG)
    sock.setblocking(False)
    return sock


def _name(slot: _Slot) -> str:
    return "control process" if slot.role == "control" else f"serving process {slot.index}"


class _StartFailed(Exception):
    """A serving process could not start: the whole server stops."""
