"""What the HTTP gateway costs a tiny invoke against the binary protocol (issue 13): p50 with
one call in flight, and calls/s with 64 in flight on 8 connections, in one run on one machine.

One ``fnserver`` process pair (one serving process) with ``--http-port``; the same tiny WAT
echo is invoked through ``POST /v1/functions/echo/invoke`` (aiohttp's client, keep-alive
connections) and through ``fnclient`` (msgpack over TCP). The phases alternate binary, HTTP,
binary, HTTP and each figure is the better of its two rounds, so drift on a shared machine
hits both sides alike. Both clients run in this process: their own cost is part of what is
measured, as it is for a caller. Prints a table and writes JSON.

    python bench/bench_http.py [--quick | --smoke] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "client"))

from fnclient import AsyncClient  # noqa: E402

from bench.bench_invoke import Server  # noqa: E402
from tests import wasm_fixtures  # noqa: E402

Call = Callable[[], Awaitable[None]]


async def _p50(call: Call, calls: int) -> float:
    for _ in range(20):
        await call()  # warm: module compiled, connection up
    lat = []
    for _ in range(calls):
        t0 = time.perf_counter_ns()
        await call()
        lat.append(time.perf_counter_ns() - t0)
    return statistics.median(lat) / 1000


async def _throughput(calls: list[Call], seconds: float) -> float:
    done = 0
    until = time.monotonic() + seconds

    async def worker(call: Call) -> None:
        nonlocal done
        while time.monotonic() < until:
            await call()
            done += 1

    t0 = time.monotonic()
    await asyncio.gather(*(worker(calls[i % len(calls)]) for i in range(64)))
    return done / (time.monotonic() - t0)


def _binary_call(client: AsyncClient) -> Call:
    async def call() -> None:
        res = await client.invoke("echo", b"x")
        assert res.output == b"x"

    return call


def _http_call(session: aiohttp.ClientSession, url: str) -> Call:
    async def call() -> None:
        async with session.post(url, data=b"x") as r:
            assert r.status == 200 and await r.read() == b"x"

    return call


async def _binary(address: str, calls: int, seconds: float) -> tuple[float, float]:
    async with AsyncClient(address) as one:
        p50 = await _p50(_binary_call(one), calls)
    clients = [AsyncClient(address) for _ in range(8)]
    try:
        for c in clients:
            await c.connect()
        per_s = await _throughput([_binary_call(c) for c in clients], seconds)
    finally:
        for c in clients:
            await c.close()
    return p50, per_s


async def _http(base: str, calls: int, seconds: float) -> tuple[float, float]:
    url = f"{base}/v1/functions/echo/invoke"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as one:
        p50 = await _p50(_http_call(one, url), calls)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=8)) as pool:
        per_s = await _throughput([_http_call(pool, url)], seconds)
    return p50, per_s


async def _register(address: str) -> None:
    async with AsyncClient(address) as c:
        await c.register("echo", wasm_fixtures.echo(), filename="echo.wasm")


def main(argv: list[str] | None = None) -> int:
    """Run the comparison; print it and write the JSON."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="short phases (~30 s in all)")
    g.add_argument("--smoke", action="store_true", help="tiny phases: checks the bench runs")
    p.add_argument("--out", type=Path, default=None, help="JSON file (default bench/results/)")
    a = p.parse_args(argv)
    calls, seconds = (50, 0.5) if a.smoke else (1000, 4.0) if a.quick else (3000, 10.0)
    server = Server(None, extra=["--processes", "1", "--http-port", "0"])
    results: dict[str, dict[str, list[float]]] = {m: {"p50_us": [], "per_s": []} for m in ("binary", "http")}
    try:
        m = re.search(r"HTTP gateway on (\S+)", server.log.read_text(errors="replace"))
        assert m, "the server did not say where its HTTP gateway listens"
        base = m.group(1)
        asyncio.run(_register(server.address))
        for _ in range(2):
            for mode, run in (("binary", lambda: _binary(server.address, calls, seconds)),
                              ("http", lambda: _http(base, calls, seconds))):
                p50, per_s = asyncio.run(run())
                results[mode]["p50_us"].append(p50)
                results[mode]["per_s"].append(per_s)
    finally:
        server.stop()
    best = {m: {"p50_us": min(r["p50_us"]), "per_s": max(r["per_s"])} for m, r in results.items()}
    out = {
        "runs": results,
        "best": best,
        "ratios": {
            "http_p50_vs_binary": best["http"]["p50_us"] / best["binary"]["p50_us"],
            "http_throughput_vs_binary": best["http"]["per_s"] / best["binary"]["per_s"],
        },
        "settings": {"calls": calls, "seconds": seconds, "in_flight": 64, "connections": 8},
    }
    print(f"{'':8}{'p50 @1 (us)':>14}{'calls/s @64/8conn':>20}")
    for mode in ("binary", "http"):
        print(f"{mode:8}{best[mode]['p50_us']:>14.0f}{best[mode]['per_s']:>20.0f}")
    r = out["ratios"]
    print(f"HTTP/binary: p50 x{r['http_p50_vs_binary']:.2f}, throughput x{r['http_throughput_vs_binary']:.2f}")
    path = a.out or ROOT / "bench" / "results" / f"http-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
