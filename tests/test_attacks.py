"""Issue 9, item 8: every attack of the issue, tried against a real server as an attacker would.

Each test starts the real thing (``python -m fnserver --processes 1``: the supervisor and one
serving process, as root, so every sandbox feature the host offers is on), uploads the attack
through ``fnclient`` over TCP (native executables built here with ``zig cc`` from
tests/attack_sources.py, hostile sources for the builder, crafted wasm), and asserts the
secure outcome the issue asks for; then that the server keeps serving a wasm and a native
bystander. The server is stopped with SIGTERM and must exit 0.

The data directory is kept outside /tmp (under /var/lib), in a directory every uid may
search: a native call's private /tmp would hide anything under the host's /tmp anyway, so
"the call sees nothing of the store" must come from the sandbox, not from where pytest puts
its temporary files or from a permission bit.

"Nothing is left behind" is checked from the test, as root, in /proc: the server's native
workers run under unprivileged uids claimed for this server alone, so any process of those
uids that is not a worker (or is under one, once its call has been answered) is a leftover.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fnclient import AsyncClient
from fnclient.protocol import (
    BuildError,
    FunctionTimeoutError,
    InvalidArgumentError,
    MemoryLimitError,
    TooLargeError,
)

from . import wasm_fixtures as wf
from .attack_sources import (
    BUILD_HUGE_ARRAY_GO,
    BUILD_HUGE_ARRAY_READ_GO,
    build_natives,
    compile_bomb,
    include_source,
)
from .conftest import ServerProcess, start_server_process

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="the attacks are tried against a server started as root"
)

#: The server's --token: no function may ever read it.
TOKEN = "SECRET-" + os.urandom(12).hex()
MiB = 1 << 20


# -- the server ---------------------------------------------------------------------------------


class Server(ServerProcess):
    """The supervisor (tests/conftest.py), with what the attack tests ask of it."""

    def __init__(self, proc: asyncio.subprocess.Process, address: str) -> None:
        super().__init__(proc, address)
        self.port = int(address.rsplit(":", 1)[1])

    def client(self) -> AsyncClient:
        return AsyncClient(self.address, TOKEN, connect_timeout=120)

    def serving_pids(self) -> set[int]:
        return {pid for pid, (ppid, _) in _processes().items() if ppid == self.proc.pid}


@contextlib.asynccontextmanager
async def serving(root: Path, *extra: str) -> AsyncIterator[Server]:
    proc, address = await start_server_process(root, "--processes", "1", "--token", TOKEN, *extra)
    server = Server(proc, address)
    try:
        yield server
    finally:
        if proc.returncode is None:
            assert await server.stop() == 0, "".join(server.log[-30:])


@pytest.fixture(scope="module")
def natives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_natives(tmp_path_factory.mktemp("attackers"))


@pytest.fixture
def root() -> Iterator[Path]:
    """The server's root (its data directory is ``root/data``): outside /tmp, 0755."""
    base = Path("/var/lib")
    path = Path(tempfile.mkdtemp(prefix="fnserver-attacks-", dir=base))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def say(text: str) -> bytes:
    """A wasm command that writes ``text`` to stdout."""
    data = text.encode()
    return wf.wat(f"""(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 64) "{text}")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 64))
    (i32.store (i32.const 4) (i32.const {len(data)}))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 16)))))""")


async def add_bystanders(c: AsyncClient, natives: dict[str, Path]) -> None:
    """A wasm and a native echo: the others the server must keep serving."""
    await c.register("echo", wf.echo(), filename="echo.wasm")
    await c.register("necho", natives["echo"], filename="necho")
    await assert_serving(c)


async def assert_serving(c: AsyncClient) -> None:
    assert (await c.invoke("echo", b"wasm still served")).output == b"wasm still served"
    r = await c.invoke("necho", b"native still served")
    assert (r.output, r.exit_code) == (b"native still served", 0), r.stderr


