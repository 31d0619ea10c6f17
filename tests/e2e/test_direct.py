"""Direct conversations and read receipts in real browsers: a DM started from a name, "Seen by N"."""

from __future__ import annotations

import asyncio
import re

import pytest
from channels.db import database_sync_to_async
from playwright.async_api import Page, expect

from chat import services
from tests.e2e.helpers import KEEP_SOCKETS, RECONNECT_TIMEOUT_MS, expect_live, open_room, send

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio(loop_scope="session"), pytest.mark.slow]


def message(page: Page, seq: int):
    return page.locator(f"#messages li.message[data-seq='{seq}']")


def direct_entry(page: Page, name: str):
    """The link to the conversation with `name` in the "Direct messages" part of the room list or the sidebar."""
    return page.locator(".direct-rooms .room-card, nav.sidebar ul[aria-labelledby='sidebar-direct'] li").filter(
        has_text=re.compile(rf"^\s*{re.escape(name)}\b")
    )


async def test_a_dm_started_from_a_name_shows_in_the_other_persons_lists_unread_and_stays_private(
    server, browsers, user, other_user, third_user, room
):
    alice = await browsers.new_page(user)
    bob = await browsers.new_page(other_user)
    await open_room(alice, server, room.slug)
    await open_room(bob, server, room.slug)
    await send(bob, "Anyone around for a quick question?")

    # bob's name on his message opens a direct conversation; alice's own name is no link.
    author = message(alice, 1).locator(".author")
    await expect(author).to_have_attribute("href", "/dm/bob/")
    await expect(author).to_have_accessible_name("Message bob directly")
    await send(alice, "me")
    await expect(message(alice, 2).locator("a.author")).to_have_count(0)
    await expect(message(bob, 2).locator("a.author")).to_have_attribute("href", "/dm/alice/")  # rendered live
    await author.click()
    await expect(alice).to_have_url(re.compile(rf"{re.escape(server.origin)}/rooms/dm-\d+-\d+/$"))
    dm_url = alice.url
    await expect_live(alice)
    await expect(alice.locator("#room-title")).to_have_text("Direct message bob")
    await expect(alice).to_have_title("bob · Chat")
    await expect(alice.locator("#message-input")).to_have_attribute("placeholder", "Message bob")
    await expect(alice.locator("#members")).to_have_count(0)  # two people, nobody to add or remove
    # The sidebar lists it under "Direct messages", by the other person's name, apart from the rooms.
    await expect(direct_entry(alice, "bob").locator("a")).to_have_attribute("aria-current", "page")
    await expect(alice.locator("nav.sidebar .sidebar-rooms").first.locator(".sidebar-name")).to_have_text(["General"])
    await send(alice, "psst")
    await expect(message(alice, 1).locator("span.author")).to_have_text("alice")

    # bob's room page, reloaded, and the room list: "alice" under "Direct messages", one unread.
    await bob.reload()
    await expect_live(bob)
    await expect(bob.locator("#sidebar-direct")).to_have_text("Direct messages")
    await expect(direct_entry(bob, "alice").locator(".unread-badge")).to_have_text("1 unread")
    await bob.goto(f"{server.origin}/")
    await expect(bob.get_by_role("heading", name="Direct messages")).to_be_visible()
    entry = direct_entry(bob, "alice")
    await expect(entry.locator(".unread-badge")).to_have_text("1 unread")
    await expect(bob.locator(".room-card:not(.direct) .room-name")).to_have_text(["General"])
    await entry.get_by_role("link", name="alice").click()
    await expect(bob).to_have_url(dm_url)
    await expect_live(bob)
    await expect(bob.locator("#room-title")).to_have_text("Direct message alice")
    await expect(message(bob, 1).locator(".body")).to_have_text("psst")
    await expect(message(bob, 1).locator("a.author")).to_have_count(0)  # no link back to this very room
    await send(alice, "are you free at 3?")
    await expect(message(bob, 2).locator(".body")).to_have_text("are you free at 3?")

    # Nobody else can see it exists: carol gets what a missing room gets.
    carol = await browsers.new_page(third_user)
    response = await carol.goto(dm_url)
    assert response.status == 404
    await carol.goto(f"{server.origin}/")
    await expect(carol.get_by_role("heading", name="Direct messages")).to_have_count(0)


async def test_message_someone_opens_a_conversation_by_name_and_an_unknown_name_says_so(
    server, browsers, user, third_user, room
):
    alice = await browsers.new_page(user)
    await alice.goto(f"{server.origin}/")
    await expect(alice.get_by_role("heading", name="Direct messages")).to_have_count(0)  # none yet
    form = alice.locator("#direct-form")
    await form.get_by_label("Username").fill("nobody-here")
    await form.get_by_role("button", name="Open").click()
    await expect(alice.locator(".flash .flash-error")).to_contain_text('There is no user called "nobody-here"')
    await form.get_by_label("Username").fill(" carol ")
    await form.get_by_label("Username").press("Enter")
    await expect(alice).to_have_url(re.compile(r"/rooms/dm-\d+-\d+/$"))
    await expect(alice.locator("#room-title")).to_have_text("Direct message carol")


