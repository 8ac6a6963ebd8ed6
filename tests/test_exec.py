"""The exec pool against real wasmtime (in this process), real worker processes and real
native binaries.

No sleep is used to wait for something to happen and no test asserts how fast anything is:
tests wait for an observable change (pool stats, a pid gone, a worker's threads gone quiet)
with :func:`until`, a bounded poll, and assert outcomes and the order of events.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from fnserver.exec import ExecPool, InvokeJob, InvokeResult, Limits
from fnserver.exec._cachefile import parse_module_file_name
from fnserver.exec._engine import engine_key
from fnserver.exec._inproc import PARK_AFTER_S
from fnserver.exec._policy import PolicyConfig
from fnserver.exec._worker import NATIVE_NPROC
from fnserver.protocol import (
    FnError,
    FunctionTimeoutError,
    InternalError,
    InvalidArgumentError,
    MemoryLimitError,
    TrapError,
    UnavailableError,
)
from tests import wasm_fixtures as wf

#: Pipelining and borrowing thresholds so loose that a native echo counts as short on any
#: machine, however loaded: tests of pipelining then do not depend on measured call times.
LOOSE = PolicyConfig(per_function=1, max_queue=256, borrow_max_s=10.0, pipeline_max_s=10.0,
                     pipeline_budget_s=10.0)


@dataclass(frozen=True)
class Fn:
    """A function version on disk, as the registry would hand it to the pool."""

    name: str
    mode: str
    artifact: Path
    digest: str

    def job(
        self, *, input: bytes = b"", args: tuple[str, ...] = (), name: str | None = None,
        version: int = 1, **limits: int,
    ) -> InvokeJob:
        return InvokeJob(
            function=name or self.name, version=version, mode=self.mode,  # type: ignore[arg-type]
            artifact=self.artifact, digest=self.digest, input=input, args=args,
            limits=Limits(**limits),
        )


def _version_dir(root: Path, name: str) -> Path:
    d = root / "data" / name / "1"
    d.mkdir(parents=True)
    # World-readable like the registry's dirs: workers run under their own uid.
    for p in (root / "data", root / "data" / name, d):
        os.chmod(p, 0o755)
    return d


def wasm_fn(root: Path, name: str, wasm: bytes) -> Fn:
    path = _version_dir(root, name) / "main.wasm"
    path.write_bytes(wasm)
    os.chmod(path, 0o644)
    return Fn(name, "wasm", path, hashlib.sha256(wasm).hexdigest())


def native_fn(root: Path, name: str, binary: Path) -> Fn:
    path = _version_dir(root, name) / "main.bin"
    shutil.copy(binary, path)
    os.chmod(path, 0o755)
    return Fn(name, "native", path, hashlib.sha256(path.read_bytes()).hexdigest())


async def until(cond: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    """Poll ``cond`` until it holds; the bound only turns a hang into a clear failure."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.005)


async def yield_until(cond: Callable[[], bool], what: str, rounds: int = 100) -> None:
    """For changes made within the event loop alone: let it run until ``cond`` holds."""
    for _ in range(rounds):
        if cond():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never happened: {what}")


@contextlib.asynccontextmanager
async def open_pool(tmp_path: Path, workers: int, **kw: object) -> AsyncIterator[ExecPool]:
    p = ExecPool(workers=workers, cache_dir=tmp_path / "modules", **kw)  # type: ignore[arg-type]
    await p.start()
    try:
        yield p
    finally:
        await p.close()


@pytest.fixture
async def pool(tmp_path: Path) -> AsyncIterator[ExecPool]:
    async with open_pool(tmp_path, 2) as p:
        yield p


def cache_files(p: ExecPool) -> list[str]:
    return sorted(n for n in os.listdir(p.cache_dir) if n.endswith(".cwasm"))


def tree(root: Path) -> list[str]:
    return sorted(str(x.relative_to(root)) for x in root.rglob("*"))


# -- wasm ---------------------------------------------------------------------------------------


async def test_echo_and_the_node_module_cache(pool: ExecPool, tmp_path: Path) -> None:
    echo = wasm_fn(tmp_path, "echo", wf.echo())
    before = tree(echo.artifact.parent)
    data = os.urandom(200_000)
    r = await pool.invoke(echo.job(input=data, version=7))
    assert isinstance(r, InvokeResult)
    assert r.output == data and r.exit_code == 0 and not r.truncated and r.mode == "wasm"
    assert r.version == 7
    assert r.wall_us >= r.duration_us > 0 and r.queue_us >= 0 and r.memory_peak >= 65536
    # One compiled file, in the node's cache, named by artifact digest, engine key and the
    # sha256 of its own bytes; nothing written next to the artifact.
    [name] = cache_files(pool)
    digest, key, sha = parse_module_file_name(name) or ("", "", "")
    assert (digest, key) == (echo.digest, engine_key())
    assert hashlib.sha256((pool.cache_dir / name).read_bytes()).hexdigest() == sha
    assert stat.S_IMODE(os.stat(pool.cache_dir).st_mode) == 0o755
    assert stat.S_IMODE(os.stat(pool.cache_dir / name).st_mode) == 0o644
    assert os.stat(pool.cache_dir / name).st_uid == os.geteuid()
    assert tree(echo.artifact.parent) == before
    r2 = await pool.invoke(echo.job(input=b""))
    assert r2.output == b"" and pool.stats()["compiles"] == 1


async def test_exit_code_stderr_and_argv(pool: ExecPool, tmp_path: Path) -> None:
    r = await pool.invoke(wasm_fn(tmp_path, "ex", wf.exit_code(3)).job())
    assert (r.exit_code, r.output, r.stderr) == (3, b"bye", b"oops")
    r = await pool.invoke(wasm_fn(tmp_path, "av", wf.argv_echo()).job(args=("a", "b c")))
    assert r.output == b"av\na\nb c\n"


async def test_infinite_loop_times_out_while_others_succeed(pool: ExecPool, tmp_path: Path) -> None:
    spin = wasm_fn(tmp_path, "spin", wf.infinite_loop())
    echo = wasm_fn(tmp_path, "echo", wf.echo())
    await pool.precompile(spin.artifact, spin.digest)
    await pool.precompile(echo.artifact, echo.digest)
    looping = asyncio.ensure_future(pool.invoke(spin.job(timeout_ms=1500)))
    await until(lambda: pool.stats()["running"].get("spin") == 1, "the loop to run")
    for i in range(5):
        r = await pool.invoke(echo.job(input=b"%d" % i))
        assert r.output == b"%d" % i
    with pytest.raises(FunctionTimeoutError, match="'spin' timed out after 1500 ms") as exc:
        await looping
    assert isinstance(exc.value, TimeoutError)
    assert (await pool.invoke(echo.job(input=b"after"))).output == b"after"


async def test_memory_grow_hits_limit(pool: ExecPool, tmp_path: Path) -> None:
    with pytest.raises(MemoryLimitError):
        await pool.invoke(wasm_fn(tmp_path, "grow", wf.grow_forever()).job(memory_mb=16))


