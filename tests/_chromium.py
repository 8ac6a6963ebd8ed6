"""The system's Chromium for the browser tests, installed with apt when it is missing.

Playwright drives Debian's ``chromium`` package rather than a browser it downloads itself. A
machine without it gets it here (as root: ``apt-get install chromium``, under a lock so that
concurrent test runs do not clash); a machine where that cannot happen fails the test with the
reason. The browser tests never skip.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

from ._apt import apt_get

CHROMIUM = Path("/usr/bin/chromium")
_LOCK = Path("/tmp/fnserver-chromium.lock")


def chromium_path() -> str:
    """The path of the system Chromium, installing it first if it is absent and we are root.

    Raises RuntimeError, naming what to do, when it is absent and cannot be installed.
    """
    if os.access(CHROMIUM, os.X_OK):
        return str(CHROMIUM)
    if os.geteuid() != 0:
        raise RuntimeError(
            f"{CHROMIUM} is missing and only root can install it: run "
            "'apt-get install chromium' (the dashboard test needs a real browser)"
        )
    if shutil.which("apt-get") is None:
        raise RuntimeError(f"{CHROMIUM} is missing and this system has no apt-get to install it")
    with _LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not os.access(CHROMIUM, os.X_OK):  # another run may have installed it meanwhile
                apt_get("update")
                apt_get("install", "-y", "chromium")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    if not os.access(CHROMIUM, os.X_OK):
        raise RuntimeError(f"apt-get installed chromium, yet {CHROMIUM} is not there")
    return str(CHROMIUM)
