"""Compiler process: ``python -m fnserver.exec._compile <artifact> <digest> <fuel> [<uid>]``.

Validates and compiles one WebAssembly module for one engine (``fuel`` = 0 or 1) and writes
one frame to stdout: :class:`~._wire.Compiled` (the serialized module) or
:class:`~._wire.RunError`. It runs no guest code and writes no file: the pool, which started
it, hashes the bytes and stores them in the module cache. Parsing and compiling hostile wasm
is still an attack surface, so the process reads the artifact, then caps its own memory and,
when started as root, drops to the unprivileged ``uid`` before wasmtime sees a byte; the pool
bounds it in time and kills its process group on overrun.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import resource
import sys
from typing import Final

import wasmtime

from ..protocol import FnError, InternalError, InvalidArgumentError, encode_frame
from ._engine import make_engine
from ._types import COMPILE_DATA
from ._wire import Compiled, RunError

#: RLIMIT_AS backstop: the main engine reserves its 4 GiB pooled memory slot at creation.
COMPILE_AS: Final = 8 << 30
#: The largest artifact the compiler reads (the server's upload cap is far below).
MAX_WASM: Final = 512 << 20
WASI_MODULE: Final = "wasi_snapshot_preview1"
_PR_SET_NO_NEW_PRIVS: Final = 38
_PR_SET_PDEATHSIG: Final = 1
#: Compiles run this much nicer than the serving processes' event loops: under a full machine
#: a register's compile waits, an invocation does not (the soak's echo shared two cores with
#: two compiles a second).
COMPILE_NICE: Final = 10


def validate_and_compile(engine: wasmtime.Engine, wasm: bytes) -> wasmtime.Module:
    """Compile a WASI command module, or raise :class:`InvalidArgumentError` saying why not."""
    if wasm[:4] != b"\0asm":
        # wasmtime would also accept WAT text here; only binary modules are functions.
        raise InvalidArgumentError("not a WebAssembly module: missing the \\0asm magic")
    try:
        wasmtime.Module.validate(engine, wasm)
        module = wasmtime.Module(engine, wasm)
    except wasmtime.WasmtimeError as exc:
        raise InvalidArgumentError(f"not a WebAssembly module: {exc}") from None
    for imp in module.imports:
        if imp.module != WASI_MODULE:
            raise InvalidArgumentError(
                f"not a WASI command: imports {imp.module}.{imp.name}; only "
                f"{WASI_MODULE} is provided"
            )
    start = [e for e in module.exports if e.name == "_start"]
    if not start or not isinstance(start[0].type, wasmtime.FuncType):
        raise InvalidArgumentError("not a WASI command: no exported _start function")
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    try:
        # Resolves every import against WASI: a wrong signature fails here, not per call.
        linker.instantiate_pre(module)
    except wasmtime.WasmtimeError as exc:
        raise InvalidArgumentError(f"not a WASI command: {exc}") from None
    return module


def _read_artifact(path: str, digest: str) -> bytes:
    try:
        with open(path, "rb") as f:
            wasm = f.read(MAX_WASM + 1)
    except OSError as exc:
        raise InternalError(f"cannot read the module: {exc.strerror}") from None
    if len(wasm) > MAX_WASM:
        raise InvalidArgumentError(f"the module is over {MAX_WASM >> 20} MiB")
    if hashlib.sha256(wasm).hexdigest() != digest:
        # The registry recorded another digest: never cache these bytes under that name.
        raise InternalError("the module's bytes do not match its recorded sha256")
    return wasm


def _harden(uid: int | None) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, 9, 0, 0, 0)
    os.nice(COMPILE_NICE)  # before wasmtime starts its compile threads: they inherit it
    for which, value in (
        (resource.RLIMIT_DATA, COMPILE_DATA),
        (resource.RLIMIT_AS, COMPILE_AS),
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_FSIZE, 0),  # it writes no file; stdout is a pipe
    ):
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(which, (value, value))
    if uid is not None and os.geteuid() == 0:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        # A uid change clears the death signal: set it again.
        libc.prctl(_PR_SET_PDEATHSIG, 9, 0, 0, 0)
    libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)


def main(argv: list[str]) -> int:
    """Entry point; the exit status is 0 whenever a frame was written."""
    path, digest, fuel = argv[0], argv[1], argv[2] == "1"
    uid = int(argv[3]) if len(argv) > 3 else None
    out = os.dup(1)
    os.dup2(2, 1)  # nothing but the one frame may reach the pool's pipe
    try:
        wasm = _read_artifact(path, digest)
        _harden(uid)
        module = validate_and_compile(make_engine(fuel), wasm)
        reply: Compiled | RunError = Compiled(bytes(module.serialize()))
    except FnError as exc:
        reply = RunError.of(exc)
    except MemoryError:
        reply = RunError.of(
            InvalidArgumentError(
                f"compiling the module needs over the {COMPILE_DATA >> 30} GiB memory limit",
                {"compile_memory_bytes": COMPILE_DATA},
            )
        )
    except Exception as exc:  # reported as INTERNAL, not a silent crash
        reply = RunError.of(InternalError(f"compiler: {exc!r}"))
    view = memoryview(encode_frame(reply.to_wire()))
    while view:
        view = view[os.write(out, view) :]
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
