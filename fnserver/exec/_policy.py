"""Which call runs where, and when: the pool's scheduling policy as a pure object.

:class:`Scheduler` knows no asyncio, no processes and no clock. Workers are opaque hashable
tokens; calls are :class:`Ticket` objects; times arrive as arguments. Every method that can
free or take a place returns the :class:`Placement` decisions it made, in order, and the
caller carries them out (writes the call into that worker's pipe). The pool's plumbing
(``_pool.py``) and this policy are tested apart: this one with plain unit tests.

The rules (each a test in tests/test_exec_policy.py):

- FIFO: calls wait in one bounded queue; past ``max_queue`` a submit raises
  :class:`QueueFull` (the pool answers UNAVAILABLE).
- Per-function cap: one function holds at most ``per_function`` workers, so a hot or stuck
  function always leaves a worker for the others; a call at its cap does not block the
  calls behind it.
- Borrowing: idle workers nobody under a cap is waiting for go to a function over its cap
  whose recent calls are short (under ``borrow_max_s``): one more of its calls then delays a
  newcomer by at most about that long. Without it, with 2 workers one function uses 1 core.
- Pipelining: when every worker is busy, a short call may be queued inside a busy worker
  behind the short calls it holds (at most ``pipeline_max_depth``, expected to take under
  ``pipeline_budget_s`` in all), so the worker goes from one call to the next without
  waiting for the parent. Queued calls are pipelined in FIFO order up to the first one that
  may run but may not be pipelined: nothing overtakes it.
- Tenants' shares: while another tenant has calls waiting, a tenant already holding its share
  of the workers (the workers divided among the tenants with calls running or waiting, at least
  one) gets no further worker, however many functions it spreads its calls over. With nobody
  else waiting it may use them all.
- A worker that dies frees the places of every call it held.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

__all__ = ["Placement", "PolicyConfig", "QueueFull", "Scheduler", "Ticket"]

W = TypeVar("W", bound=Hashable)
P = TypeVar("P")


@dataclass(frozen=True)
class PolicyConfig:
    """The knobs. Defaults measured on a 2-vCPU machine (bench/README.md): with 64 calls in
    flight on 2 workers, pipeline depth 2 / 4 / 8 / 16 gave C echo 4.0k / 4.9-5.9k / 6.7k /
    7.2k calls/s and Go echo 1.7k / 1.8-2.1k / 2.4k / 2.4k (fewer wake-ups per call)."""

    per_function: int
    max_queue: int
    #: A function over its cap may borrow an idle worker while its recent calls are shorter.
    borrow_max_s: float = 0.05
    #: Calls pipelined into a busy worker must each average under this ...
    pipeline_max_s: float = 0.01
    #: ... and all the calls already held there under this in total.
    pipeline_budget_s: float = 0.006
    pipeline_max_depth: int = 16
    #: Functions whose recent call time is remembered (an exponential average per function).
    recent_tracked: int = 4096
    #: Weight of the newest sample in the recent-time average.
    recent_weight: float = 0.3


@dataclass(eq=False)
class Ticket(Generic[P]):
    """One call to place: ``key`` is the function it counts against, ``group`` its tenant,
    ``payload`` the caller's own (opaque here)."""

    key: str
    payload: P
    group: str = ""


@dataclass(frozen=True)
class Placement(Generic[W, P]):
    """Decision: write ``ticket`` into ``worker`` (behind whatever it already holds)."""

    ticket: Ticket[P]
    worker: W


class QueueFull(Exception):
    """The FIFO holds ``max_queue`` calls already."""

    def __init__(self, queued: int, max_queue: int) -> None:
        super().__init__(f"{queued} calls queued (max {max_queue})")
        self.queued = queued
        self.max_queue = max_queue


@dataclass(eq=False)
class _WorkerState(Generic[P]):
    held: deque[Ticket[P]] = field(default_factory=deque)


