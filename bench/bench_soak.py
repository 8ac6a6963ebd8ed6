"""Soak: a real fnserver under many well-behaved and hostile clients at once (issue 10, item 7).

    python bench/bench_soak.py [--quick | --smoke] [--seconds N] [--out FILE]

Starts ``python -m fnserver --port 0 --no-warm`` (its defaults otherwise), registers an echo,
a function writing 4 MiB to stdout and ten spinning functions, then for a bounded time runs
at the same time:

- churn: 1,000 connections held open, each cycling through register (a small distinct wasm
  module under a unique name), invoke, get, list and delete, with a think time between ops;
- slowloris clients trickling a frame one byte at a time (before and after HELLO);
- never-reading clients invoking the 4 MiB function over and over and reading nothing;
- partial-frame clients sending a big length prefix and part of a body, then waiting;
- the ten spinning functions kept in flight (each call ends at its timeout and is re-issued);
- one well-behaved client (its own process) calling the echo one call at a time.

It reports throughput by op, errors by wire code and connection-level failures, the echo's
p50/p99, and the server's RSS (supervisor + serving processes + workers) at baseline, at its
peak and some seconds after the hostile clients have left. JSON goes to
bench/results/soak.json. Loopback only; ends by itself and kills its server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import hashlib
import json
import os
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
ECHO_INPUT = b"x" * 100

MODES: dict[str, dict[str, Any]] = {
    # seconds of soak, seconds to wait after the clients left, churn connections, hostile
    # client counts, seconds between two trickled bytes, mean think time between churn ops,
    # registers per second (paced: see Pace)
    "smoke": {"seconds": 4.0, "settle_s": 3.0, "connections": 40, "slowloris": 4,
              "never_reading": 1, "partial": 3, "trickle_s": 0.2, "think_s": 0.5,
              "register_rate": 2.0},
    "quick": {"seconds": 30.0, "settle_s": 15.0, "connections": 1000, "slowloris": 50,
              "never_reading": 3, "partial": 20, "trickle_s": 1.0, "think_s": 1.0,
              "register_rate": 2.0},
    "full": {"seconds": 90.0, "settle_s": 20.0, "connections": 1000, "slowloris": 50,
             "never_reading": 3, "partial": 20, "trickle_s": 1.0, "think_s": 1.0,
             "register_rate": 2.0},
}
SPINNERS = 10
SPIN_TIMEOUT_MS = 2000
#: Seconds over which the churn connections are opened: 1,000 SYNs at once would overflow the
#: listen backlog and turn into 1 s SYN retransmits, which measures the kernel, not fnserver.
RAMP_S = 3.0
#: The well-behaved echo's targets (issue 10, "Done when").
ECHO_P99_TARGET_MS = 100.0
RSS_TARGET_MB = 50.0
#: Client source addresses: the server caps connections per peer address (256 per serving
#: process by default), so 1,000 churn connections from 127.0.0.1 would mostly be refused.
#: Spread over this many loopback addresses they stay well under it (~20 per address).
SOURCE_ADDRESSES = 50
#: A client gives up on an answer after this long (s): nothing in the bench can hang.
GUARD_S = 30.0


# -- wasm fixtures ------------------------------------------------------------------------------


def big_output_wasm() -> bytes:
    """Write 4 MiB of 'x' to stdout: 64 writes of one 64 KiB block."""
    from tests import wasm_fixtures

    return wasm_fixtures.wat("""(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (func (export "_start")
    (local $i i32)
    (memory.fill (i32.const 1024) (i32.const 120) (i32.const 65536))
    (loop $l
      (i32.store (i32.const 0) (i32.const 1024))
      (i32.store (i32.const 4) (i32.const 65536))
      (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 16)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $l (i32.lt_u (local.get $i) (i32.const 64))))))""")


def fixtures() -> dict[str, bytes]:
    """The functions registered before the soak: name -> wasm."""
    from bench_invoke import _with_custom_section

    from tests import wasm_fixtures

    out = {"soak-echo": wasm_fixtures.echo(), "soak-big": big_output_wasm()}
    spin = wasm_fixtures.infinite_loop()
    # Distinct modules (a custom section naming each): no two share an artifact or a compiled
    # module, as ten different functions would not.
    for i in range(SPINNERS):
        out[f"soak-spin{i}"] = _with_custom_section(spin, f"spin{i}".encode())
    return out


# -- the server and its memory ------------------------------------------------------------------


class Server:
    """``python -m fnserver --port 0 --data-dir <tmp> --no-warm`` in its own session, so that
    its whole process group can be killed; its temp dir is removed on stop."""

    def __init__(self, extra: list[str] | None = None) -> None:
        self.tmp = tempfile.mkdtemp(prefix="fnserver-soak-")
        self.log = Path(self.tmp) / "server.log"
        argv = [sys.executable, "-m", "fnserver", "--port", "0",
                "--data-dir", str(Path(self.tmp) / "data"), "--no-warm", *(extra or [])]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log, cwd=ROOT,
                                         start_new_session=True)
        self.pid = self.proc.pid
        #: Every descendant seen (pid -> start time): workers leave the group (setsid), so the
        #: stop kills them by pid too, checking the start time so a reused pid is left alone.
        self.seen: dict[int, str] = {}
        self.address = self._wait_address()
        self.host, port = self.address.rsplit(":", 1)
        self.port = int(port)

    def _wait_address(self) -> str:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            m = re.search(r"listening on (\S+)", self.log.read_text(errors="replace"))
            if m:
                return m.group(1)
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        text = self.log.read_text(errors="replace")
        self.stop()
        raise RuntimeError(f"fnserver did not start:\n{text}")

    def family(self) -> list[int]:
        """The supervisor and all its descendants (serving processes, workers, compilers)."""
        out, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            try:
                for tid in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{tid}/children") as f:
                        todo.extend(int(p) for p in f.read().split())
            except OSError:
                continue
        for pid in out:
            start = _start_time(pid)
            if start is not None:
                self.seen.setdefault(pid, start)
        return out

    def serving_pids(self) -> list[int]:
        """The supervisor's direct children: the serving processes."""
        pids: list[int] = []
        try:
            for tid in os.listdir(f"/proc/{self.pid}/task"):
                with open(f"/proc/{self.pid}/task/{tid}/children") as f:
                    pids.extend(int(p) for p in f.read().split())
        except OSError:
            pass
        return sorted(pids)

    def rss(self) -> tuple[int, dict[int, int]]:
        """Total resident bytes of the family, and per process.

        A child caught between fork and exec (a compiler or worker being started) still
        shows its parent's command line and its parent's pages, shared copy-on-write: counted,
        it would add a whole serving process to the sum. Such children, and zombies, are left
        out."""
        page = os.sysconf("SC_PAGE_SIZE")
        per: dict[int, int] = {}
        for pid in self.family():
            if pid != self.pid and _not_yet_itself(pid):
                continue
            try:
                with open(f"/proc/{pid}/statm") as f:
                    per[pid] = int(f.read().split()[1]) * page
            except (OSError, IndexError, ValueError):
                continue
        return sum(per.values()), per

    def roles(self, pids: list[int] | dict[int, int]) -> dict[str, str]:
        """pid -> what it is (from its command line), for the per-process figures."""
        out: dict[str, str] = {}
        for pid in pids:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                out[str(pid)] = "gone"
                continue
            text = b" ".join(argv).decode(errors="replace")
            if pid == self.pid:
                role = "supervisor"
            elif "fnserver.exec._worker" in text:
                role = "worker"
            elif "fnserver.exec._compile" in text:
                role = "compiler"
            elif "--serve-fd" in text:
                role = "serving"
            else:
                role = text[:60]
            out[str(pid)] = role
        return out

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        self.family()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(25)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(OSError):
            os.killpg(self.pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid, start in self.seen.items():
            if pid != self.pid and _start_time(pid) == start:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.tmp, ignore_errors=True)


