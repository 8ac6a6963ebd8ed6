"""Issue 9: builds run in a box. Hostile uploads against a real server and the real toolchains:
a build sees no host file, cannot write the shared caches, runs as an unprivileged uid, and a
few bytes of source cannot store a huge artifact. Builds and compiles share one bound, and a
register's wasm compile overlaps the native build."""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
import sys
from pathlib import Path
from typing import Any

import pytest
from fnclient import AsyncClient, BuildError, NotFoundError, TooLargeError

from fnserver._isolation import SANDBOX_UID_BASE, SANDBOX_UID_COUNT, memcg_dir
from fnserver.builder import Builder
from fnserver.builder._proc import BUILD_NICE, run_tool
from fnserver.config import ServerConfig
from fnserver.exec._compile import COMPILE_NICE
from fnserver.exec._modules import ModuleCache
from fnserver.protocol import InvalidArgumentError

from . import wasm_fixtures as wf
from .conftest import ServerHandle

ROOT = Path(__file__).resolve().parent.parent

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the build box needs root")

#: 102 bytes of Go asking for a 256 MiB initialised array (issue 9 stored a 270 MB main.bin).
HUGE_ARRAY_GO = (
    "package main\n\nimport \"fmt\"\n\nvar big = [1 << 28]byte{1}\n\n"
    "func main() { fmt.Println(big[0], len(big)) }\n"
)

HELLO_GO = """package main

import (
	"fmt"
	"io"
	"os"
)

func main() {
	b, _ := io.ReadAll(os.Stdin)
	fmt.Printf("hi %s", b)
}
"""


@pytest.fixture(scope="module")
def shared_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data dir (so one build cache: wasi-libc is compiled once) for the module."""
    return tmp_path_factory.mktemp("build-sandbox") / "data"


@pytest.fixture
def server_config(shared_data_dir: Path) -> ServerConfig:
    return ServerConfig(port=0, data_dir=shared_data_dir, workers=2, warm_builds=False,
                        shutdown_grace_s=1.0)


@pytest.fixture(scope="module")
def cache_dir(shared_data_dir: Path) -> Path:
    """The servers' build cache: the Builder tests reuse its wasi-libc."""
    return shared_data_dir / ".cache"


def _secret_lines() -> list[str]:
    """Lines of /etc/shadow worth looking for in a log (long enough to be unmistakable)."""
    text = Path("/etc/shadow").read_text()
    return [line for line in text.splitlines() if len(line) > 8]


def _cache_snapshot(cache: Path) -> dict[str, tuple[int, int]]:
    """Every file under the shared caches with its size and mtime."""
    found: dict[str, tuple[int, int]] = {}
    for sub in ("go-build", "zig"):
        for dirpath, _dirs, files in os.walk(cache / sub):
            for name in files:
                st = os.lstat(os.path.join(dirpath, name))
                found[os.path.join(dirpath, name)] = (st.st_size, st.st_mtime_ns)
    return found


# -- a build sees no host file -------------------------------------------------------------------


@needs_root
@pytest.mark.slow
async def test_include_of_etc_shadow_fails_without_its_content(client: AsyncClient) -> None:
    secret = _secret_lines()
    assert secret, "/etc/shadow has no line to look for"
    src = b'#include "/etc/shadow"\nint main(void) { return 0; }\n'
    with pytest.raises(BuildError) as ei:
        await client.register("shadow", src, filename="shadow.c")
    log = ei.value.details["log"]
    assert "'/etc/shadow' file not found" in log
    for line in secret:
        assert line not in log
    with pytest.raises(NotFoundError):
        await client.get("shadow")


