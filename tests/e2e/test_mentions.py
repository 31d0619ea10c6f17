"""Mentions and notifications in real browsers: @-autocomplete, the highlight, sidebar counts, browser notifications."""

from __future__ import annotations

import json
import re

import pytest
from channels.db import database_sync_to_async
from playwright.async_api import Page, expect

from chat import services
from tests.e2e.helpers import RECONNECT_TIMEOUT_MS, expect_live, open_room
from tests.e2e.test_pages import serious_violations

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio(loop_scope="session"), pytest.mark.slow]

MENTIONS_ME = re.compile(r"\bmentions-me\b")


def message(page: Page, seq: int):
    return page.locator(f"#messages li.message[data-seq='{seq}']")


def sidebar_link(page: Page, slug: str):
    return page.locator(f"nav.sidebar a[data-room='{slug}']")


def suggestions(page: Page):
    return page.get_by_role("listbox", name="People to mention")


@database_sync_to_async
def join(room, *people) -> None:
    for person in people:
        services.room_join(room=room, user=person)


@database_sync_to_async
def post(room, author, body: str, count: int = 1) -> None:
    for number in range(1, count + 1):
        services.message_create(room=room, author=author, body=body.format(number=number))


async def type_text(page: Page, text: str) -> None:
    """Type into the composer key by key, as a person does (each key an input event)."""
    await page.locator("#message-input").press_sequentially(text)


async def test_a_mention_picked_from_the_list_highlights_the_message_for_the_person_mentioned(
    server, browsers, user, other_user, room
):
    await join(room, other_user)
    alice = await browsers.new_page(user)
    bob = await browsers.new_page(other_user)
    await open_room(alice, server, room.slug)
    await open_room(bob, server, room.slug)

    box = bob.locator("#message-input")
    await box.click()
    await type_text(bob, "@al")
    await expect(suggestions(bob).get_by_role("option")).to_have_text(["@alice"])
    await expect(box).to_have_attribute("aria-expanded", "true")
    option_id = await suggestions(bob).get_by_role("option").get_attribute("id")
    await expect(box).to_have_attribute("aria-activedescendant", option_id)
    await box.press("Enter")  # picks; does not send
    await expect(box).to_have_value("@alice ")
    await expect(suggestions(bob)).to_be_hidden()
    await expect(box).not_to_have_attribute("aria-expanded", "true")
    await type_text(bob, "lunch at noon?")
    await box.press("Enter")
    await expect(bob.locator("#messages li.message.pending")).to_have_count(0)

    # alice is mentioned: her copy is highlighted, her name in it stands out; bob's is not.
    mine = message(alice, 1)
    await expect(mine).to_have_class(MENTIONS_ME)
    await expect(mine.locator("span.mention.me")).to_have_text("@alice")
    await expect(mine.locator("span.mention")).to_have_attribute("data-mention", "alice")
    await expect(message(bob, 1).locator("span.mention")).to_have_text("@alice")
    await expect(message(bob, 1)).not_to_have_class(MENTIONS_ME)
    await expect(message(bob, 1).locator("span.mention.me")).to_have_count(0)
    # Rendered by the server this time: the same.
    await alice.reload()
    await expect_live(alice)
    await expect(message(alice, 1)).to_have_class(MENTIONS_ME)
    await expect(message(alice, 1).locator("span.mention.me")).to_have_text("@alice")


async def test_the_list_answers_the_keyboard_and_the_mouse_and_at_room_mentions_every_member(
    server, browsers, user, other_user, third_user, room
):
    await join(room, other_user, third_user)
    alice = await browsers.new_page(user)  # the owner: @room from her mentions everyone
    bob = await browsers.new_page(other_user)
    await open_room(alice, server, room.slug)
    await open_room(bob, server, room.slug)
    box = alice.locator("#message-input")
    await box.click()

    # Escape closes the list and leaves the text as it was.
    await type_text(alice, "@b")
    await expect(suggestions(alice).get_by_role("option")).to_have_text(["@bob"])
    await box.press("Escape")
    await expect(suggestions(alice)).to_be_hidden()
    await expect(box).to_have_value("@b")
    await box.fill("")

    # "@" alone lists everyone but herself, and @room; the arrows move, wrapping round; Tab picks.
    await type_text(alice, "@")
    options = suggestions(alice).get_by_role("option")
    await expect(options).to_have_text(["@bob", "@carol", "@room — everyone here"])
    await expect(options.nth(0)).to_have_attribute("aria-selected", "true")
    await box.press("ArrowDown")
    await expect(options.nth(1)).to_have_attribute("aria-selected", "true")
    await expect(box).to_have_attribute("aria-activedescendant", await options.nth(1).get_attribute("id"))
    await box.press("ArrowUp")
    await box.press("ArrowUp")
    await expect(options.nth(2)).to_have_attribute("aria-selected", "true")
    await box.press("Tab")
    await expect(box).to_have_value("@room ")
    await expect(box).to_be_focused()

    # A click picks too; the text after the caret stays.
    await type_text(alice, "and @ca")
    await expect(suggestions(alice).get_by_role("option")).to_have_text(["@carol"])
    await suggestions(alice).get_by_role("option", name="@carol").click()
    await expect(box).to_have_value("@room and @carol ")

    # Enter while the list is open picks, it never sends.
    await type_text(alice, "see @bo")
    await expect(suggestions(alice).get_by_role("option")).to_have_text(["@bob"])
    await box.press("Enter")
    await expect(box).to_have_value("@room and @carol see @bob ")
    await expect(alice.locator("#messages li.message")).to_have_count(0)
    await box.press("Enter")  # closed: this one sends
    await expect(message(alice, 1).locator("span.mention")).to_have_text(["@room", "@carol", "@bob"])

    # bob is a member: @room (and his name) mention him.
    await expect(message(bob, 1)).to_have_class(MENTIONS_ME)
    await expect(message(bob, 1).locator("span.mention.me")).to_have_text(["@room", "@bob"])
    await expect(message(alice, 1)).not_to_have_class(MENTIONS_ME)


