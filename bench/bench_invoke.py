"""Invocation throughput and latency through a real fnserver, against an in-process floor.

    python bench/bench_invoke.py [--quick | --smoke] [--workers N] [--out FILE]

Three echo functions (the tests' WAT echo, a C echo and a Go echo, the last two built with
fnserver's Builder), each measured as the best in-process floor and through a real server at
1 and 64 in flight on one connection and 64 in flight over 8 connections (issue 8, item 6).
Then the noisy neighbours (issue 8): 10 spinning and 4 sleeping functions kept in flight, each
on its own connection, while another client's WAT echo is timed (`noisy_echo@1`, target p99
<= 50 ms). Last, the design's ceiling: ``bench/_bare.py``, a server that runs the same call
inline and does nothing else, at 1 and 64 in flight. See bench/README.md for what the figures
mean. Loopback only; stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
INPUT = b"x" * 100  # 100-byte stdin, as in MEASURED.md

C_SOURCE = b"""#include <unistd.h>
static char buf[65536];
int main(void) {
    ssize_t n;
    while ((n = read(0, buf, sizeof buf)) > 0) write(1, buf, (size_t)n);
    return 0;
}
"""
GO_SOURCE = b"""package main

import (
\t"io"
\t"os"
)

func main() {
\tin, _ := io.ReadAll(os.Stdin)
\tos.Stdout.Write(in)
}
"""
MODES = {
    # seconds per server phase, seconds per floor run, seconds of warm-up before each phase;
    # seconds of the noisy-neighbour phase and the timeout its spinners and sleepers run into
    "smoke": {"phase_s": 0.25, "floor_s": 0.2, "warmup_s": 0.05,
              "noisy_s": 1.0, "noise_timeout_ms": 500},
    "quick": {"phase_s": 2.0, "floor_s": 1.5, "warmup_s": 0.3,
              "noisy_s": 6.0, "noise_timeout_ms": 2000},
    "full": {"phase_s": 8.0, "floor_s": 5.0, "warmup_s": 1.0,
             "noisy_s": 20.0, "noise_timeout_ms": 2000},
}
FUNCTIONS = {  # key -> what it is
    "wat": "tiny WAT echo (tests/wasm_fixtures.py)",
    "c": "C echo (zig cc, wasm32-wasi)",
    "go": "Go echo (GOOS=wasip1)",
}
# (name suffix, calls in flight, connections they are spread over)
SHAPES = (("@1", 1, 1), ("@64", 64, 1), ("@64/8conn", 64, 8))
BARE_SHAPES = SHAPES[:2]
CONNECTIONS = max(n for _, _, n in SHAPES)
# The noisy neighbours (issue 8): how many distinct functions of each kind are kept in flight
# (one call each, each on its own connection) while another client's echo is timed.
NOISE = {"spin": 10, "sleep": 4}  # an endless loop; an hour in poll_oneoff
NOISY_PHASE = "noisy_echo@1"
NOISY_ECHO = "wat"  # the echo timed among them
NOISY_TARGET_MS = 50.0  # its p99


# -- modules ------------------------------------------------------------------------------------


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fnserver-bench"


def build_modules(smoke: bool) -> dict[str, bytes]:
    """The three echo modules; the C and Go ones built once with fnserver's Builder."""
    from tests import wasm_fixtures

    wat = wasm_fixtures.echo()
    if smoke:
        # No toolchain: every slot runs the tests' WAT echo (the figures are then meaningless).
        return {key: wat for key in FUNCTIONS}
    from fnserver.builder import Builder

    root = cache_dir()
    out: dict[str, bytes] = {"wat": wat}
    todo: list[tuple[str, str, bytes, Path]] = []
    for key, filename, source in (("c", "echo.c", C_SOURCE), ("go", "echo.go", GO_SOURCE)):
        tag = hashlib.sha256(source).hexdigest()[:16]
        done = root / "modules" / f"{key}-{tag}.wasm"
        if done.is_file():
            out[key] = done.read_bytes()
        else:
            todo.append((key, filename, source, done))
    if todo:
        print("building the bench modules once (a cold zig/go cache takes ~1 min) ...", flush=True)

        async def build_all() -> None:
            builder = Builder(root / "build-cache")
            for key, filename, source, done in todo:
                with tempfile.TemporaryDirectory() as tmp:
                    upload = Path(tmp) / filename
                    upload.write_bytes(source)
                    built = await builder.build(upload, filename, Path(tmp) / "out")
                    done.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(built.files["wasm"], done)
                    out[key] = done.read_bytes()

        asyncio.run(build_all())
    return {key: out[key] for key in FUNCTIONS}


