"""``apt-get`` for the test setup: what a test needs from Debian (Chromium, PostgreSQL) is
installed by the project's own files when it is missing, never by hand (tests/_chromium.py,
tests/_postgres.py)."""

from __future__ import annotations

import os
import subprocess

#: apt may have to fetch a few hundred MB on a slow mirror.
APT_TIMEOUT_S = 1800


def apt_get(*args: str) -> None:
    """Run ``apt-get ARGS`` non-interactively within :data:`APT_TIMEOUT_S`; RuntimeError with
    the tail of its output if it fails."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        done = subprocess.run(
            ["apt-get", *args], env=env, stdin=subprocess.DEVNULL, capture_output=True,
            text=True, timeout=APT_TIMEOUT_S, check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"apt-get {' '.join(args)} took more than {APT_TIMEOUT_S} s") from exc
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip()[-2000:]
        raise RuntimeError(f"apt-get {' '.join(args)} failed with exit code {done.returncode}:\n{tail}")
