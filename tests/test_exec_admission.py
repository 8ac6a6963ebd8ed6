"""The in-process runner's pure policies alone (fnserver/exec/_admission.py).

:class:`Admission`: slots, the per-function cap, the bounded queue (``QueueFull``), one FIFO
per function served round robin, withdraw, finished and drain, and the counters; plus
hypothesis properties over random submit/finish/withdraw sequences.

:class:`InlinePolicy`: a function runs inline only after ``after`` consecutive short calls
and outside the ``long_for_s`` that follows a long call or an overrun; the ``pause_s`` that
follows any overrun, for every function; the LRU of ``tracked`` functions; plus a hypothesis
property against a reference model.

No event loop, no threads, no clock: times are plain numbers passed in.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fnserver.exec._admission import Admission, InlinePolicy, Waiting
from fnserver.exec._policy import QueueFull

SHORT = 0.001  # under the default short_s (2 ms)
LONG = 1.0  # well over it


def make(slots: int = 2, per_function: int = 1, max_queue: int = 8) -> Admission[str]:
    return Admission(slots, per_function, max_queue)


def names(calls: list[Waiting[str]]) -> list[str]:
    return [c.payload for c in calls]


# -- Admission: construction ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("slots", "per_function", "max_queue"), [(0, 1, 0), (1, 0, 0), (1, 1, -1), (-3, 1, 5)]
)
def test_rejects_bad_limits(slots: int, per_function: int, max_queue: int) -> None:
    with pytest.raises(ValueError):
        Admission[str](slots, per_function, max_queue)


def test_smallest_limits_are_accepted() -> None:
    adm = make(slots=1, per_function=1, max_queue=0)
    assert (adm.slots, adm.per_function, adm.max_queue) == (1, 1, 0)
    assert (adm.running, adm.queued, adm.running_by_key()) == (0, 0, {})


# -- Admission: slots, cap, queue -----------------------------------------------------------


def test_admits_up_to_slots_then_queues() -> None:
    adm = make(slots=3, per_function=3)
    calls = [adm.submit("f", f"c{i}") for i in range(5)]
    assert [c.admitted for c in calls] == [True, True, True, False, False]
    assert adm.running == 3
    assert adm.queued == 2
    assert adm.running_by_key() == {"f": 3}
    assert adm.running_of("f") == 3


def test_submit_returns_a_waiting_with_key_and_payload() -> None:
    adm = make()
    call = adm.submit("f", "payload")
    assert isinstance(call, Waiting)
    assert (call.key, call.payload, call.admitted) == ("f", "payload", True)


def test_slots_are_shared_across_functions() -> None:
    adm = make(slots=2, per_function=2)
    a = adm.submit("a", "a0")
    b = adm.submit("b", "b0")
    c = adm.submit("c", "c0")
    assert (a.admitted, b.admitted, c.admitted) == (True, True, False)
    assert adm.running_by_key() == {"a": 1, "b": 1}
    assert adm.queued == 1


def test_per_function_cap_queues_that_function_only() -> None:
    adm = make(slots=4, per_function=2)
    a = [adm.submit("a", f"a{i}") for i in range(3)]
    assert [c.admitted for c in a] == [True, True, False]
    assert adm.running == 2  # two slots are still free ...
    b = adm.submit("b", "b0")
    assert b.admitted  # ... and a call at its cap does not block another function
    assert adm.running_by_key() == {"a": 2, "b": 1}
    assert adm.running_of("a") == 2
    assert adm.queued == 1


def test_a_function_with_waiting_calls_queues_even_under_its_cap() -> None:
    """A newcomer of a function whose calls wait does not overtake them."""
    adm = make(slots=1, per_function=2)
    a0 = adm.submit("a", "a0")
    a1 = adm.submit("a", "a1")  # no slot: waits
    assert a0.admitted and not a1.admitted
    assert names(adm.finished(a0)) == ["a1"]
    assert adm.running_of("a") == 1


def test_running_of_unknown_function_is_zero_and_adds_nothing() -> None:
    adm = make()
    assert adm.running_of("nobody") == 0
    assert adm.running_by_key() == {}


def test_running_by_key_is_a_copy() -> None:
    adm = make()
    adm.submit("a", "a0")
    snapshot = adm.running_by_key()
    snapshot["a"] = 99
    snapshot["zzz"] = 1
    assert adm.running_by_key() == {"a": 1}


# -- Admission: QueueFull -------------------------------------------------------------------


def test_queue_full_past_max_queue() -> None:
    adm = make(slots=1, per_function=1, max_queue=2)
    adm.submit("a", "a0")
    adm.submit("a", "a1")
    adm.submit("b", "b0")
    with pytest.raises(QueueFull) as info:
        adm.submit("c", "c0")
    assert info.value.queued == 2
    assert info.value.max_queue == 2
    assert "2 calls queued (max 2)" in str(info.value)
    # The refused call left no trace.
    assert adm.queued == 2
    assert adm.running == 1
    assert adm.running_by_key() == {"a": 1}


def test_max_queue_zero_admits_or_refuses() -> None:
    adm = make(slots=1, per_function=1, max_queue=0)
    assert adm.submit("a", "a0").admitted
    with pytest.raises(QueueFull) as info:
        adm.submit("b", "b0")
    assert (info.value.queued, info.value.max_queue) == (0, 0)
    assert adm.queued == 0


def test_queue_full_also_for_a_call_at_its_cap_with_free_slots() -> None:
    adm = make(slots=3, per_function=1, max_queue=1)
    adm.submit("a", "a0")
    adm.submit("a", "a1")
    with pytest.raises(QueueFull):
        adm.submit("a", "a2")
    assert adm.submit("b", "b0").admitted  # a free slot is still a free slot


def test_queue_room_returns_when_calls_leave_the_queue() -> None:
    adm = make(slots=1, per_function=1, max_queue=1)
    a0 = adm.submit("a", "a0")
    a1 = adm.submit("a", "a1")
    with pytest.raises(QueueFull):
        adm.submit("b", "b0")
    adm.withdraw(a1)
    b0 = adm.submit("b", "b0")  # withdraw made room
    assert not b0.admitted
    assert names(adm.finished(a0)) == ["b0"]  # admission made room
    assert not adm.submit("c", "c0").admitted
    assert adm.queued == 1


# -- Admission: finished, FIFO, round robin -------------------------------------------------


def test_finished_frees_the_slot_and_admits_the_next() -> None:
    adm = make(slots=1, per_function=1)
    a0 = adm.submit("a", "a0")
    b0 = adm.submit("b", "b0")
    out = adm.finished(a0)
    assert out == [b0]
    assert b0.admitted and not a0.admitted
    assert adm.running_by_key() == {"b": 1}  # a's entry is gone, not 0
    assert adm.running_of("a") == 0
    assert (adm.running, adm.queued) == (1, 0)


def test_finished_with_nothing_waiting_returns_empty() -> None:
    adm = make()
    a0 = adm.submit("a", "a0")
    assert adm.finished(a0) == []
    assert (adm.running, adm.queued, adm.running_by_key()) == (0, 0, {})


def test_finished_twice_is_a_no_op() -> None:
    adm = make(slots=1)
    a0 = adm.submit("a", "a0")
    adm.submit("b", "b0")
    assert names(adm.finished(a0)) == ["b0"]
    assert adm.finished(a0) == []
    assert adm.running == 1
    assert adm.running_by_key() == {"b": 1}


def test_finished_of_a_waiting_call_is_a_no_op() -> None:
    adm = make(slots=1)
    adm.submit("a", "a0")
    b0 = adm.submit("b", "b0")
    assert adm.finished(b0) == []
    assert (adm.running, adm.queued) == (1, 1)
    assert not b0.admitted


def test_finished_admits_in_turn_order_under_caps() -> None:
    adm = make(slots=3, per_function=2)
    a = [adm.submit("a", f"a{i}") for i in range(4)]  # a0, a1 run; a2, a3 wait at the cap
    b = [adm.submit("b", f"b{i}") for i in range(2)]  # b0 runs; b1 waits (no slot)
    assert [c.admitted for c in a + b] == [True, True, False, False, True, False]
    # a0 ends: one slot; a is first in turn and under its cap now.
    assert names(adm.finished(a[0])) == ["a2"]
    # b0 ends: one slot; b is first in turn (a went to the back).
    assert names(adm.finished(b[0])) == ["b1"]
    assert adm.running_by_key() == {"a": 2, "b": 1}


def test_fifo_within_a_function() -> None:
    adm = make(slots=1, per_function=1, max_queue=16)
    first = adm.submit("a", "a0")
    for i in range(1, 6):
        adm.submit("a", f"a{i}")
    order = []
    running = first
    for _ in range(5):
        [running] = adm.finished(running)
        order.append(running.payload)
    assert order == ["a1", "a2", "a3", "a4", "a5"]
    assert adm.finished(running) == []


def test_round_robin_across_functions() -> None:
    adm = make(slots=1, per_function=1, max_queue=16)
    running = adm.submit("x", "x0")
    for i in range(3):
        adm.submit("a", f"a{i}")
    for i in range(2):
        adm.submit("b", f"b{i}")
    adm.submit("c", "c0")
    order = []
    while True:
        out = adm.finished(running)
        if not out:
            break
        [running] = out
        order.append(running.payload)
    assert order == ["a0", "b0", "c0", "a1", "b1", "a2"]
    assert (adm.running, adm.queued) == (0, 0)


def test_round_robin_across_tenants_then_their_functions() -> None:
    # Tenant "a" floods with four functions; tenant "b" has one: b's call waits one turn of
    # a, not four (a tenant's turn is shared by its functions, which take turns within it).
    adm = make(slots=1, per_function=1, max_queue=16)
    running = adm.submit("a/x", "x0", group="a")
    for f in ("p", "q", "r", "s"):
        adm.submit(f"a/{f}", f"{f}0", group="a")
    adm.submit("b/f", "b0", group="b")
    adm.submit("b/f", "b1", group="b")
    order = []
    while True:
        out = adm.finished(running)
        if not out:
            break
        [running] = out
        order.append(running.payload)
    assert order == ["p0", "b0", "q0", "b1", "r0", "s0"]
    assert (adm.running, adm.queued) == (0, 0)


def test_a_withdrawn_tenant_leaves_the_turn_order() -> None:
    adm = make(slots=1, per_function=1, max_queue=16)
    running = adm.submit("a/x", "x0", group="a")
    gone = adm.submit("b/f", "b0", group="b")
    adm.submit("c/f", "c0", group="c")
    adm.withdraw(gone)
    [nxt] = adm.finished(running)
    assert nxt.payload == "c0"
    assert adm.queued == 0


def test_a_long_queue_delays_a_newcomer_by_at_most_one_turn() -> None:
    adm = make(slots=1, per_function=1, max_queue=2000)
    running = adm.submit("hog", "hog0")
    for i in range(1, 1000):
        adm.submit("hog", f"hog{i}")
    newcomer = adm.submit("new", "new0")
    assert not newcomer.admitted
    [running] = adm.finished(running)
    assert running.payload == "hog1"  # the hog's turn ...
    assert adm.finished(running) == [newcomer]  # ... then the newcomer's, not 998 more
    assert adm.queued == 998


def test_a_newcomer_joins_the_back_of_the_turn_order() -> None:
    adm = make(slots=1, per_function=1)
    running = adm.submit("a", "a0")
    adm.submit("a", "a1")
    adm.submit("b", "b0")
    adm.submit("c", "c0")
    [running] = adm.finished(running)
    assert running.payload == "a1"  # a had its turn; its queue is empty: it leaves the ring
    adm.submit("a", "a2")  # a comes back behind c
    got = []
    while out := adm.finished(running):
        [running] = out
        got.append(running.payload)
    assert got == ["b0", "c0", "a2"]


def test_a_capped_function_keeps_its_turn_and_does_not_block_others() -> None:
    adm = make(slots=3, per_function=1, max_queue=16)
    a0 = adm.submit("a", "a0")
    adm.submit("a", "a1")  # waits: a at its cap
    b0 = adm.submit("b", "b0")
    c0 = adm.submit("c", "c0")
    adm.submit("b", "b1")  # waits: no slot (and b at its cap)
    adm.submit("d", "d0")  # waits: no slot
    # c0 ends: a and b are at their caps, d is not: d gets the slot.
    assert names(adm.finished(c0)) == ["d0"]
    # b0 ends: a still capped (first in turn, skipped), b under its cap now.
    assert names(adm.finished(b0)) == ["b1"]
    # a0 ends: a's turn.
    assert names(adm.finished(a0)) == ["a1"]
    assert adm.queued == 0
    assert adm.running_by_key() == {"a": 1, "b": 1, "d": 1}


def test_free_slots_with_only_capped_waiters_stay_free() -> None:
    adm = make(slots=4, per_function=1)
    a0 = adm.submit("a", "a0")
    adm.submit("a", "a1")
    adm.submit("a", "a2")
    b0 = adm.submit("b", "b0")
    assert adm.finished(b0) == []  # a is at its cap: nothing to admit
    assert (adm.running, adm.queued) == (1, 2)
    assert names(adm.finished(a0)) == ["a1"]


# -- Admission: withdraw and drain ----------------------------------------------------------


def test_withdraw_a_waiting_call() -> None:
    adm = make(slots=1, per_function=1)
    a0 = adm.submit("a", "a0")
    b0 = adm.submit("b", "b0")
    b1 = adm.submit("b", "b1")
    c0 = adm.submit("c", "c0")
    adm.withdraw(b0)
    assert adm.queued == 2
    assert not b0.admitted
    [nxt] = adm.finished(a0)
    assert nxt is b1  # b keeps its turn with what remains in its line
    assert adm.finished(b1) == [c0]


def test_withdraw_the_last_waiting_call_of_a_function_drops_its_turn() -> None:
    adm = make(slots=1, per_function=1)
    a0 = adm.submit("a", "a0")
    b0 = adm.submit("b", "b0")
    c0 = adm.submit("c", "c0")
    adm.withdraw(b0)
    assert adm.finished(a0) == [c0]
    # b may be admitted at once again once a slot is free.
    assert adm.finished(c0) == []
    assert adm.submit("b", "b1").admitted


def test_withdraw_is_a_no_op_for_admitted_unknown_or_repeated_calls() -> None:
    adm = make(slots=1, per_function=1)
    a0 = adm.submit("a", "a0")
    b0 = adm.submit("b", "b0")
    adm.withdraw(a0)  # admitted: not waiting
    assert (adm.running, adm.queued, a0.admitted) == (1, 1, True)
    adm.withdraw(Waiting("b", "not-submitted"))  # b has a line, this call is not in it
    adm.withdraw(Waiting("zzz", "never"))  # no line at all
    assert adm.queued == 1
    adm.withdraw(b0)
    adm.withdraw(b0)  # twice
    assert adm.queued == 0
    assert adm.finished(a0) == []


def test_withdraw_matches_by_identity_not_equal_fields() -> None:
    adm = make(slots=1, per_function=1)
    adm.submit("a", "a0")
    b = adm.submit("b", "same")
    twin = Waiting("b", "same")
    adm.withdraw(twin)
    assert adm.queued == 1
    adm.withdraw(b)
    assert adm.queued == 0


def test_drain_returns_every_waiting_call_in_turn_order() -> None:
    adm = make(slots=1, per_function=1, max_queue=16)
    running = adm.submit("x", "x0")
    adm.submit("a", "a0")
    adm.submit("b", "b0")
    adm.submit("a", "a1")
    adm.submit("b", "b1")
    adm.submit("c", "c0")
    assert names(adm.drain()) == ["a0", "a1", "b0", "b1", "c0"]
    assert adm.queued == 0
    assert adm.running == 1  # drain leaves running calls alone
    assert adm.finished(running) == []  # nothing left to admit
    assert adm.drain() == []


def test_drain_after_turns_follows_the_ring() -> None:
    adm = make(slots=1, per_function=1, max_queue=16)
    running = adm.submit("x", "x0")
    for i in range(2):
        adm.submit("a", f"a{i}")
    adm.submit("b", "b0")
    [running] = adm.finished(running)
    assert running.payload == "a0"  # a had its turn: now behind b
    drained = adm.drain()
    assert names(drained) == ["b0", "a1"]
    assert not any(c.admitted for c in drained)
    for call in drained:
        adm.withdraw(call)  # no-ops once drained
        assert adm.finished(call) == []
    assert adm.queued == 0
    assert adm.running == 1


def test_after_drain_submit_works_again() -> None:
    adm = make(slots=1, per_function=1, max_queue=1)
    a0 = adm.submit("a", "a0")
    adm.submit("b", "b0")
    adm.drain()
    b1 = adm.submit("b", "b1")  # queue room again
    assert not b1.admitted
    assert adm.finished(a0) == [b1]


# -- Admission: properties ------------------------------------------------------------------


@dataclass
class _Model:
    """What the test knows about every call it submitted."""

    seq: dict[int, int] = field(default_factory=dict)  # id(call) -> submit order
    waiting: list[Waiting[str]] = field(default_factory=list)
    running: list[Waiting[str]] = field(default_factory=list)
    ever_admitted: set[int] = field(default_factory=set)
    withdrawn: set[int] = field(default_factory=set)
    done: set[int] = field(default_factory=set)
    all_calls: list[Waiting[str]] = field(default_factory=list)


def _on_admitted(adm: Admission[str], m: _Model, call: Waiting[str]) -> None:
    assert call.admitted
    assert id(call) not in m.ever_admitted, "a call admitted twice"
    assert id(call) not in m.withdrawn, "a withdrawn call admitted"
    # FIFO within a function: nothing of its function submitted earlier still waits.
    assert not [
        w
        for w in m.waiting
        if w is not call and w.key == call.key and m.seq[id(w)] < m.seq[id(call)]
    ]
    m.ever_admitted.add(id(call))
    if call in m.waiting:
        m.waiting.remove(call)
    m.running.append(call)


def _check(adm: Admission[str], m: _Model) -> None:
    per_key: dict[str, int] = {}
    for c in m.running:
        per_key[c.key] = per_key.get(c.key, 0) + 1
    assert adm.running == len(m.running) <= adm.slots
    assert adm.queued == len(m.waiting) <= adm.max_queue
    assert adm.running_by_key() == per_key
    for key in {c.key for c in m.all_calls}:
        assert adm.running_of(key) == per_key.get(key, 0) <= adm.per_function
    for c in m.running:
        assert c.admitted
    for c in m.waiting:
        assert not c.admitted
    # No idle slot while a waiting function is under its cap (work conservation).
    if adm.running < adm.slots:
        for c in m.waiting:
            assert adm.running_of(c.key) >= adm.per_function


def _finish(adm: Admission[str], m: _Model, call: Waiting[str]) -> None:
    was_running = call in m.running
    out = adm.finished(call)
    if was_running:
        m.running.remove(call)
        m.done.add(id(call))
    else:
        assert out == []
    # One call frees one slot and one place under one cap: it lets in at most one call.
    assert len(out) <= 1
    for nxt in out:
        assert nxt in m.waiting
        _on_admitted(adm, m, nxt)


_OPS = st.lists(
    st.tuples(st.sampled_from(["submit", "finish", "withdraw"]), st.integers(0, 10_000)),
    max_size=120,
)


@settings(max_examples=300, deadline=None)
@given(
    slots=st.integers(1, 4),
    per_function=st.integers(1, 4),
    max_queue=st.integers(0, 6),
    nkeys=st.integers(1, 4),
    ops=_OPS,
)
def test_property_random_sequences_keep_the_invariants(
    slots: int, per_function: int, max_queue: int, nkeys: int, ops: list[tuple[str, int]]
) -> None:
    adm = make(slots, per_function, max_queue)
    m = _Model()
    counter = itertools.count()
    for op, n in ops:
        if op == "submit":
            key = f"k{n % nkeys}"
            queued_before = adm.queued
            admissible = (
                adm.running < slots
                and adm.running_of(key) < per_function
                and not any(w.key == key for w in m.waiting)
            )
            try:
                # Two tenants: every function belongs to one of them.
                call = adm.submit(key, f"{key}#{n}", group=f"t{(n % nkeys) % 2}")
            except QueueFull as exc:
                assert not admissible
                assert queued_before == max_queue
                assert (exc.queued, exc.max_queue) == (max_queue, max_queue)
            else:
                assert call.admitted == admissible
                m.seq[id(call)] = next(counter)
                m.all_calls.append(call)
                if call.admitted:
                    _on_admitted(adm, m, call)
                else:
                    m.waiting.append(call)
        elif m.all_calls:
            # Any call at all: running, waiting, finished or withdrawn (the last two: no-ops).
            call = m.all_calls[n % len(m.all_calls)]
            if op == "finish":
                _finish(adm, m, call)
            else:
                was_waiting = call in m.waiting
                adm.withdraw(call)
                if was_waiting:
                    m.waiting.remove(call)
                    m.withdrawn.add(id(call))
                    assert not call.admitted
        _check(adm, m)

    # Finish everything: every call submitted is then admitted-and-finished or withdrawn.
    while m.running:
        _finish(adm, m, m.running[0])
        _check(adm, m)
    assert m.waiting == []
    assert (adm.running, adm.queued, adm.running_by_key()) == (0, 0, {})
    for c in m.all_calls:
        assert (id(c) in m.done) != (id(c) in m.withdrawn)
        assert (id(c) in m.ever_admitted) == (id(c) in m.done)
    assert adm.drain() == []


@settings(max_examples=300, deadline=None)
@given(
    slots=st.integers(1, 3),
    per_function=st.integers(1, 3),
    backlog=st.lists(st.integers(0, 3), min_size=1, max_size=40),
    data=st.data(),
)
def test_property_a_newcomer_waits_at_most_one_turn_per_other_function(
    slots: int, per_function: int, backlog: list[int], data: st.DataObject
) -> None:
    """Whatever is queued and whatever else arrives meanwhile, before a newcomer (a function
    with nothing running or waiting) is admitted, each other function is admitted at most
    once."""
    adm = make(slots, per_function, max_queue=10_000)
    running: list[Waiting[str]] = []
    for i, k in enumerate(backlog):
        call = adm.submit(f"k{k}", f"k{k}#{i}")
        if call.admitted:
            running.append(call)
    newcomer = adm.submit("new", "new")
    turns: dict[str, int] = {}
    steps = 0
    while not newcomer.admitted:
        steps += 1
        assert steps < 10_000
        assert running, "the newcomer waits with nothing running"
        if data.draw(st.booleans(), label="submit more"):
            k = data.draw(st.integers(0, 3), label="key")
            call = adm.submit(f"k{k}", f"k{k}#late{steps}")
            assert not call.admitted  # no free slot while the newcomer waits
            continue
        call = running.pop(data.draw(st.integers(0, len(running) - 1), label="finish"))
        for nxt in adm.finished(call):
            if nxt is newcomer:
                continue
            turns[nxt.key] = turns.get(nxt.key, 0) + 1
            running.append(nxt)
    assert all(n <= 1 for n in turns.values()), turns


# -- InlinePolicy ---------------------------------------------------------------------------


def warm(policy: InlinePolicy, key: str, now: float, n: int | None = None) -> None:
    """``n`` (default: ``policy.after``) short calls of ``key`` ending at ``now``."""
    for _ in range(policy.after if n is None else n):
        policy.note(key, SHORT, now)


def test_inline_defaults() -> None:
    p = InlinePolicy()
    assert (p.short_s, p.after, p.long_for_s, p.pause_s, p.tracked) == (
        0.002,
        3,
        10.0,
        1.0,
        4096,
    )


def test_unknown_function_is_not_inline() -> None:
    p = InlinePolicy()
    assert not p.inline("f", 0.0)
    assert not p.inline("f", 1e9)


def test_inline_after_enough_short_calls() -> None:
    p = InlinePolicy(after=3)
    p.note("f", SHORT, 1.0)
    assert not p.inline("f", 1.0)
    p.note("f", SHORT, 2.0)
    assert not p.inline("f", 2.0)
    p.note("f", SHORT, 3.0)
    assert p.inline("f", 3.0)
    p.note("f", SHORT, 4.0)  # more short calls keep it inline
    assert p.inline("f", 4.0)


@pytest.mark.parametrize("after", [1, 2, 5])
def test_after_is_the_number_of_short_calls(after: int) -> None:
    p = InlinePolicy(after=after)
    warm(p, "f", 0.0, after - 1)
    assert not p.inline("f", 0.0)
    p.note("f", SHORT, 0.0)
    assert p.inline("f", 0.0)


def test_a_call_of_exactly_short_s_is_short() -> None:
    p = InlinePolicy(short_s=0.002, after=1)
    p.note("f", 0.002, 0.0)
    assert p.inline("f", 0.0)
    q = InlinePolicy(short_s=0.002, after=1)
    q.note("f", 0.0021, 0.0)
    assert not q.inline("f", 0.0)


def test_short_calls_must_be_consecutive() -> None:
    p = InlinePolicy(after=3, long_for_s=10.0)
    warm(p, "f", 0.0, 2)
    p.note("f", LONG, 0.0)  # resets the count
    warm(p, "f", 20.0, 2)  # long_for_s is over, but only 2 short calls since
    assert not p.inline("f", 20.0)
    p.note("f", SHORT, 20.0)
    assert p.inline("f", 20.0)


def test_a_long_call_stops_inline_for_long_for_s() -> None:
    p = InlinePolicy(after=3, long_for_s=10.0)
    warm(p, "f", 0.0)
    assert p.inline("f", 0.0)
    p.note("f", LONG, 5.0)
    assert not p.inline("f", 5.0)
    warm(p, "f", 6.0)  # short again at once, on threads ...
    assert not p.inline("f", 14.9)  # ... still not inline before 5 + 10
    assert p.inline("f", 15.0)  # exactly then it is


def test_a_later_long_call_extends_the_penalty() -> None:
    p = InlinePolicy(after=1, long_for_s=10.0)
    p.note("f", LONG, 0.0)
    p.note("f", LONG, 4.0)
    p.note("f", SHORT, 5.0)
    assert not p.inline("f", 10.0)
    assert not p.inline("f", 13.9)
    assert p.inline("f", 14.0)


def test_a_long_first_call_needs_after_short_calls_and_long_for_s() -> None:
    p = InlinePolicy(after=2, long_for_s=10.0)
    p.note("f", LONG, 0.0)
    assert not p.inline("f", 100.0)  # time alone is not enough
    warm(p, "f", 1.0)
    assert not p.inline("f", 9.9)
    assert p.inline("f", 10.0)


def test_overran_keeps_it_off_inline_for_long_for_s_then_it_comes_back() -> None:
    p = InlinePolicy(after=3, long_for_s=10.0)
    warm(p, "f", 0.0)
    assert p.inline("f", 1.0)
    p.overran("f", 1.0)
    assert not p.inline("f", 1.0)
    # Its rerun on a thread and the calls after it are short: they count ...
    warm(p, "f", 2.0)
    # ... but it stays on threads until 1 + 10 ...
    assert not p.inline("f", 5.0)
    assert not p.inline("f", 10.999)
    # ... and comes back then.
    assert p.inline("f", 11.0)
    assert p.inline("f", 1000.0)


def test_overran_resets_the_short_count() -> None:
    p = InlinePolicy(after=3, long_for_s=10.0)
    warm(p, "f", 0.0)
    p.overran("f", 0.0)
    warm(p, "f", 1.0, 2)
    assert not p.inline("f", 50.0)  # long_for_s over, but only 2 short calls since
    p.note("f", SHORT, 50.0)
    assert p.inline("f", 50.0)


def test_overran_of_an_unknown_function_records_it() -> None:
    p = InlinePolicy(after=1, long_for_s=10.0)
    p.overran("f", 0.0)
    p.note("f", SHORT, 1.0)
    assert not p.inline("f", 9.0)
    assert p.inline("f", 10.0)


def test_overran_then_a_long_rerun_on_a_thread() -> None:
    """What the runner does: overran at the slice, then note() the thread rerun's time."""
    p = InlinePolicy(after=1, long_for_s=10.0)
    p.note("f", SHORT, 0.0)
    p.overran("f", 1.0)
    p.note("f", 3.0, 4.0)  # the rerun took 3 s, ending at 4: threads until 14
    p.note("f", SHORT, 5.0)
    assert not p.inline("f", 11.0)
    assert p.inline("f", 14.0)


