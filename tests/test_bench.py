"""The benchmarks keep working: each runs end to end in its smallest mode (no timing asserted)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_bench(script: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    """``python bench/SCRIPT ARGS`` from the repository root; fails the test if it fails."""
    proc = subprocess.run(
        [sys.executable, f"bench/{script}", *args], cwd=ROOT, capture_output=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
    return proc


def test_invoke_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "invoke.json"
    proc = run_bench("bench_invoke.py", "--smoke", "--out", str(out))
    result = json.loads(out.read_text())
    functions = ("wat", "c", "go")
    shapes = ("@1", "@64", "@64/8conn")
    assert set(result["server"]) == ({"ping@1", "noisy_echo@1"}
                                     | {f + s for f in functions for s in shapes})
    for phase in result["server"].values():
        assert phase["calls"] > 0 and phase["per_s"] > 0
        assert phase["p99_us"] >= phase["p50_us"] > 0
    assert result["server"]["c@64/8conn"]["connections"] == 8
    assert result["server"]["c@64"]["in_flight"] == 64
    for runs in result["floor_runs"].values():
        assert set(runs) == set(functions)
        assert all(r["per_s"] > 0 and r["p50_us"] > 0 for r in runs.values())
    targets = ("throughput_64_vs_floor", "throughput_64_8conn_vs_floor",
               "p50_1_vs_2floor_plus_rtt")
    bare_targets = ("bare_throughput_64_vs_floor", "bare_p50_1_vs_2floor_plus_rtt")
    assert set(result["ratios"]) == {f"{f}_{t}" for f in functions for t in targets + bare_targets}
    assert all(v > 0 for v in result["ratios"].values())
    # The design's ceiling (bench/_bare.py) answered every phase, with the right output (the
    # load generator checks each one).
    assert set(result["bare"]) == {"ping@1"} | {f + s for f in functions for s in ("@1", "@64")}
    assert all(p["calls"] > 0 and p["p50_us"] > 0 for p in result["bare"].values())
    assert b"the ceiling, bare" in proc.stdout
    assert b"ratios" in proc.stdout
    # The noisy neighbours: 10 spinning + 4 sleeping calls kept in flight, each ended by its
    # timeout and re-issued, while another connection's echo was answered (no timing asserted).
    noisy = result["server"]["noisy_echo@1"]
    assert noisy["calls"] > 0 and noisy["max_us"] >= noisy["p99_us"] >= noisy["p50_us"] > 0
    assert noisy["noise"]["functions"] == 14 and noisy["noise"]["in_flight_mean"] > 0
    assert noisy["noise"]["calls_ended"].get("timeout", 0) > 0
    assert result["noisy_echo_p99_ms"] == pytest.approx(noisy["p99_us"] / 1000, abs=0.01)
    assert result["targets"]["noisy_echo_p99_ms"] == "<= 50"
    assert b"noisy_echo_p99_ms" in proc.stdout


@pytest.mark.skipif(shutil.which("gcc") is None, reason="the bench builds its binary with gcc")
def test_native_spawn_bench_small(tmp_path: Path) -> None:
    out = tmp_path / "native.json"
    proc = run_bench("bench_native_spawn.py", "--calls", "20", "--out", str(out))
    assert out.is_file() and b"ratio (b)/(a)" in proc.stdout


def test_tls_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "tls.json"
    proc = run_bench("bench_tls.py", "--smoke", "--out", str(out))
    assert b"TLS/plain" in proc.stdout
    result = json.loads(out.read_text())
    for mode in ("plain", "tls"):
        assert result["best"][mode]["p50_us"] > 0 and result["best"][mode]["per_s"] > 0
    assert set(result["ratios"]) == {"tls_p50_vs_plain", "tls_throughput_vs_plain"}


def test_http_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "http.json"
    proc = run_bench("bench_http.py", "--smoke", "--out", str(out))
    assert b"HTTP/binary" in proc.stdout
    result = json.loads(out.read_text())
    for mode in ("binary", "http"):
        assert result["best"][mode]["p50_us"] > 0 and result["best"][mode]["per_s"] > 0
    assert set(result["ratios"]) == {"http_p50_vs_binary", "http_throughput_vs_binary"}


def test_scale_bench_quick(tmp_path: Path) -> None:
    """1, 2 and 3 nodes over a real PostgreSQL (network namespaces where the host allows them),
    one killed during an async storm: nothing acknowledged may be lost (no timing asserted)."""
    out = tmp_path / "scale.json"
    proc = run_bench("bench_scale.py", "--quick", "--out", str(out))
    result = json.loads(out.read_text())
    for n in (1, 2, 3):
        assert result["results"][f"calls_per_s_{n}_nodes"] > 0
    assert set(result["ratios"]) == {"scaling_2_nodes_vs_linear", "scaling_3_nodes_vs_linear"}
    prop = result["results"]["propagation_ms"]
    assert prop["max"] >= prop["p99"] >= prop["p50"] > 0
    storm = result["results"]["storm"]
    assert storm["acknowledged"] + storm["refused"] == storm["submitted"] == 200
    assert storm["acknowledged"] > 0 and storm["lost"] == 0, storm["lost_calls"]
    assert result["settings"]["network"] in ("a network namespace per node", "loopback")
    assert b"scaling vs linear" in proc.stdout
    if shutil.which("ip") is not None:  # the bench removed the namespaces it made
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, check=False, timeout=30).stdout
        assert b"fnbench-" not in listed
