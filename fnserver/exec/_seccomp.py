"""A seccomp filter that keeps native calls off their own worker (x86_64, via ctypes).

A native call runs under its worker's uid, and the kernel lets a process signal, renice or
re-limit any process of its own uid: a call could SIGKILL its worker (``kill(getppid())``,
``kill(-1)``), lower its rlimits (``prlimit``) or starve it (``setpriority``,
``sched_setaffinity``). The worker is not dumpable, so it is already invisible in ``/proc``
and cannot be traced; this filter closes the rest.

It is installed on the worker's serving thread only (no ``TSYNC``), so every native call,
spawned from that thread, inherits it from its first instruction and through ``execve``
(``no_new_privs`` is set), while the worker's other threads are not filtered. Refused, with
``EPERM``: the signal calls aimed at the worker's pid, its serving thread, its process group,
or at everyone (``kill(-1)``); ``pidfd_open``, ``prlimit64``, ``setpriority``,
``sched_setaffinity``, ``sched_setscheduler``, ``sched_setparam`` and ``ioprio_set`` aimed at
the worker, and the per-uid forms of the last two. Calls on the calling process itself
(pid 0) and on its own children pass. x32 system calls are refused; another architecture is
killed.
"""

from __future__ import annotations

import ctypes
import platform
from typing import Final

__all__ = ["protect_worker"]

_PR_SET_SECCOMP: Final = 22
_SECCOMP_MODE_FILTER: Final = 2
_AUDIT_ARCH_X86_64: Final = 0xC000003E
_X32_BIT: Final = 0x40000000
_RET_ALLOW: Final = 0x7FFF0000
_RET_KILL_PROCESS: Final = 0x80000000
_RET_ERRNO: Final = 0x00050000
_EPERM: Final = 1
_ENOSYS: Final = 38
# Classic BPF opcodes.
_LD_W_ABS: Final = 0x20
_JEQ_K: Final = 0x15
_JGE_K: Final = 0x35
_RET_K: Final = 0x06
# struct seccomp_data: nr at 0, arch at 4, args[i] at 16 + 8 i (low 32 bits first).
_NR: Final = 0
_ARCH: Final = 4

# x86_64 system call numbers.
_KILL, _TKILL, _TGKILL = 62, 200, 234
_RT_SIGQUEUEINFO, _RT_TGSIGQUEUEINFO = 129, 297
_PIDFD_OPEN, _PRLIMIT64 = 434, 302
_SETPRIORITY, _SCHED_SETPARAM, _SCHED_SETSCHEDULER, _SCHED_SETAFFINITY = 141, 142, 144, 203
_IOPRIO_SET = 251
_PRIO_USER = 2
_IOPRIO_WHO_USER = 3


class _Insn(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class _Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_Insn))]


def _rules(pid: int, tid: int) -> list[tuple[int, int, tuple[int, ...]]]:
    """(syscall, argument index, refused values of its low 32 bits)."""
    me = (pid, tid)
    group = (-pid) & 0xFFFFFFFF
    everyone = 0xFFFFFFFF  # kill(-1)
    return [
        (_KILL, 0, (*me, group, everyone)),
        (_TKILL, 0, me),
        (_TGKILL, 0, me),
        (_RT_SIGQUEUEINFO, 0, me),
        (_RT_TGSIGQUEUEINFO, 0, me),
        (_PIDFD_OPEN, 0, me),
        (_PRLIMIT64, 0, me),
        (_SETPRIORITY, 0, (_PRIO_USER,)),
        (_SETPRIORITY, 1, me),
        (_SCHED_SETPARAM, 0, me),
        (_SCHED_SETSCHEDULER, 0, me),
        (_SCHED_SETAFFINITY, 0, me),
        (_IOPRIO_SET, 0, (_IOPRIO_WHO_USER,)),
        (_IOPRIO_SET, 1, me),
    ]


def program(pid: int, tid: int) -> list[tuple[int, int, int, int]]:
    """The filter as (code, jt, jf, k) instructions (pure: tested apart)."""
    out: list[tuple[int, int, int, int]] = [
        (_LD_W_ABS, 0, 0, _ARCH),
        (_JEQ_K, 1, 0, _AUDIT_ARCH_X86_64),
        (_RET_K, 0, 0, _RET_KILL_PROCESS),
        (_LD_W_ABS, 0, 0, _NR),
        (_JGE_K, 0, 1, _X32_BIT),
        (_RET_K, 0, 0, _RET_ERRNO | _ENOSYS),
    ]
    for nr, arg, values in _rules(pid, tid):
        n = len(values)
        # Not this call, or no refused value: on to the next rule (one call may have several).
        out.append((_LD_W_ABS, 0, 0, _NR))
        out.append((_JEQ_K, 0, n + 2, nr))
        out.append((_LD_W_ABS, 0, 0, 16 + 8 * arg))
        for j, value in enumerate(values):
            out.append((_JEQ_K, n - 1 - j, 1 if j == n - 1 else 0, value))
        out.append((_RET_K, 0, 0, _RET_ERRNO | _EPERM))
    out.append((_RET_K, 0, 0, _RET_ALLOW))
    return out


def protect_worker(pid: int, tid: int) -> str | None:
    """Install the filter on the calling thread; None, or why it could not be."""
    if platform.machine() != "x86_64":
        return f"seccomp: no filter for {platform.machine()}"
    insns = program(pid, tid)
    array = (_Insn * len(insns))(*(_Insn(*i) for i in insns))
    prog = _Prog(len(insns), ctypes.cast(array, ctypes.POINTER(_Insn)))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        import os

        return f"seccomp: {os.strerror(ctypes.get_errno())}"
    return None
