"""Who runs next in the serving process, and where: pure policy for in-process wasm calls.

No asyncio, no threads, no clock of its own: times arrive as arguments, so every rule is a
plain unit test (tests/test_exec_policy.py).

:class:`Admission` bounds the calls running at once (``slots``: one pooled memory slot and at
most one guest thread each) and per function (``per_function``). Calls that must wait sit in
one FIFO per function, and a freed slot goes to the tenants in turn and, within a tenant, to
its functions in turn (round robin at both levels), so a function with a thousand calls
queued delays a newcomer's call by at most one turn, not a thousand, and a tenant flooding
with many functions gets one turn in as many as there are tenants waiting, not one per
function. Past ``max_queue`` waiting calls a submit raises :class:`~._policy.QueueFull`.

:class:`InlinePolicy` decides which calls run on the event loop's own thread (no thread
hand-off: the fast path) and which on a guest thread. Only a function whose recent calls were
all short runs inline, and an inline call gets a short slice (``_inproc.INLINE_SLICE_TICKS``);
a call that outlives its slice is stopped and run again from the start on a thread (a fresh
Store, the same input: a guest has no effect outside its Store), and its function runs on
threads for ``long_for_s``. An overrun also stops every function from running inline for
``pause_s``: however many functions one tenant registers, each made to look short and then to
run long, their slices hold the loop for at most one slice (20 ms) per ``pause_s`` (1 s).

One slightly long call (at most ``outlier_s``, under the shortest slice) among
``forgive_every`` short ones is forgiven, and a longer one after as many short ones keeps its
function on threads for ``pause_s`` rather than ``long_for_s`` (a second one gets it all): a
descheduled thread or a collector pass landing in a call must not send a 50 us function to
threads for ``long_for_s``, where every call costs two thread hand-offs (issue 8: one 16 ms collection inside a C echo's call halved its
throughput at 64 in flight for the next 10 s; the serving process now freezes what it made
while starting, so collections are shorter, but a descheduled thread still costs ms).
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

from ._policy import QueueFull

__all__ = ["Admission", "InlinePolicy", "Waiting"]

P = TypeVar("P")


@dataclass(eq=False)
class Waiting(Generic[P]):
    """One call: ``key`` is the function it counts against, ``group`` its tenant;
    ``payload`` is the caller's."""

    key: str
    payload: P
    admitted: bool = False
    group: str = ""


class Admission(Generic[P]):
    """Slots, per-function caps and round-robin queues; see the module docstring."""

    def __init__(self, slots: int, per_function: int, max_queue: int) -> None:
        if slots < 1 or per_function < 1 or max_queue < 0:
            raise ValueError("slots and per_function must be at least 1, max_queue at least 0")
        self.slots = slots
        self.per_function = per_function
        self.max_queue = max_queue
        self._running: Counter[str] = Counter()
        self._total = 0
        # Tenants with waiting calls, in turn order, each with its functions with waiting
        # calls in turn order: the next freed slot goes to the first tenant that has a function
        # under its cap, to the first such function of it; both then move to the back.
        self._ring: OrderedDict[str, OrderedDict[str, deque[Waiting[P]]]] = OrderedDict()
        self._waiting_keys: Counter[str] = Counter()  # functions with waiting calls
        self._queued = 0

    @property
    def running(self) -> int:
        """Calls holding a slot."""
        return self._total

    @property
    def queued(self) -> int:
        """Calls waiting for a slot."""
        return self._queued

    def running_by_key(self) -> dict[str, int]:
        """Calls holding a slot, per function."""
        return dict(self._running)

    def running_of(self, key: str) -> int:
        """Calls of ``key`` holding a slot."""
        return self._running[key]

    def submit(self, key: str, payload: P, group: str = "") -> Waiting[P]:
        """A new call of function ``key`` of tenant ``group``: admitted at once
        (``.admitted``) if a slot is free and ``key`` is under its cap and nobody of ``key``
        waits, else queued. Raises QueueFull. (``key`` must name one function server-wide,
        so it includes the tenant.)"""
        call = Waiting(key, payload, group=group)
        if self._total < self.slots and self._running[key] < self.per_function and (
            key not in self._waiting_keys
        ):
            self._admit(call)
            return call
        if self._queued >= self.max_queue:
            raise QueueFull(self._queued, self.max_queue)
        self._ring.setdefault(group, OrderedDict()).setdefault(key, deque()).append(call)
        self._waiting_keys[key] += 1
        self._queued += 1
        return call

    def finished(self, call: Waiting[P]) -> list[Waiting[P]]:
        """An admitted call ended: free its slot; return the calls admitted now, in order."""
        if not call.admitted:
            return []
        call.admitted = False
        self._total -= 1
        self._running[call.key] -= 1
        if self._running[call.key] <= 0:
            del self._running[call.key]
        return self._pump()

    def withdraw(self, call: Waiting[P]) -> None:
        """Take a waiting call out (its caller gave up); no-op if it is not waiting."""
        lines = self._ring.get(call.group)
        line = lines.get(call.key) if lines is not None else None
        if lines is None or line is None or call.admitted:
            return
        try:
            line.remove(call)
        except ValueError:
            return
        self._dequeued(call.group, lines, call.key, line)

    def drain(self) -> list[Waiting[P]]:
        """Empty every queue (closing); return what waited, oldest function first."""
        out = [c for lines in self._ring.values() for line in lines.values() for c in line]
        self._ring.clear()
        self._waiting_keys.clear()
        self._queued = 0
        return out

    def _admit(self, call: Waiting[P]) -> None:
        call.admitted = True
        self._total += 1
        self._running[call.key] += 1

    def _dequeued(self, group: str, lines: OrderedDict[str, deque[Waiting[P]]], key: str,
                  line: deque[Waiting[P]]) -> None:
        """One call of ``key`` left its queue: drop emptied queues from the rings."""
        self._queued -= 1
        self._waiting_keys[key] -= 1
        if self._waiting_keys[key] <= 0:
            del self._waiting_keys[key]
        if not line:
            del lines[key]
            if not lines:
                del self._ring[group]

    def _pump(self) -> list[Waiting[P]]:
        out: list[Waiting[P]] = []
        while self._total < self.slots and self._ring:
            pick = next(
                (
                    (group, lines, key)
                    for group, lines in self._ring.items()
                    for key in lines
                    if self._running[key] < self.per_function
                ),
                None,
            )
            if pick is None:
                return out  # every waiting function is at its cap
            group, lines, key = pick
            line = lines[key]
            call = line.popleft()
            if line:
                lines.move_to_end(key)
            if len(lines) > 1 or line:
                self._ring.move_to_end(group)
            self._dequeued(group, lines, key, line)
            self._admit(call)
            out.append(call)
        return out