@database_sync_to_async
def regulars(room, *people) -> None:
    """People who read the room before: opening it marks it read (a first visit to a public room does not)."""
    for person in people:
        services.room_join(room=room, user=person)


async def test_seen_by_counts_the_others_who_read_the_latest_own_message_with_their_names(
    server, browsers, user, other_user, third_user, room
):
    await regulars(room, other_user, third_user)
    alice = await browsers.new_page(user)
    await open_room(alice, server, room.slug)
    await send(alice, "Shipping at noon")
    seen = message(alice, 1).locator(".seen-by")
    await expect(seen).to_have_count(0)  # nobody else has read it yet (her own read does not count)

    bob = await browsers.new_page(other_user)
    await open_room(bob, server, room.slug)
    await expect(seen).to_have_text(re.compile(r"^Seen by 1"))
    count = seen.get_by_role("button", name="Seen by 1")
    names = seen.locator("[role=tooltip]")
    await expect(count).to_have_accessible_description("bob")
    await expect(names).to_be_hidden()
    await count.hover()
    await expect(names).to_be_visible()
    await expect(names).to_have_text("bob")
    await alice.locator("#message-input").hover()
    await expect(names).to_be_hidden()
    # From the keyboard: focus shows the names, Escape hides them again.
    await count.focus()
    await expect(names).to_be_visible()
    await alice.keyboard.press("Escape")
    await expect(names).to_be_hidden()
    await alice.locator("#message-input").focus()

    carol = await browsers.new_page(third_user)
    await open_room(carol, server, room.slug)
    await expect(seen.locator(".seen-by-count")).to_have_text("Seen by 2")
    await expect(seen.locator(".seen-by-count")).to_have_accessible_description("bob, carol")
    # Nobody sees it under someone else's message; bob's own page counts alice's read, not his own.
    await expect(bob.locator(".seen-by")).to_have_count(0)

    # A new message by alice takes the line; bob and carol, reading along, reach it.
    await send(alice, "Actually at one")
    await expect(seen).to_have_count(0)
    await expect(message(alice, 2).locator(".seen-by-count")).to_have_text("Seen by 2")
    # bob answers: the line stays under alice's latest own message, which bob's page shows for his answer.
    await send(bob, "ok")
    await expect(message(alice, 2).locator(".seen-by-count")).to_have_text("Seen by 2")
    await expect(message(bob, 3).locator(".seen-by-count")).to_have_text("Seen by 2")  # alice and carol

    # After a reload the count comes from the marks the page is rendered with.
    await alice.reload()
    await expect_live(alice)
    await expect(message(alice, 2).locator(".seen-by-count")).to_have_text("Seen by 2")
    await expect(alice.locator(".seen-by")).to_have_count(1)

    # The server sends the furthest readers only (readMarksMax of them). When it sent that many and
    # every one of them read the message, others left out may have too: the count says "at least".
    # Here the cut is made 3, as if alice, bob and carol were the furthest of more readers.
    async def cut_at_three(route) -> None:
        response = await route.fetch()
        page_html = await response.text()
        assert '"readMarksMax": 200' in page_html
        await route.fulfill(response=response, body=page_html.replace('"readMarksMax": 200', '"readMarksMax": 3'))

    # (Chromium takes a page fulfilled by a route for a public one and refuses it sockets to 127.0.0.1;
    # the count comes from the page's config, whatever its connection.)
    await alice.route(re.compile(r"/rooms/general/$"), cut_at_three)
    await alice.reload()
    count = message(alice, 2).locator(".seen-by-count")
    await expect(count).to_have_text("Seen by 2+")
    await expect(count).to_have_accessible_description("bob, carol and perhaps more")


@database_sync_to_async
def read_mark_of(room, person) -> int:
    return room.memberships.get(user=person).last_read_seq


async def test_a_page_that_was_away_catches_up_on_who_read_its_message(server, browsers, user, other_user, room):
    await regulars(room, other_user)
    alice = await browsers.new_page(user)
    await alice.add_init_script(KEEP_SOCKETS)
    await open_room(alice, server, room.slug)
    await send(alice, "Anyone there?")
    seen = message(alice, 1).locator(".seen-by")
    # alice's network drops (and her socket with it) while bob reads the room: his read_by cannot reach her.
    await alice.context.set_offline(True)
    await alice.evaluate("window.__sockets.filter(s => s.readyState === WebSocket.OPEN).forEach(s => s.close())")
    await expect(alice.locator("#connection-state")).to_have_attribute("data-state", "reconnecting")
    bob = await browsers.new_page(other_user)
    await open_room(bob, server, room.slug)
    async with asyncio.timeout(10):  # bob's page marks the room read: wait until the database has it
        while await read_mark_of(room, other_user) < 1:
            await asyncio.sleep(0.05)
    await expect(seen).to_have_count(0)
    # Back online: the page resumes, and asks where everyone's read mark is now.
    await alice.context.set_offline(False)
    await expect_live(alice, timeout=RECONNECT_TIMEOUT_MS)
    await expect(seen.locator(".seen-by-count")).to_have_text("Seen by 1")