def noise_modules() -> dict[str, bytes]:
    """``spin0..9`` (the tests' endless loop) and ``sleep0..3`` (an hour in poll_oneoff), each
    a distinct module: a custom section naming it changes its hash, so no two share an
    artifact or a compiled module."""
    from tests import wasm_fixtures

    base = {"spin": wasm_fixtures.infinite_loop(), "sleep": wasm_fixtures.sleep(3600)}
    return {key: _with_custom_section(base[key.rstrip("0123456789")], key.encode())
            for key in noise_keys()}


def noise_keys() -> list[str]:
    return [f"{kind}{i}" for kind, count in NOISE.items() for i in range(count)]


def _with_custom_section(wasm: bytes, payload: bytes) -> bytes:
    def leb128(n: int) -> bytes:
        out = bytearray()
        while True:
            byte, n = n & 0x7F, n >> 7
            out.append(byte | (0x80 if n else 0))
            if not n:
                return bytes(out)

    name = b"fnserver-bench"
    body = leb128(len(name)) + name + payload
    return wasm + b"\x00" + leb128(len(body)) + body


# -- the in-process floor -----------------------------------------------------------------------


def floor(wasm: bytes, seconds: float) -> dict[str, Any]:
    """Fresh Store per call, in this process, with the server's engine and C-API call path
    (output into memory through fnserver's fd_write: no file, no syscall per write)."""
    import wasmtime

    from fnserver.exec._engine import make_engine
    from fnserver.exec._guest import run_guest
    from fnserver.exec._wasi import install_output, thread_deadline

    engine = make_engine()
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    install_output(linker)
    pre = linker.instantiate_pre(wasmtime.Module(engine, wasm))

    def call() -> int:
        t0 = time.perf_counter_ns()
        run = run_guest(
            engine, pre, args=("floor",), stdin=INPUT, memory_limit=128 << 20,
            deadline_ticks=1 << 40, fuel=None, out_cap=1 << 20, err_keep=1 << 16,
        )
        output = bytes(thread_deadline().out)
        run.close()
        elapsed = time.perf_counter_ns() - t0
        if run.failure is not None or output != INPUT:
            raise RuntimeError(f"floor call failed: {run.failure!r} {output[:80]!r}")
        return elapsed

    for _ in range(20):
        call()
    lat: list[int] = []
    start = time.perf_counter()
    end = start + seconds
    while time.perf_counter() < end:
        lat.append(call())
    elapsed = time.perf_counter() - start
    return _summary(lat, elapsed)


def _summary(lat_ns: list[int], elapsed: float) -> dict[str, Any]:
    lat_ns.sort()
    n = len(lat_ns)
    return {
        "calls": n,
        "seconds": round(elapsed, 3),
        "per_s": round(n / elapsed, 1),
        "p50_us": round(statistics.median(lat_ns) / 1000, 1),
        "p99_us": round(lat_ns[min(n - 1, int(n * 0.99))] / 1000, 1),
    }


# -- the load generator (a separate process) ----------------------------------------------------


def _proc_cpu_s(pids: list[int]) -> float:
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
        except OSError:
            continue
    return total


def _family(pid: int) -> list[int]:
    """The server and its worker processes."""
    pids = [pid]
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                pids.extend(int(p) for p in f.read().split())
    except OSError:
        pass
    return pids


