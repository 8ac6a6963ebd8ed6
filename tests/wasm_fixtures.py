"""Tiny WASI command modules written in WAT, as plain functions returning wasm bytes.

Shared by the exec tests and the integration tests. Every module imports only from
``wasi_snapshot_preview1`` and exports ``memory`` and ``_start``.
"""

from __future__ import annotations

import wasmtime

__all__ = [
    "argv_echo",
    "echo",
    "exit_code",
    "grow_forever",
    "infinite_loop",
    "recurse_forever",
    "sleep",
    "stdout_flood",
    "wat",
]

_FD_WRITE = (
    '(import "wasi_snapshot_preview1" "fd_write"'
    " (func $fd_write (param i32 i32 i32 i32) (result i32)))"
)
_FD_READ = (
    '(import "wasi_snapshot_preview1" "fd_read"'
    " (func $fd_read (param i32 i32 i32 i32) (result i32)))"
)
_PROC_EXIT = '(import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))'


def wat(source: str) -> bytes:
    """Compile WAT text to wasm bytes."""
    return bytes(wasmtime.wat2wasm(source))


def echo() -> bytes:
    """Copy stdin to stdout, 64 KiB at a time, then return (exit 0)."""
    return wat(f"""(module
  {_FD_READ} {_FD_WRITE}
  (memory (export "memory") 2)
  (func (export "_start")
    (local $n i32)
    {_ECHO_LOOP}))""")


#: stdin to stdout, 64 KiB at a time, until EOF: iovec at 0 (buf 1024, len 65536), nread and
#: nwritten at 16; needs fd_read, fd_write, a local $n and two pages of memory.
_ECHO_LOOP = """(loop $more
      (i32.store (i32.const 0) (i32.const 1024))
      (i32.store (i32.const 4) (i32.const 65536))
      (drop (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 16)))
      (local.set $n (i32.load (i32.const 16)))
      (if (i32.gt_u (local.get $n) (i32.const 0))
        (then
          (i32.store (i32.const 4) (local.get $n))
          (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 16)))
          (br $more))))"""


def exit_code(code: int) -> bytes:
    """Write "bye" to stdout and "oops" to stderr, then proc_exit(code)."""
    return wat(f"""(module
  {_FD_WRITE} {_PROC_EXIT}
  (memory (export "memory") 1)
  (data (i32.const 32) "bye")
  (data (i32.const 48) "oops")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 32))
    (i32.store (i32.const 4) (i32.const 3))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 16)))
    (i32.store (i32.const 0) (i32.const 48))
    (i32.store (i32.const 4) (i32.const 4))
    (drop (call $fd_write (i32.const 2) (i32.const 0) (i32.const 1) (i32.const 16)))
    (call $proc_exit (i32.const {code}))))""")


def argv_echo() -> bytes:
    """Write each argv entry followed by a newline."""
    return wat(f"""(module
  {_FD_WRITE}
  (import "wasi_snapshot_preview1" "args_sizes_get"
    (func $args_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_get" (func $args_get (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  ;; argc at 0, buf size at 4, argv pointers at 1024, strings at 8192
  (func $strlen (param $p i32) (result i32)
    (local $n i32)
    (block $done (loop $l
      (br_if $done (i32.eqz (i32.load8_u (i32.add (local.get $p) (local.get $n)))))
      (local.set $n (i32.add (local.get $n) (i32.const 1)))
      (br $l)))
    (local.get $n))
  (func (export "_start")
    (local $i i32) (local $p i32) (local $len i32)
    (drop (call $args_sizes_get (i32.const 0) (i32.const 4)))
    (drop (call $args_get (i32.const 1024) (i32.const 8192)))
    (block $done (loop $l
      (br_if $done (i32.ge_u (local.get $i) (i32.load (i32.const 0))))
      (local.set $p (i32.load (i32.add (i32.const 1024) (i32.mul (local.get $i) (i32.const 4)))))
      (local.set $len (call $strlen (local.get $p)))
      ;; replace the NUL with a newline and write the string
      (i32.store8 (i32.add (local.get $p) (local.get $len)) (i32.const 10))
      (i32.store (i32.const 16) (local.get $p))
      (i32.store (i32.const 20) (i32.add (local.get $len) (i32.const 1)))
      (drop (call $fd_write (i32.const 1) (i32.const 16) (i32.const 1) (i32.const 24)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $l)))))""")


