"""A real PostgreSQL for the tests: a throwaway cluster per test session, a database per test.

The server is Debian's ``postgresql`` package (its binaries under
``/usr/lib/postgresql/<version>/bin``). A machine without it gets it here, like the browser of
``tests/_chromium.py``: as root, ``apt-get install postgresql`` under a lock so that concurrent
test runs do not clash; a machine where that cannot happen fails the tests that need it with
the reason. They never skip: CI runs exactly the README's test command, so the install happens
in the test setup.

The cluster is started by hand rather than through Debian's ``pg_ctlcluster``: ``initdb`` into a
temporary directory, the postmaster on a free port of 127.0.0.1 with its unix socket in that
directory, trust authentication (nothing but this machine can reach it), and durability turned
off (``fsync``, ``synchronous_commit``, ``full_page_writes``), which a test cluster does not
need. PostgreSQL refuses to run as root, so as root the server runs as the ``postgres`` user
that the Debian package creates. Every subprocess has a deadline; stopping is an immediate
shutdown (SIGQUIT, what ``pg_ctl stop -m immediate`` sends), then SIGKILL to the process groups
of the postmaster and its children if that does not end it in time, then the directory goes.

Fixtures (registered in ``tests/conftest.py``):

- ``postgres_cluster`` (session): the running :class:`PostgresCluster`;
- ``postgres_dsn`` (function): ``postgresql://USER@127.0.0.1:PORT/DB`` of a fresh, empty
  database of that cluster, dropped after the test.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from ._apt import apt_get

__all__ = [
    "PostgresCluster",
    "find_bin_dir",
    "postgres_bin_dir",
    "postgres_cluster",
    "postgres_dsn",
    "start_cluster",
]

DEBIAN_ROOT = Path("/usr/lib/postgresql")
#: The programs a cluster needs: the server, its setup, and the client tools used here.
NEEDED = ("initdb", "postgres", "psql", "pg_isready")
#: The unprivileged user the server runs as when the tests run as root (Debian creates it).
SERVER_USER = "postgres"
_LOCK = Path("/tmp/fnserver-postgresql.lock")
#: initdb and a first start write a few tens of MB: slow on a machine busy with a CI run.
_INITDB_TIMEOUT_S = 180
_START_TIMEOUT_S = 120
_STOP_TIMEOUT_S = 30
#: psql and pg_isready: one statement or one connection attempt.
_CLIENT_TIMEOUT_S = 60
#: A unix socket's path must fit in sockaddr_un (107 bytes on Linux).
_MAX_SOCKET_PATH = 100


def _tail(text: str | bytes | None, limit: int = 2000) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return (text or "").strip()[-limit:]


def _version_key(directory: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in directory.name.split(".") if part.isdigit())


def _complete(bin_dir: Path) -> bool:
    return all(os.access(bin_dir / name, os.X_OK) for name in NEEDED)


def find_bin_dir() -> Path | None:
    """The directory of the newest PostgreSQL server binaries on this machine, or None.

    Debian's layout first (``/usr/lib/postgresql/<version>/bin``), then a ``postgres`` on PATH
    whose directory holds the other programs too.
    """
    if DEBIAN_ROOT.is_dir():
        versions = sorted((d for d in DEBIAN_ROOT.iterdir() if d.is_dir()), key=_version_key, reverse=True)
        for version in versions:
            if _complete(version / "bin"):
                return version / "bin"
    on_path = shutil.which("postgres")
    if on_path is not None:
        bin_dir = Path(on_path).resolve().parent
        if _complete(bin_dir):
            return bin_dir
    return None


def postgres_bin_dir() -> Path:
    """The PostgreSQL binaries' directory, installing Debian's ``postgresql`` first if they are
    absent and we are root.

    Raises RuntimeError, naming what to do, when they are absent and cannot be installed.
    """
    found = find_bin_dir()
    if found is not None:
        return found
    if os.geteuid() != 0:
        raise RuntimeError(
            "the PostgreSQL server binaries are missing and only root can install them: run "
            "'apt-get install postgresql' (the PostgreSQL tests need a real server)"
        )
    if shutil.which("apt-get") is None:
        raise RuntimeError("the PostgreSQL server binaries are missing and this system has no apt-get to install them")
    with _LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if find_bin_dir() is None:  # another run may have installed it meanwhile
                apt_get("update")
                apt_get("install", "-y", "postgresql")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    found = find_bin_dir()
    if found is None:
        raise RuntimeError(f"apt-get installed postgresql, yet no {'/'.join(NEEDED)} under {DEBIAN_ROOT}/*/bin")
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "PID (COMMAND) STATE PPID ...": the command may hold spaces and parentheses.
        fields = stat.rpartition(")")[2].split()
        if len(fields) > 1 and fields[1] == str(pid):
            found.append(int(entry.name))
    return found


def _client_env() -> dict[str, str]:
    # Nothing of the caller's PG* settings (a password file, another service) reaches psql.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGCONNECT_TIMEOUT"] = "10"
    return env


class PostgresCluster:
    """A running throwaway cluster (see the module docs); :func:`start_cluster` makes one."""

    def __init__(self, bin_dir: Path, root: Path, user: str, as_user: pwd.struct_passwd | None) -> None:
        self.bin_dir = bin_dir
        #: The temporary directory: ``data/`` (the cluster), ``server.log`` and the socket.
        self.root = root
        self.data = root / "data"
        self.log = root / "server.log"
        #: The superuser, the one role the DSNs name (trust authentication, no password).
        self.user = user
        self.host = "127.0.0.1"
        self.port = 0
        self._as = as_user
        self._proc: subprocess.Popen[bytes] | None = None

    # -- running programs ----------------------------------------------------------------------

    def _identity(self, as_server: bool) -> tuple[int | None, int | None, list[int] | None]:
        """(user, group, extra groups) for Popen: the server's user when we are root and the
        program must run as the server (``None``: keep ours)."""
        if not as_server or self._as is None:
            return None, None, None
        return self._as.pw_uid, self._as.pw_gid, []

    def _run(self, argv: Sequence[str | Path], timeout: float, *, as_server: bool = False) -> str:
        user, group, extra_groups = self._identity(as_server)
        try:
            done = subprocess.run(
                [str(a) for a in argv], cwd=self.root, env=_client_env(), stdin=subprocess.DEVNULL,
                capture_output=True, text=True, timeout=timeout, check=False,
                user=user, group=group, extra_groups=extra_groups,
            )
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"{Path(argv[0]).name} took more than {timeout} s: {_tail(exc.stderr)}") from exc
        if done.returncode != 0:
            raise RuntimeError(
                f"{Path(argv[0]).name} failed with exit code {done.returncode}:\n{_tail(done.stderr or done.stdout)}"
            )
        return str(done.stdout)

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run one SQL statement as the superuser; its unaligned, tuples-only output."""
        return self._run(
            [self.bin_dir / "psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
             "-h", self.host, "-p", str(self.port), "-U", self.user, "-d", database, "-c", sql],
            _CLIENT_TIMEOUT_S,
        )

    # -- life ----------------------------------------------------------------------------------

    def _initdb(self) -> None:
        self._run(
            [self.bin_dir / "initdb", "-D", self.data, "-U", self.user, "--auth=trust",
             "--encoding=UTF8", "--locale=C", "--no-sync", "--no-instructions"],
            _INITDB_TIMEOUT_S, as_server=True,
        )

    def _start_once(self) -> bool:
        """Start the postmaster on a fresh free port; False if that port was taken meanwhile."""
        self.port = _free_port()
        user, group, extra_groups = self._identity(True)
        with self.log.open("ab") as log:
            self._proc = subprocess.Popen(
                [str(self.bin_dir / "postgres"), "-D", str(self.data), "-p", str(self.port),
                 "-h", self.host, "-k", str(self.root),
                 "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                 "-c", "max_connections=200", "-c", "shared_buffers=32MB",
                 "-c", "log_min_messages=warning", "-c", "logging_collector=off"],
                cwd=self.root, env=_client_env(), stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, process_group=0, user=user, group=group,
                extra_groups=extra_groups,
            )
        assert self._proc is not None
        deadline = time.monotonic() + _START_TIMEOUT_S
        while True:
            if self._proc.poll() is not None:
                log_text = self.log.read_text(errors="replace")
                self._proc = None
                if "Address already in use" in log_text or "could not bind" in log_text:
                    self.log.write_text("")
                    return False
                raise RuntimeError(f"postgres exited at start:\n{_tail(log_text)}")
            ready = subprocess.run(
                [str(self.bin_dir / "pg_isready"), "-q", "-h", self.host, "-p", str(self.port),
                 "-U", self.user, "-d", "postgres", "-t", "5"],
                env=_client_env(), stdin=subprocess.DEVNULL, capture_output=True,
                timeout=_CLIENT_TIMEOUT_S, check=False,
            )
            if ready.returncode == 0:
                return True
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"postgres did not accept connections within {_START_TIMEOUT_S} s:\n"
                    f"{_tail(self.log.read_text(errors='replace'))}"
                )
            time.sleep(0.05)

    def start(self) -> None:
        """initdb, then the postmaster (a few attempts, should another process take the port)."""
        self._initdb()
        for _ in range(5):
            if self._start_once():
                return
        raise RuntimeError("postgres could not bind a free port of 127.0.0.1 in 5 attempts")

    def stop(self) -> None:
        """Immediate shutdown within a deadline, SIGKILL to the process group after it, then
        remove the directory. Safe to call more than once."""
        proc, self._proc = self._proc, None
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGQUIT)  # what "pg_ctl stop -m immediate" sends
            try:
                proc.wait(timeout=_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                # The postmaster leads its own process group and so does each of its children
                # (PostgreSQL calls setsid in them): kill every group, children first.
                for pid in [*_children(proc.pid), proc.pid]:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)

    @property
    def running(self) -> bool:
        """True while the postmaster this object started is alive."""
        return self._proc is not None and self._proc.poll() is None

    # -- databases -----------------------------------------------------------------------------

    def dsn(self, database: str = "postgres") -> str:
        """``postgresql://USER@127.0.0.1:PORT/DATABASE``."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"

    def create_database(self, name: str | None = None) -> str:
        """A new empty database (a random name unless given); its DSN."""
        name = name or f"fntest_{secrets.token_hex(6)}"
        if not name.replace("_", "").isalnum():
            raise ValueError(f"not a plain database name: {name!r}")
        self.psql(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        """Drop a database, closing whatever sessions still use it."""
        self.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def start_cluster(bin_dir: Path | None = None) -> PostgresCluster:
    """A running cluster in a new temporary directory (binaries installed first if need be).

    The caller stops it (:meth:`PostgresCluster.stop`); it is also stopped at interpreter exit,
    should the caller not get to it.
    """
    bin_dir = bin_dir or postgres_bin_dir()
    as_user: pwd.struct_passwd | None = None
    if os.geteuid() == 0:
        try:
            as_user = pwd.getpwnam(SERVER_USER)
        except KeyError as exc:
            raise RuntimeError(
                f"PostgreSQL refuses to run as root and there is no '{SERVER_USER}' user to run it as "
                "(Debian's postgresql package creates one)"
            ) from exc
        user = SERVER_USER
    else:
        user = pwd.getpwuid(os.geteuid()).pw_name
    parent = tempfile.gettempdir()
    if len(parent) + 40 > _MAX_SOCKET_PATH:
        parent = "/tmp"
    root = Path(tempfile.mkdtemp(prefix="fnpg-", dir=parent))
    if as_user is not None:
        os.chown(root, as_user.pw_uid, as_user.pw_gid)
    cluster = PostgresCluster(bin_dir, root, user, as_user)
    atexit.register(cluster.stop)
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    return cluster


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """One running cluster for the whole test session."""
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def postgres_dsn(postgres_cluster: PostgresCluster) -> Iterator[str]:
    """The DSN of a fresh, empty database of the session's cluster, dropped after the test."""
    dsn = postgres_cluster.create_database()
    try:
        yield dsn
    finally:
        postgres_cluster.drop_database(dsn.rsplit("/", 1)[1])