def test_functions_are_independent() -> None:
    p = InlinePolicy(after=2, long_for_s=10.0)
    warm(p, "a", 0.0)
    warm(p, "b", 0.0)
    p.overran("a", 1.0)
    p.note("c", LONG, 1.0)
    assert not p.inline("a", 3.0)  # pause_s (1 s) is over; a's own long_for_s is not
    assert p.inline("b", 3.0)
    assert not p.inline("c", 3.0)


def test_an_overrun_pauses_every_function_for_pause_s() -> None:
    p = InlinePolicy(after=1, long_for_s=10.0, pause_s=1.0)
    for key in ("a", "b", "c"):
        p.note(key, SHORT, 0.0)
    assert all(p.inline(k, 5.0) for k in ("a", "b", "c"))
    p.overran("a", 5.0)
    assert not p.inline("b", 5.0)
    assert not p.inline("c", 5.999)
    assert p.inline("b", 6.0)  # exactly pause_s later
    assert p.inline("c", 6.0)
    assert not p.inline("a", 6.0)  # a itself: long_for_s
    p.note("a", SHORT, 7.0)  # and a short call again, the overrun reset its count
    assert not p.inline("a", 14.999)
    assert p.inline("a", 15.0)


def test_the_pause_does_not_touch_other_functions_records() -> None:
    """Short calls during the pause still count; the pause only hides them for a while."""
    p = InlinePolicy(after=2, long_for_s=10.0, pause_s=2.0)
    p.note("b", SHORT, 0.0)
    p.overran("a", 1.0)
    p.note("b", SHORT, 1.5)
    assert not p.inline("b", 2.9)
    assert p.inline("b", 3.0)


