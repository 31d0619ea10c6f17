"""Chatting in real browsers: live delivery, history, reconnecting, presence, typing, edits, retried sends."""

from __future__ import annotations

import json
import re

import pytest
from channels.db import database_sync_to_async
from django.db import transaction
from django.db.models import F
from playwright.async_api import WebSocketRoute, expect

from chat import protocol, services
from chat.models import Message, Room
from tests.e2e.helpers import (
    KEEP_SOCKETS,
    RECONNECT_TIMEOUT_MS,
    expect_live,
    expect_messages,
    open_room,
    send,
    shown_messages,
    sign_in_by_form,
)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio(loop_scope="session"), pytest.mark.slow]


async def test_sign_up_create_a_room_and_chat_live_with_the_room_only(server, browsers, other_user, third_user, room):
    # dave signs up and creates a room, all through the forms.
    dave = await browsers.new_page()
    await dave.goto(f"{server.origin}/accounts/signup/")
    await dave.fill("#id_username", "dave")
    await dave.fill("#id_password1", "a-long-pass-42")
    await dave.fill("#id_password2", "a-long-pass-42")
    await dave.get_by_role("button", name="Sign up").click()
    await expect(dave).to_have_url(f"{server.origin}/")
    await expect(dave.locator(".whoami")).to_contain_text("dave")

    await dave.fill("#id_name", "Book Club")
    await dave.fill("#id_slug", "book-club")
    await dave.fill("#id_topic", "One book a month")
    await dave.get_by_role("button", name="Create room").click()
    await expect(dave).to_have_url(f"{server.origin}/rooms/book-club/")
    await expect(dave.locator("h1")).to_have_text("Book Club")
    await expect_live(dave)

    # bob (signed in through the login form) joins dave's room; carol sits in another room.
    bob = await browsers.new_page()
    await sign_in_by_form(bob, server, "bob", "pw-bob-123")
    await open_room(bob, server, "book-club")
    carol = await browsers.new_page(third_user)
    await open_room(carol, server, room.slug)

    await send(dave, "Welcome to the book club!")
    await expect_messages(dave, [(1, "Welcome to the book club!")])

    # bob sees it live, by dave ...
    await expect_messages(bob, [(1, "Welcome to the book club!")])
    await expect(bob.locator("#messages li.message .author")).to_have_text(["dave"])
    # ... and carol, live in her own room all along, never does: a message to her room, published
    # after dave's had reached bob, reaches her, and dave's did not come before it.
    await expect_live(carol)
    await database_sync_to_async(services.message_create)(room=room, author=other_user, body="meanwhile in general")
    await expect_messages(carol, [(1, "meanwhile in general")])
    await expect(carol.locator("#messages")).not_to_contain_text("book club")


async def test_reloading_shows_the_history_once_and_in_order(server, browsers, user, other_user, room):
    alice = await browsers.new_page(user)
    bob = await browsers.new_page(other_user)
    await open_room(alice, server, room.slug)
    await open_room(bob, server, room.slug)

    for page, body in [(alice, "a1"), (bob, "b1"), (alice, "a2"), (bob, "b2"), (alice, "a3")]:
        await send(page, body)
    # A burst without waiting for each acknowledgement.
    box = alice.locator("#message-input")
    for body in ("burst 1", "burst 2", "burst 3"):
        await box.fill(body)
        await box.press("Enter")
    expected = list(enumerate(["a1", "b1", "a2", "b2", "a3", "burst 1", "burst 2", "burst 3"], start=1))
    await expect_messages(alice, expected)
    await expect_messages(bob, expected)

    for page, other in ((alice, bob), (bob, alice)):
        await page.reload()
        await expect_live(page)
        await expect_messages(page, expected)
        # A replay after "live" would show up as duplicates: it would come before a message sent after it.
        marker = f"after the reload of page {len(expected)}"
        await send(other, marker)
        expected.append((len(expected) + 1, marker))
        await expect_messages(page, expected)
        await expect(page.locator("#messages li.message.pending")).to_have_count(0)


