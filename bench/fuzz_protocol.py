"""Fuzz the wire protocol's decoder and the server's dispatcher (issue 10, item 7).

    python bench/fuzz_protocol.py [--minutes M] [--seed S] [--smoke]
    python bench/fuzz_protocol.py --replay bench/results/fuzz/<case>.json

(a) pure: random and mutated frames (mutations of valid requests: flipped bytes, truncations,
    wrong types, huge lengths, nested maps, several frames at once...) go through
    ``FrameDecoder`` (fed in random pieces), ``parse_request`` and the ``from_wire`` of every
    operation in ``OPERATIONS``. The rule: each input is parsed, or raises the protocol's own
    ``FnError``; anything else, or a case taking over a second, is a failure.
(b) live: the same kind of cases sent to a real server (``python -m fnserver --port 0``) on
    many connections at once, most after a valid HELLO so that they reach the dispatcher.
    After each batch: a separate connection's ping must be answered, no reply may be an
    ``INTERNAL`` error, and the supervisor and its serving processes must be the same ones
    (a replaced serving process died). The server's log is searched for tracebacks.

Failures are saved with a reproducer under bench/results/fuzz/ (``--replay`` runs one again);
the summary goes to bench/results/fuzz.json. Ends by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import os
import random
import re
import signal
import struct
import sys
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
FAILURES = RESULTS / "fuzz"
#: A pure case slower than this (s) is a failure: the decoder runs on the server's event loop.
SLOW_S = 1.0
#: Live: connections fuzzing at once, and how long a case's replies are waited for (s).
LIVE_CONNECTIONS = 24
LIVE_CASE_TIMEOUT_S = 5.0
SENTINEL_ID = 2**62 + 7
ECHO = "fz-echo"

# -- what valid requests look like ---------------------------------------------------------------

_INTS = [0, 1, -1, 2, 7, 100, 255, 256, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
         2**53, 2**62, 2**62 + 1, 2**63 - 1, 2**63, 2**64 - 1, -(2**31), -(2**63)]
_STRS = ["", "a", "latest", "prod", "hello", "invoke", "request", "response", "error",
         ECHO, "fz-missing", "Fz-Upper", "-bad", "a" * 63, "a" * 64, "x" * 300, "é", "\x00",
         "a\x00b", "../../etc/passwd", "f.wasm", "f.c", "f.go", "f.zip", "f.bin", ".wasm",
         "wasm", "native", "1", "007", "9" * 25, "🙂", "\ud7ff", "a/b", "*", "%s%n"]
_KINDS = ["wasm", "native", None, "", "x", "wasm " * 10]


def rand_value(rng: random.Random, depth: int = 0) -> Any:
    """Any msgpack-encodable value, biased towards edge cases."""
    k = rng.randrange(16 if depth < 4 else 11)
    if k == 0:
        return None
    if k == 1:
        return rng.random() < 0.5
    if k == 2:
        return rng.choice(_INTS)
    if k == 3:
        return rng.randrange(-1000, 1000)
    if k == 4:
        return rng.choice([0.0, 1.0, -1.5, 1e300, math.inf, -math.inf, math.nan, 2.0**63])
    if k in (5, 6):
        return rng.choice(_STRS)
    if k == 7:
        return "".join(chr(rng.randrange(1, 0x2FF)) for _ in range(rng.randrange(0, 40)))
    if k == 8:
        return rng.randbytes(rng.randrange(0, 64))
    if k == 9:
        return b"" if rng.random() < 0.5 else b"\x00" * rng.choice([1, 1000, 70000])
    if k == 10:
        return rng.choice(["x" * 5000, b"y" * 5000])
    if k in (11, 12):
        return [rand_value(rng, depth + 1) for _ in range(rng.randrange(0, 5))]
    return {rng.choice(_STRS + ["type", "id", "op", "name", "data", "options"]):
            rand_value(rng, depth + 1) for _ in range(rng.randrange(0, 5))}


def valid_body(rng: random.Random, live: bool) -> dict[str, Any]:
    """A well-formed request of a random operation (its id random but valid)."""
    op = rng.choice(["hello", "ping", "register", "upload", "list", "get", "delete", "alias",
                     "invoke", "invoke", "invoke", "get"])
    body: dict[str, Any] = {"type": "request", "op": op, "id": rng.randrange(0, 2**20)}
    # Never the fixture's name in a delete or an alias: the live run keeps its echo around.
    name = rng.choice([ECHO, "fz-missing", f"fz-{rng.randrange(100)}"])
    other = f"fz-{rng.randrange(100)}"
    if op == "hello":
        body.update(protocol=1, token=None, client="fuzz")
    elif op == "register":
        data = rng.randbytes(rng.randrange(1, 200))
        body.update(name=other, filename=rng.choice(["f.wasm", "f.bin", "f.xyz"]),
                    size=len(data), sha256=hashlib.sha256(data).hexdigest())
        if rng.random() < 0.5:
            body["options"] = {"timeout_ms": rng.randrange(1, 5000), "memory_mb": rng.randrange(1, 256),
                               "alias": "prod", "description": "fuzz",
                               "kind": rng.choice(["wasm", "native"]),
                               "fuel": rng.randrange(1, 10**6)}
        body["_upload"] = data
    elif op == "upload":
        body["data"] = rng.randbytes(rng.randrange(0, 100))
    elif op == "get":
        body.update(name=name, version=rng.choice([None, 1, "latest", "prod", "2"]),
                    limit=rng.randrange(1, 101), cursor=rng.choice([None, 0, 1]), log=rng.random() < 0.5)
    elif op == "delete":
        body.update(name=other, version=rng.choice([None, 1, 2]))
    elif op == "alias":
        body.update(name=other, alias="prod", version=rng.randrange(1, 3))
    elif op == "invoke":
        body.update(name=name, version=rng.choice([None, 1, "latest", "prod"]),
                    input=rng.randbytes(rng.randrange(0, 300)), args=["a", "b"],
                    timeout_ms=rng.randrange(1, 3000), mode=rng.choice([None, "wasm"]))
    return body


def mutate_body(rng: random.Random, body: dict[str, Any]) -> dict[str, Any]:
    """Wrong types, missing and extra keys, nested maps, odd envelopes."""
    body = dict(body)
    for _ in range(rng.randrange(1, 4)):
        keys = [k for k in body if k != "_upload"]
        k = rng.randrange(8)
        if k <= 2 and keys:  # a field of the wrong type or value
            body[rng.choice(keys)] = rand_value(rng)
        elif k == 3 and keys:
            del body[rng.choice(keys)]
        elif k == 4:
            body[rng.choice(_STRS)] = rand_value(rng)
        elif k == 5:  # the envelope itself
            body[rng.choice(["type", "op", "id"])] = rand_value(rng)
        elif k == 6:  # nested maps where a scalar is expected
            nest: Any = rand_value(rng)
            for _ in range(rng.randrange(1, 60)):
                nest = {"a": nest}
            body[rng.choice(keys or ["x"])] = nest
        else:
            body["options"] = rand_value(rng) if rng.random() < 0.5 else {
                rng.choice(["timeout_ms", "memory_mb", "fuel", "alias", "kind", "description"]):
                rand_value(rng) for _ in range(rng.randrange(1, 4))}
    return body


def pack(body: dict[str, Any]) -> bytes | None:
    import msgpack

    try:
        return bytes(msgpack.packb({k: v for k, v in body.items() if k != "_upload"},
                                   use_bin_type=True))
    except (ValueError, TypeError, OverflowError):
        return None  # an int over 64 bits, a nest past the packer's depth


def frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def upload_frame(body: dict[str, Any]) -> bytes:
    import msgpack

    return frame(msgpack.packb({"type": "request", "op": "upload", "id": body.get("id"),
                                "data": body["_upload"]}, use_bin_type=True))


_SPECIAL = [0x00, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xC1, 0xC2, 0xC3, 0xC4, 0xC5,
            0xC6, 0xC7, 0xC8, 0xC9, 0xCA, 0xCB, 0xCF, 0xD3, 0xD4, 0xD8, 0xD9, 0xDB, 0xDC, 0xDD,
            0xDE, 0xDF, 0xE0, 0xFF]
_HUGE_HEADERS = [b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff", b"\xc6\x7f\xff\xff\xff",
                 b"\xdb\xff\xff\xff\xff", b"\xdc\xff\xff", b"\xde\xff\xff", b"\xc9\x00\x00\x10\x00\x05",
                 b"\xd4\x01\x02", b"\xc7\x03\xff\x01\x02\x03", b"\xcb" + struct.pack(">d", math.nan)]


def mutate_bytes(rng: random.Random, payload: bytes) -> bytes:
    """Byte-level damage to a msgpack body."""
    b = bytearray(payload)
    for _ in range(rng.randrange(1, 4)):
        k = rng.randrange(7)
        if k == 0 and b:  # flipped bits
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        elif k == 1 and b:  # a msgpack type byte where data was
            b[rng.randrange(len(b))] = rng.choice(_SPECIAL)
        elif k == 2 and b:  # truncated
            del b[rng.randrange(len(b)):]
        elif k == 3:  # a huge declared length with nothing behind it
            i = rng.randrange(len(b) + 1)
            b[i:i] = rng.choice(_HUGE_HEADERS)
        elif k == 4:  # random bytes inserted
            i = rng.randrange(len(b) + 1)
            b[i:i] = rng.randbytes(rng.randrange(1, 16))
        elif k == 5 and len(b) > 2:  # a slice duplicated
            i, j = sorted(rng.sample(range(len(b)), 2))
            b[j:j] = b[i:j]
        else:  # deep nesting: arrays or maps inside each other past any sane depth
            depth = rng.choice([100, 1000, 5000, 50000])
            b = bytearray(rng.choice([b"\x91", b"\x81\xa1a"]) * depth + b"\xc0")
    return bytes(b)


def make_case(rng: random.Random, *, live: bool, max_frame: int) -> tuple[bytes, str]:
    """One input: the bytes a client sends, and how they were made."""
    k = rng.randrange(10)
    frames: list[bytes] = []
    how: list[str] = []
    for _ in range(rng.choice([1, 1, 1, 2, 3, 5])):
        body = valid_body(rng, live)
        if k <= 3:
            body = mutate_body(rng, body)
            how.append(f"fields({body.get('op')!r})")
        payload = pack(body)
        if payload is None:
            continue
        if 4 <= k <= 6:
            payload = mutate_bytes(rng, payload)
            how.append("bytes")
        frames.append(frame(payload))
        if "_upload" in body and rng.random() < 0.8:
            frames.append(upload_frame(body))
        if k == 7:  # a wrong length prefix
            n = rng.choice([0, 1, len(payload) - 1, len(payload) + 1, max_frame, max_frame + 1,
                            2**32 - 1, rng.randrange(2**32)])
            frames[-1] = struct.pack(">I", max(0, n) & 0xFFFFFFFF) + payload
            how.append(f"prefix {n}")
        elif k == 8:  # raw noise
            frames[-1] = rng.randbytes(rng.randrange(1, 300))
            how.append("noise")
        elif k == 9:
            how.append("valid")
    return b"".join(frames), ",".join(how) or "empty"


# -- (a) the pure decoder and request parsing ----------------------------------------------------


class _Slow(Exception):
    pass


def pure_case(data: bytes, max_frame: int, rng: random.Random, tally: Counter[str]) -> None:
    """Feed ``data`` in random pieces; parse every frame; raise on anything but an FnError."""
    from fnclient.protocol import OPERATIONS, FnError, FrameDecoder, parse_request

    decoder = FrameDecoder(max_frame)
    pos = 0
    while pos < len(data):
        step = rng.choice([1, 3, 64, 4096, len(data)])
        try:
            decoder.feed(data[pos:pos + step])
            pos += step
            frames = decoder.frames()
        except FnError as err:
            tally[f"decoder:{err.code}"] += 1
            return
        for body in frames:
            tally["frames"] += 1
            try:
                op, _, _ = parse_request(body)
            except FnError as err:
                tally[f"envelope:{err.code}"] += 1
                op = rng.choice(sorted(OPERATIONS))  # every record must take any map anyway
            try:
                OPERATIONS[op].request.from_wire(body)
                tally[f"from_wire:{op}:ok"] += 1
            except FnError as err:
                tally[f"from_wire:{op}:{err.code}"] += 1


def reply_case(rng: random.Random, tally: Counter[str]) -> str | None:
    """Client side, informational: a reply map a broken or hostile server might send, through
    the client's lenient readers. Returns the exception's type when one escapes."""
    from fnclient.protocol import FnError, InvokeResult, VersionInfo

    m = {k: rand_value(rng) for k in rng.sample(
        ["output", "stderr", "exit_code", "duration_us", "version", "truncated", "queue_us",
         "wall_us", "memory_peak", "mode", "name", "created", "artifacts", "limits",
         "artifact_sha256", "aliases", "build_log", "size"], rng.randrange(1, 8))}
    if rng.random() < 0.5:
        m.update(name="fz", version=1)
    for key in ("output", "stderr"):
        # ``bytes(n)`` of an int is n zero bytes: a reply saying output=2**31 makes the client
        # allocate 2 GiB. Noted once (below), then kept small so the fuzzer stays small.
        v = m.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v > 4096:
            tally[f"reply {key} int > 4096 (bytes(n) allocates n bytes)"] += 1
            m[key] = 4096
    for reader in (InvokeResult.from_wire, VersionInfo.from_wire):
        try:
            reader(m)  # type: ignore[operator]
        except FnError:
            pass
        except Exception as exc:
            tally[f"{reader.__qualname__}:{type(exc).__name__}"] += 1
            return f"{reader.__qualname__} raised {type(exc).__name__}: {exc}; map {m!r}"[:500]
    return None


def _alarm(signum: int, frame: Any) -> None:
    raise _Slow()


def run_pure(seconds: float, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    tally: Counter[str] = Counter()
    failures: list[dict[str, Any]] = []
    reply_failures: Counter[str] = Counter()
    reply_example: dict[str, str] = {}
    cases = 0
    slowest = 0.0
    end = time.monotonic() + seconds
    signal.signal(signal.SIGALRM, _alarm)
    while time.monotonic() < end:
        case_seed = rng.randrange(2**63)
        crng = random.Random(case_seed)
        max_frame = crng.choice([64 * 1024, 8 * 1024 * 1024, 1000])
        data, how = make_case(crng, live=False, max_frame=max_frame)
        cases += 1
        t0 = time.perf_counter()
        tb: str | None = None
        error: str | None = None
        signal.setitimer(signal.ITIMER_REAL, SLOW_S * 5)
        try:
            pure_case(data, max_frame, crng, tally)
        except _Slow:
            error = f"no answer within {SLOW_S * 5:g} s"
        except Exception as exc:
            error = "".join(traceback.format_exception_only(exc)).strip()
            tb = traceback.format_exc()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        took = time.perf_counter() - t0
        slowest = max(slowest, took)
        if error is None and took > SLOW_S:
            error = f"took {took:.2f} s"
        if error is not None:
            failures.append(save_failure("pure", data, how, error, seed=case_seed,
                                         max_frame=max_frame,
                                         traceback=tb))
        got = reply_case(crng, tally)
        if got is not None:
            key = got.split(":")[0]
            reply_failures[key] += 1
            reply_example.setdefault(key, got)
    return {"cases": cases, "seconds": round(seconds, 1), "failures": len(failures),
            "failure_files": [f["file"] for f in failures[:20]],
            "failure_kinds": dict(Counter(f["error"][:100] for f in failures).most_common(10)),
            "slowest_case_s": round(slowest, 3),
            "outcomes": dict(sorted(tally.items())),
            "client_reply_readers": {"escaped": dict(reply_failures), "examples": reply_example}}


def save_failure(kind: str, data: bytes, how: str, error: str, **extra: Any) -> dict[str, Any]:
    """Write a reproducer: the exact bytes (hex) and how to replay them."""
    FAILURES.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(data + kind.encode()).hexdigest()[:12]
    path = FAILURES / f"{kind}-{digest}.json"
    record = {"kind": kind, "error": error, "how": how, "data_hex": data.hex(),
              "replay": f"python bench/fuzz_protocol.py --replay {path.relative_to(ROOT)}",
              **{k: v for k, v in extra.items() if v is not None}}
    path.write_text(json.dumps(record, indent=2) + "\n")
    return {"file": str(path.relative_to(ROOT)), "error": error}


# -- (b) a live server ---------------------------------------------------------------------------


async def live_case(host: str, port: int, data: bytes, hello: bool) -> tuple[list[dict[str, Any]], str]:
    """Send one case on a fresh connection (after HELLO when ``hello``), then a ping sentinel;
    collect every frame until the sentinel's reply and a short quiet, or the server's close."""
    from fnclient.protocol import DEFAULT_MAX_FRAME, FnError, FrameDecoder, encode_request

    reader, writer = await asyncio.open_connection(host, port)
    decoder = FrameDecoder(DEFAULT_MAX_FRAME + 1024)
    frames: list[dict[str, Any]] = []
    end = "timeout"
    try:
        async with asyncio.timeout(LIVE_CASE_TIMEOUT_S):
            if hello:
                writer.write(encode_request("hello", 0, protocol=1, token=None, client="fuzz"))
            writer.write(data)
            writer.write(encode_request("ping", SENTINEL_ID))
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            sentinel = False
            while True:
                try:
                    chunk = await (asyncio.wait_for(reader.read(1 << 16), 0.15) if sentinel
                                   else reader.read(1 << 16))
                except TimeoutError:
                    end = "quiet after sentinel"
                    break
                except ConnectionError:
                    end = "reset"
                    break
                if not chunk:
                    end = "closed by server"
                    break
                try:
                    decoder.feed(chunk)
                    got = decoder.frames()
                except FnError as err:  # the server sent something our decoder refuses
                    frames.append({"type": "client-decode-failure", "error": str(err)})
                    end = "undecodable reply"
                    break
                for f in got:
                    frames.append(f)
                    if f.get("id") == SENTINEL_ID:
                        sentinel = True
    except TimeoutError:
        pass
    finally:
        writer.transport.abort()
    return frames, end


async def ping_ok(host: str, port: int) -> float | None:
    """A separate connection's HELLO and ping; the round trip in ms, or None."""
    from fnclient import AsyncClient

    t0 = time.perf_counter()
    try:
        async with asyncio.timeout(10):
            async with AsyncClient(f"{host}:{port}") as client:
                await client.ping()
    except Exception:
        return None
    return (time.perf_counter() - t0) * 1e3


