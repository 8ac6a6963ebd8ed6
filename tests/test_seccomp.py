"""The worker's seccomp filter as a program (pure), before the attack tests try it for real
(tests/test_attacks.py: a native function cannot kill its worker)."""

from __future__ import annotations

from fnserver.exec._seccomp import program

_LD, _JEQ, _JGE, _RET = 0x20, 0x15, 0x35, 0x06
ALLOW, EPERM, ENOSYS, KILL = 0x7FFF0000, 0x00050001, 0x00050026, 0x80000000


def run(prog: list[tuple[int, int, int, int]], nr: int, args: tuple[int, ...] = (),
        arch: int = 0xC000003E) -> int:
    """A tiny classic-BPF interpreter over struct seccomp_data (the opcodes the filter uses)."""
    words = {0: nr, 4: arch}
    for i, a in enumerate(args):
        words[16 + 8 * i] = a & 0xFFFFFFFF
    acc, pc = 0, 0
    while True:
        code, jt, jf, k = prog[pc]
        if code == _LD:
            acc = words.get(k, 0)
        elif code == _JEQ:
            pc += jt if acc == k else jf
        elif code == _JGE:
            pc += jt if acc >= k else jf
        elif code == _RET:
            return k
        else:  # pragma: no cover - an opcode the filter does not use
            raise AssertionError(code)
        pc += 1


def test_signals_and_knobs_aimed_at_the_worker_are_refused() -> None:
    pid, tid = 4242, 4250
    p = program(pid, tid)
    for target in (pid, tid, -pid, -1):
        assert run(p, 62, (target, 9)) == EPERM, target  # kill
    for nr in (200, 234, 129, 297, 434, 302, 142, 144, 203):
        assert run(p, nr, (pid, 9)) == EPERM, nr
        assert run(p, nr, (tid, 9)) == EPERM, nr
    assert run(p, 141, (0, pid, 19)) == EPERM  # setpriority(PRIO_PROCESS, worker)
    assert run(p, 141, (2, 0, 19)) == EPERM  # setpriority(PRIO_USER, own uid)
    assert run(p, 251, (1, pid, 0)) == EPERM and run(p, 251, (3, 0, 0)) == EPERM  # ioprio_set


def test_everything_else_passes() -> None:
    pid, tid = 4242, 4250
    p = program(pid, tid)
    child = 5000
    assert run(p, 62, (child, 9)) == ALLOW  # kill(child)
    assert run(p, 62, (-child, 9)) == ALLOW  # its own process group
    assert run(p, 62, (0, 9)) == ALLOW  # kill(0): its own group
    assert run(p, 141, (0, 0, 19)) == ALLOW  # nice()
    assert run(p, 302, (0, 7)) == ALLOW  # prlimit on itself
    for nr in (0, 1, 57, 59, 231, 435):  # read, write, fork, execve, exit_group, clone3
        assert run(p, nr, (pid,)) == ALLOW


def test_foreign_calls_are_refused() -> None:
    p = program(1, 1)
    assert run(p, 62 | 0x40000000, (5,)) == ENOSYS  # x32
    assert run(p, 62, (5,), arch=0x40000003) == KILL  # i386


def test_a_worker_without_its_whole_sandbox_names_what_is_missing() -> None:
    from fnserver.exec._wire import Ready

    assert Ready(60000, True, True, ("memory cgroup: no memory cgroup",)).gaps() == []
    assert Ready(None, True, True).gaps() == ["the server does not run as root (no sandbox uid)"]
    gaps = Ready(60000, True, False, ("seccomp: Invalid argument", "private mounts: EPERM")).gaps()
    assert gaps == ["no network namespace", "seccomp: Invalid argument", "private mounts: EPERM"]
