"""The room page without WebSockets: it follows the room by long-poll, sends through the API, and switches back."""

from __future__ import annotations

import re

import pytest
from playwright.async_api import expect

from tests.e2e.helpers import RECONNECT_TIMEOUT_MS, expect_live, expect_messages, open_room, send
from tests.servers import TcpProxy

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio(loop_scope="session"), pytest.mark.slow]


class UpgradeStrippingProxy(TcpProxy):
    """A reverse proxy in front of one server that, while `stripping`, drops the Upgrade header.

    As some corporate proxies do: the server then sees a plain GET of the
    socket's URL and answers 404, so the browser's handshake fails.
    """

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self.stripping = True
        self.stripped = 0

    def forward(self, head: bytes) -> bytes:
        # Chromium opens a connection of its own for each WebSocket, so the
        # first request on a connection is the only one that can be an upgrade.
        if self.stripping and re.search(rb"(?im)^upgrade:\s*websocket", head):
            self.stripped += 1
            return re.sub(rb"(?im)^(upgrade|connection|sec-websocket-[a-z]+):[^\r\n]*\r\n", b"", head)
        return head


async def test_with_websockets_stripped_the_room_page_chats_by_long_poll_then_switches_back_losing_nothing(
    server, browsers, user, other_user, room
):
    proxy = UpgradeStrippingProxy(server.port)
    await proxy.start()
    try:
        alice = await browsers.new_page(user)
        await alice.goto(f"{proxy.origin}/rooms/{room.slug}/")
        state = alice.locator("#connection-state")
        await expect(state).to_have_attribute("data-state", "fallback", timeout=10_000)
        await expect(state).to_have_text("Live (long-poll)")
        assert proxy.stripped >= 2  # the page did try its socket first

        bob = await browsers.new_page(other_user)  # on the WebSocket, straight to the server
        await open_room(bob, server, room.slug)
        await send(bob, "bob over the socket")
        await expect_messages(alice, [(1, "bob over the socket")])  # by long-poll
        await send(alice, "alice over the API")  # acknowledged by the API's answer
        await expect_messages(bob, [(1, "bob over the socket"), (2, "alice over the API")])
        await expect(alice.locator("#send-button")).to_be_enabled()

        # While alice's socket keeps retrying, the proxy stops stripping; she switches back.
        await send(bob, "bob while alice switches")
        proxy.stripping = False
        await expect_live(alice, timeout=RECONNECT_TIMEOUT_MS)
        await send(bob, "bob after the switch")
        await send(alice, "alice over the socket again")
        expected = [
            (1, "bob over the socket"),
            (2, "alice over the API"),
            (3, "bob while alice switches"),
            (4, "bob after the switch"),
            (5, "alice over the socket again"),
        ]
        await expect_messages(alice, expected)  # each exactly once, in order
        await expect_messages(bob, expected)
    finally:
        await proxy.close()