@dataclass
class _Record:
    short_runs: int = 0
    thread_until: float = 0.0


#: Records looked at per eviction (a bound, so a flood of functions costs no long scans).
_EVICT_SCAN: Final = 8


class InlinePolicy:
    """Which functions run inline on the event loop's thread; see the module docstring.

    ``short_s``: a call that ran at most this long counts as short. ``after``: consecutive
    short calls before a function runs inline. ``long_for_s``: how long a function runs on
    threads after a call of it was not short. ``pause_s``: how long no function runs inline
    after any inline call overran its slice. ``tracked``: functions remembered (LRU).
    ``outlier_s`` / ``forgive_every``: a call of at most ``outlier_s`` after at least
    ``forgive_every`` consecutive short ones is forgiven (once per ``forgive_every``); a
    longer one after as many costs ``pause_s`` on threads instead of ``long_for_s``.
    """

    def __init__(
        self,
        *,
        short_s: float = 0.002,
        after: int = 3,
        long_for_s: float = 10.0,
        pause_s: float = 1.0,
        tracked: int = 4096,
        outlier_s: float = 0.008,
        forgive_every: int = 100,
    ) -> None:
        if forgive_every <= after:
            raise ValueError("forgive_every must be larger than after")
        self.short_s = short_s
        self.after = after
        self.long_for_s = long_for_s
        self.pause_s = pause_s
        self.outlier_s = outlier_s
        self.forgive_every = forgive_every
        self._paused_until = float("-inf")
        self.tracked = tracked
        self._seen: OrderedDict[str, _Record] = OrderedDict()

    def inline(self, key: str, now: float) -> bool:
        """True if the next call of ``key`` may run inline."""
        if now < self._paused_until:
            return False
        rec = self._seen.get(key)
        return rec is not None and rec.short_runs >= self.after and now >= rec.thread_until

    def note(self, key: str, seconds: float, now: float) -> None:
        """A call of ``key`` ran ``seconds`` to its end (inline or on a thread)."""
        rec = self._record(key, now)
        if seconds <= self.short_s:
            rec.short_runs += 1
        elif seconds <= self.outlier_s and rec.short_runs >= self.forgive_every:
            # Still inline; the count starts again at `after`, so the next outlier is
            # forgiven only after forgive_every - after more short calls.
            rec.short_runs = self.after
        else:
            # A call that took long on a thread would hold the loop as long inline. After a
            # long run of short calls it may still be a hiccup: threads for ``pause_s`` only,
            # and a second long call (its count is 0 now) gets the whole ``long_for_s``.
            hiccup = rec.short_runs >= self.forgive_every
            rec.short_runs = 0
            penalty = self.pause_s if hiccup else self.long_for_s
            rec.thread_until = max(rec.thread_until, now + penalty)

    def overran(self, key: str, now: float) -> None:
        """An inline call of ``key`` outlived its slice: threads only, for a while (and no
        inline call of anyone for ``pause_s``)."""
        rec = self._record(key, now)
        rec.short_runs = 0
        rec.thread_until = now + self.long_for_s
        self._paused_until = now + self.pause_s

    def _record(self, key: str, now: float) -> _Record:
        rec = self._seen.pop(key, None) or _Record()
        self._seen[key] = rec
        if len(self._seen) > self.tracked:
            self._evict(now)
        return rec

    def _evict(self, now: float) -> None:
        """Forget the least recently seen function, but not one still kept on threads
        (forgetting it would lift its penalty): among the oldest few, the first whose
        penalty is over; the oldest if none is (``pause_s`` still bounds the loop time)."""
        skipped: list[tuple[str, _Record]] = []
        try:
            # Never the newest: the record just made or refreshed is the caller's.
            for _ in range(min(_EVICT_SCAN, len(self._seen) - 1)):
                key, rec = self._seen.popitem(last=False)
                if now >= rec.thread_until:
                    return
                skipped.append((key, rec))
            skipped.pop(0)  # all penalized: the oldest goes after all
        finally:
            for key, rec in reversed(skipped):
                self._seen[key] = rec
                self._seen.move_to_end(key, last=False)
