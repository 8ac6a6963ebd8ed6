"""The dashboard at ``/`` (issue 13), driven in a real headless Chromium.

A real server runs in-process with its HTTP gateway on port 0; a function is registered through
the HTTP API; Playwright then uses the page as a person would: pick the function, type an
input, press Invoke, read the output, the exit code and the call in the recent invocations. The
browser is the system's Chromium (``tests/_chromium.py`` installs it when it is missing): these
tests fail, never skip, where there is none.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from fnserver.auth import add_token
from fnserver.config import ServerConfig
from fnserver.server import FnServer
from tests import wasm_fixtures as wasm
from tests._chromium import chromium_path
from tests.conftest import ServerHandle

ECHO_WAT = (Path(__file__).parent.parent / "examples" / "wat" / "echo.wat").read_bytes()

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]

#: Playwright's expectations wait up to this long: a loaded CI machine is slow, not broken.
expect.set_options(timeout=30_000)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    context = await browser.new_context()
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield page
    finally:
        await context.close()
    assert not errors, f"the page's script failed: {errors}"


async def start(config: ServerConfig) -> tuple[ServerHandle, FnServer, str]:
    handle = ServerHandle(replace(config, http_port=0))
    server = await handle.start()
    assert server.http is not None
    return handle, server, f"http://127.0.0.1:{server.http.port}"


async def register(base: str, name: str, body: bytes, filename: str, token: str | None = None) -> None:
    """Register through the HTTP API: the raw file as the body (docs/HTTP.md, /v1)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{base}/v1/functions/{name}", params={"filename": filename, "alias": "prod"},
            data=body, headers=headers,
        ) as reply:
            assert reply.status == 201, await reply.text()


async def test_invoke_a_function_from_the_page(server_config: ServerConfig, page: Page) -> None:
    handle, _, base = await start(server_config)
    try:
        await register(base, "echo", ECHO_WAT, "echo.wat")
        await register(base, "fails", wasm.exit_code(3), "fails.wasm")
        await page.goto(f"{base}/")

        echo = page.locator('#functions [data-name="echo"]')
        await expect(echo).to_contain_text("echo")
        await echo.click()
        await expect(page.locator("#versions tr")).to_have_count(1)
        await expect(page.locator("#versions")).to_contain_text("prod")
        await expect(page.locator("#logs-empty")).to_be_visible()

        # Markup in the input comes back as text: the page never renders the server's data.
        text = "hello <b>dashboard</b>"
        await page.locator("#invoke-input").fill(text)
        await page.locator("#invoke-button").click()
        await expect(page.locator("#output")).to_have_text(text)
        await expect(page.locator("#exit-code")).to_have_text("0")
        await expect(page.locator("#stderr")).to_have_text("")
        await expect(page.locator("#timings")).to_contain_text("wall")
        await expect(page.locator("#output b")).to_have_count(0)

        # The call shows up in the recent invocations and the statistics.
        await expect(page.locator("#logs tr")).to_have_count(1)
        await expect(page.locator("#logs")).to_contain_text("exit 0")
        await expect(page.locator("#stats tbody tr")).to_have_count(1)

        # A version by alias; then an error reply, shown with its code.
        await page.locator("#invoke-version").fill("prod")
        await page.locator("#invoke-input").fill("again")
        await page.locator("#invoke-button").click()
        await expect(page.locator("#output")).to_have_text("again")
        await expect(page.locator("#logs tr")).to_have_count(2)
        await page.locator("#invoke-version").fill("nope")
        await page.locator("#invoke-button").click()
        await expect(page.locator("#error")).to_contain_text("NOT_FOUND")
        await expect(page.locator("#output")).to_be_hidden()

        # Another function: a non-zero exit code is a result, with its stderr.
        await page.locator('#functions [data-name="fails"]').click()
        await expect(page.locator("#function-name")).to_have_text("fails")
        await expect(page.locator("#invoke-version")).to_have_value("")
        await page.locator("#invoke-button").click()
        await expect(page.locator("#exit-code")).to_have_text("3")
        await expect(page.locator("#output")).to_have_text("bye")
        await expect(page.locator("#stderr")).to_have_text("oops")
        await expect(page.locator("#error")).to_be_hidden()
        await expect(page.locator("#logs")).to_contain_text("exit 3")
    finally:
        await handle.stop()


async def test_a_server_with_tokens_asks_for_one(server_config: ServerConfig, page: Page) -> None:
    _, token = add_token(server_config.auth_path, "default", "deployer")
    handle, _, base = await start(server_config)
    try:
        await register(base, "echo", ECHO_WAT, "echo.wat", token)
        await page.goto(f"{base}/")
        await expect(page.locator("#notice")).to_contain_text("This server needs a token")
        await expect(page.locator("#functions [data-name]")).to_have_count(0)

        await page.locator("#token").fill("fn_000000000000_" + "A" * 43)
        await page.locator("#token").press("Enter")
        await expect(page.locator("#notice")).to_contain_text("refused")
        await expect(page.locator("#functions [data-name]")).to_have_count(0)

        await page.locator("#token").fill(token)
        await page.locator("#token").press("Enter")
        await expect(page.locator('#functions [data-name="echo"]')).to_be_visible()
        await expect(page.locator("#notice")).to_be_hidden()
        await expect(page.locator("#whoami")).to_contain_text("deployer")

        # The token is kept: a reload lists the functions at once.
        await page.reload()
        await expect(page.locator("#token")).to_have_value(token)
        await page.locator('#functions [data-name="echo"]').click()
        await page.locator("#invoke-input").fill("with a token")
        await page.locator("#invoke-button").click()
        await expect(page.locator("#output")).to_have_text("with a token")
    finally:
        await handle.stop()


def test_no_chromium_and_no_way_to_install_it_is_a_failure(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from tests import _chromium

    monkeypatch.setattr(_chromium, "CHROMIUM", tmp_path / "chromium")
    monkeypatch.setattr(_chromium.os, "geteuid", lambda: 1000)
    with pytest.raises(RuntimeError, match="only root can install it"):
        _chromium.chromium_path()