def infinite_loop() -> bytes:
    """Spin forever in pure wasm (stopped only by epoch interruption)."""
    return wat("""(module
  (memory (export "memory") 1)
  (func (export "_start") (loop $l (br $l))))""")


def grow_forever() -> bytes:
    """Grow memory one page at a time until memory.grow fails, then trap (unreachable)."""
    return wat("""(module
  (memory (export "memory") 1)
  (func (export "_start")
    (loop $l
      (br_if $l (i32.ne (memory.grow (i32.const 1)) (i32.const -1))))
    unreachable))""")


def sleep(seconds: float) -> bytes:
    """Block in poll_oneoff on a relative clock subscription (epochs cannot stop this)."""
    ns = int(seconds * 1e9)
    return wat(f"""(module
  (import "wasi_snapshot_preview1" "poll_oneoff"
    (func $poll_oneoff (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  ;; subscription at 0 (48 bytes): userdata u64, tag u8=0 (clock) at 8,
  ;; clock id u32 at 16 (1 = monotonic), timeout u64 at 24, precision u64 at 32, flags u16 at 40
  (func (export "_start")
    (i64.store (i32.const 0) (i64.const 7))
    (i32.store8 (i32.const 8) (i32.const 0))
    (i32.store (i32.const 16) (i32.const 1))
    (i64.store (i32.const 24) (i64.const {ns}))
    (i64.store (i32.const 32) (i64.const 0))
    (i32.store16 (i32.const 40) (i32.const 0))
    (drop (call $poll_oneoff (i32.const 0) (i32.const 256) (i32.const 1) (i32.const 512)))))""")


def recurse_forever() -> bytes:
    """Unbounded recursion: traps with a stack overflow."""
    return wat("""(module
  (memory (export "memory") 1)
  (func $f (param i32) (result i32)
    (i32.add (call $f (i32.add (local.get 0) (i32.const 1))) (i32.const 1)))
  (func (export "_start") (drop (call $f (i32.const 0)))))""")


def stdout_flood() -> bytes:
    """Write 64 KiB blocks to stdout forever, ignoring write errors."""
    return wat(f"""(module
  {_FD_WRITE}
  (memory (export "memory") 2)
  (func (export "_start")
    (memory.fill (i32.const 1024) (i32.const 120) (i32.const 65536))
    (loop $l
      (i32.store (i32.const 0) (i32.const 1024))
      (i32.store (i32.const 4) (i32.const 65536))
      (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 16)))
      (br $l))))""")


def big_minimum_memory(pages: int) -> bytes:
    """Declare a minimum linear memory of ``pages`` 64 KiB pages, then exit 0 (never runs
    when the minimum exceeds the Store's memory limit: instantiation fails)."""
    return wat(f"""(module
  (memory (export "memory") {pages})
  (func (export "_start")))""")


def grow_then_exit(pages: int) -> bytes:
    """Start with 1 page, grow by ``pages`` pages (trap if refused), then return (exit 0)."""
    return wat(f"""(module
  (memory (export "memory") 1)
  (func (export "_start")
    (if (i32.eq (memory.grow (i32.const {pages})) (i32.const -1)) (then unreachable))))""")


def stderr_flood() -> bytes:
    """Write 64 KiB blocks to stderr forever, ignoring write errors."""
    return wat(f"""(module
  {_FD_WRITE}
  (memory (export "memory") 2)
  (func (export "_start")
    (memory.fill (i32.const 1024) (i32.const 101) (i32.const 65536))
    (loop $l
      (i32.store (i32.const 0) (i32.const 1024))
      (i32.store (i32.const 4) (i32.const 65536))
      (drop (call $fd_write (i32.const 2) (i32.const 0) (i32.const 1) (i32.const 16)))
      (br $l))))""")