@needs_root
@pytest.mark.slow
async def test_include_of_host_files_fails_without_their_content(
    client: AsyncClient, shared_data_dir: Path, tmp_path: Path
) -> None:
    # A file in the server's data dir, one in the repository checkout, one under /root: each
    # would be shown line by line in the compiler's errors if the build could open it.
    marker = "fnserver_secret_" + hashlib.sha256(os.urandom(8)).hexdigest()[:16]
    tag = hashlib.sha256(os.urandom(8)).hexdigest()[:8]  # in the names; the marker is not
    planted = [shared_data_dir / "planted.txt", ROOT / f".planted-{tag}.txt",
               Path("/root") / f".planted-{tag}.txt"]
    try:
        for path in planted:
            path.write_text(f"{marker} is here\n")
        for i, path in enumerate(planted):
            src = f'#include "{path}"\nint main(void) {{ return 0; }}\n'.encode()
            with pytest.raises(BuildError) as ei:
                await client.register(f"host{i}", src, filename="leak.c")
            log = ei.value.details["log"]
            assert "file not found" in log, log
            assert marker not in log
    finally:
        for path in planted:
            path.unlink(missing_ok=True)


@needs_root
@pytest.mark.slow
async def test_without_the_box_the_same_include_leaks(cache_dir: Path, tmp_path: Path) -> None:
    # The control for the two tests above: outside the box the compiler does show the file.
    marker = "fnserver_secret_" + hashlib.sha256(os.urandom(8)).hexdigest()[:16]
    secret = tmp_path / "secret.txt"
    secret.write_text(f"{marker} is here\n")
    up = tmp_path / "leak.c"
    up.write_text(f'#include "{secret}"\nint main(void) {{ return 0; }}\n')
    builder = Builder(cache_dir, sandbox=False)
    with pytest.raises(BuildError) as ei:
        await builder.build(up, "leak.c", tmp_path / "out")
    assert marker in ei.value.details["log"]


# -- the shared cache ----------------------------------------------------------------------------


@needs_root
@pytest.mark.slow
async def test_a_build_cannot_write_the_shared_cache(cache_dir: Path, tmp_path: Path) -> None:
    builder = Builder(cache_dir)
    try:
        assert builder.sandboxed
        # A builder's first build of each toolchain warms the cache (a trusted build of the
        # server's own source) ...
        first = tmp_path / "first.go"
        first.write_text(HELLO_GO)
        await builder.build(first, "first.go", tmp_path / "out1")
        first_c = tmp_path / "first.c"
        first_c.write_text("int main(void) { return 0; }\n")
        await builder.build(first_c, "first.c", tmp_path / "out0")
        before = _cache_snapshot(cache_dir)
        assert before, "the warm-up left nothing in the shared cache"
        # ... then an upload's builds, Go and C, whose every output is new to the cache: what
        # they write lands in their own layer and dies with them.
        unique = hashlib.sha256(os.urandom(8)).hexdigest()[:12]
        go = tmp_path / "u.go"
        go.write_text(HELLO_GO.replace('"hi %s"', f'"{unique} %s"'))
        res = await builder.build(go, "u.go", tmp_path / "out2")
        assert res.artifacts == ("wasm", "native")
        c = tmp_path / "u.c"
        c.write_text(f'#include <stdio.h>\nint main(void) {{ puts("{unique}"); return 0; }}\n')
        await builder.build(c, "u.c", tmp_path / "out3")
        assert _cache_snapshot(cache_dir) == before
        # The shared caches are root's and closed to every other host user.
        for sub in ("go-build", "zig"):
            st = os.lstat(cache_dir / sub)
            assert st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o700
    finally:
        builder.close()


@needs_root
@pytest.mark.slow
async def test_builds_run_as_an_unprivileged_build_uid(cache_dir: Path, tmp_path: Path) -> None:
    # The compiler's own output file, seen while the build is still in its scratch dir (the
    # callback runs before the scratch dir is removed), belongs to the uid it ran as.
    builder = Builder(cache_dir)
    owners: dict[str, set[int]] = {}

    def seen(kind: str, path: Path) -> None:
        for scratch in (cache_dir / "tmp").glob("build-*"):
            for built in (scratch / "out").iterdir():
                owners.setdefault(built.name, set()).add(os.lstat(built).st_uid)
        assert os.lstat(path).st_uid == 0  # the copy the server keeps is its own

    try:
        up = tmp_path / "hello.go"
        up.write_text(HELLO_GO)
        await builder.build(up, "hello.go", tmp_path / "out", on_artifact=seen)
    finally:
        builder.close()
    assert "main.wasm" in owners
    uids = set().union(*owners.values())
    assert len(uids) == 1
    [uid] = uids
    assert SANDBOX_UID_BASE <= uid < SANDBOX_UID_BASE + SANDBOX_UID_COUNT


