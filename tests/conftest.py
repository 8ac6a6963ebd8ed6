"""Shared fixtures: a real fnserver on port 0 per test, and clients that talk to it over TCP."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import uvloop
from fnclient import AsyncClient

from fnserver.config import ServerConfig
from fnserver.server import FnServer

# tests/_postgres.py: the postgres_cluster (session) and postgres_dsn (per test) fixtures.
pytest_plugins = ["pytester"]
if __package__:
    # Loaded as tests.conftest: the temporary PostgreSQL cluster's fixtures, one cluster per
    # session. (A copy of this file that test_harness.py runs on its own has no package.)
    pytest_plugins.append(f"{__package__}._postgres")

#: What any test's event loop reported to its exception handler ("Task exception was never
#: retrieved", a failing callback...): each is a test failure, not a line in the log.
_LOOP_ERRORS: list[str] = []


def _record_loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    exc = context.get("exception")
    _LOOP_ERRORS.append(f"{context.get('message')}: {exc!r}" if exc else str(context.get("message")))
    loop.default_exception_handler(context)


def _new_loop() -> asyncio.AbstractEventLoop:
    loop = uvloop.new_event_loop()
    loop.set_exception_handler(_record_loop_error)
    return loop


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    # Production runs on uvloop, so the tests do too.
    return {"uvloop": _new_loop}


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    _LOOP_ERRORS.clear()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Iterator[None]:
    yield
    # Tasks that died unobserved are reported when collected: collect now, inside this test.
    gc.collect()
    if _LOOP_ERRORS:
        errors, _LOOP_ERRORS[:] = list(_LOOP_ERRORS), []
        pytest.fail("the event loop saw unhandled exceptions:\n" + "\n".join(errors), pytrace=False)


@pytest.fixture
def server_config(tmp_path: Path) -> ServerConfig:
    """Embedded defaults, but port 0, a private data dir, two workers and no toolchain warm-up."""
    return ServerConfig(
        port=0,
        data_dir=tmp_path / "data",
        workers=2,
        warm_builds=False,
        shutdown_grace_s=1.0,
    )


class ServerHandle:
    """Start, stop and restart a real server on the same data directory."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.server: FnServer | None = None

    async def start(self, **changes: Any) -> FnServer:
        if changes:
            self.config = replace(self.config, **changes)
        self.server = FnServer(self.config)
        await self.server.start()
        # A restart gets a new port; keep it in the config so later restarts are independent.
        return self.server

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()
            self.server = None

    @property
    def address(self) -> str:
        assert self.server is not None
        return self.server.address


@pytest.fixture
async def handle(server_config: ServerConfig) -> AsyncIterator[ServerHandle]:
    h = ServerHandle(server_config)
    await h.start()
    try:
        yield h
    finally:
        await h.stop()


@pytest.fixture
async def client(handle: ServerHandle) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(handle.address) as c:
        yield c


async def run_fn(address: str, *args: str, input: bytes | None = None, env: Mapping[str, str] | None = None) -> tuple[int, bytes, bytes]:
    """Run the real ``fn`` command line against a server; return (exit code, stdout, stderr)."""
    full_env = {**os.environ, "FN_SERVER": address, **(env or {})}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fnclient.cli",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=full_env,
    )
    out, err = await asyncio.wait_for(proc.communicate(input or b""), 120)
    assert proc.returncode is not None
    return proc.returncode, out, err


class ServerProcess:
    """A ``python -m fnserver`` supervisor and what it printed (drained, so it never blocks
    on stderr)."""

    def __init__(self, proc: asyncio.subprocess.Process, address: str) -> None:
        self.proc = proc
        self.address = address
        self.log: list[str] = []
        self._reader = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.log.append(line.decode(errors="replace"))

    async def stop(self) -> int:
        """SIGTERM, then its exit status."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(self.proc.wait(), 120)
        await self._reader
        return code


async def start_server_process(
    tmp_path: Path, *extra: str, new_session: bool = False
) -> tuple[asyncio.subprocess.Process, str]:
    """``python -m fnserver`` on port 0 over ``tmp_path/data`` (the supervisor and its serving
    processes); returns the process and the address its "listening on" line names.

    With ``new_session`` the supervisor leads a process group of its own, which its control
    and serving processes join: ``os.killpg(proc.pid, SIGKILL)`` then takes the whole node at
    once, as a machine that dies would."""
    proc, line = await start_server_process_line(tmp_path, *extra, new_session=new_session)
    return proc, line.split("listening on ")[1].split()[0]


async def start_server_process_line(
    tmp_path: Path, *extra: str, new_session: bool = False
) -> tuple[asyncio.subprocess.Process, str]:
    """:func:`start_server_process`, returning its whole "listening on" line."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fnserver", "--port", "0", "--data-dir", str(tmp_path / "data"),
        "--workers", "2", "--no-warm", *extra,
        stderr=asyncio.subprocess.PIPE, start_new_session=new_session,
    )
    assert proc.stderr is not None
    while True:
        # Bounded only to turn a hang into a failure: a loaded machine starts slowly.
        line = (await asyncio.wait_for(proc.stderr.readline(), 120)).decode()
        assert line, "the server exited before listening"
        if "listening on " in line:
            return proc, line
