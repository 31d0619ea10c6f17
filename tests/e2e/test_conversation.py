"""Conversations in real browsers: Markdown, replies and jumping to the original, reactions, pins."""

from __future__ import annotations

import asyncio
import json
import re

import pytest
from channels.db import database_sync_to_async
from playwright.async_api import Page, WebSocketRoute, expect

from chat import services
from tests.e2e.helpers import TIMEOUT_MS, expect_live, losing_sends, open_room, send, shown_messages

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio(loop_scope="session"), pytest.mark.slow]


def message(page: Page, seq: int):
    return page.locator(f"#messages li.message[data-seq='{seq}']")


async def eventually(condition, timeout: float = TIMEOUT_MS) -> None:
    """Wait until condition() holds, for what happens outside the page (a frame a route saw); bounded."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout / 1000
    while not condition():
        assert loop.time() < deadline, "timed out waiting"
        await asyncio.sleep(0.02)


@database_sync_to_async
def post(room, author, body: str, count: int = 1) -> None:
    for number in range(1, count + 1):
        services.message_create(room=room, author=author, body=body.format(number=number))


MARKDOWN = "Try this:\n```\nprint('<b>hi</b>')\n```\nSee [the docs](https://example.com/docs) and **this** `inline`"


async def assert_markdown_shown(page: Page, who: str) -> None:
    item = message(page, 1)
    await expect(item.locator(".body pre code")).to_have_text("print('<b>hi</b>')")
    await expect(item.locator(".body strong")).to_have_text("this")
    await expect(item.locator(".body p code")).to_have_text("inline")
    link = item.locator(".body a")
    await expect(link).to_have_text("the docs")
    await expect(link).to_have_attribute("href", "https://example.com/docs")
    await expect(link).to_have_attribute("rel", re.compile(r"\bnofollow\b"))
    await expect(link).to_have_attribute("target", "_blank")
    assert await item.locator(".body b").count() == 0, f"{who}: the code's HTML became markup"
    # The code block scrolls sideways inside the message rather than widening it.
    pre = await item.locator(".body pre").evaluate("pre => getComputedStyle(pre).overflowX")
    assert pre == "auto", f"{who}: the code block's overflow is {pre}"


async def test_markdown_shows_as_formatted_html_for_the_sender_live_and_after_a_reload(
    server, browsers, user, other_user, room
):
    alice = await browsers.new_page(user)
    bob = await browsers.new_page(other_user)
    await open_room(alice, server, room.slug)
    await open_room(bob, server, room.slug)

    await send(alice, MARKDOWN)
    await assert_markdown_shown(alice, "alice (her own)")
    await assert_markdown_shown(bob, "bob (live)")
    await bob.reload()  # rendered by the server this time
    await expect_live(bob)
    await assert_markdown_shown(bob, "bob (after a reload)")

    # Editing starts from the Markdown source, not from the text it shows as.
    mine = message(alice, 1)
    await mine.hover()
    await mine.get_by_role("button", name="Edit this message").click()
    await expect(mine.locator(".edit-form textarea")).to_have_value(MARKDOWN)
    await mine.locator(".edit-form textarea").fill("Now *emphasised*")
    await mine.locator(".edit-form textarea").press("Enter")
    for page in (alice, bob):
        await expect(message(page, 1).locator(".body em")).to_have_text("emphasised")
        await expect(message(page, 1).locator(".body pre")).to_have_count(0)
        await expect(message(page, 1).locator(".edited")).to_have_text("(edited)")


def hold_around_answers(held: list, routes: list):
    """A WebSocket route that keeps the server's answers to "history around" back until released."""

    def route(page_side: WebSocketRoute) -> None:
        routes.append(page_side)
        server_side = page_side.connect_to_server()

        def from_server(frame_text: str | bytes) -> None:
            frame = json.loads(frame_text)
            if frame.get("type") == "history" and "around" in frame and held is not None and not held[0]:
                held.append(frame_text)
                return
            page_side.send(frame_text)

        server_side.on_message(from_server)

    return route