async def test_guest_asleep_in_host_call_is_stopped_at_its_deadline(pool: ExecPool, tmp_path: Path) -> None:
    sleepy = wasm_fn(tmp_path, "sleepy", wf.sleep(3600))
    echo = wasm_fn(tmp_path, "echo", wf.echo())
    await pool.precompile(sleepy.artifact, sleepy.digest)
    # Asleep for an hour in poll_oneoff, which epoch interruption cannot stop: fnserver's own
    # poll_oneoff honours the call's deadline, so the call times out and its thread is free.
    with pytest.raises(FunctionTimeoutError) as exc:
        await pool.invoke(sleepy.job(timeout_ms=300))
    assert exc.value.details["timeout_ms"] == 300
    assert pool.stats()["wasm"]["running"] == 0
    assert (await pool.invoke(echo.job(input=b"x"))).output == b"x"


async def test_deep_recursion_traps(pool: ExecPool, tmp_path: Path) -> None:
    with pytest.raises(TrapError) as exc:
        await pool.invoke(wasm_fn(tmp_path, "rec", wf.recurse_forever()).job())
    assert exc.value.details["trap"] == "stack_overflow"
    assert "stderr" in exc.value.details


async def test_stdout_flood_is_truncated_and_ends(pool: ExecPool, tmp_path: Path) -> None:
    flood = wasm_fn(tmp_path, "flood", wf.stdout_flood())
    # A result, not a timeout: the output cap stopped the flood, not the 60 s deadline.
    r = await pool.invoke(flood.job(output_bytes=100_000, timeout_ms=60_000))
    assert r.truncated and len(r.output) == 100_000 and set(r.output) == {ord("x")}


async def test_precompile_rejects_garbage_and_non_commands(pool: ExecPool, tmp_path: Path) -> None:
    cases = [
        ("junk", b"\0asm\x01\0\0\0garbage", "not a WebAssembly module"),
        ("text", b"hello, I am not wasm", "not a WebAssembly module"),
        ("lib", wf.wat('(module (func (export "f")))'), "_start"),
        ("env", wf.wat('(module (import "env" "f" (func)) (func (export "_start")))'), "WASI"),
        (
            "sig",  # a WASI name with the wrong signature: refused when imports are resolved
            wf.wat('(module (import "wasi_snapshot_preview1" "fd_write" (func)) '
                   '(func (export "_start")))'),
            "WASI",
        ),
    ]
    for name, wasm, match in cases:
        fn = wasm_fn(tmp_path, name, wasm)
        with pytest.raises(InvalidArgumentError, match=match):
            await pool.precompile(fn.artifact, fn.digest)
    assert cache_files(pool) == []
    good = wasm_fn(tmp_path, "good", wf.echo())
    await pool.precompile(good.artifact, good.digest)
    assert len(cache_files(pool)) == 1


async def test_precompile_checks_the_recorded_digest(pool: ExecPool, tmp_path: Path) -> None:
    fn = wasm_fn(tmp_path, "echo", wf.echo())
    with pytest.raises(InternalError, match="do not match"):
        await pool.precompile(fn.artifact, "0" * 64)
    with pytest.raises(InternalError, match="digest"):
        await pool.precompile(fn.artifact, "not hex")
    assert cache_files(pool) == []


async def test_a_compile_over_its_deadline_is_invalid_argument(tmp_path: Path) -> None:
    fn = wasm_fn(tmp_path, "echo", wf.echo())
    # Starting Python alone takes longer than 1 ms: the compiler is always over this limit.
    async with open_pool(tmp_path, 1, compile_timeout_s=0.001) as p:
        with pytest.raises(InvalidArgumentError, match="limit"):
            await p.precompile(fn.artifact, fn.digest)
        assert cache_files(p) == []
        with pytest.raises(InvalidArgumentError, match="limit"):
            await p.invoke(fn.job())
    assert not [x for x in os.listdir(tmp_path / "modules") if x.startswith(".tmp-")]


async def test_one_compile_per_key_with_concurrent_callers(pool: ExecPool, tmp_path: Path) -> None:
    echo = wasm_fn(tmp_path, "echo", wf.echo())
    results = await asyncio.gather(
        *(pool.invoke(echo.job(input=b"%d" % i)) for i in range(6)),
        *(pool.invoke(echo.job(input=b"f%d" % i, fuel=1_000_000)) for i in range(6)),
    )
    assert [r.output for r in results] == [b"%d" % i for i in range(6)] + [
        b"f%d" % i for i in range(6)
    ]
    # One compile for the main engine, one for the fuel engine: two files, two keys.
    assert pool.stats()["compiles"] == 2
    keys = {(parse_module_file_name(n) or ("", "", ""))[1] for n in cache_files(pool)}
    assert keys == {engine_key(), engine_key(fuel=True)} and len(keys) == 2


async def test_a_damaged_module_file_is_refused_and_recompiled(tmp_path: Path) -> None:
    echo = wasm_fn(tmp_path, "echo", wf.echo())
    other = wasm_fn(tmp_path, "other", wf.exit_code(3))
    async with open_pool(tmp_path, 1) as p:
        await p.precompile(other.artifact, other.digest)
        [other_file] = cache_files(p)
        await p.precompile(echo.artifact, echo.digest)
        [echo_file] = [n for n in cache_files(p) if n != other_file]
        # Someone swaps in another function's valid compiled code under echo's name (the
        # attack of issue 7); the worker has not loaded echo yet.
        shutil.copy(p.cache_dir / other_file, p.cache_dir / echo_file)
        r = await p.invoke(echo.job(input=b"mine"))
        # Refused before loading (its bytes do not hash to its name), recompiled, retried.
        assert (r.output, r.exit_code) == (b"mine", 0)
        assert p.stats()["compiles"] == 3
        # Rewritten with the right bytes (compiles are deterministic: same name).
        for name in cache_files(p):
            sha = (parse_module_file_name(name) or ("", "", ""))[2]
            assert hashlib.sha256((p.cache_dir / name).read_bytes()).hexdigest() == sha
    # A fresh pool finds the damage itself before any worker sees it.
    (p.cache_dir / echo_file).write_bytes(b"garbage, same name")
    async with open_pool(tmp_path, 1) as p2:
        assert (await p2.invoke(echo.job(input=b"again"))).output == b"again"
        assert p2.stats()["compiles"] == 1


async def test_old_compiled_files_in_version_dirs_are_never_loaded(tmp_path: Path) -> None:
    echo = wasm_fn(tmp_path, "echo", wf.echo())
    other = wasm_fn(tmp_path, "other", wf.exit_code(3))
    async with open_pool(tmp_path, 1) as p:
        await p.precompile(other.artifact, other.digest)
        [other_file] = cache_files(p)
        # Where the old layout kept it, valid code of another function under echo's name.
        planted = echo.artifact.parent / f"main.{engine_key()}.cwasm"
        shutil.copy(p.cache_dir / other_file, planted)
        before = tree(echo.artifact.parent)
        r = await p.invoke(echo.job(input=b"echo"))
        assert (r.output, r.exit_code) == (b"echo", 0)
        assert tree(echo.artifact.parent) == before


