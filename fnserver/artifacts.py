"""Artifact file names, defined once: the builder writes them, the stores keep them.

The wire names an artifact by kind (``wasm``, ``native``: docs/PROTOCOL.md §5.2.1); on disk
each kind has one fixed file name inside a version directory (DESIGN.md's layout).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from .protocol import ArtifactKind

__all__ = ["ARTIFACT_FILES", "META_FILE"]

ARTIFACT_FILES: Final[Mapping[ArtifactKind, str]] = MappingProxyType(
    {"wasm": "main.wasm", "native": "main.bin"}
)
#: A version's metadata record, beside its artifacts.
META_FILE: Final = "meta.json"