async def _loadgen(spec: dict[str, Any]) -> dict[str, Any]:
    from fnclient import AsyncClient

    results: dict[str, Any] = {}
    server_pids = _family(spec["server_pid"])
    # All connections are opened (HELLO done) before the first phase; the one-connection
    # phases use the first.
    clients = [AsyncClient(spec["address"]) for _ in range(spec["connections"])]
    try:
        for c in clients:
            await c.connect()
        for phase in spec["phases"]:
            if phase.get("noise"):
                results[phase["name"]] = await _noisy(spec, phase)
                continue
            name, fn, inflight = phase["name"], phase.get("function"), phase["in_flight"]
            conns = clients[: phase["connections"]]

            async def one(client: AsyncClient, fn: str | None = fn) -> int:
                t0 = time.perf_counter_ns()
                if fn is None:
                    await client.ping()
                else:
                    res = await client.invoke(fn, INPUT)
                    if res.output != INPUT:
                        raise RuntimeError(f"{fn}: wrong output {res.output[:80]!r}")
                return time.perf_counter_ns() - t0

            async def loop(client: AsyncClient, until: float, sink: list[int]) -> None:
                while time.perf_counter() < until:
                    sink.append(await one(client))

            # Caller i uses connection i mod n: 64 in flight over 8 connections is 8 on each.
            warm: list[int] = []
            until = time.perf_counter() + spec["warmup_s"]
            await asyncio.gather(*(loop(conns[i % len(conns)], until, warm)
                                   for i in range(inflight)))
            lat: list[int] = []
            cpu0 = resource.getrusage(resource.RUSAGE_SELF)
            srv0 = _proc_cpu_s(server_pids)
            start = time.perf_counter()
            await asyncio.gather(*(loop(conns[i % len(conns)], start + spec["phase_s"], lat)
                                   for i in range(inflight)))
            elapsed = time.perf_counter() - start
            cpu1 = resource.getrusage(resource.RUSAGE_SELF)
            srv1 = _proc_cpu_s(server_pids)
            summary = _summary(lat, elapsed)
            client_cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
            summary["client_cpu_us_per_call"] = round(client_cpu / len(lat) * 1e6, 1)
            summary["server_cpu_us_per_call"] = round((srv1 - srv0) / len(lat) * 1e6, 1)
            summary["in_flight"] = inflight
            summary["connections"] = len(conns)
            results[name] = summary
    finally:
        for c in clients:
            await c.close()
    return results


