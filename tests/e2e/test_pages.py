"""The pages themselves: untrusted text, private rooms, the keyboard, a phone, accessibility."""

from __future__ import annotations

import asyncio
import json

import pytest
from channels.db import database_sync_to_async
from playwright.async_api import Page, expect

from chat import services
from chat.models import Room
from tests.e2e.helpers import (
    AXE_JS,
    TIMEOUT_MS,
    expect_live,
    expect_messages,
    horizontal_overflow,
    open_room,
    send,
)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio(loop_scope="session"), pytest.mark.slow]

LONG_WORD = "a" * 300
HOSTILE = (
    '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script>'
    '<b class="injected">bold</b> "quotes" & ampersands ' + LONG_WORD
)


async def assert_shown_as_text(page: Page, who: str) -> None:
    item = page.locator("#messages li.message[data-seq='1']")
    await expect(item.locator(".body")).to_have_text(HOSTILE)  # literally, tags and all
    injected = await page.locator("#messages img, #messages script, #messages b, .injected").count()
    assert injected == 0, f"{who}: the message body was parsed as HTML"
    assert await page.evaluate("window.__xss") is None, f"{who}: the message's script ran"
    width, viewport = await horizontal_overflow(page)
    assert width <= viewport, f"{who}: the page is {width}px wide in a {viewport}px viewport"
    box = await item.locator(".body").bounding_box()
    assert box["x"] >= 0 and box["x"] + box["width"] <= viewport, f"{who}: the body sticks out: {box}"


async def test_html_scripts_and_long_words_show_as_text_without_breaking_the_layout(
    server, browsers, user, other_user, room
):
    alice = await browsers.new_page(user)
    bob = await browsers.new_page(other_user)
    await open_room(alice, server, room.slug)
    await open_room(bob, server, room.slug)

    await send(alice, HOSTILE)

    await assert_shown_as_text(alice, "alice (her own, acknowledged)")
    await assert_shown_as_text(bob, "bob (live)")
    await bob.reload()  # rendered by the server this time
    await expect_live(bob)
    await assert_shown_as_text(bob, "bob (after a reload)")


async def try_socket(page: Page, slug: str) -> dict:
    """Open the room's WebSocket from inside the page; report whether it opened (bounded by a timer)."""
    script = """([slug, timeout]) => new Promise((resolve) => {
        const result = {opened: false, closed: false, error: false, code: null};
        const socket = new WebSocket(`ws://${location.host}/ws/rooms/${slug}/`);
        const done = () => resolve(result);
        socket.onopen = () => { result.opened = true; socket.close(); };
        socket.onerror = () => { result.error = true; };
        socket.onclose = (event) => { result.closed = true; result.code = event.code; done(); };
        setTimeout(done, timeout);
    })"""
    return await page.evaluate(script, [slug, TIMEOUT_MS - 1000])


async def test_a_private_room_is_unreachable_for_a_non_member(server, browsers, other_user, third_user, private_room):
    slug = private_room.slug
    # bob, a member, for comparison: the link, the page and the socket all work.
    bob = await browsers.new_page(other_user)
    await bob.goto(f"{server.origin}/")
    await expect(bob.locator(f"a[href='/rooms/{slug}/']")).to_have_count(1)
    assert (await try_socket(bob, slug))["opened"] is True

    carol = await browsers.new_page(third_user)
    await carol.goto(f"{server.origin}/")
    await expect(carol.locator(".whoami")).to_contain_text("carol")
    await expect(carol.locator(f"a[href='/rooms/{slug}/']")).to_have_count(0)
    await expect(carol.locator("main")).not_to_contain_text("Secret")

    refused = await try_socket(carol, slug)
    assert refused["opened"] is False and refused["closed"] is True, refused

    response = await carol.goto(f"{server.origin}/rooms/{slug}/")
    assert response.status == 404
    await expect(carol.locator("body")).not_to_contain_text("Secret")
    await expect(carol.locator("#messages, #message-input")).to_have_count(0)


