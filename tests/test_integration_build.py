"""Issue 3 end to end: uploads of every kind built and run through a real server and the `fn` CLI.

Every test starts its own server, but all of them share one data directory (and so one build
cache, ``<data-dir>/.cache``): Go's build cache and zig's wasi-libc are built once per module.
Function names are therefore unique per test.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import fnclient
import pytest
from fnclient import AsyncClient

from fnserver.config import ServerConfig

from .conftest import ServerHandle, run_fn

HELLO_GO = """package main

import (
	"fmt"
	"io"
	"os"
)

func main() {
	in, _ := io.ReadAll(os.Stdin)
	fmt.Printf("hello, %s\\n", in)
}
"""

# Line 9, column 6 is the 'P' of Printn: go reports `./main.go:9:6: undefined: fmt.Printn`.
TYPO_GO = """package main

import (
	"fmt"
	"os"
)

func main() {
	fmt.Printn("oops")
	os.Exit(0)
}
"""

THIRD_PARTY_GO = """package main

import "github.com/google/uuid"

func main() { println(uuid.NewString()) }
"""

# A module as `go mod vendor` would leave it, written by hand: one requirement, vendored.
MODULE_FILES = {
    "go.mod": "module example.com/shout\n\ngo 1.22\n\nrequire example.com/upper v1.2.3\n",
    "cmd/shout/main.go": """package main

import (
	"fmt"
	"io"
	"os"

	"example.com/shout/internal/bang"
	"example.com/upper"
)

func main() {
	in, _ := io.ReadAll(os.Stdin)
	fmt.Println(bang.Add(upper.Up(string(in))))
}
""",
    "internal/bang/bang.go": "package bang\n\nfunc Add(s string) string { return s + \"!\" }\n",
    "vendor/modules.txt": "# example.com/upper v1.2.3\n## explicit; go 1.22\nexample.com/upper\n",
    "vendor/example.com/upper/go.mod": "module example.com/upper\n\ngo 1.22\n",
    "vendor/example.com/upper/upper.go": """package upper

import "strings"

func Up(s string) string { return "vendored " + strings.ToUpper(s) }
""",
}

HELLO_C = """#include <ctype.h>
#include <stdio.h>

int main(void) {
    char buf[256];
    size_t n = fread(buf, 1, sizeof buf - 1, stdin);
    for (size_t i = 0; i < n; i++) buf[i] = (char)toupper((unsigned char)buf[i]);
    buf[n] = 0;
    printf("c says %s\\n", buf);
    return 0;
}
"""

# zig 0.17: main takes std.process.Init for its Io; reads stdin to EOF, writes to stdout.
HELLO_ZIG = """const std = @import("std");

