"""Browser end-to-end tests: real Chromium pages against real uvicorn processes.

One Chromium (Debian's, driven by Playwright) serves the whole session; each
test gets fresh browser contexts (separate cookie jars: one per person) and
its own server processes, started as the README runs the site (uvicorn; see
tests/servers.py) and configured like production (DEBUG off, WhiteNoise, the
Redis channel layer) on this run's test database. The tests are async and
share the session's event loop with the browser.

Waits are bounded: Playwright calls and `expect` give up after TIMEOUT_MS
unless a test passes a longer timeout for something it knows is slow (a
server restart). When a test fails, every page it opened is saved as a
screenshot under var/e2e-screenshots/. The helpers the tests call are in helpers.py.
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
from django.conf import settings
from playwright.async_api import Browser, BrowserContext, Page, async_playwright

from bench.serverprocess import ServerProcess
from tests.e2e.helpers import TIMEOUT_MS, sign_in_by_cookie
from tests.servers import ServerCluster

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
SCREENSHOT_DIR = Path(settings.BASE_DIR) / "var" / "e2e-screenshots"


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
def cluster(collected_static, cluster) -> ServerCluster:
    """tests/conftest.py's `cluster`, serving the collected static files."""
    return cluster


@pytest_asyncio.fixture(loop_scope="session")
async def server(cluster) -> ServerProcess:
    (started,) = await cluster.start(1)
    return started


@dataclass
class Browsers:
    """The browser contexts (people) of one test; each page's errors are kept for failure reports."""

    browser: Browser
    cluster: ServerCluster
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
