"""``fnserver --config``, ``FNSERVER_*``, ``--print-config`` and the logs (issue 12 item 4):
the real ``python -m fnserver`` command, and servers started from a file."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from fnclient import AsyncClient

from fnserver.__main__ import parse_command

from .conftest import ServerProcess
from .wasm_fixtures import echo

ROOT = Path(__file__).resolve().parent.parent


def _fnserver(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    import os

    full = {k: v for k, v in os.environ.items() if not k.startswith("FNSERVER_")}
    return subprocess.run(
        [sys.executable, "-m", "fnserver", *args], capture_output=True, text=True, timeout=120,
        env={**full, **(env or {})}, cwd=cwd,
    )


def test_file_then_environment_then_flags(tmp_path: Path) -> None:
    conf = tmp_path / "fnserver.toml"
    conf.write_text('port = 9100\nworkers = 3\ndata_dir = "/srv/fn"\nno_warm = true\ntenant_max_rps = 5\n')
    config = parse_command(["--config", str(conf)]).config
    assert (config.port, config.workers, str(config.data_dir), config.warm_builds) == (9100, 3, "/srv/fn", False)
    assert config.tenant_limits.max_rps == 5.0
    run = _fnserver("--config", str(conf), "--print-config", env={"FNSERVER_PORT": "9200", "FNSERVER_WORKERS": "4"})
    assert run.returncode == 0, run.stderr
    doc = tomllib.loads(run.stdout)
    assert (doc["port"], doc["workers"], doc["data_dir"], doc["no_warm"]) == (9200, 4, "/srv/fn", True)
    run = _fnserver("--config", str(conf), "--port", "9300", "--print-config", env={"FNSERVER_PORT": "9200"})
    assert tomllib.loads(run.stdout)["port"] == 9300


def test_print_config_round_trips_and_never_shows_the_secret(tmp_path: Path) -> None:
    first = _fnserver("--print-config", "--metrics-port", "9999", "--log-format", "json",
                      env={"FNSERVER_TOKEN": "the-shared-secret"})
    assert first.returncode == 0, first.stderr
    assert "the-shared-secret" not in first.stdout and "token" not in tomllib.loads(first.stdout)
    saved = tmp_path / "effective.toml"
    saved.write_text(first.stdout)
    again = _fnserver("--config", str(saved), "--print-config")
    assert again.returncode == 0, again.stderr
    assert again.stdout == first.stdout
    # Every flag of --help is a key (the hidden internal ones are not).
    keys = set(tomllib.loads(first.stdout)) | {
        line[2:-2] for line in first.stdout.splitlines() if line.startswith("# ") and line.endswith(" =")
    }
    assert {"host", "port", "data_dir", "workers", "processes", "metrics_port", "log_format",
            "tenant_max_rps", "max_connections", "result_ttl"} <= keys
    assert not keys & {"serve_fd", "role", "control", "token", "config", "print_config"}


@pytest.mark.parametrize(
    ("text", "env", "says"),
    [
        ("bogus_option = 1\n", {}, "unknown option 'bogus_option'"),
        ('port = "eighty"\n', {}, "'port' must be an integer"),
        ("log_format = 'xml'\n", {}, "'log_format' must be one of text, json"),
        ("port = [\n", {}, "is not valid TOML"),
        ("", {"FNSERVER_INSECURE": "maybe"}, "FNSERVER_INSECURE"),
        ("", {"FNSERVER_WORKERS": "two"}, "FNSERVER_WORKERS: must be an integer"),
    ],
)
def test_bad_configuration_is_one_clear_line_and_exit_2(tmp_path: Path, text: str, env: dict[str, str], says: str) -> None:
    conf = tmp_path / "bad.toml"
    conf.write_text(text)
    run = _fnserver("--config", str(conf), "--print-config", env=env)
    assert run.returncode == 2
    assert says in run.stderr and "usage:" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1


def test_the_example_file_loads() -> None:
    run = _fnserver("--config", str(ROOT / "fnserver.example.toml"), "--print-config")
    assert run.returncode == 0, run.stderr


async def test_a_server_started_from_a_file_serves_and_logs_json_access_lines(tmp_path: Path) -> None:
    conf = tmp_path / "fnserver.toml"
    conf.write_text(
        f'port = 0\ndata_dir = "{tmp_path / "data"}"\nworkers = 2\nno_warm = true\n'
        'processes = 1\nlog_format = "json"\n'
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fnserver", "--config", str(conf), stderr=asyncio.subprocess.PIPE
    )
    assert proc.stderr is not None
    address = None
    while address is None:
        line = (await asyncio.wait_for(proc.stderr.readline(), 120)).decode()
        assert line, "the server exited before listening"
        doc = json.loads(line)  # every line is one JSON object
        if "listening on " in doc["msg"]:
            address = doc["msg"].split("listening on ")[1].split()[0]
    server = ServerProcess(proc, address)
    try:
        async with AsyncClient(address) as c:
            await c.register("echo", echo(), filename="echo.wasm")
            await c.invoke("echo", b"hi")
            await c.ping()
    finally:
        assert await server.stop() == 0
    lines = [json.loads(line) for line in server.log]
    access = [d for d in lines if d["logger"] == "fnserver.access"]
    invoke = next(d for d in access if d["op"] == "invoke")
    assert invoke["tenant"] == "default" and invoke["function"] == "echo@1" and invoke["code"] == "OK"
    assert invoke["duration_ms"] >= 0 and invoke["level"] == "info"
    assert any(d["op"] == "register" and d["function"] == "echo@1" for d in access)
    assert any(d["op"] == "ping" for d in access)


async def test_text_logs_have_one_access_line_per_request(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fnserver", "--port", "0", "--data-dir", str(tmp_path / "data"),
        "--workers", "2", "--processes", "1", stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    seen: list[str] = []
    while True:
        line = (await asyncio.wait_for(proc.stderr.readline(), 120)).decode()
        assert line, "the server exited before listening"
        seen.append(line)
        if "listening on " in line:
            address = line.split("listening on ")[1].split()[0]
            break
    server = ServerProcess(proc, address)
    try:
        async with AsyncClient(address) as c:
            with pytest.raises(Exception, match="no function"):
                await c.invoke("missing")
    finally:
        await server.stop()
    text = "".join(seen + server.log)
    assert "fnserver.access: invoke tenant=default function=missing outcome=NOT_FOUND duration_ms=" in text
    # The C toolchain warm-up says when it starts (and, given time, when it is done).
    assert "warming the C toolchain cache" in text


def test_token_commands_find_the_auth_file_the_server_would(tmp_path: Path) -> None:
    conf = tmp_path / "fnserver.toml"
    conf.write_text(f'data_dir = "{tmp_path / "from-file"}"\n')
    run = _fnserver("token", "add", "acme", "deployer", "--config", str(conf))
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "from-file" / "auth.toml").is_file()
    # FNSERVER_DATA_DIR over the file, a flag over both: the same precedence as the server's.
    run = _fnserver("token", "add", "acme", "invoker", "--config", str(conf),
                    env={"FNSERVER_DATA_DIR": str(tmp_path / "from-env")})
    assert run.returncode == 0 and (tmp_path / "from-env" / "auth.toml").is_file(), run.stderr
    run = _fnserver("token", "list", "--json", "--config", str(conf), "--data-dir", str(tmp_path / "from-flag"),
                    env={"FNSERVER_DATA_DIR": str(tmp_path / "from-env")})
    assert run.returncode == 0 and json.loads(run.stdout) == []
    listed = _fnserver("token", "list", "--json", "--config", str(conf))
    assert [t["role"] for t in json.loads(listed.stdout)] == ["deployer"]


def test_the_async_lease_comes_from_the_file_and_must_be_a_second_or_more(tmp_path: Path) -> None:
    conf = tmp_path / "fnserver.toml"
    conf.write_text("async_lease = 5\n")
    run = _fnserver("--config", str(conf), "--print-config")
    assert run.returncode == 0, run.stderr
    assert "async_lease = 5.0" in run.stdout.splitlines()
    for value in ("0.5", "0", "-3", "nan", "inf"):
        bad = _fnserver("--async-lease", value, "--print-config")
        assert bad.returncode == 2
        assert "--async-lease must be a number of seconds, at least 1" in bad.stderr
