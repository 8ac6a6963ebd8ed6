"""The quotas on calls and builds end to end (issue 11): a real server, real tokens, two
tenants; one tenant over its quota is refused with QUOTA_EXCEEDED and its details while the
other is served. (Functions, versions and storage: tests/test_namespaces.py; the rate quota
from the auth file: tests/test_tokens.py; the tables themselves: tests/test_quotas.py.)

No sleeps: a call or a register is known to be holding its place when the server has said
so (a refusal seen while it is still pending, a progress event).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator

import pytest
from fnclient import AsyncClient, FnError, QuotaExceededError
from fnclient._async import UploadStream

from fnserver.auth import add_token
from fnserver.config import TenantLimits
from tests import wasm_fixtures as wasm
from tests.conftest import ServerHandle


async def test_concurrency_quota_counts_running_calls(handle: ServerHandle) -> None:
    acme = add_token(handle.config.auth_path, "acme", "deployer")[1]
    globex = add_token(handle.config.auth_path, "globex", "deployer")[1]
    await handle.stop()
    await handle.start(tenant_limits=TenantLimits(max_concurrency=1))
    async with AsyncClient(handle.address, acme) as a, AsyncClient(handle.address, globex) as g:
        await a.register("nap", wasm.sleep(3), filename="n.wasm", timeout_ms=60_000)
        await a.register("echo", wasm.echo(), filename="e.wasm")
        await g.register("echo", wasm.echo(), filename="e.wasm")
        sleeping = asyncio.ensure_future(a.invoke("nap", b""))
        refused: QuotaExceededError | None = None
        while refused is None:  # until the server counts the sleeping call as running
            if sleeping.done():
                # The probe held the only place when the long call arrived (or, on a slow
                # machine, the nap ended before a probe came): send it again.
                exc = sleeping.exception()
                assert exc is None or isinstance(exc, QuotaExceededError), sleeping
                sleeping = asyncio.ensure_future(a.invoke("nap", b""))
            try:
                await a.invoke("echo", b"x")
            except QuotaExceededError as exc:
                refused = exc
        assert refused.details == {"quota": "concurrency", "tenant": "acme", "limit": 1, "current": 1}
        assert (await g.invoke("echo", b"other")).output == b"other"  # another tenant is served
        sleeping.cancel()
        await asyncio.wait([sleeping])


async def test_builds_quota_counts_registers_in_progress(handle: ServerHandle) -> None:
    acme = add_token(handle.config.auth_path, "acme", "deployer")[1]
    globex = add_token(handle.config.auth_path, "globex", "deployer")[1]
    await handle.stop()
    await handle.start(tenant_limits=TenantLimits(max_builds=1))
    body = wasm.echo() + b"\0" * (5 * 1024 * 1024)  # not a valid module: the build fails later
    first_part, rest = body[: 4 * 1024 * 1024], body[4 * 1024 * 1024 :]
    release = asyncio.Event()
    uploading = asyncio.Event()

    async def chunks() -> AsyncIterator[bytes]:
        yield first_part
        await release.wait()  # hold the register open, mid-upload
        yield rest

    stream = UploadStream(len(body), hashlib.sha256(body).hexdigest(), chunks())
    async with AsyncClient(handle.address, acme) as a, AsyncClient(handle.address, globex) as g:
        held = asyncio.ensure_future(
            a.register("big", stream, filename="big.wasm", progress=lambda *_: uploading.set())
        )
        await uploading.wait()  # the server received the first 4 MiB: the build place is taken
        with pytest.raises(QuotaExceededError) as caught:
            await a.register("small", wasm.echo(), filename="s.wasm")
        assert caught.value.details == {"quota": "builds", "tenant": "acme", "limit": 1, "current": 1}
        await g.register("small", wasm.echo(), filename="s.wasm")  # another tenant builds
        release.set()
        with pytest.raises(FnError):
            await held  # the padded module is refused by its build, and frees the place
        await a.register("small", wasm.echo(), filename="s.wasm")
