"""The design's ceiling: a bare uvloop server that runs each ``invoke`` inline with the floor's
call, and does nothing else.

    python bench/_bare.py DIR      (DIR holds NAME.wasm files; prints "listening on HOST:PORT")

It speaks just enough of the protocol for ``fnclient`` (HELLO, PING, INVOKE by name) with the
same codec, the same engine and the same fresh-Store call (``fnserver.exec._guest.run_guest``)
as fnserver and the floor, on one process and one event loop, one write per batch of replies.
No tokens, no registry, no slots, no records, no limits beyond the Store's: it is not a
server anyone should run, only the most any server of this design (asyncio, msgpack,
wasmtime-py, the guest in the serving process) can do on this machine. ``bench_invoke.py``
measures it beside fnserver, so a target above this ceiling shows as such (issue 8).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "client")]

import uvloop  # noqa: E402
import wasmtime  # noqa: E402
from fnclient.protocol import (  # noqa: E402
    PROTOCOL_VERSION,
    FrameDecoder,
    HelloReply,
    InvokeRequest,
    InvokeResult,
    ServerLimits,
    encode_response,
    parse_request,
)

from fnserver.exec._engine import make_engine  # noqa: E402
from fnserver.exec._guest import run_guest  # noqa: E402
from fnserver.exec._wasi import install_output, thread_deadline  # noqa: E402

MAX_FRAME = 8 << 20
MEMORY_LIMIT = 128 << 20
OUT_CAP = 1 << 20


class Bare(asyncio.Protocol):
    """One connection: frames in, replies out, each invoke run before the next frame."""

    def __init__(self, engine: wasmtime.Engine, modules: dict[str, wasmtime.InstancePre],
                 hello: dict[str, Any]) -> None:
        self.engine, self.modules, self.hello = engine, modules, hello
        self.decoder = FrameDecoder(MAX_FRAME)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.decoder.feed(data)
        out: list[bytes] = []
        while (frame := self.decoder.next_frame()) is not None:
            op, req_id, body = parse_request(frame)
            if op == "hello":
                out.append(encode_response(req_id, self.hello))
            elif op == "invoke":
                out.append(encode_response(req_id, self.invoke(InvokeRequest.from_wire(body))))
            else:
                out.append(encode_response(req_id, {}))
        if out:
            self.transport.write(b"".join(out))

    def invoke(self, req: InvokeRequest) -> dict[str, Any]:
        t0 = time.perf_counter_ns()
        run = run_guest(
            self.engine, self.modules[req.name], args=(req.name,), stdin=req.input,
            memory_limit=MEMORY_LIMIT, deadline_ticks=1 << 40, fuel=None, out_cap=OUT_CAP,
            err_keep=1 << 16,
        )
        try:
            call = thread_deadline()
            output, stderr = bytes(call.out), bytes(call.err)
            call.drop_output()
            return InvokeResult(
                output=output, stderr=stderr, exit_code=run.exit_code,
                duration_us=(time.perf_counter_ns() - t0) // 1000, version=1,
                memory_peak=run.memory, mode="wasm",
            ).to_wire()
        finally:
            run.close()


async def serve(directory: Path) -> None:
    engine = make_engine()
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    install_output(linker)
    modules = {p.stem: linker.instantiate_pre(wasmtime.Module(engine, p.read_bytes()))
               for p in sorted(directory.glob("*.wasm"))}
    hello = HelloReply(
        server="bare", server_version="0", protocol=PROTOCOL_VERSION, max_frame=MAX_FRAME,
        max_upload=MAX_FRAME, chunk_size=1 << 20,
        limits=ServerLimits(timeout_ms=10_000, max_timeout_ms=10_000, memory_mb=128,
                            max_memory_mb=128, output_bytes=OUT_CAP),
        pid=os.getpid(),
    ).to_wire()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Bare(engine, modules, hello), "127.0.0.1", 0)
    host, port = server.sockets[0].getsockname()[:2]
    print(f"listening on {host}:{port}", flush=True)
    await asyncio.Event().wait()  # until killed


if __name__ == "__main__":
    uvloop.run(serve(Path(sys.argv[1])))
