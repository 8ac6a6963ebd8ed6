"""The pool's scheduling policy alone: no processes, no event loop, no clock, no sleeps.

Workers are plain strings; run times are passed in as numbers.
"""

from __future__ import annotations

import pytest

from fnserver.exec._policy import Placement, PolicyConfig, QueueFull, Scheduler, Ticket

SHORT = 0.001  # well under every threshold
MEDIUM = 0.02  # short enough to borrow (< 50 ms), too long to pipeline (>= 10 ms)
LONG = 1.0  # over every threshold


def make(
    workers: tuple[str, ...] = ("w0", "w1"), *, per_function: int = 1, max_queue: int = 8,
    **knobs: float,
) -> Scheduler[str, str]:
    s: Scheduler[str, str] = Scheduler(
        PolicyConfig(per_function=per_function, max_queue=max_queue, **knobs)  # type: ignore[arg-type]
    )
    for w in workers:
        assert s.add_worker(w) == []
    return s


def t(key: str, name: str = "") -> Ticket[str]:
    return Ticket(key, name or key)


def placed(ps: list[Placement[str, str]]) -> list[tuple[str, str]]:
    return [(p.ticket.payload, p.worker) for p in ps]


def learn(s: Scheduler[str, str], key: str, seconds: float) -> None:
    """Run one call of ``key`` that took ``seconds``, so the policy knows it."""
    ticket = t(key, "learn")
    [p] = s.submit(ticket)
    s.finished(p.worker, ticket, seconds)


def test_fifo_order_and_most_recently_used_worker() -> None:
    s = make(per_function=2)
    a, b, c = t("f", "a"), t("g", "b"), t("h", "c")
    assert placed(s.submit(a)) == [("a", "w1")]  # the most recently added: hottest caches
    assert placed(s.submit(b)) == [("b", "w0")]
    assert s.submit(c) == [] and s.queued == 1
    d = t("f", "d")
    assert s.submit(d) == [] and s.queued == 2
    # The first place to free goes to the first in line, whatever its worker was.
    assert placed(s.finished("w0", b, LONG)) == [("c", "w0")]
    assert placed(s.finished("w1", a, LONG)) == [("d", "w1")]
    assert s.queued == 0 and s.running() == {"f": 1, "h": 1}


def test_queue_bound_raises_queue_full() -> None:
    s = make(("w0",), max_queue=2)
    s.submit(t("f", "run"))
    s.submit(t("f", "q1"))
    s.submit(t("f", "q2"))
    with pytest.raises(QueueFull) as exc:
        s.submit(t("g", "q3"))
    assert (exc.value.queued, exc.value.max_queue) == (2, 2)
    assert s.queued == 2


def test_per_function_cap_leaves_a_worker_for_others() -> None:
    s = make(per_function=1)
    stuck1, stuck2, other = t("stuck", "s1"), t("stuck", "s2"), t("echo", "e")
    assert placed(s.submit(stuck1)) == [("s1", "w1")]
    # Unknown run time: not known short, so no borrowing the spare worker.
    assert s.submit(stuck2) == [] and s.idle == 1 and s.queued == 1
    # A call at its cap does not block the calls behind it.
    assert placed(s.submit(other)) == [("e", "w0")]
    assert s.running() == {"stuck": 1, "echo": 1}


def test_a_capped_call_does_not_block_later_calls_of_others() -> None:
    s = make(per_function=1)
    s.submit(t("stuck", "s1"))
    s.submit(t("stuck", "s2"))
    b1 = t("busy", "b1")
    [pb] = s.submit(b1)  # the other worker
    s.submit(t("late", "l1"))  # queued behind s2
    assert s.queued == 2
    # b1's worker frees: s2 is first in line but at its cap; l1 behind it gets the worker.
    assert placed(s.finished(pb.worker, b1, LONG)) == [("l1", pb.worker)]
    assert s.queued == 1


