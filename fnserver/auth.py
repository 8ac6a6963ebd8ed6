"""Tokens, tenants and roles: the auth file, and the server's live view of it.

The auth file (``<data-dir>/auth.toml`` unless ``--auth-file`` names another) is TOML::

    [[tokens]]
    id = "3f2a9c41d0e7"
    tenant = "acme"
    role = "deployer"                      # admin, deployer or invoker
    sha256 = "9b1f..."                     # of the whole token; the token itself is never kept
    description = "CI deploys"
    created = "2026-12-03T23:59:00Z"

    [tenants.acme]                         # optional: this tenant's quotas, over the flags'
    max_functions = 10                     # keys as the --tenant-max-* flags

A token reads ``fn_<id>_<secret>``: the id says which record to compare against (ids are not
secret, ``token list`` shows them) and the secret is 256 random bits. With that much entropy a
plain sha256 is as good as a slow password hash (there is nothing to guess), and checking a
token costs one hash and one constant-time comparison.

``fnserver token add/list/revoke`` (``_tokencli.py``) edit the file under a lock and replace it
atomically. Every server process holds an :class:`AuthBook`, which looks at the file's identity
(one ``stat``) before each request and reads it again when it changed: a revoked token is
refused from the next request on, without a restart. The file holds no secret, so it is
written 0644: serving processes read it after they gave up root.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import hmac
import logging
import os
import re
import secrets
import tempfile
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Final, Protocol

import tomli_w

from ._quotas import QuotaBook
from .config import ServerConfig, TenantLimits, is_loopback
from .protocol import NAME_RE
from .service._context import DEFAULT_TENANT, INTERNAL_ID, ROLES, SHARED_ID, Caller

__all__ = [
    "AuthBook",
    "AuthData",
    "AuthEditor",
    "AuthFeed",
    "AuthFileError",
    "FileAuthEditor",
    "TokenRecord",
    "add_token",
    "auth_book_for",
    "data_from_doc",
    "digest_of",
    "editor_for",
    "limits_doc",
    "exposure_problem",
    "load",
    "merge",
    "new_token",
    "revoke_token",
    "set_tenant",
    "token_id_of",
]

log = logging.getLogger("fnserver.auth")
audit = logging.getLogger("fnserver.audit")

#: The auth file is read on the serving path: a file this size is read in well under a
#: millisecond, and a bigger one is refused rather than read.
MAX_AUTH_FILE: Final = 4 * 1024 * 1024
_ID_LEN: Final = 12
_ID_RE: Final = re.compile(r"^[0-9a-f]{12}$")
_SHA_RE: Final = re.compile(r"^[0-9a-f]{64}$")
_LIMIT_KEYS: Final = frozenset(f.name for f in fields(TenantLimits))


class AuthFileError(ValueError):
    """The auth file cannot be used; the message says which entry and why."""


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """One token as the auth file keeps it: everything but the token."""

    id: str
    tenant: str
    role: str
    sha256: str
    description: str = ""
    created: str = ""

    def public(self) -> dict[str, str]:
        """What ``token list --json`` shows (the hash stays in the file)."""
        return {
            "id": self.id,
            "tenant": self.tenant,
            "role": self.role,
            "description": self.description,
            "created": self.created,
        }


@dataclass(frozen=True, slots=True)
class AuthData:
    """The whole auth file."""

    tokens: tuple[TokenRecord, ...] = ()
    #: Per-tenant quota overrides (``[tenants.NAME]``).
    tenants: Mapping[str, TenantLimits] = field(default_factory=dict)


def new_token() -> tuple[str, str]:
    """A fresh ``(id, token)``."""
    token_id = secrets.token_hex(_ID_LEN // 2)
    return token_id, f"fn_{token_id}_{secrets.token_urlsafe(32)}"


def token_id_of(token: str) -> str | None:
    """The id a token names, or None if it is not shaped like one of ours."""
    if len(token) > 3 + _ID_LEN + 1 and token.startswith("fn_") and token[3 + _ID_LEN] == "_":
        token_id = token[3 : 3 + _ID_LEN]
        if _ID_RE.match(token_id):
            return token_id
    return None


def digest_of(token: str) -> str:
    """The sha256 the records keep of a token."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def check_tenant(tenant: str) -> str:
    """A tenant name follows the function-name rules; raise AuthFileError otherwise."""
    if not NAME_RE.match(tenant):
        raise AuthFileError(
            f"tenant {tenant!r} is not a valid name: lowercase letters, digits, '-' and '_',"
            " starting with a letter or digit, at most 63 characters"
        )
    return tenant


