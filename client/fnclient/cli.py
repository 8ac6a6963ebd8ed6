"""The ``fn`` command line: register, invoke, list, get, delete and alias functions.

Exit status: a platform error prints ``error: CODE: message`` on stderr and exits 125 (as
``env`` and ``docker run`` do for their own failures), so 0-124 stay the function's own exit
codes; usage errors exit 2 (argparse).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, TextIO

from . import __version__
from ._address import parse_addresses
from ._async import AsyncClient
from ._results import InvokeResult
from ._scaffold import LANGS, pack_directory, scaffold
from .protocol import (
    PROTOCOL_VERSION,
    BuildError,
    FnError,
    InvalidArgumentError,
    InvocationRecord,
    check_name,
    parse_version_ref,
)

__all__ = ["main", "parse_target"]

DEFAULT_SERVER: Final = "127.0.0.1:8080"
#: Exit status for the platform's own failures, distinct from a function's exit codes.
EXIT_ERROR: Final = 125
EXIT_USAGE: Final = 2
_MIB: Final = 1024 * 1024


def parse_target(text: str) -> tuple[str, int | str | None]:
    """Split ``NAME[@VERSION|@ALIAS]`` into the name and a version reference."""
    name, sep, ref = text.partition("@")
    if not name:
        raise argparse.ArgumentTypeError(f"missing function name in {text!r}")
    if not sep:
        return name, None
    if not ref:
        raise argparse.ArgumentTypeError(f"missing version or alias after '@' in {text!r}")
    try:
        return name, parse_version_ref(ref)
    except InvalidArgumentError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parse_delete_target(text: str) -> tuple[str, int | None]:
    name, ref = parse_target(text)
    if isinstance(ref, str):
        raise argparse.ArgumentTypeError(f"delete takes a version number, not an alias: {text!r}")
    return name, ref


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    """The ``fn`` argument parser; ``--server``/``--token`` work before or after the command."""
    # SUPPRESS defaults: a value given before the subcommand is not reset by the subparser.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--server",
        metavar="HOST:PORT",
        default=argparse.SUPPRESS,
        help="server address, tls://HOST:PORT for TLS; several nodes separated by commas"
        f" (default: $FN_SERVER or {DEFAULT_SERVER})",
    )
    common.add_argument(
        "--ca-file",
        metavar="PEM",
        default=argparse.SUPPRESS,
        help="CA certificates to verify a tls:// server with (default: $FN_CA_FILE, else the system's)",
    )
    common.add_argument(
        "--token", default=argparse.SUPPRESS, help="your token (default: $FN_TOKEN)"
    )

    parser = argparse.ArgumentParser(
        prog="fn", description="Manage and invoke fnserver functions.", parents=[common]
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"fn (fnclient) {__version__}, protocol {PROTOCOL_VERSION}",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "register", parents=[common], help="upload and build a new version",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_KINDS_HELP,
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("file", metavar="FILE|DIR", help="the file to upload, or a directory to pack (see below)")
    p.add_argument("--timeout", type=_positive_int, metavar="MS", help="time limit (ms)")
    p.add_argument("--memory", type=_positive_int, metavar="MB", help="memory limit (MiB)")
    p.add_argument(
        "--fuel",
        type=_positive_int,
        metavar="N",
        help="instruction budget (wasm mode): a CPU limit independent of machine speed",
    )
    p.add_argument("--alias", metavar="A", help="point this alias at the new version")
    p.add_argument("--kind", metavar="KIND", help="override the kind picked by the extension")
    p.add_argument("--description", metavar="TEXT")
    p.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE",
        help="an environment variable the function sees (repeatable; over --env-file)",
    )
    p.add_argument(
        "--env-file", metavar="FILE",
        help="environment variables, one KEY=VALUE per line (# comments, 'export' and quotes allowed)",
    )
    p.add_argument("--json", action="store_true", help="print the version metadata as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines, only the result")

    p = sub.add_parser(
        "invoke",
        parents=[common],
        help="run a function",
        usage="fn invoke [options] NAME[@VERSION|@ALIAS] [-- ARG...]",
    )
    p.add_argument("target", type=parse_target, metavar="NAME[@VERSION|@ALIAS]")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--input", metavar="TEXT", help="input text (default: read stdin)")
    source.add_argument("--input-file", metavar="PATH", help="read the input from a file")
    p.add_argument("--timeout", type=_positive_int, metavar="MS")
    p.add_argument("--mode", choices=["native", "wasm"])
    p.add_argument("--async", dest="async_", action="store_true",
                   help="queue the call and print its invocation id; 'fn result ID' fetches it")
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = sub.add_parser("result", parents=[common], help="the state or result of an async invocation")
    p.add_argument("id", metavar="ID")
    p.add_argument("--wait", action="store_true", help="wait until the call has finished")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("logs", parents=[common], help="a function's invocation records, newest last")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--version", type=_positive_int, metavar="V", help="only this version's calls")
    p.add_argument("--limit", type=_positive_int, default=20, metavar="N", help="how many (default 20)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new calls as they happen")
    p.add_argument("--json", action="store_true", help="one JSON object per line")

    p = sub.add_parser("stats", parents=[common], help="calls, errors and latency per function version")
    p.add_argument("name", metavar="NAME", nargs="?")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("list", parents=[common], help="list your tenant's functions")
    p.add_argument("--all", action="store_true", help="every tenant's functions (admin tokens)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("get", parents=[common], help="show a function and its versions")
    p.add_argument("target", type=parse_target, metavar="NAME[@VERSION|@ALIAS]")
    p.add_argument("--log", action="store_true", help="include each version's build log")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("delete", parents=[common], help="delete a version or a whole function")
    p.add_argument("target", type=_parse_delete_target, metavar="NAME[@VERSION]")
    p.add_argument("-y", "--yes", action="store_true",
                   help="delete every version of NAME without asking (needed when not on a terminal)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("alias", parents=[common], help="point an alias at a version")
    p.add_argument("name", metavar="NAME")
    p.add_argument("alias", metavar="ALIAS")
    p.add_argument("version", type=_positive_int, metavar="VERSION")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("ping", parents=[common], help="check the server answers, and how fast")
    p.add_argument("--count", type=_positive_int, default=1, metavar="N", help="round trips to time (default 1)")

    p = sub.add_parser("new", help="scaffold a working function in a new directory")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--lang", choices=sorted(LANGS), default="go", help="its language (default go)")
    p.add_argument("--dir", metavar="DIR", help="where (default: ./NAME)")

    p = sub.add_parser("whoami", parents=[common], help="show the tenant and role of your token")
    p.add_argument("--json", action="store_true")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``fn`` arguments; everything after the first ``--`` goes to the function."""
    args = list(sys.argv[1:] if argv is None else argv)
    # Split by hand: argparse cannot take positionals again after an option such as --json,
    # so `fn invoke f --json -- a` would fail with a trailing nargs='*' positional.
    fn_args: list[str] = []
    if "--" in args:
        cut = args.index("--")
        args, fn_args = args[:cut], args[cut + 1 :]
    parser = build_parser()
    ns = parser.parse_args(args)
    if fn_args and ns.command != "invoke":
        parser.error(f"'-- ARG...' is only accepted by 'fn invoke', not by 'fn {ns.command}'")
    ns.fn_args = fn_args
    ns.server = getattr(ns, "server", None) or os.environ.get("FN_SERVER") or DEFAULT_SERVER
    ns.token = getattr(ns, "token", None) or os.environ.get("FN_TOKEN") or None
    ns.ca_file = getattr(ns, "ca_file", None) or os.environ.get("FN_CA_FILE") or None
    if ns.command != "new":
        # A malformed address (http://..., a bad port) is a usage error (exit 2), not a
        # platform one: it never reached a server.
        try:
            parse_addresses(ns.server)
        except InvalidArgumentError as exc:
            parser.error(exc.message)
    return ns


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fn``; returns the exit status."""
    ns = parse_args(argv)
    try:
        return asyncio.run(_run(ns))
    except FnError as exc:
        _print_error(exc)
        return EXIT_ERROR
    except BrokenPipeError:
        # The reader of our output went away (`fn invoke f | head`); stay quiet like cat does.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except OSError as exc:
        # A local file that cannot be read is the caller's mistake, reported like argparse.
        print(f"fn: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def _print_error(exc: FnError) -> None:
    print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
    if isinstance(exc, BuildError):
        log = exc.details.get("log")
        if isinstance(log, str) and log:
            sys.stderr.write(log if log.endswith("\n") else log + "\n")
    sys.stderr.flush()


async def _run(ns: argparse.Namespace) -> int:
    if ns.command == "new":
        return _cmd_new(ns)
    if ns.command == "register":
        # The caller's own mistakes (a bad --env, a folder that cannot be packed) are said
        # before any connection, so they do not hide behind a server that is down.
        try:
            upload = await _prepare_upload(ns)
        except ValueError as exc:
            print(f"fn: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        async with AsyncClient(ns.server, ns.token, ca_file=ns.ca_file) as client:
            return await _cmd_register(client, ns, upload)
    async with AsyncClient(ns.server, ns.token, ca_file=ns.ca_file) as client:
        handler = _COMMANDS[ns.command]
        return await handler(client, ns)


# -- commands ------------------------------------------------------------------------------


def parse_env(pairs: Sequence[str], env_file: str | None) -> dict[str, str]:
    """``--env-file`` then each ``--env KEY=VALUE``; ValueError says what is wrong."""
    env: dict[str, str] = {}
    if env_file is not None:
        with open(env_file, encoding="utf-8") as f:
            for number, raw in enumerate(f, 1):
                line = raw.strip()
                if not line or line.startswith("#"):
                    continue
                if line.startswith("export "):
                    line = line[len("export "):].lstrip()
                key, eq, value = line.partition("=")
                if not eq or not key.strip():
                    raise ValueError(f"{env_file}:{number}: expected KEY=VALUE, got {raw.rstrip()!r}")
                value = value.strip()
                if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                    value = value[1:-1]
                env[key.strip()] = value
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise ValueError(f"--env takes KEY=VALUE, got {pair!r}")
        env[key] = value
    return env


@dataclass(frozen=True)
class _Upload:
    """What ``fn register`` sends: a path or packed bytes, the file name, the environment."""

    source: str | bytes
    filename: str | None
    env: dict[str, str]


async def _prepare_upload(ns: argparse.Namespace) -> _Upload:
    """The register's input, made without the server; ValueError says what is wrong."""
    env = parse_env(ns.env, ns.env_file)
    if not os.path.isdir(ns.file):
        return _Upload(ns.file, None, env)
    # Zipping a module reads every file: off the event loop, as all file work.
    packed = await asyncio.to_thread(pack_directory, Path(ns.file))
    if not ns.quiet and not ns.json:
        print(f"fn: uploading {ns.file} as {packed.what}", file=sys.stderr)
    source = packed.data if packed.data is not None else (packed.path or ns.file)
    return _Upload(source, packed.filename, env)