async def test_a_mention_in_another_room_raises_its_sidebar_badges_live(
    server, browsers, user, other_user, room, other_room
):
    await join(room, other_user)
    await join(other_room, other_user)
    alice = await browsers.new_page(user)
    bob = await browsers.new_page(other_user)
    await open_room(alice, server, other_room.slug)
    await open_room(bob, server, room.slug)
    general = sidebar_link(alice, room.slug)
    await expect(general.locator(".mention-badge")).to_have_count(0)

    await bob.locator("#message-input").click()
    await type_text(bob, "@alice the build is red")
    await expect(suggestions(bob)).to_be_hidden()  # the name is typed out: nothing to pick
    await bob.locator("#message-input").press("Enter")
    await expect(general.locator(".mention-badge")).to_have_text("@1 unread mention")
    await expect(general.locator(".unread-badge")).to_have_text("1 unread")
    await expect(general.locator(".mention-badge")).to_have_attribute("title", "Unread messages that mention you")

    # Another mention counts on; one in the room alice has open shows in the room, not the sidebar.
    await post(room, other_user, "@alice and another thing")
    await expect(general.locator(".mention-badge")).to_have_text("@2 unread mentions")
    await expect(general.locator(".unread-badge")).to_have_text("2 unread")
    await post(other_room, other_user, "@alice over here too")
    await expect(message(alice, 1)).to_have_class(MENTIONS_ME)
    await expect(sidebar_link(alice, other_room.slug).locator(".mention-badge, .unread-badge")).to_have_count(0)
    await expect(general.locator(".mention-badge")).to_have_text("@2 unread mentions")


# Closes the page's sockets on demand and, while window.__offline is set, points new ones at a
# port nobody listens on: the page stays away from the server until the test lets it back.
CUT_SOCKETS = """
(() => {
  const Native = window.WebSocket;
  window.__sockets = [];
  window.__offline = false;
  window.WebSocket = class extends Native {
    constructor(url, ...rest) {
      super(window.__offline ? "ws://127.0.0.1:9/" : url, ...rest);
      window.__sockets.push(this);
    }
  };
})();
"""


async def test_sidebar_counts_missed_while_disconnected_are_caught_up_after_the_reconnect(
    server, browsers, user, other_user, room, other_room
):
    await join(room, other_user)
    context = await browsers.new_context(user)
    await context.add_init_script(CUT_SOCKETS)
    alice = await context.new_page()
    await open_room(alice, server, other_room.slug)
    await alice.evaluate("window.__offline = true; window.__sockets.forEach(socket => socket.close())")
    await expect(alice.locator("#connection-state")).not_to_have_attribute("data-state", "live")

    await post(room, other_user, "@alice while you were away")  # its notify frame reaches no socket of hers
    await alice.evaluate("window.__offline = false")
    await expect_live(alice, timeout=RECONNECT_TIMEOUT_MS)
    general = sidebar_link(alice, room.slug)
    await expect(general.locator(".mention-badge")).to_have_text("@1 unread mention")
    await expect(general.locator(".unread-badge")).to_have_text("1 unread")


# Records every notification the page makes (window.__notifications), then makes it as the browser would.
RECORD_NOTIFICATIONS = """
(() => {
  const Native = window.Notification;
  if (!Native) return;
  window.__notifications = [];
  window.Notification = class extends Native {
    constructor(title, options = {}) {
      window.__notifications.push({ title: title, body: options.body, tag: options.tag });
      super(title, options);
    }
  };
})();
"""

HIDE_PAGE = """() => {
  Object.defineProperty(document, "visibilityState", { configurable: true, get: () => "hidden" });
  Object.defineProperty(document, "hidden", { configurable: true, get: () => true });
  document.dispatchEvent(new Event("visibilitychange"));
}"""


async def notifications(page: Page) -> list[dict]:
    return await page.evaluate("window.__notifications")


async def wait_for_notifications(page: Page, count: int) -> list[dict]:
    await page.wait_for_function("count => window.__notifications.length >= count", arg=count)
    return await notifications(page)


async def choose_level(page: Page, level: str, said: str) -> None:
    await page.locator("#notify-level").select_option(level)
    await expect(page.locator("#notify-form [role=status]")).to_have_text(said)


