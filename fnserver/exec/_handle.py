"""One worker process seen from the event loop: the pipe channel and the worker handle.

:class:`PipeChannel` moves frames over the worker's stdin/stdout pipes and knows nothing of
calls. :class:`WorkerHandle` owns the process (pid, pidfd, process group), the calls written
to it and the wall-clock deadline of the running one; it reports what happens to a
:class:`WorkerListener` (the pool) and never reaches into the pool, nor the pool into it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..protocol import FnError, FrameDecoder
from ._policy import Ticket
from ._sandbox import HIDDEN_ENV, child_env
from ._wire import (
    PIPE_MAX_FRAME,
    PipeError,
    PipeMessage,
    Ready,
    RunError,
    RunOk,
    decode,
)

__all__ = ["Call", "NotStarted", "PipeChannel", "WorkerDied", "WorkerHandle", "WorkerListener"]

Reply = RunOk | RunError


class WorkerDied(Exception):
    """The worker died while running the call (or before it started any)."""


class NotStarted(Exception):
    """The call was queued behind another in a worker that died first: it never ran."""


@dataclass(eq=False)
class Call:
    """One request written to a worker's pipe; answered in order (the worker is sequential)."""

    worker: WorkerHandle
    ticket: Ticket[Any]
    timeout_s: float
    fut: asyncio.Future[Reply]
    started_ns: int = 0  # when it reached the head of the worker's queue (its guest started)


class WorkerListener(Protocol):
    """What a worker handle tells its owner. Every method is called from the event loop."""

    def worker_ready(self, worker: WorkerHandle) -> None:
        """The worker reported ready and takes calls."""

    def call_finished(self, worker: WorkerHandle, call: Call) -> None:
        """``call`` got its reply (``call.fut`` is resolved, unless the caller cancelled)."""

    def worker_dead(self, worker: WorkerHandle, calls: list[Call]) -> None:
        """The worker takes no more calls; ``calls`` it held failed (head first)."""

    def worker_exited(self, worker: WorkerHandle) -> None:
        """The worker process is gone and reaped."""


class _Reader(asyncio.Protocol):
    def __init__(self, channel: PipeChannel) -> None:
        self.channel = channel

    def data_received(self, data: bytes) -> None:
        self.channel.data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.channel.connection_lost()


class PipeChannel:
    """Frames over a pair of pipes: decoded messages go to ``on_message``; a closed or broken
    pipe calls ``on_closed`` (once)."""

    def __init__(
        self, on_message: Callable[[PipeMessage], None], on_closed: Callable[[], None]
    ) -> None:
        self._on_message = on_message
        self._on_closed = on_closed
        self._decoder = FrameDecoder(PIPE_MAX_FRAME)
        self._write: asyncio.WriteTransport | None = None
        self._read: asyncio.ReadTransport | None = None
        self._closed = False

    async def connect(self, wpipe: Any, rpipe: Any) -> None:
        """Attach to the child's stdin (``wpipe``) and stdout (``rpipe``)."""
        loop = asyncio.get_running_loop()
        try:
            self._write, _ = await loop.connect_write_pipe(asyncio.Protocol, wpipe)
            self._read, _ = await loop.connect_read_pipe(lambda: _Reader(self), rpipe)
        finally:
            if self._closed:
                # Closed (the worker died) while connecting: a transport made after that
                # close would otherwise hold its pipe open until garbage collection.
                self.close()

    @property
    def open(self) -> bool:
        """True once connected and until closed."""
        return self._write is not None and not self._closed

    def send(self, frame: bytes) -> bool:
        """Queue one encoded frame; False if the channel cannot take it."""
        if not self.open:
            return False
        assert self._write is not None
        self._write.write(frame)
        return True

    def data_received(self, data: bytes) -> None:
        """Feed bytes from the pipe; a frame that is not a pipe message closes the channel."""
        try:
            self._decoder.feed(data)
            messages = [decode(f) for f in self._decoder.frames()]
        except (FnError, PipeError):
            self._close_and_report()
            return
        for msg in messages:
            if self._closed:
                return
            self._on_message(msg)

    def connection_lost(self) -> None:
        """The other end closed its pipe."""
        self._close_and_report()

    def _close_and_report(self) -> None:
        if self._closed:
            return
        self.close()
        self._on_closed()

    def close(self) -> None:
        """Close both transports (idempotent); ``on_closed`` is not called."""
        self._closed = True
        for t in (self._read, self._write):
            if t is not None:
                t.close()


