"""Local-filesystem storage behind the registry: metadata records and artifact directories.

Layout (DESIGN.md)::

    <root>/<name>/function.json          {"next_version": N, "aliases": {"prod": 3}}
    <root>/<name>/<version>/meta.json    the version's metadata
    <root>/<name>/<version>/main.*       artifacts
    <root>/.staging/<unique>/            uploads and builds in progress, and deletions

Function names can never start with '.', so ``.staging`` cannot clash with one. This class is
the registry's only contact with storage: a shared backend (SQL for records, S3 for artifacts)
would replace it without touching the index logic.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any

from fnserver.protocol import NAME_RE

log = logging.getLogger("fnserver.registry")

FUNCTION_FILE = "function.json"
META_FILE = "meta.json"
STAGING_DIR = ".staging"
_TMP_SUFFIX = ".tmp"
_VERSION_DIR_RE = re.compile(r"^[1-9][0-9]{0,17}$")


class LocalStore:
    """Metadata records (atomic JSON files) and artifact directories under one root."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.staging_root = root / STAGING_DIR

    # -- start-up ---------------------------------------------------------------------------

    def prepare(self) -> None:
        """Create the root; remove whatever a crash left in staging and half-written temp files."""
        self.root.mkdir(parents=True, exist_ok=True)
        if self.staging_root.exists():
            for leftover in self.staging_root.iterdir():
                log.info("removing leftover staging entry %s", leftover)
                _remove(leftover)
        self.staging_root.mkdir(exist_ok=True)
        for name in self.names():
            for tmp in (self.root / name).glob("*" + _TMP_SUFFIX):
                log.info("removing leftover temp file %s", tmp)
                _remove(tmp)

    def names(self) -> list[str]:
        """Names of the function directories present, valid names only."""
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and NAME_RE.match(p.name))

    def version_numbers(self, name: str) -> list[int]:
        """Every numeric version directory of ``name``, valid or not, ascending."""
        base = self.root / name
        return sorted(
            int(p.name) for p in base.iterdir() if p.is_dir() and _VERSION_DIR_RE.match(p.name)
        )

    # -- metadata records -------------------------------------------------------------------

    def read_function(self, name: str) -> dict[str, Any] | None:
        """The function record, or None if it is missing or unreadable."""
        return _read_json(self.root / name / FUNCTION_FILE)

    def write_function(self, name: str, record: dict[str, Any]) -> None:
        """Replace the function record atomically and durably."""
        base = self.root / name
        if not base.exists():
            base.mkdir()
            _fsync_dir(self.root)
        _write_json_atomic(base / FUNCTION_FILE, record)

    def read_meta(self, name: str, version: int) -> dict[str, Any] | None:
        """A version's metadata, or None if it is missing or unreadable."""
        return _read_json(self.version_path(name, version) / META_FILE)

    # -- artifact directories ---------------------------------------------------------------

    def version_path(self, name: str, version: int) -> Path:
        """The directory holding one version's artifacts and metadata."""
        return self.root / name / str(version)

    def new_staging(self) -> Path:
        """A fresh, unique, empty directory under the staging root."""
        path = Path(tempfile.mkdtemp(dir=self.staging_root))
        # mkdtemp makes it 0700; the renamed version dir must be readable by the invocation
        # workers, which drop to an unprivileged uid when the server runs as root.
        path.chmod(0o755)
        return path

    def is_staging(self, path: Path) -> bool:
        """Whether ``path`` is a directory this store handed out from staging."""
        return path.parent == self.staging_root and path.is_dir()

    def sync_artifacts(self, staging: Path) -> None:
        """Flush every artifact file in ``staging`` to disk before it is published."""
        for dirpath, _dirs, files in os.walk(staging):
            for f in files:
                fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            _fsync_dir(Path(dirpath))

    def publish(self, name: str, version: int, staging: Path, meta: dict[str, Any]) -> Path:
        """Write ``meta`` into ``staging`` and rename it into place as ``<name>/<version>``.

        The rename is the commit point: a version directory either has its complete
        meta.json or does not exist.
        """
        _write_json_atomic(staging / META_FILE, meta)
        base = self.root / name
        created = not base.exists()
        base.mkdir(exist_ok=True)
        target = self.version_path(name, version)
        if target.exists():
            # os.rename would silently replace an empty directory; a version is never reused.
            raise FileExistsError(f"{target} exists already")
        os.rename(staging, target)
        _fsync_dir(base)
        _fsync_dir(self.staging_root)
        if created:
            _fsync_dir(self.root)
        return target

    def unpublish(self, name: str, version: int) -> Path:
        """Move a version directory into staging (it disappears atomically); return its new path.

        The caller removes the returned directory with :meth:`discard`, outside any lock.
        """
        grave = self.staging_root / f"deleted-{name}-{version}-{secrets.token_hex(6)}"
        os.rename(self.version_path(name, version), grave)
        _fsync_dir(self.root / name)
        return grave

    def discard(self, path: Path) -> None:
        """Remove a staging directory; never raises."""
        try:
            _remove(path)
        except OSError as exc:
            log.warning("could not remove %s: %s", path, exc)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("unreadable %s: %s", path, exc)
        return None
    if not isinstance(data, dict):
        log.warning("unreadable %s: not a JSON object", path)
        return None
    return data


def _write_json_atomic(path: Path, obj: dict[str, Any]) -> None:
    """Temp file + fsync + rename + fsync of the directory: readers see old or new, never half."""
    data = json.dumps(obj, indent=2, sort_keys=True).encode() + b"\n"
    tmp = path.with_name(f"{path.name}.{secrets.token_hex(6)}{_TMP_SUFFIX}")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
