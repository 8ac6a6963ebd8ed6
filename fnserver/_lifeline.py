"""A child of the supervisor dies with it (``PR_SET_PDEATHSIG``)."""

from __future__ import annotations

import ctypes
import os
from typing import Final

__all__ = ["die_with_parent"]

_PR_SET_PDEATHSIG: Final = 1


def die_with_parent(parent: int) -> None:
    """Be killed (SIGKILL) when the process ``parent`` dies; exit now if it already has.

    The supervisor arms this in each child it starts, so that a node killed with SIGKILL (its
    supervisor, which nothing can catch) takes its control and serving processes with it
    instead of leaving them serving with nobody to restart them. The kernel clears the setting
    when a process changes its uid, so a serving process arms it again after its drop; the
    check of the parent closes the window in which it was disarmed.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, 9, 0, 0, 0) != 0:  # 9: SIGKILL
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:
        os._exit(1)