async def test_worker_killed_mid_call(
    pool: ExecPool, tmp_path: Path, natives: dict[str, Path]
) -> None:
    nap = native_fn(tmp_path, "nap", natives["nap"])
    echo = native_fn(tmp_path, "echo", natives["echo"])
    before = set(pool.stats()["pids"])
    call = asyncio.ensure_future(pool.invoke(nap.job(args=("30000",), timeout_ms=60_000)))
    await until(lambda: pool.stats()["running"] == {"nap": 1}, "the call to run")
    busy = [w for w in pool._workers if w is not None and w.busy]
    assert len(busy) == 1 and busy[0].scratch.is_dir()
    os.kill(busy[0].pid, signal.SIGKILL)
    with pytest.raises(FnError) as exc:
        await call
    assert isinstance(exc.value, InternalError) and "died" in str(exc.value)
    assert (await pool.invoke(echo.job(input=b"ok"))).output == b"ok"
    await until(lambda: len(pool.stats()["pids"]) == 2, "the replacement worker")
    assert set(pool.stats()["pids"]) != before
    # The killed worker could not clean up; its directory went with it all the same.
    assert not busy[0].scratch.exists()


async def test_close_leaves_no_worker_directory(tmp_path: Path) -> None:
    async with open_pool(tmp_path, 2) as p:
        dirs = [w.scratch for w in p._workers if w is not None]
        assert len(dirs) == 2 and all(d.is_dir() for d in dirs)
    assert not any(d.exists() for d in dirs)


async def test_wasm_queue_bound_and_close(tmp_path: Path) -> None:
    sleepy = wasm_fn(tmp_path, "sleepy", wf.sleep(30))
    p = ExecPool(workers=1, max_queue=1, wasm_slots=1, cache_dir=tmp_path / "modules")
    await p.start()
    await p.precompile(sleepy.artifact, sleepy.digest)
    first = asyncio.ensure_future(p.invoke(sleepy.job(timeout_ms=60_000)))
    await until(lambda: p.stats()["running"] == {"sleepy": 1}, "the first call to run")
    second = asyncio.ensure_future(p.invoke(sleepy.job(timeout_ms=60_000)))
    await yield_until(lambda: p.stats()["wasm"]["queued"] == 1, "the second call to queue")
    with pytest.raises(UnavailableError):
        await p.invoke(sleepy.job())
    assert p.stats()["wasm"]["queued"] == 1
    await p.close()
    await p.close()  # idempotent
    # The queued call is refused; the running one, asleep for 30 s, is stopped at once.
    for fut in (first, second):
        with pytest.raises(UnavailableError):
            await fut
    with pytest.raises(UnavailableError):
        await p.invoke(sleepy.job())
    with pytest.raises(UnavailableError):
        await p.precompile(sleepy.artifact, sleepy.digest)


async def test_native_queue_bound_and_close(tmp_path: Path, natives: dict[str, Path]) -> None:
    nap = native_fn(tmp_path, "nap", natives["nap"])
    p = ExecPool(workers=1, max_queue=1, cache_dir=tmp_path / "modules")
    await p.start()
    first = asyncio.ensure_future(p.invoke(nap.job(args=("30000",), timeout_ms=60_000)))
    await until(lambda: p.stats()["running"] == {"nap": 1}, "the first call to run")
    second = asyncio.ensure_future(p.invoke(nap.job(args=("30000",), timeout_ms=60_000)))
    await yield_until(lambda: p.stats()["queued"] == 1, "the second call to queue")
    with pytest.raises(UnavailableError):
        await p.invoke(nap.job())
    await p.close()
    for fut in (first, second):
        with pytest.raises(UnavailableError):
            await fut


async def test_wasm_per_function_cap_leaves_room(tmp_path: Path) -> None:
    sleepy = wasm_fn(tmp_path, "sleepy", wf.sleep(30))
    echo = wasm_fn(tmp_path, "echo", wf.echo())
    async with open_pool(tmp_path, 1, wasm_slots=2, wasm_per_function=1) as p:
        await p.precompile(sleepy.artifact, sleepy.digest)
        stuck = [asyncio.ensure_future(p.invoke(sleepy.job(timeout_ms=400))) for _ in range(2)]
        # The second call of "sleepy" waits for its turn: the other slot stays free.
        await until(lambda: p.stats()["wasm"]["queued"] == 1, "the second call to queue")
        assert p.stats()["running"] == {"sleepy": 1}
        r = await p.invoke(echo.job(input=b"free"))
        assert r.output == b"free"
        results = await asyncio.gather(*stuck, return_exceptions=True)
        assert all(isinstance(e, FunctionTimeoutError) for e in results)


async def test_wasm_functions_take_turns(tmp_path: Path) -> None:
    """Round robin across functions: with one slot, a newcomer's call runs after at most
    one more call of a function that has many queued."""
    nap = wasm_fn(tmp_path, "nap", wf.sleep(0.05))
    echo = wasm_fn(tmp_path, "echo", wf.echo())
    async with open_pool(tmp_path, 1, wasm_slots=1) as p:
        await p.precompile(nap.artifact, nap.digest)
        await p.precompile(echo.artifact, echo.digest)
        order: list[str] = []
        naps = [asyncio.ensure_future(p.invoke(nap.job())) for _ in range(6)]
        for n in naps:
            n.add_done_callback(lambda _: order.append("nap"))
        await until(lambda: p.stats()["wasm"]["queued"] == 5, "five naps queued")
        r = await p.invoke(echo.job(input=b"x"))
        order.append("echo")
        assert r.output == b"x"
        await asyncio.gather(*naps)
        assert order.index("echo") <= 2, order


async def test_per_function_cap_leaves_a_worker(
    pool: ExecPool, tmp_path: Path, natives: dict[str, Path]
) -> None:
    assert pool.per_function == 1
    nap = native_fn(tmp_path, "nap", natives["nap"])
    echo = native_fn(tmp_path, "echo", natives["echo"])
    stuck = [
        asyncio.ensure_future(pool.invoke(nap.job(args=("30000",), timeout_ms=400)))
        for _ in range(2)
    ]
    # The second call of "nap" waits for its turn: the other worker stays free.
    await yield_until(lambda: pool.stats()["queued"] == 1, "the second call to queue")
    assert pool.stats()["running"] == {"nap": 1}
    r = await pool.invoke(echo.job(input=b"free"))
    assert r.output == b"free"
    results = await asyncio.gather(*stuck, return_exceptions=True)
    assert all(isinstance(e, FunctionTimeoutError) for e in results)