class WorkerHandle:
    """One worker process and the calls written to it.

    Calls are written to the pipe as soon as they are placed, so a worker with a call queued
    behind the running one starts it the moment it has replied, without waiting for the
    parent's next write (pipelining). Only the head of the call queue is running; its
    wall-clock deadline starts when it becomes the head.
    """

    def __init__(
        self,
        index: int,
        listener: WorkerListener,
        *,
        cache_dir: Path,
        uid: int | None,
        hidden: tuple[Path, ...] = (),
    ) -> None:
        self.index = index
        self._listener = listener
        self._loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[None] = self._loop.create_future()
        self.exited: asyncio.Future[int] = self._loop.create_future()
        self.info: Ready | None = None
        self.dead = False
        self._calls: deque[Call] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._channel = PipeChannel(self._on_message, self._on_closed)
        #: The worker's working directory (native calls get empty directories inside it).
        #: Made here, owned by the worker's uid, because a worker is SIGKILLed and cannot
        #: clean up after itself: its owner removes it (:meth:`remove_scratch`).
        self.scratch = Path(tempfile.mkdtemp(prefix="fnserver-worker-"))
        if uid is not None:
            os.chown(self.scratch, uid, uid)
        uid_arg = [str(uid)] if uid is not None else []
        # Minimal explicit environment; close_fds keeps every server fd out of the worker.
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "fnserver.exec._worker", str(index), str(cache_dir),
                 str(self.scratch), *uid_arg],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=None,
                close_fds=True,
                start_new_session=True,
                cwd="/",
                # Through the environment, not argv: a native call may read its worker's
                # command line (same uid), never its environment (the worker is not dumpable).
                env={**child_env(), HIDDEN_ENV: os.pathsep.join(str(p) for p in hidden)},
            )
        except BaseException:
            self.remove_scratch()
            raise
        self.pid = self._proc.pid
        self._pidfd = os.pidfd_open(self.pid)
        self._loop.add_reader(self._pidfd, self._on_exit)

    def remove_scratch(self) -> None:
        """Remove the worker's directory (blocking I/O: call it in a thread), once the worker
        and everything running under its uid are gone."""
        shutil.rmtree(self.scratch, ignore_errors=True)

    def __repr__(self) -> str:
        return f"<WorkerHandle {self.index} pid={self.pid}{' dead' if self.dead else ''}>"

    @property
    def uid(self) -> int | None:
        """The sandbox uid the worker dropped to (None before ready, or when not root)."""
        return None if self.info is None else self.info.uid

    @property
    def busy(self) -> bool:
        """True while any call is written to this worker and not answered."""
        return bool(self._calls)

    def head_started_ns(self) -> int:
        """When the running call started (0: none)."""
        return self._calls[0].started_ns if self._calls else 0

    async def connect(self) -> None:
        """Attach the pipes to the loop; a failure kills the worker."""
        assert self._proc.stdin is not None and self._proc.stdout is not None
        try:
            await self._channel.connect(self._proc.stdin, self._proc.stdout)
        except OSError:
            self.kill()

    # -- events from the loop -----------------------------------------------------------------

    def _on_message(self, msg: PipeMessage) -> None:
        if isinstance(msg, Ready):
            self.info = msg
            if not self.ready.done():
                self.ready.set_result(None)
            if not self.dead:
                self._listener.worker_ready(self)
        elif isinstance(msg, RunOk | RunError) and self._calls:
            head = self._calls.popleft()
            if not head.fut.done():  # cancelled while queued: its reply is dropped
                head.fut.set_result(msg)
            if self._calls:
                self._start_head()
            elif self._timer is not None:
                self._timer.cancel()
                self._timer = None
            # Right here, not when the caller's task resumes: the next queued job is written
            # in this same loop iteration, so the worker does not sit idle.
            self._listener.call_finished(self, head)
        else:
            self.kill()  # a reply with no call, or a message a worker never sends

    def _on_closed(self) -> None:
        # A worker closing its pipe (or sending garbage) is dead to us, whatever it is doing.
        self.kill()

    def _on_exit(self) -> None:
        self._loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._proc.wait()
        self._mark_dead()
        self._channel.close()
        # A transport closes the pipe it was given; a pipe no transport took (the worker died
        # before connect finished) is closed here, not left to the garbage collector.
        for pipe in (self._proc.stdin, self._proc.stdout):
            if pipe is not None and not pipe.closed:
                with contextlib.suppress(OSError):
                    pipe.close()
        if not self.exited.done():
            self.exited.set_result(self._proc.returncode)
        self._listener.worker_exited(self)

    def _mark_dead(self, head_error: BaseException | None = None) -> None:
        if self.dead:
            return
        self.dead = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        err = WorkerDied(f"worker {self.index} (pid {self.pid}) died")
        if not self.ready.done():
            self.ready.set_exception(err)
            self.ready.exception()  # retrieved: nobody may be waiting
        calls, self._calls = list(self._calls), deque()
        for i, call in enumerate(calls):
            if not call.fut.done():
                # Only the head ran; the calls behind it never reached the guest.
                call.fut.set_exception((head_error or err) if i == 0 else NotStarted())
                call.fut.exception()  # retrieved: the caller may be gone already
        self._listener.worker_dead(self, calls)

    def kill(self, head_error: BaseException | None = None) -> None:
        """SIGKILL the worker's whole process group (it is a session leader). Idempotent."""
        self._mark_dead(head_error)
        if self.exited.done():
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)

    # -- calls --------------------------------------------------------------------------------

    def _arm(self, seconds: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(self._loop.time() + seconds, self._overrun)

    def _start_head(self) -> None:
        head = self._calls[0]
        head.started_ns = time.perf_counter_ns()
        self._arm(head.timeout_s)

    def _overrun(self) -> None:
        self._timer = None
        # The parent's wall clock, a backstop: guests are stopped in the worker (epoch for CPU,
        # fnserver's own poll_oneoff for waits), so this fires only for a worker that stopped
        # answering (a wasmtime bug, a stuck native spawn).
        self.kill(TimeoutError())

    def submit(self, ticket: Ticket[Any], frame: bytes, timeout_s: float) -> Call:
        """Write one request; its reply arrives in ``call.fut`` after those queued before it."""
        call = Call(self, ticket, timeout_s, self._loop.create_future())
        if self.dead or not self._channel.send(frame):
            call.fut.set_exception(NotStarted())
            call.fut.exception()
            return call
        self._calls.append(call)
        if len(self._calls) == 1:
            self._start_head()
        return call

    def abandon(self, call: Call) -> None:
        """The caller is gone (cancelled): a running call takes its worker with it; a queued
        one still runs, and its reply is dropped."""
        if self._calls and self._calls[0] is call:
            self.kill()
