"""The Builder: one upload in, main.wasm and/or main.bin out, toolchains in a box (see _box.py)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from fnserver._isolation import claim_uids, memcg_dir
from fnserver.artifacts import ARTIFACT_FILES
from fnserver.protocol import (
    ArtifactKind,
    BuildError,
    FnError,
    InternalError,
    InvalidArgumentError,
    TooLargeError,
)

from ._archive import extract_zip
from ._gomod import (
    check_module,
    find_main_package,
    find_module_root,
    not_vendored_message,
    package_name,
    parse_go_mod,
)
from ._kinds import check_elf, check_wasm, detect_kind, validate_kind
from ._proc import Box, BoxError, ProcResult, run_tool
from ._toolchain import GoToolchain, ZigToolchain, find_go, find_zig

__all__ = ["BuildResult", "Builder"]

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
#: Told each artifact the moment it is in out_dir (the wasm compile starts from it).
OnArtifact = Callable[[ArtifactKind, Path], None]

# The wasm stack for C and Zig. zig's default (16 MiB) makes every instance start at 258 pages,
# which the exec pool's keep-resident memory pays for on each call (MEASURED.md); 64 KiB gives
# 3 pages but overflows on an ordinary `char buf[65536]` read buffer on the stack. 1 MiB costs
# 17 pages and fits what small functions put on their stack.
WASM_STACK_BYTES: Final = 1024 * 1024
#: The largest artifact a build may make (issue 9: 102 bytes of Go made a 270 MB binary).
DEFAULT_MAX_ARTIFACT: Final = 64 * 1024 * 1024
GO_MODULE_NAME: Final = "fnfunc"
_HEAD_BYTES: Final = 64
# `go env` / `zig version` are our own fixed commands, not a user build; they get a fixed
# generous address-space limit so a small per-build limit reports on the build itself.
_PROBE_MEMORY_BYTES: Final = 4096 * 1024 * 1024

#: The caches builds share (Go's build cache, zig's global cache): read-only to an upload's
#: build, under a writable layer of its own; only the server's warm-up writes them.
_SHARED_CACHES: Final = ("go-build", "zig")
#: Scratch dirs a build writes (the build uid's own; ``src`` is the server's, read-only).
_WRITABLE: Final = ("out", "home", "tmp", "gopath", "zig-cache")
_logged_unboxed = False
_WARM_C: Final = b"#include <stdio.h>\nint main(void) { puts(\"ok\"); return 0; }\n"
_WARM_GO_MAIN: Final = (b"\t\"fmt\"\n\t\"io\"\n\t\"os\"\n)\n\nfunc main() {\n"
                        b"\tb, _ := io.ReadAll(os.Stdin)\n\tfmt.Print(string(b))\n}\n")
#: What the server's warm-up builds: wasi-libc, and the Go standard packages functions use
#: most, for both targets (an upload's build cannot add to the shared cache, so what is not
#: warmed is compiled again by every build that imports it).
_WARM_SOURCES: Final = {
    "zig": ("warm.c", _WARM_C),
    "go": ("warm.go", b"package main\n\nimport (\n"
           + b"".join(b"\t_ \"" + pkg.encode() + b"\"\n" for pkg in (
               "bufio", "bytes", "crypto/sha256", "encoding/base64", "encoding/binary",
               "encoding/hex", "encoding/json", "errors", "math", "math/rand", "sort",
               "strconv", "strings", "time", "unicode/utf8"))
           + _WARM_GO_MAIN),
}
#: The smaller warm-up a boxed builder runs before its first build of a toolchain, when the
#: server's own warm-up has not run (``--no-warm``): wasi-libc, Go's fmt/io/os.
_FIRST_WARM: Final = {
    "zig": ("warm.c", _WARM_C),
    "go": ("warm.go", b"package main\n\nimport (\n" + _WARM_GO_MAIN),
}
_TOOLCHAIN_OF: Final = {"go": "go", "go-module": "go", "c": "zig", "zig": "zig"}


def _ignore(_msg: str) -> None:
    pass


_NO_MODULE_RE: Final = re.compile(
    r"(?:no required module provides package|cannot find module providing package)\s+([^\s;:]+)"
)


@dataclass(frozen=True)
class BuildResult:
    """What a successful build produced."""

    kind: str
    artifacts: tuple[ArtifactKind, ...]  # subset of ("wasm", "native")
    toolchain: str | None  # "go1.27.3", "zig 0.17.1"; None for prebuilt uploads
    build_ms: int
    log: str  # compiler output, paths relative to the upload; "" if none
    #: Where each artifact was written: ``out_dir / ARTIFACT_FILES[kind]``.
    files: Mapping[ArtifactKind, Path] = field(default_factory=dict)


@dataclass
class _Outcome:
    artifacts: tuple[ArtifactKind, ...]
    toolchain: str | None
    log: str




class _Build:
    """One build in progress: its scratch dir, its box (uid, cgroup) and what it published."""

    def __init__(self, scratch: Path, out_dir: Path, *, uid: int | None, cgroup: str | None,
                 trusted: bool, on_artifact: OnArtifact | None) -> None:
        self.scratch = scratch
        self.out_dir = out_dir
        self.uid = uid
        self.cgroup = cgroup
        self.trusted = trusted
        self.on_artifact = on_artifact
        self.published: dict[ArtifactKind, Path] = {}
        self.made_out_dir = False

    @property
    def boxed(self) -> bool:
        return self.uid is not None or self.trusted


class Builder:
    """Builds uploads with the bundled Go and Zig toolchains, a few at a time, under limits.

    As root, every toolchain process runs in a box (:mod:`._box`): its own mount, pid and
    network namespaces showing only the toolchain, the build's scratch directories and the
    build caches (read-only, under a per-build writable layer), as an unprivileged build uid
    claimed for this builder, in a memory cgroup of the build's. Not as root: rlimits only.
    """

    def __init__(self, cache_dir: Path, *, max_concurrent: int = 2, timeout_s: float = 120.0,
                 memory_mb: int = 4096, max_artifact: int = DEFAULT_MAX_ARTIFACT,
                 slots: asyncio.Semaphore | None = None, sandbox: bool | None = None) -> None:
        """``slots``: a semaphore shared with the wasm compiles (ModuleCache), so builds and
        compiles together stay under one bound; each build holds one of its permits (and one
        of this builder's own ``max_concurrent``). ``sandbox``: None boxes builds when the
        server runs as root; False never does (measurements); True requires root."""
        self._cache_dir = Path(cache_dir).absolute()
        self._timeout_s = timeout_s
        self._max_artifact = max_artifact
        # The whole build's memory: its cgroup's limit when boxed, else RLIMIT_AS per
        # toolchain process (go's runtime reserves ~0.5 GiB of address space before doing any
        # work, so that limit must leave room for it on top of the compiler's real heap).
        self._memory_bytes = memory_mb * 1024 * 1024
        self._memory_mb = memory_mb
        self._max_concurrent = max_concurrent
        self._slots = asyncio.Semaphore(max_concurrent)
        self._shared = slots
        is_root = os.geteuid() == 0
        if sandbox and not is_root:
            raise InternalError("the build sandbox needs the server to run as root")
        self._sandbox = is_root if sandbox is None else sandbox
        self._tool_lock = asyncio.Lock()
        self._uid_lock = asyncio.Lock()
        self._free_uids: list[int] = []
        self._uid_locks: list[int] = []
        self._cache_ready = False
        self._warmed: set[str] = set()
        self._warm_locks: dict[str, asyncio.Lock] = {}
        self._go: GoToolchain | None = None
        self._zig: ZigToolchain | None = None
        self._libc_warm = False
        for sub in _SHARED_CACHES + ("tmp",):
            (self._cache_dir / sub).mkdir(parents=True, exist_ok=True)
        global _logged_unboxed
        if sandbox is None and not self._sandbox and not _logged_unboxed:
            _logged_unboxed = True
            log.warning("builds run without the build sandbox (the server is not root): "
                        "toolchains run as the server's uid, with rlimits only")

    @property
    def running(self) -> int:
        """Builds running now (each holds one of this builder's permits)."""
        return self._max_concurrent - self._slots._value

    @property
    def sandboxed(self) -> bool:
        """True when toolchains run in the build box."""
        return self._sandbox

    def close(self) -> None:
        """Give back the build uids (idempotent). Builds still running must be over."""
        for fd in self._uid_locks:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._uid_locks = []
        self._free_uids = []

    # -- public -------------------------------------------------------------------------------

    async def warm(self) -> None:
        """Fill the toolchain caches (zig's wasi-libc, Go's common std packages, both targets).

        Warm-ups are the only builds that write the shared caches directly (trusted source;
        as root in the box when boxed); an upload's build writes only a layer of its own. A
        failure is logged, not raised: warming is only an optimisation.
        """
        for toolchain, (name, text) in _WARM_SOURCES.items():
            async with self._slots, self._shared or contextlib.nullcontext():
                await self._warm_one(toolchain, name, text, None, force=True)

    async def _warm_one(self, toolchain: str, name: str, text: bytes,
                        report: Progress | None, *, force: bool = False) -> None:
        """One trusted warm-up build (the caller holds a build slot); once per toolchain and
        builder unless ``force``."""
        lock = self._warm_locks.setdefault(toolchain, asyncio.Lock())
        if lock.locked() and toolchain not in self._warmed and report is not None:
            # The server's own warm-up (or another build's) is filling the cache: say so, or
            # the client sees nothing for the tens of seconds it takes.
            report(f"waiting for the shared {toolchain} build cache to be warmed")
        async with lock:
            if toolchain in self._warmed and not force:
                return
            if report is not None:
                report(f"warming the shared {toolchain} build cache")
            with tempfile.TemporaryDirectory(dir=self._cache_dir / "tmp") as tmp:
                upload = Path(tmp) / name
                upload.write_bytes(text)
                try:
                    async with asyncio.timeout(self._timeout_s):
                        await self._run(upload, name, Path(tmp) / "out", detect_kind(name),
                                        None, None, trusted=True)
                except (FnError, TimeoutError) as exc:
                    log.warning("warming the build cache with %s failed: %s", name,
                                exc or "timed out")
                    return
                finally:
                    if self._sandbox:
                        await asyncio.to_thread(_open_cache_modes, self._cache_dir)
            self._warmed.add(toolchain)

    async def build(self, upload: Path, filename: str, out_dir: Path, *, kind: str | None = None,
                    progress: Progress | None = None,
                    on_artifact: OnArtifact | None = None) -> BuildResult:
        """Build ``upload`` into ``out_dir``; raise BuildError / InvalidArgumentError / TooLargeError.

        ``on_artifact(kind, path)`` is called as soon as each artifact is in ``out_dir``: for a
        Go build the wasm module is there while the native build still runs, so its compile
        can start at once. On failure every artifact already placed is removed again.
        """
        return await self._build(upload, filename, out_dir, kind=kind, progress=progress,
                                 on_artifact=on_artifact, trusted=False)

    async def _build(self, upload: Path, filename: str, out_dir: Path, *, kind: str | None,
                     progress: Progress | None, on_artifact: OnArtifact | None,
                     trusted: bool) -> BuildResult:
        kind = validate_kind(kind) if kind is not None else detect_kind(filename)
        report: Progress = progress if progress is not None else (lambda _msg: None)
        if self._slots.locked() or (self._shared is not None and self._shared.locked()):
            report("waiting for a build slot")
        async with self._slots, self._shared or contextlib.nullcontext():
            toolchain = _TOOLCHAIN_OF.get(kind)
            if self._sandbox and not trusted and toolchain is not None:
                # An upload's build cannot fill the shared cache: a cold one is warmed first,
                # by a trusted build, or every build would start from nothing.
                name, text = _FIRST_WARM[toolchain]
                await self._warm_one(toolchain, name, text, report)
            return await self._run(upload, filename, Path(out_dir), kind, report, on_artifact,
                                   trusted=trusted)

    async def _run(self, upload: Path, filename: str, out_dir: Path, kind: str,
                   report: Progress | None, on_artifact: OnArtifact | None, *,
                   trusted: bool) -> BuildResult:
        """One build, in the caller's build slot."""
        started = time.monotonic()
        if report is None:
            report = _ignore
        uid = await self._take_uid() if self._sandbox and not trusted else None
        run: _Build | None = None
        scratch = Path(tempfile.mkdtemp(prefix="build-", dir=self._cache_dir / "tmp"))
        try:
            cgroup = (await asyncio.to_thread(_make_cgroup, uid, self._memory_bytes)
                      if uid is not None else None)
            run = _Build(scratch, Path(out_dir), uid=uid, cgroup=cgroup,
                         trusted=trusted and self._sandbox, on_artifact=on_artifact)
            deadline = asyncio.timeout(self._timeout_s)
            try:
                async with deadline:
                    outcome = await self._build_kind(kind, Path(upload), run, report)
                    for artifact in outcome.artifacts:
                        if artifact not in run.published:
                            await self._publish(run, artifact)
            except BuildError as err:
                err.details["log"] = _user_source_names(err.details.get("log", ""), kind, filename)
                raise
            except TimeoutError:
                if deadline.expired():
                    raise BuildError(
                        f"build timed out after {self._timeout_s:g} s",
                        {"log": "", "timeout_s": self._timeout_s},
                    ) from None
                raise
        except BaseException as exc:
            if isinstance(exc, BoxError):
                log.error("the build box failed: %s", exc.detail)
            if run is not None:
                await asyncio.to_thread(_unpublish, run)
            raise
        finally:
            # A thread finishes even if this await is cancelled, so the scratch dir goes.
            await asyncio.to_thread(shutil.rmtree, scratch, True)
            if run is not None and run.cgroup is not None:
                await asyncio.to_thread(_remove_cgroup, run.cgroup)
            if uid is not None:
                self._free_uids.append(uid)
        return BuildResult(
            kind=kind,
            artifacts=outcome.artifacts,
            toolchain=outcome.toolchain,
            build_ms=int((time.monotonic() - started) * 1000),
            log=_user_source_names(outcome.log, kind, filename),
            files=dict(run.published),
        )

    # -- the box ------------------------------------------------------------------------------

    async def _take_uid(self) -> int:
        async with self._uid_lock:
            if not self._uid_locks:
                try:
                    # One uid per build slot: concurrent builds never share one (RLIMIT_NPROC
                    # counts per uid), and none is a worker's or another server's.
                    uids, fds = await asyncio.to_thread(claim_uids, self._max_concurrent)
                except OSError as exc:
                    raise InternalError(f"cannot claim build uids: {exc}") from None
                self._free_uids, self._uid_locks = uids, fds
            if not self._cache_ready:
                await asyncio.to_thread(_open_cache_modes, self._cache_dir)
                self._cache_ready = True
            return self._free_uids.pop()

    def _box(self, run: _Build, toolchain: Path, cache: str) -> Box | None:
        """The box of one toolchain command: ``toolchain`` (read-only), the build's source
        (read-only) and scratch dirs (writable), the shared ``cache`` (see _Build.trusted)."""
        if not run.boxed:
            return None
        s = run.scratch
        binds: list[tuple[str, str, bool]] = [(str(toolchain), str(toolchain), False),
                                              (str(s / "src"), str(s / "src"), False)]
        binds += [(str(s / d), str(s / d), True) for d in _WRITABLE]
        shared = str(self._cache_dir / cache)
        if run.trusted:
            # The server's own warm-up: it writes the shared cache for everyone, as root, with
            # modes every later build's uid may use (in its own layer).
            return Box(root=s / "root", binds=(*binds, (shared, shared, True)), umask=0)
        return Box(root=s / "root", binds=tuple(binds), overlays=((shared, shared),),
                   overlay_dir=s / "layers", uid=run.uid, gid=run.uid,
                   cgroup_procs=run.cgroup and os.path.join(run.cgroup, "cgroup.procs"))

    async def _tool(self, run: _Build, argv: list[str], cwd: Path, env: Mapping[str, str],
                    toolchain: Path, cache: str) -> ProcResult:
        res = await run_tool(argv, cwd=cwd, env=env, memory_bytes=self._memory_bytes,
                             box=self._box(run, toolchain, cache))
        if res.returncode != 0 and run.cgroup is not None:
            if await asyncio.to_thread(_oom_killed, run.cgroup):
                raise BuildError(
                    f"the build ran out of memory: it needed over the {self._memory_mb} MiB"
                    " build memory limit",
                    {"log": "", "memory_mb": self._memory_mb},
                )
        return res

    async def _publish(self, run: _Build, artifact: ArtifactKind) -> Path:
        """Put one artifact into out_dir (size checked, never through a link the build left),
        then tell ``on_artifact``."""
        path, made = await asyncio.to_thread(
            _install_one, run.scratch / "out", run.out_dir, artifact, self._max_artifact
        )
        run.made_out_dir = run.made_out_dir or made
        run.published[artifact] = path
        if run.on_artifact is not None:
            run.on_artifact(artifact, path)
        return path

    # -- per kind -----------------------------------------------------------------------------

    async def _build_kind(self, kind: str, upload: Path, run: _Build,
                          report: Progress) -> _Outcome:
        scratch = run.scratch
        out = scratch / "out"
        src = scratch / "src"
        await asyncio.to_thread(_make_scratch, scratch, run.uid)
        if kind == "wasm":
            await asyncio.to_thread(_copy_checked, upload, out / ARTIFACT_FILES["wasm"], check_wasm, 0o644)
            return _Outcome(("wasm",), None, "")
        if kind == "native":
            await asyncio.to_thread(_copy_checked, upload, out / ARTIFACT_FILES["native"], check_elf, 0o755)
            return _Outcome(("native",), None, "")
        if kind == "go":
            return await self._build_go_file(upload, src, run, report)
        if kind == "go-module":
            return await self._build_go_module(upload, src, run, report)
        if kind == "c":
            return await self._build_c(upload, src, run, report)
        if kind == "zig":
            return await self._build_zig(upload, src, run, report)
        if kind == "wat":
            return await self._build_wat(upload, src, run, report)
        raise AssertionError(kind)  # validate_kind covers KINDS

    async def _build_go_file(self, upload: Path, src: Path, run: _Build,
                             report: Progress) -> _Outcome:
        go = await self._go_toolchain()
        await asyncio.to_thread(shutil.copyfile, upload, src / "main.go")
        # Off the loop: the scan is linear but reads up to a MiB of the upload.
        pkg = await asyncio.to_thread(package_name, src / "main.go")
        if pkg is not None and pkg != "main":
            raise InvalidArgumentError(f"a .go upload must be package main, this is package {pkg}")
        await asyncio.to_thread(
            (src / "go.mod").write_text, f"module {GO_MODULE_NAME}\n\ngo {go.language_version}\n"
        )
        return await self._go_build(go, src, ".", "-mod=readonly", run, report,
                                    single_file=True)

    async def _build_go_module(self, upload: Path, src: Path, run: _Build,
                               report: Progress) -> _Outcome:
        report("unpacking the module")
        await asyncio.to_thread(extract_zip, upload, src)
        # Off the loop: a module may hold thousands of files, each scanned for its package.
        root, vendored, pkg = await asyncio.to_thread(_inspect_module, src)
        go = await self._go_toolchain()
        return await self._go_build(go, root, pkg, "-mod=vendor" if vendored else "-mod=readonly",
                                    run, report, single_file=False)

    async def _go_build(self, go: GoToolchain, root: Path, pkg: str, goflags: str,
                        run: _Build, report: Progress, *, single_file: bool) -> _Outcome:
        """Build wasip1/wasm and native concurrently; pkg is "." or "./cmd/<x>".

        The wasm module is published the moment its build ends (its compile may start while
        the native build runs on)."""
        scratch = run.scratch
        env = {
            "PATH": "/usr/bin:/bin",
            "LANG": "C",
            "HOME": str(scratch / "home"),
            "TMPDIR": str(scratch / "tmp"),
            "GOPATH": str(scratch / "gopath"),
            "GOROOT": str(go.goroot),
            "GOCACHE": str(self._cache_dir / "go-build"),
            # No module is ever downloaded (GOPROXY=off): a per-build module cache, never one
            # a build could leave something in for the next.
            "GOMODCACHE": str(scratch / "gopath" / "pkg" / "mod"),
            "CGO_ENABLED": "0",
            "GOTOOLCHAIN": "local",
            "GOPROXY": "off",
            "GOSUMDB": "off",
            "GONOSUMDB": "",
            "GOPRIVATE": "",
            "GOFLAGS": goflags,
            "GOWORK": "off",
            "GOENV": "off",
            "GOTELEMETRY": "off",
        }
        targets: dict[ArtifactKind, dict[str, str]] = {
            "wasm": {**env, "GOOS": "wasip1", "GOARCH": "wasm"},
            "native": {**env, "GOOS": go.goos, "GOARCH": go.goarch},
        }
        report(f"building wasm and native ({go.version})")

        async def one(artifact: ArtifactKind) -> ProcResult:
            argv = [str(go.go), "build", "-trimpath", "-buildvcs=false",
                    "-o", str(scratch / "out" / ARTIFACT_FILES[artifact]), pkg]
            res = await self._tool(run, argv, root, targets[artifact], go.goroot, "go-build")
            if artifact == "wasm" and res.returncode == 0:
                # Published (size-checked, in out_dir) while the native build runs on.
                try:
                    await self._publish(run, "wasm")
                except FileNotFoundError:
                    pass  # reported below with the log
            return res

        results = await _run_concurrently({name: one(name) for name in targets})
        clean = {name: self._sanitize(res.output, root, scratch) for name, res in results.items()}
        for name, res in results.items():
            if res.returncode != 0:
                raise self._go_failure(name, clean[name], single_file)
        for name in targets:
            if name not in run.published and not await asyncio.to_thread(
                _is_regular, scratch / "out" / ARTIFACT_FILES[name]
            ):
                raise BuildError(f"go build produced no {name} binary (no main package?)",
                                 {"log": clean[name]})
        logs = list(dict.fromkeys(text for text in clean.values() if text.strip()))
        return _Outcome(("wasm", "native"), go.version, "\n".join(logs))

    def _go_failure(self, artifact: str, text: str, single_file: bool) -> BuildError:
        m = _NO_MODULE_RE.search(text)
        if m:
            dep = m.group(1)
            if single_file:
                return BuildError(
                    f"package {dep} is not in the standard library; a single .go upload may only "
                    "import the standard library (zip a module with `go mod vendor` instead)",
                    {"log": text, "dependency": dep},
                )
            return BuildError(not_vendored_message(dep), {"log": text, "dependency": dep})
        return BuildError(f"go build failed ({artifact})", {"log": text})

    async def _build_c(self, upload: Path, src: Path, run: _Build,
                       report: Progress) -> _Outcome:
        zig = await self._zig_toolchain()
        await asyncio.to_thread(shutil.copyfile, upload, src / "main.c")
        if not self._libc_warm:
            # A cache kept from an earlier run already holds zig's wasi-libc (o/<hash>/libc.a).
            self._libc_warm = await asyncio.to_thread(
                lambda: any((self._cache_dir / "zig" / "o").glob("*/libc.a"))
            )
        if not self._libc_warm:
            report("compiling wasi-libc, first C build takes ~20 s")
        else:
            report(f"building wasm (zig {zig.version})")
        argv = [str(zig.zig), "cc", "-target", "wasm32-wasi", "-O2", "-s",
                f"-Wl,-z,stack-size={WASM_STACK_BYTES}",
                "-o", str(run.scratch / "out" / ARTIFACT_FILES["wasm"]), "main.c"]
        outcome = await self._zig_run(zig, argv, src, run, "zig cc failed (wasm)")
        # Only a build that wrote the shared cache leaves wasi-libc there for the next one.
        self._libc_warm = self._libc_warm or run.trusted or not run.boxed
        return outcome

    async def _build_zig(self, upload: Path, src: Path, run: _Build,
                         report: Progress) -> _Outcome:
        zig = await self._zig_toolchain()
        await asyncio.to_thread(shutil.copyfile, upload, src / "main.zig")
        report(f"building wasm (zig {zig.version})")
        argv = [str(zig.zig), "build-exe", "-target", "wasm32-wasi", "-O", "ReleaseSafe",
                "-fstrip", "--stack", str(WASM_STACK_BYTES),
                f"-femit-bin={run.scratch / 'out' / ARTIFACT_FILES['wasm']}", "main.zig"]
        return await self._zig_run(zig, argv, src, run, "zig build-exe failed (wasm)")

    async def _build_wat(self, upload: Path, src: Path, run: _Build,
                         report: Progress) -> _Outcome:
        """WebAssembly text, converted by wasmtime's parser in a process of its own (``_wat.py``):
        not boxed (it needs the interpreter's files), but as the build's uid, under the
        build's deadline and memory limit."""
        await asyncio.to_thread(shutil.copyfile, upload, src / "main.wat")
        os.chmod(src / "main.wat", 0o644)
        report("converting WebAssembly text (wasmtime wat2wasm)")
        out = run.scratch / "out" / ARTIFACT_FILES["wasm"]
        argv = [sys.executable, "-m", "fnserver.builder._wat", str(src / "main.wat"), str(out)]
        if run.uid is not None:
            argv.append(str(run.uid))
        res = await run_tool(argv, cwd=src, env={"PATH": "/usr/bin:/bin", "LANG": "C"},
                             memory_bytes=self._memory_bytes)
        text = self._sanitize(res.output, src, run.scratch)
        if res.returncode != 0:
            raise BuildError("main.wat is not valid WebAssembly text", {"log": text})
        if not await asyncio.to_thread(_is_regular, out):
            raise BuildError("wat2wasm wrote no module", {"log": text})
        return _Outcome(("wasm",), f"wasmtime {wasmtime_version()}", text)

    async def _zig_run(self, zig: ZigToolchain, argv: list[str], src: Path, run: _Build,
                       failure: str) -> _Outcome:
        scratch = run.scratch
        env = {
            "PATH": "/usr/bin:/bin",
            "LANG": "C",
            "HOME": str(scratch / "home"),
            "TMPDIR": str(scratch / "tmp"),
            "ZIG_GLOBAL_CACHE_DIR": str(self._cache_dir / "zig"),
            "ZIG_LOCAL_CACHE_DIR": str(scratch / "zig-cache"),
        }
        res = await self._tool(run, argv, src, env, zig.zig.parent, "zig")
        text = self._sanitize(res.output, src, scratch)
        if res.returncode != 0:
            raise BuildError(failure, {"log": text})
        if not await asyncio.to_thread(_is_regular, scratch / "out" / ARTIFACT_FILES["wasm"]):
            raise BuildError(f"{failure}: no output", {"log": text})
        return _Outcome(("wasm",), f"zig {zig.version}", text)

    # -- helpers ------------------------------------------------------------------------------

    async def _go_toolchain(self) -> GoToolchain:
        async with self._tool_lock:
            if self._go is None:
                with tempfile.TemporaryDirectory(dir=self._cache_dir / "tmp") as home:
                    self._go = await find_go(Path(home), _PROBE_MEMORY_BYTES)
            return self._go

    async def _zig_toolchain(self) -> ZigToolchain:
        async with self._tool_lock:
            if self._zig is None:
                with tempfile.TemporaryDirectory(dir=self._cache_dir / "tmp") as home:
                    self._zig = await find_zig(Path(home), _PROBE_MEMORY_BYTES)
            return self._zig

    def _sanitize(self, text: str, root: Path, scratch: Path) -> str:
        """Replace every scratch/server path in compiler output: users see their own paths."""
        pairs: list[tuple[str, str]] = []

        def add(path: Path | None, repl: str) -> None:
            if path is None:
                return
            for variant in {str(path), os.path.realpath(path)}:
                pairs.append((variant, repl))

        for variant in {str(root), os.path.realpath(root)}:
            pairs.append((variant + "/", ""))
            pairs.append((variant, "."))
        add(scratch, "<build>")
        add(self._cache_dir, "<cache>")
        if self._go is not None:
            add(self._go.goroot, "$GOROOT")
        if self._zig is not None:
            add(self._zig.lib_dir, "<zig>/lib")
            add(self._zig.zig.parent, "<zig>")
        pairs.sort(key=lambda p: len(p[0]), reverse=True)
        for old, new in pairs:
            text = text.replace(old, new)
        return text


def _inspect_module(src: Path) -> tuple[Path, bool, str]:
    """The module's root, whether it is vendored, and its main package (blocking)."""
    root = find_module_root(src)
    mod = parse_go_mod((root / "go.mod").read_text("utf-8", "replace"))
    return root, check_module(root, mod), find_main_package(root)


async def _run_concurrently(coros: dict[str, Coroutine[Any, Any, ProcResult]]) -> dict[str, ProcResult]:
    """Run the commands together; if one raises, the others are cancelled (and killed)."""
    try:
        async with asyncio.TaskGroup() as tg:
            tasks = {name: tg.create_task(coro) for name, coro in coros.items()}
    except BaseExceptionGroup as eg:
        raise eg.exceptions[0] from None
    return {name: task.result() for name, task in tasks.items()}


def _copy_checked(upload: Path, dest: Path, check: Callable[[bytes], None], mode: int) -> None:
    with open(upload, "rb") as f:
        check(f.read(_HEAD_BYTES))
    shutil.copyfile(upload, dest)
    os.chmod(dest, mode)


def _make_scratch(scratch: Path, uid: int | None) -> None:
    """The build's directories: ``src`` (written by the server, read-only in the box), the
    writable ones (the build uid's own), and the two empty mount points of the box."""
    (scratch / "src").mkdir()
    for name in (*_WRITABLE, "root", "layers"):
        (scratch / name).mkdir()
        if uid is not None and name in _WRITABLE:
            os.chown(scratch / name, uid, uid)


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _install_one(out: Path, out_dir: Path, artifact: ArtifactKind, limit: int) -> tuple[Path, bool]:
    """Copy one built artifact into ``out_dir``, atomically; return its path and whether
    ``out_dir`` was made here.

    The scratch ``out`` dir belongs to the build uid: the file is opened without following a
    link (a build may not hand the server ``/etc/shadow`` as its artifact), must be a regular
    file, and TOO_LARGE over ``limit`` bytes (a few bytes of source can ask for a huge
    initialised array; the store keeps every version for good)."""
    name = ARTIFACT_FILES[artifact]
    dfd = os.open(out, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=dfd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise BuildError(f"the build left a link, not a {artifact} artifact",
                                 {"log": ""}) from None
            raise
    finally:
        os.close(dfd)
    with open(fd, "rb") as src:
        st = os.fstat(src.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise BuildError(f"the build made no regular {artifact} file", {"log": ""})
        if st.st_size > limit:
            raise TooLargeError(
                f"the build made a {artifact} artifact of {st.st_size} bytes, over the {limit}"
                " byte limit on artifacts (--max-artifact-mb); large initialised data in the"
                " source is the usual cause",
                {"artifact": artifact, "size": st.st_size, "max_artifact": limit},
            )
        made = not out_dir.exists()
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / f".{name}.partial"
        try:
            with open(tmp, "wb") as dst:
                # Never more than the size checked above, whatever the file does meanwhile.
                remaining = limit + 1
                while remaining > 0 and (chunk := src.read(min(1 << 20, remaining))):
                    dst.write(chunk)
                    remaining -= len(chunk)
            if remaining <= 0:
                raise TooLargeError(f"the {artifact} artifact grew past the {limit} byte limit",
                                    {"artifact": artifact, "max_artifact": limit})
            os.chmod(tmp, 0o755 if artifact == "native" else 0o644)
            os.replace(tmp, out_dir / name)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
    return out_dir / name, made


def _unpublish(run: _Build) -> None:
    """A failed build leaves nothing in out_dir: all of its artifacts or none of them."""
    for path in run.published.values():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    run.published.clear()
    if run.made_out_dir:
        with contextlib.suppress(OSError):
            run.out_dir.rmdir()


def _open_cache_modes(cache_dir: Path) -> None:
    """Shared caches as boxed builds need them: the top dir root's and 0700 (no host user
    reaches inside), everything in it usable by any build uid (dirs 0777, files 0666), since
    a build sees the cache through an overlay whose writes land in its own layer only. Zig
    makes its directories 0755 even under umask 0, so this runs again after each warm-up."""
    for sub in _SHARED_CACHES:
        top = cache_dir / sub
        os.chown(top, 0, 0)
        os.chmod(top, 0o700)
        for dirpath, dirnames, filenames in os.walk(top):
            for name in dirnames:
                _chmod_at_least(os.path.join(dirpath, name), 0o777)
            for name in filenames:
                _chmod_at_least(os.path.join(dirpath, name), 0o666)


def _chmod_at_least(path: str, mode: int) -> None:
    with contextlib.suppress(OSError):
        st = os.lstat(path)
        if not stat.S_ISLNK(st.st_mode) and stat.S_IMODE(st.st_mode) & mode != mode:
            os.chmod(path, stat.S_IMODE(st.st_mode) | mode)


def _make_cgroup(uid: int | None, limit: int) -> str | None:
    """A memory cgroup (v1) for one build, limited to ``limit`` bytes (swap included where the
    host counts it); None where the host has none (RLIMIT_AS applies instead)."""
    if uid is None:
        return None
    d = memcg_dir(uid)
    if d is None:
        return None
    try:
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "memory.limit_in_bytes"), "w") as f:
            f.write(str(limit))
    except OSError as exc:
        log.warning("no memory cgroup for builds (%s): RLIMIT_AS applies", exc.strerror)
        with contextlib.suppress(OSError):
            os.rmdir(d)
        return None
    with contextlib.suppress(OSError):
        with open(os.path.join(d, "memory.memsw.limit_in_bytes"), "w") as f:
            f.write(str(limit))
    return d


def _oom_killed(cgroup: str) -> bool:
    """The build's cgroup hit its limit and the kernel killed one of its processes."""
    try:
        with open(os.path.join(cgroup, "memory.oom_control")) as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key == "oom_kill" and int(value) > 0:
                    return True
    except (OSError, ValueError):
        pass
    return False


def _remove_cgroup(cgroup: str) -> None:
    """Remove the build's cgroup: empty once its launchers are reaped (the pid namespaces'
    ends took everything else). A still-exiting process makes rmdir EBUSY for a moment."""
    for _ in range(200):
        try:
            os.rmdir(cgroup)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                break
        time.sleep(0.005)
    log.warning("could not remove the build memory cgroup %s", cgroup)


_SINGLE_SOURCE = {"go": "main.go", "c": "main.c", "zig": "main.zig"}
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")


def _user_source_names(log: str, kind: str, filename: str) -> str:
    """Show compiler messages under the user's own file name (``hello.go:5:2``).

    The source is compiled under a fixed name so no user string reaches a command line; the
    log is the only place the user's name comes back, and only when it is a plain file name.
    """
    fixed = _SINGLE_SOURCE.get(kind)
    user = os.path.basename(filename)
    if fixed is None or not log or user == fixed or not _SAFE_NAME.match(user):
        return log
    return re.sub(rf"(?<![\w/.-])(\./)?{re.escape(fixed)}(?=[:(\s]|$)", lambda m: (m.group(1) or "") + user, log)


def wasmtime_version() -> str:
    """The wasmtime release that parses WebAssembly text."""
    from importlib.metadata import version

    return version("wasmtime")
