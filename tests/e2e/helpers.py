"""Helpers the browser tests share (fixtures live in conftest.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

from channels.db import database_sync_to_async
from django.conf import settings
from playwright.async_api import BrowserContext, Page, WebSocketRoute, expect

from bench.serverprocess import ServerProcess
from tests.helpers import session_cookie

AXE_JS = Path(settings.BASE_DIR) / "node_modules" / "axe-core" / "axe.min.js"
TIMEOUT_MS = 5_000  # any single wait: a click, a navigation, an expect
RECONNECT_TIMEOUT_MS = 20_000  # the page's reconnect backoff after a server was down for a few seconds

expect.set_options(timeout=TIMEOUT_MS)


async def sign_in_by_cookie(context: BrowserContext, user, server: ServerProcess) -> None:
    cookie = await database_sync_to_async(session_cookie)(user)
    # Cookies ignore ports: one cookie serves every server process on 127.0.0.1.
    await context.add_cookies([{"name": settings.SESSION_COOKIE_NAME, "value": cookie, "url": server.origin}])


async def sign_in_by_form(page: Page, server: ServerProcess, username: str, password: str) -> None:
    await page.goto(f"{server.origin}/accounts/login/")
    await page.fill("#id_username", username)
    await page.fill("#id_password", password)
    await page.get_by_role("button", name="Log in", exact=True).click()
    await expect(page).to_have_url(f"{server.origin}/")
    await expect(page.locator(".whoami")).to_contain_text(username)


async def open_room(page: Page, server: ServerProcess, slug: str) -> None:
    """Open a room page and wait until its socket is live."""
    await page.goto(f"{server.origin}/rooms/{slug}/")
    await expect_live(page)


async def expect_live(page: Page, timeout: float = TIMEOUT_MS) -> None:
    await expect(page.locator("#connection-state")).to_have_attribute("data-state", "live", timeout=timeout)


async def send(page: Page, body: str) -> None:
    """Type a message (Shift+Enter for its line breaks) and press Enter; wait until the server acknowledged it."""
    box = page.locator("#message-input")
    await box.click()
    for number, line in enumerate(body.split("\n")):
        if number:
            await box.press("Shift+Enter")
        await page.keyboard.insert_text(line)
    await box.press("Enter")
    await expect(page.locator("#messages li.message.pending")).to_have_count(0)


async def shown_messages(page: Page) -> list[tuple[int, str]]:
    """(seq, body text) of every acknowledged message on the page, in page order."""
    shown = await page.locator("#messages li.message[data-seq]").evaluate_all(
        "items => items.map(item => [Number(item.dataset.seq), item.querySelector('.body').textContent])"
    )
    return [(seq, body) for seq, body in shown]


async def expect_messages(page: Page, expected: list[tuple[int, str]], timeout: float = TIMEOUT_MS) -> None:
    """Wait until the page shows exactly these (seq, body) messages, in this order."""
    items = page.locator("#messages li.message[data-seq]")
    await expect(items).to_have_count(len(expected), timeout=timeout)
    await expect(items.locator(".body")).to_have_text([body for _, body in expected])
    shown = await shown_messages(page)
    assert shown == expected


async def horizontal_overflow(page: Page) -> tuple[int, int]:
    """(document scroll width, viewport width): the page overflows sideways when the first is larger."""
    return tuple(await page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]"))


# Keeps the page's WebSockets in window.__sockets, so that a test can close them.
KEEP_SOCKETS = """
(() => {
  const Native = window.WebSocket;
  window.__sockets = [];
  window.WebSocket = class extends Native {
    constructor(...args) { super(...args); window.__sockets.push(this); }
  };
})();
"""


def losing_sends(
    sends: list[dict], ready: asyncio.Event, closing: list[asyncio.Future]
) -> Callable[[WebSocketRoute], None]:
    """A WebSocket route that keeps every `send` frame in `sends` and, until `ready` is set, loses it
    on the way and drops the socket (its close in `closing`): a send the page must try again."""

    def route(page_side: WebSocketRoute) -> None:
        server_side = page_side.connect_to_server()

        def from_page(frame_text: str | bytes) -> None:
            frame = json.loads(frame_text)
            if frame["type"] == "send":
                sends.append(frame)
                if not ready.is_set():
                    closing.append(asyncio.ensure_future(page_side.close()))
                    return
            server_side.send(frame_text)

        page_side.on_message(from_page)

    return route