async def test_short_function_borrows_the_spare_worker(
    tmp_path: Path, natives: dict[str, Path]
) -> None:
    nap = native_fn(tmp_path, "nap", natives["nap"])
    echo = native_fn(tmp_path, "echo", natives["echo"])
    # Borrowing threshold above the nap's 0.3 s, pipelining off: the outcome does not depend
    # on how long a call takes on a loaded machine.
    policy = PolicyConfig(per_function=1, max_queue=256, borrow_max_s=10.0, pipeline_max_s=0.0)
    async with open_pool(tmp_path, 2, policy=policy) as p:
        await p.invoke(nap.job(args=("300",)))  # known short now: it may use both workers
        calls = [asyncio.ensure_future(p.invoke(nap.job(args=("300",)))) for _ in range(2)]
        await yield_until(lambda: p.stats()["running"] == {"nap": 2}, "both workers napping")
        assert p.stats()["queued"] == 0
        await asyncio.gather(*calls)
        # A call of another function waits for one nap at most, never behind the queue.
        order: list[str] = []
        naps = [asyncio.ensure_future(p.invoke(nap.job(args=("300",)))) for _ in range(6)]
        for n in naps:
            n.add_done_callback(lambda _: order.append("nap"))
        await yield_until(lambda: p.stats()["queued"] == 4, "four naps queued")
        r = await p.invoke(echo.job(input=b"x"))
        order.append("echo")
        assert r.output == b"x"
        await asyncio.gather(*naps)
        assert order.index("echo") <= 3, order


async def test_epoch_deadline_holds_after_the_ticker_parked(tmp_path: Path) -> None:
    loop_fn = wasm_fn(tmp_path, "loop", wf.infinite_loop())
    echo = wasm_fn(tmp_path, "echo", wf.echo())
    async with open_pool(tmp_path, 1) as p:
        await p.precompile(loop_fn.artifact, loop_fn.digest)
        await p.invoke(echo.job(input=b"x"))
        ticker = p.wasm._ticker
        assert ticker is not None and ticker.native_id is not None
        tid = ticker.native_id
        # Idle: the epoch ticker parks. Observed, not assumed: its thread stops waking up.
        await until(lambda: _thread_quiet(tid), "the epoch ticker to park", 30 + PARK_AFTER_S)
        with pytest.raises(FunctionTimeoutError):
            await p.invoke(loop_fn.job(timeout_ms=300))
        assert p.stats()["wasm"]["running"] == 0
        assert (await p.invoke(echo.job(input=b"y"))).output == b"y"


def _switches(tid: int) -> int | None:
    with contextlib.suppress(OSError), open(f"/proc/self/task/{tid}/status") as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches"):
                return int(line.split()[1])
    return None


_last_switches: dict[int, int | None] = {}


def _thread_quiet(tid: int) -> bool:
    """True when thread ``tid`` of this process did not wake up since the previous look (a
    ticking thread wakes every 10 ms; polls are 5 ms apart plus however long the loop takes)."""
    now = _switches(tid)
    before, _last_switches[tid] = _last_switches.get(tid), now
    return before == now


async def test_short_calls_are_pipelined_into_a_busy_worker(
    tmp_path: Path, natives: dict[str, Path]
) -> None:
    echo = native_fn(tmp_path, "echo", natives["echo"])
    async with open_pool(tmp_path, 1, policy=LOOSE) as p:
        await p.invoke(echo.job(input=b"warm"))  # known short now
        calls = [asyncio.ensure_future(p.invoke(echo.job(input=b"%d" % i))) for i in range(40)]
        depth = LOOSE.pipeline_max_depth
        await yield_until(lambda: p.stats()["running"].get("echo") == depth, "a full pipeline")
        # One call runs, the others the depth allows wait in the worker's pipe, the rest in
        # the pool's queue.
        assert p.stats()["queued"] == 40 - depth
        results = await asyncio.gather(*calls)
        assert [r.output for r in results] == [b"%d" % i for i in range(40)]
        # Time spent behind another call, in the pipe or the queue, is queue time.
        assert all(r.queue_us > 0 for r in results[1:])


async def test_longer_calls_wait_in_the_pool_not_in_a_worker(
    tmp_path: Path, natives: dict[str, Path]
) -> None:
    nap = native_fn(tmp_path, "nap", natives["nap"])
    async with open_pool(tmp_path, 1) as p:
        await p.invoke(nap.job(args=("30",)))  # 30 ms a call: over the 10 ms pipelining limit
        calls = [asyncio.ensure_future(p.invoke(nap.job(args=("30",)))) for _ in range(3)]
        await yield_until(lambda: p.stats()["queued"] == 2, "two calls queued")
        assert p.stats()["running"] == {"nap": 1}
        await asyncio.gather(*calls)


async def test_call_pipelined_behind_a_timeout_runs_next(
    tmp_path: Path, natives: dict[str, Path]
) -> None:
    fast = native_fn(tmp_path, "fast", natives["echo"])
    slow = native_fn(tmp_path, "slow", natives["nap"])
    # Pipelining decided by LOOSE thresholds, not by how fast an echo ran on a loaded
    # machine (the cause of this test's failure under load).
    async with open_pool(tmp_path, 1, policy=LOOSE) as p:
        # Both jobs count as function "f": its history says short, so the second call is
        # queued inside the worker behind the first, which then overruns its deadline.
        await p.invoke(fast.job(name="f", input=b"warm"))
        pid = p.stats()["pids"]
        order: list[str] = []
        sleeper = asyncio.ensure_future(
            p.invoke(slow.job(name="f", version=2, args=("30000",), timeout_ms=300))
        )
        sleeper.add_done_callback(lambda _: order.append("sleeper"))
        await yield_until(lambda: p.stats()["running"] == {"f": 1}, "the sleeper to run")
        behind = asyncio.ensure_future(p.invoke(fast.job(name="f", input=b"still here")))
        behind.add_done_callback(lambda _: order.append("behind"))
        await yield_until(lambda: p.stats()["running"] == {"f": 2}, "a call pipelined behind")
        assert p.stats()["queued"] == 0
        with pytest.raises(FunctionTimeoutError):
            await sleeper
        r = await behind  # run by the same worker, right after the sleeper's deadline
        assert r.output == b"still here"
        await yield_until(lambda: len(order) == 2, "both done callbacks")
        assert order == ["sleeper", "behind"]
        assert p.stats()["pids"] == pid


async def test_call_pipelined_behind_a_dead_worker_is_retried(
    tmp_path: Path, natives: dict[str, Path]
) -> None:
    fast = native_fn(tmp_path, "fast", natives["echo"])
    slow = native_fn(tmp_path, "slow", natives["nap"])
    async with open_pool(tmp_path, 1, policy=LOOSE) as p:
        await p.invoke(fast.job(name="f", input=b"warm"))
        [pid] = p.stats()["pids"]
        sleeper = asyncio.ensure_future(
            p.invoke(slow.job(name="f", version=2, args=("3600000",), timeout_ms=60_000))
        )
        await yield_until(lambda: p.stats()["running"] == {"f": 1}, "the sleeper to run")
        behind = asyncio.ensure_future(p.invoke(fast.job(name="f", input=b"still here")))
        await yield_until(lambda: p.stats()["running"] == {"f": 2}, "a call pipelined behind")
        os.kill(pid, signal.SIGKILL)  # the worker dies under the sleeper (a crash, an operator)
        with pytest.raises(InternalError, match="died"):
            await sleeper
        # The call behind it never started in the dead worker: retried in its replacement.
        assert (await behind).output == b"still here"
        assert p.stats()["pids"] != [pid]