async def _noisy(spec: dict[str, Any], phase: dict[str, Any]) -> dict[str, Any]:
    """One call of each noise function kept in flight, each on its own connection and
    re-issued as soon as it ends (with its timeout), while one more connection calls the echo
    one call at a time for ``phase["seconds"]``; then the noise is stopped and waited for.

    Bounded: every call, noise or echo, is given up client-side ``guard`` seconds after it
    was sent, and the noise still in flight at the end is waited for at most that long.
    """
    from fnclient import AsyncClient, FnError, FunctionTimeoutError

    fns, timeout_ms = phase["noise"], phase["noise_timeout_ms"]
    guard = timeout_ms / 1000 + 30
    clients = [AsyncClient(spec["address"]) for _ in range(len(fns) + 1)]
    echo_client, noise_clients = clients[0], clients[1:]
    stop = False
    in_flight = 0
    outcomes: dict[str, int] = {}
    echo_errors: dict[str, int] = {}

    async def noise(client: AsyncClient, fn: str) -> None:
        nonlocal in_flight
        while not stop:
            in_flight += 1
            try:
                async with asyncio.timeout(guard):
                    await client.invoke(fn, INPUT, timeout_ms=timeout_ms)
                outcome = "ok"
            except FunctionTimeoutError:
                outcome = "timeout"
            except FnError as e:
                outcome = e.code
            except TimeoutError:
                outcome = "no answer"
            finally:
                in_flight -= 1
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            if outcome not in ("ok", "timeout"):
                await asyncio.sleep(0.05)  # refused: do not spin on the refusal

    async def echo(until: float, sink: list[int], seen: list[int]) -> None:
        while time.perf_counter() < until:
            seen.append(in_flight)
            t0 = time.perf_counter_ns()
            try:
                async with asyncio.timeout(guard):
                    res = await echo_client.invoke(phase["function"], INPUT)
            except (FnError, TimeoutError) as e:
                code = getattr(e, "code", "no answer")
                echo_errors[code] = echo_errors.get(code, 0) + 1
                continue
            if res.output != INPUT:
                raise RuntimeError(f"{phase['function']}: wrong output {res.output[:80]!r}")
            sink.append(time.perf_counter_ns() - t0)

    tasks: list[asyncio.Task[None]] = []
    try:
        await asyncio.gather(*(c.connect() for c in clients))
        tasks = [asyncio.create_task(noise(c, fn)) for c, fn in zip(noise_clients, fns, strict=True)]
        # The noise reaches the server while the echo warms up (and its first calls compile).
        await echo(time.perf_counter() + max(spec["warmup_s"], 0.2), [], [])
        lat: list[int] = []
        seen: list[int] = []
        start = time.perf_counter()
        await echo(start + phase["seconds"], lat, seen)
        elapsed = time.perf_counter() - start
    finally:
        stop = True
        drain0 = time.perf_counter()
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=guard)
            for t in late:
                t.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        drain_s = time.perf_counter() - drain0
        for c in clients:
            await c.close()
    for t in tasks:
        if not t.cancelled() and t.exception() is not None:
            raise RuntimeError("a noise caller failed") from t.exception()
    if not lat:
        raise RuntimeError(f"no echo answered among the noise: {echo_errors}")
    summary = _summary(lat, elapsed)
    summary["max_us"] = round(lat[-1] / 1000, 1)  # _summary sorted them
    summary["in_flight"] = 1
    summary["connections"] = 1
    summary["echo_errors"] = echo_errors
    summary["noise"] = {
        "functions": len(fns),
        "timeout_ms": timeout_ms,
        "in_flight_mean": round(statistics.fmean(seen), 2),
        "in_flight_min": min(seen),
        "calls_ended": outcomes,
        "drain_s": round(drain_s, 3),
    }
    return summary


def _echo_phases(shapes: tuple[tuple[str, int, int], ...]) -> list[dict[str, Any]]:
    """The ping, then each function in each of ``shapes``."""
    phases: list[dict[str, Any]] = [
        {"name": "ping@1", "function": None, "in_flight": 1, "connections": 1}]
    for key in FUNCTIONS:
        for suffix, inflight, conns in shapes:
            phases.append({"name": key + suffix, "function": f"bench-{key}",
                           "in_flight": inflight, "connections": conns})
    return phases


def server_phases(cfg: dict[str, float]) -> list[dict[str, Any]]:
    """fnserver's phases: the ping, each function in each shape, then the noisy neighbours."""
    phases = _echo_phases(SHAPES)
    # Last, so that no other phase runs while the noise drains.
    phases.append({"name": NOISY_PHASE, "function": f"bench-{NOISY_ECHO}",
                   "noise": [f"bench-{key}" for key in noise_keys()],
                   "noise_timeout_ms": cfg["noise_timeout_ms"], "seconds": cfg["noisy_s"]})
    return phases


def bare_phases() -> list[dict[str, Any]]:
    """The bare server's phases: its ping, each function at 1 and 64 in flight on one
    connection (it is one process: more connections change nothing)."""
    return _echo_phases(BARE_SHAPES)