def many_iovecs(count: int, length: int) -> bytes:
    """One ``fd_write`` to stdout of ``count`` iovecs, each ``length`` bytes of "y" (all the
    same buffer; ``length`` 0: the iovecs are the zeroed memory, nothing is filled in), then
    "done" to stdout and a return (exit 0). The iovec array starts at 64 KiB; memory is sized
    to hold it."""
    assert 0 <= length <= 60_000
    pages = (65536 + count * 8 + 65535) // 65536
    fill = (
        ""
        if length == 0
        else f"""
    (memory.fill (i32.const 1024) (i32.const 121) (i32.const {length}))
    (block $done (loop $l
      (br_if $done (i32.ge_u (local.get $i) (i32.const {count})))
      (local.set $p (i32.add (i32.const 65536) (i32.shl (local.get $i) (i32.const 3))))
      (i32.store (local.get $p) (i32.const 1024))
      (i32.store offset=4 (local.get $p) (i32.const {length}))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $l)))"""
    )
    return wat(f"""(module
  {_FD_WRITE}
  (memory (export "memory") {pages})
  (data (i32.const 64) "done")
  (func (export "_start")
    (local $i i32) (local $p i32)
    {fill}
    (drop (call $fd_write (i32.const 1) (i32.const 65536) (i32.const {count}) (i32.const 16)))
    (i32.store (i32.const 0) (i32.const 64))
    (i32.store (i32.const 4) (i32.const 4))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 16)))))""")


def iovecs_past_memory() -> bytes:
    """One ``fd_write`` whose iovec count (0xFFFFFFFF) runs far past the end of memory."""
    return wat(f"""(module
  {_FD_WRITE}
  (memory (export "memory") 1)
  (func (export "_start")
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const -1) (i32.const 16)))))""")


def spin_then_write(iterations: int) -> bytes:
    """Write "begin\\n", count to ``iterations`` in a wasm loop, then write "end\\n" (exit 0)."""
    return wat(f"""(module
  {_FD_WRITE}
  (memory (export "memory") 1)
  (data (i32.const 32) "begin\\n")
  (data (i32.const 48) "end\\n")
  (func (export "_start")
    (local $i i32)
    (i32.store (i32.const 0) (i32.const 32))
    (i32.store (i32.const 4) (i32.const 6))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 16)))
    (loop $l
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $l (i32.lt_u (local.get $i) (i32.const {iterations}))))
    (i32.store (i32.const 0) (i32.const 48))
    (i32.store (i32.const 4) (i32.const 4))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 16)))))""")


def _sleep_then(seconds: float, then: str) -> bytes:
    ns = int(seconds * 1e9)
    return wat(f"""(module
  (import "wasi_snapshot_preview1" "poll_oneoff"
    (func $poll_oneoff (param i32 i32 i32 i32) (result i32)))
  {_FD_WRITE} {_FD_READ}
  (memory (export "memory") 2)
  (data (i32.const 1024) "woke\\n")
  (func (export "_start")
    (local $n i32)
    (i64.store (i32.const 0) (i64.const 7))
    (i32.store8 (i32.const 8) (i32.const 0))
    (i32.store (i32.const 16) (i32.const 1))
    (i64.store (i32.const 24) (i64.const {ns}))
    (i64.store (i32.const 32) (i64.const 0))
    (i32.store16 (i32.const 40) (i32.const 0))
    (drop (call $poll_oneoff (i32.const 0) (i32.const 256) (i32.const 1) (i32.const 512)))
    {then}))""")


def sleep_then_write(seconds: float) -> bytes:
    """Sleep ``seconds`` in poll_oneoff, then write "woke\\n" to stdout (exit 0)."""
    return _sleep_then(
        seconds,
        """(i32.store (i32.const 64) (i32.const 1024))
    (i32.store (i32.const 68) (i32.const 5))
    (drop (call $fd_write (i32.const 1) (i32.const 64) (i32.const 1) (i32.const 80)))""",
    )


def sleep_then_echo(seconds: float) -> bytes:
    """Sleep ``seconds`` in poll_oneoff, then copy stdin to stdout (exit 0): every call answers
    with its own input, so one call's result cannot pass for another's."""
    return _sleep_then(seconds, _ECHO_LOOP)


def sleep_then_trap(seconds: float) -> bytes:
    """Sleep ``seconds`` in poll_oneoff, then trap (unreachable)."""
    return _sleep_then(seconds, "unreachable")