def test_short_function_borrows_left_over_idle_workers() -> None:
    s = make(per_function=1)
    learn(s, "nap", MEDIUM)
    a, b = t("nap", "a"), t("nap", "b")
    [pa] = s.submit(a)
    [pb] = s.submit(b)  # over its cap, but short: borrows the other worker
    assert {pa.worker, pb.worker} == {"w0", "w1"}
    assert s.running() == {"nap": 2} and s.idle == 0


def test_long_function_does_not_borrow() -> None:
    s = make(per_function=1)
    learn(s, "slow", LONG)
    assert len(s.submit(t("slow", "a"))) == 1
    assert s.submit(t("slow", "b")) == [] and s.idle == 1


def test_under_cap_calls_go_before_borrowers() -> None:
    s = make(per_function=1)
    learn(s, "nap", MEDIUM)
    n1, n2, n3 = t("nap", "n1"), t("nap", "n2"), t("nap", "n3")
    [p1] = s.submit(n1)
    [p2] = s.submit(n2)  # borrows the other worker
    assert s.submit(n3) == []  # queued: too long to pipeline
    e = t("echo", "e")
    assert s.submit(e) == [] and s.queued == 2
    # A place frees: echo (under its cap) goes first, although n3 came earlier.
    assert placed(s.finished(p1.worker, n1, MEDIUM)) == [("e", p1.worker)]
    assert placed(s.finished(p2.worker, n2, MEDIUM)) == [("n3", p2.worker)]


def test_pipelining_short_calls_into_busy_workers() -> None:
    s = make(("w0",), per_function=1, pipeline_max_depth=3)
    learn(s, "echo", SHORT)
    calls = [t("echo", f"c{i}") for i in range(5)]
    assert placed(s.submit(calls[0])) == [("c0", "w0")]
    assert placed(s.submit(calls[1])) == [("c1", "w0")]  # behind c0, in the worker's pipe
    assert placed(s.submit(calls[2])) == [("c2", "w0")]
    assert s.submit(calls[3]) == []  # depth 3 reached: waits in the pool
    assert s.held("w0") == ("echo", "echo", "echo") and s.queued == 1
    assert placed(s.finished("w0", calls[0], SHORT)) == [("c3", "w0")]


def test_pipelining_respects_the_budget_and_long_calls() -> None:
    s = make(("w0",), per_function=1, pipeline_max_s=0.01, pipeline_budget_s=0.006)
    learn(s, "echo", 0.004)
    learn(s, "slow", LONG)
    e1, e2, e3 = t("echo", "e1"), t("echo", "e2"), t("echo", "e3")
    s.submit(e1)
    assert placed(s.submit(e2)) == [("e2", "w0")]  # 4 ms held < 6 ms budget
    assert s.submit(e3) == []  # 8 ms held: over the budget
    # Nothing is pipelined behind a long call.
    s2 = make(("w0",), per_function=1)
    learn(s2, "slow", LONG)
    learn(s2, "echo", SHORT)
    s2.submit(t("slow", "s"))
    assert s2.submit(t("echo", "e")) == []
    # A long call is never pipelined, even behind short ones.
    s3 = make(("w0",), per_function=2)
    learn(s3, "echo", SHORT)
    learn(s3, "slow", LONG)
    s3.submit(t("echo", "e"))
    assert s3.submit(t("slow", "s")) == []


def test_pipelining_never_overtakes_a_waiting_call() -> None:
    s = make(("w0",), per_function=2)
    learn(s, "echo", SHORT)
    learn(s, "slow", LONG)
    e1 = t("echo", "e1")
    s.submit(e1)
    slow = t("slow", "s")
    assert s.submit(slow) == []  # may run (under its cap) but not be pipelined: waits
    e2 = t("echo", "e2")
    # e2 could be pipelined, but that would overtake the slow call waiting ahead of it.
    assert s.submit(e2) == [] and s.queued == 2
    assert placed(s.finished("w0", e1, SHORT)) == [("s", "w0")]
    assert s.queued == 1  # e2 now waits behind the long call in the pool, not in the worker