async def test_cancelling_a_pipelined_call_spares_the_running_one(
    tmp_path: Path, natives: dict[str, Path]
) -> None:
    fast = native_fn(tmp_path, "fast", natives["echo"])
    nap = native_fn(tmp_path, "nap", natives["nap"])
    async with open_pool(tmp_path, 1, policy=LOOSE) as p:
        await p.invoke(fast.job(name="f", input=b"warm"))
        pid = p.stats()["pids"]
        running = asyncio.ensure_future(p.invoke(nap.job(name="f", version=2, args=("300",))))
        await yield_until(lambda: p.stats()["running"] == {"f": 1}, "the nap to run")
        queued = asyncio.ensure_future(p.invoke(fast.job(name="f", input=b"gone")))
        await yield_until(lambda: p.stats()["running"] == {"f": 2}, "a call pipelined behind")
        queued.cancel()
        r = await running  # its worker was not killed for the queued call's sake
        assert r.exit_code == 0 and p.stats()["pids"] == pid
        assert (await p.invoke(fast.job(name="f", input=b"next"))).output == b"next"
        assert p.stats()["running"] == {} and p.stats()["pids"] == pid


async def test_cancelling_a_queued_call_frees_its_place(tmp_path: Path) -> None:
    nap = wasm_fn(tmp_path, "nap", wf.sleep(0.3))
    async with open_pool(tmp_path, 1, max_queue=1, wasm_slots=1) as p:
        await p.precompile(nap.artifact, nap.digest)
        first = asyncio.ensure_future(p.invoke(nap.job()))
        await until(lambda: p.stats()["running"] == {"nap": 1}, "the first call to run")
        second = asyncio.ensure_future(p.invoke(nap.job()))
        await yield_until(lambda: p.stats()["wasm"]["queued"] == 1, "the second call to queue")
        second.cancel()
        await yield_until(lambda: p.stats()["wasm"]["queued"] == 0, "the queue to empty")
        third = asyncio.ensure_future(p.invoke(nap.job()))  # the place is free again
        assert (await first).exit_code == 0 and (await third).exit_code == 0
        assert second.cancelled()


async def test_mixed_load_with_timeouts_and_cancellations_settles_clean(tmp_path: Path) -> None:
    """Admission soak: short, sleeping, looping and hanging calls of several functions at
    once, some cancelled, on 4 slots. Every call ends with its own answer or its own
    error, and afterwards nothing is left held, queued or running."""
    import random

    rng = random.Random(1234)
    echo = wasm_fn(tmp_path, "echo", wf.echo())
    nap = wasm_fn(tmp_path, "nap", wf.sleep(0.02))
    spin = wasm_fn(tmp_path, "spin", wf.infinite_loop())
    hang = wasm_fn(tmp_path, "hang", wf.sleep(30))
    async with open_pool(tmp_path, 1, wasm_slots=4, wasm_per_function=2) as p:
        for fn in (echo, nap, spin, hang):
            await p.precompile(fn.artifact, fn.digest)

        async def one(i: int) -> str:
            kind = rng.choice(["echo"] * 6 + ["nap", "spin", "hang"])
            if kind == "echo":
                data = b"call %d" % i
                r = await p.invoke(echo.job(input=data))
                assert r.output == data
            elif kind == "nap":
                assert (await p.invoke(nap.job())).exit_code == 0
            else:
                with pytest.raises(FunctionTimeoutError):
                    await p.invoke((spin if kind == "spin" else hang).job(timeout_ms=200))
            return kind

        tasks = [asyncio.ensure_future(one(i)) for i in range(120)]
        for _ in range(20):  # let some start, some queue, some finish: then cancel a few
            await asyncio.sleep(0)
        cancelled = set(rng.sample(range(len(tasks)), 15))
        for i in cancelled:
            tasks[i].cancel()
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 300)
        for i, res in enumerate(results):
            if isinstance(res, asyncio.CancelledError):
                assert i in cancelled
            else:
                assert isinstance(res, str), res  # an assertion or a wrong error lands here
        # A cancelled caller's guest finishes on its thread; its slot is freed when it does.
        await until(lambda: p.stats()["wasm"]["running"] == 0, "cancelled guests to end")
        stats = p.stats()
        assert (stats["running"], stats["wasm"]["queued"]) == ({}, 0)
        r = await p.invoke(echo.job(input=b"after"))
        assert r.output == b"after"


async def test_two_pools_never_share_a_sandbox_uid(
    pool: ExecPool, tmp_path: Path, natives: dict[str, Path]
) -> None:
    echo = native_fn(tmp_path, "echo", natives["echo"])
    async with open_pool(tmp_path / "other", 2) as other:
        mine = {s["uid"] for s in pool.stats()["sandbox"]}
        theirs = {s["uid"] for s in other.stats()["sandbox"]}
        assert not (mine & theirs - {None})
        a, b = await asyncio.gather(
            pool.invoke(echo.job(input=b"a")), other.invoke(echo.job(input=b"b"))
        )
        assert (a.output, b.output) == (b"a", b"b")


async def test_workers_cannot_write_the_module_cache(pool: ExecPool) -> None:
    sandbox = pool.stats()["sandbox"]
    assert len(sandbox) == 2
    for s in sandbox:
        assert "the module cache is writable by the worker" not in s["refused"]


# -- native -------------------------------------------------------------------------------------