def test_a_later_overrun_restarts_the_pause() -> None:
    p = InlinePolicy(after=1, long_for_s=10.0, pause_s=1.0)
    p.note("c", SHORT, 0.0)
    p.overran("a", 1.0)
    p.overran("b", 1.5)
    assert not p.inline("c", 2.0)
    assert not p.inline("c", 2.499)
    assert p.inline("c", 2.5)


def test_long_calls_do_not_pause_anyone_else() -> None:
    p = InlinePolicy(after=1, long_for_s=10.0, pause_s=1.0)
    p.note("b", SHORT, 0.0)
    p.note("a", LONG, 1.0)  # a slow call on a thread, not an overrun
    assert p.inline("b", 1.0)
    assert not p.inline("a", 1.0)


def test_many_functions_overrunning_hold_the_loop_once_per_pause() -> None:
    """One tenant's many functions, each warmed up and then running long: the runner asks
    inline() before each call and reports overran() when an inline call outlives its
    slice. At most one inline overrun per pause_s, across all of them."""
    p = InlinePolicy(after=3, long_for_s=10.0, pause_s=1.0)
    keys = [f"f{i}" for i in range(50)]
    for k in keys:
        warm(p, k, 0.0)
    overruns: list[float] = []
    t = 0.0
    while t < 5.0:
        for k in keys:
            if p.inline(k, t):
                p.overran(k, t)
                overruns.append(t)
        t += 0.25
    assert overruns == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_pause_s_zero_pauses_nobody() -> None:
    p = InlinePolicy(after=1, long_for_s=10.0, pause_s=0.0)
    p.note("b", SHORT, 0.0)
    p.overran("a", 1.0)
    assert p.inline("b", 1.0)


