"""What TLS costs a tiny invoke: p50 with one call in flight and calls/s with 64 in flight on
8 connections, plain against TLS, in one run on one machine (issue 11).

Two ``fnserver`` processes (one serving process each, so both see the same core count) over
the same tiny WAT echo; the phases alternate plain, TLS, plain, TLS and each figure is the
better of its two rounds, so drift on a shared machine hits both sides alike. The certificate
comes from a CA made for the run (trustme). Prints a table and writes JSON.

    python bench/bench_tls.py [--quick | --smoke] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "client"))

from fnclient import AsyncClient  # noqa: E402

from bench.bench_invoke import Server  # noqa: E402
from tests import wasm_fixtures  # noqa: E402


async def _p50(address: str, ca: str | None, calls: int) -> float:
    async with AsyncClient(address, ca_file=ca) as c:
        for _ in range(20):
            await c.invoke("echo", b"x")  # warm: module compiled, connection up
        lat = []
        for _ in range(calls):
            t0 = time.perf_counter_ns()
            await c.invoke("echo", b"x")
            lat.append(time.perf_counter_ns() - t0)
    return statistics.median(lat) / 1000


async def _throughput(address: str, ca: str | None, seconds: float) -> float:
    clients = [AsyncClient(address, ca_file=ca) for _ in range(8)]
    for c in clients:
        await c.connect()
    done = 0
    until = time.monotonic() + seconds

    async def worker(c: AsyncClient) -> None:
        nonlocal done
        while time.monotonic() < until:
            await c.invoke("echo", b"x")
            done += 1

    t0 = time.monotonic()
    await asyncio.gather(*(worker(clients[i % 8]) for i in range(64)))
    elapsed = time.monotonic() - t0
    for c in clients:
        await c.close()
    return done / elapsed


def main(argv: list[str] | None = None) -> int:
    """Run the comparison; print it and write the JSON."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="short phases (~30 s in all)")
    g.add_argument("--smoke", action="store_true", help="tiny phases: checks the bench runs")
    p.add_argument("--out", type=Path, default=None, help="JSON file (default bench/results/)")
    a = p.parse_args(argv)
    calls, seconds = (50, 0.5) if a.smoke else (1000, 4.0) if a.quick else (3000, 10.0)
    import trustme

    with tempfile.TemporaryDirectory(prefix="fnserver-tls-") as tmp:
        ca = trustme.CA()
        leaf = ca.issue_cert("127.0.0.1")
        ca_file, cert, key = (str(Path(tmp) / n) for n in ("ca.pem", "cert.pem", "key.pem"))
        ca.cert_pem.write_to_path(ca_file)
        for i, pem in enumerate(leaf.cert_chain_pems):
            pem.write_to_path(cert, append=i > 0)
        leaf.private_key_pem.write_to_path(key)
        servers = {
            "plain": Server(None, extra=["--processes", "1"]),
            "tls": Server(None, extra=["--processes", "1", "--tls-cert", cert, "--tls-key", key]),
        }
        targets = {
            "plain": (servers["plain"].address, None),
            "tls": (f"tls://{servers['tls'].address}", ca_file),
        }
        results: dict[str, dict[str, list[float]]] = {m: {"p50_us": [], "per_s": []} for m in servers}
        try:
            for address, ca_path in targets.values():
                asyncio.run(_register(address, ca_path))
            for _ in range(2):
                for mode, (address, ca_path) in targets.items():
                    results[mode]["p50_us"].append(asyncio.run(_p50(address, ca_path, calls)))
                    results[mode]["per_s"].append(asyncio.run(_throughput(address, ca_path, seconds)))
        finally:
            for s in servers.values():
                s.stop()
    best = {m: {"p50_us": min(r["p50_us"]), "per_s": max(r["per_s"])} for m, r in results.items()}
    out = {
        "runs": results,
        "best": best,
        "ratios": {
            "tls_p50_vs_plain": best["tls"]["p50_us"] / best["plain"]["p50_us"],
            "tls_throughput_vs_plain": best["tls"]["per_s"] / best["plain"]["per_s"],
        },
        "settings": {"calls": calls, "seconds": seconds, "in_flight": 64, "connections": 8},
    }
    print(f"{'':8}{'p50 @1 (us)':>14}{'calls/s @64/8conn':>20}")
    for mode in ("plain", "tls"):
        print(f"{mode:8}{best[mode]['p50_us']:>14.0f}{best[mode]['per_s']:>20.0f}")
    r = out["ratios"]
    print(f"TLS/plain: p50 x{r['tls_p50_vs_plain']:.2f}, throughput x{r['tls_throughput_vs_plain']:.2f}")
    path = a.out or ROOT / "bench" / "results" / f"tls-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    return 0


async def _register(address: str, ca: str | None) -> None:
    async with AsyncClient(address, ca_file=ca) as c:
        await c.register("echo", wasm_fixtures.echo(), filename="echo.wasm")


if __name__ == "__main__":
    sys.exit(main())
