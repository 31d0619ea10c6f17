"""Hostile text in every place a person can put it stays text: server-rendered and JS-rendered, in Chromium."""

from __future__ import annotations

import pytest
from channels.db import database_sync_to_async
from django.contrib.auth import get_user_model
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
    services.room_enter(slug="xss", user=mallory)
    services.message_create(room=room, author=mallory, body=payload("rendered body"))
    return mallory, room


async def assert_inert(page: Page, *texts: str) -> None:
    assert await page.evaluate("window.__xss") is None, "a hostile script ran"
    injected = await page.locator("img[src=x], script:not([src]):not([type='application/json'])").count()
    assert injected == 0, "hostile markup became elements"
    content = await page.locator("body").inner_text()
    for text in texts:
        assert payload(text) in content, f"{text!r} is not shown literally"


async def test_hostile_names_topics_and_bodies_are_inert_on_every_page(server, browsers, user):
    mallory, room = await hostile_room_and_person(user)
    alice = await browsers.new_page(user)
    await alice.goto(f"{server.origin}/")
    await assert_inert(alice, "room name", "topic")

    await open_room(alice, server, room.slug)
    await assert_inert(alice, "room name", "topic", "username", "rendered body")

    intruder = await browsers.new_page(mallory)
    await open_room(intruder, server, room.slug)
    await expect(alice.locator("#online")).to_contain_text(payload("username"))  # presence, rendered by room.js
    await intruder.locator("#message-input").press_sequentially("x")
    await expect(alice.locator("#typing")).to_contain_text(payload("username"))  # typing, rendered by room.js
    await send(intruder, payload("live body"))
    await expect(alice.locator("#messages li.message").last).to_contain_text(payload("live body"))
    await expect_live(alice)
    await assert_inert(alice, "room name", "topic", "username", "rendered body", "live body")
