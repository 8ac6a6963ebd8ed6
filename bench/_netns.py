"""Network namespaces for the scale bench: each node gets a network stack of its own.

A namespace ``fnbench-<tag>-<n>`` holds one end of a veth pair (``eth0``, 10.77.<n>.2/24) and
its own loopback; the other end stays in the host's namespace (10.77.<n>.1/24), so clients on
the host reach the node at 10.77.<n>.2 and nothing else reaches it. PostgreSQL is reached
through its Unix socket, which a network namespace does not hide (the file system is shared).

Needs root and iproute2 (``ip netns``); :func:`available` says whether this host allows it,
and the bench falls back to loopback when it does not.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["Namespace", "available", "namespaces"]

_TIMEOUT_S = 30


@dataclass(frozen=True)
class Namespace:
    """One node's network namespace: where to run it and the address clients dial."""

    name: str
    #: The node's own address, inside the namespace.
    address: str

    def prefix(self) -> list[str]:
        """The command prefix that runs a program inside the namespace."""
        return ["ip", "netns", "exec", self.name]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=_TIMEOUT_S)


def available() -> str | None:
    """None if namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "not root"
    if shutil.which("ip") is None:
        return "no 'ip' command (iproute2)"
    probe = f"fnbench-probe-{secrets.token_hex(3)}"
    try:
        _ip("netns", "add", probe)
    except (subprocess.CalledProcessError, OSError, subprocess.TimeoutExpired) as exc:
        return f"'ip netns add' failed: {getattr(exc, 'stderr', b'') or exc}"
    with contextlib.suppress(subprocess.CalledProcessError, OSError, subprocess.TimeoutExpired):
        _ip("netns", "del", probe)
    return None


@contextlib.contextmanager
def namespaces(count: int) -> Iterator[list[Namespace]]:
    """``count`` namespaces wired to the host; all removed on exit (their veths go with them)."""
    tag = secrets.token_hex(2)
    made: list[str] = []
    try:
        out = []
        for n in range(1, count + 1):
            name = f"fnbench-{tag}-{n}"
            host_end, node_end = f"fnb{tag}h{n}", f"fnb{tag}n{n}"
            _ip("netns", "add", name)
            made.append(name)
            _ip("link", "add", host_end, "type", "veth", "peer", "name", node_end)
            _ip("link", "set", node_end, "netns", name)
            _ip("addr", "add", f"10.77.{n}.1/24", "dev", host_end)
            _ip("link", "set", host_end, "up")
            _ip("-n", name, "link", "set", node_end, "name", "eth0")
            _ip("-n", name, "addr", "add", f"10.77.{n}.2/24", "dev", "eth0")
            _ip("-n", name, "link", "set", "eth0", "up")
            _ip("-n", name, "link", "set", "lo", "up")
            out.append(Namespace(name, f"10.77.{n}.2"))
        yield out
    finally:
        for name in made:
            # Deleting the namespace deletes its veth end, and with it the host's end.
            with contextlib.suppress(subprocess.CalledProcessError, OSError, subprocess.TimeoutExpired):
                _ip("netns", "del", name)