async def test_reconnecting_after_a_restart_and_a_dropped_socket_shows_missed_messages_once(
    cluster, browsers, user, other_user, room
):
    alice_server, bob_server = await cluster.start(2)
    alice = await browsers.new_page(user, server=alice_server)
    await alice.add_init_script(KEEP_SOCKETS)
    bob = await browsers.new_page(other_user, server=bob_server)
    await open_room(alice, alice_server, room.slug)
    await open_room(bob, bob_server, room.slug)
    await send(alice, "before")
    expected = [(1, "before")]
    await expect_messages(bob, expected)
    state = alice.locator("#connection-state")

    # 1. alice's server process dies and comes back while bob, on another process, talks.
    alice_server.kill()
    await expect(state).to_have_attribute("data-state", "reconnecting")
    for body in ("while down 1", "while down 2", "while down 3"):
        await send(bob, body)
    expected += [(2, "while down 1"), (3, "while down 2"), (4, "while down 3")]
    await expect(state).to_have_attribute("data-state", "reconnecting")  # still: nothing reached alice yet
    assert await shown_messages(alice) == [(1, "before")]
    await cluster.restart(alice_server)  # same port
    await expect_live(alice, timeout=RECONNECT_TIMEOUT_MS)
    await expect_messages(alice, expected)

    # 2. alice's network drops while bob talks again. Going offline does not end
    # an open WebSocket in Chromium (it only stops new connections), so close it too.
    await alice.context.set_offline(True)
    await alice.evaluate("window.__sockets.filter(s => s.readyState === WebSocket.OPEN).forEach(s => s.close())")
    await expect(state).to_have_attribute("data-state", "reconnecting")
    for body in ("while offline 1", "while offline 2", "while offline 3"):
        await send(bob, body)
    expected += [(5, "while offline 1"), (6, "while offline 2"), (7, "while offline 3")]
    # The page retries meanwhile, and fails: a socket opened after going offline has closed.
    await alice.wait_for_function(
        "opened => window.__sockets.length > opened && window.__sockets.at(-1).readyState === WebSocket.CLOSED",
        arg=await alice.evaluate("window.__sockets.length"),
        timeout=RECONNECT_TIMEOUT_MS,
    )
    await expect(state).to_have_attribute("data-state", "reconnecting")
    assert await shown_messages(alice) == expected[:4]
    await alice.context.set_offline(False)
    await expect_live(alice, timeout=RECONNECT_TIMEOUT_MS)
    await expect_messages(alice, expected)

    # Nothing arrives twice late: a late copy would come before a message bob sends now.
    await send(bob, "after alice is back")
    expected.append((8, "after alice is back"))
    await expect_messages(alice, expected)
    await expect_messages(bob, expected)


@database_sync_to_async
def seed_messages(room, author, count: int) -> None:
    for number in range(1, count + 1):
        services.message_create(room=room, author=author, body=f"seeded {number}")


async def test_scrolling_to_the_top_loads_older_history(server, browsers, user, room):
    await seed_messages(room, user, 80)
    alice = await browsers.new_page(user)
    await open_room(alice, server, room.slug)
    await expect_messages(alice, [(seq, f"seeded {seq}") for seq in range(31, 81)])  # the newest 50

    await alice.locator("#messages-pane").evaluate("pane => { pane.scrollTop = 0; }")
    older = alice.locator("#load-older")
    items = alice.locator("#messages li.message[data-seq]")
    try:  # reaching the top loads the older page by itself ...
        await expect(items).to_have_count(80, timeout=2000)
    except AssertionError:  # ... or the "Load older messages" button does
        await older.click()
    await expect_messages(alice, [(seq, f"seeded {seq}") for seq in range(1, 81)])
    await expect(older).to_be_hidden()  # nothing older is left


async def test_presence_typing_edits_and_deletions_show_on_the_other_page(server, browsers, user, other_user, room):
    alice = await browsers.new_page(user)
    await open_room(alice, server, room.slug)
    online = alice.locator("#online")
    typing = alice.locator("#typing")
    await expect(online).to_contain_text("alice")
    await expect(online).not_to_contain_text("bob")

    # bob arrives: alice sees him online.
    bob = await browsers.new_page(other_user)
    await open_room(bob, server, room.slug)
    await expect(online).to_contain_text("bob")

    # bob types: alice sees it, and it goes away by itself after a few seconds.
    await bob.locator("#message-input").press_sequentially("hel")
    await expect(typing).to_have_text("bob is typing…")
    await expect(typing).to_have_text("", timeout=7000)
    # bob types again and sends: the notice goes as his message arrives.
    await bob.locator("#message-input").press_sequentially("lo alice")
    await expect(typing).to_have_text("bob is typing…")
    await bob.locator("#message-input").press("Enter")
    await expect_messages(alice, [(1, "hello alice")])
    await expect(typing).to_have_text("", timeout=1000)  # well before the notice would expire

    # alice edits her message: bob sees the new text and the "(edited)" marker.
    await send(alice, "helo bob")
    await expect_messages(bob, [(1, "hello alice"), (2, "helo bob")])
    mine = alice.locator("#messages li.message[data-seq='2']")
    await mine.hover()
    await mine.get_by_role("button", name="Edit this message").click()
    await mine.locator(".edit-form textarea").fill("hello bob")
    await mine.locator(".edit-form button[type=submit]").click()
    on_bob = bob.locator("#messages li.message[data-seq='2']")
    await expect(on_bob.locator(".body")).to_have_text("hello bob")
    await expect(on_bob.locator(".edited")).to_have_text("(edited)")

    # alice deletes it (confirming): bob sees it deleted.
    await mine.hover()
    await mine.get_by_role("button", name="Delete this message").click()
    await expect(on_bob).to_have_class(re.compile(r"\bdeleted\b"))
    await expect(on_bob.locator(".body")).to_have_text("Message deleted")
    await expect(on_bob.locator(".edited")).to_have_count(0)

    # bob leaves: alice's online list drops him.
    await bob.close()
    await expect(online).not_to_contain_text("bob")
    await expect(online).to_contain_text("alice")