@needs_root
async def test_build_uids_are_claimed_apart_from_other_builders(cache_dir: Path) -> None:
    a, b = Builder(cache_dir, max_concurrent=2), Builder(cache_dir, max_concurrent=2)
    try:
        ua = {await a._take_uid() for _ in range(2)}  # noqa: SLF001
        ub = {await b._take_uid() for _ in range(2)}  # noqa: SLF001
        assert len(ua) == len(ub) == 2 and not ua & ub
    finally:
        a.close()
        b.close()


# -- artifact size -------------------------------------------------------------------------------


@pytest.mark.slow
async def test_a_huge_array_go_source_is_too_large_and_nothing_is_installed(
    client: AsyncClient, handle: ServerHandle
) -> None:
    src = HUGE_ARRAY_GO.encode()
    assert len(src) == 102
    with pytest.raises(TooLargeError) as ei:
        await client.register("huge", src, filename="huge.go")
    assert ei.value.details["artifact"] == "native"
    assert ei.value.details["size"] > 1 << 28
    assert "--max-artifact-mb" in ei.value.message
    with pytest.raises(NotFoundError):
        await client.get("huge")
    assert not (handle.config.data_dir / "huge").exists()
    staging = handle.config.data_dir / ".staging"
    assert not staging.exists() or os.listdir(staging) == []


# -- memory --------------------------------------------------------------------------------------


@needs_root
@pytest.mark.slow
async def test_build_memory_is_counted_by_a_cgroup_and_says_so(cache_dir: Path,
                                                                tmp_path: Path) -> None:
    builder = Builder(cache_dir, memory_mb=48)
    try:
        up = tmp_path / "hello.go"
        up.write_text(HELLO_GO)
        with pytest.raises(BuildError, match="ran out of memory: it needed over the 48 MiB"):
            await builder.build(up, "hello.go", tmp_path / "out")
        uids = list(builder._free_uids)  # noqa: SLF001
    finally:
        builder.close()
    assert not (tmp_path / "out").exists()
    # The build's cgroup went with it.
    assert uids
    for uid in uids:
        group = memcg_dir(uid)
        assert group is not None and not os.path.exists(group)


# -- the register: compile overlapping the native build, the build's error first -------------


@pytest.mark.slow
async def test_native_failure_after_the_wasm_build_fails_the_register(
    client: AsyncClient, handle: ServerHandle
) -> None:
    # Builds for wasip1 only: the wasm module exists (and its compile starts) before the native
    # build fails. The build's error is the one reported, and nothing is kept.
    src = b"//go:build wasip1\n\n" + HELLO_GO.encode()
    events: list[dict[str, Any]] = []
    with pytest.raises(BuildError, match=r"go build failed \(native\)"):
        await client.register("wasmonly", src, filename="w.go", progress=events.append)
    assert any(e["stage"] == "compile" for e in events)
    with pytest.raises(NotFoundError):
        await client.get("wasmonly")
    staging = handle.config.data_dir / ".staging"
    assert not staging.exists() or os.listdir(staging) == []


@pytest.mark.slow
async def test_go_register_precompiles_the_wasm_module(client: AsyncClient) -> None:
    meta = await client.register("hello", HELLO_GO.encode(), filename="hello.go")
    assert meta["artifacts"] == ["wasm", "native"]
    assert (await client.invoke("hello", b"you")).output == b"hi you"


# -- builds and compiles share one bound ---------------------------------------------------------


class _CountingSemaphore(asyncio.Semaphore):
    """A semaphore that counts acquire attempts: the order of events, without sleeping."""

    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.attempts = 0

    async def acquire(self) -> bool:
        self.attempts += 1
        return await super().acquire()