async def focused_id(page: Page) -> str:
    return await page.evaluate("document.activeElement ? document.activeElement.id : ''")


async def test_keyboard_enter_sends_shift_enter_breaks_lines_and_tab_order_is_sensible(server, browsers, user, room):
    alice = await browsers.new_page(user)
    await open_room(alice, server, room.slug)

    # The message box can be reached with Tab alone, from the top of the page.
    await alice.locator("body").focus()
    for _ in range(40):
        await alice.keyboard.press("Tab")
        if await focused_id(alice) == "message-input":
            break
    else:
        raise AssertionError("40 presses of Tab never reached the message box")

    # Shift+Enter adds a line and sends nothing; Enter sends.
    await alice.keyboard.type("first line")
    await alice.keyboard.press("Shift+Enter")
    await alice.keyboard.type("second line")
    await expect(alice.locator("#message-input")).to_have_value("first line\nsecond line")
    await expect(alice.locator("#messages li.message")).to_have_count(0)
    await alice.keyboard.press("Enter")
    await expect_messages(alice, [(1, "first line\nsecond line")])
    # The line break is shown, not just stored.
    assert await alice.locator("#messages li.message .body").inner_text() == "first line\nsecond line"
    await expect(alice.locator("#message-input")).to_have_value("")
    assert await focused_id(alice) == "message-input", "focus should stay in the message box after sending"

    # Tab goes from the message box to Send, Shift+Tab back; Space on Send sends.
    await alice.keyboard.press("Tab")
    assert await focused_id(alice) == "send-button"
    await alice.keyboard.press("Shift+Tab")
    assert await focused_id(alice) == "message-input"
    await alice.keyboard.type("sent with the button")
    await alice.keyboard.press("Tab")
    await alice.keyboard.press("Space")
    await expect_messages(alice, [(1, "first line\nsecond line"), (2, "sent with the button")])


async def assert_usable_on_a_phone(page: Page, when: str) -> None:
    width, viewport = await horizontal_overflow(page)
    assert width <= viewport, f"{when}: the page is {width}px wide in a {viewport}px viewport"
    size = page.viewport_size
    for selector in ("#message-input", "#send-button"):
        box = await page.locator(selector).bounding_box()
        assert box is not None, f"{when}: {selector} is not rendered"
        inside = (
            box["x"] >= 0
            and box["y"] >= 0
            and box["x"] + box["width"] <= size["width"]
            and box["y"] + box["height"] <= size["height"]
        )
        assert inside, f"{when}: {selector} at {box} is not within the {size} viewport"


async def test_a_phone_sized_viewport_is_usable(server, browsers, user, room):
    phone = {"viewport": {"width": 390, "height": 844}, "is_mobile": True, "has_touch": True, "device_scale_factor": 3}
    alice = await browsers.new_page(user, **phone)
    await open_room(alice, server, room.slug)
    await assert_usable_on_a_phone(alice, "on arrival")

    long_message = "https://example.com/" + "x" * 200 + " and " + LONG_WORD
    await alice.locator("#message-input").fill(long_message)
    await alice.locator("#send-button").tap()
    await expect_messages(alice, [(1, long_message)])
    await assert_usable_on_a_phone(alice, "after a long message")
    body = await alice.locator("#messages li.message .body").bounding_box()
    assert body["x"] + body["width"] <= 390, f"the long message sticks out: {body}"


# --------------------------------------------------------------------------
# Accessibility (axe-core)
# --------------------------------------------------------------------------