async def _cmd_register(client: AsyncClient, ns: argparse.Namespace, upload: _Upload) -> int:
    source, filename, env = upload.source, upload.filename, upload.env
    progress = _Progress(sys.stderr, filename or os.path.basename(ns.file), quiet=ns.quiet)

    async def heartbeat() -> None:
        while True:
            await asyncio.sleep(1.0)
            progress.tick()

    beat = asyncio.ensure_future(heartbeat())
    try:
        meta = await client.register(
            ns.name,
            source,
            filename=filename,
            timeout_ms=ns.timeout,
            memory_mb=ns.memory,
            fuel=ns.fuel,
            alias=ns.alias,
            kind=ns.kind,
            description=ns.description,
            progress=progress,
            env=env or None,
        )
    finally:
        beat.cancel()
        progress.finish()
    if ns.json:
        _print_json(meta)
        return 0
    artifacts = "+".join(str(a) for a in meta.get("artifacts") or []) or "?"
    build_s = (meta.get("build_ms") or 0) / 1000
    line = (
        f"registered {meta.get('name', ns.name)} version {meta.get('version')}"
        f" ({meta.get('kind', '?')}, {artifacts}, built in {build_s:.1f} s)"
    )
    aliases = meta.get("aliases") or []
    if aliases:
        line += f", aliases: {', '.join(map(str, aliases))}"
    print(line)
    return 0