def run_loadgen(address: str, server_pid: int, cfg: dict[str, float],
                phases: list[dict[str, Any]]) -> dict[str, Any]:
    spec = {"address": address, "server_pid": server_pid, "phases": phases,
            "connections": CONNECTIONS, "phase_s": cfg["phase_s"], "warmup_s": cfg["warmup_s"]}
    budget = (60 + len(phases) * (cfg["phase_s"] + cfg["warmup_s"]) * 2
              + (cfg["noisy_s"] + 3 * (cfg["noise_timeout_ms"] / 1000 + 30)
                 if any("noise" in ph for ph in phases) else 0))
    proc = subprocess.run(
        [sys.executable, __file__, "--loadgen", json.dumps(spec)],
        capture_output=True, timeout=budget, cwd=ROOT,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed:\n{proc.stderr.decode(errors='replace')}")
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


# -- the server ---------------------------------------------------------------------------------


class Server:
    """``fnserver`` as a subprocess on port 0 with its own temporary data dir."""

    def __init__(self, workers: int | None, extra: list[str] | None = None, *, new_session: bool = False,
                 prefix: list[str] | None = None, host: str = "127.0.0.1") -> None:
        self.tmp = tempfile.mkdtemp(prefix="fnserver-bench-")
        self.log = Path(self.tmp) / "server.log"
        # prefix: run it through another command (``ip netns exec NS``: a network of its own).
        argv = [*(prefix or []), sys.executable, "-m", "fnserver", "--host", host, "--port", "0",
                "--data-dir", str(Path(self.tmp) / "data"), "--no-warm", "--log-level", "info",
                *(extra or [])]
        if workers is not None:
            argv += ["--workers", str(workers)]
        with open(self.log, "wb") as log:
            # new_session: its own process group, so kill() takes the whole node at once.
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log, cwd=ROOT, start_new_session=new_session)
        self.address = self._wait_address()

    def _wait_address(self) -> str:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            m = re.search(r"listening on (\S+)", self.log.read_text(errors="replace"))
            if m:
                return m.group(1)
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"fnserver did not start:\n{self.log.read_text(errors='replace')}")

    def kill(self) -> None:
        """SIGKILL the server's process group (started with ``new_session``): supervisor,
        control and serving processes at once, as a machine that dies would."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)


class BareServer:
    """``bench/_bare.py`` (the design's ceiling) serving the echo modules as ``bench-KEY``."""

    def __init__(self, modules: dict[str, bytes]) -> None:
        self.tmp = tempfile.mkdtemp(prefix="fnserver-bare-")
        for key, wasm in modules.items():
            (Path(self.tmp) / f"bench-{key}.wasm").write_bytes(wasm)
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "_bare.py"), self.tmp],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode(errors="replace")  # ends when it dies
        m = re.search(r"listening on (\S+)", line)
        if m is None:
            self.stop()
            raise RuntimeError(f"the bare server did not start: {line}")
        self.address = m.group(1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)


async def _register(address: str, modules: dict[str, bytes]) -> None:
    from fnclient import AsyncClient

    async with AsyncClient(address) as client:
        for key, wasm in modules.items():
            await client.register(f"bench-{key}", wasm, filename=f"{key}.wasm")


# -- main ---------------------------------------------------------------------------------------


def _machine() -> dict[str, Any]:
    import importlib.metadata
    import platform

    from fnserver.exec._engine import engine_settings

    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "wasmtime": importlib.metadata.version("wasmtime"),
        "loadavg_at_start": _loadavg(),
        "engine": engine_settings(),
        "code": _code_version(),
    }


