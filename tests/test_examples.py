"""``examples/`` and the README's quickstart, run for real (issue 12 item 7): every example is
registered with the ``fn`` command line and invoked; the quickstart block runs line by line in
bash against a server on port 0."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

import pytest

from fnserver.config import ServerConfig

from .conftest import ServerHandle, run_fn

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


async def _register_and_invoke(address: str, name: str, source: Path, stdin: bytes, *extra: str) -> bytes:
    code, out, err = await run_fn(address, "register", name, str(source), *extra)
    assert code == 0, err
    code, out, err = await run_fn(address, "invoke", name, input=stdin)
    assert code == 0, err
    return out


async def test_wat_example(handle: ServerHandle) -> None:
    out = await _register_and_invoke(handle.address, "echo", EXAMPLES / "wat" / "echo.wat", b"same bytes" * 10_000)
    assert out == b"same bytes" * 10_000


@pytest.mark.slow
async def test_go_file_example_with_its_environment(handle: ServerHandle) -> None:
    out = await _register_and_invoke(
        handle.address, "hello", EXAMPLES / "hello-go" / "main.go", b"world", "--env", "GREETING=hi"
    )
    assert out == b"hi, world\n"


@pytest.mark.slow
async def test_go_module_example_packed_from_its_folder(handle: ServerHandle) -> None:
    out = await _register_and_invoke(handle.address, "greet", EXAMPLES / "go-module", b"  fnserver \n")
    assert out == b"greetings, fnserver!\n"


@pytest.mark.slow
async def test_c_example(handle: ServerHandle) -> None:
    out = await _register_and_invoke(handle.address, "wc", EXAMPLES / "c" / "main.c", b"a b c\nd e\n")
    assert out == b"2 5 10\n"


@pytest.mark.slow
async def test_zig_example(handle: ServerHandle) -> None:
    out = await _register_and_invoke(handle.address, "upper", EXAMPLES / "zig" / "main.zig", b"shout")
    assert out == b"SHOUT\n"


def quickstart_block() -> list[str]:
    """The command lines of the README's Quickstart ``sh`` block."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Quickstart"):]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block is not None, "the Quickstart has no sh block"
    return [line for line in block.group(1).splitlines() if line.strip() and not line.lstrip().startswith("#")]


@pytest.mark.slow
async def test_readme_quickstart_runs(server_config: ServerConfig, tmp_path: Path) -> None:
    """Each line of the block, in order, in one bash (so ``ID=$(...)`` carries over), against a
    server on port 0; every line must exit 0, and the outputs the comments promise appear."""
    lines = quickstart_block()
    assert lines[0].startswith("fn new hello") and any("--async" in line for line in lines)
    # Native mode needs the sandbox (root with namespaces), or the operator's explicit opt-out.
    handle = ServerHandle(server_config)
    await handle.start(unsandboxed_native=os.geteuid() != 0)
    try:
        script = "set -euo pipefail\n" + "".join(
            f"echo '>>> {i}'\n{line}\necho\n" for i, line in enumerate(lines)
        )
        work = tmp_path / "work"
        work.mkdir()
        fn_dir = Path(sys.executable).parent  # where pip put the fn command
        proc = await asyncio.create_subprocess_exec(
            "bash", "-c", script, cwd=work,
            env={**os.environ, "FN_SERVER": handle.address, "PATH": f"{fn_dir}:{os.environ['PATH']}"},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 900)
    finally:
        await handle.stop()
    assert proc.returncode == 0, (out.decode(errors="replace"), err.decode(errors="replace"))
    text = out.decode()
    outputs = {int(m.group(1)): m.group(2) for m in re.finditer(r">>> (\d+)\n(.*?)(?=>>> |\Z)", text, re.S)}
    for i, line in enumerate(lines):
        if "--input world" in line and "@prod" not in line:
            assert "hello, world" in outputs[i], (line, outputs[i])
        if "hello@prod --input world" in line:
            assert "hi, world" in outputs[i], (line, outputs[i])
        if line.startswith("fn result"):
            assert "hi, later" in outputs[i], (line, outputs[i])
        if line.startswith("fn logs hello"):
            assert "async" in outputs[i] and "sync" in outputs[i]
        if line.startswith("fn stats hello"):
            assert re.search(r"^hello\s+1\s+\d+", outputs[i], re.M), outputs[i]
