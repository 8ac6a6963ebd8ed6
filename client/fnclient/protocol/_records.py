"""Typed, immutable records for every operation's request and reply (docs/PROTOCOL.md §4-§5).

Each record has ``from_wire`` (a decoded msgpack map in, the record out, or
:class:`InvalidArgumentError` naming the bad field) and ``to_wire`` (the map to encode). The
checks that used to sit in the server live here, so every front and the client share them.
Limits that depend on the server's configuration (the largest timeout, the upload cap) are
checked by the service, not here: the codec knows the wire, not the deployment.

Receivers ignore keys they do not know (§2), so ``from_wire`` never rejects an extra key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, Literal

from .errors import InvalidArgumentError, ProtocolError

__all__ = [
    "ALIAS_RE",
    "ARTIFACT_KINDS",
    "DEFAULT_PAGE",
    "MAX_FUEL",
    "MAX_PAGE",
    "MAX_VERSION",
    "NAME_RE",
    "RESERVED_ALIASES",
    "AliasReply",
    "AliasRequest",
    "ArtifactKind",
    "CompileReply",
    "CompileRequest",
    "DeleteReply",
    "DeleteRequest",
    "FunctionLimits",
    "FunctionSummary",
    "GetReply",
    "GetRequest",
    "HelloReply",
    "Identity",
    "HelloRequest",
    "InvokeRequest",
    "InvokeResult",
    "ListReply",
    "ListRequest",
    "PingReply",
    "PingRequest",
    "ProgressEvent",
    "RegisterOptions",
    "RegisterRequest",
    "ServerLimits",
    "UploadChunk",
    "VersionInfo",
    "VersionRef",
    "DEFAULT_TENANT",
    "QUALIFIED_NAME_RE",
    "check_alias",
    "check_env",
    "ENV_NAME_RE",
    "check_name",
    "qualify",
    "split_qualified",
    "parse_version_ref",
]

NAME_RE: Final = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
#: A function name as requests may carry it: ``NAME``, or ``TENANT/NAME`` (tenant names follow
#: the same rule). Which tenant a bare name means is the server's business (the caller's).
QUALIFIED_NAME_RE: Final = re.compile(r"^(?:[a-z0-9][a-z0-9_-]{0,62}/)?[a-z0-9][a-z0-9_-]{0,62}$")
#: The tenant of functions named without one, and of data written before tenants existed.
DEFAULT_TENANT: Final = "default"
#: Aliases may not be all digits, so ``name@3`` is always a version and ``name@prod`` an alias.
ALIAS_RE: Final = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
RESERVED_ALIASES: Final = frozenset({"latest"})
#: The largest fuel budget a function may ask for (wasmtime counts about one unit per wasm
#: operator: 10**12 is minutes of CPU, well past any time limit).
MAX_FUEL: Final = 10**12
MAX_VERSION: Final = 2**62
_SHA256_RE: Final = re.compile(r"^[0-9a-f]{64}$")
#: Function environment variables (§5.2 ``options.env``): POSIX-style names.
ENV_NAME_RE: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
MAX_ENV_VARS: Final = 64
#: Names and values together, bytes of UTF-8.
MAX_ENV_BYTES: Final = 32 * 1024
#: Longest page a ``get`` returns (§5.5): 100 versions of metadata without logs is ~60 KiB.
MAX_PAGE: Final = 100
DEFAULT_PAGE: Final = 50

ArtifactKind = Literal["wasm", "native"]
ARTIFACT_KINDS: Final[tuple[ArtifactKind, ...]] = ("wasm", "native")
#: A version reference: None (the newest), a version number, or an alias.
VersionRef = int | str | None


# -- field checks -----------------------------------------------------------------------------


def check_name(name: object) -> str:
    """Validate a function name (``NAME`` or ``TENANT/NAME``) against :data:`QUALIFIED_NAME_RE`."""
    if not isinstance(name, str) or not QUALIFIED_NAME_RE.match(name):
        raise InvalidArgumentError(
            f"invalid function name {name!r}: use 1-63 characters a-z, 0-9, '_' or '-',"
            " starting with a letter or digit (an admin may prefix a tenant: TENANT/NAME)"
        )
    return name


def qualify(tenant: str, name: str) -> str:
    """The registry key of ``name`` in ``tenant``: the bare name in the default tenant (so data
    written before tenants existed is the default tenant's), ``TENANT/NAME`` otherwise."""
    return name if tenant == DEFAULT_TENANT else f"{tenant}/{name}"


def split_qualified(key: str) -> tuple[str, str]:
    """``(tenant, name)`` of a registry key or a qualified name."""
    tenant, sep, name = key.partition("/")
    return (tenant, name) if sep else (DEFAULT_TENANT, key)


def check_alias(alias: object) -> str:
    """Validate a user alias name; ``latest`` is reserved."""
    if not isinstance(alias, str) or not ALIAS_RE.match(alias):
        raise InvalidArgumentError(
            f"invalid alias {alias!r}: use 1-63 characters a-z, 0-9, '_' or '-',"
            " starting with a letter"
        )
    if alias in RESERVED_ALIASES:
        raise InvalidArgumentError(f"alias {alias!r} is reserved and always names the newest version")
    return alias


def parse_version_ref(ref: object) -> VersionRef:
    """A version reference: None (latest), a positive int, a digit string, or an alias."""
    if ref is None:
        return None
    if isinstance(ref, bool):
        raise InvalidArgumentError(f"invalid version {ref!r}")
    if isinstance(ref, int):
        if not 1 <= ref <= MAX_VERSION:
            raise InvalidArgumentError(f"invalid version {ref}: versions start at 1")
        return ref
    if isinstance(ref, str):
        if ref.isascii() and ref.isdigit() and len(ref) <= 19:
            return parse_version_ref(int(ref))
        if ref == "latest":
            return None
        if not ALIAS_RE.match(ref):
            raise InvalidArgumentError(f"invalid version or alias {ref!r}")
        return ref
    raise InvalidArgumentError(f"invalid version {ref!r}: expected an integer or an alias")


def _int(body: Mapping[str, Any], key: str, lo: int, hi: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise InvalidArgumentError(f"'{key}' must be an integer from {lo} to {hi}, got {value!r}")
    return value


def _req_int(body: Mapping[str, Any], key: str, lo: int, hi: int) -> int:
    value = _int(body, key, lo, hi)
    if value is None:
        raise InvalidArgumentError(f"'{key}' is required")
    return value


def _str(body: Mapping[str, Any], key: str, max_len: int = 255, *, required: bool = True) -> str:
    value = body.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value) or len(value) > max_len or "\x00" in value:
        raise InvalidArgumentError(
            f"'{key}' must be a {'non-empty ' if required else ''}string of at most {max_len} characters"
        )
    return value


def _bool(body: Mapping[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidArgumentError(f"'{key}' must be true or false, got {value!r}")
    return value


def _mode(value: object, key: str = "mode") -> ArtifactKind | None:
    if value is None:
        return None
    if value not in ARTIFACT_KINDS:
        raise InvalidArgumentError(f"'{key}' must be 'wasm' or 'native', got {value!r}")
    return value  # type: ignore[return-value]


def check_env(env: object) -> dict[str, str]:
    """A function's environment (§5.2 ``options.env``): a map of variable names to values."""
    if env is None:
        return {}
    if not isinstance(env, Mapping):
        raise InvalidArgumentError("'env' must be a map of variable names to string values")
    if len(env) > MAX_ENV_VARS:
        raise InvalidArgumentError(f"'env' has {len(env)} variables; at most {MAX_ENV_VARS} are allowed")
    total = 0
    for key, value in env.items():
        if not isinstance(key, str) or not ENV_NAME_RE.match(key):
            raise InvalidArgumentError(
                f"invalid environment variable name {key!r}: letters, digits and _, not starting with a digit"
            )
        if not isinstance(value, str) or "\x00" in value:
            raise InvalidArgumentError(f"environment variable {key} must have a string value without NUL")
        total += len(key.encode()) + len(value.encode())
    if total > MAX_ENV_BYTES:
        raise InvalidArgumentError(f"'env' holds {total} bytes; at most {MAX_ENV_BYTES} are allowed")
    return dict(env)


def _present(fields: dict[str, Any]) -> dict[str, Any]:
    """Optional fields left out when None, so the receiver applies its defaults."""
    return {k: v for k, v in fields.items() if v is not None}


# -- §4 HELLO ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HelloRequest:
    """§4: the first request of every connection."""

    op: ClassVar[str] = "hello"
    protocol: int
    token: str | None = None
    client: str | None = None

    @classmethod
    def from_wire(cls, body: Mapping[str, Any]) -> HelloRequest:
        protocol = body.get("protocol")
        if not isinstance(protocol, int) or isinstance(protocol, bool):
            # An int is the only version a server can compare: ``true`` or ``1.0`` is no version.
            protocol = -1
        token = body.get("token")
        client = body.get("client")
        return cls(
            protocol=protocol,
            token=token if isinstance(token, str) else None,
            client=client[:200] if isinstance(client, str) else None,
        )

    def to_wire(self) -> dict[str, Any]:
        return {"protocol": self.protocol, "token": self.token, **_present({"client": self.client})}


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """Defaults and maxima for functions, announced in HELLO (§4)."""

    timeout_ms: int
    max_timeout_ms: int
    memory_mb: int
    max_memory_mb: int
    output_bytes: int

    def to_wire(self) -> dict[str, Any]:
        return {
            "timeout_ms": self.timeout_ms,
            "max_timeout_ms": self.max_timeout_ms,
            "memory_mb": self.memory_mb,
            "max_memory_mb": self.max_memory_mb,
            "output_bytes": self.output_bytes,
        }


@dataclass(frozen=True, slots=True)
class HelloReply:
    """§4: what the server speaks and allows."""

    server: str
    server_version: str
    protocol: int
    max_frame: int
    max_upload: int
    chunk_size: int
    limits: ServerLimits
    #: The serving process that holds this connection (several share the port).
    pid: int = 0
    #: Who the server took this connection for (the token's tenant and role; without tokens,
    #: the default tenant as admin) and the token's id (never the token; None without one).
    tenant: str = "default"
    role: str = "admin"
    token_id: str | None = None

    def to_wire(self) -> dict[str, Any]:
        return {
            "server": self.server,
            "pid": self.pid,
            "tenant": self.tenant,
            "role": self.role,
            "token_id": self.token_id,
            "server_version": self.server_version,
            "protocol": self.protocol,
            "max_frame": self.max_frame,
            "max_upload": self.max_upload,
            "chunk_size": self.chunk_size,
            "limits": self.limits.to_wire(),
        }


@dataclass(frozen=True, slots=True)
class Identity:
    """Whom the server took a connection for (from HELLO's reply, §4): ``fn whoami``."""

    tenant: str
    role: str
    token_id: str | None = None

    @classmethod
    def from_hello(cls, hello: Mapping[str, Any]) -> Identity:
        """Read the identity fields of a HELLO reply (an older server sends none: the
        default tenant's admin, which is what it treated everyone as)."""
        tenant, role, token_id = hello.get("tenant"), hello.get("role"), hello.get("token_id")
        return cls(
            tenant=tenant if isinstance(tenant, str) else "default",
            role=role if isinstance(role, str) else "admin",
            token_id=token_id if isinstance(token_id, str) else None,
        )

    def to_wire(self) -> dict[str, Any]:
        return {"tenant": self.tenant, "role": self.role, "token_id": self.token_id}


# -- §5.1 ping --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PingRequest:
    """§5.1: with ``deep``, the server first checks it is ready to serve (its workers are up,
    its store is writable) and answers UNAVAILABLE naming the failed check if not."""

    op: ClassVar[str] = "ping"
    deep: bool = False

    @classmethod
    def from_wire(cls, body: Mapping[str, Any]) -> PingRequest:
        return cls(_bool(body, "deep"))

    def to_wire(self) -> dict[str, Any]:
        return {"deep": True} if self.deep else {}


@dataclass(frozen=True, slots=True)
class PingReply:
    """§5.1."""

    def to_wire(self) -> dict[str, Any]:
        return {"pong": True}


# -- §5.2 register and upload -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RegisterOptions:
    """§5.2 ``options``: the function's limits, alias, kind override and description."""

    timeout_ms: int | None = None
    memory_mb: int | None = None
    fuel: int | None = None
    alias: str | None = None
    kind: str | None = None
    description: str = ""
    #: Environment variables the function sees (wasm: WASI environ; native: its environment).
    env: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_wire(cls, opts: object) -> RegisterOptions:
        if opts is None:
            return cls()
        if not isinstance(opts, Mapping):
            raise InvalidArgumentError("'options' must be a map")
        alias = opts.get("alias")
        kind = opts.get("kind")
        if kind is not None and (not isinstance(kind, str) or len(kind) > 32):
            raise InvalidArgumentError(f"'kind' must be a short string, got {kind!r}")
        description = opts.get("description") or ""
        if not isinstance(description, str) or len(description) > 1024:
            raise InvalidArgumentError("'description' must be a string of at most 1024 characters")
        return cls(
            timeout_ms=_int(opts, "timeout_ms", 1, 2**31),
            memory_mb=_int(opts, "memory_mb", 1, 2**31),
            # wasm only: an instruction budget, for limits that do not depend on machine speed.
            fuel=_int(opts, "fuel", 1, MAX_FUEL),
            alias=None if alias is None else check_alias(alias),
            kind=kind,
            description=description,
            env=check_env(opts.get("env")),
        )

    def to_wire(self) -> dict[str, Any]:
        return _present(
            {
                "timeout_ms": self.timeout_ms,
                "memory_mb": self.memory_mb,
                "fuel": self.fuel,
                "alias": self.alias,
                "kind": self.kind,
                "description": self.description or None,
                "env": dict(self.env) or None,
            }
        )


@dataclass(frozen=True, slots=True)
class RegisterRequest:
    """§5.2: announces an upload of ``size`` bytes whose chunks follow under the same id."""

    op: ClassVar[str] = "register"
    name: str
    filename: str
    size: int
    sha256: str
    options: RegisterOptions = field(default_factory=RegisterOptions)

    @classmethod
    def from_wire(cls, body: Mapping[str, Any]) -> RegisterRequest:
        name = check_name(body.get("name"))
        filename = _str(body, "filename")
        size = body.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise InvalidArgumentError("'size' must be a positive integer (an empty file is no function)")
        sha = body.get("sha256")
        if not isinstance(sha, str) or not _SHA256_RE.match(sha):
            raise InvalidArgumentError("'sha256' must be 64 lowercase hex digits")
        return cls(name, filename, size, sha, RegisterOptions.from_wire(body.get("options")))

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "filename": self.filename,
            "size": self.size,
            "sha256": self.sha256,
        }
        options = self.options.to_wire()
        if options:
            out["options"] = options
        return out


@dataclass(frozen=True, slots=True)
class UploadChunk:
    """§5.2: the next bytes of the upload announced by the ``register`` with the same id."""

    op: ClassVar[str] = "upload"
    data: bytes

    @classmethod
    def from_wire(cls, body: Mapping[str, Any]) -> UploadChunk:
        data = body.get("data")
        if not isinstance(data, bytes):
            raise InvalidArgumentError("'data' of an upload frame must be bytes (msgpack bin)")
        return cls(data)

    def to_wire(self) -> dict[str, Any]:
        return {"data": self.data}


@dataclass(frozen=True, slots=True)
class ProgressEvent:
    """§5.3: an informational event of a running request."""

    stage: str
    message: str
    received: int | None = None
    size: int | None = None

    def to_wire(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "message": self.message,
            **_present({"received": self.received, "size": self.size}),
        }


# -- §5.9 version metadata --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FunctionLimits:
    """A version's own limits (§5.9 ``limits``); an invoke may lower them, never raise them."""

    timeout_ms: int
    memory_mb: int
    fuel: int | None = None

    @classmethod
    def from_wire(cls, body: object, *, timeout_ms: int, memory_mb: int) -> FunctionLimits:
        """Lenient: a missing value takes the given default (metadata written by old servers)."""
        m = body if isinstance(body, Mapping) else {}

        def pick(key: str, default: int | None) -> int | None:
            v = m.get(key)
            return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else default

        return cls(
            timeout_ms=pick("timeout_ms", timeout_ms) or timeout_ms,
            memory_mb=pick("memory_mb", memory_mb) or memory_mb,
            fuel=pick("fuel", None),
        )

    def to_wire(self) -> dict[str, Any]:
        return {"timeout_ms": self.timeout_ms, "memory_mb": self.memory_mb, **_present({"fuel": self.fuel})}


@dataclass(frozen=True, slots=True)
class VersionInfo:
    """One committed version's metadata (§5.9), as stored and as sent.

    ``artifact_sha256`` maps each artifact kind to the sha256 of its bytes: the key of the
    artifact store and of the compiled-module cache. ``build_log`` is sent only when asked.
    ``aliases`` is live state (which aliases point here now), not part of the stored record.
    """

    name: str
    version: int
    created: str
    filename: str
    size: int
    sha256: str
    kind: str
    artifacts: tuple[ArtifactKind, ...]
    mode: ArtifactKind
    limits: FunctionLimits
    description: str = ""
    toolchain: str | None = None
    build_ms: int = 0
    artifact_sha256: Mapping[str, str] = field(default_factory=dict)
    build_log: str | None = None
    aliases: tuple[str, ...] = ()
    #: The version's environment. Stored with its values; sent as its sorted names only
    #: (values may be secrets: §5.9).
    env: Mapping[str, str] = field(default_factory=dict)

    def to_wire(self, *, log: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "version": self.version,
            "created": self.created,
            "filename": self.filename,
            "size": self.size,
            "sha256": self.sha256,
            "kind": self.kind,
            "artifacts": list(self.artifacts),
            "mode": self.mode,
            "limits": self.limits.to_wire(),
            "description": self.description,
            "toolchain": self.toolchain,
            "build_ms": self.build_ms,
            "artifact_sha256": dict(self.artifact_sha256),
            "aliases": list(self.aliases),
            "env": sorted(self.env),
        }
        if log and self.build_log:
            out["build_log"] = self.build_log
        return out

    @classmethod
    def from_wire(cls, m: Mapping[str, Any], *, timeout_ms: int = 5000, memory_mb: int = 128) -> VersionInfo:
        """Lenient reader for stored metadata and replies: missing keys take neutral defaults
        (metadata written by older servers lacks some); ``name`` and ``version`` must be valid."""
        name = check_name(m.get("name"))
        version = m.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise InvalidArgumentError(f"invalid version {version!r} in metadata")
        raw_artifacts = m.get("artifacts")
        artifacts = tuple(
            a for a in (raw_artifacts if isinstance(raw_artifacts, list | tuple) else ["wasm"])
            if a in ARTIFACT_KINDS
        ) or ("wasm",)
        mode = m.get("mode")
        if mode not in artifacts:
            mode = "wasm" if "wasm" in artifacts else "native"
        digests = m.get("artifact_sha256")
        aliases = m.get("aliases")
        log = m.get("build_log")

        def text(key: str, default: str = "") -> str:
            v = m.get(key)
            return v if isinstance(v, str) else default

        def num(key: str) -> int:
            v = m.get(key)
            return v if isinstance(v, int) and not isinstance(v, bool) else 0

        toolchain = m.get("toolchain")
        env = m.get("env")
        if isinstance(env, Mapping):  # stored metadata: names and values
            env_map = {str(k): str(v) for k, v in env.items()}
        elif isinstance(env, list | tuple):  # a reply: names only
            env_map = {str(k): "" for k in env}
        else:
            env_map = {}
        return cls(
            name=name,
            version=version,
            created=text("created"),
            filename=text("filename"),
            size=num("size"),
            sha256=text("sha256"),
            kind=text("kind", "wasm"),
            artifacts=artifacts,
            mode=mode,  # type: ignore[arg-type]
            limits=FunctionLimits.from_wire(m.get("limits"), timeout_ms=timeout_ms, memory_mb=memory_mb),
            description=text("description"),
            toolchain=toolchain if isinstance(toolchain, str) else None,
            build_ms=num("build_ms"),
            artifact_sha256={
                k: v
                for k, v in (digests.items() if isinstance(digests, Mapping) else ())
                if k in ARTIFACT_KINDS and isinstance(v, str) and _SHA256_RE.match(v)
            },
            build_log=log if isinstance(log, str) else None,
            aliases=tuple(a for a in aliases if isinstance(a, str)) if isinstance(aliases, list | tuple) else (),
            env=env_map,
        )


# -- §5.4 list --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ListRequest:
    """§5.4."""

    op: ClassVar[str] = "list"
    #: Every tenant's functions (admins only), not just the caller's tenant's.
    all: bool = False

    @classmethod
    def from_wire(cls, body: Mapping[str, Any]) -> ListRequest:
        every = body.get("all", False)
        if not isinstance(every, bool):
            raise InvalidArgumentError(f"'all' must be true or false, got {every!r}")
        return cls(all=every)

    def to_wire(self) -> dict[str, Any]:
        return {"all": True} if self.all else {}


@dataclass(frozen=True, slots=True)
class FunctionSummary:
    """One line of ``list`` (§5.4)."""

    name: str
    latest: int
    versions: tuple[int, ...]
    aliases: Mapping[str, int]
    kind: str | None
    description: str
    #: The tenant the function belongs to.
    tenant: str = DEFAULT_TENANT

    def to_wire(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "tenant": self.tenant,
            "latest": self.latest,
            "versions": list(self.versions),
            "aliases": dict(self.aliases),
            "kind": self.kind,
            "description": self.description,
        }


@dataclass(frozen=True, slots=True)
class ListReply:
    """§5.4: every function, sorted by name."""

    functions: tuple[FunctionSummary, ...]

    def to_wire(self) -> dict[str, Any]:
        return {"functions": [f.to_wire() for f in self.functions]}


# -- §5.5 get ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GetRequest:
    """§5.5: one function, one page of its versions (or one version), logs only if asked."""

    op: ClassVar[str] = "get"
    name: str
    version: VersionRef = None
    limit: int = DEFAULT_PAGE
    cursor: int | None = None
    log: bool = False

    @classmethod
    def from_wire(cls, body: Mapping[str, Any]) -> GetRequest:
        return cls(
            name=check_name(body.get("name")),
            version=parse_version_ref(body.get("version")),
            limit=_int(body, "limit", 1, MAX_PAGE) or DEFAULT_PAGE,
            cursor=_int(body, "cursor", 0, MAX_VERSION),
            log=_bool(body, "log"),
        )

    def to_wire(self) -> dict[str, Any]:
        return _present(
            {
                "name": self.name,
                "version": self.version,
                "limit": self.limit if self.limit != DEFAULT_PAGE else None,
                "cursor": self.cursor,
                "log": self.log or None,
            }
        )


@dataclass(frozen=True, slots=True)
class GetReply:
    """§5.5: ``versions`` ascending; ``next_cursor`` is nil on the last page."""

    name: str
    latest: int
    aliases: Mapping[str, int]
    versions: tuple[VersionInfo, ...]
    next_cursor: int | None = None
    log: bool = False

    def to_wire(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "latest": self.latest,
            "aliases": dict(self.aliases),
            "versions": [v.to_wire(log=self.log) for v in self.versions],
            "next_cursor": self.next_cursor,
        }


# -- §5.6 delete, §5.7 alias ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeleteRequest:
    """§5.6: one version, or every version when ``version`` is None."""

    op: ClassVar[str] = "delete"
    name: str
    version: int | None = None

    @classmethod
    def from_wire(cls, body: Mapping[str, Any]) -> DeleteRequest:
        return cls(check_name(body.get("name")), _int(body, "version", 1, MAX_VERSION))

    def to_wire(self) -> dict[str, Any]:
        # version is sent even when None: nil is how §5.6 says "every version".
        return {"name": self.name, "version": self.version}


@dataclass(frozen=True, slots=True)
class DeleteReply:
    """§5.6."""

    name: str
    deleted: tuple[int, ...]
    aliases_removed: tuple[str, ...]

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "deleted": list(self.deleted), "aliases_removed": list(self.aliases_removed)}


@dataclass(frozen=True, slots=True)
class AliasRequest:
    """§5.7: create or move an alias."""

    op: ClassVar[str] = "alias"
    name: str
    alias: str
    version: int

    @classmethod
    def from_wire(cls, body: Mapping[str, Any]) -> AliasRequest:
        return cls(
            check_name(body.get("name")),
            check_alias(body.get("alias")),
            _req_int(body, "version", 1, MAX_VERSION),
        )

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "alias": self.alias, "version": self.version}