def test_inline_is_a_pure_query() -> None:
    p = InlinePolicy(after=2, long_for_s=10.0, tracked=1)
    warm(p, "a", 0.0)
    for t in range(50):
        assert not p.inline("other", float(t))  # does not create or evict anything
    assert p.inline("a", 0.0)
    assert p.inline("a", 0.0)  # asking twice changes nothing


def test_tracked_forgets_the_least_recently_noted() -> None:
    p = InlinePolicy(after=1, long_for_s=10.0, tracked=2)
    p.note("a", SHORT, 0.0)
    p.note("b", SHORT, 0.0)
    p.note("a", SHORT, 1.0)  # a is now the most recent
    p.note("c", SHORT, 2.0)  # evicts b, the least recently noted
    assert p.inline("a", 2.0)
    assert p.inline("c", 2.0)
    assert not p.inline("b", 2.0)  # forgotten: must earn inline again
    p.note("b", SHORT, 3.0)
    assert p.inline("b", 3.0)
    assert not p.inline("a", 3.0)  # and b's return evicted a


def test_overran_also_counts_as_recent_use() -> None:
    p = InlinePolicy(after=1, long_for_s=10.0, tracked=2)
    p.note("a", SHORT, 0.0)
    p.note("b", SHORT, 0.0)
    p.overran("a", 1.0)  # touches a: b is now the oldest
    p.note("c", SHORT, 2.0)
    assert not p.inline("b", 2.0)  # evicted
    p.note("a", SHORT, 2.0)
    assert not p.inline("a", 5.0)  # a's penalty survived
    assert p.inline("a", 11.0)