def check_role(role: str) -> str:
    """``role`` must be one of :data:`ROLES`."""
    if role not in ROLES:
        raise AuthFileError(f"role {role!r} is not one of {', '.join(ROLES)}")
    return role


# -- reading and writing ------------------------------------------------------------------------


def _parse(raw: bytes) -> AuthData:
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise AuthFileError(f"not valid TOML: {exc}") from None
    return data_from_doc(doc)


def data_from_doc(doc: Mapping[str, Any]) -> AuthData:
    """Check and convert the auth file's document (or the database's rows in its shape);
    AuthFileError names the first bad entry."""
    tokens: list[TokenRecord] = []
    seen: set[str] = set()
    items = doc.get("tokens", [])
    if not isinstance(items, list):
        raise AuthFileError("'tokens' must be an array of tables ([[tokens]])")
    for n, item in enumerate(items, 1):
        if not isinstance(item, dict):
            raise AuthFileError(f"token entry {n} is not a table")
        values: dict[str, str] = {}
        for key in ("id", "tenant", "role", "sha256", "description", "created"):
            value = item.get(key, "")
            if not isinstance(value, str):
                raise AuthFileError(f"token entry {n}: '{key}' must be a string")
            values[key] = value
        if not _ID_RE.match(values["id"]):
            raise AuthFileError(f"token entry {n}: 'id' must be 12 lowercase hex digits")
        if values["id"] in seen:
            raise AuthFileError(f"token entry {n}: id {values['id']} appears twice")
        if not _SHA_RE.match(values["sha256"]):
            raise AuthFileError(f"token entry {n}: 'sha256' must be 64 lowercase hex digits")
        try:
            check_tenant(values["tenant"])
            check_role(values["role"])
        except AuthFileError as exc:
            raise AuthFileError(f"token entry {n}: {exc}") from None
        seen.add(values["id"])
        tokens.append(TokenRecord(**values))
    tenants: dict[str, TenantLimits] = {}
    table = doc.get("tenants", {})
    if not isinstance(table, dict):
        raise AuthFileError("'tenants' must be a table of tables ([tenants.NAME])")
    for name, limits in table.items():
        try:
            check_tenant(name)
        except AuthFileError as exc:
            raise AuthFileError(f"[tenants.{name}]: {exc}") from None
        if not isinstance(limits, dict):
            raise AuthFileError(f"[tenants.{name}] must be a table")
        unknown = set(limits) - _LIMIT_KEYS
        if unknown:
            raise AuthFileError(
                f"[tenants.{name}]: unknown key(s) {', '.join(sorted(unknown))};"
                f" known: {', '.join(sorted(_LIMIT_KEYS))}"
            )
        for key, value in limits.items():
            ok = isinstance(value, int | float) if key == "max_rps" else isinstance(value, int)
            if not ok or isinstance(value, bool) or value < 0 or (key == "max_rps" and value == 0):
                raise AuthFileError(f"[tenants.{name}]: '{key}' must be a number of 0 or more")
        given: dict[str, Any] = {k: (float(v) if k == "max_rps" else v) for k, v in limits.items()}
        tenants[name] = TenantLimits(**given)
    return AuthData(tuple(tokens), tenants)


def _read(path: Path) -> bytes | None:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_AUTH_FILE + 1)
    except FileNotFoundError:
        return None
    if len(raw) > MAX_AUTH_FILE:
        raise AuthFileError(f"larger than {MAX_AUTH_FILE // (1024 * 1024)} MiB")
    return raw


def load(path: Path) -> AuthData:
    """The auth file's contents; an absent file is an empty one."""
    raw = _read(path)
    return AuthData() if raw is None else _parse(raw)


def limits_doc(limits: TenantLimits) -> dict[str, int | float]:
    """The quotas ``limits`` sets, by key (those it leaves to the flags are absent)."""
    return {f.name: getattr(limits, f.name) for f in fields(limits) if getattr(limits, f.name) is not None}


