"""The OpenAPI document of the HTTP gateway (issue 13 item 5).

``fnserver/gateway/openapi.json`` (also ``docs/openapi.json``, a link to it) is valid OpenAPI,
is byte for byte what ``GET /v1/openapi.json`` serves, names the gateway's real routes, and
holds of the live gateway: a bounded schemathesis run finds no 5xx and no reply that breaks it.

The server runs on the test's event loop; everything that speaks HTTP here (requests, through
schemathesis) is synchronous, so it runs in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import requests
import schemathesis
from aiohttp.test_utils import make_mocked_request
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from fnserver.auth import add_token, token_id_of
from fnserver.config import ServerConfig
from fnserver.gateway import HttpFront

from .conftest import ServerHandle

ROOT = Path(__file__).resolve().parent.parent
DOCUMENT = ROOT / "fnserver" / "gateway" / "openapi.json"
ECHO_WAT = (ROOT / "examples" / "wat" / "echo.wat").read_bytes()
#: What every reply of every case is checked for.
CHECKS = [not_a_server_error, response_schema_conformance, status_code_conformance, content_type_conformance]
#: Generated cases per operation, generation mode and choice of path parameters: the bound of
#: the run (22 operations x 2 modes x 2 choices: about 10 s).
EXAMPLES = 10
#: The alias the fuzzed function is registered under, so that a version reference to it
#: survives the function being deleted and registered again (numbers are never reused).
LIVE = "live"


def load() -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_path(DOCUMENT)


# -- the document itself ------------------------------------------------------------------------


def test_document_is_valid_openapi() -> None:
    schema = load()
    schema.validate()  # against the OpenAPI 3.1 meta-schema
    operations = [result.ok() for result in schema.get_all_operations()]  # every $ref resolves
    ids = [op.definition.raw["operationId"] for op in operations]
    assert len(ids) == len(set(ids))
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "GET /v1/functions",
        "POST /v1/functions/{name}",
        "GET /v1/functions/{name}",
        "DELETE /v1/functions/{name}",
        "GET /v1/functions/{name}@{version}",
        "DELETE /v1/functions/{name}@{version}",
        "PUT /v1/functions/{name}/aliases/{alias}",
        "POST /v1/functions/{name}/invoke",
        "POST /v1/functions/{name}@{version}/invoke",
        "GET /v1/invocations/{id}",
        "GET /v1/functions/{name}/logs",
        "GET /v1/functions/{name}/stats",
        "GET /v1/stats",
        "GET /v1/whoami",
        "GET /v1/openapi.json",
        "GET /healthz",
        "GET /readyz",
    }


def test_path_templates_and_path_parameters_agree() -> None:
    doc = json.loads(DOCUMENT.read_text())
    for path, item in doc["paths"].items():
        templated = set(re.findall(r"\{([^}]+)\}", path))
        shared = {p["name"] for p in item.get("parameters", []) if p["in"] == "path"}
        for method, op in item.items():
            if method == "parameters":
                continue
            own = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert shared | own == templated, (method, path)


def test_every_error_reply_is_the_error_schema_with_its_codes() -> None:
    """Each error status names exactly the codes docs/HTTP.md maps to it."""
    doc = json.loads(DOCUMENT.read_text())
    table = {
        "400": {"INVALID_ARGUMENT", "PROTOCOL_ERROR", "CHECKSUM_MISMATCH"},
        "401": {"UNAUTHENTICATED"},
        "403": {"PERMISSION_DENIED"},
        "404": {"NOT_FOUND"},
        "409": {"ALREADY_EXISTS"},
        "413": {"TOO_LARGE"},
        "422": {"BUILD_FAILED", "TRAP", "MEMORY_LIMIT"},
        "429": {"QUOTA_EXCEEDED"},
        "500": {"INTERNAL"},
        "503": {"RESOURCE_EXHAUSTED", "UNAVAILABLE"},
        "504": {"TIMEOUT"},
    }
    assert set(doc["components"]["schemas"]["Error"]["properties"]["code"]["enum"]) == set().union(*table.values())
    seen = set()
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method == "parameters":
                continue
            for status, reply in op["responses"].items():
                if status.startswith(("4", "5")) and path != "/readyz":
                    name = reply["$ref"].rsplit("/", 1)[1]
                    schema = doc["components"]["responses"][name]["content"]["application/json"]["schema"]
                    assert schema["allOf"][0] == {"$ref": "#/components/schemas/Error"}
                    assert set(schema["allOf"][1]["properties"]["code"]["enum"]) == table[status], status
                    seen.add(status)
    assert seen >= set(table) - {"409"}


def test_docs_copy_is_the_served_file() -> None:
    link = ROOT / "docs" / "openapi.json"
    assert link.is_symlink()
    assert link.resolve() == DOCUMENT.resolve()


# -- the live gateway ---------------------------------------------------------------------------


class Gateway:
    """A real server with its HTTP gateway on a free port and tokens of three roles (so every
    request needs one, as on any deployed server)."""

    def __init__(self, front: HttpFront, tokens: dict[str, str]) -> None:
        self.front = front
        self.base = f"http://127.0.0.1:{front.port}"
        self.tokens = tokens

    def auth(self, role: str = "admin") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}


@contextlib.asynccontextmanager
async def gateway(server_config: ServerConfig) -> AsyncIterator[Gateway]:
    tokens = {role: add_token(server_config.auth_path, "default", role)[1] for role in ("admin", "deployer", "invoker")}
    handle = ServerHandle(replace(server_config, http_port=0))
    server = await handle.start()
    try:
        assert server.http is not None
        yield Gateway(server.http, tokens)
    finally:
        await handle.stop()


#: Routes the document leaves out: Prometheus's, and the dashboard's.
UNDOCUMENTED = frozenset({"/metrics", "/", "/ui"})


async def test_the_document_names_exactly_the_gateways_routes(server_config: ServerConfig) -> None:
    """Each documented operation, its path filled in, reaches a route of the gateway that
    takes its method; and every route but the undocumented ones is documented."""
    async with gateway(server_config) as gw:
        app = gw.front.app()
        documented = set()
        for result in load().get_all_operations():
            op = result.ok()
            path = op.path.format(name="acme%2Fecho", version="prod", alias="prod", id="echo@3")
            match = await app.router.resolve(make_mocked_request(op.method.upper(), path, app=app))
            assert match.http_exception is None, op.label
            documented.add((op.method.upper(), match.route.resource.canonical))
        served = {
            (route.method, route.resource.canonical)
            for route in app.router.routes()
            if route.method != "HEAD" and route.resource is not None and route.resource.canonical not in UNDOCUMENTED
        }
        assert documented == served


def header(response: Any, name: str) -> str | None:
    """A header of a schemathesis response (its header map keeps the server's spelling)."""
    for key, values in response.headers.items():
        if key.lower() == name.lower():
            return values[0]
    return None


def register_echo(gw: Gateway, session: requests.Session | None = None) -> dict[str, Any]:
    """Register examples/wat/echo.wat as a new version of ``echo``, aliased ``live``."""
    reply = (session or requests).post(
        f"{gw.base}/v1/functions/echo",
        params={"filename": "echo.wat", "alias": LIVE},
        data=ECHO_WAT,
        headers={"Content-Type": "application/octet-stream", **gw.auth()},
        timeout=120,
    )
    assert reply.status_code == 201, reply.text
    return reply.json()


def walk_the_routes(gw: Gateway) -> None:
    """Every documented route, called as the document describes it, answers as documented."""
    schema = load()

    def call(method: str, path: str, expect: int, role: str | None = "admin", **case: Any) -> Any:
        headers = {**case.pop("headers", {}), **(gw.auth(role) if role else {})}
        response = schema[path][method].Case(**case).call_and_validate(
            base_url=gw.base, headers=headers, checks=CHECKS, timeout=60
        )
        assert response.status_code == expect, (method, path, response.status_code, response.text)
        return response

    served = requests.get(f"{gw.base}/v1/openapi.json", timeout=30)  # public, as /healthz
    assert served.status_code == 200
    assert served.headers["Content-Type"].startswith("application/json")
    assert served.content == DOCUMENT.read_bytes()
    call("GET", "/v1/openapi.json", 200, role=None)

    first = call("POST", "/v1/functions/{name}", 201, path_parameters={"name": "echo"},
                 query={"filename": "echo.wat"}, body=ECHO_WAT, media_type="application/octet-stream")
    assert first.json()["version"] == 1
    assert header(first, "Location") == "/v1/functions/echo@1"
    second = call("POST", "/v1/functions/{name}", 201, role="deployer", path_parameters={"name": "echo"},
                  body={"file": ECHO_WAT, "filename": "echo.wat", "alias": "prod", "env": ["GREETING=hi"]},
                  media_type="multipart/form-data")
    assert (second.json()["version"], second.json()["aliases"], second.json()["env"]) == (2, ["prod"], ["GREETING"])

    listed = call("GET", "/v1/functions", 200).json()
    assert [f["name"] for f in listed["functions"]] == ["echo"]
    got = call("GET", "/v1/functions/{name}", 200, path_parameters={"name": "echo"}).json()
    assert ([v["version"] for v in got["versions"]], got["aliases"], got["latest"]) == ([1, 2], {"prod": 2}, 2)
    assert call("GET", "/v1/functions/{name}@{version}", 200,
                path_parameters={"name": "echo", "version": "1"}).json()["version"] == 1
    assert call("GET", "/v1/functions/{name}@{version}", 200, path_parameters={"name": "echo", "version": "prod"},
                query={"log": "1"}).json()["version"] == 2
    moved = call("PUT", "/v1/functions/{name}/aliases/{alias}", 200,
                 path_parameters={"name": "echo", "alias": "prod"}, body={"version": 1}, media_type="application/json")
    assert moved.json() == {"name": "echo", "alias": "prod", "version": 1, "previous": 2}

    raw = call("POST", "/v1/functions/{name}/invoke", 200, role="invoker", path_parameters={"name": "echo"},
               body=b"hi", media_type="application/octet-stream")
    assert raw.content == b"hi"
    assert (header(raw, "Fn-Exit-Code"), header(raw, "Fn-Version"), header(raw, "Content-Type")) == (
        "0", "2", "application/octet-stream")
    as_json = call("POST", "/v1/functions/{name}@{version}/invoke", 200, role="invoker",
                   path_parameters={"name": "echo", "version": "prod"}, body=b"hi",
                   media_type="application/octet-stream", headers={"Accept": "application/json"})
    assert (as_json.json()["output"], as_json.json()["version"]) == ("hi", 1)
    queued = call("POST", "/v1/functions/{name}/invoke", 202, path_parameters={"name": "echo"},
                  query={"async": "1"}, body=b"later", media_type="application/octet-stream")
    inv = queued.json()["id"]
    assert header(queued, "Location") == queued.json()["url"] == f"/v1/invocations/{inv}"
    status = call("GET", "/v1/invocations/{id}", 200, path_parameters={"id": inv}, query={"wait": 30}).json()
    assert (status["state"], status["result"]["output"]) == ("done", "later")

    deadline = time.monotonic() + 30
    while not (records := call("GET", "/v1/functions/{name}/logs", 200,
                               path_parameters={"name": "echo"}).json()["records"]):
        assert time.monotonic() < deadline, "no invocation record reached the store"
        time.sleep(0.1)
    assert records[0]["name"] == "echo"
    call("GET", "/v1/functions/{name}/stats", 200, path_parameters={"name": "echo"})
    call("GET", "/v1/stats", 200)
    me = call("GET", "/v1/whoami", 200, role="invoker").json()
    assert (me["tenant"], me["role"], me["token_id"]) == ("default", "invoker", token_id_of(gw.tokens["invoker"]))
    call("GET", "/healthz", 200, role=None)
    call("GET", "/readyz", 200, role=None)

    # Refusals: no token, a wrong token, a role that may not.
    for role, token in ((None, None), ("wrong", "fn_000000000000_" + "A" * 43)):
        refused = call("GET", "/v1/functions", 401, role=None,
                       headers={"Authorization": f"Bearer {token}"} if token else {})
        assert header(refused, "WWW-Authenticate") is not None, role
    denied = call("DELETE", "/v1/functions/{name}", 403, role="invoker", path_parameters={"name": "echo"})
    assert denied.json()["details"] == {"role": "invoker", "operation": "delete"}

    # The original routes.
    assert [v["id"] for v in call("GET", "/functions", 200).json()] == ["echo@prod", "echo@2"]
    assert call("GET", "/functions/{id}", 200, path_parameters={"id": "echo@prod"}).json()["number"] == 1
    assert call("GET", "/functions/{id}", 200, path_parameters={"id": "echo"}).json()["number"] == 2
    ran = call("POST", "/invoke/{id}", 200, path_parameters={"id": "echo"}, body={"input": "hi"},
               media_type="application/x-www-form-urlencoded").json()
    assert (ran["Stdout"], ran["ExitCode"], ran["Version"]) == ("hi", 0, 2)
    assert call("DELETE", "/functions/{id}", 200, path_parameters={"id": "echo@1"}).json()["deleted"] == [1]

    assert call("DELETE", "/v1/functions/{name}@{version}", 200,
                path_parameters={"name": "echo", "version": "2"}).json()["deleted"] == [2]
    assert call("GET", "/v1/functions/{name}", 404, path_parameters={"name": "echo"}).json()["code"] == "NOT_FOUND"
    register_echo(gw)
    assert call("DELETE", "/v1/functions/{name}", 200, path_parameters={"name": "echo"}).json()["name"] == "echo"
    # The original platform's clients name the file part (schemathesis's multipart does not).
    made = requests.post(f"{gw.base}/functions", data={"name": "echo", "version": "v1"},
                         files={"file": ("echo.wat", ECHO_WAT)}, headers=gw.auth(), timeout=120)
    schema["/functions"]["POST"].validate_response(made)
    assert (made.status_code, made.json()["id"], made.json()["version"]) == (200, "echo@v1", "v1")

    nowhere = requests.get(f"{gw.base}/v1/nowhere", headers=gw.auth(), timeout=30)
    assert (nowhere.status_code, nowhere.json()["code"]) == (404, "NOT_FOUND")


async def test_the_gateway_serves_the_document_and_its_routes(server_config: ServerConfig) -> None:
    async with gateway(server_config) as gw:
        await asyncio.to_thread(walk_the_routes, gw)


#: Kinds a register builds with a real compiler, and the extensions that pick them.
TOOLCHAIN_KINDS = frozenset({"go", "go-module", "c", "zig"})
TOOLCHAIN_EXTENSIONS = (".go", ".zip", ".c", ".zig")


def starts_a_toolchain(case: Any) -> bool:
    """Whether ``case`` is a register that would run Go, Zig or clang on its (random) upload.

    The run leaves those out: each costs seconds of compiler time and tests the builder, not
    the gateway. A failed build's reply is still exercised, through ``wat`` (wasmtime's parser,
    no toolchain), and a kind the server does not know through the rest.
    """
    if case.method.upper() != "POST" or case.path not in ("/v1/functions/{name}", "/functions"):
        return False
    fields = {**(case.query or {}), **(case.body if isinstance(case.body, dict) else {})}

    def values(key: str) -> list[Any]:
        value = fields.get(key)
        return value if isinstance(value, list) else [value]

    if any(isinstance(k, str) and k in TOOLCHAIN_KINDS for k in values("kind")):
        return True
    if any(isinstance(f, str) and f.endswith(TOOLCHAIN_EXTENSIONS) for f in values("filename")):
        return True
    # schemathesis names the part of its sample zip file ``file.zip``.
    data = getattr(fields.get("file"), "data", fields.get("file"))
    return isinstance(data, bytes) and data.startswith(b"PK")


def fuzz(gw: Gateway) -> tuple[list[str], int]:
    """schemathesis's cases for every operation of the served document, positive and negative,
    with generated path parameters and again with the real function's, as an admin; returns
    what failed (one report per operation, mode and kind of failure) and how many cases ran."""
    schema = schemathesis.openapi.from_url(f"{gw.base}/v1/openapi.json", headers=gw.auth(), timeout=30)
    session = requests.Session()
    register_echo(gw, session)
    queued = session.post(f"{gw.base}/v1/functions/echo/invoke", params={"async": "1"}, data=b"x",
                          headers=gw.auth(), timeout=60)
    assert queued.status_code == 202, queued.text
    real = {"name": "echo", "version": LIVE, "alias": "prod"}
    findings: dict[tuple[str, ...], str] = {}
    cases = 0

    def real_path_parameters(op: Any) -> dict[str, str]:
        names = {p.name for p in op.path_parameters}
        pinned = {k: v for k, v in real.items() if k in names}
        if "id" in names:  # an invocation's id, or an original route's NAME@VERSION
            pinned["id"] = queued.json()["id"] if op.path.startswith("/v1/") else f"echo@{LIVE}"
        return pinned

    def run(op: Any, mode: GenerationMode, pinned: dict[str, str] | None) -> None:
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=op.as_strategy(generation_mode=mode, path_parameters=pinned))
        def one(case: Any) -> None:
            nonlocal cases
            assume(not starts_a_toolchain(case))
            cases += 1
            try:
                case.call_and_validate(base_url=gw.base, session=session, headers=gw.auth(),
                                       checks=CHECKS, timeout=120)
            except FailureGroup as group:
                kinds = tuple(sorted({type(f).__name__ for f in group.exceptions}))
                findings.setdefault((op.label, mode.value, *kinds), str(group))
            except requests.RequestException as exc:
                findings.setdefault((op.label, mode.value, type(exc).__name__),
                                    f"{case.as_curl_command()}\n{exc!r}")

        try:
            one()
        except Unsatisfiable:
            # Nothing left to break (every part is pinned or cannot be invalid): nothing to send.
            assert mode is GenerationMode.NEGATIVE, op.label

    # Deletes last, so that the real function is there for everything else; after each pass
    # that may have deleted it, it is registered again (under the same alias, ``live``).
    operations = sorted((r.ok() for r in schema.get_all_operations()), key=lambda op: op.method.upper() == "DELETE")
    for op in operations:
        pinned = real_path_parameters(op)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            for params in (None, pinned) if pinned else (None,):
                run(op, mode, params)
                if params and op.method.upper() == "DELETE":
                    register_echo(gw, session)
    return [f"{' / '.join(key)}:\n{text}" for key, text in findings.items()], cases


async def test_schemathesis_finds_no_server_error_and_no_reply_off_the_document(server_config: ServerConfig) -> None:
    async with gateway(server_config) as gw:
        findings, cases = await asyncio.to_thread(fuzz, gw)
    assert cases > 200
    assert not findings, f"{len(findings)} findings:\n\n" + "\n\n".join(findings)
