"""Search in the browser: the header's box, the results page, and opening a result at its message."""

from __future__ import annotations

import re

import pytest
from channels.db import database_sync_to_async
from playwright.async_api import expect

from chat import services
from tests.e2e.helpers import expect_live

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio(loop_scope="session"), pytest.mark.slow]


@database_sync_to_async
def post_many(room, author, bodies: list[str]) -> None:
    for body in bodies:
        services.message_create(room=room, author=author, body=body)


async def test_search_from_the_header_and_open_a_result_at_its_message(
    server, browsers, user, other_user, third_user, room, private_room
):
    # The match is the room's first message, older than the 50 a room page opens with.
    await post_many(room, other_user, ["the kangaroo plan is ready", *(f"filler {n}" for n in range(60))])
    await post_many(private_room, user, ["kangaroo budget, members only"])

    alice = await browsers.new_page(user)
    await alice.goto(f"{server.origin}/")
    box = alice.get_by_role("searchbox", name="Search messages")
    await box.fill("kangaroo")
    await box.press("Enter")
    await expect(alice).to_have_url(re.compile(r"/search/\?q=kangaroo$"))
    results = alice.locator(".search-result")
    await expect(results).to_have_count(2)
    first_in_general = results.filter(has_text="plan is ready")
    await expect(first_in_general.locator("mark")).to_have_text("kangaroo")
    await expect(first_in_general.locator(".author")).to_have_text("bob")

    await first_in_general.locator(".snippet a").click()
    await expect(alice).to_have_url(re.compile(r"/rooms/general/"))
    await expect_live(alice)
    target = alice.locator("#messages li.message[data-seq='1']")
    await expect(target.locator(".body")).to_have_text("the kangaroo plan is ready")
    await expect(target).to_be_in_viewport()
    await expect(target).to_have_class(re.compile(r"\bhighlight\b"))
    await expect(alice).to_have_url(f"{server.origin}/rooms/general/")  # a reload opens at the newest

    # Carol is not in the private room: one result, and nothing of the other.
    carol = await browsers.new_page(third_user)
    await carol.goto(f"{server.origin}/search/?q=kangaroo")
    await expect(carol.locator(".search-result")).to_have_count(1)
    await expect(carol.locator("main")).not_to_contain_text("budget")

    # A query with nothing to find says why.
    await carol.goto(f"{server.origin}/search/?q=-kangaroo")
    await expect(carol.locator("main")).to_contain_text("Search for at least one word")
