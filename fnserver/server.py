"""The asyncio TCP front: connections, HELLO, dispatch, uploads, flow control (PROTOCOL.md).

The layer is thin on purpose: bytes go into the pure :class:`FrameDecoder`; each complete frame
is dispatched; replies of one read are joined into one ``transport.write`` (MEASURED.md: one
write per batch is ~4x cheaper than one per reply). Every background task is tracked, and an
exception in one becomes an error frame, never a silent loss.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import aiofiles

from . import __version__
from .build import KINDS, Builder
from .config import ServerConfig
from .exec import ExecPool, InvokeJob, Limits
from .protocol import (
    PROTOCOL_VERSION,
    FnError,
    FrameDecoder,
    InternalError,
    InvalidArgumentError,
    ProtocolError,
    TooLargeError,
    UnauthenticatedError,
    UnavailableError,
    check_alias,
    check_name,
    encode_error,
    encode_event,
    encode_response,
    parse_request,
    parse_version_ref,
)
from .protocol.errors import ChecksumMismatchError
from .registry import Registry

__all__ = ["FnServer"]

log = logging.getLogger("fnserver")

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
#: Upload bytes a connection may have queued for the disk writer before we stop reading it.
_UPLOAD_HIGH_WATER = 8 * 1024 * 1024
_UPLOAD_LOW_WATER = 2 * 1024 * 1024
_UPLOAD_FILE = "upload"
#: Requests one connection may have in flight; bounds what one client can make the server hold.
_MAX_IN_FLIGHT = 4096


#: The largest fuel budget a function may ask for (wasmtime counts about one unit per wasm
#: operator: 10**12 is minutes of CPU, well past any time limit).
MAX_FUEL = 10**12


def _present_limits(req: dict[str, Any]) -> dict[str, int]:
    limits = {"timeout_ms": req["timeout_ms"], "memory_mb": req["memory_mb"]}
    if req.get("fuel") is not None:
        limits["fuel"] = req["fuel"]
    return limits


def _opt_int(body: dict[str, Any], key: str, lo: int, hi: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise InvalidArgumentError(f"'{key}' must be an integer from {lo} to {hi}, got {value!r}")
    return value


def _req_str(body: dict[str, Any], key: str, max_len: int = 255) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value or len(value) > max_len or "\x00" in value:
        raise InvalidArgumentError(f"'{key}' must be a non-empty string of at most {max_len} characters")
    return value


class FnServer:
    """The fnserver service: registry, build and exec pool behind one TCP listener."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.registry = Registry(config.data_dir)
        self.pool = ExecPool(
            workers=config.workers, max_queue=config.max_queue, per_function=config.per_function
        )
        self.builder = Builder(
            config.cache_dir,
            max_concurrent=config.max_builds,
            timeout_s=config.build_timeout_s,
            memory_mb=config.build_memory_mb,
        )
        self.stopping = False
        self._server: asyncio.Server | None = None
        self._connections: set[Connection] = set()
        self._background: set[asyncio.Task[Any]] = set()
        self._stopped = asyncio.Event()

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        assert self._server is not None and self._server.sockets
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def address(self) -> str:
        """``host:port`` as a client would dial it."""
        host = self.config.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def hello_result(self) -> dict[str, Any]:
        """The HELLO reply (PROTOCOL.md §4)."""
        c = self.config
        return {
            "server": "fnserver",
            "server_version": __version__,
            "protocol": PROTOCOL_VERSION,
            "max_frame": c.max_frame,
            "max_upload": c.max_upload,
            "chunk_size": c.chunk_size,
            "limits": {
                "timeout_ms": c.default_timeout_ms,
                "max_timeout_ms": c.max_timeout_ms,
                "memory_mb": c.default_memory_mb,
                "max_memory_mb": c.max_memory_mb,
                "output_bytes": c.output_bytes,
            },
        }

    async def start(self) -> None:
        """Open the registry, start workers, then listen."""
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(self.registry.open)
        await self.pool.start()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: Connection(self), self.config.host, self.config.port, reuse_address=True
        )
        if self.config.warm_builds:
            self.spawn(self._warm_builds())
        log.info(
            "fnserver %s listening on %s (data %s)",
            __version__,
            self.address,
            self.config.data_dir,
        )

    async def _warm_builds(self) -> None:
        try:
            await self.builder.warm()
        except Exception as exc:  # a failed warm-up only means a slower first build
            log.warning("warming the C toolchain cache failed: %s", exc)

    def spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        """Run a server-owned background task; it is awaited or cancelled at stop."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

    async def serve_until_stopped(self) -> None:
        """Block until :meth:`stop` has finished."""
        await self._stopped.wait()

    async def stop(self) -> None:
        """Stop cleanly (PROTOCOL.md §7): refuse new work, let in-flight requests finish for
        ``shutdown_grace_s``, answer the rest with UNAVAILABLE, close everything."""
        if self.stopping:
            await self._stopped.wait()
            return
        self.stopping = True
        if self._server is not None:
            self._server.close()
        tasks = [t for c in self._connections for t in c.tasks]
        if tasks:
            await asyncio.wait(tasks, timeout=self.config.shutdown_grace_s)
        for conn in list(self._connections):
            conn.cancel_all()
        tasks = [t for c in self._connections for t in c.tasks]
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)
        for conn in list(self._connections):
            conn.close()
        current = asyncio.current_task()
        for task in list(self._background):
            if task is not current:
                task.cancel()
        others = [t for t in self._background if t is not current]
        if others:
            await asyncio.wait(others, timeout=2.0)
        await self.pool.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
        self._stopped.set()
        log.info("fnserver stopped")

    # --- operations (PROTOCOL.md §5); each returns the result map or raises FnError ---

    async def op_invoke(self, body: dict[str, Any]) -> dict[str, Any]:
        """§5.8: resolve, pick the artifact and limits, run in the pool."""
        name = check_name(body.get("name"))
        rec = self.registry.resolve(name, parse_version_ref(body.get("version")))
        data = body.get("input", b"")
        if isinstance(data, str):
            data = data.encode()
        if not isinstance(data, bytes):
            raise InvalidArgumentError("'input' must be bytes (msgpack bin)")
        args = body.get("args") or []
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise InvalidArgumentError("'args' must be a list of strings")
        meta = rec.meta
        artifacts = meta.get("artifacts", ["wasm"])
        mode = body.get("mode") or meta.get("mode", "wasm")
        if mode not in ("wasm", "native"):
            raise InvalidArgumentError(f"'mode' must be 'wasm' or 'native', got {mode!r}")
        if mode not in artifacts:
            raise InvalidArgumentError(
                f"function '{name}' version {rec.version} has no {mode} artifact"
                f" (it has: {', '.join(artifacts)})"
            )
        limits = meta.get("limits", {})
        timeout_ms = _opt_int(body, "timeout_ms", 1, self.config.max_timeout_ms)
        job = InvokeJob(
            function=name,
            version=rec.version,
            mode=mode,
            version_dir=rec.path,
            input=data,
            args=tuple(args),
            limits=Limits(
                timeout_ms=timeout_ms or int(limits.get("timeout_ms", self.config.default_timeout_ms)),
                memory_mb=int(limits.get("memory_mb", self.config.default_memory_mb)),
                fuel=limits.get("fuel") if mode == "wasm" else None,
                output_bytes=self.config.output_bytes,
            ),
        )
        res = await self.pool.invoke(job)
        # Output and stderr are each capped at output_bytes; stderr gives way so that the reply
        # always fits in one frame (a 4 KiB margin covers the envelope).
        room = max(0, self.config.max_frame - len(res.output) - 4096)
        return {
            "output": res.output,
            "stderr": res.stderr[:room],
            "truncated": res.truncated,
            "exit_code": res.exit_code,
            "version": rec.version,
            "mode": res.mode,
            "duration_us": res.duration_us,
            "queue_us": res.queue_us,
            "wall_us": res.wall_us,
            "memory_peak": res.memory_peak,
        }

    async def op_list(self, body: dict[str, Any]) -> dict[str, Any]:
        """§5.4."""
        return {"functions": self.registry.list()}

    async def op_get(self, body: dict[str, Any]) -> dict[str, Any]:
        """§5.5."""
        return self.registry.get(check_name(body.get("name")))

    async def op_delete(self, body: dict[str, Any]) -> dict[str, Any]:
        """§5.6."""
        name = check_name(body.get("name"))
        version = _opt_int(body, "version", 1, 2**62)
        return await asyncio.to_thread(self.registry.delete, name, version)

    async def op_alias(self, body: dict[str, Any]) -> dict[str, Any]:
        """§5.7."""
        name = check_name(body.get("name"))
        alias = check_alias(body.get("alias"))
        version = _opt_int(body, "version", 1, 2**62)
        if version is None:
            raise InvalidArgumentError("'version' is required")
        return await asyncio.to_thread(self.registry.set_alias, name, alias, version)

    async def op_ping(self, body: dict[str, Any]) -> dict[str, Any]:
        """§5.1."""
        return {"pong": True}

    def check_register(self, body: dict[str, Any]) -> dict[str, Any]:
        """Validate a §5.2 register request before any file is touched."""
        c = self.config
        name = check_name(body.get("name"))
        filename = _req_str(body, "filename")
        size = body.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise InvalidArgumentError("'size' must be a positive integer (an empty file is no function)")
        if size > c.max_upload:
            raise TooLargeError(
                f"upload of {size} bytes is over the maximum of {c.max_upload} bytes",
                {"size": size, "max_upload": c.max_upload},
            )
        sha = body.get("sha256")
        if not isinstance(sha, str) or not _SHA256_RE.match(sha):
            raise InvalidArgumentError("'sha256' must be 64 lowercase hex digits")
        opts = body.get("options") or {}
        if not isinstance(opts, dict):
            raise InvalidArgumentError("'options' must be a map")
        alias = opts.get("alias")
        if alias is not None:
            check_alias(alias)
        kind = opts.get("kind")
        if kind is not None and kind not in KINDS:
            raise InvalidArgumentError(f"unknown kind {kind!r}; kinds are: {', '.join(KINDS)}")
        description = opts.get("description") or ""
        if not isinstance(description, str) or len(description) > 1024:
            raise InvalidArgumentError("'description' must be a string of at most 1024 characters")
        return {
            "name": name,
            "filename": filename,
            "size": size,
            "sha256": sha,
            "alias": alias,
            "kind": kind,
            "description": description,
            "timeout_ms": _opt_int(opts, "timeout_ms", 1, c.max_timeout_ms) or c.default_timeout_ms,
            "memory_mb": _opt_int(opts, "memory_mb", 1, c.max_memory_mb) or c.default_memory_mb,
            # wasm only: an instruction budget, for limits that do not depend on machine speed.
            "fuel": _opt_int(opts, "fuel", 1, MAX_FUEL),
        }

    async def finish_register(
        self, req: dict[str, Any], staging: Path, event: Callable[[str, str], None]
    ) -> dict[str, Any]:
        """Build the staged upload, precompile, and commit one new version."""
        upload = staging / _UPLOAD_FILE
        built = await self.builder.build(
            upload,
            req["filename"],
            staging,
            kind=req["kind"],
            progress=lambda msg: event("build", msg),
        )
        upload.unlink()
        if "wasm" in built.artifacts:
            event("compile", "precompiling the WebAssembly module")
            await self.pool.precompile(staging)
        meta = {
            "filename": os.path.basename(req["filename"]),
            "size": req["size"],
            "sha256": req["sha256"],
            "kind": built.kind,
            "artifacts": list(built.artifacts),
            "mode": "wasm" if "wasm" in built.artifacts else "native",
            "limits": _present_limits(req),
            "description": req["description"],
            "toolchain": built.toolchain,
            "build_ms": built.build_ms,
        }
        if built.log:
            meta["build_log"] = built.log
        return await asyncio.to_thread(
            self.registry.commit, req["name"], staging, meta, alias=req["alias"]
        )


class _Upload:
    """One register in progress: chunks stream to a staging file through a writer task."""

    def __init__(self, conn: Connection, req_id: int, req: dict[str, Any], staging: Path) -> None:
        self.conn = conn
        self.req_id = req_id
        self.req = req
        self.staging = staging
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.queued = 0
        self.received = 0
        self.failed: FnError | None = None

    def feed(self, data: object) -> None:
        if not isinstance(data, bytes):
            self.failed = InvalidArgumentError("'data' of an upload frame must be bytes (msgpack bin)")
        elif self.received + len(data) > self.req["size"]:
            self.failed = TooLargeError(
                f"upload sent more than the announced {self.req['size']} bytes",
                {"size": self.req["size"]},
            )
        elif len(data) > self.conn.server.config.chunk_size:
            self.failed = InvalidArgumentError(
                f"upload chunk of {len(data)} bytes is over chunk_size {self.conn.server.config.chunk_size}"
            )
        if self.failed is not None:
            self.queue.put_nowait(b"")  # wake the writer so it reports the failure
            return
        assert isinstance(data, bytes)
        self.received += len(data)
        self.queued += len(data)
        self.queue.put_nowait(data)
        if self.queued > _UPLOAD_HIGH_WATER:
            self.conn.hold_reading(f"upload:{self.req_id}", True)

    async def run(self) -> dict[str, Any]:
        size = self.req["size"]
        digest = hashlib.sha256()
        written = 0
        last_event = 0
        async with aiofiles.open(self.staging / _UPLOAD_FILE, "wb") as f:
            while written < size:
                chunk = await self.queue.get()
                if self.failed is not None:
                    raise self.failed
                await f.write(chunk)
                digest.update(chunk)
                written += len(chunk)
                self.queued -= len(chunk)
                if self.queued < _UPLOAD_LOW_WATER:
                    self.conn.hold_reading(f"upload:{self.req_id}", False)
                if written - last_event >= 4 * 1024 * 1024 or written == size:
                    last_event = written
                    self.conn.send(
                        encode_event(
                            self.req_id,
                            "progress",
                            stage="upload",
                            message=f"received {written} of {size} bytes",
                            received=written,
                            size=size,
                        )
                    )
        if digest.hexdigest() != self.req["sha256"]:
            raise ChecksumMismatchError(
                f"upload sha256 is {digest.hexdigest()}, the register request announced {self.req['sha256']}",
                {"expected": self.req["sha256"], "actual": digest.hexdigest()},
            )

        def event(stage: str, message: str) -> None:
            self.conn.send(encode_event(self.req_id, "progress", stage=stage, message=message))

        return await self.conn.server.finish_register(self.req, self.staging, event)


_OPS: dict[str, Callable[[FnServer, dict[str, Any]], Awaitable[dict[str, Any]]]] = {
    "ping": FnServer.op_ping,
    "list": FnServer.op_list,
    "get": FnServer.op_get,
    "delete": FnServer.op_delete,
    "alias": FnServer.op_alias,
    "invoke": FnServer.op_invoke,
}


class Connection(asyncio.Protocol):
    """One client connection: frames in, replies out, requests in flight tracked by id."""

    def __init__(self, server: FnServer) -> None:
        self.server = server
        self.decoder = FrameDecoder(server.config.max_frame)
        self.transport: asyncio.Transport | None = None
        self.authenticated = False
        self.tasks: set[asyncio.Task[Any]] = set()
        self.in_flight: set[int] = set()
        self.uploads: dict[int, _Upload] = {}
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._holds: set[str] = set()
        self._closing = False

    # --- transport callbacks ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport does not subclass asyncio.Transport, so no isinstance check.
        self.transport = cast(asyncio.Transport, transport)
        self.server._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self.server._connections.discard(self)
        for task in list(self.tasks):
            task.cancel()

    def pause_writing(self) -> None:
        # The peer is not reading its replies: stop reading its requests until it catches up.
        self.hold_reading("write", True)

    def resume_writing(self) -> None:
        self.hold_reading("write", False)

    def data_received(self, data: bytes) -> None:
        try:
            self.decoder.feed(data)
            while (frame := self.decoder.next_frame()) is not None:
                self._dispatch(frame)
                if self._closing:
                    return
        except (ProtocolError, TooLargeError) as err:
            self.fail_connection(err)
        self._flush()

    # --- output ---

    def send(self, frame: bytes) -> None:
        """Queue a frame; frames queued in one loop iteration go out in one write."""
        if self._closing:
            return
        self._out.append(frame)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(self._out))
        self._out.clear()

    def hold_reading(self, reason: str, on: bool) -> None:
        """Pause reading while any reason holds (upload backlog, unread replies)."""
        if self.transport is None or self.transport.is_closing():
            return
        before = bool(self._holds)
        if on:
            self._holds.add(reason)
        else:
            self._holds.discard(reason)
        if bool(self._holds) != before:
            if self._holds:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    def fail_connection(self, err: FnError, req_id: int | None = None) -> None:
        """Send a connection-level error and close (PROTOCOL.md §2, §4)."""
        self.send(encode_error(req_id, err))
        self._flush()
        self.close()

    def close(self) -> None:
        """Close the transport after pending writes."""
        self._closing = True
        for upload in list(self.uploads.values()):
            upload.failed = upload.failed or UnavailableError("connection closed during upload")
            upload.queue.put_nowait(b"")
        if self.transport is not None:
            self.transport.close()

    def cancel_all(self) -> None:
        """Used at shutdown: requests still running now get UNAVAILABLE."""
        for task in list(self.tasks):
            task.cancel()

    # --- dispatch ---

    def _dispatch(self, frame: dict[str, Any]) -> None:
        try:
            op, req_id, body = parse_request(frame)
        except ProtocolError as err:
            self.fail_connection(err, frame.get("id") if isinstance(frame.get("id"), int) else None)
            return
        except FnError as err:
            self.send(encode_error(frame.get("id"), err))
            return
        if op == "upload":
            upload = self.uploads.get(req_id)
            if upload is not None:  # chunks for a finished or refused upload are dropped (§5.2)
                upload.feed(body.get("data"))
            return
        if not self.authenticated:
            self._hello(op, req_id, body)
            return
        if op == "hello":
            self.send(encode_error(req_id, InvalidArgumentError("HELLO was already sent")))
            return
        if len(self.in_flight) >= _MAX_IN_FLIGHT:
            self.send(
                encode_error(
                    req_id,
                    UnavailableError(
                        f"{_MAX_IN_FLIGHT} requests are already in flight on this connection;"
                        " wait for some replies"
                    ),
                )
            )
            return
        if req_id in self.in_flight:
            self.send(encode_error(req_id, InvalidArgumentError(f"request id {req_id} is already in flight")))
            return
        if self.server.stopping:
            self.send(encode_error(req_id, UnavailableError("server is shutting down")))
            return
        if op == "register":
            self._start_register(req_id, body)
            return
        self._run(req_id, _OPS[op](self.server, body))

    def _hello(self, op: str, req_id: int, body: dict[str, Any]) -> None:
        if op != "hello":
            self.fail_connection(UnauthenticatedError("the first request must be HELLO (PROTOCOL.md §4)"), req_id)
            return
        if body.get("protocol") != PROTOCOL_VERSION:
            self.fail_connection(
                ProtocolError(
                    f"protocol version {body.get('protocol')!r} is not supported; this server speaks {PROTOCOL_VERSION}",
                    {"protocol": PROTOCOL_VERSION},
                ),
                req_id,
            )
            return
        want = self.server.config.token
        if want is not None:
            got = body.get("token")
            if not isinstance(got, str) or not hmac.compare_digest(got.encode(), want.encode()):
                self.fail_connection(UnauthenticatedError("missing or wrong token"), req_id)
                return
        self.authenticated = True
        self.send(encode_response(req_id, self.server.hello_result()))

    def _start_register(self, req_id: int, body: dict[str, Any]) -> None:
        try:
            req = self.server.check_register(body)
        except FnError as err:
            self.send(encode_error(req_id, err))
            return
        staging = self.server.registry.new_staging()
        upload = _Upload(self, req_id, req, staging)
        self.uploads[req_id] = upload

        async def register() -> dict[str, Any]:
            try:
                return await upload.run()
            finally:
                self.uploads.pop(req_id, None)
                self.hold_reading(f"upload:{req_id}", False)
                # After a successful commit the staging dir was renamed away; discard is a no-op.
                self.server.registry.discard(staging)

        self._run(req_id, register())

    def _run(self, req_id: int, coro: Awaitable[dict[str, Any]]) -> None:
        self.in_flight.add(req_id)
        task = asyncio.ensure_future(self._answer(req_id, coro))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _answer(self, req_id: int, coro: Awaitable[dict[str, Any]]) -> None:
        started = time.monotonic()
        try:
            result = await coro
        except FnError as err:
            self.send(encode_error(req_id, err))
        except asyncio.CancelledError:
            self.send(encode_error(req_id, UnavailableError("server is shutting down")))
        except Exception as exc:
            log.exception("request %d failed", req_id)
            self.send(encode_error(req_id, InternalError(f"internal error: {type(exc).__name__}: {exc}")))
        else:
            try:
                self.send(encode_response(req_id, result))
            except Exception as exc:  # e.g. a reply over the frame limit
                self.send(encode_error(req_id, InternalError(f"cannot encode reply: {exc}")))
        finally:
            self.in_flight.discard(req_id)
            log.debug("request %d done in %.1f ms", req_id, (time.monotonic() - started) * 1e3)

