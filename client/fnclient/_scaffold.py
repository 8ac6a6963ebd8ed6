"""``fn new NAME --lang LANG`` (a function that works as written) and ``fn register NAME DIR``
(a directory packed into what the server takes: a Go module as a zip, or its one source file).
"""

from __future__ import annotations

import io
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = ["LANGS", "Packed", "pack_directory", "scaffold"]

_GO_MOD: Final = "module {name}\n\ngo 1.21\n"
_GO_MAIN: Final = """package main

import (
	"fmt"
	"io"
	"os"
)

// The input arrives on stdin; what the function writes to stdout is the output.
// GREETING comes from the version's environment: fn register NAME DIR --env GREETING=hi
func main() {
	in, err := io.ReadAll(os.Stdin)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	greeting := os.Getenv("GREETING")
	if greeting == "" {
		greeting = "hello"
	}
	fmt.Printf("%s, %s\\n", greeting, in)
}
"""
_C_MAIN: Final = """#include <stdio.h>

/* The input arrives on stdin; what the function writes to stdout is the output. */
int main(void) {
    char buf[4096];
    size_t n = fread(buf, 1, sizeof buf, stdin);
    printf("hello, %.*s\\n", (int)n, buf);
    return 0;
}
"""
_ZIG_MAIN: Final = """const std = @import("std");

// zig 0.17 (the server's toolchain): main takes std.process.Init for its Io.
// The input arrives on stdin; what the function writes to stdout is the output.
pub fn main(init: std.process.Init) !void {
    const io = init.io;
    var buf: [4096]u8 = undefined;
    var vec = [_][]u8{buf[0..]};
    var n: usize = 0;
    while (n < buf.len) {
        vec[0] = buf[n..];
        const got = std.Io.File.stdin().readStreaming(io, &vec) catch |err| switch (err) {
            error.EndOfStream => break,
            else => return err,
        };
        n += got;
    }
    const out = std.Io.File.stdout();
    try out.writeStreamingAll(io, "hello, ");
    try out.writeStreamingAll(io, buf[0..n]);
    try out.writeStreamingAll(io, "\\n");
}
"""
_WAT_MAIN: Final = """;; A WASI command: reads up to 4 KiB of stdin, writes "hello, " and it to stdout.
(module
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 64) "hello, ")
  (data (i32.const 72) "\\n")
  (func (export "_start")
    ;; iovec at 0 -> 1024..5120; the count read lands at 16
    (i32.store (i32.const 0) (i32.const 1024))
    (i32.store (i32.const 4) (i32.const 4096))
    (drop (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 16)))
    ;; three iovecs at 32: "hello, ", the input, "\\n"
    (i32.store (i32.const 32) (i32.const 64))
    (i32.store (i32.const 36) (i32.const 7))
    (i32.store (i32.const 40) (i32.const 1024))
    (i32.store (i32.const 44) (i32.load (i32.const 16)))
    (i32.store (i32.const 48) (i32.const 72))
    (i32.store (i32.const 52) (i32.const 1))
    (drop (call $fd_write (i32.const 1) (i32.const 32) (i32.const 3) (i32.const 20)))))
"""

#: What ``fn new`` writes per language (file name -> template).
LANGS: Final[dict[str, dict[str, str]]] = {
    "go": {"go.mod": _GO_MOD, "main.go": _GO_MAIN},
    "c": {"main.c": _C_MAIN},
    "zig": {"main.zig": _ZIG_MAIN},
    "wat": {"main.wat": _WAT_MAIN},
}
#: Source files a folder may hold one of (``fn register NAME DIR``).
_SOURCES: Final = (".go", ".c", ".zig", ".wat", ".wasm")
#: A Go module's zip: bounds that keep ``fn register DIR`` from packing a home directory.
MAX_FILES: Final = 10_000
MAX_BYTES: Final = 64 << 20


def scaffold(name: str, lang: str, directory: Path) -> list[Path]:
    """Write a working function of ``lang`` and a README into ``directory`` (new or empty);
    return the files written. FileExistsError if the directory holds anything."""
    if directory.exists() and any(directory.iterdir()):
        raise FileExistsError(f"{directory} exists and is not empty")
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, template in LANGS[lang].items():
        path = directory / filename
        path.write_text(template.replace("{name}", name))
        written.append(path)
    readme = directory / "README.md"
    readme.write_text(
        f"# {name}\n\nA {lang} function for fnserver: its input is stdin, its output stdout.\n\n"
        f"Register it and call it:\n\n```sh\nfn register {name} {directory}\n"
        f"fn invoke {name} --input world    # hello, world\n```\n"
    )
    written.append(readme)
    return written


@dataclass(frozen=True)
class Packed:
    """What ``fn register`` uploads for a directory: the bytes and the file name they go by."""

    data: bytes | None
    path: str | None
    filename: str
    what: str


def pack_directory(directory: Path) -> Packed:
    """A Go module (``go.mod`` at the top) zipped, or the folder's one source file; ValueError
    (with what was found) otherwise."""
    if (directory / "go.mod").is_file():
        return Packed(_zip_module(directory), None, f"{directory.resolve().name or 'module'}.zip", "a Go module, zipped")
    sources = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in _SOURCES)
    if len(sources) == 1:
        return Packed(None, str(sources[0]), sources[0].name, f"its one source file, {sources[0].name}")
    if sources:
        found = ", ".join(p.name for p in sources)
    else:
        # Say what is there instead, so a wrong folder is plain to see.
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in directory.iterdir())
        listed = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        found = f"no .go, .c, .zig, .wat or .wasm file ({listed or 'the folder is empty'})"
    raise ValueError(
        f"cannot tell what to upload from {directory}: it needs a go.mod (a Go module) or exactly"
        f" one source file (.go, .c, .zig, .wat, .wasm); found {found}"
    )


def _zip_module(root: Path) -> bytes:
    buf = io.BytesIO()
    files = 0
    total = 0
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for folder, dirs, names in os.walk(root):
            # Hidden entries (.git, editor state) are never part of a function.
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for filename in sorted(names):
                path = Path(folder) / filename
                if filename.startswith(".") or path.is_symlink() or not path.is_file():
                    continue
                files += 1
                total += path.stat().st_size
                if files > MAX_FILES or total > MAX_BYTES:
                    raise ValueError(
                        f"{root} holds over {MAX_FILES} files or {MAX_BYTES >> 20} MiB: is it the module's folder?"
                    )
                zf.write(path, path.relative_to(root).as_posix())
    return buf.getvalue()