def _render(data: AuthData) -> bytes:
    doc: dict[str, Any] = {
        "tokens": [
            {
                "id": t.id,
                "tenant": t.tenant,
                "role": t.role,
                "sha256": t.sha256,
                "description": t.description,
                "created": t.created,
            }
            for t in data.tokens
        ]
    }
    if data.tenants:
        doc["tenants"] = {name: limits_doc(lim) for name, lim in data.tenants.items()}
    header = (
        b"# fnserver tokens and tenants: edit with 'fnserver token add/list/revoke'.\n"
        b"# Only hashes of tokens are kept here. [tenants.NAME] tables may set a tenant's quotas\n"
        b"# (max_functions, max_versions, max_storage_mb, max_concurrency, max_rps, max_builds).\n\n"
    )
    return header + tomli_w.dumps(doc).encode()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise edits of one auth file (two ``token add`` at once must both land)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write(path: Path, data: AuthData) -> None:
    blob = _render(data)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".auth-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        # No secret inside: serving processes, which gave up root, must be able to read it.
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def add_token(path: Path, tenant: str, role: str, description: str = "") -> tuple[TokenRecord, str]:
    """Create a token, record its hash, return the record and the token (shown once)."""
    check_tenant(tenant)
    check_role(role)
    with _locked(path):
        data = load(path)
        ids = {t.id for t in data.tokens}
        token_id, token = new_token()
        while token_id in ids:  # 48 random bits: a clash is a curiosity, not a plan
            token_id, token = new_token()
        created = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        record = TokenRecord(token_id, tenant, role, digest_of(token), description, created)
        _write(path, AuthData((*data.tokens, record), data.tenants))
    return record, token


def revoke_token(path: Path, token_id: str) -> TokenRecord | None:
    """Remove the token with ``token_id``; the removed record, or None if there was none."""
    with _locked(path):
        data = load(path)
        gone = [t for t in data.tokens if t.id == token_id]
        if not gone:
            return None
        _write(path, AuthData(tuple(t for t in data.tokens if t.id != token_id), data.tenants))
    return gone[0]


def set_tenant(path: Path, name: str, limits: TenantLimits | None) -> None:
    """Give tenant ``name`` these quota overrides in the file (None or none set: remove them)."""
    check_tenant(name)
    with _locked(path):
        data = load(path)
        tenants = {k: v for k, v in data.tenants.items() if k != name}
        if limits is not None and limits_doc(limits):
            tenants[name] = limits
        _write(path, AuthData(data.tokens, tenants))


def merge(path: Path, incoming: AuthData) -> tuple[int, int]:
    """Add ``incoming``'s tokens whose id is new and tenants not yet in the file; how many."""
    with _locked(path):
        data = load(path)
        ids = {t.id for t in data.tokens}
        tokens = [t for t in incoming.tokens if t.id not in ids]
        tenants = {k: v for k, v in incoming.tenants.items() if k not in data.tenants}
        _write(path, AuthData((*data.tokens, *tokens), {**data.tenants, **tenants}))
    return len(tokens), len(tenants)


class AuthEditor(Protocol):
    """Where ``fnserver token`` and ``fnserver tenant`` make their edits: the auth file
    (:class:`FileAuthEditor`) or the registry's database (``_authpg.PostgresAuthEditor``)."""

    #: What to call it in messages.
    where: str

    def load(self) -> AuthData: ...

    def add_token(self, tenant: str, role: str, description: str = "") -> tuple[TokenRecord, str]: ...

    def revoke_token(self, token_id: str) -> TokenRecord | None: ...

    def set_tenant(self, name: str, limits: TenantLimits | None) -> None: ...

    def merge(self, data: AuthData) -> tuple[int, int]: ...


class FileAuthEditor:
    """:class:`AuthEditor` over one auth file (each edit under its lock, replaced atomically)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.where = str(path)

    def load(self) -> AuthData:
        """The file's contents."""
        return load(self.path)

    def add_token(self, tenant: str, role: str, description: str = "") -> tuple[TokenRecord, str]:
        """See :func:`add_token`."""
        return add_token(self.path, tenant, role, description)

    def revoke_token(self, token_id: str) -> TokenRecord | None:
        """See :func:`revoke_token`."""
        return revoke_token(self.path, token_id)

    def set_tenant(self, name: str, limits: TenantLimits | None) -> None:
        """See :func:`set_tenant`."""
        set_tenant(self.path, name, limits)

    def merge(self, data: AuthData) -> tuple[int, int]:
        """See :func:`merge`."""
        return merge(self.path, data)


class AuthFeed(Protocol):
    """A live copy of the tokens kept elsewhere (``_authpg.PostgresAuthFeed``): ``serial``
    changes with each new copy; ``broken`` says why no token is accepted, if so."""

    serial: int
    data: AuthData
    broken: str | None