def _code_version() -> dict[str, Any]:
    """The commit measured, and the files of the working tree that differ from it."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                                  timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    changed = [line[3:] for line in git("status", "--porcelain", "--", "fnserver",
                                        "client").splitlines()]
    return {"commit": git("rev-parse", "HEAD").strip() or None, "uncommitted": changed}


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


TARGETS = {
    "throughput_64_vs_floor": ">= 1.0",
    "throughput_64_8conn_vs_floor": ">= 1.0",
    "p50_1_vs_2floor_plus_rtt": "<= 1.0",
}
NOISY_TARGET = f"<= {NOISY_TARGET_MS:g}"


def ratios(result: dict[str, Any]) -> dict[str, float]:
    """Issue 8's targets, per function.

    ``throughput_64_vs_floor``: calls/s at 64 in flight on one connection / floor calls/s;
    ``throughput_64_8conn_vs_floor``: the same over 8 connections;
    ``p50_1_vs_2floor_plus_rtt``: p50 at 1 in flight / (2 x floor p50 + ping p50).
    """
    server, fl = result["server"], result["floor"]
    rtt = server["ping@1"]["p50_us"]
    out: dict[str, float] = {}
    for key in FUNCTIONS:
        out[f"{key}_throughput_64_vs_floor"] = round(
            server[f"{key}@64"]["per_s"] / fl[key]["per_s"], 3)
        out[f"{key}_throughput_64_8conn_vs_floor"] = round(
            server[f"{key}@64/8conn"]["per_s"] / fl[key]["per_s"], 3)
        out[f"{key}_p50_1_vs_2floor_plus_rtt"] = round(
            server[f"{key}@1"]["p50_us"] / (2 * fl[key]["p50_us"] + rtt), 3)
    bare = result.get("bare")
    if bare is not None:  # the same ratios for the ceiling, against its own ping
        bare_rtt = bare["ping@1"]["p50_us"]
        for key in FUNCTIONS:
            out[f"{key}_bare_throughput_64_vs_floor"] = round(
                bare[f"{key}@64"]["per_s"] / fl[key]["per_s"], 3)
            out[f"{key}_bare_p50_1_vs_2floor_plus_rtt"] = round(
                bare[f"{key}@1"]["p50_us"] / (2 * fl[key]["p50_us"] + bare_rtt), 3)
    return out


def print_table(result: dict[str, Any]) -> None:
    m = result["machine"]
    print(f"\nfnserver invoke bench ({result['mode']}, {m['cpus']} CPUs, {result['workers']} "
          f"workers, load avg {m['loadavg_at_start'][0]} at start, "
          f"{result['loadavg_at_end'][0]} at end)")
    head = (f"{'':20}{'in flight':>10}{'conns':>6}{'calls/s':>9}{'p50 us':>9}{'p99 us':>9}"
            f"{'client cpu':>12}{'server cpu':>12}")
    print(head)
    print("-" * len(head))

    def row(label: str, s: dict[str, Any], inflight: str, conns: str, mark: str = "") -> None:
        cpu = ""
        if "client_cpu_us_per_call" in s:
            cpu = (f"{s['client_cpu_us_per_call']:>10.1f}us"
                   f"{s['server_cpu_us_per_call']:>10.1f}us")
        print(f"{label:20}{inflight:>10}{conns:>6}{s['per_s']:>9.0f}{s['p50_us']:>9.1f}"
              f"{s['p99_us']:>9.1f}{cpu}{mark}")

    row("ping (server)", result["server"]["ping@1"], "1", "1")
    for key in FUNCTIONS:
        for when, runs in result["floor_runs"].items():
            f = runs[key]
            row(f"{key} floor {when}", f, "1", "-", " *" if f is result["floor"][key] else "")
        for suffix, inflight, conns in SHAPES:
            row(f"{key} fnserver", result["server"][key + suffix], str(inflight), str(conns))
        for suffix, inflight, conns in BARE_SHAPES:
            row(f"{key} bare", result["bare"][key + suffix], str(inflight), str(conns))
    row("ping (bare)", result["bare"]["ping@1"], "1", "1")
    print("\n* the floor the ratios use (the faster of the two runs)")
    print("bare: bench/_bare.py, the same call inline in a server that does nothing else (the"
          " design's ceiling)")
    r = result["ratios"]
    print(f"\n{'ratio (target)':40}" + "".join(f"{key:>8}" for key in FUNCTIONS))
    for name, target in TARGETS.items():
        print(f"{name + ' (' + target + ')':40}"
              + "".join(f"{r[f'{key}_{name}']:>8.3f}" for key in FUNCTIONS))
    print("the ceiling, bare:")
    for name in ("throughput_64_vs_floor", "p50_1_vs_2floor_plus_rtt"):
        print(f"{'  ' + name:40}" + "".join(f"{r[f'{key}_bare_{name}']:>8.3f}" for key in FUNCTIONS))
    noisy = result["server"][NOISY_PHASE]
    noise = noisy["noise"]
    print(f"\nnoisy neighbours: {NOISE['spin']} spinning + {NOISE['sleep']} sleeping functions, "
          f"one call each in flight on its own connection ({noise['in_flight_mean']} on average), "
          f"re-issued at their {noise['timeout_ms']} ms timeout; another client's {NOISY_ECHO} "
          f"echo, one call at a time:")
    print(f"{'':20}{'calls':>10}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}")
    print(f"{'noisy echo':20}{noisy['calls']:>10}{noisy['p50_us'] / 1000:>9.2f}"
          f"{noisy['p99_us'] / 1000:>9.2f}{noisy['max_us'] / 1000:>9.2f}")
    met = "met" if result["noisy_echo_p99_ms"] <= NOISY_TARGET_MS else "NOT met"
    print(f"{'noisy_echo_p99_ms (' + NOISY_TARGET + ')':40}{result['noisy_echo_p99_ms']:>8.2f}"
          f"  {met}")
    if noisy["echo_errors"]:
        print(f"echo errors among the noise: {noisy['echo_errors']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="short phases (~45 s in all)")
    g.add_argument("--smoke", action="store_true",
                   help="tiny phases and the WAT echo in every slot: checks the plumbing, "
                        "not the speed (a few seconds; run by tests/test_bench.py)")
    g.add_argument("--loadgen", metavar="SPEC", help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, default=None, help="server workers (default: 1 per CPU)")
    p.add_argument("--out", type=Path, default=None, help="JSON file (default bench/results/)")
    a = p.parse_args(argv)
    if a.loadgen:
        import uvloop

        print(json.dumps(uvloop.run(_loadgen(json.loads(a.loadgen)))))
        return 0
    mode = "smoke" if a.smoke else "quick" if a.quick else "full"
    cfg = MODES[mode]
    t0 = time.monotonic()
    modules = build_modules(a.smoke)
    # The floor runs alone on the machine (no server), before and after the server phases:
    # these shared machines drift by tens of percent within a minute, and the ratios use the
    # faster of the two floors, so drift can only make the server look worse.
    result: dict[str, Any] = {"mode": mode, "machine": _machine(), "functions": FUNCTIONS}
    before = {key: floor(wasm, cfg["floor_s"]) for key, wasm in modules.items()}
    server = Server(a.workers)
    try:
        asyncio.run(_register(server.address, {**modules, **noise_modules()}))
        result["server"] = run_loadgen(server.address, server.proc.pid, cfg, server_phases(cfg))
    finally:
        server.stop()
    bare = BareServer(modules)
    try:
        result["bare"] = run_loadgen(bare.address, bare.proc.pid, cfg, bare_phases())
    finally:
        bare.stop()
    after = {key: floor(wasm, cfg["floor_s"]) for key, wasm in modules.items()}
    result["floor_runs"] = {"before": before, "after": after}
    result["floor"] = {
        key: before[key] if before[key]["per_s"] >= after[key]["per_s"] else after[key]
        for key in modules
    }
    result["workers"] = a.workers or os.cpu_count()
    result["ratios"] = ratios(result)
    result["noisy_echo_p99_ms"] = round(result["server"][NOISY_PHASE]["p99_us"] / 1000, 2)
    result["targets"] = {**TARGETS, "noisy_echo_p99_ms": NOISY_TARGET}
    result["loadavg_at_end"] = _loadavg()
    result["elapsed_s"] = round(time.monotonic() - t0, 1)
    out = a.out or RESULTS / time.strftime(f"invoke-{mode}-%Y%m%d-%H%M%S.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"\nwritten to {out} in {result['elapsed_s']} s")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
