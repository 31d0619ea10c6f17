"""The patterns page: one room through short polling, long-polling and the WebSocket (the browser side is in e2e)."""

from __future__ import annotations

import json
import re
import time

import pytest
from django.urls import reverse

from chat import services

pytestmark = pytest.mark.django_db


def patterns_url(room, query: str = "") -> str:
    return reverse("room-patterns", args=[room.slug]) + query


def page_config(response) -> dict:
    found = re.search(r'<script id="patterns-config" type="application/json">(.*?)</script>', response.content.decode())
    return json.loads(found.group(1))


def shown_panels(response) -> list[str]:
    return re.findall(r'data-pattern="(\w+)"', response.content.decode())


def test_a_member_sees_the_three_panels_starting_from_the_rooms_last_message(client, user, room):
    services.message_create(room=room, author=user, body="before")
    services.message_create(room=room, author=user, body="also before")
    client.force_login(user)
    response = client.get(patterns_url(room))
    assert response.status_code == 200
    assert shown_panels(response) == ["short", "long", "socket"]
    config = page_config(response)
    assert config["room"] == "general"
    assert config["lastSeq"] == 2
    assert config["panels"] == ["short", "long", "socket"]
    assert config["interval"] == 3
    # Only messages arriving while the page is open are shown: none is rendered with it.
    assert "also before" not in response.content.decode()


def test_the_page_loads_its_scripts_from_files_not_inline(client, user, room):
    client.force_login(user)
    content = client.get(patterns_url(room)).content.decode()
    scripts = re.findall(r"<script([^>]*)>", content)
    # An ES module: patterns.js imports live.js and the rest itself.
    assert any("chat/patterns.js" in attributes and 'type="module"' in attributes for attributes in scripts)
    # Every script is a file, except the JSON config, which never runs (the CSP forbids inline script).
    assert all("src=" in attributes or 'type="application/json"' in attributes for attributes in scripts)


def test_a_member_of_a_private_room_sees_it(client, other_user, private_room):
    client.force_login(other_user)
    response = client.get(patterns_url(private_room))
    assert response.status_code == 200
    assert shown_panels(response) == ["short", "long", "socket"]


def test_a_private_room_is_404_for_a_non_member(client, third_user, private_room):
    client.force_login(third_user)
    response = client.get(patterns_url(private_room))
    assert response.status_code == 404
    assert "Secret" not in response.content.decode()


def test_an_unknown_room_is_404(client, user, room):
    client.force_login(user)
    assert client.get(reverse("room-patterns", args=["nope"])).status_code == 404


def test_the_page_needs_a_signed_in_user(client, room):
    response = client.get(patterns_url(room))
    assert response.status_code == 302 and reverse("login") in response.url


def test_the_page_is_only_read(client, user, room):
    client.force_login(user)
    assert client.post(patterns_url(room)).status_code == 405


def test_opening_a_public_room_here_joins_nothing_as_the_room_page_does(client, other_user, room):
    client.force_login(other_user)
    assert client.get(patterns_url(room)).status_code == 200
    assert room.memberships.filter(user=other_user).count() == 0


@pytest.mark.parametrize(
    ("query", "panels"),
    [
        ("?panels=socket", ["socket"]),
        ("?panels=socket,short", ["short", "socket"]),  # always shown in the same order
        ("?panels=long,bogus", ["long"]),
        ("?panels=bogus", ["short", "long", "socket"]),
        ("?panels=", ["short", "long", "socket"]),
    ],
)
def test_the_panels_query_runs_only_the_panels_named(client, user, room, query, panels):
    client.force_login(user)
    response = client.get(patterns_url(room, query))
    assert shown_panels(response) == panels
    assert page_config(response)["panels"] == panels


@pytest.mark.parametrize(
    ("query", "interval"),
    [("?interval=1", 1), ("?interval=0.5", 0.5), ("?interval=0", 0.25), ("?interval=9999", 60), ("?interval=abc", 3),
     ("?interval=nan", 3)],
)  # fmt: skip
def test_the_interval_query_sets_the_short_poll_interval_within_bounds(client, user, room, query, interval):
    client.force_login(user)
    assert page_config(client.get(patterns_url(room, query)))["interval"] == interval


def test_the_room_page_links_to_the_patterns_page(client, user, room):
    client.force_login(user)
    content = client.get(reverse("room-detail", args=[room.slug])).content.decode()
    assert f'href="{patterns_url(room)}"' in content


def test_api_answers_carry_when_the_server_received_the_request_and_when_it_answered(client, user, room):
    client.force_login(user)
    before = time.time() * 1000
    response = client.get(reverse("api:messages", args=[room.slug]))
    after = time.time() * 1000
    received, sent = float(response["X-Server-Received"]), float(response["X-Server-Time"])
    assert before - 1 <= received <= sent <= after + 1
    # Errors too (the page reads the clock from whatever answers), but not the pages.
    assert "X-Server-Time" in client.get("/api/rooms/no-such-room/messages")
    assert "X-Server-Time" not in client.get(reverse("room-detail", args=[room.slug]))