class _Progress:
    """Progress events (§5.3), with the time since the upload began.

    On a terminal: a live display (rich): the upload's bar, then a line per stage with a
    spinner and its elapsed time. Redirected: plain lines, and only once the work has taken a
    couple of seconds, so quick registers (and quick failures, whose ``error: CODE: message``
    line comes first) stay silent while a long build never looks hung. ``--quiet``: nothing.
    """

    #: Redirected, stay quiet for this long; then say the stage at least this often.
    QUIET_S: Final = 2.0
    HEARTBEAT_S: Final = 15.0

    def __init__(self, out: TextIO, filename: str, *, quiet: bool = False) -> None:
        self.out = out
        self.filename = filename
        self.tty = out.isatty()
        self.quiet = quiet
        self._started = time.monotonic()
        self._said_upload = False
        #: Redirected: the newest stage line not printed yet, and when a line was last printed.
        self._pending: str | None = None
        self._stage_line = ""
        self._last_line = 0.0
        self._live: Any = None  # rich.progress.Progress, made on the first event
        self._upload: Any = None
        self._stage: Any = None

    def _elapsed(self) -> str:
        return f"[{time.monotonic() - self._started:5.1f}s]"

    def __call__(self, event: dict[str, Any]) -> None:
        if self.quiet:
            return
        if self.tty:
            self._show(event)
            return
        stage = event.get("stage")
        if stage == "upload":
            received, size = event.get("received") or 0, event.get("size") or 0
            if received < size or self._said_upload:
                return
            self._said_upload = True
            self._pending = f"uploaded {self.filename} ({size / _MIB:.1f} MiB)"
        else:
            self._pending = self._stage_line = f"{stage}: {event.get('message') or ''}"
        self.tick()

    def tick(self) -> None:
        """Redirected: print the newest stage once past the quiet start, and say the current
        stage again if nothing was printed for a while (called each second while it runs)."""
        if self.quiet or self.tty:
            return
        now = time.monotonic()
        if now - self._started < self.QUIET_S:
            return
        if self._pending is None and self._stage_line and now - self._last_line >= self.HEARTBEAT_S:
            self._pending = f"still {self._stage_line}"
        if self._pending is not None:
            self.out.write(f"{self._elapsed()} {self._pending}\n")
            self.out.flush()
            self._pending = None
            self._last_line = now

    def _show(self, event: dict[str, Any]) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        if self._live is None:
            self._live = Progress(
                SpinnerColumn(finished_text="[green]✓"),
                TextColumn("{task.description}"),
                BarColumn(bar_width=24),
                TimeElapsedColumn(),
                console=Console(file=self.out, force_terminal=True),
            )
            self._live.start()
        live = self._live
        stage = event.get("stage")
        if stage == "upload":
            received, size = event.get("received") or 0, event.get("size") or 0
            if self._upload is None:
                self._upload = live.add_task(f"uploading {self.filename} ({size / _MIB:.1f} MiB)", total=size or 1)
            live.update(self._upload, completed=received)
            return
        self._end_stage()
        message = event.get("message") or ""
        self._stage = live.add_task(f"{stage}: {message}" if stage else message, total=None)

    def _end_stage(self) -> None:
        if self._live is not None:
            if self._upload is not None:
                total = self._live.tasks[self._upload].total
                self._live.update(self._upload, completed=total)
            if self._stage is not None:
                self._live.update(self._stage, total=1, completed=1)

    def finish(self) -> None:
        """Close the live display (its last state stays on the terminal)."""
        if self._live is not None:
            self._end_stage()
            self._live.stop()
            self._live = None