def _not_yet_itself(pid: int) -> bool:
    """A zombie, or a forked child that has not exec'd yet (its parent's command line)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            mine = f.read()
        with open(f"/proc/{ppid}/cmdline", "rb") as f:
            parents = f.read()
    except (OSError, IndexError, ValueError):
        return True
    return not mine or mine == parents


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


class RssSampler(threading.Thread):
    """The server family's RSS every ``interval`` s, with the phase it was taken in."""

    def __init__(self, server: Server, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.interval = interval
        self.phase = "start"
        self.samples: list[tuple[float, str, int]] = []
        self.peak_detail: dict[int, int] = {}
        self.peak_roles: dict[str, str] = {}
        self.baseline_detail: dict[int, int] = {}
        self._stop_event = threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        peak = 0
        while not self._stop_event.wait(self.interval):
            total, per = self.server.rss()
            self.samples.append((round(time.monotonic() - self.t0, 2), self.phase, total))
            if total > peak:
                peak, self.peak_detail = total, per
                self.peak_roles = self.server.roles(per)
            if self.phase == "baseline":
                self.baseline_detail = per

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5)

    def of(self, phase: str) -> list[int]:
        return [rss for _, p, rss in self.samples if p == phase]


# -- raw protocol connections (the load generator's side) ---------------------------------------