def test_eviction_does_not_shorten_the_overrun_penalty() -> None:
    p = InlinePolicy(after=1, long_for_s=10.0, pause_s=1.0, tracked=2)
    p.overran("a", 0.0)
    p.note("b", SHORT, 1.0)
    p.note("c", SHORT, 1.0)  # evicts a, and its penalty with it
    p.note("a", SHORT, 2.0)
    assert not p.inline("a", 3.0)  # pause over at 1; a's long_for_s not before 10


# -- InlinePolicy: property -----------------------------------------------------------------

_POLICY_OPS = st.lists(
    st.tuples(
        st.sampled_from(["short", "long", "overran", "ask"]),
        st.sampled_from(["a", "b", "c"]),
        st.integers(0, 8),  # time step, in half seconds: exact in binary floating point
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(
    after=st.integers(1, 4),
    long_for_half_s=st.integers(1, 20),
    pause_half_s=st.integers(0, 6),
    ops=_POLICY_OPS,
)
def test_property_inline_matches_the_rules(
    after: int, long_for_half_s: int, pause_half_s: int, ops: list[tuple[str, str, int]]
) -> None:
    """With time never going back: a function is inline exactly when its last ``after``
    calls were short, ``long_for_s`` has passed since its last long call or overrun, and
    ``pause_s`` since anyone's last overrun. So between two overruns of one function at
    least ``long_for_s`` passes, and between two overruns of any at least ``pause_s``."""
    long_for_s = long_for_half_s / 2
    pause_s = pause_half_s / 2
    p = InlinePolicy(after=after, long_for_s=long_for_s, pause_s=pause_s, short_s=0.002)
    streak: dict[str, int] = {}
    bad_at: dict[str, float] = {}
    last_overrun: dict[str, float] = {}
    any_overrun: float | None = None
    now = 0.0
    for op, key, step in ops:
        now += step / 2
        if op == "short":
            p.note(key, SHORT, now)
            streak[key] = streak.get(key, 0) + 1
        elif op == "long":
            p.note(key, LONG, now)
            streak[key] = 0
            bad_at[key] = now
        elif op == "overran":
            # The runner only reports an overrun of a call it ran inline.
            if not p.inline(key, now):
                continue
            if key in last_overrun:
                assert now - last_overrun[key] >= long_for_s
            if any_overrun is not None:
                assert now - any_overrun >= pause_s
            last_overrun[key] = now
            any_overrun = now
            p.overran(key, now)
            streak[key] = 0
            bad_at[key] = now
        for k in ("a", "b", "c"):
            expected = (
                k in streak
                and streak[k] >= after
                and (k not in bad_at or now >= bad_at[k] + long_for_s)
                and (any_overrun is None or now >= any_overrun + pause_s)
            )
            assert p.inline(k, now) == expected, (k, now)


def test_eviction_skips_penalized_records_but_stays_bounded() -> None:
    # Every other record is penalized: the oldest is evicted all the same, never the newest,
    # and the table never grows past ``tracked``.
    p = InlinePolicy(after=1, long_for_s=100.0, pause_s=0.0, tracked=3)
    for i, key in enumerate("abcdefghijkl"):
        p.overran(key, float(i))
        assert len(p._seen) <= 3
        assert key in p._seen
    p.note("z", SHORT, 20.0)
    assert "z" in p._seen and len(p._seen) == 3


def forgiving(forgive_every: int = 100) -> InlinePolicy:
    """The policy the forgiveness tests share (its defaults, spelled out)."""
    return InlinePolicy(after=3, long_for_s=10.0, pause_s=1.0, outlier_s=0.008,
                        forgive_every=forgive_every)


def test_one_small_outlier_among_many_short_calls_is_forgiven() -> None:
    p = forgiving()
    warm(p, "f", 0.0, 100)
    p.note("f", 0.005, 1.0)  # a page fault or a GC pass: forgiven
    assert p.inline("f", 1.0)
    warm(p, "f", 1.0, 96)  # 99 short calls since the last forgiven one: not yet
    p.note("f", 0.005, 2.0)
    assert not p.inline("f", 2.0)
    assert not p.inline("f", 11.999)


def test_outliers_are_forgiven_once_per_forgive_every() -> None:
    p = forgiving(forgive_every=10)
    warm(p, "f", 0.0, 10)
    for _ in range(5):
        p.note("f", 0.005, 0.0)
        assert p.inline("f", 0.0)
        warm(p, "f", 0.0, 7)  # after (3) + 7 = forgive_every again
    p.note("f", 0.005, 0.0)
    assert p.inline("f", 0.0)
    p.note("f", 0.005, 0.0)  # two in a row: the second is not forgiven
    assert not p.inline("f", 0.0)


def test_a_call_over_outlier_s_is_never_forgiven() -> None:
    p = forgiving()
    warm(p, "f", 0.0, 10_000)
    p.note("f", 0.0081, 1.0)
    assert not p.inline("f", 1.0)
    warm(p, "f", 1.0)
    # After so many short calls it may be a hiccup: threads for pause_s, not long_for_s ...
    assert not p.inline("f", 1.999)
    assert p.inline("f", 2.0)


def test_a_second_long_call_after_a_hiccup_gets_the_whole_penalty() -> None:
    p = forgiving()
    warm(p, "f", 0.0, 100)
    p.note("f", 0.5, 1.0)  # a hiccup: threads until 2.0
    warm(p, "f", 1.5, 2)
    p.note("f", 0.5, 1.6)  # long again (only 2 short calls since): threads until 11.6
    warm(p, "f", 2.0)
    assert not p.inline("f", 11.599)
    assert p.inline("f", 11.6)


def test_a_long_call_after_fewer_than_forgive_every_short_ones_gets_long_for_s() -> None:
    p = forgiving()
    warm(p, "f", 0.0, 99)
    p.note("f", 0.5, 1.0)
    warm(p, "f", 1.0)
    assert not p.inline("f", 10.999)
    assert p.inline("f", 11.0)


def test_forgive_every_must_exceed_after() -> None:
    with pytest.raises(ValueError):
        InlinePolicy(after=3, forgive_every=3)