def test_withdrawn_call_unblocks_the_ones_behind() -> None:
    s = make(("w0",), per_function=2)
    learn(s, "echo", SHORT)
    learn(s, "slow", LONG)
    s.submit(t("echo", "e1"))
    slow, e2 = t("slow", "s"), t("echo", "e2")
    s.submit(slow)
    s.submit(e2)
    assert s.is_queued(slow)
    assert placed(s.withdraw(slow)) == [("e2", "w0")]  # nothing ahead of it any more
    assert not s.is_queued(slow) and s.withdraw(slow) == []


def test_worker_death_frees_its_places_and_learns_the_overrun() -> None:
    s = make(per_function=1)
    learn(s, "f", MEDIUM)
    f1, f2, g = t("f", "f1"), t("f", "f2"), t("g", "g")
    [p1] = s.submit(f1)
    s.submit(f2)  # borrows the other worker (f is short)
    assert s.submit(g) == []
    worker = p1.worker
    held, ps = s.remove_worker(worker, head_seconds=LONG)
    assert held == [f1]
    assert s.running() == {"f": 1}
    assert s.queued == 1 and ps == []  # no worker is free until the replacement is ready
    assert (s.recent_s("f") or 0.0) > 0.1  # remembered as long now
    assert placed(s.add_worker("w2")) == [("g", "w2")]
    # A finished call of a removed worker frees nothing twice.
    assert s.finished(worker, f1, SHORT) == []
    assert s.running() == {"f": 1, "g": 1}


def test_dead_worker_with_pipelined_calls_returns_them_in_order() -> None:
    s = make(("w0",), per_function=1)
    learn(s, "echo", SHORT)
    calls = [t("echo", f"c{i}") for i in range(3)]
    for c in calls:
        s.submit(c)
    held, _ = s.remove_worker("w0")
    assert held == calls and s.running() == {} and s.idle == 0


def test_drain_empties_the_queue_in_order() -> None:
    s = make(("w0",), per_function=1)
    s.submit(t("a"))
    q = [t("b"), t("c")]
    for x in q:
        s.submit(x)
    assert s.drain() == q and s.queued == 0


def test_recent_time_is_an_average_and_bounded() -> None:
    s = make(("w0",), recent_tracked=2)
    learn(s, "f", 1.0)
    learn(s, "f", 0.0)
    assert s.recent_s("f") == pytest.approx(0.7)
    learn(s, "g", 1.0)
    learn(s, "h", 1.0)
    assert s.recent_s("f") is None  # the oldest forgotten


def test_a_tenant_keeps_to_its_share_while_another_waits() -> None:
    s = make(("w0", "w1", "w2", "w3"), per_function=1)
    # One tenant spreads a flood over many functions: alone, it may use every worker.
    flood = [Ticket(f"a{i}", f"a{i}", group="acme") for i in range(6)]
    placements = [p for ticket in flood for p in s.submit(ticket)]
    assert len(placements) == 4 and s.queued == 2
    other = Ticket("echo", "b", group="globex")
    assert s.submit(other) == []  # every worker busy
    # The first worker to free goes to the other tenant, although acme's calls queued first:
    # acme holds 3 of 4 workers, more than its half.
    first = placements[0]
    assert placed(s.finished(first.worker, first.ticket, LONG)) == [("b", first.worker)]
    # With nobody else waiting, acme takes the next free worker again.
    second = placements[1]
    assert placed(s.finished(second.worker, second.ticket, LONG)) == [("a4", second.worker)]
    # Withdrawn and drained calls leave the counts straight.
    s.withdraw(flood[5])
    assert s.queued == 0 and s.drain() == []
    later = Ticket("other", "b2", group="globex")
    assert s.submit(later) == [] and s.queued == 1
    third = placements[2]
    assert placed(s.finished(third.worker, third.ticket, LONG)) == [("b2", third.worker)]


def test_bad_config_and_duplicate_worker() -> None:
    with pytest.raises(ValueError):
        Scheduler(PolicyConfig(per_function=0, max_queue=1))
    s = make(("w0",))
    with pytest.raises(ValueError):
        s.add_worker("w0")