class Dropped(Exception):
    """The server ended the connection; ``why`` says how (its error frame's code and reason,
    ``eof`` or ``reset``)."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


def conn_failure(exc: BaseException) -> str:
    """A connection-level failure as a short label."""
    if isinstance(exc, Dropped):
        return f"dropped:{exc.why}"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, ConnectionResetError | BrokenPipeError):
        return "reset"
    if isinstance(exc, TimeoutError):
        return "no_answer"
    if isinstance(exc, OSError):
        return f"oserror:{errno.errorcode.get(exc.errno or 0, exc.errno)}"
    return f"{type(exc).__name__}"


def _error_label(frame: dict[str, Any]) -> str:
    err = frame.get("error") if isinstance(frame.get("error"), dict) else {}
    code = str(err.get("code"))
    details = err.get("details") if isinstance(err.get("details"), dict) else {}
    reason = details.get("reason")
    return f"{code}:{reason}" if reason else code


class Wire:
    """One raw connection speaking the protocol with ``fnclient.protocol``'s codec: one request
    at a time, final frames matched by id, events skipped."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        from fnclient.protocol import DEFAULT_MAX_FRAME, FrameDecoder

        self.reader = reader
        self.writer = writer
        self.decoder = FrameDecoder(DEFAULT_MAX_FRAME)
        self.next_id = 1

    @classmethod
    async def open(cls, host: str, port: int, source: str | None) -> Wire:
        reader, writer = await asyncio.open_connection(
            host, port, local_addr=(source, 0) if source else None, limit=1 << 20)
        return cls(reader, writer)

    async def frame(self) -> dict[str, Any]:
        while True:
            frame = self.decoder.next_frame()
            if frame is not None:
                if frame.get("type") == "error" and frame.get("id") is None:
                    raise Dropped(_error_label(frame))
                return frame
            data = await self.reader.read(1 << 20)
            if not data:
                raise Dropped("eof")
            self.decoder.feed(data)

    async def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one request (and, for a register, its upload under the same id); return its
        final frame."""
        from fnclient.protocol import encode_request

        req_id = self.next_id
        self.next_id += 1
        data = fields.pop("_upload", None)
        self.writer.write(encode_request(op, req_id, **fields))
        if data is not None:
            self.writer.write(encode_request("upload", req_id, data=data))
        await self.writer.drain()
        while True:
            frame = await self.frame()
            if frame.get("id") == req_id and frame.get("type") in ("response", "error"):
                return frame

    async def hello(self) -> None:
        from fnclient.protocol import PROTOCOL_VERSION

        reply = await self.request("hello", protocol=PROTOCOL_VERSION, token=None,
                                   client="bench-soak")
        if reply.get("type") != "response":
            raise Dropped(_error_label(reply))

    def abort(self) -> None:
        transport = self.writer.transport
        if transport is not None:
            transport.abort()


def outcome(frame: dict[str, Any]) -> str:
    """``ok`` or the error frame's wire code."""
    if frame.get("type") == "response":
        return "ok"
    err = frame.get("error") if isinstance(frame.get("error"), dict) else {}
    return str(err.get("code"))


# -- the load generator (a separate process) ----------------------------------------------------


class Tally:
    """What every client saw: op outcomes, connection failures, hostile clients' fates."""

    def __init__(self) -> None:
        self.ops: dict[str, Counter[str]] = {}
        self.latency_ms: dict[str, list[float]] = {}
        self.conn: Counter[str] = Counter()
        self.opened: Counter[str] = Counter()
        self.hostile: dict[str, Counter[str]] = {}
        self.drop_after_s: dict[str, list[float]] = {}
        self.counting = False  # only the soak window counts towards throughput

    def op(self, op: str, result: str, ms: float) -> None:
        if self.counting:
            self.ops.setdefault(op, Counter())[result] += 1
            self.latency_ms.setdefault(op, []).append(ms)

    def fate(self, kind: str, what: str, after_s: float | None = None) -> None:
        self.hostile.setdefault(kind, Counter())[what] += 1
        if after_s is not None and what.startswith("dropped"):
            self.drop_after_s.setdefault(kind, []).append(after_s)


