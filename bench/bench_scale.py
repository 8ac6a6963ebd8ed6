"""Nodes over one PostgreSQL (issue 14, item 7): throughput per node added, register-to-invoke
propagation, and async calls lost when a node is killed.

A temporary PostgreSQL cluster (tests/_postgres.py) and 1, 2, then 3 ``fnserver`` nodes, each
with one serving process and a data directory of its own, all with ``--registry`` on the same
database. The function waits 20 ms in a host call (``poll_oneoff``) and then writes a line, so
a call costs the 2 cores here little CPU: each node is capped at ``--slots 4`` calls at once,
which makes one node's capacity about 4 / 20 ms = 200 calls/s, and the bench measures whether
a second and a third node add as much again (target: at least 0.9x linear).

1. **Throughput**: 16 calls in flight per node through clients that know every node
   (``AsyncClient([...])``, spread across them), for a fixed time, with 1, 2 and 3 nodes.
2. **Propagation**: a new version registered on one node, then invoked on another until it
   answers with that version; the time from the register's reply to the first success.
3. **Lost calls**: async calls submitted through the multi-node clients, one node killed with
   SIGKILL (its whole process group) half way; every acknowledged call must finish on the
   others (a call the dead node was running runs again once its lease runs out: within
   5 s, the nodes being started with ``--async-lease 5``). Target: 0 lost.

Each node runs in a network namespace of its own (a veth pair to the host, 10.77.N.2;
``bench/_netns.py``) where the host allows it (root and iproute2), on the host's loopback
otherwise or with ``--loopback``; the output says which. Prints a table and writes JSON; stops
by itself and removes its namespaces.

    python bench/bench_scale.py [--quick] [--loopback] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "client"))

from fnclient import AsyncClient  # noqa: E402
from fnclient.protocol import FnError  # noqa: E402

from bench._netns import Namespace, available, namespaces  # noqa: E402
from bench.bench_invoke import Server  # noqa: E402
from tests import wasm_fixtures  # noqa: E402
from tests._postgres import start_cluster  # noqa: E402

SLOTS = 4
IN_FLIGHT_PER_NODE = 16
#: Seconds of a claimed async call's lease: short, so the killed node's calls run again soon.
ASYNC_LEASE_S = 5


def start_node(dsn: str, ns: Namespace | None) -> Server:
    """One node: an ``fnserver`` supervisor in a process group of its own (``Server.kill``
    takes all of it), on the shared database; in network namespace ``ns`` when given, where it
    listens on the namespace's own address (private to this bench: ``--insecure``)."""
    extra = [
        "--processes", "1", "--slots", str(SLOTS), "--slots-per-function", str(SLOTS),
        "--max-queue", "4096", "--max-timeout-ms", "1000", "--async-lease", str(ASYNC_LEASE_S),
        "--registry", dsn,
    ]
    if ns is None:
        return Server(None, new_session=True, extra=extra)
    return Server(None, new_session=True, extra=[*extra, "--insecure"], prefix=ns.prefix(), host=ns.address)


async def _throughput(addresses: list[str], seconds: float) -> float:
    clients = [AsyncClient(addresses) for _ in range(4 * len(addresses))]
    done = 0
    until = time.monotonic() + seconds

    async def worker(c: AsyncClient) -> None:
        nonlocal done
        while time.monotonic() < until:
            res = await c.invoke("sleeper", b"")
            assert res.output == b"woke\n"
            done += 1

    try:
        for c in clients:
            await c.connect()
        t0 = time.monotonic()
        await asyncio.gather(*(worker(clients[i % len(clients)]) for i in range(IN_FLIGHT_PER_NODE * len(addresses))))
        return done / (time.monotonic() - t0)
    finally:
        for c in clients:
            await c.close()


async def _propagation(addresses: list[str], rounds: int) -> list[float]:
    """Seconds from a register's reply on one node to the first successful invoke of that
    version on another."""
    out: list[float] = []
    for i in range(rounds):
        a, b = addresses[i % len(addresses)], addresses[(i + 1) % len(addresses)]
        async with AsyncClient(a) as writer, AsyncClient(b) as reader:
            info = await writer.register("fresh", wasm_fixtures.exit_code(i % 100), filename="f.wasm")
            t0 = time.monotonic()
            while True:
                try:
                    res = await reader.invoke("fresh", version=info["version"])
                except FnError:
                    await asyncio.sleep(0.001)
                    continue
                assert res.exit_code == i % 100
                out.append(time.monotonic() - t0)
                break
    return out