async def test_a_reply_quotes_its_original_and_the_quote_goes_to_it_loading_it_when_it_is_not_shown(
    server, browsers, user, other_user, room
):
    await post(room, other_user, "Who is deploying today?")
    alice = await browsers.new_page(user)
    await open_room(alice, server, room.slug)

    # alice starts a reply; Escape drops it, the × too; she starts it again.
    original = message(alice, 1)
    reply_bar = alice.locator("#reply-bar")
    await original.hover()
    await original.get_by_role("button", name="Reply to bob").click()
    await expect(reply_bar).to_be_visible()
    await expect(reply_bar).to_contain_text("Replying to bob: Who is deploying today?")
    await expect(alice.locator("#message-input")).to_be_focused()
    await alice.locator("#message-input").press("Escape")
    await expect(reply_bar).to_be_hidden()
    await original.hover()
    await original.get_by_role("button", name="Reply to bob").click()
    await alice.get_by_role("button", name="Cancel the reply").click()
    await expect(reply_bar).to_be_hidden()
    await original.hover()
    await original.get_by_role("button", name="Reply to bob").click()

    # The room moves on while she types: 120 messages push the original off the first page.
    await post(room, other_user, "filler {number}", count=120)
    await expect(message(alice, 121)).to_have_count(1)
    await expect(reply_bar).to_contain_text("Replying to bob")
    await send(alice, "I am, at noon")
    await expect(reply_bar).to_be_hidden()
    quote = message(alice, 122).locator(".reply-quote")
    await expect(quote).to_contain_text("bob")
    await expect(quote.locator(".reply-excerpt")).to_have_text("Who is deploying today?")

    # bob opens the room afresh: the reply is on the first page, its original is not.
    held: list = [False]  # [released, frames held back...]
    routes: list[WebSocketRoute] = []
    bob = await browsers.new_page(other_user)
    await bob.route_web_socket(re.compile(r"/ws/rooms/"), hold_around_answers(held, routes))
    await open_room(bob, server, room.slug)
    await expect(message(bob, 122).locator(".reply-quote")).to_contain_text("Who is deploying today?")
    await expect(message(bob, 1)).to_have_count(0)
    await expect(bob.locator("#load-older")).to_be_visible()

    # The quote is a button: from the keyboard it asks for the messages around the original and says so.
    await message(bob, 122).locator(".reply-quote").focus()
    await bob.keyboard.press("Enter")
    status = bob.locator("#jump-status")
    await expect(status).to_be_visible()
    await expect(status).to_have_text("Loading the message…")
    await eventually(lambda: len(held) > 1)
    held[0] = True
    for frame_text in held[1:]:
        routes[-1].send(frame_text)

    # The original is shown, in view, highlighted and focused; the loading line goes.
    target = message(bob, 1)
    await expect(target).to_be_in_viewport()
    await expect(target).to_have_class(re.compile(r"\bhighlight\b"))
    await expect(target).to_be_focused()
    await expect(target.locator(".body")).to_have_text("Who is deploying today?")
    await expect(status).to_be_hidden()
    await expect(bob.locator("#load-older")).to_be_hidden()  # nothing is older than seq 1

    # Between what came around the original and the first page is a hole, with a button that fills it.
    hole = bob.locator("#messages li.history-hole")
    await expect(hole).to_have_count(1)
    shown = [seq for seq, _ in await shown_messages(bob)]
    assert shown == sorted(shown) and shown[0] == 1 and shown[-1] == 122, shown
    await hole.get_by_role("button", name=re.compile(r"^Load \d+ more messages?$")).click()
    await expect(hole).to_have_count(0)
    await expect(bob.locator("#messages li.message[data-seq]")).to_have_count(122)
    assert [seq for seq, _ in await shown_messages(bob)] == list(range(1, 123))

    # The page still follows the room: a new message goes at the end, once.
    await send(alice, "anything else?")
    await expect(message(bob, 123).locator(".body")).to_have_text("anything else?")
    assert [seq for seq, _ in await shown_messages(bob)] == list(range(1, 124))

    # A quote whose original is shown goes straight there.
    await bob.locator("#messages-pane").evaluate("pane => { pane.scrollTop = pane.scrollHeight; }")
    await message(bob, 122).locator(".reply-quote").click()
    await expect(target).to_be_in_viewport()
    await expect(target).to_have_class(re.compile(r"\bhighlight\b"))

    # The original is deleted: the quote says so, live and after a reload.
    await original.hover()
    await original.get_by_role("button", name="Delete this message by bob").click()  # alice owns the room
    await expect(message(bob, 122).locator(".reply-excerpt")).to_have_text("Message deleted")
    await alice.reload()
    await expect_live(alice)
    await expect(message(alice, 122).locator(".reply-excerpt")).to_have_text("Message deleted")