@dataclass(frozen=True, slots=True)
class AliasReply:
    """§5.7."""

    name: str
    alias: str
    version: int
    previous: int | None

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "alias": self.alias, "version": self.version, "previous": self.previous}


# -- §5.10 compile ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CompileRequest:
    """§5.10: make sure one version's wasm module is compiled on this node."""

    op: ClassVar[str] = "compile"
    name: str
    version: VersionRef = None

    @classmethod
    def from_wire(cls, body: Mapping[str, Any]) -> CompileRequest:
        return cls(check_name(body.get("name")), parse_version_ref(body.get("version")))

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version}


@dataclass(frozen=True, slots=True)
class CompileReply:
    """§5.10."""

    name: str
    version: int

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version}


# -- §5.8 invoke ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InvokeRequest:
    """§5.8."""

    op: ClassVar[str] = "invoke"
    name: str
    version: VersionRef = None
    input: bytes = b""
    args: tuple[str, ...] = ()
    timeout_ms: int | None = None
    mode: ArtifactKind | None = None
    #: Queue the call and answer at once with its id (§5.8, §5.12).
    async_: bool = False

    @classmethod
    def from_wire(cls, body: Mapping[str, Any]) -> InvokeRequest:
        data = body.get("input", b"")
        if data is None:
            data = b""
        if not isinstance(data, bytes):
            # §2: payloads are msgpack bin; a str would be silently re-encoded otherwise.
            raise InvalidArgumentError("'input' must be bytes (msgpack bin), not a string")
        args = body.get("args") or []
        if not isinstance(args, list | tuple) or not all(isinstance(a, str) for a in args):
            raise InvalidArgumentError("'args' must be a list of strings")
        return cls(
            name=check_name(body.get("name")),
            version=parse_version_ref(body.get("version")),
            input=data,
            args=tuple(args),
            timeout_ms=_int(body, "timeout_ms", 1, 2**31),
            mode=_mode(body.get("mode")),
            async_=_bool(body, "async"),
        )

    def to_wire(self) -> dict[str, Any]:
        return _present(
            {
                "name": self.name,
                "version": self.version,
                "input": self.input,
                "args": list(self.args) or None,
                "timeout_ms": self.timeout_ms,
                "mode": self.mode,
                "async": self.async_ or None,
            }
        )