async def _cmd_invoke(client: AsyncClient, ns: argparse.Namespace) -> int:
    name, version = ns.target
    if ns.input is not None:
        data = ns.input.encode("utf-8")
    elif ns.input_file is not None:
        with open(ns.input_file, "rb") as f:
            data = f.read()
    else:
        if sys.stdin.isatty():
            print("fn: reading the input from the terminal; end it with Ctrl-D (Ctrl-C cancels)", file=sys.stderr)
        data = await _read_stdin()
    if ns.async_:
        call_id = await client.invoke_async(
            name, data, version=version, args=ns.fn_args, timeout_ms=ns.timeout, mode=ns.mode
        )
        if ns.json:
            _print_json({"id": call_id, "state": "queued"})
        else:
            print(call_id)
        return 0
    result = await client.invoke(
        name, data, version=version, args=ns.fn_args, timeout_ms=ns.timeout, mode=ns.mode
    )
    if ns.json:
        _print_json(_result_json(result))
    else:
        _write_result(result)
    return result.exit_code % 256


async def _read_stdin(*, line: bool = False) -> bytes:
    """All of stdin (or, with ``line``, up to the first newline), read on a daemon thread:
    Ctrl-C reaches the event loop (and ends ``fn`` with 130) even while the read blocks on a
    terminal. Not ``asyncio.to_thread``: ``asyncio.run`` joins its executor's threads at exit,
    so a read still blocked there would hold ``fn`` until the user pressed Enter."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[bytes] = loop.create_future()

    def settle(data: bytes | None, exc: BaseException | None) -> None:
        if done.done():
            return
        if exc is not None:
            done.set_exception(exc)
        else:
            done.set_result(data or b"")

    def read() -> None:
        # os.read, not sys.stdin.buffer: a daemon thread blocked inside the buffered reader
        # holds its lock, and the interpreter aborts at exit waiting for it (after Ctrl-C).
        chunks = []
        try:
            while chunk := os.read(0, 1 if line else 1 << 16):
                chunks.append(chunk)
                if line and chunk == b"\n":
                    break
            data = b"".join(chunks)
        except Exception as exc:  # handed to the loop as it is
            loop.call_soon_threadsafe(settle, None, exc)
        else:
            loop.call_soon_threadsafe(settle, data, None)

    threading.Thread(target=read, name="fn-stdin", daemon=True).start()
    return await done


async def _ask(question: str) -> bool:
    """``question [y/N]`` on the terminal; True for y or yes. Ctrl-C while it waits exits 130."""
    sys.stderr.write(f"{question} [y/N] ")
    sys.stderr.flush()
    answer = (await _read_stdin(line=True)).decode("utf-8", "replace")
    return answer.strip().lower() in ("y", "yes")


def _result_json(result: InvokeResult) -> dict[str, Any]:
    """The result as JSON, bytes intact: output and stderr that are not UTF-8 are given as
    ``output_base64`` / ``stderr_base64`` instead."""
    out = result.to_wire()
    for key in ("output", "stderr"):
        data: bytes = out.pop(key)
        try:
            out[key] = data.decode("utf-8")
        except UnicodeDecodeError:
            out[f"{key}_base64"] = base64.b64encode(data).decode("ascii")
    return out


async def _cmd_result(client: AsyncClient, ns: argparse.Namespace) -> int:
    status = await client.result(ns.id, wait=ns.wait)
    if ns.json:
        doc = status.to_wire()
        if status.result is not None:
            doc["result"] = _result_json(status.result)
        _print_json(doc)
        return 0
    if status.state == "done" and status.result is not None:
        _write_result(status.result)
        return status.result.exit_code % 256
    if status.state == "failed" and status.error is not None:
        print(f"error: {status.error.code}: {status.error.message}", file=sys.stderr)
        return EXIT_ERROR
    print(f"{status.id}: {status.state} ({status.name})", file=sys.stderr)
    return 0


def _record_line(r: InvocationRecord) -> str:
    when = datetime.fromtimestamp(r.started, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z"
    outcome = f"exit {r.exit_code}" if r.error is None else r.error
    tail = r.stderr_tail.decode("utf-8", "replace").strip().replace("\n", " | ")
    line = (
        f"{when}  {r.name}@{r.version}  {r.mode:<5} {r.runtime:<6} {outcome:<10}"
        f" wall {r.wall_us / 1000:.2f} ms (queue {r.queue_us / 1000:.2f}, run {r.run_us / 1000:.2f})"
        f"  out {_size(r.output_size)}{'  cold' if r.cold else ''}  {r.id}"
    )
    return line + (f"\n    stderr: {tail[-200:]}" if tail else "")


async def _cmd_logs(client: AsyncClient, ns: argparse.Namespace) -> int:
    def show(r: InvocationRecord) -> None:
        if ns.json:
            print(json.dumps(r.to_json(), sort_keys=True), flush=True)
        else:
            print(_record_line(r), flush=True)

    if ns.follow:
        async for record in client.follow_logs(ns.name, version=ns.version, limit=ns.limit):
            show(record)
        return 0
    records = await client.logs(ns.name, version=ns.version, limit=ns.limit)
    if not records and not ns.json:
        print(f"no invocations of {ns.name} recorded yet", file=sys.stderr)
    for record in records:
        show(record)
    return 0


async def _cmd_stats(client: AsyncClient, ns: argparse.Namespace) -> int:
    stats = await client.stats(ns.name)
    if ns.json:
        _print_json(stats.to_wire())
        return 0
    rows = [["FUNCTION", "VERSION", "CALLS", "ERRORS", "P50 MS", "P99 MS", "WARM", "COLD"]]
    for f in stats.functions:
        errors = ",".join(f"{code}={n}" for code, n in sorted(f.errors.items())) or "-"
        rows.append([
            f.name, str(f.version), str(f.calls), errors,
            "-" if f.p50_ms is None else f"{f.p50_ms:.2f}",
            "-" if f.p99_ms is None else f"{f.p99_ms:.2f}",
            str(f.warm), str(f.cold),
        ])
    if len(rows) > 1:
        _print_table(rows)
    else:
        print("no calls recorded yet", file=sys.stderr)
    s = stats.server
    print(
        f"server: {s.processes} serving process(es), {s.connections} connection(s),"
        f" async queue {s.async_queued}, waiting {s.waiting}, native workers"
        f" {s.workers_busy} busy/{s.workers_idle} idle/{s.workers_total},"
        f" wasm {s.wasm_running}/{s.wasm_slots} slots, builds {s.builds_running},"
        f" loop lag {s.loop_lag_ms:.1f} ms"
    )
    return 0


def _write_result(result: InvokeResult) -> None:
    # Flush the text layers first: the bytes go underneath them, and must not overtake them.
    sys.stdout.flush()
    sys.stdout.buffer.write(result.output)
    sys.stdout.buffer.flush()
    sys.stderr.flush()
    sys.stderr.buffer.write(result.stderr)
    sys.stderr.buffer.flush()
    if result.truncated:
        print(f"fn: output truncated at {len(result.output)} bytes", file=sys.stderr)


async def _cmd_list(client: AsyncClient, ns: argparse.Namespace) -> int:
    functions = await client.list(all=ns.all)
    if ns.json:
        _print_json(functions)
        return 0
    if not functions:
        print("no functions yet: add one with 'fn register NAME FILE'", file=sys.stderr)
        return 0
    rows = [(["TENANT"] if ns.all else []) + ["NAME", "LATEST", "VERSIONS", "ALIASES", "KIND"]]
    for fn in functions:
        aliases = fn.get("aliases") or {}
        rows.append(
            ([str(fn.get("tenant", ""))] if ns.all else [])
            + [
                str(fn.get("name", "")),
                str(fn.get("latest", "")),
                _ranges(fn.get("versions") or []),
                ",".join(f"{a}={v}" for a, v in sorted(aliases.items())) or "-",
                str(fn.get("kind") or "-"),
            ]
        )
    _print_table(rows)
    return 0


async def _cmd_get(client: AsyncClient, ns: argparse.Namespace) -> int:
    name, ref = ns.target
    info = await client.get(name, ref, log=ns.log)
    if ns.json:
        _print_json(info)
        return 0
    aliases = info.get("aliases") or {}
    alias_text = ", ".join(f"{a} -> {v}" for a, v in sorted(aliases.items())) or "none"
    print(f"{info.get('name', name)}: latest version {info.get('latest')}, aliases: {alias_text}")
    versions = info.get("versions") or []
    if ref is None and not ns.log:
        # Every version: one aligned row each (``fn get NAME@V`` gives one version in full).
        rows = [["VERSION", "CREATED", "KIND", "ARTIFACTS", "SIZE", "TIMEOUT", "MEMORY", "FUEL", "ALIASES", "ENV"]]
        for meta in versions:
            limits = meta.get("limits") or {}
            rows.append([
                str(meta.get("version")),
                str(meta.get("created") or "-")[:19],
                str(meta.get("kind") or "-"),
                "+".join(str(a) for a in meta.get("artifacts") or []) or "-",
                _size(meta.get("size")).replace(" bytes", "B").replace(" ", ""),
                f"{limits.get('timeout_ms', '?')}ms",
                f"{limits.get('memory_mb', '?')}MiB",
                str(limits.get("fuel") or "-"),
                ",".join(map(str, meta.get("aliases") or [])) or "-",
                ",".join(map(str, meta.get("env") or [])) or "-",
            ])
        _print_table(rows)
        return 0
    for meta in versions:
        print(_describe_version(meta))
        if ns.log:
            log = str(meta.get("build_log") or "").rstrip()
            print("    build log:" + ("\n" + _indent(log, "      ") if log else " (empty)"))
    return 0


def _indent(text: str, prefix: str) -> str:
    return "\n".join(prefix + line for line in text.splitlines())


def _describe_version(meta: dict[str, Any]) -> str:
    limits = meta.get("limits") or {}
    artifacts = "+".join(str(a) for a in meta.get("artifacts") or []) or "-"
    lines = [
        f"  version {meta.get('version')}  created {meta.get('created', '?')}",
        f"    kind {meta.get('kind', '?')}, artifacts {artifacts}, mode {meta.get('mode', '?')}",
        f"    file {meta.get('filename', '?')}, {_size(meta.get('size'))},"
        f" sha256 {str(meta.get('sha256') or '')[:12]}",
        f"    limits {limits.get('timeout_ms', '?')} ms, {limits.get('memory_mb', '?')} MiB"
        + (f", fuel {limits['fuel']}" if limits.get("fuel") else ""),
        f"    toolchain {meta.get('toolchain') or '-'},"
        f" built in {(meta.get('build_ms') or 0) / 1000:.1f} s",
    ]
    if meta.get("aliases"):
        lines.append(f"    aliases {', '.join(map(str, meta['aliases']))}")
    if meta.get("description"):
        lines.append(f"    description {meta['description']}")
    if meta.get("env"):  # names only: the server never sends the values back
        lines.append(f"    env {', '.join(map(str, meta['env']))}")
    return "\n".join(lines)


async def _cmd_delete(client: AsyncClient, ns: argparse.Namespace) -> int:
    name, version = ns.target
    if version is None and not ns.yes:
        # Every version at once cannot be undone (numbers are never reused): ask, or refuse.
        if not sys.stdin.isatty():
            print(f"fn: error: 'fn delete {name}' deletes every version of {name};"
                  f" pass --yes to confirm, or name one version: fn delete {name}@VERSION", file=sys.stderr)
            return EXIT_USAGE
        if not await _ask(f"delete every version of {name}?"):
            print("nothing deleted", file=sys.stderr)
            return 1
    result = await client.delete(name, version)
    if ns.json:
        _print_json(result)
        return 0
    deleted = result.get("deleted") or []
    what = "version" if len(deleted) == 1 else "versions"
    line = f"deleted {result.get('name', name)} {what} {', '.join(map(str, deleted)) or 'none'}"
    removed = result.get("aliases_removed") or []
    if removed:
        line += f" (aliases removed: {', '.join(map(str, removed))})"
    print(line)
    return 0


async def _cmd_alias(client: AsyncClient, ns: argparse.Namespace) -> int:
    result = await client.alias(ns.name, ns.alias, ns.version)
    if ns.json:
        _print_json(result)
        return 0
    previous = result.get("previous")
    moved = f" (was {previous})" if previous is not None else ""
    print(
        f"{result.get('name', ns.name)}@{result.get('alias', ns.alias)}"
        f" -> version {result.get('version', ns.version)}{moved}"
    )
    return 0


async def _cmd_ping(client: AsyncClient, ns: argparse.Namespace) -> int:
    await client.connect()
    times = []
    for _ in range(ns.count):
        started = time.perf_counter()
        await client.ping()
        times.append((time.perf_counter() - started) * 1e3)
    info = client.server_info
    rtt = f"{times[0]:.2f} ms" if len(times) == 1 else (
        f"min {min(times):.2f} / median {sorted(times)[len(times) // 2]:.2f} / max {max(times):.2f} ms"
        f" over {len(times)}"
    )
    print(f"pong from {info.get('server', '?')} {info.get('server_version', '?')} at {client.address}: {rtt}")
    return 0


def _cmd_new(ns: argparse.Namespace) -> int:
    directory = Path(ns.dir or ns.name)
    try:
        check_name(ns.name)
    except InvalidArgumentError as exc:
        print(f"fn: error: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    try:
        written = scaffold(ns.name, ns.lang, directory)
    except FileExistsError as exc:
        print(f"fn: error: {exc}; pick another name or --dir", file=sys.stderr)
        return EXIT_USAGE
    print(f"created {', '.join(str(p) for p in written)}")
    print(f"next: fn register {ns.name} {directory} && fn invoke {ns.name} --input world")
    return 0


async def _cmd_whoami(client: AsyncClient, ns: argparse.Namespace) -> int:
    me = await client.whoami()
    if ns.json:
        print(json.dumps(me.to_wire()))
        return 0
    info = client.server_info
    print(f"tenant  {me.tenant}")
    print(f"role    {me.role}")
    print(f"token   {me.token_id or '(none: this server needs no token)'}")
    print(f"server  {client.address} ({info.get('server', '?')} {info.get('server_version', '?')})")
    return 0


_KINDS_HELP: Final = """\
what FILE may be (the kind comes from the extension; --kind overrides it):
  .wasm     wasm        a WASI preview 1 command module, used as is
  .wat      wat         WebAssembly text, converted to main.wasm
  .go       go          one package main file: main.wasm and a native main.bin
  .zip      go-module   a Go module (go.mod at the root or in one folder; vendored deps)
  .c        c           C source: main.wasm with zig cc -target wasm32-wasi
  .zig      zig         Zig source: main.wasm
  other     native      an ELF executable for the server's machine