C_SOURCES = {
    "echo": r"""
#include <unistd.h>
int main(int argc, char **argv) {
    char b[65536]; ssize_t n;
    while ((n = read(0, b, sizeof b)) > 0) write(1, b, n);
    for (int i = 1; i < argc; i++) write(2, argv[i], 1);
    return 7;
}""",
    "forks": r"""
#include <stdio.h>
#include <unistd.h>
int main(void) {
    int ok = 0, fail = 0;
    for (int i = 0; i < 100000 && fail < 100; i++) {
        pid_t p = fork();
        if (p == 0) { for (;;) pause(); }
        if (p > 0) ok++; else fail++;
    }
    printf("%d %d\n", ok, fail);
    return 0;
}""",
    "daemon": r"""
#include <stdio.h>
#include <unistd.h>
int main(void) {
    if (fork() == 0) {
        setsid();
        if (fork() == 0) { printf("%d\n", getpid()); fflush(stdout); sleep(100); }
        _exit(0);
    }
    sleep(1);
    return 0;
}""",
    "flood": r"""
#include <string.h>
#include <unistd.h>
int main(void) { char b[65536]; memset(b, 'x', sizeof b); for (;;) write(1, b, sizeof b); }""",
    "spin": "int main(void) { for (;;) {} }",
    # Talks to itself over 127.0.0.1, then tries the host's port argv[1].
    "loopback": r"""
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>
int main(int argc, char **argv) {
    struct sockaddr_in a = {0}, h = {0};
    socklen_t n = sizeof a;
    char buf[8] = {0};
    a.sin_family = h.sin_family = AF_INET;
    a.sin_addr.s_addr = h.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    h.sin_port = htons(atoi(argv[1]));
    int l = socket(AF_INET, SOCK_STREAM, 0), c = socket(AF_INET, SOCK_STREAM, 0);
    if (bind(l, (void *)&a, sizeof a) || listen(l, 1) || getsockname(l, (void *)&a, &n)
        || connect(c, (void *)&a, sizeof a)) { perror("self"); return 1; }
    int s = accept(l, 0, 0);
    write(c, "ping", 4);
    read(s, buf, 4);
    printf("self:%s\n", buf);
    int d = socket(AF_INET, SOCK_STREAM, 0);
    printf("host:%s\n", connect(d, (void *)&h, sizeof h) ? "unreachable" : "REACHED");
    return 0;
}""",
    # argv[1] "w": leaves file argv[2] in /tmp, /var/tmp and /dev/shm; "r": looks for them,
    # for the command line of process argv[3], and counts the processes it can see.
    "snoop": r"""
#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
static const char *dirs[] = {"/tmp", "/var/tmp", "/dev/shm"};
int main(int argc, char **argv) {
    char path[512];
    for (int i = 0; i < 3; i++) {
        snprintf(path, sizeof path, "%s/%s", dirs[i], argv[2]);
        if (argv[1][0] == 'w') {
            int fd = open(path, O_WRONLY | O_CREAT, 0666);
            printf("%s:%s\n", dirs[i], fd >= 0 ? "wrote" : "refused");
        } else {
            printf("%s:%s\n", dirs[i], access(path, F_OK) == 0 ? "FOUND" : "absent");
        }
    }
    if (argv[1][0] == 'r') {
        snprintf(path, sizeof path, "/proc/%s/cmdline", argv[3]);
        printf("cmdline:%s\n", open(path, O_RDONLY) >= 0 ? "READ" : "hidden");
        int n = 0;
        DIR *d = opendir("/proc");
        struct dirent *e;
        while (d && (e = readdir(d)) != NULL)
            if (e->d_name[0] >= '1' && e->d_name[0] <= '9') n++;
        printf("processes:%d\n", n);
    }
    return 0;
}""",
    # Touches 1 GiB of shared memory, or (argv[1] "fork") forks first thing and has both
    # processes touch 512 MiB of private memory.
    "hog": r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>
static void try_write(const char *what, const char *path, const char *value) {
    FILE *f = fopen(path, "w");
    int ok = f && fputs(value, f) >= 0 && fflush(f) == 0;
    printf("%s:%s\n", what, ok ? "WROTE" : "refused");
    if (f) fclose(f);
}
int main(int argc, char **argv) {
    if (argc > 1 && argv[1][0] == 'x') {  /* try to lift the limit, or to leave the group */
        char line[512], path[1024], pid[32];
        FILE *c = fopen("/proc/self/cgroup", "r");
        while (c && fgets(line, sizeof line, c))
            if (strstr(line, ":memory:")) {
                char *rel = strchr(strchr(line, ':') + 1, ':') + 1;
                rel[strcspn(rel, "\n")] = 0;
                snprintf(path, sizeof path, "/sys/fs/cgroup/memory%s/memory.limit_in_bytes", rel);
                try_write("limit", path, "-1");
                *strrchr(rel, '/') = 0;
                snprintf(path, sizeof path, "/sys/fs/cgroup/memory%s/cgroup.procs", rel);
                snprintf(pid, sizeof pid, "%d", getpid());
                try_write("leave", path, pid);
            }
        return 0;
    }
    int forked = argc > 1 && argv[1][0] == 'f';
    pid_t p = forked ? fork() : -1;
    size_t n = forked ? 1UL << 29 : 1UL << 30;
    char *m = mmap(0, n, PROT_READ | PROT_WRITE,
                   (forked ? MAP_PRIVATE : MAP_SHARED) | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) { printf("mmap refused\n"); return 3; }
    for (size_t i = 0; i < n; i += 4096) m[i] = 1;
    if (p > 0) waitpid(p, 0, 0);
    printf("touched %zu MiB\n", n >> 20);
    return 0;
}""",
    # Counts the entries of directory argv[1] (-1: cannot open it).
    "ls": r"""
#include <dirent.h>
#include <stdio.h>
int main(int argc, char **argv) {
    DIR *d = opendir(argv[1]);
    int n = 0;
    if (!d) { printf("-1\n"); return 0; }
    while (readdir(d)) n++;
    printf("%d\n", n - 2);
    return 0;
}""",
    # Sleeps argv[1] milliseconds (default 30 s).
    "nap": r"""
#include <stdlib.h>
#include <time.h>
int main(int argc, char **argv) {
    long ms = argc > 1 ? atol(argv[1]) : 30000;
    struct timespec t = { ms / 1000, (ms % 1000) * 1000000L };
    while (nanosleep(&t, &t) != 0) {}
    return 0;
}""",
    # The first thing it does: print its RLIMIT_NPROC and RLIMIT_FSIZE soft limits.
    "probe": r"""
#include <stdio.h>
#include <sys/resource.h>
int main(void) {
    struct rlimit n, f;
    getrlimit(RLIMIT_NPROC, &n);
    getrlimit(RLIMIT_FSIZE, &f);
    printf("%lld %lld\n", (long long)n.rlim_cur, (long long)f.rlim_cur);
    return 0;
}""",
    # Tries to overwrite argv[1], then to create a file in directory argv[2] and in argv[3].
    "vandal": r"""
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
static void attempt(const char *what, int fd) {
    printf("%s:%s\n", what, fd >= 0 ? "WROTE" : strerror(errno));
    if (fd >= 0) { write(fd, "x", 1); close(fd); }
}
int main(int argc, char **argv) {
    char path[4096];
    attempt("overwrite", open(argv[1], O_WRONLY));
    snprintf(path, sizeof path, "%s/planted.cwasm", argv[2]);
    attempt("create", open(path, O_WRONLY | O_CREAT, 0644));
    snprintf(path, sizeof path, "%s/main.0000000000000000.cwasm", argv[3]);
    attempt("version", open(path, O_WRONLY | O_CREAT, 0644));
    return 0;
}""",
    "litter": r"""
#include <dirent.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
int main(int argc, char **argv) {
    DIR *d = opendir(".");
    struct dirent *e;
    int n = 0;
    while ((e = readdir(d)) != NULL)
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) n++;
    printf("%d\n", n);
    if (argc > 1 && argv[1][0] == 'f') { FILE *f = fopen("left-behind", "w"); fputs("x", f); fclose(f); }
    if (argc > 1 && argv[1][0] == 'c') chmod(".", 0);
    return 0;
}""",
}


@pytest.fixture(scope="module")
def natives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed")
    out = tmp_path_factory.mktemp("native")
    built: dict[str, Path] = {}
    for name, src in C_SOURCES.items():
        (out / f"{name}.c").write_text(src)
        proc = subprocess.run(
            [gcc, "-static", "-O1", "-o", str(out / name), str(out / f"{name}.c")],
            capture_output=True,
            timeout=120,
        )
        if proc.returncode != 0:  # our own sources: a failure here is a bug in this file
            pytest.fail(f"gcc -static {name}.c failed: {proc.stderr.decode(errors='replace')[:600]}")
        built[name] = out / name
    return built


def _uid_pids(uids: set[int]) -> set[int]:
    pids = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}").st_uid in uids:
                    pids.add(int(name))
            except OSError:
                pass
    return pids


async def test_native_echo(pool: ExecPool, tmp_path: Path, natives: dict[str, Path]) -> None:
    fn = native_fn(tmp_path, "necho", natives["echo"])
    for data in (b"hello", os.urandom(300_000)):
        r = await pool.invoke(fn.job(input=data, args=("xy", "z")))
        assert (r.output, r.stderr, r.exit_code, r.truncated) == (data, b"xz", 7, False)
        assert r.mode == "native" and r.memory_peak > 0


async def test_native_loopback_is_its_own(
    pool: ExecPool, tmp_path: Path, natives: dict[str, Path]
) -> None:
    """A native function may talk to itself over 127.0.0.1 (many programs do), but the
    host's loopback, where fnserver and everything else on the machine listens, is not
    its loopback."""
    if not all(s["netns"] for s in pool.stats()["sandbox"]):
        pytest.skip("this host refuses network namespaces")
    fn = native_fn(tmp_path, "loop", natives["loopback"])
    with socket.socket() as host:
        host.bind(("127.0.0.1", 0))
        host.listen(1)
        r = await pool.invoke(fn.job(args=(str(host.getsockname()[1]),)))
    assert (r.exit_code, r.output) == (0, b"self:ping\nhost:unreachable\n"), r.stderr


async def test_native_calls_leave_nothing_behind_and_see_no_host_process(
    tmp_path: Path, natives: dict[str, Path]
) -> None:
    """What a call writes to /tmp, /var/tmp or /dev/shm is gone when it ends and never
    reached the host's; the server's process (its command line holds --token) and every
    other process of the host are invisible."""
    fn = native_fn(tmp_path, "snoop", natives["snoop"])
    name = f"fnserver-left-{os.urandom(6).hex()}"
    async with open_pool(tmp_path, 1) as p:  # one worker: the next call runs where this one did
        if not all(s.get("uid") is not None for s in p.stats()["sandbox"]):
            pytest.skip("the private mounts need a server started as root")
        wrote = (await p.invoke(fn.job(args=("w", name)))).output.decode().splitlines()
        assert wrote == ["/tmp:wrote", "/var/tmp:wrote", "/dev/shm:wrote"]
        for d in ("/tmp", "/var/tmp", "/dev/shm"):
            assert not os.path.exists(os.path.join(d, name))
        seen = (await p.invoke(fn.job(args=("r", name, str(os.getpid()))))).output.decode()
    lines = seen.splitlines()
    assert lines[:4] == ["/tmp:absent", "/var/tmp:absent", "/dev/shm:absent", "cmdline:hidden"]
    # Only processes of the worker's uid: the worker and the call itself.
    assert lines[4].startswith("processes:") and int(lines[4].split(":")[1]) <= 2, lines


@pytest.mark.parametrize("how", ["shared", "fork"])
async def test_native_memory_counts_everything_from_the_first_instruction(
    pool: ExecPool, tmp_path: Path, natives: dict[str, Path], how: str
) -> None:
    """Shared mappings count, and so does a child forked before the worker could touch it:
    the call is born in its worker's memory cgroup. Over the limit is MEMORY_LIMIT."""
    sandbox = pool.stats()["sandbox"]
    if not all(s.get("uid") is not None for s in sandbox) or any(
        r.startswith("memory cgroup") for s in sandbox for r in s["refused"]
    ):
        pytest.skip("no memory cgroup for the workers on this host")
    fn = native_fn(tmp_path, "hog", natives["hog"])
    with pytest.raises(MemoryLimitError) as exc:
        await pool.invoke(fn.job(args=(how,), memory_mb=128, timeout_ms=60_000))
    assert exc.value.details["memory_mb"] == 128
    # Within its limit the same binary runs (a 64 MiB hog with a 1 GiB limit).
    r = await pool.invoke(fn.job(args=(how,), memory_mb=2048, timeout_ms=60_000))
    assert r.exit_code == 0 and r.output.startswith(b"touched"), (r.output, r.stderr)
    # The call can neither lift its own limit nor move itself out of its group.
    r = await pool.invoke(fn.job(args=("x",)))
    assert r.output == b"limit:refused\nleave:refused\n", (r.output, r.stderr)
    # The worker lived through it: the next call is served by the same workers.
    pids = set(pool.stats()["pids"])
    echo = native_fn(tmp_path, "echo", natives["echo"])
    assert (await pool.invoke(echo.job(input=b"after"))).output == b"after"
    assert set(pool.stats()["pids"]) == pids