@dataclass(frozen=True, slots=True)
class InvokeResult:
    """One invocation's outcome (§5.8), the same record from the worker to the client.

    A non-zero ``exit_code`` is a result, not an error; guest failures are exceptions.
    """

    output: bytes
    stderr: bytes
    exit_code: int
    duration_us: int
    version: int = 0
    truncated: bool = False
    queue_us: int = 0
    wall_us: int = 0
    memory_peak: int = 0
    mode: str = "wasm"
    #: The invocation's id, as its record in ``logs`` shows it (§5.13).
    id: str = ""
    #: The call loaded its module first (a cold start).
    cold: bool = False

    @classmethod
    def from_wire(cls, result: Mapping[str, Any]) -> InvokeResult:
        """Build from an ``invoke`` result map; absent keys take neutral defaults. A field of
        the wrong type is a :class:`ProtocolError` (never ``bytes(2**31)``: an int is not
        output)."""

        def data(key: str) -> bytes:
            value = result.get(key)
            if value is None:
                return b""
            if not isinstance(value, bytes):
                raise ProtocolError(f"malformed invoke result: '{key}' is not bin")
            return value

        def number(key: str) -> int:
            value = result.get(key)
            if value is None:
                return 0
            if not isinstance(value, int) or isinstance(value, bool) or abs(value) >= 2**63:
                raise ProtocolError(f"malformed invoke result: '{key}' is not an integer")
            return value

        mode = result.get("mode")
        if mode is not None and not isinstance(mode, str):
            raise ProtocolError("malformed invoke result: 'mode' is not a string")
        return cls(
            output=data("output"),
            stderr=data("stderr"),
            exit_code=number("exit_code"),
            duration_us=number("duration_us"),
            version=number("version"),
            truncated=bool(result.get("truncated", False)),
            queue_us=number("queue_us"),
            wall_us=number("wall_us"),
            memory_peak=number("memory_peak"),
            mode=mode or "wasm",
            id=str(result.get("id") or ""),
            cold=bool(result.get("cold", False)),
        )

    def to_wire(self) -> dict[str, Any]:
        return {
            "output": self.output,
            "stderr": self.stderr,
            "truncated": self.truncated,
            "exit_code": self.exit_code,
            "version": self.version,
            "mode": self.mode,
            "duration_us": self.duration_us,
            "queue_us": self.queue_us,
            "wall_us": self.wall_us,
            "memory_peak": self.memory_peak,
            "id": self.id,
            "cold": self.cold,
        }

    @property
    def text(self) -> str:
        """``output`` decoded as UTF-8, undecodable bytes replaced."""
        return self.output.decode("utf-8", "replace")

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready map: byte fields decoded as UTF-8 with replacement."""
        out = self.to_wire()
        out["output"] = self.text
        out["stderr"] = self.stderr.decode("utf-8", "replace")
        return out
