"""The exec pool against real worker processes, real wasmtime and real native binaries."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from fnserver.exec import ExecPool, InvokeJob, InvokeResult, Limits, precompiled_name
from fnserver.exec._pool import PIPELINE_MAX_DEPTH
from fnserver.exec._worker import PARK_AFTER_S
from fnserver.protocol.errors import (
    FnError,
    FunctionTimeoutError,
    InternalError,
    InvalidArgumentError,
    MemoryLimitError,
    TrapError,
    UnavailableError,
)
from tests import wasm_fixtures as wf


@pytest.fixture
async def pool() -> AsyncIterator[ExecPool]:
    p = ExecPool(workers=2)
    await p.start()
    try:
        yield p
    finally:
        await p.close()


def version_dir(
    root: Path, name: str, wasm: bytes | None = None, binary: Path | None = None
) -> Path:
    d = root / name / "1"
    d.mkdir(parents=True)
    if wasm is not None:
        (d / "main.wasm").write_bytes(wasm)
    if binary is not None:
        shutil.copy(binary, d / "main.bin")
        os.chmod(d / "main.bin", 0o755)
    # World-readable like the registry's dirs: workers run under their own uid.
    for p in (root, root / name, d):
        os.chmod(p, 0o755)
    return d


def job(
    d: Path,
    name: str,
    *,
    input: bytes = b"",
    args: tuple[str, ...] = (),
    mode: str = "wasm",
    **limits: int,
) -> InvokeJob:
    return InvokeJob(name, 1, mode, d, input, args, Limits(**limits))


# -- wasm ---------------------------------------------------------------------------------------


async def test_echo_and_precompiled_file(pool: ExecPool, tmp_path: Path) -> None:
    d = version_dir(tmp_path, "echo", wf.echo())
    data = os.urandom(200_000)
    r = await pool.invoke(job(d, "echo", input=data))
    assert isinstance(r, InvokeResult)
    assert r.output == data and r.exit_code == 0 and not r.truncated and r.mode == "wasm"
    assert r.wall_us >= r.duration_us > 0 and r.queue_us >= 0 and r.memory_peak >= 65536
    assert (d / precompiled_name()).is_file()
    assert precompiled_name().startswith("main.") and precompiled_name().endswith(".cwasm")
    r2 = await pool.invoke(job(d, "echo", input=b""))
    assert r2.output == b""


async def test_exit_code_stderr_and_argv(pool: ExecPool, tmp_path: Path) -> None:
    r = await pool.invoke(job(version_dir(tmp_path, "ex", wf.exit_code(3)), "ex"))
    assert (r.exit_code, r.output, r.stderr) == (3, b"bye", b"oops")
    r = await pool.invoke(job(version_dir(tmp_path, "av", wf.argv_echo()), "av", args=("a", "b c")))
    assert r.output == b"av\na\nb c\n"


async def test_infinite_loop_times_out_while_others_succeed(pool: ExecPool, tmp_path: Path) -> None:
    loop_dir = version_dir(tmp_path, "spin", wf.infinite_loop())
    echo_dir = version_dir(tmp_path, "echo", wf.echo())
    spin = asyncio.ensure_future(pool.invoke(job(loop_dir, "spin", timeout_ms=1500)))
    for i in range(5):
        r = await pool.invoke(job(echo_dir, "echo", input=b"%d" % i))
        assert r.output == b"%d" % i
    with pytest.raises(FunctionTimeoutError, match="'spin' timed out after 1500 ms") as exc:
        await spin
    assert isinstance(exc.value, TimeoutError)
    assert (await pool.invoke(job(echo_dir, "echo", input=b"after"))).output == b"after"


async def test_memory_grow_hits_limit(pool: ExecPool, tmp_path: Path) -> None:
    d = version_dir(tmp_path, "grow", wf.grow_forever())
    with pytest.raises(MemoryLimitError):
        await pool.invoke(job(d, "grow", memory_mb=16))


async def test_guest_asleep_in_host_call_is_killed(pool: ExecPool, tmp_path: Path) -> None:
    d = version_dir(tmp_path, "sleepy", wf.sleep(5))
    echo_dir = version_dir(tmp_path, "echo", wf.echo())
    await pool.precompile(d)  # the deadline then covers the guest alone
    t0 = time.monotonic()
    with pytest.raises(FunctionTimeoutError):
        await pool.invoke(job(d, "sleepy", timeout_ms=300))
    assert time.monotonic() - t0 < 3
    # The killed worker is replaced; the pool keeps serving.
    assert (await pool.invoke(job(echo_dir, "echo", input=b"x"))).output == b"x"


async def test_deep_recursion_traps(pool: ExecPool, tmp_path: Path) -> None:
    d = version_dir(tmp_path, "rec", wf.recurse_forever())
    with pytest.raises(TrapError) as exc:
        await pool.invoke(job(d, "rec"))
    assert exc.value.details["trap"] == "stack_overflow"
    assert "stderr" in exc.value.details


async def test_stdout_flood_is_truncated_and_ends(pool: ExecPool, tmp_path: Path) -> None:
    d = version_dir(tmp_path, "flood", wf.stdout_flood())
    t0 = time.monotonic()
    r = await pool.invoke(job(d, "flood", output_bytes=100_000, timeout_ms=10_000))
    assert time.monotonic() - t0 < 5
    assert r.truncated and len(r.output) == 100_000 and set(r.output) == {ord("x")}


async def test_precompile_rejects_garbage_and_non_commands(pool: ExecPool, tmp_path: Path) -> None:
    d = version_dir(tmp_path, "junk", b"\0asm\x01\0\0\0garbage")
    with pytest.raises(InvalidArgumentError, match="not a WebAssembly module"):
        await pool.precompile(d)
    d = version_dir(tmp_path, "text", b"hello, I am not wasm")
    with pytest.raises(InvalidArgumentError, match="not a WebAssembly module"):
        await pool.precompile(d)
    d = version_dir(tmp_path, "lib", wf.wat('(module (func (export "f")))'))
    with pytest.raises(InvalidArgumentError, match="_start"):
        await pool.precompile(d)
    d = version_dir(
        tmp_path, "env", wf.wat('(module (import "env" "f" (func)) (func (export "_start")))')
    )
    with pytest.raises(InvalidArgumentError, match="WASI"):
        await pool.precompile(d)
    assert not list(tmp_path.rglob("*.cwasm"))
    d = version_dir(tmp_path, "good", wf.echo())
    await pool.precompile(d)
    assert (d / precompiled_name()).is_file()


async def test_stale_or_missing_cwasm_recompiles(tmp_path: Path) -> None:
    d = version_dir(tmp_path, "echo", wf.echo())
    (d / "main.0000000000000000.cwasm").write_bytes(b"stale key")
    (d / precompiled_name()).write_bytes(b"corrupt, same key")
    async with _pool(1) as p:
        assert (await p.invoke(job(d, "echo", input=b"a"))).output == b"a"
    assert (d / precompiled_name()).stat().st_size > 1000
    assert not (d / "main.0000000000000000.cwasm").exists()
    (d / precompiled_name()).unlink()
    async with _pool(1) as p:  # fresh worker: no LRU, no file
        assert (await p.invoke(job(d, "echo", input=b"b"))).output == b"b"
    assert (d / precompiled_name()).is_file()


async def test_worker_killed_mid_call(pool: ExecPool, tmp_path: Path) -> None:
    d = version_dir(tmp_path, "sleepy", wf.sleep(5))
    echo_dir = version_dir(tmp_path, "echo", wf.echo())
    await pool.precompile(d)
    before = set(pool.stats()["pids"])
    call = asyncio.ensure_future(pool.invoke(job(d, "sleepy", timeout_ms=10_000)))
    await asyncio.sleep(0.3)
    busy = [w for w in pool._workers if w is not None and w.busy]
    assert len(busy) == 1
    os.kill(busy[0].pid, signal.SIGKILL)
    with pytest.raises(FnError) as exc:
        await call
    assert isinstance(exc.value, InternalError) and "died" in str(exc.value)
    assert (await pool.invoke(job(echo_dir, "echo", input=b"ok"))).output == b"ok"
    for _ in range(100):
        if len(pool.stats()["pids"]) == 2:
            break
        await asyncio.sleep(0.05)
    assert set(pool.stats()["pids"]) != before and len(pool.stats()["pids"]) == 2


async def test_queue_bound_per_function_and_close(tmp_path: Path) -> None:
    d = version_dir(tmp_path, "sleepy", wf.sleep(5))
    p = ExecPool(workers=1, max_queue=1)
    await p.start()
    await p.precompile(d)
    first = asyncio.ensure_future(p.invoke(job(d, "sleepy", timeout_ms=10_000)))
    await asyncio.sleep(0.1)
    second = asyncio.ensure_future(p.invoke(job(d, "sleepy", timeout_ms=10_000)))
    await asyncio.sleep(0.1)
    with pytest.raises(UnavailableError):
        await p.invoke(job(d, "sleepy"))
    assert p.stats()["queued"] == 1
    await p.close()
    await p.close()  # idempotent
    for fut in (first, second):
        with pytest.raises(UnavailableError):
            await fut
    with pytest.raises(UnavailableError):
        await p.invoke(job(d, "sleepy"))


async def test_per_function_cap_leaves_a_worker(pool: ExecPool, tmp_path: Path) -> None:
    assert pool.per_function == 1
    d = version_dir(tmp_path, "sleepy", wf.sleep(5))
    echo_dir = version_dir(tmp_path, "echo", wf.echo())
    await pool.precompile(d)
    stuck = [asyncio.ensure_future(pool.invoke(job(d, "sleepy", timeout_ms=400))) for _ in range(2)]
    await asyncio.sleep(0.1)
    assert pool.stats()["queued"] == 1  # the second call of "sleepy" waits for its turn
    r = await pool.invoke(job(echo_dir, "echo", input=b"free"))
    assert r.output == b"free"
    results = await asyncio.gather(*stuck, return_exceptions=True)
    assert all(isinstance(e, FunctionTimeoutError) for e in results)


async def test_short_function_borrows_the_spare_worker(pool: ExecPool, tmp_path: Path) -> None:
    assert pool.per_function == 1
    nap = version_dir(tmp_path, "nap", wf.sleep(0.02))
    await pool.invoke(job(nap, "nap"))  # known short now: it may use both workers
    calls = [asyncio.ensure_future(pool.invoke(job(nap, "nap"))) for _ in range(2)]
    await asyncio.sleep(0)
    assert pool.stats()["running"] == {"nap": 2} and pool.stats()["queued"] == 0
    await asyncio.gather(*calls)
    # A call of another function waits for at most one short call, never behind the queue.
    calls = [asyncio.ensure_future(pool.invoke(job(nap, "nap"))) for _ in range(6)]
    await asyncio.sleep(0)
    echo_dir = version_dir(tmp_path, "echo", wf.echo())
    r = await pool.invoke(job(echo_dir, "echo", input=b"x"))
    assert r.output == b"x" and sum(c.done() for c in calls) <= 3
    await asyncio.gather(*calls)


async def test_epoch_deadline_holds_after_the_ticker_parked(tmp_path: Path) -> None:
    loop = version_dir(tmp_path, "loop", wf.infinite_loop())
    echo = version_dir(tmp_path, "echo", wf.echo())
    async with _pool(1) as p:
        await p.precompile(loop)
        await p.invoke(job(echo, "echo", input=b"x"))
        await asyncio.sleep(PARK_AFTER_S + 0.5)  # idle: the epoch ticker parks
        pids = p.stats()["pids"]
        with pytest.raises(FunctionTimeoutError):
            await p.invoke(job(loop, "loop", timeout_ms=300))
        # Stopped by wasmtime's epoch deadline inside the worker, not by the parent's kill.
        assert p.stats()["pids"] == pids
        assert (await p.invoke(job(echo, "echo", input=b"y"))).output == b"y"


async def test_short_calls_are_pipelined_into_a_busy_worker(tmp_path: Path) -> None:
    d = version_dir(tmp_path, "echo", wf.echo())
    async with _pool(1) as p:
        await p.invoke(job(d, "echo", input=b"warm"))  # known short now
        calls = [asyncio.ensure_future(p.invoke(job(d, "echo", input=b"%d" % i))) for i in range(40)]
        await asyncio.sleep(0)
        # One call runs, a bounded number wait in the worker's pipe, the rest in the queue.
        held, queued = p.stats()["running"]["echo"], p.stats()["queued"]
        assert 2 <= held <= PIPELINE_MAX_DEPTH and held + queued == 40
        results = await asyncio.gather(*calls)
        assert [r.output for r in results] == [b"%d" % i for i in range(40)]
        # Time spent behind another call, in the pipe or the queue, is queue time.
        assert all(r.queue_us > 0 for r in results[1:])


async def test_longer_calls_wait_in_the_pool_not_in_a_worker(tmp_path: Path) -> None:
    nap = version_dir(tmp_path, "nap", wf.sleep(0.03))
    async with _pool(1) as p:
        await p.invoke(job(nap, "nap"))  # 30 ms a call: over PIPELINE_MAX_S
        calls = [asyncio.ensure_future(p.invoke(job(nap, "nap"))) for _ in range(3)]
        await asyncio.sleep(0)
        assert p.stats()["running"] == {"nap": 1} and p.stats()["queued"] == 2
        await asyncio.gather(*calls)


async def test_call_pipelined_behind_a_timeout_is_retried(tmp_path: Path) -> None:
    fast = version_dir(tmp_path, "fast", wf.echo())
    slow = version_dir(tmp_path, "slow", wf.sleep(5))
    async with _pool(1) as p:
        await p.precompile(slow)
        # Both jobs count as function "f": its history says short, so the second call is
        # queued inside the worker behind the first, which then overruns and is killed.
        await p.invoke(job(fast, "f", input=b"warm"))
        sleeper = asyncio.ensure_future(p.invoke(InvokeJob("f", 2, "wasm", slow, b"", (), Limits(timeout_ms=300))))
        await asyncio.sleep(0)
        behind = asyncio.ensure_future(p.invoke(job(fast, "f", input=b"still here")))
        await asyncio.sleep(0)
        assert p.stats()["running"] == {"f": 2}
        with pytest.raises(FunctionTimeoutError):
            await sleeper
        r = await behind  # never started in the dead worker: retried in its replacement
        assert r.output == b"still here" and r.queue_us >= 300_000


async def test_cancelling_a_pipelined_call_spares_the_running_one(tmp_path: Path) -> None:
    fast = version_dir(tmp_path, "fast", wf.echo())
    nap = version_dir(tmp_path, "nap", wf.sleep(0.3))
    async with _pool(1) as p:
        await p.precompile(nap)
        await p.invoke(job(fast, "f", input=b"warm"))
        pid = p.stats()["pids"]
        running = asyncio.ensure_future(p.invoke(InvokeJob("f", 2, "wasm", nap, b"", (), Limits())))
        await asyncio.sleep(0)
        queued = asyncio.ensure_future(p.invoke(job(fast, "f", input=b"gone")))
        await asyncio.sleep(0.05)
        assert p.stats()["running"] == {"f": 2}
        queued.cancel()
        r = await running  # its worker was not killed for the queued call's sake
        assert r.exit_code == 0 and p.stats()["pids"] == pid
        assert (await p.invoke(job(fast, "f", input=b"next"))).output == b"next"
        assert p.stats()["running"] == {} and p.stats()["pids"] == pid


async def test_mixed_load_with_timeouts_and_cancellations_settles_clean(tmp_path: Path) -> None:
    """Scheduler soak: short, sleeping, looping and hanging calls of several functions at
    once, some cancelled, on 2 workers. Every call ends with its own answer or its own
    error, and afterwards nothing is left held, queued or running."""
    import random

    rng = random.Random(1234)
    echo = version_dir(tmp_path, "echo", wf.echo())
    nap = version_dir(tmp_path, "nap", wf.sleep(0.02))
    spin = version_dir(tmp_path, "spin", wf.infinite_loop())
    hang = version_dir(tmp_path, "hang", wf.sleep(30))
    async with _pool(2) as p:
        for d in (nap, spin, hang):
            await p.precompile(d)

        async def one(i: int) -> str:
            kind = rng.choice(["echo"] * 6 + ["nap", "spin", "hang"])
            if kind == "echo":
                data = b"call %d" % i
                r = await p.invoke(job(echo, "echo", input=data))
                assert r.output == data
            elif kind == "nap":
                assert (await p.invoke(job(nap, "nap"))).exit_code == 0
            else:
                with pytest.raises(FunctionTimeoutError):
                    await p.invoke(job(spin if kind == "spin" else hang, kind, timeout_ms=200))
            return kind

        tasks = [asyncio.ensure_future(one(i)) for i in range(120)]
        await asyncio.sleep(0.05)
        cancelled = set(rng.sample(range(len(tasks)), 15))
        for i in cancelled:
            tasks[i].cancel()
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
        for i, res in enumerate(results):
            if isinstance(res, asyncio.CancelledError):
                assert i in cancelled
            else:
                assert isinstance(res, str), res  # an assertion or a wrong error lands here
        assert sum(isinstance(r, str) for r in results) >= len(tasks) - len(cancelled)
        for _ in range(200):  # workers killed by timeouts are being replaced
            if len(p.stats()["pids"]) == 2 and p.stats()["idle"] == 2:
                break
            await asyncio.sleep(0.05)
        stats = p.stats()
        assert (stats["running"], stats["queued"], stats["idle"]) == ({}, 0, 2)
        r = await p.invoke(job(echo, "echo", input=b"after"))
        assert r.output == b"after"


async def test_two_pools_never_share_a_sandbox_uid(pool: ExecPool, tmp_path: Path) -> None:
    d = version_dir(tmp_path, "echo", wf.echo())
    async with _pool(2) as other:
        mine = {s["uid"] for s in pool.stats()["sandbox"]}
        theirs = {s["uid"] for s in other.stats()["sandbox"]}
        assert not (mine & theirs - {None})
        a, b = await asyncio.gather(
            pool.invoke(job(d, "echo", input=b"a")), other.invoke(job(d, "echo", input=b"b"))
        )
        assert (a.output, b.output) == (b"a", b"b")


class _pool:
    def __init__(self, workers: int) -> None:
        self.p = ExecPool(workers=workers)

    async def __aenter__(self) -> ExecPool:
        await self.p.start()
        return self.p

    async def __aexit__(self, *exc: object) -> None:
        await self.p.close()


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
        if proc.returncode != 0:
            pytest.skip(f"gcc -static failed: {proc.stderr.decode(errors='replace')[:300]}")
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
    d = version_dir(tmp_path, "necho", binary=natives["echo"])
    for data in (b"hello", os.urandom(300_000)):
        r = await pool.invoke(job(d, "necho", mode="native", input=data, args=("xy", "z")))
        assert (r.output, r.stderr, r.exit_code, r.truncated) == (data, b"xz", 7, False)
        assert r.mode == "native" and r.memory_peak > 0


async def test_native_calls_start_in_an_empty_directory(
    pool: ExecPool, tmp_path: Path, natives: dict[str, Path]
) -> None:
    d = version_dir(tmp_path, "litter", binary=natives["litter"])
    # Each call counts the entries of its working directory, then dirties it (a file, then
    # a locked directory): the next call must still start in an empty, usable one.
    for how in ("file", "chmod", "none", "none"):
        r = await pool.invoke(job(d, "litter", mode="native", args=(how,)))
        assert (r.exit_code, r.output) == (0, b"0\n")


async def test_native_fork_storm_is_contained(
    pool: ExecPool, tmp_path: Path, natives: dict[str, Path]
) -> None:
    d = version_dir(tmp_path, "forks", binary=natives["forks"])
    r = await pool.invoke(job(d, "forks", mode="native", timeout_ms=5000))
    ok, fail = map(int, r.output.split())
    sandbox_uids = {s["uid"] for s in pool.stats()["sandbox"] if s.get("uid") is not None}
    if sandbox_uids:  # RLIMIT_NPROC holds only under a dedicated uid
        assert ok < 100 and fail >= 100
        worker_pids = set(pool.stats()["pids"])
        assert _uid_pids(sandbox_uids) <= worker_pids


async def test_native_daemon_is_killed(
    pool: ExecPool, tmp_path: Path, natives: dict[str, Path]
) -> None:
    d = version_dir(tmp_path, "daemon", binary=natives["daemon"])
    r = await pool.invoke(job(d, "daemon", mode="native", timeout_ms=5000))
    pid = int(r.output)
    assert r.exit_code == 0
    for _ in range(50):
        if not os.path.exists(f"/proc/{pid}"):
            break
        await asyncio.sleep(0.02)
    assert not os.path.exists(f"/proc/{pid}")


async def test_native_flood_truncated(
    pool: ExecPool, tmp_path: Path, natives: dict[str, Path]
) -> None:
    d = version_dir(tmp_path, "nflood", binary=natives["flood"])
    t0 = time.monotonic()
    r = await pool.invoke(job(d, "nflood", mode="native", output_bytes=50_000, timeout_ms=10_000))
    assert time.monotonic() - t0 < 5
    assert r.truncated and len(r.output) == 50_000 and set(r.output) == {ord("x")}


async def test_native_timeout(pool: ExecPool, tmp_path: Path, natives: dict[str, Path]) -> None:
    d = version_dir(tmp_path, "nspin", binary=natives["spin"])
    t0 = time.monotonic()
    with pytest.raises(FunctionTimeoutError):
        await pool.invoke(job(d, "nspin", mode="native", timeout_ms=300))
    assert time.monotonic() - t0 < 3


# -- engines: pooling allocator limits and fuel -------------------------------------------------


async def test_memory_limit_above_the_old_reservation(pool: ExecPool, tmp_path: Path) -> None:
    # The pooled slot covers all of wasm32: limits past 256 MiB still hold exactly.
    d = version_dir(tmp_path, "grow", wf.grow_forever())
    with pytest.raises(MemoryLimitError) as exc:
        await pool.invoke(job(d, "grow", memory_mb=600))
    assert 590 << 20 <= exc.value.details["memory"] <= 600 << 20
    echo_dir = version_dir(tmp_path, "echo", wf.echo())
    assert (await pool.invoke(job(echo_dir, "echo", input=b"after"))).output == b"after"


async def test_fuel_budget(pool: ExecPool, tmp_path: Path) -> None:
    spin = version_dir(tmp_path, "spin", wf.infinite_loop())
    t0 = time.monotonic()
    with pytest.raises(FunctionTimeoutError, match="out of fuel") as exc:
        await pool.invoke(job(spin, "spin", fuel=1_000_000, timeout_ms=20_000))
    assert exc.value.details["fuel"] == 1_000_000
    assert time.monotonic() - t0 < 10  # the budget stopped it, not the 20 s deadline
    echo_dir = version_dir(tmp_path, "echo", wf.echo())
    r = await pool.invoke(job(echo_dir, "echo", input=b"fueled", fuel=1_000_000))
    assert r.output == b"fueled"
    # Each engine has its own precompiled file; neither removes the other's.
    assert (echo_dir / precompiled_name(fuel=True)).is_file()
    assert precompiled_name(fuel=True) != precompiled_name()
    assert (await pool.invoke(job(echo_dir, "echo", input=b"plain"))).output == b"plain"
    assert (echo_dir / precompiled_name()).is_file()
    assert (echo_dir / precompiled_name(fuel=True)).is_file()
    with pytest.raises(InvalidArgumentError):
        await pool.invoke(job(echo_dir, "echo", fuel=0))