async def _until(cond: Any) -> None:
    while not cond():
        await asyncio.sleep(0)


async def test_builds_and_compiles_share_one_semaphore(cache_dir: Path, tmp_path: Path) -> None:
    shared = _CountingSemaphore(1)
    builder = Builder(cache_dir, slots=shared)
    cache = ModuleCache(tmp_path / "modules", slots=shared)
    cache.prepare()
    wasm = wf.echo()
    artifact = tmp_path / "echo.wasm"
    artifact.write_bytes(wasm)
    digest = hashlib.sha256(wasm).hexdigest()
    try:
        # A build holds the shared permit: a compile waits for it, and starts no process.
        await shared.acquire()
        compile_task = asyncio.ensure_future(cache.ensure(artifact, digest, False))
        await _until(lambda: shared.attempts == 2)
        assert cache.compiles == 0 and not compile_task.done()
        # A build waits too, and says so.
        msgs: list[str] = []
        build_task = asyncio.ensure_future(
            builder.build(artifact, "echo.wasm", tmp_path / "out", progress=msgs.append))
        await _until(lambda: shared.attempts == 3)
        assert msgs == ["waiting for a build slot"] and not build_task.done()
        shared.release()
        await compile_task
        await build_task
        assert cache.compiles == 1
        assert (tmp_path / "out" / "main.wasm").read_bytes() == wasm
    finally:
        builder.close()
        await cache.close()


async def test_a_compile_nobody_waits_for_is_cancelled(tmp_path: Path) -> None:
    shared = _CountingSemaphore(1)
    cache = ModuleCache(tmp_path / "modules", slots=shared)
    cache.prepare()
    wasm = wf.echo()
    artifact = tmp_path / "echo.wasm"
    artifact.write_bytes(wasm)
    digest = hashlib.sha256(wasm).hexdigest()
    try:
        await shared.acquire()
        waiter = asyncio.ensure_future(cache.ensure(artifact, digest, False))
        await _until(lambda: shared.attempts == 2)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        shared.release()
        # The compile went with its last waiter: no process ran, nothing is cached, and the
        # permit is free again.
        await _until(lambda: not cache._inflight)  # noqa: SLF001
        assert cache.compiles == 0 and not shared.locked()
        assert cache.known(digest, False) is None
    finally:
        await cache.close()


async def test_a_compile_over_its_deadline_names_the_limit(tmp_path: Path) -> None:
    cache = ModuleCache(tmp_path / "modules", timeout_s=0.001)
    cache.prepare()
    wasm = wf.echo()
    artifact = tmp_path / "echo.wasm"
    artifact.write_bytes(wasm)
    try:
        # Starting Python alone takes longer than 1 ms: the compiler is always over this limit.
        with pytest.raises(InvalidArgumentError, match="over the 0.001 s compile time limit"):
            await cache.ensure(artifact, hashlib.sha256(wasm).hexdigest(), False)
    finally:
        await cache.close()


async def test_toolchains_and_compiles_run_nicer_than_the_serving_loops(tmp_path: Path) -> None:
    """Under a full machine a build or a compile waits, an invocation does not: a toolchain
    (and what it starts) and a compile process run BUILD_NICE / COMPILE_NICE above the
    priority of the process that started them."""
    base = os.getpriority(os.PRIO_PROCESS, 0)
    res = await run_tool(["/bin/sh", "-c", "cat /proc/self/stat"], cwd=tmp_path, env={},
                         memory_bytes=1 << 30)
    assert res.returncode == 0, res.output
    nice = int(res.output.rsplit(")", 1)[1].split()[16])  # field 19 of proc(5)
    assert nice == min(19, base + BUILD_NICE)
    # The compile process lowers itself first thing in _harden, before wasmtime starts.
    probe = (
        "import os; from fnserver.exec._compile import _harden; "
        "_harden(None); print(os.getpriority(os.PRIO_PROCESS, 0))"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", probe, stdout=asyncio.subprocess.PIPE, cwd=Path(__file__).parent.parent
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    assert int(out) == min(19, base + COMPILE_NICE)