class Pace:
    """At most ``rate`` events per second across all connections: each register of a new
    module starts a compiler process in the server (~0.3 s of CPU), so an unpaced register mix
    would measure nothing but the compiler."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate if rate > 0 else float("inf")
        self.next = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        if now < self.next:
            return False
        self.next = max(self.next + self.interval, now - self.interval)
        return True


def _source(i: int) -> str:
    return f"127.0.0.{2 + i % SOURCE_ADDRESSES}"


async def _loadgen(spec: dict[str, Any]) -> dict[str, Any]:
    from fnclient.protocol import encode_request

    from tests import wasm_fixtures

    host, port = spec["host"], spec["port"]
    stop = asyncio.Event()
    tally = Tally()
    rng = random.Random(spec["seed"])
    base_module = wasm_fixtures.echo()
    from bench_invoke import _with_custom_section

    registers = Pace(spec["register_rate"])

    async def pause(seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)

    # --- churn: connections cycling through every operation ---

    async def churn(i: int) -> None:
        my_rng = random.Random(rng.random())
        await pause(RAMP_S * i / spec["connections"])
        mine: list[str] = []
        serial = 0
        while not stop.is_set():
            tally.opened["churn"] += 1
            wire: Wire | None = None
            try:
                async with asyncio.timeout(GUARD_S):
                    wire = await Wire.open(host, port, _source(i))
                    await wire.hello()
                while not stop.is_set():
                    r = my_rng.random()
                    fields: dict[str, Any]
                    if not mine and registers.take():
                        serial += 1
                        name = f"soak-c{i}-{serial}"
                        module = _with_custom_section(base_module, name.encode())
                        op, label = "register", "register"
                        fields = {"name": name, "filename": "f.wasm", "size": len(module),
                                  "sha256": hashlib.sha256(module).hexdigest(),
                                  "_upload": module}
                        mine.append(name)
                    elif mine and r < 0.05:
                        op, label, fields = "delete", "delete", {"name": mine.pop(), "version": None}
                    elif mine and r < 0.20:
                        op, label = "invoke", "invoke(own)"
                        fields = {"name": mine[-1], "input": ECHO_INPUT}
                    elif r < 0.60:
                        op, label, fields = "invoke", "invoke(echo)", {"name": "soak-echo", "input": ECHO_INPUT}
                    elif r < 0.80:
                        op, label = "get", "get"
                        fields = {"name": mine[-1] if mine else "soak-echo"}
                    elif r < 0.90:
                        op, label, fields = "list", "list", {}
                    else:
                        op, label, fields = "ping", "ping", {}
                    t0 = time.perf_counter()
                    async with asyncio.timeout(GUARD_S):
                        frame = await wire.request(op, **fields)
                    tally.op(label, outcome(frame), (time.perf_counter() - t0) * 1e3)
                    if op == "register" and outcome(frame) != "ok":
                        mine.remove(fields["name"])
                    await pause(my_rng.uniform(0, 2 * spec["think_s"]))
            except Exception as exc:  # any failure: count it, reconnect
                if not stop.is_set():
                    tally.conn[conn_failure(exc)] += 1
                    await pause(0.2 + my_rng.random() * 0.3)
            finally:
                if wire is not None:
                    wire.abort()

    # --- slowloris: one byte per trickle_s ---

    async def slowloris(i: int) -> None:
        kind = "slowloris(pre-HELLO)" if i % 2 == 0 else "slowloris(after HELLO)"
        hello = encode_request("hello", 0, protocol=1, token=None)
        invoke = encode_request("invoke", 1, name="soak-echo", input=ECHO_INPUT)
        await pause(RAMP_S * i / max(1, spec["slowloris"]))
        while not stop.is_set():
            wire: Wire | None = None
            reply: asyncio.Future[dict[str, Any]] | None = None
            t0 = time.monotonic()
            try:
                wire = await Wire.open(host, port, _source(i + 7))
                tally.opened[kind] += 1
                if i % 2 == 1:
                    async with asyncio.timeout(GUARD_S):
                        await wire.hello()
                    t0 = time.monotonic()
                frame = hello if i % 2 == 0 else invoke
                reply = asyncio.ensure_future(wire.frame())
                for b in frame:
                    if reply.done() or stop.is_set():
                        break
                    wire.writer.write(bytes([b]))
                    await wire.writer.drain()
                    await asyncio.wait([reply], timeout=spec["trickle_s"])
                if stop.is_set():
                    break
                got = await asyncio.wait_for(reply, GUARD_S)
                tally.fate(kind, "completed:" + outcome(got))
            except Exception as exc:
                if not stop.is_set():
                    tally.fate(kind, conn_failure(exc), time.monotonic() - t0)
            finally:
                if reply is not None and not reply.done():
                    reply.cancel()
                if wire is not None:
                    wire.abort()
            await pause(0.1)

    # --- never-reading: invoke the 4 MiB function again and again, read nothing ---

    async def never_reading(i: int) -> None:
        kind = "never-reading"
        while not stop.is_set():
            wire: Wire | None = None
            t0 = time.monotonic()
            sent = 0
            peek: socket.socket | None = None
            try:
                wire = await Wire.open(host, port, _source(i + 3))
                tally.opened[kind] += 1
                async with asyncio.timeout(GUARD_S):
                    await wire.hello()
                # Watch for the server's close without taking the replies: the socket's receive
                # buffer still fills, as a stuck client's would.
                # uvloop's transport socket is a stand-in without recv: peek through a dup.
                fd = wire.writer.get_extra_info("socket").fileno()
                peek = socket.fromfd(fd, socket.AF_INET, socket.SOCK_STREAM)
                while not stop.is_set():
                    sent += 1
                    wire.writer.write(encode_request("invoke", sent, name="soak-big"))
                    try:
                        await asyncio.wait_for(wire.writer.drain(), 1.0)
                    except TimeoutError:
                        pass  # the server stopped reading us: keep the pressure on
                    await pause(0.05)
                    if wire.writer.transport.is_closing() or _peer_closed(peek):
                        raise Dropped("eof")
            except Exception as exc:
                if not stop.is_set():
                    tally.fate(kind, conn_failure(exc), time.monotonic() - t0)
            finally:
                if peek is not None:
                    peek.close()
                tally.hostile.setdefault("never-reading invokes sent", Counter())["sent"] += sent
                if wire is not None:
                    wire.abort()
            await pause(0.2)

    # --- partial frames: a big length prefix, part of the body, then silence ---

    async def partial(i: int) -> None:
        variant = i % 3
        kind = ("partial(pre-HELLO, 8 MiB prefix)", "partial(pre-HELLO, 60000 B prefix)",
                "partial(after HELLO, 8 MiB prefix)")[variant]
        length, body = ((8 * 1024 * 1024 - 1, 1024 * 1024), (60000, 30000),
                        (8 * 1024 * 1024 - 1, 4 * 1024 * 1024))[variant]
        await pause(RAMP_S * i / max(1, spec["partial"]))
        while not stop.is_set():
            wire: Wire | None = None
            t0 = time.monotonic()
            try:
                wire = await Wire.open(host, port, _source(i + 11))
                tally.opened[kind] += 1
                if variant == 2:
                    async with asyncio.timeout(GUARD_S):
                        await wire.hello()
                    t0 = time.monotonic()
                wire.writer.write(length.to_bytes(4, "big") + b"\x81" + b"\xa1" * (body - 1))
                ended = asyncio.ensure_future(wire.frame())
                stopped = asyncio.ensure_future(stop.wait())
                await asyncio.wait([ended, stopped], return_when=asyncio.FIRST_COMPLETED)
                stopped.cancel()
                if not ended.done():
                    ended.cancel()
                    break
                frame = ended.result()  # raises Dropped when the server ended it
                tally.fate(kind, "answered:" + outcome(frame))
            except Exception as exc:
                if not stop.is_set():
                    tally.fate(kind, conn_failure(exc), time.monotonic() - t0)
            finally:
                if wire is not None:
                    wire.abort()
            await pause(0.5)

    # --- ten spinning functions, each kept in flight ---

    async def spinner(i: int) -> None:
        while not stop.is_set():
            wire: Wire | None = None
            try:
                wire = await Wire.open(host, port, None)
                tally.opened["spinner"] += 1
                async with asyncio.timeout(GUARD_S):
                    await wire.hello()
                while not stop.is_set():
                    async with asyncio.timeout(SPIN_TIMEOUT_MS / 1000 + GUARD_S):
                        frame = await wire.request("invoke", name=f"soak-spin{i}",
                                                   timeout_ms=SPIN_TIMEOUT_MS)
                    tally.fate("spinner calls", outcome(frame))
                    if outcome(frame) not in ("ok", "TIMEOUT"):
                        await pause(0.05)  # refused: do not spin on the refusal
            except Exception as exc:
                if not stop.is_set():
                    tally.fate("spinner calls", conn_failure(exc))
                    await pause(0.2)
            finally:
                if wire is not None:
                    wire.abort()

    tasks: list[asyncio.Task[None]] = []
    groups: tuple[tuple[Callable[[int], Awaitable[None]], int], ...] = (
        (churn, spec["connections"]), (slowloris, spec["slowloris"]),
        (never_reading, spec["never_reading"]), (partial, spec["partial"]), (spinner, SPINNERS))
    for fn, count in groups:
        tasks.extend(asyncio.create_task(fn(i)) for i in range(count))
    await asyncio.sleep(RAMP_S)
    tally.counting = True
    start = time.perf_counter()
    await asyncio.sleep(spec["seconds"])
    tally.counting = False
    elapsed = time.perf_counter() - start
    stop.set()
    # Everyone finishes the op in hand (bounded by the guard), or is cancelled.
    _, late = await asyncio.wait(tasks, timeout=SPIN_TIMEOUT_MS / 1000 + 5)
    for t in late:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    crashed = [repr(t.exception()) for t in tasks
               if not t.cancelled() and t.exception() is not None]
    ops = {}
    for label, counts in sorted(tally.ops.items()):
        lat = sorted(tally.latency_ms[label])
        ops[label] = {
            "completed": sum(counts.values()),
            "per_s": round(sum(counts.values()) / elapsed, 1),
            "outcomes": dict(counts),
            "p50_ms": round(statistics.median(lat), 2),
            "p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 2),
        }
    return {
        "seconds": round(elapsed, 2),
        "ops": ops,
        "connection_failures": dict(tally.conn),
        "connections_opened": dict(tally.opened),
        "hostile": {k: dict(v) for k, v in tally.hostile.items()},
        "hostile_dropped_after_s": {
            k: {"mean": round(statistics.fmean(v), 2), "max": round(max(v), 2)}
            for k, v in tally.drop_after_s.items()},
        "client_crashes": crashed[:10],
        "max_rss_mb_loadgen": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def _peer_closed(sock: socket.socket) -> bool:
    """Whether the server reset (or closed, with nothing left unread) a socket we never read:
    a peek, taking nothing."""
    try:
        data = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return False
    except OSError as exc:
        raise Dropped("reset") from exc
    return data == b""


# -- the well-behaved echo client (a separate process) ------------------------------------------


async def _echo(spec: dict[str, Any]) -> dict[str, Any]:
    """One call at a time on one connection; latencies of the calls started in the window."""
    from fnclient import AsyncClient, FnError

    errors: Counter[str] = Counter()
    lat: list[tuple[float, float]] = []
    async with AsyncClient(spec["address"]) as client:
        begin = time.monotonic() + spec["delay_s"]
        end = begin + spec["seconds"]
        while (now := time.monotonic()) < end:
            t0 = time.perf_counter()
            try:
                async with asyncio.timeout(GUARD_S):
                    res = await client.invoke("soak-echo", ECHO_INPUT)
                if res.output != ECHO_INPUT:
                    errors["wrong output"] += 1
                    continue
            except (FnError, TimeoutError, OSError) as e:
                if now >= begin:
                    errors[getattr(e, "code", type(e).__name__)] += 1
                await asyncio.sleep(0.01)
                continue
            if now >= begin:
                lat.append((round(now - begin, 3), (time.perf_counter() - t0) * 1e3))
    ms = sorted(x for _, x in lat)
    if not ms:
        return {"calls": 0, "errors": dict(errors)}
    windows: dict[int, list[float]] = {}
    for t, x in lat:
        windows.setdefault(int(t // 10) * 10, []).append(x)
    return {
        "calls": len(ms),
        "p50_ms": round(statistics.median(ms), 2),
        "p99_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 2),
        "max_ms": round(ms[-1], 2),
        "errors": dict(errors),
        "p99_ms_per_10s": {
            str(k): round(sorted(v)[min(len(v) - 1, int(len(v) * 0.99))], 2)
            for k, v in sorted(windows.items())},
        "over_100ms": sum(1 for x in ms if x > 100),
    }


# -- main ---------------------------------------------------------------------------------------


def _spawn(role: str, spec: dict[str, Any]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, __file__, f"--{role}", json.dumps(spec)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)


def _collect(proc: subprocess.Popen[bytes], what: str, timeout: float) -> dict[str, Any]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise RuntimeError(f"{what} overran {timeout:.0f} s:\n{err.decode(errors='replace')[-3000:]}") from None
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{err.decode(errors='replace')[-3000:]}")
    result: dict[str, Any] = json.loads(out)
    return result


async def _prepare(address: str, modules: dict[str, bytes]) -> None:
    """Register the fixtures and call the echo once on a few connections (so the serving
    processes have it loaded before the baseline is taken)."""
    from fnclient import AsyncClient

    async with AsyncClient(address) as client:
        for name, wasm in modules.items():
            await client.register(name, wasm, filename=f"{name}.wasm")
        big = await client.invoke("soak-big")
        if len(big.output) != 4 * 1024 * 1024:
            raise RuntimeError(f"soak-big wrote {len(big.output)} bytes, not 4 MiB")
    for _ in range(6):
        async with AsyncClient(address) as client:
            await client.invoke("soak-echo", ECHO_INPUT)


def _mb(n: float) -> float:
    return round(n / (1024 * 1024), 1)


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    from bench_invoke import _code_version, _loadavg  # one copy, shared with bench_invoke

    t_start = time.monotonic()
    modules = fixtures()
    server = Server()
    sampler = RssSampler(server)
    result: dict[str, Any] = {"config": cfg, "loadavg_at_start": _loadavg()}
    try:
        sampler.start()
        asyncio.run(_prepare(server.address, modules))
        serving_before = server.serving_pids()
        sampler.phase = "baseline"
        time.sleep(3.0)
        spec = {"host": server.host, "port": server.port, "seed": cfg["seed"], **{
            k: cfg[k] for k in ("seconds", "connections", "slowloris", "never_reading",
                                "partial", "trickle_s", "think_s", "register_rate")}}
        sampler.phase = "ramp"
        load = _spawn("loadgen", spec)
        echo = _spawn("echo", {"address": server.address, "delay_s": RAMP_S,
                               "seconds": cfg["seconds"]})
        time.sleep(RAMP_S)
        sampler.phase = "soak"
        echo_result = _collect(echo, "echo client", cfg["seconds"] + 120)
        load_result = _collect(load, "load generator", cfg["seconds"] + 120)
        left_at = time.monotonic()
        sampler.phase = "settle"
        time.sleep(cfg["settle_s"])
        sampler.phase = "end"
        after_total, after_detail = server.rss()
        server_roles = server.roles(after_detail)
        if cfg.get("probe_trim"):
            result["after_malloc_trim"] = _probe_trim(server, server_roles)
        server_alive = server.alive()
        serving_after = server.serving_pids()
    finally:
        sampler.stop()
        log_text = server.log.read_text(errors="replace") if server.log.exists() else ""
        if cfg.get("log_out"):
            Path(cfg["log_out"]).parent.mkdir(parents=True, exist_ok=True)
            Path(cfg["log_out"]).write_text(log_text)
        server.stop()
    baseline = sampler.of("baseline")
    soak = sampler.of("soak") + sampler.of("ramp")
    settle = sampler.of("settle")
    base = statistics.median(baseline)
    result.update({
        "echo": echo_result,
        "load": load_result,
        "rss_mb": {
            "baseline": _mb(base),
            "peak": _mb(max(soak)),
            "after": _mb(after_total),
            "after_s": round(time.monotonic() - left_at, 1) if settle else None,
            "settle_min": _mb(min(settle)) if settle else None,
            "baseline_per_process": _labelled(sampler.baseline_detail, server_roles),
            "peak_per_process": _labelled(sampler.peak_detail, sampler.peak_roles),
            "after_per_process": _labelled(after_detail, server_roles),
            "timeline": [(t, p, _mb(r)) for t, p, r in sampler.samples],
        },
        "server": {
            "alive": server_alive,
            # A serving process replaced during the soak died (a crash, the OOM killer).
            "serving_processes_before": serving_before,
            "serving_processes_after": serving_after,
            "log_tracebacks": log_text.count("Traceback"),
            "log_errors": len(re.findall(r" ERROR ", log_text)),
            "log_warnings": len(re.findall(r" WARNING ", log_text)),
            "log_warning_kinds": _warning_kinds(log_text),
        },
    })
    p99 = echo_result.get("p99_ms")
    grown = _mb(after_total - base)
    result["targets"] = {
        "echo_p99_ms": {"target": f"< {ECHO_P99_TARGET_MS:g}", "value": p99,
                        "met": p99 is not None and p99 < ECHO_P99_TARGET_MS},
        "rss_after_minus_baseline_mb": {"target": f"<= {RSS_TARGET_MB:g}", "value": grown,
                                        "met": grown <= RSS_TARGET_MB},
    }
    result["loadavg_at_end"] = _loadavg()
    result["code"] = _code_version()
    result["elapsed_s"] = round(time.monotonic() - t_start, 1)
    return result


def _probe_trim(server: Server, roles: dict[str, str]) -> dict[str, Any]:
    """Diagnosis, opt-in: ask glibc in each serving process to give its free heap back
    (``malloc_trim(0)`` through gdb), then take the RSS again. What falls was free memory the
    allocator kept; what stays is still held by the server."""
    if shutil.which("gdb") is None:
        return {"skipped": "no gdb"}
    out: dict[str, Any] = {}
    for pid, role in roles.items():
        if role != "serving":
            continue
        proc = subprocess.run(["gdb", "-p", pid, "-batch", "-ex", "call (int)malloc_trim(0)"],
                              capture_output=True, text=True, timeout=60)
        out[pid] = "ok" if proc.returncode == 0 else proc.stderr[-300:]
    total, per = server.rss()
    return {"gdb": out, "rss_mb": _mb(total), "per_process": _labelled(per, server.roles(per))}


def _labelled(per: dict[int, int], roles: dict[str, str]) -> dict[str, float]:
    return {f"{pid} {roles.get(str(pid), '?')}": _mb(v) for pid, v in sorted(per.items())}


def _warning_kinds(log_text: str) -> dict[str, int]:
    """Server warnings and errors by their message, with numbers, ids and addresses blanked."""
    kinds: Counter[str] = Counter()
    for line in log_text.splitlines():
        m = re.search(r" (WARNING|ERROR) (\S+): (.*)", line)
        if m:
            msg = re.sub(r"\d+(\.\d+)?", "N", m.group(3))
            kinds[f"{m.group(1)} {m.group(2)}: {msg[:120]}"] += 1
    return dict(kinds.most_common(15))


def print_table(r: dict[str, Any]) -> None:
    c, load, echo, rss = r["config"], r["load"], r["echo"], r["rss_mb"]
    print(f"\nfnserver soak ({c['mode']}: {load['seconds']:.0f} s, {c['connections']} churn "
          f"connections, {c['slowloris']} slowloris, {c['never_reading']} never-reading, "
          f"{c['partial']} partial-frame, {SPINNERS} spinners; {os.cpu_count()} CPUs, load avg "
          f"{r['loadavg_at_start'][0]} at start, {r['loadavg_at_end'][0]} at end)")
    head = f"{'op':16}{'done':>8}{'per s':>8}{'p50 ms':>9}{'p99 ms':>9}  outcomes"
    print(head)
    print("-" * len(head))
    for op, s in load["ops"].items():
        print(f"{op:16}{s['completed']:>8}{s['per_s']:>8.1f}{s['p50_ms']:>9.2f}{s['p99_ms']:>9.2f}"
              f"  {s['outcomes']}")
    print(f"\nconnections opened: {load['connections_opened']}")
    print(f"connection-level failures (churn): {load['connection_failures'] or 'none'}")
    for kind, fates in load["hostile"].items():
        after = load["hostile_dropped_after_s"].get(kind)
        when = f"  (dropped after {after['mean']} s on average, {after['max']} s max)" if after else ""
        print(f"{kind}: {fates}{when}")
    if load["client_crashes"]:
        print(f"bench client tasks that crashed: {load['client_crashes']}")
    print(f"\nwell-behaved echo, one call at a time: {echo['calls']} calls, p50 "
          f"{echo.get('p50_ms')} ms, p99 {echo.get('p99_ms')} ms, max {echo.get('max_ms')} ms, "
          f"errors {echo['errors'] or 'none'}")
    print(f"server RSS (supervisor + serving processes + workers): baseline {rss['baseline']} MB,"
          f" peak {rss['peak']} MB, {rss['after_s']} s after the clients left {rss['after']} MB")
    s = r["server"]
    replaced = s["serving_processes_before"] != s["serving_processes_after"]
    print(f"server alive at the end: {s['alive']}; serving processes replaced: {replaced}; "
          f"log: {s['log_tracebacks']} tracebacks, {s['log_errors']} errors, "
          f"{s['log_warnings']} warnings")
    trim = r.get("after_malloc_trim")
    if trim:
        print(f"after malloc_trim(0) in each serving process (diagnosis): "
              f"{trim.get('rss_mb', trim)} MB")
    for name, t in r["targets"].items():
        print(f"target {name} {t['target']}: {t['value']}  {'met' if t['met'] else 'NOT met'}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="a 30 s soak (~70 s in all)")
    g.add_argument("--smoke", action="store_true",
                   help="a few seconds, a few dozen connections: checks the plumbing only")
    g.add_argument("--loadgen", metavar="SPEC", help=argparse.SUPPRESS)
    g.add_argument("--echo", metavar="SPEC", help=argparse.SUPPRESS)
    p.add_argument("--seconds", type=float, default=None, help="soak length (default 90, quick 30)")
    p.add_argument("--connections", type=int, default=None, help="churn connections (default 1000)")
    p.add_argument("--think-s", type=float, default=None,
                   help="mean pause between two ops of one churn connection (default 1)")
    p.add_argument("--no-hostile", action="store_true",
                   help="no slowloris, never-reading or partial-frame clients")
    p.add_argument("--settle", type=float, default=None,
                   help="seconds to wait after the clients left before the last RSS (default 20)")
    p.add_argument("--probe-trim", action="store_true",
                   help="diagnosis: after the settle, malloc_trim(0) in each serving process "
                        "(through gdb) and take the RSS once more")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="JSON file (default bench/results/soak.json)")
    a = p.parse_args(argv)
    if a.loadgen or a.echo:
        import uvloop

        # 1,000 connections and the hostile ones need more descriptors than a default 1024.
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        coro = _loadgen(json.loads(a.loadgen)) if a.loadgen else _echo(json.loads(a.echo))
        print(json.dumps(uvloop.run(coro)))
        return 0
    mode = "smoke" if a.smoke else "quick" if a.quick else "full"
    cfg = {"mode": mode, "seed": a.seed, **MODES[mode]}
    if a.seconds is not None:
        cfg["seconds"] = a.seconds
    if a.connections is not None:
        cfg["connections"] = a.connections
    cfg["probe_trim"] = a.probe_trim
    if a.settle is not None:
        cfg["settle_s"] = a.settle
    if a.think_s is not None:
        cfg["think_s"] = a.think_s
    if a.no_hostile:
        cfg.update(slowloris=0, never_reading=0, partial=0)
    out = a.out or RESULTS / ("soak.json" if mode != "smoke" else "soak-smoke.json")
    cfg["log_out"] = str(out.with_suffix(".server.log"))
    result = run(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"\nwritten to {out} in {result['elapsed_s']} s")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
