"""The event loop watches itself: a callback that holds it too long is logged with its culprit.

asyncio's debug mode reports slow callbacks, but it costs on every callback. Here a heartbeat
on the loop (every ``interval_s``) measures how late it runs, and a watchdog thread, which
wakes at the same pace, samples the loop thread's stack (``sys._current_frames``) and the task
it is running the first time it sees the heartbeat overdue. When the late heartbeat finally
runs it logs one warning: how long the loop was held, in which task (the TCP front names each
request's task after its operation and connection) and at which line. A hog inside C code that
never releases the GIL is sampled right after it returns, in the Python code that called it.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from types import FrameType
from typing import Final

__all__ = ["LagMonitor"]

log = logging.getLogger("fnserver")

#: Frames of these files say little about who held the loop; the first other frame is named.
_PLUMBING: Final = ("asyncio/", "uvloop/", "/threading.py", "/selectors.py")


class LagMonitor:
    """Warns when the loop it was started on is held for more than ``threshold_s``."""

    def __init__(self, threshold_s: float = 0.1, interval_s: float = 0.05) -> None:
        self.threshold_s = threshold_s
        self.interval_s = interval_s
        #: Warnings logged so far (for tests and stats).
        self.warnings = 0
        self.worst_s = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._beat_at = 0.0  # time.monotonic() of the last heartbeat: written by the loop only
        self._culprit: str | None = None  # written by the watchdog, taken by the loop
        self._sampled_for = -1.0
        self._handle: asyncio.TimerHandle | None = None
        self._stop = threading.Event()
        self._window_at = time.monotonic()
        self._window_worst = 0.0
        self._previous_worst = 0.0
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Begin watching the running loop (call from it)."""
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._beat_at = time.monotonic()
        self._handle = self._loop.call_later(self.interval_s, self._beat)
        self._thread = threading.Thread(target=self._watch, name="fnserver-lag", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop watching; idempotent. The watchdog wakes every ``interval_s``, so this returns
        at once and the thread ends within one interval."""
        self._stop.set()
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._thread = None

    def _beat(self) -> None:
        now = time.monotonic()
        held = now - self._beat_at - self.interval_s
        # The worst lateness of the last few seconds, for the stats gauges (§5.14).
        if now - self._window_at > 5.0:
            self._window_at, self._previous_worst, self._window_worst = now, self._window_worst, 0.0
        self._window_worst = max(self._window_worst, held)
        if held > self.threshold_s:
            culprit, self._culprit = self._culprit, None
            self.warnings += 1
            self.worst_s = max(self.worst_s, held)
            log.warning(
                "event loop held for %.0f ms by %s",
                held * 1e3,
                culprit or "a callback that was not sampled",
            )
        self._beat_at = now
        if not self._stop.is_set() and self._loop is not None:
            self._handle = self._loop.call_later(self.interval_s, self._beat)

    def recent_lag_s(self) -> float:
        """The longest the loop was held (beyond the heartbeat's pace) in the last 5-10 s."""
        late = time.monotonic() - self._beat_at - self.interval_s if self._thread is not None else 0.0
        return max(0.0, self._window_worst, self._previous_worst, late)

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s):
            beat = self._beat_at
            if time.monotonic() - beat - self.interval_s <= self.threshold_s / 2:
                continue
            if beat == self._sampled_for:
                continue  # one sample per stall: the first is the closest to its start
            self._sampled_for = beat
            self._culprit = self._sample()

    def _sample(self) -> str:
        frame = sys._current_frames().get(self._loop_thread)
        where = _where(frame)
        task = None
        if self._loop is not None:
            try:
                task = asyncio.current_task(self._loop)
            except RuntimeError:  # pragma: no cover - the loop is closing
                task = None
        name = task.get_name() if task is not None else None
        return f"task {name!r} at {where}" if name else f"a callback at {where}"


def _where(frame: FrameType | None) -> str:
    """The innermost frame that is not the event loop's own plumbing, as ``func (file:line)``,
    with the innermost frame too when they differ (a hog in a library called from our code)."""
    inner = frame
    ours = frame
    while ours is not None and any(p in ours.f_code.co_filename for p in _PLUMBING):
        ours = ours.f_back
    if inner is None:
        return "an unknown place"
    text = _frame_text(ours or inner)
    if ours is not None and inner is not ours:
        text += f" in {_frame_text(inner)}"
    return text


def _frame_text(frame: FrameType) -> str:
    name = frame.f_code.co_filename
    # Relative to the package root, never an absolute server path in a log line people paste.
    for marker in ("/fnserver/", "/fnclient/", "/site-packages/", "/lib/python"):
        i = name.rfind(marker)
        if i >= 0:
            name = name[i + 1 :]
            break
    return f"{frame.f_code.co_name} ({name}:{frame.f_lineno})"
