"""Artifact file names, defined once: the builder writes them, the stores keep them.

The wire names an artifact by kind (``wasm``, ``native``: docs/PROTOCOL.md §5.2.1); on disk
each kind has one fixed file name inside a version directory (DESIGN.md's layout).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Final

from .protocol import ArtifactKind

__all__ = ["ARTIFACT_FILES", "META_FILE", "sha256_file"]

ARTIFACT_FILES: Final[Mapping[ArtifactKind, str]] = MappingProxyType(
    {"wasm": "main.wasm", "native": "main.bin"}
)
#: A version's metadata record, beside its artifacts.
META_FILE: Final = "meta.json"


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file's bytes (an artifact's identity); blocking: call in a thread."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
