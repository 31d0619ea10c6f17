"""Hostile text in every place a person can put it stays text: server-rendered and JS-rendered, in Chromium."""

from __future__ import annotations

import pytest
from channels.db import database_sync_to_async
from django.contrib.auth import get_user_model
from django.utils.html import escape
from playwright.async_api import Page, expect

from chat import services
from tests.e2e.helpers import expect_live, open_room, send

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio(loop_scope="session"), pytest.mark.slow]


def payload(where: str) -> str:
    return f'<img src=x onerror="window.__xss=\'{where}\'"><script>window.__xss="{where}"</script>{where}'


@database_sync_to_async
def hostile_room_and_person(user):
    # The sign-up form allows only letters, digits and @.+-_ in names; an account
    # made another way (the admin, a future SSO) must not be able to inject either.
    mallory = get_user_model().objects.create_user(payload("username"), password="pw-mallory-123")
    room = services.room_create(slug="xss", name=payload("room name"), topic=payload("topic"), created_by=user)
    services.room_join(room=room, user=mallory)
    services.message_create(room=room, author=mallory, body=payload("rendered body"))
    return mallory, room


async def assert_inert(page: Page, *texts: str) -> None:
    assert await page.evaluate("window.__xss") is None, "a hostile script ran"
    injected = await page.locator("img[src=x], script:not([src]):not([type='application/json'])").count()
    assert injected == 0, "hostile markup became elements"
    content = await page.locator("body").inner_text()
    for text in texts:
        assert payload(text) in content, f"{text!r} is not shown literally"


async def assert_shown_as_text(page: Page, shown: dict[str, str]) -> None:
    """Each element (by selector) shows exactly its hostile text, tags and all, as text."""
    for selector, where in shown.items():
        await expect(page.locator(selector)).to_have_text([payload(where)])


def assert_served_escaped(html: str, *texts: str) -> None:
    """The server sent each hostile text HTML-escaped, and never raw."""
    for text in texts:
        assert escape(payload(text)) in html, f"{text!r} is not in the page HTML-escaped"
        assert payload(text) not in html, f"{text!r} is in the page raw"


async def test_hostile_names_topics_and_bodies_are_inert_on_every_page(server, browsers, user):
    mallory, room = await hostile_room_and_person(user)
    alice = await browsers.new_page(user)
    response = await alice.goto(f"{server.origin}/")
    assert_served_escaped(await response.text(), "room name", "topic")
    await assert_inert(alice, "room name", "topic")
    await assert_shown_as_text(alice, {".room-name": "room name", ".room-topic": "topic"})

    response = await alice.goto(f"{server.origin}/rooms/{room.slug}/")
    assert_served_escaped(await response.text(), "room name", "topic", "username", "rendered body")
    await expect_live(alice)
    await assert_inert(alice, "room name", "topic", "username", "rendered body")
    await expect(alice).to_have_title(f"{payload('room name')} · Chat")
    rendered = "#messages li.message[data-seq='1']"
    await assert_shown_as_text(
        alice,
        {
            "#room-title": "room name",
            ".room-topic": "topic",
            f"{rendered} .author": "username",
            f"{rendered} .body": "rendered body",
        },
    )

    intruder = await browsers.new_page(mallory)
    await open_room(intruder, server, room.slug)
    await expect(alice.locator("#online")).to_contain_text(payload("username"))  # presence, rendered by room.js
    await intruder.locator("#message-input").press_sequentially("x")
    await expect(alice.locator("#typing")).to_contain_text(payload("username"))  # typing, rendered by room.js
    await intruder.locator("#message-input").fill("")  # the "x" typed above is not part of the message
    await send(intruder, payload("live body"))
    await expect(alice.locator("#messages li.message").last).to_contain_text(payload("live body"))
    await expect_live(alice)
    await assert_inert(alice, "room name", "topic", "username", "rendered body", "live body")
    live = "#messages li.message[data-seq='2']"  # rendered by room.js
    await assert_shown_as_text(alice, {f"{live} .author": "username", f"{live} .body": "live body"})