pub fn main(init: std.process.Init) !void {
    const io = init.io;
    var buf: [256]u8 = undefined;
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
    try out.writeStreamingAll(io, "zig says ");
    try out.writeStreamingAll(io, buf[0..n]);
    try out.writeStreamingAll(io, "\\n");
}
"""

# A static native executable: echo stdin with a prefix, argv[1] as the exit code.
NATIVE_C = """#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv) {
    char buf[4096];
    ssize_t n;
    write(1, "native: ", 8);
    while ((n = read(0, buf, sizeof buf)) > 0) write(1, buf, (size_t)n);
    return argc > 1 ? atoi(argv[1]) : 0;
}
"""

_REGISTERED_RE = re.compile(
    r"registered (?P<name>[a-z0-9-]+) version (?P<version>\d+)"
    r" \((?P<kind>[a-z-]+), (?P<artifacts>[a-z+]+), built in \d+\.\d s\)\n"
)


# -- fixtures and helpers ------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("integration-build") / "data"


@pytest.fixture
def server_config(shared_data_dir: Path) -> ServerConfig:
    """conftest's config, but on the module's data dir so the build caches are shared."""
    return ServerConfig(
        port=0,
        data_dir=shared_data_dir,
        workers=2,
        warm_builds=False,
        shutdown_grace_s=1.0,
    )


def _zip(files: dict[str, str], prefix: str = "") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, text in files.items():
            zf.writestr(prefix + name, text)
    return buf.getvalue()


def _write(tmp_path: Path, name: str, data: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def _registered(out: bytes) -> dict[str, str]:
    m = _REGISTERED_RE.fullmatch(out.decode())
    assert m is not None, out
    return m.groupdict()


async def _get_json(address: str, name: str) -> dict[str, Any]:
    code, out, err = await run_fn(address, "get", name, "--json")
    assert (code, err) == (0, b"")
    return json.loads(out)


async def _list_names(address: str) -> list[str]:
    code, out, err = await run_fn(address, "list", "--json")
    assert (code, err) == (0, b"")
    return [f["name"] for f in json.loads(out)]


def _assert_nothing_left(handle: ServerHandle, name: str) -> None:
    data = handle.config.data_dir
    assert not (data / name).exists()
    assert list((data / ".staging").iterdir()) == []
    assert list((data / ".cache" / "tmp").iterdir()) == []


def _assert_no_server_paths(text: str, handle: ServerHandle) -> None:
    for leak in ("/tmp", "/work", "site-packages", str(handle.config.data_dir), "<build>",
                 "<cache>"):
        assert leak not in text, (leak, text)


# -- Go: single file -----------------------------------------------------------------------


@pytest.mark.slow
async def test_go_file_cli_wasm_and_native(handle: ServerHandle, client: AsyncClient,
                                           tmp_path: Path) -> None:
    addr = handle.address
    src = _write(tmp_path, "hello.go", HELLO_GO)
    code, out, err = await run_fn(addr, "register", "hello", str(src))
    assert code == 0, err
    assert _registered(out) == {"name": "hello", "version": "1", "kind": "go",
                                "artifacts": "wasm+native"}
    toolchain = (await _get_json(addr, "hello"))["versions"][0]["toolchain"]
    assert re.fullmatch(r"go1\.\d+(\.\d+)?", toolchain)
    # Redirected, progress is plain lines on stderr, each with its elapsed time (issue 12: a
    # piped Go register must not look hung), and only once the work takes seconds.
    assert all(re.match(rb"\[ *\d+\.\ds\] ", line) for line in err.splitlines()), err

    assert await run_fn(addr, "invoke", "hello", "--input", "world") == (0, b"hello, world\n", b"")
    assert await run_fn(addr, "invoke", "hello", "--mode", "native", "--input", "world") == (
        0, b"hello, world\n", b"")
    assert await run_fn(addr, "invoke", "hello", input=b"stdin") == (0, b"hello, stdin\n", b"")

    code, out, err = await run_fn(addr, "invoke", "hello", "--mode", "native", "--json",
                                  "--input", "json")
    assert (code, err) == (0, b"")
    res = json.loads(out)
    assert (res["output"], res["mode"], res["exit_code"], res["version"]) == (
        "hello, json\n", "native", 0, 1)

    info = await _get_json(addr, "hello")
    assert (info["name"], info["latest"], info["aliases"]) == ("hello", 1, {})
    [meta] = info["versions"]
    assert (meta["kind"], meta["artifacts"], meta["mode"], meta["filename"]) == (
        "go", ["wasm", "native"], "wasm", "hello.go")
    assert meta["toolchain"] == toolchain
    assert isinstance(meta["build_ms"], int) and meta["build_ms"] > 0
    vdir = handle.config.data_dir / "hello" / "1"
    assert (vdir / "main.wasm").is_file() and (vdir / "main.bin").is_file()
    assert (vdir / "main.bin").stat().st_mode & 0o111

    # The human-readable `fn get` shows the same facts: a table of versions, one in full.
    code, out, err = await run_fn(addr, "get", "hello")
    assert (code, err) == (0, b"")
    header, row = out.splitlines()[1:3]
    assert header.split() == [b"VERSION", b"CREATED", b"KIND", b"ARTIFACTS", b"SIZE", b"TIMEOUT", b"MEMORY", b"FUEL", b"ALIASES", b"ENV"]
    assert row.split()[0] == b"1" and b" go " in row and b" wasm+native " in row
    code, out, err = await run_fn(addr, "get", "hello@1")
    assert (code, err) == (0, b"")
    assert b"    kind go, artifacts wasm+native, mode wasm\n" in out
    assert f"    toolchain {toolchain}, built in ".encode() in out

    # The client library: both modes, same output.
    wasm = await client.invoke("hello", b"lib")
    native = await client.invoke("hello", b"lib", mode="native")
    assert (wasm.output, wasm.mode, wasm.exit_code) == (b"hello, lib\n", "wasm", 0)
    assert (native.output, native.mode, native.exit_code) == (b"hello, lib\n", "native", 0)

    # Progress: the register callback sees the upload, the build and the precompile.
    events: list[dict[str, Any]] = []
    meta2 = await client.register("hello", src, progress=events.append)
    assert meta2["version"] == 2
    stages = [e["stage"] for e in events]
    assert all(e["event"] == "progress" for e in events)
    assert "upload" in stages
    assert [s for s in stages if s != "upload"] == ["build", "compile"]
    assert [e["message"] for e in events if e["stage"] != "upload"] == [
        f"building wasm and native ({toolchain})", "precompiling the WebAssembly module"]
    assert stages.index("build") > max(i for i, s in enumerate(stages) if s == "upload")
    last_upload = [e for e in events if e["stage"] == "upload"][-1]
    assert last_upload["received"] == last_upload["size"] == len(HELLO_GO)
    code, out, err = await run_fn(addr, "register", "hello", str(src), "--quiet")
    assert (code, err) == (0, b""), err

    # Go's runtime reserves address space it never uses: with memory counted by a cgroup (not
    # RLIMIT_DATA) a Go native function runs with 32 MiB.
    assert handle.server is not None
    sandbox = handle.server.pool.stats()["sandbox"]
    if all(s.get("uid") is not None for s in sandbox) and not any(
        r.startswith("memory cgroup") for s in sandbox for r in s["refused"]
    ):
        await client.register("hello", src, memory_mb=32)
        small = await client.invoke("hello", b"small", mode="native")
        assert (small.output, small.exit_code) == (b"hello, small\n", 0), small.stderr


@pytest.mark.slow
async def test_go_typo_is_build_failed_with_the_compilers_message(
    handle: ServerHandle, client: AsyncClient, tmp_path: Path
) -> None:
    addr = handle.address
    src = _write(tmp_path, "main.go", TYPO_GO)
    code, out, err = await run_fn(addr, "register", "typo", str(src))
    text = err.decode()
    assert (code, out) == (125, b""), text
    assert text.startswith("error: BUILD_FAILED: ")
    assert text.splitlines()[0] in ("error: BUILD_FAILED: go build failed (wasm)",
                                    "error: BUILD_FAILED: go build failed (native)")
    assert "main.go:9:6: undefined: fmt.Printn" in text
    _assert_no_server_paths(text, handle)

    # The same through the library: the log is in details.
    with pytest.raises(fnclient.BuildError) as info:
        await client.register("typo", src)
    assert "main.go:9:6: undefined: fmt.Printn" in info.value.details["log"]
    _assert_no_server_paths(info.value.details["log"], handle)

    # Nothing stored, and the failures consumed no version number.
    assert "typo" not in await _list_names(addr)
    _assert_nothing_left(handle, "typo")
    code, out, err = await run_fn(addr, "invoke", "typo", "--input", "x")
    assert (code, out) == (125, b"") and err.startswith(b"error: NOT_FOUND: ")
    fixed = _write(tmp_path, "main.go", TYPO_GO.replace("Printn", "Println"))
    code, out, err = await run_fn(addr, "register", "typo", str(fixed))
    assert code == 0, err
    assert _registered(out)["version"] == "1"
    assert await run_fn(addr, "invoke", "typo") == (0, b"oops\n", b"")


@pytest.mark.slow
async def test_go_file_importing_a_third_party_package(handle: ServerHandle,
                                                       tmp_path: Path) -> None:
    src = _write(tmp_path, "uuid.go", THIRD_PARTY_GO)
    code, out, err = await run_fn(handle.address, "register", "uuidfn", str(src))
    assert (code, out) == (125, b"")
    assert err.decode().splitlines()[0] == (
        "error: BUILD_FAILED: package github.com/google/uuid is not in the standard library; "
        "a single .go upload may only import the standard library "
        "(zip a module with `go mod vendor` instead)"
    )
    _assert_no_server_paths(err.decode(), handle)
    _assert_nothing_left(handle, "uuidfn")


# -- Go: zipped modules --------------------------------------------------------------------


@pytest.mark.slow
async def test_go_module_cmd_layout_vendored_in_top_folder(handle: ServerHandle,
                                                           tmp_path: Path) -> None:
    addr = handle.address
    # The module inside one top-level folder, as `zip -r shout.zip shout/` makes it.
    archive = _write(tmp_path, "shout.zip", _zip(MODULE_FILES, prefix="shout/"))
    code, out, err = await run_fn(addr, "register", "shout", str(archive))
    assert code == 0, err
    assert _registered(out) == {"name": "shout", "version": "1", "kind": "go-module",
                                "artifacts": "wasm+native"}
    expected = b"vendored HEY!\n"
    assert await run_fn(addr, "invoke", "shout", "--input", "hey") == (0, expected, b"")
    assert await run_fn(addr, "invoke", "shout", "--input", "hey", "--mode", "native") == (
        0, expected, b"")
    [meta] = (await _get_json(addr, "shout"))["versions"]
    assert (meta["kind"], meta["artifacts"], meta["mode"], meta["filename"]) == (
        "go-module", ["wasm", "native"], "wasm", "shout.zip")

    # The same module at the zip root, main package at the root instead of cmd/.
    files = {("main.go" if k == "cmd/shout/main.go" else k): v for k, v in MODULE_FILES.items()}
    archive = _write(tmp_path, "flat.zip", _zip(files))
    code, out, err = await run_fn(addr, "register", "shout", str(archive))
    assert code == 0, err
    assert _registered(out)["version"] == "2"
    assert await run_fn(addr, "invoke", "shout@2", "--input", "yo", "--mode", "native") == (
        0, b"vendored YO!\n", b"")


async def test_go_module_not_vendored_fails_fast(handle: ServerHandle, tmp_path: Path) -> None:
    files = {k: v for k, v in MODULE_FILES.items() if not k.startswith("vendor/")}
    archive = _write(tmp_path, "novendor.zip", _zip(files))
    code, out, err = await run_fn(handle.address, "register", "novendor", str(archive))
    assert (code, out) == (125, b"")
    assert err == (
        b"error: BUILD_FAILED: dependency example.com/upper is not vendored; run `go mod vendor` "
        b"before zipping (the server has no network)\n"
    )
    assert "novendor" not in await _list_names(handle.address)
    _assert_nothing_left(handle, "novendor")


async def test_zip_slip_is_refused_and_writes_nothing(handle: ServerHandle, client: AsyncClient,
                                                      tmp_path: Path) -> None:
    files = {"go.mod": "module example.com/evil\n\ngo 1.22\n",
             "main.go": HELLO_GO,
             "../evil.go": "package main\n"}
    archive = _write(tmp_path, "evil.zip", _zip(files))
    data_dir = handle.config.data_dir
    outside = data_dir.parent
    before = sorted(p for p in outside.rglob("*") if not p.is_relative_to(data_dir))

    code, out, err = await run_fn(handle.address, "register", "evil", str(archive))
    assert (code, out) == (125, b"")
    assert err == b"error: INVALID_ARGUMENT: archive entry '../evil.go' escapes the archive root\n"
    with pytest.raises(fnclient.InvalidArgumentError) as info:
        await client.register("evil", archive)
    assert info.value.details == {"entry": "../evil.go"}

    assert "evil" not in await _list_names(handle.address)
    _assert_nothing_left(handle, "evil")
    assert not list(data_dir.rglob("evil.go"))
    after = sorted(p for p in outside.rglob("*") if not p.is_relative_to(data_dir))
    assert after == before


# -- C and Zig -----------------------------------------------------------------------------


@pytest.mark.slow
async def test_c_function(handle: ServerHandle, tmp_path: Path) -> None:
    addr = handle.address
    src = _write(tmp_path, "upper.c", HELLO_C)
    code, out, err = await run_fn(addr, "register", "upper", str(src))
    assert code == 0, err
    assert _registered(out) == {"name": "upper", "version": "1", "kind": "c",
                                "artifacts": "wasm"}
    assert await run_fn(addr, "invoke", "upper", "--input", "abc") == (0, b"c says ABC\n", b"")
    [meta] = (await _get_json(addr, "upper"))["versions"]
    assert (meta["kind"], meta["artifacts"], meta["mode"]) == ("c", ["wasm"], "wasm")
    assert re.fullmatch(r"zig \d+\.\d+\.\d+.*", meta["toolchain"])
    code, out, err = await run_fn(addr, "invoke", "upper", "--mode", "native")
    assert (code, out) == (125, b"")
    assert err == (b"error: INVALID_ARGUMENT: function 'upper' version 1 has no native artifact"
                   b" (it has: wasm)\n")


@pytest.mark.slow
async def test_zig_function(handle: ServerHandle, tmp_path: Path) -> None:
    addr = handle.address
    src = _write(tmp_path, "hello.zig", HELLO_ZIG)
    code, out, err = await run_fn(addr, "register", "ziggy", str(src))
    assert code == 0, err
    assert _registered(out) == {"name": "ziggy", "version": "1", "kind": "zig",
                                "artifacts": "wasm"}
    assert await run_fn(addr, "invoke", "ziggy", "--input", "hi") == (0, b"zig says hi\n", b"")
    [meta] = (await _get_json(addr, "ziggy"))["versions"]
    assert (meta["kind"], meta["artifacts"], meta["mode"]) == ("zig", ["wasm"], "wasm")


# -- native executables --------------------------------------------------------------------


@pytest.fixture(scope="module")
def native_elf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed")
    d = tmp_path_factory.mktemp("native")
    (d / "echo.c").write_text(NATIVE_C)
    subprocess.run([gcc, "-static", "-O2", "-o", str(d / "prog"), str(d / "echo.c")],
                   check=True, capture_output=True)
    return d / "prog"


async def test_native_elf(handle: ServerHandle, client: AsyncClient, native_elf: Path) -> None:
    addr = handle.address
    code, out, err = await run_fn(addr, "register", "nat", str(native_elf))
    assert (code, err) == (0, b"")
    assert _registered(out) == {"name": "nat", "version": "1", "kind": "native",
                                "artifacts": "native"}
    [meta] = (await _get_json(addr, "nat"))["versions"]
    assert (meta["kind"], meta["artifacts"], meta["mode"], meta["toolchain"]) == (
        "native", ["native"], "native", None)

    assert await run_fn(addr, "invoke", "nat", "--input", "hi") == (0, b"native: hi", b"")
    assert await run_fn(addr, "invoke", "nat", "--mode", "native", "--input", "x") == (
        0, b"native: x", b"")
    # The function's own exit code is fn's exit code.
    assert await run_fn(addr, "invoke", "nat", "--input", "e", "--", "7") == (7, b"native: e", b"")
    res = await client.invoke("nat", b"lib")
    assert (res.output, res.mode, res.exit_code) == (b"native: lib", "native", 0)

    code, out, err = await run_fn(addr, "invoke", "nat", "--mode", "wasm", "--input", "x")
    assert (code, out) == (125, b"")
    assert err == (b"error: INVALID_ARGUMENT: function 'nat' version 1 has no wasm artifact"
                   b" (it has: native)\n")


async def test_native_script_is_refused(handle: ServerHandle, tmp_path: Path) -> None:
    script = _write(tmp_path, "run.sh", "#!/bin/sh\necho hi\n")
    script.chmod(0o755)
    code, out, err = await run_fn(handle.address, "register", "script", str(script))
    assert (code, out) == (125, b"")
    assert err == (b"error: INVALID_ARGUMENT: not an ELF executable: "
                   b"starts with '#!' (a script for /bin/sh)\n")
    _assert_nothing_left(handle, "script")


async def test_kind_override(handle: ServerHandle, native_elf: Path, tmp_path: Path) -> None:
    addr = handle.address
    misnamed = tmp_path / "prog.wasm"
    shutil.copyfile(native_elf, misnamed)
    # By its extension it is a wasm module, which it is not...
    code, out, err = await run_fn(addr, "register", "over", str(misnamed))
    assert (code, out) == (125, b"")
    assert err.startswith(b"error: INVALID_ARGUMENT: not a WebAssembly module: starts with ")
    _assert_nothing_left(handle, "over")
    # ...and --kind says what it is.
    code, out, err = await run_fn(addr, "register", "over", str(misnamed), "--kind", "native")
    assert (code, err) == (0, b"")
    assert _registered(out) == {"name": "over", "version": "1", "kind": "native",
                                "artifacts": "native"}
    assert await run_fn(addr, "invoke", "over", "--input", "k") == (0, b"native: k", b"")
    [meta] = (await _get_json(addr, "over"))["versions"]
    assert (meta["kind"], meta["filename"]) == ("native", "prog.wasm")

    # .bin is native by default; --kind native on it is accepted too; an unknown kind is not.
    binary = tmp_path / "prog.bin"
    shutil.copyfile(native_elf, binary)
    code, out, err = await run_fn(addr, "register", "over", str(binary), "--kind", "native")
    assert (code, err) == (0, b"")
    assert _registered(out)["version"] == "2"
    code, out, err = await run_fn(addr, "register", "over", str(binary), "--kind", "rust")
    assert (code, out) == (125, b"")
    assert err.startswith(b"error: INVALID_ARGUMENT: unknown kind 'rust'")
    assert (await _get_json(addr, "over"))["latest"] == 2
