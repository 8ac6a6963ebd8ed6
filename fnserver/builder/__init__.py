"""Builds: an upload in, main.wasm and/or main.bin out, with the bundled Go and Zig toolchains.

Every build runs in a fresh scratch directory under the cache dir, with an explicit environment
(no network, no inherited variables), its own process group, a deadline and an address-space
limit; at most ``max_concurrent`` builds run at once.
"""

from __future__ import annotations

from ._builder import Builder, BuildResult
from ._kinds import KINDS, detect_kind

__all__ = ["KINDS", "BuildResult", "Builder", "detect_kind"]
