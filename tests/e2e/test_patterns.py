"""The patterns page in a real browser: one room through short polling, long-polling and the WebSocket."""

from __future__ import annotations

import asyncio
import re
import time

import pytest
from channels.db import database_sync_to_async
from playwright.async_api import Page, Request, expect

from chat import services
from tests.e2e.helpers import TIMEOUT_MS

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio(loop_scope="session"), pytest.mark.slow]

PATTERNS = ("short", "long", "socket")
SENT = {
    "short": "[via API · short poll] hello",
    "long": "[via API · long poll] hello",
    "socket": "[via WebSocket] hello",
}


def panel(page: Page, pattern: str):
    return page.locator(f".pattern-panel[data-pattern='{pattern}']")


async def counters(page: Page) -> dict[str, int]:
    """HTTP requests of the polls and frames of the socket, as the panels expose them."""
    return {
        "short": int(await panel(page, "short").get_attribute("data-requests")),
        "long": int(await panel(page, "long").get_attribute("data-requests")),
        "socket": int(await panel(page, "socket").get_attribute("data-frames")),
    }


class LongPolls:
    """The page's /poll requests, as the browser makes them: how many started, which are still open."""

    def __init__(self, page: Page) -> None:
        self.started = 0
        self.open: set[Request] = set()
        page.on("request", self._start)
        page.on("requestfinished", self._end)
        page.on("requestfailed", self._end)

    def _start(self, request: Request) -> None:
        if "/poll?" in request.url:
            self.started += 1
            self.open.add(request)

    def _end(self, request: Request) -> None:
        self.open.discard(request)

    def waiting(self) -> bool:
        """A long request (not the first, 1 s one) is open at the server."""
        return any(int(re.search(r"[?&]timeout=(\d+)", request.url).group(1)) > 1 for request in self.open)


async def long_poll_waiting(page: Page, polls: LongPolls) -> None:
    """Return once a long-poll is waiting at the server and the long panel's counter shows every request."""
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    while not (polls.waiting() and (await counters(page))["long"] == polls.started):
        assert time.monotonic() < deadline, f"no long-poll waiting: {polls.started} started, {await counters(page)}"
        await asyncio.sleep(0.05)  # polling the condition until the deadline


async def test_each_path_sends_every_panel_shows_each_message_once_and_the_costs_differ(
    server, browsers, user, other_user, room
):
    alice = await browsers.new_page(user)
    polls = LongPolls(alice)
    await alice.goto(f"{server.origin}/rooms/{room.slug}/patterns/?interval=1")
    await expect(panel(alice, "socket")).to_have_attribute("data-state", "live")
    await expect(panel(alice, "short")).to_have_attribute("data-state", "polling")
    await expect(panel(alice, "long")).to_have_attribute("data-state", "polling")
    await expect(alice.locator("#patterns")).not_to_have_attribute("data-offset-ms", "")

    await alice.locator("#pattern-body").fill("hello")
    for seq, pattern in enumerate(PATTERNS, start=1):
        await panel(alice, pattern).get_by_role("button", name="Send test message").click()
        await expect(panel(alice, pattern).locator(".pattern-send-status")).to_have_text(f"Sent as #{seq}.")

    bodies = [SENT[pattern] for pattern in PATTERNS]
    for pattern in PATTERNS:
        shown = panel(alice, pattern)
        await expect(shown).to_have_attribute("data-messages", "3")
        items = shown.locator("li.message")
        await expect(items.locator(".body")).to_have_text(bodies)
        seqs = await items.evaluate_all("items => items.map(item => item.dataset.seq)")
        assert seqs == ["1", "2", "3"], f"{pattern}: {seqs}"
        await expect(items.locator(".author")).to_have_text(["alice"] * 3)
        # Delays were measured: on one machine with the server's clock they are small and about right.
        await expect(shown).not_to_have_attribute("data-p95-ms", "")
        median = float(await shown.get_attribute("data-median-ms"))
        p95 = float(await shown.get_attribute("data-p95-ms"))
        assert -50 < median <= p95 < 3000, f"{pattern}: median {median} ms, p95 {p95} ms"

    # Idle: the short poll keeps asking; the long-poll waits (25 s) and the socket is silent.
    await long_poll_waiting(alice, polls)  # it re-asks right after each answer
    before = await counters(alice)
    await alice.wait_for_timeout(3200)  # the scenario: 3.2 s idle, over three short-poll intervals
    after = await counters(alice)
    assert after["short"] >= before["short"] + 2, (before, after)
    assert after["long"] == before["long"], (before, after)
    assert after["socket"] == before["socket"], (before, after)

    # Someone else's message, posted elsewhere, reaches every panel too.
    await database_sync_to_async(services.message_create)(room=room, author=other_user, body="<b>from bob</b>")
    for pattern in PATTERNS:
        await expect(panel(alice, pattern)).to_have_attribute("data-messages", "4")
        await expect(panel(alice, pattern).locator("li.message[data-seq='4'] .body")).to_have_text("<b>from bob</b>")
    await expect(alice.locator(".pattern-panel b")).to_have_count(0)
    assert browsers.errors.get(alice, []) == []