@database_sync_to_async
def store_without_publishing(room, author, body: str) -> None:
    """What a server process leaves behind when it dies between a message's commit and its publish."""
    with transaction.atomic():
        Room.objects.filter(pk=room.pk).update(last_seq=F("last_seq") + 1)
        seq = Room.objects.values_list("last_seq", flat=True).get(pk=room.pk)
        Message.objects.create(room=room, author=author, body=body, seq=seq)


async def test_a_message_stored_but_never_published_appears_once_the_next_one_reveals_the_hole(
    server, browsers, user, other_user, room
):
    alice = await browsers.new_page(user)
    bob = await browsers.new_page(other_user)
    await open_room(alice, server, room.slug)
    await open_room(bob, server, room.slug)

    await store_without_publishing(room, user, "its process died before publishing it")
    # Nobody was told: bob's typing notice, sent after the store, reaches alice with nothing before it.
    await bob.locator("#message-input").press_sequentially("x")
    await expect(alice.locator("#typing")).to_contain_text(other_user.username)
    await expect(alice.locator("#messages li.message")).to_have_count(0)
    await bob.locator("#message-input").fill("")
    await send(bob, "the next message")
    expected = [(1, "its process died before publishing it"), (2, "the next message")]
    await expect_messages(alice, expected)  # the page asked for the hole
    await expect_messages(bob, expected)


async def test_while_redis_is_away_the_page_says_delayed_and_the_chat_goes_on(
    cluster_on_own_redis, own_redis, browsers, user, other_user, room
):
    alice_server, bob_server = await cluster_on_own_redis.start(2)
    alice = await browsers.new_page(user, server=alice_server)
    bob = await browsers.new_page(other_user, server=bob_server)
    await open_room(alice, alice_server, room.slug)
    await open_room(bob, bob_server, room.slug)
    await expect(bob.locator("#online")).to_contain_text("2 online")
    await send(alice, "before")
    expected = [(1, "before")]

    own_redis.kill()
    for page in (alice, bob):  # the socket stays open; the page says what changed
        await expect(page.locator("#connection-state")).to_have_attribute("data-state", "delayed")
        await expect(page.locator("#connection-state")).to_have_text("Live (delayed)")
        await expect(page.locator("#online")).to_have_text("Who is online is unknown for now")
    await send(alice, "while Redis is away")
    await send(bob, "still here")
    expected += [(2, "while Redis is away"), (3, "still here")]
    await expect_messages(alice, expected)
    await expect_messages(bob, expected)

    own_redis.start()
    for page in (alice, bob):
        await expect_live(page, timeout=RECONNECT_TIMEOUT_MS)
        await expect(page.locator("#online")).to_contain_text("2 online")
    await send(bob, "Redis is back")
    expected.append((4, "Redis is back"))
    await expect_messages(alice, expected)
    await expect_messages(bob, expected)


async def test_a_send_the_server_could_not_save_says_retrying_and_goes_again_with_its_nonce(
    server, browsers, user, room
):
    alice = await browsers.new_page(user)
    sends: list[dict] = []  # every send frame the page wrote

    def route(page_side: WebSocketRoute) -> None:
        server_side = page_side.connect_to_server()

        def from_page(message: str | bytes) -> None:
            frame = json.loads(message)
            if frame["type"] == "send":
                sends.append(frame)
                if len(sends) <= 2:  # the database is away: the server's answer, the server untouched
                    page_side.send(protocol.not_saved_frame(frame["nonce"]))
                    return
            server_side.send(message)

        page_side.on_message(from_page)

    await alice.route_web_socket(re.compile(r"/ws/rooms/"), route)
    await open_room(alice, server, room.slug)
    box = alice.locator("#message-input")
    await box.fill("saved at the third try")
    await box.press("Enter")
    pending = alice.locator("#messages li.message.pending")
    await expect(pending.locator(".status")).to_have_text("Not saved yet — retrying…")
    await expect(pending).to_have_count(0)  # the backoff: 0.5 s, then 1 s (±25%)
    await expect_messages(alice, [(1, "saved at the third try")])
    await expect(alice.locator("#messages li.message.failed")).to_have_count(0)
    assert len(sends) == 3 and len({frame["nonce"] for frame in sends}) == 1, sends
    stored = await database_sync_to_async(lambda: list(Message.objects.values_list("body", "nonce")))()
    assert stored == [("saved at the third try", sends[0]["nonce"])]
