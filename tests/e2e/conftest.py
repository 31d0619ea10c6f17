"""Browser end-to-end tests: real Chromium pages against real daphne processes.

One Chromium (Debian's, driven by Playwright) serves the whole session; each
test gets fresh browser contexts (separate cookie jars: one per person) and
its own daphne processes, configured like production (DEBUG off, WhiteNoise,
the Redis channel layer) on this run's test database. The tests are async and
share the session's event loop with the browser.

Waits are bounded: Playwright calls and `expect` give up after TIMEOUT_MS
unless a test passes a longer timeout for something it knows is slow (a
server restart). When a test fails, every page it opened is saved as a
screenshot under var/e2e-screenshots/.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio
from channels.db import database_sync_to_async
from django.conf import settings
from playwright.async_api import Browser, BrowserContext, Page, async_playwright, expect

from bench.serverprocess import ServerProcess
from tests.conftest import session_cookie
from tests.test_live_servers import DaphneCluster

CHROMIUM = os.environ.get("E2E_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
AXE_JS = Path(settings.BASE_DIR) / "node_modules" / "axe-core" / "axe.min.js"
SCREENSHOT_DIR = Path(settings.BASE_DIR) / "var" / "e2e-screenshots"

TIMEOUT_MS = 5_000  # any single wait: a click, a navigation, an expect
RECONNECT_TIMEOUT_MS = 20_000  # the page's reconnect backoff after a server was down for a few seconds

expect.set_options(timeout=TIMEOUT_MS)


# --------------------------------------------------------------------------
# Failure screenshots
# --------------------------------------------------------------------------


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    # Fixtures read item.e2e_failed in their teardown to decide on screenshots.
    if report.when in ("setup", "call") and report.failed:
        item.e2e_failed = True
    return report


# --------------------------------------------------------------------------
# Session: static files and the browser
# --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def collected_static() -> None:
    """With DEBUG off WhiteNoise serves only STATIC_ROOT: collect the current files once per session."""
    env = {**os.environ, "DEBUG": "0", "SECRET_KEY": settings.SECRET_KEY}
    result = subprocess.run(
        [sys.executable, "manage.py", "collectstatic", "--noinput", "--verbosity", "0"],
        cwd=settings.BASE_DIR,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if result.returncode != 0:
        pytest.fail(f"collectstatic failed ({result.returncode}):\n{result.stdout}\n{result.stderr}", pytrace=False)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def browser() -> AsyncIterator[Browser]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"No Chromium at {CHROMIUM}: the e2e tests need it. Install Debian's package "
            "(`apt-get install chromium`; bin/test does this when run as root) or set E2E_CHROMIUM.",
            pytrace=False,
        )
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True, timeout=30_000
        )
        try:
            yield browser
        finally:
            await browser.close()


# --------------------------------------------------------------------------
# Per test: servers and browser contexts
# --------------------------------------------------------------------------


@pytest.fixture
def cluster(collected_static, transactional_db, tmp_path) -> DaphneCluster:
    # Like test_live_servers' `daphne` fixture: depending on transactional_db
    # makes the servers die before the database is flushed or dropped.
    servers = DaphneCluster(tmp_path)
    try:
        yield servers
    finally:
        servers.kill_all()


@pytest_asyncio.fixture(loop_scope="session")
async def server(cluster) -> ServerProcess:
    (started,) = await cluster.start(1)
    return started


@dataclass
class Browsers:
    """The browser contexts (people) of one test; each page's errors are kept for failure reports."""

    browser: Browser
    cluster: DaphneCluster
    contexts: list[BrowserContext] = field(default_factory=list)
    errors: dict[Page, list[str]] = field(default_factory=dict)

    async def new_context(self, user=None, *, server: ServerProcess | None = None, **options) -> BrowserContext:
        """A fresh cookie jar, signed in as `user` (by its session cookie) when given."""
        context = await self.browser.new_context(**options)
        self.contexts.append(context)
        context.set_default_timeout(TIMEOUT_MS)
        context.set_default_navigation_timeout(TIMEOUT_MS)
        context.on("page", self._watch)
        if user is not None:
            await sign_in_by_cookie(context, user, server or self.cluster.servers[0])
        return context

    async def new_page(self, user=None, *, server: ServerProcess | None = None, **options) -> Page:
        context = await self.new_context(user, server=server, **options)
        return await context.new_page()

    def _watch(self, page: Page) -> None:
        errors = self.errors.setdefault(page, [])
        page.on("pageerror", lambda error: errors.append(f"pageerror: {error}"))
        page.on("console", lambda message: message.type == "error" and errors.append(f"console: {message.text}"))
        # Deleting a message asks confirm(): say yes.
        page.on("dialog", lambda dialog: dialog.accept())

    def pages(self) -> list[Page]:
        return [page for context in self.contexts for page in context.pages]


@pytest_asyncio.fixture(loop_scope="session")
async def browsers(request, browser, cluster) -> AsyncIterator[Browsers]:
    people = Browsers(browser, cluster)
    try:
        yield people
    finally:
        if getattr(request.node, "e2e_failed", False):
            await save_screenshots(request.node.name, people)
            print(cluster.logs())
        for context in people.contexts:
            try:
                await context.close()
            except Exception:  # a context whose browser already went away
                pass


async def save_screenshots(test_name: str, people: Browsers) -> None:
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    safe_name = re.sub(r"[^A-Za-z0-9_.-]+", "_", test_name)
    for number, page in enumerate(people.pages(), start=1):
        path = SCREENSHOT_DIR / f"{safe_name}-{number}.png"
        try:
            await page.screenshot(path=str(path), full_page=True, timeout=TIMEOUT_MS)
            print(f"e2e: screenshot of {page.url} saved to {path}")
        except Exception as error:
            print(f"e2e: no screenshot of {page.url}: {error!r}")
        for line in people.errors.get(page, []):
            print(f"e2e: {page.url}: {line}")


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


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