A directory is packed: a Go module (go.mod at its top) is zipped, a folder with exactly
one .go, .c, .zig, .wat or .wasm file uploads that file (fn new NAME makes one)."""

_COMMANDS: Final = {
    "invoke": _cmd_invoke,
    "list": _cmd_list,
    "get": _cmd_get,
    "delete": _cmd_delete,
    "alias": _cmd_alias,
    "ping": _cmd_ping,
    "whoami": _cmd_whoami,
    "result": _cmd_result,
    "logs": _cmd_logs,
    "stats": _cmd_stats,
}


# -- formatting ----------------------------------------------------------------------------


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def _print_table(rows: list[list[str]]) -> None:
    """A header row and its rows: a rich table on a terminal, aligned plain columns when piped
    (what scripts and ``grep`` see)."""
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(*rows[0], box=None, header_style="bold", pad_edge=False)
        for row in rows[1:]:
            table.add_row(*row)
        Console().print(table)
        return
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _ranges(versions: Sequence[Any]) -> str:
    """``[1, 2, 3, 5]`` -> ``1-3,5``: long histories stay one column wide."""
    nums = sorted(v for v in versions if isinstance(v, int))
    parts: list[str] = []
    i = 0
    while i < len(nums):
        j = i
        while j + 1 < len(nums) and nums[j + 1] == nums[j] + 1:
            j += 1
        parts.append(str(nums[i]) if i == j else f"{nums[i]}-{nums[j]}")
        i = j + 1
    return ",".join(parts) or "-"


def _size(value: Any) -> str:
    if not isinstance(value, int):
        return "? bytes"
    if value < 1024:
        return f"{value} bytes"
    if value < _MIB:
        return f"{value / 1024:.1f} KiB"
    return f"{value / _MIB:.1f} MiB"


if __name__ == "__main__":  # pragma: no cover - `python -m fnclient.cli`
    sys.exit(main())
