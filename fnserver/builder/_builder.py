"""The Builder: one upload in, main.wasm and/or main.bin out, in a sandboxed scratch dir."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from fnserver.artifacts import ARTIFACT_FILES
from fnserver.protocol import ArtifactKind, BuildError, FnError, InvalidArgumentError, TooLargeError

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
from ._proc import ProcResult, run_tool
from ._toolchain import GoToolchain, ZigToolchain, find_go, find_zig

__all__ = ["BuildResult", "Builder"]

log = logging.getLogger(__name__)

Progress = Callable[[str], None]

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




class Builder:
    """Builds uploads with the bundled Go and Zig toolchains, a few at a time, under limits."""

    def __init__(self, cache_dir: Path, *, max_concurrent: int = 2, timeout_s: float = 120.0,
                 memory_mb: int = 4096, max_artifact: int = DEFAULT_MAX_ARTIFACT) -> None:
        self._cache_dir = Path(cache_dir).absolute()
        self._timeout_s = timeout_s
        self._max_artifact = max_artifact
        # RLIMIT_AS per toolchain process. go's runtime reserves ~0.5 GiB of address space
        # before doing any work (it dies under a 512 MiB limit, builds fine under 1 GiB), so the
        # limit must leave room for that on top of the compiler's real heap.
        self._memory_bytes = memory_mb * 1024 * 1024
        self._slots = asyncio.Semaphore(max_concurrent)
        self._tool_lock = asyncio.Lock()
        self._go: GoToolchain | None = None
        self._zig: ZigToolchain | None = None
        self._libc_warm = False
        for sub in ("go-build", "gomod", "zig", "tmp"):
            (self._cache_dir / sub).mkdir(parents=True, exist_ok=True)

    # -- public -------------------------------------------------------------------------------

    async def warm(self) -> None:
        """Fill the toolchain caches (zig's wasi-libc, Go's std for both targets).

        A failure is logged, not raised: warming is only an optimisation.
        """
        sources = {
            "warm.c": b"#include <stdio.h>\nint main(void) { puts(\"ok\"); return 0; }\n",
            "warm.go": b"package main\n\nimport (\n\t\"fmt\"\n\t\"io\"\n\t\"os\"\n)\n\n"
                       b"func main() {\n\tb, _ := io.ReadAll(os.Stdin)\n\tfmt.Print(string(b))\n}\n",
        }
        for name, text in sources.items():
            with tempfile.TemporaryDirectory(dir=self._cache_dir / "tmp") as tmp:
                upload = Path(tmp) / name
                upload.write_bytes(text)
                try:
                    await self.build(upload, name, Path(tmp) / "out")
                except FnError as exc:
                    log.warning("warming the build cache with %s failed: %s", name, exc)

    async def build(self, upload: Path, filename: str, out_dir: Path, *, kind: str | None = None,
                    progress: Progress | None = None) -> BuildResult:
        """Build ``upload`` into ``out_dir``; raise BuildError / InvalidArgumentError / TooLargeError."""
        started = time.monotonic()
        kind = validate_kind(kind) if kind is not None else detect_kind(filename)
        report: Progress = progress if progress is not None else (lambda _msg: None)
        if self._slots.locked():
            report("waiting for a build slot")
        async with self._slots:
            scratch = Path(tempfile.mkdtemp(prefix="build-", dir=self._cache_dir / "tmp"))
            try:
                deadline = asyncio.timeout(self._timeout_s)
                try:
                    async with deadline:
                        outcome = await self._build_kind(kind, Path(upload), scratch, report)
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
                await asyncio.to_thread(
                    _check_sizes, scratch / "out", outcome.artifacts, self._max_artifact
                )
                await asyncio.to_thread(_install, scratch / "out", Path(out_dir), outcome.artifacts)
            finally:
                # A thread finishes even if this await is cancelled, so the scratch dir goes.
                await asyncio.to_thread(shutil.rmtree, scratch, True)
        return BuildResult(
            kind=kind,
            artifacts=outcome.artifacts,
            toolchain=outcome.toolchain,
            build_ms=int((time.monotonic() - started) * 1000),
            log=_user_source_names(outcome.log, kind, filename),
            files={a: Path(out_dir) / ARTIFACT_FILES[a] for a in outcome.artifacts},
        )

    # -- per kind -----------------------------------------------------------------------------

    async def _build_kind(self, kind: str, upload: Path, scratch: Path,
                          report: Progress) -> _Outcome:
        out = scratch / "out"
        src = scratch / "src"
        out.mkdir()
        src.mkdir()
        if kind == "wasm":
            await asyncio.to_thread(_copy_checked, upload, out / ARTIFACT_FILES["wasm"], check_wasm, 0o644)
            return _Outcome(("wasm",), None, "")
        if kind == "native":
            await asyncio.to_thread(_copy_checked, upload, out / ARTIFACT_FILES["native"], check_elf, 0o755)
            return _Outcome(("native",), None, "")
        if kind == "go":
            return await self._build_go_file(upload, src, scratch, report)
        if kind == "go-module":
            return await self._build_go_module(upload, src, scratch, report)
        if kind == "c":
            return await self._build_c(upload, src, scratch, report)
        if kind == "zig":
            return await self._build_zig(upload, src, scratch, report)
        raise AssertionError(kind)  # validate_kind covers KINDS

    async def _build_go_file(self, upload: Path, src: Path, scratch: Path,
                             report: Progress) -> _Outcome:
        go = await self._go_toolchain()
        await asyncio.to_thread(shutil.copyfile, upload, src / "main.go")
        pkg = package_name(src / "main.go")
        if pkg is not None and pkg != "main":
            raise InvalidArgumentError(f"a .go upload must be package main, this is package {pkg}")
        (src / "go.mod").write_text(f"module {GO_MODULE_NAME}\n\ngo {go.language_version}\n")
        return await self._go_build(go, src, ".", "-mod=readonly", scratch, report,
                                    single_file=True)

    async def _build_go_module(self, upload: Path, src: Path, scratch: Path,
                               report: Progress) -> _Outcome:
        report("unpacking the module")
        await asyncio.to_thread(extract_zip, upload, src)
        root = find_module_root(src)
        mod = parse_go_mod((root / "go.mod").read_text("utf-8", "replace"))
        vendored = check_module(root, mod)
        pkg = find_main_package(root)
        go = await self._go_toolchain()
        return await self._go_build(go, root, pkg, "-mod=vendor" if vendored else "-mod=readonly",
                                    scratch, report, single_file=False)

    async def _go_build(self, go: GoToolchain, root: Path, pkg: str, goflags: str,
                        scratch: Path, report: Progress, *, single_file: bool) -> _Outcome:
        """Build wasip1/wasm and native concurrently; pkg is "." or "./cmd/<x>"."""
        (scratch / "home").mkdir(exist_ok=True)
        (scratch / "tmp").mkdir(exist_ok=True)
        env = {
            "PATH": "/usr/bin:/bin",
            "LANG": "C",
            "HOME": str(scratch / "home"),
            "TMPDIR": str(scratch / "tmp"),
            "GOPATH": str(scratch / "gopath"),
            "GOROOT": str(go.goroot),
            "GOCACHE": str(self._cache_dir / "go-build"),
            "GOMODCACHE": str(self._cache_dir / "gomod"),
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
            return await run_tool(argv, cwd=root, env=targets[artifact],
                                  memory_bytes=self._memory_bytes)

        results = await _run_concurrently({name: one(name) for name in targets})
        clean = {name: self._sanitize(res.output, root, scratch) for name, res in results.items()}
        for name, res in results.items():
            if res.returncode != 0:
                raise self._go_failure(name, clean[name], single_file)
        for name in targets:
            if not (scratch / "out" / ARTIFACT_FILES[name]).is_file():
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

    async def _build_c(self, upload: Path, src: Path, scratch: Path,
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
                "-o", str(scratch / "out" / ARTIFACT_FILES["wasm"]), "main.c"]
        outcome = await self._zig_run(zig, argv, src, scratch, "zig cc failed (wasm)")
        self._libc_warm = True
        return outcome

    async def _build_zig(self, upload: Path, src: Path, scratch: Path,
                         report: Progress) -> _Outcome:
        zig = await self._zig_toolchain()
        await asyncio.to_thread(shutil.copyfile, upload, src / "main.zig")
        report(f"building wasm (zig {zig.version})")
        argv = [str(zig.zig), "build-exe", "-target", "wasm32-wasi", "-O", "ReleaseSafe",
                "-fstrip", "--stack", str(WASM_STACK_BYTES),
                f"-femit-bin={scratch / 'out' / ARTIFACT_FILES['wasm']}", "main.zig"]
        return await self._zig_run(zig, argv, src, scratch, "zig build-exe failed (wasm)")

    async def _zig_run(self, zig: ZigToolchain, argv: list[str], src: Path, scratch: Path,
                       failure: str) -> _Outcome:
        env = {
            "PATH": "/usr/bin:/bin",
            "LANG": "C",
            "HOME": str(scratch / "home"),
            "TMPDIR": str(scratch / "tmp"),
            "ZIG_GLOBAL_CACHE_DIR": str(self._cache_dir / "zig"),
            "ZIG_LOCAL_CACHE_DIR": str(scratch / "zig-cache"),
        }
        (scratch / "home").mkdir(exist_ok=True)
        (scratch / "tmp").mkdir(exist_ok=True)
        res = await run_tool(argv, cwd=src, env=env, memory_bytes=self._memory_bytes)
        text = self._sanitize(res.output, src, scratch)
        if res.returncode != 0:
            raise BuildError(failure, {"log": text})
        if not (scratch / "out" / ARTIFACT_FILES["wasm"]).is_file():
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


def _check_sizes(out: Path, artifacts: tuple[ArtifactKind, ...], limit: int) -> None:
    """TOO_LARGE for a built artifact over ``limit`` bytes (a few bytes of source can ask
    for a huge initialised array; the store keeps every version for good)."""
    for artifact in artifacts:
        size = (out / ARTIFACT_FILES[artifact]).stat().st_size
        if size > limit:
            raise TooLargeError(
                f"the build made a {artifact} artifact of {size} bytes, over the {limit} byte"
                " limit on artifacts (--max-artifact-mb); large initialised data in the"
                " source is the usual cause",
                {"artifact": artifact, "size": size, "max_artifact": limit},
            )


def _install(out: Path, out_dir: Path, artifacts: tuple[ArtifactKind, ...]) -> None:
    """Move the artifacts into out_dir; all of them or (on failure) none of them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    done: list[Path] = []
    try:
        for artifact in artifacts:
            name = ARTIFACT_FILES[artifact]
            tmp = out_dir / f".{name}.partial"
            shutil.copyfile(out / name, tmp)
            os.chmod(tmp, 0o755 if artifact == "native" else 0o644)
            os.replace(tmp, out_dir / name)
            done.append(out_dir / name)
    except BaseException:
        for path in [*done, *(out_dir / f".{n}.partial" for n in ARTIFACT_FILES.values())]:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        raise


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