def chip(page: Page, seq: int, emoji: str):
    return message(page, seq).locator(f".reaction[data-emoji='{emoji}']")


async def test_reactions_show_live_for_both_people_and_toggle(server, browsers, user, other_user, room):
    await post(room, user, "Shipped the release")
    alice = await browsers.new_page(user)
    bob = await browsers.new_page(other_user)
    await open_room(alice, server, room.slug)
    await open_room(bob, server, room.slug)

    # alice reacts through the React button's picker.
    item = message(alice, 1)
    await item.hover()
    react = item.get_by_role("button", name="React to alice's message")
    await react.click()
    await expect(react).to_have_attribute("aria-expanded", "true")
    await item.locator(".emoji-picker").get_by_role("button", name="React with 👍").click()
    await expect(item.locator(".emoji-picker")).to_have_count(0)

    await expect(chip(bob, 1, "👍")).to_have_text("👍 1")
    await expect(chip(bob, 1, "👍")).to_have_attribute("aria-pressed", "false")
    await expect(chip(alice, 1, "👍")).to_have_text("👍 1")
    await expect(chip(alice, 1, "👍")).to_have_attribute("aria-pressed", "true")

    # bob clicks the chip: both see two, pressed for each of them.
    await chip(bob, 1, "👍").click()
    for page in (alice, bob):
        await expect(chip(page, 1, "👍")).to_have_text("👍 2")
        await expect(chip(page, 1, "👍")).to_have_attribute("aria-pressed", "true")
        await expect(chip(page, 1, "👍")).to_have_attribute("title", "alice, bob reacted with 👍")

    # From the keyboard, bob adds 🎉 with the picker (arrow keys move along it).
    bob_item = message(bob, 1)
    await bob_item.hover()
    await bob_item.get_by_role("button", name="React to alice's message").focus()
    await bob.keyboard.press("Enter")
    await expect(bob_item.get_by_role("button", name="Remove your 👍 reaction")).to_be_focused()
    await bob.keyboard.press("ArrowRight")
    await bob.keyboard.press("ArrowRight")
    await bob.keyboard.press("ArrowRight")
    await expect(bob_item.get_by_role("button", name="React with 🎉")).to_be_focused()
    await bob.keyboard.press("Enter")
    await expect(chip(alice, 1, "🎉")).to_have_text("🎉 1")
    await expect(message(alice, 1).locator(".reaction")).to_have_text(["👍 2", "🎉 1"])  # in order of first use

    # bob takes his 👍 back; a reload shows the same chips, rendered by the server.
    await chip(bob, 1, "👍").click()
    await expect(chip(alice, 1, "👍")).to_have_text("👍 1")
    await expect(chip(bob, 1, "👍")).to_have_attribute("aria-pressed", "false")
    for page, pressed in ((alice, "true"), (bob, "false")):
        await page.reload()
        await expect_live(page)
        await expect(message(page, 1).locator(".reaction")).to_have_text(["👍 1", "🎉 1"])
        await expect(chip(page, 1, "👍")).to_have_attribute("aria-pressed", pressed)
    # A chip rendered by the server toggles like the others.
    await chip(bob, 1, "👍").click()
    await expect(chip(alice, 1, "👍")).to_have_text("👍 2")


