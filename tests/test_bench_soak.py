"""The soak and the protocol fuzzer keep working: each runs end to end in its tiny mode and
reports (no timing and no target asserted: those are the benches' figures, not rules)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_soak_smoke(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    proc = subprocess.run(
        [sys.executable, "bench/bench_soak.py", "--smoke", "--out", str(out)],
        cwd=ROOT, capture_output=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
    result = json.loads(out.read_text())
    load = result["load"]
    # Every kind of client ran against the server and was counted.
    assert load["connections_opened"]["churn"] >= result["config"]["connections"]
    for kind in ("spinner", "never-reading"):
        assert load["connections_opened"].get(kind, 0) > 0
    assert any(k.startswith("slowloris") for k in load["connections_opened"])
    assert any(k.startswith("partial") for k in load["connections_opened"])
    assert sum(s["completed"] for s in load["ops"].values()) > 0
    assert not load["client_crashes"]
    assert result["echo"]["calls"] > 0
    rss = result["rss_mb"]
    assert rss["baseline"] > 0 and rss["peak"] > 0 and rss["after"] > 0
    assert set(result["targets"]) == {"echo_p99_ms", "rss_after_minus_baseline_mb"}
    assert result["server"]["alive"]
    assert b"target echo_p99_ms" in proc.stdout


def test_fuzz_smoke(tmp_path: Path) -> None:
    out = tmp_path / "fuzz.json"
    proc = subprocess.run(
        [sys.executable, "bench/fuzz_protocol.py", "--smoke", "--seed", "7", "--out", str(out)],
        cwd=ROOT, capture_output=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
    result = json.loads(out.read_text())
    assert result["pure"]["cases"] > 0 and result["live"]["cases"] > 0
    assert result["live"]["check_ping_ms"]["count"] > 0
    assert b"(a) pure decoder" in proc.stdout and b"(b) live server" in proc.stdout