async def test_native_calls_cannot_see_the_store(natives: dict[str, Path]) -> None:
    """The store and the caches are covered by empty file systems in the worker's mount
    namespace: a native function sees nothing of them, its own version directory included
    (it runs all the same: the worker opens its binary through its own handle)."""
    # Outside /tmp (which the worker's private /tmp covers anyway) and outside the top-level
    # directories covered whole (/var, /home, /opt...), under a directory every uid may
    # search, so that "sees nothing" is the store's own cover and not a permission.
    base = Path("/usr/local")
    if os.geteuid() != 0 or not os.access(base, os.W_OK):
        pytest.skip("the private mounts need a server started as root")
    root = Path(tempfile.mkdtemp(prefix="fnserver-store-test-", dir=base))
    try:
        os.chmod(root, 0o755)
        fn = native_fn(root, "ls", natives["ls"])
        store = root / "data"
        assert len(list(store.iterdir())) == 1
        async with open_pool(root, 1, hidden=(store,)) as p:
            (p.cache_dir / "planted.cwasm").write_bytes(b"x")  # something there to see
            # Empty covers, and nothing under them (-1: no such directory).
            for path, seen in ((store, b"0\n"), (p.cache_dir, b"0\n"),
                               (fn.artifact.parent, b"-1\n")):
                r = await p.invoke(fn.job(args=(str(path),)))
                assert r.output == seen, (path, r.output, r.stderr)
            assert all(
                "the module cache is writable by the worker" not in s["refused"]
                for s in p.stats()["sandbox"]
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def test_native_calls_start_in_an_empty_directory(
    pool: ExecPool, tmp_path: Path, natives: dict[str, Path]
) -> None:
    fn = native_fn(tmp_path, "litter", natives["litter"])
    # Each call counts the entries of its working directory, then dirties it (a file, then
    # a locked directory): the next call must still start in an empty, usable one.
    for how in ("file", "chmod", "none", "none"):
        r = await pool.invoke(fn.job(args=(how,)))
        assert (r.exit_code, r.output) == (0, b"0\n")


async def test_native_fork_storm_is_contained(
    pool: ExecPool, tmp_path: Path, natives: dict[str, Path]
) -> None:
    fn = native_fn(tmp_path, "forks", natives["forks"])
    r = await pool.invoke(fn.job(timeout_ms=30_000))
    ok, fail = map(int, r.output.split())
    sandbox_uids = {s["uid"] for s in pool.stats()["sandbox"] if s.get("uid") is not None}
    if sandbox_uids:  # RLIMIT_NPROC holds only under a dedicated uid
        # At most the per-call budget, never the worker's own larger limit.
        assert ok < NATIVE_NPROC and fail >= 100
        # The worker killed and reaped everything before it replied: only workers are left.
        worker_pids = set(pool.stats()["pids"])
        assert _uid_pids(sandbox_uids) <= worker_pids


async def test_native_limits_hold_from_the_first_instruction(
    pool: ExecPool, tmp_path: Path, natives: dict[str, Path]
) -> None:
    # The per-call limits used to be applied by prlimit just after spawn: a binary that ran
    # first saw the worker's own RLIMIT_NPROC (72 on 2 CPUs), 12 calls in 300 under load,
    # which let a fork storm reach 67 processes. Inherited at spawn now, so every call sees
    # the call's limits from its first instruction.
    if not all(s.get("uid") is not None for s in pool.stats()["sandbox"]):
        pytest.skip("RLIMIT_NPROC applies only under a dedicated sandbox uid (root)")
    fn = native_fn(tmp_path, "probe", natives["probe"])
    seen = set()
    for _ in range(60):
        r = await pool.invoke(fn.job(output_bytes=1000))
        nproc, fsize = map(int, r.output.split())
        seen.add(nproc)
        assert fsize == 1001
    assert max(seen) <= 8 + NATIVE_NPROC, seen  # the worker's few threads + the budget


async def test_native_functions_cannot_write_compiled_modules(
    pool: ExecPool, tmp_path: Path, natives: dict[str, Path]
) -> None:
    if not all(s.get("uid") is not None for s in pool.stats()["sandbox"]):
        pytest.skip("workers keep the server's uid when not started as root")
    echo = wasm_fn(tmp_path, "echo", wf.echo())
    await pool.invoke(echo.job(input=b"x"))
    [target] = cache_files(pool)
    before = (pool.cache_dir / target).read_bytes()
    vandal = native_fn(tmp_path, "vandal", natives["vandal"])
    r = await pool.invoke(
        vandal.job(args=(str(pool.cache_dir / target), str(pool.cache_dir),
                         str(echo.artifact.parent)))
    )
    lines = r.output.decode().splitlines()
    # Refused by permissions, or (where the paths are under the host's /tmp, as pytest's
    # are) not even visible from the worker's private /tmp.
    assert [line.split(":")[0] for line in lines] == ["overwrite", "create", "version"], lines
    assert all(
        line.split(":")[1] in ("Permission denied", "No such file or directory") for line in lines
    ), lines
    assert (pool.cache_dir / target).read_bytes() == before
    assert (await pool.invoke(echo.job(input=b"still echo"))).output == b"still echo"


async def test_native_daemon_is_killed(
    pool: ExecPool, tmp_path: Path, natives: dict[str, Path]
) -> None:
    fn = native_fn(tmp_path, "daemon", natives["daemon"])
    r = await pool.invoke(fn.job(timeout_ms=30_000))
    pid = int(r.output)
    assert r.exit_code == 0
    # The worker kills what a call left before replying; /proc may lag the reaping a little.
    await until(lambda: not os.path.exists(f"/proc/{pid}"), f"the daemon {pid} to be gone")


async def test_native_flood_truncated(
    pool: ExecPool, tmp_path: Path, natives: dict[str, Path]
) -> None:
    fn = native_fn(tmp_path, "nflood", natives["flood"])
    # A result, not a timeout: the output cap (SIGXFSZ) ended it, not the 60 s deadline.
    r = await pool.invoke(fn.job(output_bytes=50_000, timeout_ms=60_000))
    assert r.exit_code == 128 + signal.SIGXFSZ
    assert r.truncated and len(r.output) == 50_000 and set(r.output) == {ord("x")}


async def test_native_timeout(pool: ExecPool, tmp_path: Path, natives: dict[str, Path]) -> None:
    fn = native_fn(tmp_path, "nspin", natives["spin"])
    with pytest.raises(FunctionTimeoutError):
        await pool.invoke(fn.job(timeout_ms=300))
    assert (await pool.invoke(native_fn(tmp_path, "e", natives["echo"]).job())).exit_code == 7


# -- engines: pooling allocator limits and fuel -------------------------------------------------


async def test_memory_limit_above_the_old_reservation(pool: ExecPool, tmp_path: Path) -> None:
    # The pooled slot covers all of wasm32: limits past 256 MiB still hold exactly.
    with pytest.raises(MemoryLimitError) as exc:
        await pool.invoke(wasm_fn(tmp_path, "grow", wf.grow_forever()).job(memory_mb=600))
    assert 590 << 20 <= exc.value.details["memory"] <= 600 << 20
    echo = wasm_fn(tmp_path, "echo", wf.echo())
    assert (await pool.invoke(echo.job(input=b"after"))).output == b"after"


async def test_fuel_budget(pool: ExecPool, tmp_path: Path) -> None:
    spin = wasm_fn(tmp_path, "spin", wf.infinite_loop())
    # "out of fuel", not "timed out": the budget stopped it, not the 60 s deadline.
    with pytest.raises(FunctionTimeoutError, match="out of fuel") as exc:
        await pool.invoke(spin.job(fuel=1_000_000, timeout_ms=60_000))
    assert exc.value.details["fuel"] == 1_000_000
    echo = wasm_fn(tmp_path, "echo", wf.echo())
    r = await pool.invoke(echo.job(input=b"fueled", fuel=1_000_000))
    assert r.output == b"fueled"
    assert (await pool.invoke(echo.job(input=b"plain"))).output == b"plain"
    # Each engine has its own compiled file of the same artifact; neither removes the other's.
    keys = {
        (parse_module_file_name(n) or ("", "", ""))[1]
        for n in cache_files(pool)
        if n.startswith(echo.digest)
    }
    assert keys == {engine_key(), engine_key(fuel=True)} and engine_key() != engine_key(True)
    with pytest.raises(InvalidArgumentError):
        await pool.invoke(echo.job(fuel=0))