async def test_a_pin_by_the_owner_shows_live_in_everyones_pinned_list_and_an_unpin_removes_it(
    server, browsers, user, other_user, room
):
    await post(room, other_user, "Deploy freeze from Friday noon")
    await post(room, other_user, "ok")
    alice = await browsers.new_page(user)  # the room's owner
    bob = await browsers.new_page(other_user)
    await open_room(alice, server, room.slug)
    await open_room(bob, server, room.slug)
    pinned = bob.locator("#pinned")
    await expect(pinned).to_be_hidden()
    # Only the owner, moderators and staff can pin.
    await message(bob, 1).hover()
    await expect(message(bob, 1).get_by_role("button", name=re.compile(r"^(Pin|Unpin) "))).to_have_count(0)

    item = message(alice, 1)
    await item.hover()
    await item.get_by_role("button", name="Pin bob's message").click()
    await expect(pinned).to_be_visible()
    await expect(pinned.locator("summary")).to_have_text("Pinned (1)")
    await expect(pinned.locator("#pinned-list li")).to_have_text(["bob Deploy freeze from Friday noon"])
    await expect(message(bob, 1).locator(".pin-marker")).to_have_text("📌 Pinned")
    await expect(item.get_by_role("button", name="Unpin bob's message")).to_have_count(1)
    assert await message(bob, 2).locator(".pin-marker").count() == 0

    # The list survives a reload (rendered by the server), and an entry goes to its message.
    await bob.reload()
    await expect_live(bob)
    await expect(pinned.locator("summary")).to_have_text("Pinned (1)")
    await expect(message(bob, 1).locator(".pin-marker")).to_have_text("📌 Pinned")
    await pinned.locator("summary").click()
    await pinned.get_by_role("button", name=re.compile("Deploy freeze")).click()
    await expect(message(bob, 1)).to_have_class(re.compile(r"\bhighlight\b"))

    # An edit shows in the list, for everyone.
    await message(bob, 1).hover()
    await message(bob, 1).get_by_role("button", name="Edit this message").click()
    await message(bob, 1).locator(".edit-form textarea").fill("Deploy freeze from Friday 10:00")
    await message(bob, 1).locator(".edit-form textarea").press("Enter")
    await expect(alice.locator("#pinned-list li")).to_have_text(["bob Deploy freeze from Friday 10:00"])
    await expect(message(alice, 1).locator(".pin-marker")).to_have_text("📌 Pinned")

    # A second pin goes first; an unpin takes one away.
    await post(room, user, "and a second pin")
    second = message(alice, 3)
    await second.hover()
    await second.get_by_role("button", name="Pin alice's message").click()
    await expect(pinned.locator("#pinned-list li")).to_have_text(
        ["alice and a second pin", "bob Deploy freeze from Friday 10:00"]  # the newest pin first
    )
    await item.hover()
    await item.get_by_role("button", name="Unpin bob's message").click()
    await expect(pinned.locator("summary")).to_have_text("Pinned (1)")
    await expect(pinned.locator("#pinned-list li")).to_have_text(["alice and a second pin"])
    await expect(message(bob, 1).locator(".pin-marker")).to_have_count(0)
    await second.hover()
    await second.get_by_role("button", name="Unpin alice's message").click()
    await expect(pinned).to_be_hidden()
    await expect(alice.locator("#pinned")).to_be_hidden()


async def test_a_reply_waiting_offline_keeps_its_reply_to_when_it_is_sent(server, browsers, user, other_user, room):
    await post(room, other_user, "Can someone review #42?")
    alice = await browsers.new_page(user)
    sends: list[dict] = []
    ready = asyncio.Event()
    closing: list[asyncio.Future] = []
    await alice.route_web_socket(re.compile(r"/ws/rooms/"), losing_sends(sends, ready, closing))
    await open_room(alice, server, room.slug)
    original = message(alice, 1)
    await original.hover()
    await original.get_by_role("button", name="Reply to bob").click()
    box = alice.locator("#message-input")
    await box.fill("On it")
    await box.press("Enter")
    await eventually(lambda: len(sends) > 0)
    ready.set()
    await expect_live(alice, timeout=20_000)
    await expect(message(alice, 2).locator(".reply-excerpt")).to_have_text("Can someone review #42?")
    assert {frame["nonce"] for frame in sends} == {sends[0]["nonce"]}, sends
    original_id = int(await original.get_attribute("data-id"))
    assert len(sends) >= 2 and all(frame["reply_to"] == original_id for frame in sends), sends