# -- the server's view --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a HELLO was refused: the message for the client and the token id for the audit log."""

    message: str
    token_id: str | None


class AuthBook:
    """Who may connect, as the auth file says right now.

    ``shared`` is a secret every client may send instead of a token (``FNSERVER_TOKEN``; it
    makes the caller admin of the default tenant); ``internal`` is the control process's own
    secret from the supervisor. ``accept_tokens`` is False in the control process, which only
    its serving processes reach. ``open_ok`` says whether a server with no token at all may
    serve everyone (true on loopback or with ``--insecure``); when it is false and the file
    holds no token, every HELLO is refused: deleting the auth file never opens a server.
    ``on_overrides`` gets the tenants' quota overrides each time the file is read.
    """

    def __init__(
        self,
        path: Path | None,
        *,
        shared: str | None = None,
        internal: str | None = None,
        accept_tokens: bool = True,
        open_ok: bool = True,
        on_overrides: Callable[[Mapping[str, TenantLimits]], None] | None = None,
        log_changes: bool = False,
        feed: AuthFeed | None = None,
    ) -> None:
        self.path = path
        #: When set, the tokens come from it and ``path`` is not read.
        self._feed = feed
        self._serial = 0
        self._shared = shared.encode() if shared else None
        self._internal = internal.encode() if internal else None
        self._accept_tokens = accept_tokens
        self._open_ok = open_ok
        self._on_overrides = on_overrides
        self._log_changes = log_changes
        self._stamp: tuple[int, int, int, int] | None = None
        self._by_id: dict[str, TokenRecord] = {}
        self._broken: str | None = None
        self._loaded = False
        self.refresh()

    @property
    def open(self) -> bool:
        """True if a connection needs no token at all."""
        return self._open_ok and self._shared is None and self._internal is None and not (
            self._accept_tokens and (self._by_id or self._broken)
        )

    @property
    def token_count(self) -> int:
        """Tokens the file holds now."""
        return len(self._by_id)

    def refresh(self) -> None:
        """Read the file again if it changed since the last look (one ``stat`` when not).

        Called before every request: a revoke or an added first token applies at once. The
        file is small and capped, so reading it here is cheaper than any hand-off. With a
        feed, it compares the feed's counter: no I/O at all.
        """
        if self._feed is not None:
            if self._loaded and self._feed.serial == self._serial:
                return
            self._serial = self._feed.serial
            if self._feed.broken is not None:
                if self._serial:  # not yet read is not an error worth logging
                    self._fail(self._feed.broken)
                else:
                    self._by_id, self._broken, self._loaded = {}, self._feed.broken, True
                return
            self._apply(self._feed.data)
            return
        if self.path is None:
            return
        try:
            st = os.stat(self.path)
            stamp: tuple[int, int, int, int] | None = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        except FileNotFoundError:
            stamp = None
        except OSError as exc:
            self._fail(f"cannot be read ({os.strerror(exc.errno or 0)})")
            return
        if self._loaded and stamp == self._stamp:
            return
        try:
            raw = None if stamp is None else _read(self.path)
            data = AuthData() if raw is None else _parse(raw)
        except AuthFileError as exc:
            self._fail(str(exc))
            self._stamp = stamp
            return
        except OSError as exc:
            self._fail(f"cannot be read ({os.strerror(exc.errno or 0)})")
            return
        self._stamp = stamp
        self._apply(data)

    def _apply(self, data: AuthData) -> None:
        self._loaded = True
        self._broken = None
        old = self._by_id
        self._by_id = {t.id: t for t in data.tokens}
        if self._log_changes:
            for t in data.tokens:
                if t.id not in old:
                    audit.info("token_added token=%s tenant=%s role=%s", t.id, t.tenant, t.role)
            for token_id, t in old.items():
                if token_id not in self._by_id:
                    audit.info("token_revoked token=%s tenant=%s role=%s", token_id, t.tenant, t.role)
        if self._on_overrides is not None:
            self._on_overrides(data.tenants)

    def _fail(self, why: str) -> None:
        # Fail closed: a broken file authenticates nobody until it is fixed (a half-edited
        # file must not keep a token alive that the edit meant to revoke).
        if self._broken != why:
            if self._feed is not None:
                log.error("%s: no token is accepted until it is fixed", why)
            else:
                log.error("the auth file %s: no token is accepted until it is fixed", why)
        self._broken = why
        self._by_id = {}
        self._loaded = True

    def authenticate(self, token: str | None) -> Caller | Refusal:
        """The caller a HELLO's token stands for, or why it is refused. Constant-time in the
        secret: the comparison is of digests, with ``hmac.compare_digest``."""
        self.refresh()
        if token is not None:
            raw = token.encode("utf-8", "surrogatepass")
            if self._internal is not None and hmac.compare_digest(raw, self._internal):
                return Caller(token_id=INTERNAL_ID, tenant=DEFAULT_TENANT, role="admin")
            if self._shared is not None and hmac.compare_digest(raw, self._shared):
                return Caller(token_id=SHARED_ID, tenant=DEFAULT_TENANT, role="admin")
        if self.open:
            return Caller()
        if token is None:
            return Refusal(
                "this server requires a token: pass --token or set FN_TOKEN"
                " (an operator creates one with 'fnserver token add TENANT ROLE')",
                None,
            )
        token_id = token_id_of(token) if self._accept_tokens else None
        record = self._by_id.get(token_id) if token_id is not None else None
        # Compare even when the id is unknown, so the time taken says nothing about the secret.
        want = record.sha256 if record is not None else "0" * 64
        if hmac.compare_digest(digest_of(token), want) and record is not None:
            return Caller(token_id=record.id, tenant=record.tenant, role=record.role)
        if self._broken is not None:
            where = "tokens" if self._feed is not None else "auth file"
            return Refusal(f"the server's {where} cannot be used; ask its operator", token_id)
        return Refusal("unknown or revoked token", token_id)

    def still_valid(self, caller: Caller) -> bool:
        """Whether a connection authenticated as ``caller`` may send another request."""
        self.refresh()
        if caller.token_id is None:
            return self.open
        if caller.token_id == INTERNAL_ID:
            return self._internal is not None
        if caller.token_id == SHARED_ID:
            return self._shared is not None
        return caller.token_id in self._by_id