async def _live(server: Any, seconds: float, seed: int) -> dict[str, Any]:
    from fnclient import AsyncClient

    from tests import wasm_fixtures

    async with AsyncClient(server.address) as client:
        info = await client.register(ECHO, wasm_fixtures.echo(), filename="echo.wasm")
        await client.alias(ECHO, "prod", info["version"] if isinstance(info, dict) else 1)
    rng = random.Random(seed)
    tally: Counter[str] = Counter()
    ends: Counter[str] = Counter()
    failures: list[dict[str, Any]] = []
    pings: list[float] = []
    cases = batches = 0
    serving = server.serving_pids()
    end = time.monotonic() + seconds
    problem: str | None = None
    while time.monotonic() < end and problem is None:
        batch: list[tuple[bytes, str, bool, int]] = []
        for _ in range(LIVE_CONNECTIONS * 4):
            case_seed = rng.randrange(2**63)
            crng = random.Random(case_seed)
            data, how = make_case(crng, live=True, max_frame=8 * 1024 * 1024)
            batch.append((data, how, crng.random() < 0.85, case_seed))
        async def one(item: tuple[bytes, str, bool, int], sem: asyncio.Semaphore) -> None:
            data, how, hello, case_seed = item
            async with sem:
                try:
                    frames, how_ended = await live_case(server.host, server.port, data, hello)
                except OSError as exc:
                    tally[f"connect:{type(exc).__name__}"] += 1
                    return
            ends[how_ended] += 1
            for f in frames:
                if f.get("type") == "error":
                    err = f.get("error") if isinstance(f.get("error"), dict) else {}
                    code = str(err.get("code"))
                    tally[f"error:{code}"] += 1
                    if code == "INTERNAL":
                        failures.append(save_failure(
                            "live", data, how, f"INTERNAL reply: {err.get('message')!r}",
                            hello=hello, seed=case_seed))
                elif f.get("type") == "client-decode-failure":
                    failures.append(save_failure("live", data, how, f"reply undecodable: {f['error']}",
                                                 hello=hello, seed=case_seed))
                else:
                    tally[str(f.get("type"))] += 1

        sem = asyncio.Semaphore(LIVE_CONNECTIONS)
        await asyncio.gather(*(one(item, sem) for item in batch))
        cases += len(batch)
        batches += 1
        rtt = await ping_ok(server.host, server.port)
        if rtt is None:
            problem = "a separate connection's ping was not answered within 10 s"
        else:
            pings.append(rtt)
        if not server.alive():
            problem = "the supervisor exited"
        elif server.serving_pids() != serving:
            problem = f"serving processes changed: {serving} -> {server.serving_pids()}"
        if problem is not None:
            for data, how, hello, case_seed in batch:
                failures.append(save_failure("live", data, how, f"after this batch: {problem}",
                                             hello=hello, seed=case_seed))
    pings.sort()
    return {"cases": cases, "batches": batches, "seconds": round(seconds, 1),
            "connections_at_once": LIVE_CONNECTIONS, "failures": len(failures),
            "failure_files": [f["file"] for f in failures[:20]],
            "failure_kinds": dict(Counter(f["error"][:100] for f in failures).most_common(10)),
            "stopped_early": problem,
            "replies": dict(sorted(tally.items())), "connection_ends": dict(ends),
            "check_ping_ms": {"count": len(pings),
                              "p50": round(pings[len(pings) // 2], 2) if pings else None,
                              "max": round(pings[-1], 2) if pings else None}}


def run_live(seconds: float, seed: int) -> dict[str, Any]:
    from bench_soak import Server

    server = Server()
    log_text = ""
    try:
        result = asyncio.run(_live(server, seconds, seed))
        result["server_alive_at_end"] = server.alive()
    finally:
        log_text = server.log.read_text(errors="replace") if server.log.exists() else ""
        server.stop()
    tracebacks = [m.start() for m in re.finditer("Traceback", log_text)]
    result["log_tracebacks"] = len(tracebacks)
    result["log_errors"] = len(re.findall(r" ERROR ", log_text))
    if tracebacks:
        FAILURES.mkdir(parents=True, exist_ok=True)
        path = FAILURES / "live-server-log-tracebacks.txt"
        path.write_text("\n\n".join(log_text[max(0, i - 300):i + 3000] for i in tracebacks[:20]))
        result["log_traceback_file"] = str(path.relative_to(ROOT))
    return result


# -- replay ----------------------------------------------------------------------------------


def replay(path: Path) -> int:
    record = json.loads(path.read_text())
    data = bytes.fromhex(record["data_hex"])
    print(f"{record['kind']} case ({record['how']}), recorded error: {record['error']}")
    if record["kind"] == "pure":
        tally: Counter[str] = Counter()
        pure_case(data, record.get("max_frame", 8 * 1024 * 1024),
                  random.Random(record.get("seed", 0)), tally)
        print(f"parsed without an escaping exception: {dict(tally)}")
        return 0
    from bench_soak import Server

    server = Server()
    try:
        async def go() -> None:
            from fnclient import AsyncClient

            from tests import wasm_fixtures

            async with AsyncClient(server.address) as client:
                await client.register(ECHO, wasm_fixtures.echo(), filename="echo.wasm")
            frames, end = await live_case(server.host, server.port, data, record.get("hello", True))
            for f in frames:
                print(f)
            print(f"connection: {end}; ping afterwards: {await ping_ok(server.host, server.port)} ms")

        asyncio.run(go())
    finally:
        print(server.log.read_text(errors="replace")[-4000:])
        server.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--minutes", type=float, default=3.0, help="total time (default 3): 40%% pure, 60%% live")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: from the clock)")
    p.add_argument("--smoke", action="store_true", help="a few seconds of each: plumbing only")
    p.add_argument("--replay", type=Path, default=None, help="run one saved failure again")
    p.add_argument("--out", type=Path, default=None, help="JSON (default bench/results/fuzz.json)")
    a = p.parse_args(argv)
    if a.replay:
        return replay(a.replay)
    seed = a.seed if a.seed is not None else int(time.time())
    total = 8.0 if a.smoke else a.minutes * 60
    t0 = time.monotonic()
    result: dict[str, Any] = {"seed": seed, "minutes": round(total / 60, 2),
                              "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}
    result["pure"] = run_pure(total * 0.4, seed)
    result["live"] = run_live(total * 0.6, seed + 1)
    result["elapsed_s"] = round(time.monotonic() - t0, 1)
    out = a.out or RESULTS / ("fuzz.json" if not a.smoke else "fuzz-smoke.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    pure, live = result["pure"], result["live"]
    print(f"fuzz_protocol (seed {seed}, {result['elapsed_s']} s)")
    print(f"(a) pure decoder + parse_request + from_wire: {pure['cases']} cases, "
          f"{pure['failures']} failures, slowest case {pure['slowest_case_s']} s")
    for kind, n in pure["failure_kinds"].items():
        print(f"    {n} x {kind}")
    esc = pure["client_reply_readers"]["escaped"]
    print(f"    client reply readers (informational): {esc or 'nothing escaped'}")
    print(f"(b) live server: {live['cases']} cases in {live['batches']} batches on up to "
          f"{live['connections_at_once']} connections, {live['failures']} failures, "
          f"ping after each batch p50 {live['check_ping_ms']['p50']} ms max "
          f"{live['check_ping_ms']['max']} ms, server tracebacks in log: {live['log_tracebacks']}")
    for kind, n in live["failure_kinds"].items():
        print(f"    {n} x {kind}")
    print(f"    replies: {live['replies']}")
    print(f"    connections ended: {live['connection_ends']}")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
