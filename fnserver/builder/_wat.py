"""The ``wat`` kind's toolchain: ``python -m fnserver.builder._wat SRC OUT [UID]``.

WebAssembly text is parsed by wasmtime's ``wat2wasm`` in a process of its own, like every
other build: under the build's deadline and memory limit (``_proc.run_tool``), killed with its
process group, and as the build's uid (dropped after the imports, before the first byte of the
upload is parsed). It prints the parser's message and exits 1 on bad text.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Final

import wasmtime

#: prctl(2) options (linux/prctl.h).
_PR_SET_NO_NEW_PRIVS: Final = 38
#: The largest text it reads (the upload cap is below it).
MAX_WAT: Final = 64 << 20


def _drop(uid: int | None) -> None:
    if uid is not None and os.geteuid() == 0:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)


def main(argv: list[str]) -> int:
    """Convert; 0 when OUT holds the module."""
    src, out = argv[0], argv[1]
    uid = int(argv[2]) if len(argv) > 2 else None
    with open(src, "rb") as f:
        text = f.read(MAX_WAT + 1)
    # Opened before the uid drop: the build's scratch directory is not the build uid's to walk.
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    _drop(uid)
    if len(text) > MAX_WAT:
        print(f"main.wat is over {MAX_WAT >> 20} MiB", file=sys.stderr)
        return 1
    try:
        wasm = wasmtime.wat2wasm(text.decode("utf-8"))
    except UnicodeDecodeError as exc:
        print(f"main.wat is not UTF-8 text (byte {exc.start})", file=sys.stderr)
        return 1
    except wasmtime.WasmtimeError as exc:
        print(str(exc).replace(src, "main.wat"), file=sys.stderr)
        return 1
    with os.fdopen(fd, "wb") as f:
        f.write(wasm)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