def auth_book_for(config: ServerConfig, quotas: QuotaBook, feed: AuthFeed | None = None) -> AuthBook:
    """The auth book of one server process, by its role (over ``feed`` instead of the auth
    file when the tokens live in the registry's database).

    The control process is reached only by its serving processes, with the supervisor's
    secret; it reads the auth file for the tenants' quota overrides (the quotas it holds:
    functions, versions, storage, builds) and logs the token changes it sees, once per server.
    """
    if config.role == "control":
        return AuthBook(
            config.auth_path,
            internal=config.control_token,
            accept_tokens=False,
            open_ok=False,
            on_overrides=quotas.set_overrides,
            log_changes=True,
            feed=feed,
        )
    return AuthBook(
        config.auth_path,
        shared=config.token,
        accept_tokens=True,
        open_ok=config.open_ok,
        on_overrides=quotas.set_overrides,
        log_changes=config.role == "all",
        feed=feed,
    )


def exposure_problem(config: ServerConfig) -> str | None:
    """Why this server must not start as configured (a public address and no token, an auth
    file its serving processes could not read), or None."""
    parent = config.auth_path.absolute().parent
    if config.registry is None and os.geteuid() == 0 and parent.is_dir() and not parent.stat().st_mode & 0o001:
        # Serving processes give up root and then look the file up in this directory (the
        # directories above it they reach through a descriptor held from before).
        return (
            f"the auth file's directory {parent} must be searchable by other users"
            f" (chmod o+x {parent}): serving processes read the file after giving up root"
        )
    if config.open_ok or config.token:
        return None
    editor = editor_for(config)
    try:
        data = editor.load()
    except AuthFileError as exc:
        return f"the tokens in {editor.where}: {exc}"
    except OSError as exc:
        return f"cannot read the tokens from {editor.where}: {exc.strerror or exc}"
    if data.tokens:
        return None
    exposed = config.host if not is_loopback(config.host) else config.http_address_host
    return (
        f"refusing to listen on {exposed or 'every interface'} without tokens: anyone who can"
        " reach the port could run code. Create a token first"
        f" ('fnserver token add TENANT admin --data-dir {config.data_dir}'), listen on 127.0.0.1,"
        " or pass --insecure if that is really what you want"
    )


def editor_for(config: ServerConfig) -> AuthEditor:
    """Where this server's tokens and tenants are kept: the registry's database, if it has one,
    else its auth file."""
    if config.registry is not None:
        from ._authpg import PostgresAuthEditor

        return PostgresAuthEditor(config.registry)
    return FileAuthEditor(config.auth_path)