async def serious_violations(page: Page) -> list[dict]:
    if not AXE_JS.exists():
        pytest.fail(
            f"{AXE_JS} is missing: run `npm install --no-save --no-audit --no-fund axe-core@4.14.1` "
            "in the repository root (bin/test does this when npm is available).",
            pytrace=False,
        )
    # Evaluated through the DevTools protocol: the site's Content-Security-Policy forbids inline script tags.
    await page.evaluate(AXE_JS.read_text())
    results = await asyncio.wait_for(page.evaluate("() => axe.run(document, {resultTypes: ['violations']})"), 20)
    return [
        {
            "id": violation["id"],
            "impact": violation["impact"],
            "help": violation["help"],
            "nodes": [{"target": node["target"], "summary": node["failureSummary"]} for node in violation["nodes"]],
        }
        for violation in results["violations"]
        if violation["impact"] in ("serious", "critical")
    ]


@database_sync_to_async
def chat_a_little(room, private_room, user, other_user) -> Room:
    """A few messages of every kind in `room`, one in `private_room`; returns alice and bob's direct room, two in it."""
    services.message_create(room=room, author=user, body="Hello, see https://example.com/docs")
    services.message_create(room=room, author=other_user, body="Hi alice!\nTwo lines.")
    message, _ = services.message_create(room=room, author=user, body="typo")
    services.message_edit(room=room, message_id=message.pk, user=user, body="edited")
    message, _ = services.message_create(room=room, author=other_user, body="gone")
    services.message_delete(room=room, message_id=message.pk, user=other_user)
    services.message_create(room=private_room, author=other_user, body="psst")
    services.read_mark(room=room, user=other_user, seq=message.seq)  # "Seen by 1" under alice's latest
    direct, _ = services.direct_room_open(user=user, username=other_user.username)
    services.message_create(room=direct, author=other_user, body="a word in private?")
    services.message_create(room=direct, author=user, body="sure")
    return direct


@pytest.mark.parametrize("where", ["room list", "room page", "direct room", "patterns page"])
async def test_no_serious_accessibility_violations(where, server, browsers, user, other_user, room, private_room):
    direct = await chat_a_little(room, private_room, user, other_user)
    alice = await browsers.new_page(user)
    if where == "room list":
        await alice.goto(f"{server.origin}/")
        await expect(alice.locator("#direct-start")).to_be_visible()  # with a "Direct messages" list and the form
    elif where == "direct room":
        await open_room(alice, server, direct.slug)
        await expect(alice.locator("#online")).to_contain_text("alice")
    elif where == "patterns page":
        await alice.goto(f"{server.origin}/rooms/{room.slug}/patterns/")
        await expect(alice.locator(".pattern-panel[data-pattern='socket']")).to_have_attribute("data-state", "live")
        await alice.locator(".pattern-panel[data-pattern='long'] .pattern-send-button").click()
        await expect(alice.locator(".pattern-panel li.message")).to_have_count(3)
    else:
        await open_room(alice, server, room.slug)
        await expect(alice.locator("#online")).to_contain_text("alice")
        await alice.locator(".seen-by-count").focus()  # its names shown
    violations = await serious_violations(alice)
    assert violations == [], f"axe on the {where}:\n{json.dumps(violations, indent=2)}"


async def test_the_api_docs_page_lists_every_operation_with_its_assets_from_the_site_itself(server, browsers, user):
    page = await browsers.new_page(user)
    elsewhere: list[str] = []
    page.on("request", lambda request: request.url.startswith(server.origin) or elsewhere.append(request.url))
    await page.goto(f"{server.origin}/api/docs")
    operations = page.locator(".opblock")
    # Every operation the schema describes (rooms, messages, one message, its reactions and pin,
    # pins, poll), however many the API has: one block each.
    schema = await (await page.request.get(f"{server.origin}/api/openapi.json")).json()
    methods = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}
    count = sum(1 for path in schema["paths"].values() for method in path if method in methods)
    assert count >= 8, schema["paths"].keys()
    await expect(operations).to_have_count(count)
    await expect(page.locator(".opblock-summary-path").first).to_contain_text("/api/rooms/")
    assert elsewhere == []  # no CDN: every script, style and image came from this server
    assert browsers.errors.get(page) == [], browsers.errors.get(page)  # no CSP violation, no script error