async def register_native(c: AsyncClient, natives: dict[str, Path], name: str,
                          **options: Any) -> None:
    await c.register(name, natives[name], filename=name, **options)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- processes, seen from the host as root ------------------------------------------------------


def _processes() -> dict[int, tuple[int, int]]:
    """Every process of the host: pid -> (parent pid, real uid)."""
    procs: dict[int, tuple[int, int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            procs[int(name)] = (int(fields["PPid"]), int(fields["Uid"].split()[0]))
        except (OSError, KeyError, ValueError):
            continue  # gone meanwhile
    return procs


def _ancestors(pid: int, procs: dict[int, tuple[int, int]]) -> list[int]:
    chain = []
    while pid in procs and procs[pid][0] not in (0, pid):
        pid = procs[pid][0]
        chain.append(pid)
    return chain


def sandbox_uids(server: Server) -> set[int]:
    """The uids under which the server runs native code: those of the processes below its
    serving processes that run under another uid than the serving process above them."""
    procs = _processes()
    serving = {pid for pid, (ppid, _) in procs.items() if ppid == server.proc.pid}
    uids = set()
    for pid, (_, uid) in procs.items():
        chain = _ancestors(pid, procs)
        for s in serving & set(chain):
            if uid != procs[s][1]:
                uids.add(uid)
    assert uids, "a server started as root runs its native workers under no unprivileged uid"
    return uids


def leftovers(server: Server, uids: set[int]) -> list[str]:
    """Processes of the sandbox uids that are not the workers themselves: no call runs when
    this is asked, so each is something a call left behind (under its worker, or escaped)."""
    procs = _processes()
    serving = server.serving_pids()
    left = []
    for pid, (_, uid) in procs.items():
        if uid not in uids:
            continue
        chain = _ancestors(pid, procs)
        if not serving & set(chain) or any(procs[a][1] in uids for a in chain if a in procs):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                cmd = "?"
            left.append(f"pid {pid} uid {uid} parents {chain}: {cmd}")
    return left


# -- 1. the code swap ---------------------------------------------------------------------------


async def test_a_native_function_cannot_swap_another_functions_code(
    root: Path, natives: dict[str, Path]
) -> None:
    """Issue 9: a native function overwrote another function's compiled module (0644, owned
    by the worker uid) and after a restart the victim's invoke ran the attacker's code."""
    data = root / "data"
    victim_wasm, attacker_wasm = say("i am the victim"), say("PWNED")
    async with serving(root) as srv, srv.client() as c:
        await add_bystanders(c, natives)
        await c.register("victim", victim_wasm, filename="victim.wasm")
        await c.register("attacker", attacker_wasm, filename="attacker.wasm")
        await register_native(c, natives, "vandal")
        assert (await c.invoke("victim")).output == b"i am the victim"
        assert (await c.invoke("attacker")).output == b"PWNED"

        # As root, find what the attacker would aim at: the compiled modules and the version.
        [victim_mod] = data.rglob(f"{sha256(victim_wasm)}.*.cwasm")
        [attacker_mod] = data.rglob(f"{sha256(attacker_wasm)}.*.cwasm")
        cache = victim_mod.parent
        parts = victim_mod.name.split(".")
        parts[-2] = sha256(attacker_mod.read_bytes())  # a name whose digest matches its bytes
        planted = ".".join(parts)
        version_dir = data / "victim" / "1"
        attacker_main = data / "attacker" / "1" / "main.wasm"
        before = {p: p.read_bytes() for d in (cache, version_dir) for p in d.rglob("*")
                  if p.is_file()}

        r = await c.invoke("vandal", args=[str(victim_mod), str(attacker_mod), str(cache),
                                           planted, str(version_dir), str(attacker_main)])
        lines = r.output.decode().splitlines()
        assert [line.split(":")[0] for line in lines] == [
            "read-attacker-module", "read-attacker-wasm", "overwrite-module", "chmod-module",
            "rename-onto-module", "unlink-module", "recreate-module", "plant-module",
            "overwrite-wasm", "append-meta", "plant-version"], (lines, r.stderr)
        assert [line for line in lines if line.endswith(":DONE")] == [], lines
        after = {p: p.read_bytes() for d in (cache, version_dir) for p in d.rglob("*")
                 if p.is_file()}
        assert after == before
        await assert_serving(c)

    # A restart loads the compiled module from disk again: still the victim's code.
    async with serving(root) as srv, srv.client() as c:
        assert (await c.invoke("victim")).output == b"i am the victim"
        assert (await c.invoke("attacker")).output == b"PWNED"
        await assert_serving(c)


# -- 2. reading the data directory --------------------------------------------------------------


async def test_a_native_function_sees_nothing_of_the_data_directory(
    root: Path, natives: dict[str, Path]
) -> None:
    data = root / "data"
    marker, said = "MARK-" + os.urandom(8).hex(), "SAID-" + os.urandom(8).hex()
    async with serving(root) as srv, srv.client() as c:
        await add_bystanders(c, natives)
        await c.register("victim", say(said), filename="victim.wasm", description=marker)
        await register_native(c, natives, "peek")
        assert marker in (data / "victim" / "1" / "meta.json").read_text()

        r = await c.invoke("peek", args=[str(data)])
        out = r.output.decode(errors="replace")
        assert r.exit_code == 0 and not r.truncated and out.endswith("end\n"), (out, r.stderr)
        lines = out.splitlines()
        # Found its own binary's path, and looked around it.
        assert any(line.startswith("X ") for line in lines), lines
        # Nothing listed or read under the data directory, by its path or through /proc.
        assert [line for line in lines if line.startswith(f"L {data}")] == []
        seen_names = {line.split(" ", 2)[2] for line in lines if line.startswith("L ")}
        store_names = {"victim", "echo", "necho", "peek", "function.json", "meta.json",
                       "main.wasm", ".generation", ".changes", ".lock", ".cache", ".staging",
                       "modules"}
        assert seen_names & store_names == set(), sorted(seen_names)
        assert marker not in out and said not in out
        await assert_serving(c)


async def test_a_native_function_sees_no_checkout_or_home_directory(
    root: Path, natives: dict[str, Path]
) -> None:
    """Issue 9, item 2: no view of home directories or checkouts either (this very
    checkout, world-readable like most, is the one tried)."""
    checkout = Path(__file__).resolve().parents[1]
    homes = [Path.home(), *(p for p in Path("/home").glob("*") if p.is_dir())]
    async with serving(root) as srv, srv.client() as c:
        await add_bystanders(c, natives)
        await register_native(c, natives, "peek")
        for place in (checkout, *homes):
            r = await c.invoke("peek", args=[str(place)])
            out = r.output.decode(errors="replace")
            seen = [line for line in out.splitlines() if line.startswith(f"L {place}")]
            assert seen == [], (place, seen[:20])
        await assert_serving(c)


# -- 3. reading the server's command line -------------------------------------------------------


async def test_a_native_function_cannot_read_the_servers_command_line(
    root: Path, natives: dict[str, Path]
) -> None:
    async with serving(root) as srv, srv.client() as c:
        await add_bystanders(c, natives)
        await register_native(c, natives, "pswalk")
        assert TOKEN.encode() in Path(f"/proc/{srv.proc.pid}/cmdline").read_bytes()
        server_pids = [srv.proc.pid, *srv.serving_pids()]

        r = await c.invoke("pswalk", args=[str(p) for p in server_pids])
        out = r.output.decode(errors="replace")
        assert r.exit_code == 0 and not r.truncated, (out, r.stderr)
        assert TOKEN not in out and TOKEN.encode() not in r.stderr
        lines = out.splitlines()
        [me] = [line.split()[1:] for line in lines if line.startswith("self ")]
        pid, ppid = int(me[0]), int(me[1])
        visible = {int(line.split()[1]) for line in lines if line.startswith("P ")}
        # Its own process, and at most the worker that started it: nothing of the host.
        assert pid in visible and visible - {pid} <= {ppid}, (visible, pid, ppid)
        tries = [line for line in lines if line.startswith("T ")]
        assert len(tries) == 3 * len(server_pids), lines
        assert [t for t in tries if t.endswith(":ok")] == [], tries
        await assert_serving(c)


# -- 4. a file left in /tmp ---------------------------------------------------------------------


async def test_a_file_left_in_tmp_is_not_found_by_the_next_call(
    root: Path, natives: dict[str, Path]
) -> None:
    name = "left-behind-" + os.urandom(6).hex()
    # One worker: the next call runs where this one did.
    async with serving(root, "--workers", "1") as srv, srv.client() as c:
        await add_bystanders(c, natives)
        await register_native(c, natives, "litter")
        r = await c.invoke("litter", args=["w", name])
        assert r.exit_code == 0 and r.output.endswith(b"end\n"), (r.output, r.stderr)
        # It could write its private scratch space; nothing of it reached the host's.
        assert f"wrote /tmp/{name}" in r.output.decode(), r.output
        for d in ("/tmp", "/var/tmp", "/dev/shm"):
            assert not list(Path(d).glob(name)) and not list(Path(d).glob(f"*/{name}")), d
        for _ in range(3):
            r = await c.invoke("litter", args=["r", name])
            assert (r.exit_code, r.output) == (0, b"end\n"), (r.output, r.stderr)
        await assert_serving(c)


# -- 5. the fork-first escape -------------------------------------------------------------------


async def test_a_child_forked_at_the_first_instruction_stays_within_the_limits(
    root: Path, natives: dict[str, Path]
) -> None:
    """Issue 9: a child forked before main escaped the per-call limits in 1 of 3 runs (a
    1 GiB malloc, a 100 MiB file left in /tmp). Each escape is tried several times."""
    async with serving(root) as srv, srv.client() as c:
        await add_bystanders(c, natives)
        await register_native(c, natives, "forkfirst", memory_mb=128, timeout_ms=30_000)
        uids = sandbox_uids(srv)
        for _ in range(3):
            with pytest.raises(MemoryLimitError):
                await c.invoke("forkfirst", args=["m"])
            assert leftovers(srv, uids) == []
        for _ in range(3):
            r = await c.invoke("forkfirst", args=["f"])
            out = r.output.decode()
            # Stopped by the file size limit (SIGXFSZ) or a full private /tmp, never 100 MiB.
            if "child: wrote" in out:
                wrote = int(out.split("child: wrote ")[1].split()[0])
                assert wrote < 100 * MiB, out
            else:
                assert f"parent: child signal {int(signal.SIGXFSZ)}" in out, (out, r.stderr)
            assert not Path("/tmp/fork-first-left").exists()
            assert leftovers(srv, uids) == []
        with pytest.raises(FunctionTimeoutError):
            await c.invoke("forkfirst", args=["s"], timeout_ms=1000)
        assert leftovers(srv, uids) == []
        for _ in range(3):
            r = await c.invoke("forkfirst", args=["o"])
            assert r.exit_code == 0 and r.output.startswith(b"parent: left "), (r.output, r.stderr)
            # The worker killed the spinning child, in its own session, before it replied.
            assert leftovers(srv, uids) == []
        await assert_serving(c)


# -- 6. MAP_SHARED past the limit ---------------------------------------------------------------


async def test_shared_memory_counts_against_the_memory_limit(
    root: Path, natives: dict[str, Path]
) -> None:
    """Issue 9: with memory_mb=128 a native function touched a 1 GiB MAP_SHARED region."""
    async with serving(root) as srv, srv.client() as c:
        await add_bystanders(c, natives)
        await register_native(c, natives, "shmhog", memory_mb=128, timeout_ms=60_000)
        uids = sandbox_uids(srv)
        with pytest.raises(MemoryLimitError) as exc:
            await c.invoke("shmhog")
        assert exc.value.code == "MEMORY_LIMIT"
        assert leftovers(srv, uids) == []
        await assert_serving(c)


# -- 7. a fork bomb -----------------------------------------------------------------------------


async def test_a_fork_bomb_is_contained(root: Path, natives: dict[str, Path]) -> None:
    async with serving(root) as srv, srv.client() as c, srv.client() as other:
        await add_bystanders(c, natives)
        await register_native(c, natives, "forkbomb", timeout_ms=3000)
        uids = sandbox_uids(srv)
        bomb = asyncio.ensure_future(c.invoke("forkbomb"))
        # Another client is served while the bomb goes off.
        assert (await other.invoke("echo", b"meanwhile")).output == b"meanwhile"
        try:
            r = await bomb
        except (FunctionTimeoutError, MemoryLimitError):
            pass  # contained by a limit: the error says which
        else:
            assert r.exit_code != 0, r  # it never returns on its own: a limit ended it
        assert leftovers(srv, uids) == []
        await assert_serving(other)
        await assert_serving(c)


# -- 8. a build including a host file -----------------------------------------------------------


async def test_a_build_cannot_show_a_host_file(root: Path, natives: dict[str, Path]) -> None:
    """Issue 9: a C upload with ``#include "/etc/shadow"`` returned shadow lines in its
    BUILD_FAILED log."""
    data = root / "data"
    marker = "MARK-" + os.urandom(8).hex()
    planted_secret = "PLANTED-" + os.urandom(8).hex()
    shadow = Path("/etc/shadow").read_text()
    secrets: dict[str, list[str]] = {"/etc/shadow": []}
    for line in shadow.splitlines():
        if len(line) > 4:
            secrets["/etc/shadow"] += [line, line.split(":", 1)[1]]
    async with serving(root) as srv, srv.client() as c:
        await add_bystanders(c, natives)
        await c.register("victim", say("victim"), filename="victim.wasm", description=marker)
        planted = data / "planted-secret.h"
        planted.write_text(f"{planted_secret} is not C\n")
        secrets[str(planted)] = [planted_secret]
        secrets[str(data / "victim" / "1" / "meta.json")] = [marker]
        assert secrets["/etc/shadow"], "an empty /etc/shadow proves nothing"
        for path, hidden in secrets.items():
            with pytest.raises(BuildError) as exc:
                await c.register("includer", include_source(path).encode(), filename="inc.c")
            text = f"{exc.value} {exc.value.details!r}"
            leaked = [s for s in hidden if s in text]
            assert leaked == [], (path, leaked, text[:2000])
        assert "includer" not in {f["name"] for f in await c.list()}
        await assert_serving(c)


# -- 9. the huge-array build --------------------------------------------------------------------


@pytest.mark.slow
async def test_a_huge_array_build_is_too_large_and_stores_nothing(
    root: Path, natives: dict[str, Path]
) -> None:
    """Issue 9: a 102-byte Go source stored a 270 MB main.bin. The source as reported builds
    small with Go 1.27.3 (the array is initialised at run time): it may be stored, within the
    artifact cap. Reading the array at a computed index puts all 256 MiB in the binary: that
    one must be TOO_LARGE, and nothing of it stored."""
    data = root / "data"
    async with serving(root) as srv, srv.client() as c:
        await add_bystanders(c, natives)
        await c.register("huge", wf.echo(), filename="small.wasm")
        try:
            meta = await c.register("huge", BUILD_HUGE_ARRAY_GO.encode(), filename="big.go")
        except TooLargeError:
            pass
        else:
            sizes = {p.name: p.stat().st_size
                     for p in (data / "huge" / str(meta["version"])).iterdir()}
            assert max(sizes.values()) <= 64 * MiB, sizes
            await c.delete("huge", meta["version"])
        with pytest.raises(TooLargeError):
            await c.register("huge", BUILD_HUGE_ARRAY_READ_GO.encode(), filename="big.go")
        [fn] = [f for f in await c.list() if f["name"] == "huge"]
        assert (fn["latest"], fn["versions"]) == (1, [1])
        got = await c.get("huge")
        assert [v["version"] for v in got["versions"]] == [1] and got["latest"] == 1
        assert sorted(p.name for p in (data / "huge").iterdir()) == ["1", "function.json"]
        await assert_serving(c)


# -- 10. two compile bombs while an echo is served ----------------------------------------------


async def test_two_compile_bombs_do_not_stop_invocations(
    root: Path, natives: dict[str, Path]
) -> None:
    """Issue 9: two 540 KB loop modules kept both workers busy and another client's echo
    waited 120 s. Each bomb here takes several seconds of one core to compile (see
    :func:`compile_bomb`); both compile at once while another client's echo is answered."""
    bombs = {"bomb-a": compile_bomb(1100, salt=1), "bomb-b": compile_bomb(1100, salt=2)}
    async with serving(root) as srv, srv.client() as c, srv.client() as other:
        await add_bystanders(other, natives)
        compiling = {name: asyncio.Event() for name in bombs}

        def on_progress(name: str) -> Callable[[dict[str, Any]], None]:
            def progress(event: dict[str, Any]) -> None:
                if event.get("stage") == "compile":
                    compiling[name].set()
            return progress

        registers: list[asyncio.Future[Any]] = [
            asyncio.ensure_future(c.register(name, wasm, filename=f"{name}.wasm",
                                             progress=on_progress(name)))
            for name, wasm in bombs.items()
        ]
        both: asyncio.Future[Any] = asyncio.ensure_future(
            asyncio.gather(*(e.wait() for e in compiling.values())))
        await asyncio.wait([both, *registers], return_when=asyncio.FIRST_COMPLETED)
        assert both.done(), [r.exception() for r in registers if r.done()]
        assert not any(r.done() for r in registers)
        # Both compiles are under way: another client's echo is answered before either ends.
        assert (await other.invoke("echo", b"meanwhile")).output == b"meanwhile"
        assert not any(r.done() for r in registers), "a compile bomb ended before the echo"
        outcomes = await asyncio.gather(*registers, return_exceptions=True)
        for outcome in outcomes:
            # Compiled within its limits, or refused by one: never INTERNAL.
            assert isinstance(outcome, dict | InvalidArgumentError | TooLargeError), outcome
        await assert_serving(other)


# -- beyond the list: a native function signals its own worker ---------------------------


async def test_a_native_function_cannot_kill_its_worker(
    root: Path, natives: dict[str, Path]
) -> None:
    """A native call runs under its worker's uid: found while writing these tests, it could
    SIGKILL its worker (and ``kill(-1)`` reaches it too), whose death the caller saw as
    INTERNAL. The worker outlives the call: a function may end itself, never its worker."""
    async with serving(root) as srv, srv.client() as c:
        await add_bystanders(c, natives)
        await register_native(c, natives, "regicide")
        uids = sandbox_uids(srv)

        def workers() -> set[int]:
            procs = _processes()
            return {pid for pid, (ppid, uid) in procs.items()
                    if uid in uids and ppid in srv.serving_pids()}

        before = workers()
        r = await c.invoke("regicide")
        lines = r.output.decode().splitlines()
        assert lines and lines[0] in ("parent:not visible", "parent:Operation not permitted",
                                      "parent:No such process"), (lines, r.stderr)
        assert workers() == before
        assert leftovers(srv, uids) == []
        await assert_serving(c)


# -- a native function talks to itself over 127.0.0.1 -------------------------------------------


async def test_a_native_function_has_a_loopback_of_its_own(
    root: Path, natives: dict[str, Path]
) -> None:
    async with serving(root) as srv, srv.client() as c:
        await add_bystanders(c, natives)
        await register_native(c, natives, "loopback")
        # Its own 127.0.0.1 works; the host's, where this very server listens, is not its own.
        r = await c.invoke("loopback", args=[str(srv.port)])
        assert (r.exit_code, r.output) == (0, b"self:ping\nhost:unreachable\n"), r.stderr
        await assert_serving(c)
