"""The versioned function store: names, integer versions, aliases, staging and recovery.

:class:`Registry` keeps an in-memory index for the invoke path over two narrow storage
interfaces, :class:`MetadataStore` (version allocation, records, aliases, a change feed) and
:class:`ArtifactStore` (bytes by sha256 digest). :class:`LocalStore` fills both with the
seed's layout ``<data>/<name>/<version>/``; :class:`SqliteMetadataStore` with
:class:`DigestArtifactStore` is the second backend that proves the seam.
"""

from __future__ import annotations

from ._interfaces import ArtifactStore, Deleted, FunctionRecord, MetadataStore
from ._local import LocalStore
from ._meta import SCHEMA, NewVersion
from ._registry import Registry
from ._sqlite import DigestArtifactStore, SqliteMetadataStore

__all__ = [
    "SCHEMA",
    "ArtifactStore",
    "Deleted",
    "DigestArtifactStore",
    "FunctionRecord",
    "LocalStore",
    "MetadataStore",
    "NewVersion",
    "Registry",
    "SqliteMetadataStore",
]