async def test_a_hidden_page_notifies_of_what_its_level_asks_for_and_of_mentions_elsewhere(
    server, browsers, user, other_user, room, other_room
):
    await join(room, other_user)
    await join(other_room, other_user)
    context = await browsers.new_context(user)
    await context.grant_permissions(["notifications"], origin=server.origin)
    await context.add_init_script(RECORD_NOTIFICATIONS)
    alice = await context.new_page()
    await open_room(alice, server, room.slug)
    await expect(alice.locator("#enable-notifications")).to_be_hidden()  # allowed already: nothing to ask
    await expect(alice.locator("#notify-form .notify-save")).to_be_hidden()  # a change saves itself
    await alice.evaluate(HIDE_PAGE)

    # Her level here is the default, mentions: a mention notifies, once (its notify frame is not a second).
    await post(room, other_user, "@alice can you review the draft?")
    shown = await wait_for_notifications(alice, 1)
    message_id = await message(alice, 1).get_attribute("data-id")
    mention = {"title": "bob in General", "body": "@alice can you review the draft?", "tag": f"chat-{message_id}"}
    assert shown == [mention]
    await post(room, other_user, "a plain message")
    await expect(message(alice, 2)).to_have_count(1)
    assert len(await notifications(alice)) == 1

    # Nothing: not even a mention.
    await choose_level(alice, "nothing", "Saved: nothing")
    await post(room, other_user, "@alice are you there?")
    await expect(message(alice, 3)).to_have_count(1)
    await post(room, other_user, "proof the room is still followed")
    await expect(message(alice, 4)).to_have_count(1)
    assert len(await notifications(alice)) == 1

    # All messages: a plain one notifies.
    await choose_level(alice, "all", "Saved: all messages")
    await post(room, other_user, "lunch is here")
    shown = await wait_for_notifications(alice, 2)
    assert shown[1]["title"] == "bob in General" and shown[1]["body"] == "lunch is here"

    # A mention in another room comes as a notify frame, named after that room.
    await post(other_room, other_user, "@alice over in random")
    shown = await wait_for_notifications(alice, 3)
    assert shown[2]["title"] == "bob in Random" and shown[2]["body"] == "@alice over in random"
    assert shown[2]["tag"].startswith("chat-")
    assert len(shown) == 3


# Stands in for the browser's permission prompt: counts the requests and answers "denied".
COUNT_PERMISSION_REQUESTS = """
(() => {
  if (!window.Notification) return;
  window.__permissionRequests = 0;
  Notification.requestPermission = async () => { window.__permissionRequests += 1; return "denied"; };
})();
"""


async def test_the_enable_button_asks_for_permission_only_when_pressed(server, browsers, user, room):
    context = await browsers.new_context(user)
    await context.add_init_script(COUNT_PERMISSION_REQUESTS)
    alice = await context.new_page()
    await open_room(alice, server, room.slug)
    button = alice.get_by_role("button", name="Enable notifications")
    await expect(button).to_be_visible()
    assert await alice.evaluate("Notification.permission") == "default"
    assert await alice.evaluate("window.__permissionRequests") == 0  # never asked on load

    await button.click()
    blocked = alice.locator(".notifications-blocked")
    await expect(blocked).to_have_text("Notifications are blocked in this browser's settings.")
    await expect(button).to_have_count(0)
    assert await alice.evaluate("window.__permissionRequests") == 1


async def test_a_link_to_an_old_message_opens_the_room_at_it(server, browsers, user, other_user, room):
    await post(room, other_user, "message {number}", count=60)  # more than the page's 50
    alice = await browsers.new_page(user)
    await alice.goto(f"{server.origin}/rooms/{room.slug}/?at=1")
    await expect_live(alice)
    target = message(alice, 1)
    await expect(target.locator(".body")).to_have_text("message 1")
    await expect(target).to_be_in_viewport()
    await expect(target).to_have_class(re.compile(r"\bhighlight\b"))
    await expect(message(alice, 60)).to_have_count(1)  # the newest are still there, below
    await expect(alice).to_have_url(f"{server.origin}/rooms/{room.slug}/")  # a reload opens at the newest


async def test_mentions_badges_the_list_and_the_level_control_have_no_serious_accessibility_violations(
    server, browsers, user, other_user, room, other_room
):
    await join(room, other_user)
    await join(other_room, other_user)
    await post(other_room, other_user, "@alice a word, and `code` too")
    alice = await browsers.new_page(user)
    await open_room(alice, server, other_room.slug)
    await post(room, other_user, "@alice over here")
    await expect(sidebar_link(alice, room.slug).locator(".mention-badge")).to_have_text("@1 unread mention")
    await expect(message(alice, 1)).to_have_class(MENTIONS_ME)
    await choose_level(alice, "all", "Saved: all messages")
    await alice.locator("#message-input").click()
    await type_text(alice, "@")
    await expect(suggestions(alice).get_by_role("option")).to_have_text(["@bob", "@room — everyone here"])
    violations = await serious_violations(alice)
    assert violations == [], f"axe on the room page:\n{json.dumps(violations, indent=2)}"
