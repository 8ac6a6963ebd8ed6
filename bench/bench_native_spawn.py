"""Native spawn cost: fnserver's native mode against a bare ``posix_spawn`` of the same binary.

Issue 3: "Spawning must stay cheap: measure it against a bare posix_spawn of the same binary and
put the ratio in the issue note." One run measures, on the same machine and the same binary
(a tiny static echo built here with ``gcc -static``), 100-byte stdin, stdout read back:

  (a) bare      ``os.posix_spawn`` + pipes, write stdin, read stdout to EOF, ``waitpid``
  (b) pool      ``fnserver.exec.ExecPool`` (1 worker), ``InvokeJob(mode="native")``: the caller's
                round trip, and the pool's own ``wall_us`` / ``duration_us``
  (c) server    optional: a real ``FnServer`` on port 0 and ``fnclient.AsyncClient`` over TCP
                (in the same process and event loop as the client: a lower bound on a real
                deployment's latency, not a throughput figure)

Usage: ``python bench/bench_native_spawn.py [--quick] [--calls N] [--no-server]``.
Prints a table with the ratios to (a) and writes bench/results/native_spawn.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import uvloop  # noqa: E402
from fnclient import AsyncClient  # noqa: E402

from fnserver.config import ServerConfig  # noqa: E402
from fnserver.exec import ExecPool, InvokeJob, Limits  # noqa: E402
from fnserver.server import FnServer  # noqa: E402

ECHO_C = r"""
#include <unistd.h>
int main(void) {
    char buf[4096];
    ssize_t n;
    while ((n = read(0, buf, sizeof buf)) > 0) {
        ssize_t off = 0;
        while (off < n) {
            ssize_t w = write(1, buf + off, (size_t)(n - off));
            if (w <= 0) return 1;
            off += w;
        }
    }
    return 0;
}
"""

INPUT = bytes(range(100))  # 100 bytes of stdin
RESULTS = ROOT / "bench" / "results" / "native_spawn.json"


def build_echo(workdir: Path) -> Path:
    gcc = shutil.which("gcc")
    if gcc is None:
        sys.exit("bench_native_spawn: gcc is required (gcc -static builds the test binary)")
    src = workdir / "echo.c"
    src.write_text(ECHO_C)
    out = workdir / "echo"
    subprocess.run([gcc, "-static", "-O2", "-s", "-o", str(out), str(src)], check=True)
    return out


def stats(samples_us: list[float]) -> dict[str, float]:
    s = sorted(samples_us)
    n = len(s)
    return {
        "n": n,
        "median_us": round(statistics.median(s), 1),
        "p99_us": round(s[min(n - 1, int(n * 0.99))], 1),
        "mean_us": round(statistics.fmean(s), 1),
        "min_us": round(s[0], 1),
    }


# -- (a) bare posix_spawn ------------------------------------------------------------------


def bare_call(binary: str) -> bytes:
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    try:
        pid = os.posix_spawn(
            binary,
            [binary],
            {},
            file_actions=[
                (os.POSIX_SPAWN_DUP2, in_r, 0),
                (os.POSIX_SPAWN_DUP2, out_w, 1),
                (os.POSIX_SPAWN_CLOSE, in_w),
                (os.POSIX_SPAWN_CLOSE, out_r),
            ],
        )
    finally:
        os.close(in_r)
        os.close(out_w)
    try:
        os.write(in_w, INPUT)
    finally:
        os.close(in_w)
    chunks = []
    while chunk := os.read(out_r, 65536):
        chunks.append(chunk)
    os.close(out_r)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"echo exited with status {status}")
    return b"".join(chunks)


def bench_bare(binary: Path, calls: int, warmup: int) -> dict[str, Any]:
    path = str(binary)
    for _ in range(warmup):
        assert bare_call(path) == INPUT
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter_ns()
        out = bare_call(path)
        samples.append((time.perf_counter_ns() - t0) / 1000)
        assert out == INPUT
    return {"per_call": stats(samples)}


# -- (b) the exec pool ---------------------------------------------------------------------


async def bench_pool(binary: Path, workdir: Path, calls: int, warmup: int) -> dict[str, Any]:
    vdir = workdir / "fn" / "1"
    vdir.mkdir(parents=True)
    shutil.copyfile(binary, vdir / "main.bin")
    os.chmod(vdir / "main.bin", 0o755)
    os.chmod(workdir, 0o755)  # the worker runs natives as an unprivileged uid when root
    job = InvokeJob(function="echo", version=1, mode="native", artifact=vdir / "main.bin", digest="", input=INPUT,
                    args=(), limits=Limits())
    pool = ExecPool(workers=1, cache_dir=workdir / "modules")
    await pool.start()
    try:
        for _ in range(warmup):
            res = await pool.invoke(job)
            assert (res.output, res.exit_code) == (INPUT, 0), res
        caller, wall, duration, queue = [], [], [], []
        for _ in range(calls):
            t0 = time.perf_counter_ns()
            res = await pool.invoke(job)
            caller.append((time.perf_counter_ns() - t0) / 1000)
            assert res.output == INPUT and res.exit_code == 0
            wall.append(res.wall_us)
            duration.append(res.duration_us)
            queue.append(res.queue_us)
    finally:
        await pool.close()
    return {
        "per_call": stats(caller),
        "wall_us": stats(wall),
        "duration_us": stats(duration),
        "queue_us": stats(queue),
    }


# -- (c) a real server over TCP ------------------------------------------------------------


async def bench_server(binary: Path, workdir: Path, calls: int, warmup: int) -> dict[str, Any]:
    config = ServerConfig(port=0, data_dir=workdir / "data", workers=1, warm_builds=False,
                          shutdown_grace_s=1.0)
    server = FnServer(config)
    await server.start()
    try:
        async with AsyncClient(server.address) as client:
            meta = await client.register("echo", binary, filename="echo")
            assert meta["mode"] == "native", meta
            for _ in range(warmup):
                res = await client.invoke("echo", INPUT)
                assert res.output == INPUT
            caller, wall, duration = [], [], []
            for _ in range(calls):
                t0 = time.perf_counter_ns()
                res = await client.invoke("echo", INPUT)
                caller.append((time.perf_counter_ns() - t0) / 1000)
                assert res.output == INPUT and res.exit_code == 0 and res.mode == "native"
                wall.append(res.wall_us)
                duration.append(res.duration_us)
    finally:
        await server.stop()
    return {"per_call": stats(caller), "wall_us": stats(wall), "duration_us": stats(duration)}


# -- main ----------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls (< 30 s in all)")
    parser.add_argument("--calls", type=int, help="measured calls per variant")
    parser.add_argument("--no-server", action="store_true", help="skip (c), the real server")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON output ({RESULTS})")
    ns = parser.parse_args()
    calls = ns.calls or (300 if ns.quick else 2000)
    warmup = max(10, calls // 10)

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-native-") as tmp:
        workdir = Path(tmp)
        binary = build_echo(workdir)
        results: dict[str, Any] = {"bare": bench_bare(binary, calls, warmup)}
        results["pool"] = uvloop.run(bench_pool(binary, workdir, calls, warmup))
        if not ns.no_server:
            results["server"] = uvloop.run(bench_server(binary, workdir, calls, warmup))
        # The bare figure again at the end: the machine's noise shows as the drift between them.
        results["bare_again"] = bench_bare(binary, calls, warmup)
        binary_size = binary.stat().st_size

    bare = min(results["bare"]["per_call"]["median_us"],
               results["bare_again"]["per_call"]["median_us"])
    rows = [
        ("(a) bare posix_spawn + pipes", results["bare"]["per_call"]),
        ("(a) bare, measured again at the end", results["bare_again"]["per_call"]),
        ("(b) exec pool, caller round trip", results["pool"]["per_call"]),
        ("(b) exec pool, wall_us", results["pool"]["wall_us"]),
        ("(b) exec pool, duration_us (worker: spawn..exit)", results["pool"]["duration_us"]),
    ]
    if "server" in results:
        rows += [
            ("(c) server + client over TCP, round trip", results["server"]["per_call"]),
            ("(c) server, wall_us", results["server"]["wall_us"]),
            ("(c) server, duration_us", results["server"]["duration_us"]),
        ]
    ratios = {label: round(s["median_us"] / bare, 2) for label, s in rows}

    print(f"native spawn, static echo ({binary_size} bytes), 100-byte stdin, {calls} calls each,"
          f" {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    width = max(len(label) for label, _ in rows)
    print(f"{'':{width}}  {'median':>9}  {'p99':>9}  {'ratio to (a)':>12}")
    for label, s in rows:
        print(f"{label:{width}}  {s['median_us']:>7.1f}us  {s['p99_us']:>7.1f}us"
              f"  {ratios[label]:>11.2f}x")
    headline = round(results["pool"]["per_call"]["median_us"] / bare, 2)
    print(f"\nratio (b)/(a), exec pool round trip over bare posix_spawn (medians): {headline}x")

    doc = {
        "benchmark": "native_spawn",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"arch": platform.machine(), "cpus": os.cpu_count(),
                    "python": platform.python_version(), "kernel": platform.release()},
        "binary_bytes": binary_size,
        "input_bytes": len(INPUT),
        "calls": calls,
        "warmup": warmup,
        "bare_median_us": bare,
        "ratio_pool_to_bare": headline,
        "ratios_to_bare": ratios,
        "results": results,
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {ns.out} ({doc['elapsed_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