class Scheduler(Generic[W, P]):
    """The scheduling state of one pool; see the module docstring for the rules."""

    def __init__(self, config: PolicyConfig) -> None:
        if config.per_function < 1:
            raise ValueError("per_function must be at least 1")
        self.config = config
        self._workers: dict[W, _WorkerState[P]] = {}
        self._idle: list[W] = []  # most recently used last: its caches are hottest
        self._queue: deque[Ticket[P]] = deque()
        self._running: Counter[str] = Counter()
        #: Calls placed and calls queued, per tenant (the shares rule).
        self._group_running: Counter[str] = Counter()
        self._group_queued: Counter[str] = Counter()
        self._recent_s: OrderedDict[str, float] = OrderedDict()

    # -- observation ------------------------------------------------------------------------

    @property
    def queued(self) -> int:
        """Calls waiting in the FIFO."""
        return len(self._queue)

    @property
    def idle(self) -> int:
        """Workers holding no call."""
        return len(self._idle)

    def running(self) -> dict[str, int]:
        """Calls placed in workers (running or pipelined), per function."""
        return dict(self._running)

    def held(self, worker: W) -> tuple[str, ...]:
        """The functions of the calls ``worker`` holds, head (running) first."""
        return tuple(t.key for t in self._workers[worker].held)

    def is_queued(self, ticket: Ticket[P]) -> bool:
        """True while ``ticket`` waits in the FIFO."""
        return ticket in self._queue

    def recent_s(self, key: str) -> float | None:
        """The recent average run time of ``key``, None if unknown."""
        return self._recent_s.get(key)

    # -- workers ----------------------------------------------------------------------------

    def add_worker(self, worker: W) -> list[Placement[W, P]]:
        """A worker is ready for calls."""
        if worker in self._workers:
            raise ValueError(f"worker {worker!r} is already known")
        self._workers[worker] = _WorkerState()
        self._idle.append(worker)
        return self._pump()

    def remove_worker(
        self, worker: W, *, head_seconds: float | None = None
    ) -> tuple[list[Ticket[P]], list[Placement[W, P]]]:
        """A worker is gone: return the calls it held (head first, the only one that may have
        started) and the placements their freed places allowed. ``head_seconds``: how long
        the head call had run (a call that overran its worker is remembered as long)."""
        state = self._workers.pop(worker, None)
        if state is None:
            return [], []
        if worker in self._idle:
            self._idle.remove(worker)
        held = list(state.held)
        for ticket in held:
            self._release(ticket)
        if held and head_seconds is not None:
            self._note_time(held[0].key, head_seconds)
        return held, self._pump()

    # -- calls ------------------------------------------------------------------------------

    def submit(self, ticket: Ticket[P]) -> list[Placement[W, P]]:
        """Place a call now if it may run, else queue it; :class:`QueueFull` past the bound."""
        if not self._queue and self._may_run(ticket.key, borrow=True):
            target = self._pick_idle() if self._idle else self._pipeline_target(ticket.key)
            if target is not None:
                return [self._place(ticket, target)]
        if len(self._queue) >= self.config.max_queue:
            raise QueueFull(len(self._queue), self.config.max_queue)
        self._enqueue(ticket)
        return self._pump()

    def drain(self) -> list[Ticket[P]]:
        """Empty the FIFO (the pool is closing); return what waited there, in order."""
        queued, self._queue = list(self._queue), deque()
        self._group_queued.clear()
        return queued

    def withdraw(self, ticket: Ticket[P]) -> list[Placement[W, P]]:
        """Take a queued call out (its caller gave up); no-op if it is not queued. Returns
        the placements its leaving allowed (it may have been blocking a pipelined one)."""
        try:
            self._dequeue(ticket)
        except ValueError:
            return []
        return self._pump()

    def finished(
        self, worker: W, ticket: Ticket[P], seconds: float | None
    ) -> list[Placement[W, P]]:
        """``ticket`` left ``worker`` answered; ``seconds`` is how long it ran (None: do not
        learn from it). Frees its place and places what may now run."""
        state = self._workers.get(worker)
        if state is None:
            return []  # the worker was removed: its calls' places are free already
        try:
            state.held.remove(ticket)
        except ValueError:
            return []
        self._release(ticket)
        if seconds is not None:
            self._note_time(ticket.key, seconds)
        if not state.held and worker not in self._idle:
            self._idle.append(worker)
        return self._pump()

    # -- the rules --------------------------------------------------------------------------

    def _release(self, ticket: Ticket[P]) -> None:
        for counter, key in ((self._running, ticket.key), (self._group_running, ticket.group)):
            counter[key] -= 1
            if counter[key] <= 0:
                del counter[key]

    def _enqueue(self, ticket: Ticket[P]) -> None:
        self._queue.append(ticket)
        self._group_queued[ticket.group] += 1

    def _dequeue(self, ticket: Ticket[P]) -> None:
        self._queue.remove(ticket)
        self._group_queued[ticket.group] -= 1
        if self._group_queued[ticket.group] <= 0:
            del self._group_queued[ticket.group]

    def _within_share(self, group: str) -> bool:
        """False if ``group`` holds its share of the workers while another tenant waits."""
        if len(self._group_queued) <= (1 if group in self._group_queued else 0):
            return True  # nobody else is waiting
        tenants = len(self._group_running.keys() | self._group_queued.keys())
        share = max(1, len(self._workers) // tenants)
        return self._group_running[group] < share

    def _note_time(self, key: str, seconds: float) -> None:
        old = self._recent_s.pop(key, None)
        w = self.config.recent_weight
        self._recent_s[key] = seconds if old is None else (1 - w) * old + w * seconds
        if len(self._recent_s) > self.config.recent_tracked:
            self._recent_s.popitem(last=False)

    def _may_run(self, key: str, *, borrow: bool) -> bool:
        if self._running[key] < self.config.per_function:
            return True
        limit = self.config.borrow_max_s
        return borrow and self._recent_s.get(key, limit) < limit

    def _short(self, key: str) -> bool:
        limit = self.config.pipeline_max_s
        return self._recent_s.get(key, limit) < limit

    def _pipeline_target(self, key: str) -> W | None:
        """The busy worker to queue a call of ``key`` in behind the short calls it holds: the
        one holding fewest; None if none may take it."""
        if not self._short(key):
            return None
        cfg = self.config
        best: W | None = None
        best_n = 0
        for worker, state in self._workers.items():
            n = len(state.held)
            if not 0 < n < cfg.pipeline_max_depth:
                continue
            recent = [self._recent_s.get(t.key, cfg.pipeline_max_s) for t in state.held]
            if max(recent) >= cfg.pipeline_max_s or sum(recent) >= cfg.pipeline_budget_s:
                continue
            if best is None or n < best_n:
                best, best_n = worker, n
        return best

    def _pick_idle(self) -> W:
        return self._idle.pop()  # the most recently used: its caches are hottest

    def _place(self, ticket: Ticket[P], worker: W) -> Placement[W, P]:
        self._workers[worker].held.append(ticket)
        self._running[ticket.key] += 1
        self._group_running[ticket.group] += 1
        return Placement(ticket, worker)

    def _pump(self) -> list[Placement[W, P]]:
        out: list[Placement[W, P]] = []
        # First pass: functions under their cap, in FIFO order. Second pass: idle workers left
        # over go to short functions over their cap (nobody under a cap is waiting then).
        for borrow in (False, True):
            if not self._idle or not self._queue:
                break
            for ticket in list(self._queue):
                if not self._idle:
                    break
                if not self._may_run(ticket.key, borrow=borrow) or not self._within_share(ticket.group):
                    continue
                self._dequeue(ticket)
                out.append(self._place(ticket, self._pick_idle()))
        if self._idle:
            return out
        # Third pass, every worker busy: queue short calls behind short running ones, in FIFO
        # order up to the first call that may run but not be pipelined (no overtaking it).
        for ticket in list(self._queue):
            if not self._may_run(ticket.key, borrow=True) or not self._within_share(ticket.group):
                continue
            target = self._pipeline_target(ticket.key)
            if target is None:
                break
            self._dequeue(ticket)
            out.append(self._place(ticket, target))
        return out