async def _storm(nodes: list[Server], calls: int) -> dict[str, int]:
    """Submit ``calls`` async calls across the nodes, kill the first node half way, then wait
    for every acknowledged call's result on the survivors."""
    addresses = [n.address for n in nodes]
    ids: list[str] = []
    refused = 0
    clients = [AsyncClient(addresses) for _ in range(8)]
    try:
        for i in range(calls):
            if i == calls // 2:
                nodes[0].kill()
            try:
                ids.append(await clients[i % len(clients)].invoke_async("sleeper", b""))
            except FnError:
                refused += 1  # not acknowledged: nothing was promised
    finally:
        for c in clients:
            await c.close()
    lost: list[str] = []
    rerun = 0
    async with AsyncClient(addresses[1:]) as reader:
        for call_id in ids:
            deadline = time.monotonic() + 300  # generous: a lease runs out within ASYNC_LEASE_S
            status = await reader.result(call_id, wait=30)
            while status.state in ("queued", "running") and time.monotonic() < deadline:
                status = await reader.result(call_id, wait=30)
            if status.result is None or status.result.output != b"woke\n":
                lost.append(f"{call_id}: {status.state} {status.error}")
            elif status.attempts > 1:
                rerun += 1
    return {"submitted": calls, "acknowledged": len(ids), "refused": refused, "lost": len(lost),
            "ran_again": rerun, "lost_calls": lost}


def main(argv: list[str] | None = None) -> int:
    """Run the three measures; print them and write the JSON."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short phases (~30 s in all)")
    p.add_argument("--out", type=Path, default=None, help="JSON file (default bench/results/)")
    p.add_argument("--loopback", action="store_true", help="every node on this host's loopback, even where network namespaces could be made")
    a = p.parse_args(argv)
    seconds, rounds, calls = (4.0, 10, 200) if a.quick else (10.0, 30, 600)
    why_not = None if a.loopback else available()
    if why_not is not None and not a.loopback:
        print(f"network namespaces unavailable ({why_not}): every node on this host's loopback")
    with contextlib.ExitStack() as stack:
        spaces: list[Namespace | None] = (
            list(stack.enter_context(namespaces(3))) if why_not is None and not a.loopback else [None] * 3
        )
        return _run(a, seconds, rounds, calls, spaces)


def _run(a: argparse.Namespace, seconds: float, rounds: int, calls: int, spaces: list[Namespace | None]) -> int:
    cluster = start_cluster()
    nodes: list[Server] = []
    results: dict[str, object] = {}
    try:
        dsn = cluster.create_database()
        if spaces[0] is not None:
            # A namespace hides the host's loopback, not its files: nodes reach PostgreSQL
            # through its Unix socket (serving processes, which gave up root, too).
            os.chmod(cluster.root, 0o711)
            name = dsn.rsplit("/", 1)[1]
            dsn = f"postgresql://{cluster.user}@/{name}?host={cluster.root}&port={cluster.port}"
        for n in range(1, 4):
            nodes.append(start_node(dsn, spaces[n - 1]))
            addresses = [node.address for node in nodes]
            if n == 1:
                asyncio.run(_register(addresses[0]))
            results[f"calls_per_s_{n}_nodes"] = asyncio.run(_throughput(addresses, seconds))
        prop = asyncio.run(_propagation([node.address for node in nodes], rounds))
        results["propagation_ms"] = {
            "p50": statistics.median(prop) * 1000,
            "p99": sorted(prop)[min(len(prop) - 1, int(len(prop) * 0.99))] * 1000,
            "max": max(prop) * 1000,
        }
        results["storm"] = asyncio.run(_storm(nodes, calls))
    finally:
        for node in nodes:
            node.stop()
        cluster.stop()
    one = float(results["calls_per_s_1_nodes"])  # type: ignore[arg-type]
    ratios = {f"scaling_{n}_nodes_vs_linear": float(results[f"calls_per_s_{n}_nodes"]) / (n * one) for n in (2, 3)}  # type: ignore[arg-type]
    network = "a network namespace per node" if spaces[0] is not None else "loopback"
    out = {"results": results, "ratios": ratios,
           "settings": {"seconds": seconds, "slots": SLOTS, "in_flight_per_node": IN_FLIGHT_PER_NODE, "rounds": rounds,
                        "calls": calls, "network": network}}
    print(f"nodes on {network}: {', '.join(n.address for n in nodes)}")
    for n in (1, 2, 3):
        print(f"{n} node(s): {results[f'calls_per_s_{n}_nodes']:8.0f} calls/s")
    print(f"scaling vs linear: 2 nodes x{ratios['scaling_2_nodes_vs_linear']:.2f}, 3 nodes x{ratios['scaling_3_nodes_vs_linear']:.2f} (target >= 0.9)")
    print(f"register on one node -> first invoke on another: {results['propagation_ms']}")
    print(f"async storm with a node killed: {results['storm']}")
    path = a.out or ROOT / "bench" / "results" / f"scale-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    return 0


async def _register(address: str) -> None:
    async with AsyncClient(address) as c:
        await c.register("sleeper", wasm_fixtures.sleep_then_write(0.02), filename="sleeper.wasm")


if __name__ == "__main__":
    sys.exit(main())
