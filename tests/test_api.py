"""The JSON API and long-poll (docs/api.md), against the real database and the real Redis."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time

import pytest
import redis
from channels.db import database_sync_to_async
from django.core.management import CommandError, call_command
from django.db import OperationalError
from django.test import AsyncClient, Client
from redis.backoff import NoBackoff
from redis.retry import Retry

from chat import api, ephemeral, fanout, longpoll, protocol, realtime, selectors, services
from chat.models import ApiToken, Membership, Message, Room
from tests.helpers import eventually, joined, receive, send

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def generous_rate_limits(settings):
    # Users' ids repeat from test to test within one minute's window; the limits get tests of their own.
    settings.CHAT_API_REQUESTS_PER_MINUTE = 100_000
    settings.CHAT_API_WRITES_PER_MINUTE = 100_000


@pytest.fixture
def alice_api(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def bob_secret(other_user) -> str:
    return services.token_create(user=other_user, name="bob's bot")[1]


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def post_json(client: Client, url: str, data, **kwargs):
    return client.post(url, json.dumps(data) if not isinstance(data, str) else data, "application/json", **kwargs)


def error_of(response) -> tuple[int, str]:
    assert response["Content-Type"] == "application/json"
    return response.status_code, response.json()["error"]["code"]


# --------------------------------------------------------------------------
# Rooms
# --------------------------------------------------------------------------


def test_room_list_shows_the_rooms_the_user_may_see_with_unread_counts(
    alice_api, bob_secret, user, other_user, third_user, room, private_room
):
    services.room_join(room=room, user=other_user)
    services.message_create(room=room, author=user, body="for bob to read")
    bobs = Client().get("/api/rooms/", headers=bearer(bob_secret)).json()["rooms"]
    assert {r["slug"]: r["unread"] for r in bobs} == {"general": 1, "secret": 0}
    general = next(r for r in bobs if r["slug"] == "general")
    assert general == {
        "slug": "general", "name": "General", "topic": "Anything goes", "is_private": False, "is_direct": False,
        "direct_with": None, "last_seq": 1, "unread": 1, "unread_mentions": 0, "notify": "mentions",
    }  # fmt: skip

    carol = Client()
    carol.force_login(third_user)
    assert [r["slug"] for r in carol.get("/api/rooms/").json()["rooms"]] == ["general"]


def test_creating_a_room_returns_201_and_makes_the_caller_its_owner(alice_api, user):
    response = post_json(alice_api, "/api/rooms/", {"slug": "ops", "name": "Ops", "topic": "", "is_private": True})
    assert response.status_code == 201
    assert response.json() == {
        "slug": "ops", "name": "Ops", "topic": "", "is_private": True, "is_direct": False, "direct_with": None,
        "last_seq": 0, "unread": 0, "unread_mentions": 0, "notify": "mentions",
    }  # fmt: skip
    assert Membership.objects.get(room__slug="ops").user == user


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ("{not json", "invalid_json"),
        ("[1]", "invalid_json"),
        ({"slug": "x"}, "invalid_field"),  # no name
        ({"name": "X", "is_private": "yes"}, "invalid_field"),
        ({"name": "X", "slug": "Not A Slug!"}, "invalid_room"),
        ({"name": "General", "slug": "general"}, "invalid_room"),  # taken
    ],
)
def test_creating_a_room_with_bad_fields_is_400_and_creates_nothing(alice_api, room, body, code):
    before = Room.objects.count()
    assert error_of(post_json(alice_api, "/api/rooms/", body)) == (400, code)
    assert Room.objects.count() == before


# --------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------


def test_messages_page_in_seq_order_with_after_before_and_limit(alice_api, user, room):
    for i in range(1, 6):
        services.message_create(room=room, author=user, body=f"m{i}")
    url = "/api/rooms/general/messages"

    def page(query: str) -> tuple[list[int], bool]:
        data = alice_api.get(f"{url}?{query}").json()
        return [m["seq"] for m in data["messages"]], data["has_more"]

    assert page("") == ([1, 2, 3, 4, 5], False)
    assert page("limit=2") == ([4, 5], True)
    assert page("after=1&limit=2") == ([2, 3], True)
    assert page("before=3") == ([1, 2], False)
    first = alice_api.get(url).json()["messages"][0]
    assert set(first) == {
        "id", "seq", "room", "author", "body", "created_at", "edited_at", "deleted_at", "nonce", "system",
        "html", "reply_to", "reactions", "pinned_at", "mentions", "mentions_room", "attachments",
    }  # fmt: skip


@pytest.mark.parametrize("query", ["after=-1", "after=x", "limit=0", "limit=201", "before=0"])
def test_bad_paging_parameters_are_400(alice_api, room, query):
    assert error_of(alice_api.get(f"/api/rooms/general/messages?{query}")) == (400, "invalid_param")


def test_an_unknown_room_and_a_private_room_of_others_are_both_404(alice_api, user, third_user, private_room):
    assert error_of(alice_api.get("/api/rooms/nope/messages")) == (404, "room_not_found")
    secret, _ = services.message_create(room=private_room, author=user, body="members only")
    carol = Client()
    carol.force_login(third_user)
    for response in (
        carol.get("/api/rooms/secret/messages"),
        post_json(carol, "/api/rooms/secret/messages", {"body": "hi"}),
        carol.get(f"/api/rooms/secret/messages/{secret.pk}"),
        carol.patch(f"/api/rooms/secret/messages/{secret.pk}", json.dumps({"body": "changed"}), "application/json"),
        carol.delete(f"/api/rooms/secret/messages/{secret.pk}"),
        carol.get("/api/rooms/secret/poll?timeout=1"),
    ):
        assert error_of(response) == (404, "room_not_found")
    assert list(Message.objects.values_list("body", flat=True)) == ["members only"]
    assert [room["slug"] for room in carol.get("/api/rooms/").json()["rooms"]] == []


def test_posting_returns_201_and_a_retry_with_the_same_nonce_returns_the_original(alice_api, room):
    url = "/api/rooms/general/messages"
    first = post_json(alice_api, url, {"body": "hello", "nonce": "n-1"})
    retry = post_json(alice_api, url, {"body": "hello", "nonce": "n-1"})
    assert (first.status_code, retry.status_code) == (201, 200)
    assert first.json() == retry.json()
    assert first.json()["seq"] == 1 and first.json()["body"] == "hello"
    assert Message.objects.count() == 1


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"nonce": "n"}, 400, "missing_body"),
        ({"body": "   "}, 400, "empty_body"),
        ({"body": 5}, 400, "invalid_body"),
        ({"body": "x" * 4001}, 413, "body_too_long"),
        ({"body": "a\u0000b"}, 400, "invalid_body"),
        ('{"body": "a\\ud800b"}', 400, "invalid_body"),
        ({"body": "x", "nonce": "n" * 65}, 400, "invalid_nonce"),
        ({"body": "x" * 4000, "padding": "p" * 65 * 1024}, 413, "request_too_large"),
        ("{oops", 400, "invalid_json"),
    ],
)
def test_posting_bad_input_gets_the_right_error_and_stores_nothing(alice_api, room, body, status, code):
    assert error_of(post_json(alice_api, "/api/rooms/general/messages", body)) == (status, code)
    assert not Message.objects.exists()


def test_one_message_is_served_as_it_is_now_and_only_from_its_own_room(alice_api, user, room, other_user):
    message, _ = services.message_create(room=room, author=user, body="first")
    url = f"/api/rooms/general/messages/{message.pk}"
    assert alice_api.get(url).json() == protocol.message_payload(message)
    services.message_delete(room=room, message_id=message.pk, user=user)
    assert (alice_api.get(url).json()["body"], alice_api.get(url).json()["deleted_at"] is not None) == ("", True)
    elsewhere = services.room_create(
        slug="elsewhere", name="Elsewhere", topic="", is_private=False, created_by=other_user
    )
    assert error_of(alice_api.get(f"/api/rooms/{elsewhere.slug}/messages/{message.pk}")) == (404, "not_found")
    assert error_of(alice_api.get("/api/rooms/general/messages/999999")) == (404, "not_found")


def test_an_archived_room_can_be_read_but_not_written(alice_api, user, room):
    message, _ = services.message_create(room=room, author=user, body="kept")
    services.room_archive(room=room)
    assert [m["body"] for m in alice_api.get("/api/rooms/general/messages").json()["messages"]] == ["kept"]
    assert error_of(post_json(alice_api, "/api/rooms/general/messages", {"body": "x"})) == (403, "room_archived")
    assert error_of(alice_api.delete(f"/api/rooms/general/messages/{message.pk}")) == (403, "room_archived")
    assert Message.objects.get().body == "kept"


def test_edit_and_delete_follow_the_websocket_permissions(alice_api, bob_secret, user, other_user, room):
    mine, _ = services.message_create(room=room, author=user, body="helo")
    url = f"/api/rooms/general/messages/{mine.pk}"
    edited = alice_api.patch(url, json.dumps({"body": "hello"}), "application/json")
    assert edited.status_code == 200
    assert (edited.json()["body"], edited.json()["edited_at"] is not None) == ("hello", True)

    bob = Client()
    assert error_of(bob.patch(url, json.dumps({"body": "bob"}), "application/json", headers=bearer(bob_secret))) == (
        403,
        "forbidden",
    )
    assert error_of(bob.delete(url, headers=bearer(bob_secret))) == (403, "forbidden")
    mine.refresh_from_db()
    assert (mine.body, mine.deleted_at) == ("hello", None)

    services.room_join(room=room, user=other_user)
    Membership.objects.filter(room=room, user=other_user).update(role="moderator")
    deleted = bob.delete(url, headers=bearer(bob_secret))
    assert deleted.status_code == 200
    assert (deleted.json()["body"], deleted.json()["deleted_at"] is not None) == ("", True)
    assert error_of(alice_api.delete(url)) == (404, "not_found")  # already deleted
    assert error_of(alice_api.delete("/api/rooms/general/messages/999999")) == (404, "not_found")


# --------------------------------------------------------------------------
# Authentication, CSRF, methods, limits
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "not_authenticated"),
        ({"Authorization": "Bearer chat_not-a-real-token"}, "invalid_token"),
        ({"Authorization": "Basic YWxpY2U6cHc="}, "invalid_credentials"),
        ({"Authorization": "Bearer "}, "invalid_credentials"),
    ],
)
def test_missing_or_bad_credentials_are_401(room, headers, code):
    response = Client().get("/api/rooms/", headers=headers)
    assert error_of(response) == (401, code)
    assert response["WWW-Authenticate"].startswith("Bearer")


def test_a_revoked_token_is_401_and_a_used_token_records_when(other_user, bob_secret, room):
    token = ApiToken.objects.get()
    assert Client().get("/api/rooms/", headers=bearer(bob_secret)).status_code == 200
    token.refresh_from_db()
    assert token.last_used_at is not None
    services.token_revoke(token)
    assert error_of(Client().get("/api/rooms/", headers=bearer(bob_secret))) == (401, "invalid_token")


def test_tokens_are_stored_hashed(other_user, bob_secret):
    token = ApiToken.objects.get()
    assert bob_secret not in (token.key_hash, token.prefix) and len(token.key_hash) == 64
    assert bob_secret.startswith(token.prefix)


def test_session_posts_need_the_csrf_token_and_token_posts_do_not(user, bob_secret, room):
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(user)
    refused = post_json(browser, "/api/rooms/general/messages", {"body": "forged?"})
    assert error_of(refused) == (403, "csrf_failed")
    assert not Message.objects.exists()

    browser.get("/")  # sets the csrftoken cookie
    csrf = browser.cookies["csrftoken"].value
    accepted = post_json(browser, "/api/rooms/general/messages", {"body": "real"}, headers={"X-CSRFToken": csrf})
    assert accepted.status_code == 201
    bot = Client(enforce_csrf_checks=True)
    assert post_json(bot, "/api/rooms/general/messages", {"body": "bot"}, headers=bearer(bob_secret)).status_code == 201


def test_a_wrong_method_is_405_with_allow(alice_api, room):
    response = alice_api.put("/api/rooms/general/messages", "{}", "application/json")
    assert error_of(response) == (405, "method_not_allowed")
    assert response["Allow"] == "GET, POST"
    assert error_of(alice_api.post("/api/rooms/general/poll"))[0] == 405


def test_unknown_api_paths_answer_json_404(alice_api):
    for path in ("/api/nope", "/api/rooms", "/api/rooms/general/messages/abc"):
        assert error_of(alice_api.get(path)) == (404, "not_found")


def test_writes_over_the_limit_are_429_with_retry_after(alice_api, room, settings):
    settings.CHAT_API_WRITES_PER_MINUTE = 2
    url = "/api/rooms/general/messages"
    statuses = [post_json(alice_api, url, {"body": f"m{i}"}).status_code for i in range(2)]
    limited = post_json(alice_api, url, {"body": "one too many"})
    assert statuses == [201, 201]
    assert error_of(limited) == (429, "rate_limited")
    assert 1 <= int(limited["Retry-After"]) <= 60
    assert Message.objects.count() == 2
    assert alice_api.get(url).status_code == 200  # reads have their own, higher limit


# --------------------------------------------------------------------------
# Health
# --------------------------------------------------------------------------


def test_healthz_is_200_when_database_and_redis_answer(client):
    response = client.get("/healthz")
    assert (response.status_code, response.json()) == (200, {"database": "ok", "redis": "ok"})


def redis_nowhere(monkeypatch) -> None:
    """The site's Redis client (the health check asks it from the event loop) points at nothing."""
    monkeypatch.setattr(
        ephemeral, "client", lambda: redis.asyncio.Redis(port=1, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
    )


def test_healthz_is_503_and_names_redis_when_redis_is_down(client, monkeypatch):
    redis_nowhere(monkeypatch)
    response = client.get("/healthz")
    assert response.status_code == 503
    assert response.json()["database"] == "ok" and response.json()["redis"].startswith("error")


def test_healthz_needing_only_the_database_is_200_while_redis_is_down(client, monkeypatch):
    """A load balancer's fallback check: without Redis a host still serves, from the database."""
    redis_nowhere(monkeypatch)
    response = client.get("/healthz?need=database")
    assert response.status_code == 200
    assert response.json()["database"] == "ok" and response.json()["redis"].startswith("error")


def test_healthz_does_not_wait_on_a_redis_that_does_not_answer(client, monkeypatch, settings):
    """A blackholed Redis: the check answers within CHAT_REDIS_TIMEOUT, not the client's own timeouts."""
    settings.CHAT_REDIS_TIMEOUT = 0.2

    class Silent:
        async def ping(self) -> None:
            await asyncio.sleep(30)

    monkeypatch.setattr(ephemeral, "client", lambda: Silent())
    started = time.monotonic()
    response = client.get("/healthz")
    assert (response.status_code, response.json()["redis"]) == (503, "error: TimeoutError")
    assert time.monotonic() - started < 1.0


def test_healthz_needing_only_the_database_is_503_when_the_database_fails(client, monkeypatch):
    def broken() -> None:
        raise OperationalError("connection refused")

    monkeypatch.setattr(api, "_database_ping", broken)
    response = client.get("/healthz?need=database")
    assert (response.status_code, response.json()["database"]) == (503, "error: OperationalError")


# --------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------


def test_createtoken_prints_a_secret_that_works(capsys, other_user, room):
    call_command("createtoken", "bob", "--name", "ci bot")
    secret = capsys.readouterr().out.strip()
    assert Client().get("/api/rooms/", headers=bearer(secret)).status_code == 200
    assert ApiToken.objects.get().name == "ci bot"


def test_createtoken_for_an_unknown_user_says_so():
    with pytest.raises(CommandError, match='no user "ghost"'):
        call_command("createtoken", "ghost", "--name", "x")
    assert not ApiToken.objects.exists()


# --------------------------------------------------------------------------
# Across paths, and the long-poll
# --------------------------------------------------------------------------


@pytest.fixture
def poll_reads(monkeypatch) -> list[int]:
    """The `after` of each database read the polls made (a poll reads, then waits)."""
    reads: list[int] = []
    read = api._messages_after

    def counted(room, after):
        data = read(room, after)
        reads.append(after)
        return data

    monkeypatch.setattr(api, "_messages_after", counted)
    return reads


async def polls_waiting(room, count: int, timeout: float = 5) -> None:
    """Wait until `count` polls of the room are subscribed and past their read of the database: they now wait."""
    hub = fanout.hub()
    await eventually(lambda: sum(watch.waiting for watch in hub.waiters.get(room.pk, ())) >= count, timeout)


async def api_post(secret: str, slug: str, body: str, nonce: str):
    return await AsyncClient().post(
        f"/api/rooms/{slug}/messages", {"body": body, "nonce": nonce}, "application/json", headers=bearer(secret)
    )


async def test_a_message_posted_through_the_api_reaches_websockets(ws_connect, user, bob_secret, room):
    alice = await joined(ws_connect, user, room)
    response = await api_post(bob_secret, "general", "from the api", "api-1")
    assert response.status_code == 201
    frame = await receive(alice)
    assert frame["type"] == "message" and frame["message"] == response.json()


async def poll(secret: str, query: str):
    return await AsyncClient().get(f"/api/rooms/general/poll?{query}", headers=bearer(secret))


async def test_poll_answers_at_once_when_newer_messages_exist(user, bob_secret, room):
    for i in range(3):
        await database_sync_to_async(services.message_create)(room=room, author=user, body=f"m{i}")
    started = time.monotonic()
    response = await poll(bob_secret, "after=1&timeout=10")
    assert time.monotonic() - started < 2
    data = response.json()
    assert ([m["seq"] for m in data["messages"]], data["last_seq"], data["has_more"]) == ([2, 3], 3, False)


async def test_poll_returns_within_a_second_of_a_websocket_send(ws_connect, user, bob_secret, room):
    alice = await joined(ws_connect, user, room)
    waiting = asyncio.ensure_future(poll(bob_secret, "after=0&timeout=20"))
    await polls_waiting(room, 1)
    assert not waiting.done()
    await send(alice, type="send", body="wake up", nonce="ws-1")
    sent_at = time.monotonic()
    response = await asyncio.wait_for(waiting, 5)
    assert time.monotonic() - sent_at < 1
    assert [m["body"] for m in response.json()["messages"]] == ["wake up"]


async def test_poll_returns_empty_with_the_last_seq_when_the_timeout_runs_out(user, bob_secret, room):
    await database_sync_to_async(services.message_create)(room=room, author=user, body="old")
    started = time.monotonic()
    response = await poll(bob_secret, "after=1&timeout=1")
    assert 1 <= time.monotonic() - started < 3
    assert response.json() == {"messages": [], "has_more": False, "last_seq": 1}


@pytest.mark.parametrize("query", ["timeout=0", "timeout=31", "after=-1", "timeout=abc"])
async def test_poll_with_bad_parameters_is_400(bob_secret, room, query):
    response = await poll(bob_secret, query)
    assert (response.status_code, response.json()["error"]["code"]) == (400, "invalid_param")


async def test_poll_without_credentials_is_401(room):
    response = await AsyncClient().get("/api/rooms/general/poll?timeout=1")
    assert (response.status_code, response.json()["error"]["code"]) == (401, "not_authenticated")


async def test_polls_to_a_room_you_cannot_see_count_against_the_rate_limit(bob_secret, room, settings):
    settings.CHAT_API_REQUESTS_PER_MINUTE = 1
    unknown = await AsyncClient().get("/api/rooms/no-such-room/poll?timeout=1", headers=bearer(bob_secret))
    assert (unknown.status_code, unknown.json()["error"]["code"]) == (404, "room_not_found")
    over = await poll(bob_secret, "timeout=1")
    assert (over.status_code, over.json()["error"]["code"]) == (429, "rate_limited")


async def test_a_polls_database_work_runs_on_the_one_poll_thread_which_never_waits_on_redis(
    user, bob_secret, room, monkeypatch
):
    threads: set[str] = set()
    readable = selectors.room_readable

    def noted(**kwargs):
        threads.add(threading.current_thread().name)
        return readable(**kwargs)

    def blocking_rate_limit(*args, **kwargs):
        raise AssertionError("a poll counted its rate from a thread")

    await database_sync_to_async(services.message_create)(room=room, author=user, body="there")
    monkeypatch.setattr(selectors, "room_readable", noted)
    monkeypatch.setattr(ephemeral, "rate_limit", blocking_rate_limit)
    responses = await asyncio.gather(*(poll(bob_secret, "after=0&timeout=1") for _ in range(20)))
    assert {r.status_code for r in responses} == {200}
    assert {len(r.json()["messages"]) for r in responses} == {1}
    assert threads == {"poll-db_0"}


@pytest.mark.slow
async def test_two_hundred_concurrent_polls_all_get_the_one_message(user, bob_secret, room):
    polls = [asyncio.ensure_future(poll(bob_secret, "after=0&timeout=20")) for _ in range(200)]
    await polls_waiting(room, 200, timeout=20)
    assert not any(p.done() for p in polls)
    await api_post(bob_secret, "general", "to everyone", "fan-1")
    responses = await asyncio.wait_for(asyncio.gather(*polls), 15)
    assert {tuple(m["body"] for m in r.json()["messages"]) for r in responses} == {("to everyone",)}
    assert await database_sync_to_async(Message.objects.count)() == 1


async def test_a_poll_at_the_hubs_position_waits_without_reading_the_database(
    poll_reads, ws_connect, user, bob_secret, room
):
    # Alice's socket has the hub following the room at seq 1: a poll that has 1 needs no read.
    await database_sync_to_async(services.message_create)(room=room, author=user, body="seen")
    alice = await joined(ws_connect, user, room)
    behind = await poll(bob_secret, "after=0&timeout=20")
    assert [m["body"] for m in behind.json()["messages"]] == ["seen"] and poll_reads == [0]
    waiting = asyncio.ensure_future(poll(bob_secret, "after=1&timeout=20"))
    await polls_waiting(room, 1)
    assert poll_reads == [0]  # no read for the second poll
    await send(alice, type="send", body="next", nonce="ws-2")
    response = await asyncio.wait_for(waiting, 5)
    assert [(m["seq"], m["body"]) for m in response.json()["messages"]] == [(2, "next")]
    assert response.json()["last_seq"] == 2 and poll_reads == [0]


async def test_a_non_member_gets_nothing_of_a_private_room_whose_position_the_hub_knows(
    ws_connect, user, third_user, private_room
):
    await database_sync_to_async(services.message_create)(room=private_room, author=user, body="members only")
    await joined(ws_connect, user, private_room)  # the hub follows the room: a resume or poll at seq 1 reads nothing
    hub = fanout.hub()
    assert hub.settled_at(private_room.pk, 1, None) is not None
    _, connected = await ws_connect(third_user, private_room, after=1)
    assert not connected
    carol = AsyncClient()
    await carol.aforce_login(third_user)
    response = await carol.get(f"/api/rooms/{private_room.slug}/poll?after=1&timeout=1")
    assert (response.status_code, response.json()["error"]["code"]) == (404, "room_not_found")
    assert len(hub.waiters.get(private_room.pk, ())) == 0 and len(hub.rooms[private_room.pk]) == 1


def seqs(messages) -> list[int] | None:
    return None if messages is None else [m["seq"] for m in messages]


@pytest.mark.parametrize(
    ("published", "after", "expected"),
    [
        ([3, 4], 2, [3, 4]),
        ([4, 3], 2, [3, 4]),  # two publishers crossed: still in order
        ([3, 3, 4], 2, [3, 4]),  # nothing twice
        ([1, 3], 2, [3]),  # already held
        ([4], 2, None),  # 3 is missing: read the database
        ([3, 5], 2, None),
    ],
)
def test_a_woken_poll_answers_from_the_published_messages_only_without_a_hole(published, after, expected):
    assert seqs(longpoll.followers([{"seq": seq} for seq in published], after)) == expected


async def test_a_poll_woken_out_of_order_reads_the_database(poll_reads, user, bob_secret, room, monkeypatch):
    # seq 1 is committed but its publish is lost; seq 2 wakes the poll, which must not skip 1.
    monkeypatch.setattr(realtime, "publish_message", lambda message: None)
    waiting = asyncio.ensure_future(poll(bob_secret, "after=0&timeout=20"))
    await polls_waiting(room, 1)
    await database_sync_to_async(services.message_create)(room=room, author=user, body="lost publish")
    monkeypatch.undo()
    await database_sync_to_async(services.message_create)(room=room, author=user, body="published")
    response = await asyncio.wait_for(waiting, 5)
    assert [m["body"] for m in response.json()["messages"]] == ["lost publish", "published"]


# --------------------------------------------------------------------------
# Every endpoint, every generic error
# --------------------------------------------------------------------------

ENDPOINTS = [
    ("get", "/api/rooms/", None),
    ("post", "/api/rooms/", {"name": "New room"}),
    ("post", "/api/dms/", {"username": "bob"}),
    ("get", "/api/rooms/general/messages", None),
    ("post", "/api/rooms/general/messages", {"body": "hi"}),
    ("get", "/api/rooms/general/messages/{id}", None),
    ("patch", "/api/rooms/general/messages/{id}", {"body": "edited"}),
    ("delete", "/api/rooms/general/messages/{id}", None),
    ("post", "/api/rooms/general/messages/{id}/reactions/", {"emoji": "👍"}),
    ("put", "/api/rooms/general/messages/{id}/pin", None),
    ("delete", "/api/rooms/general/messages/{id}/pin", None),
    ("get", "/api/rooms/general/pins", None),
    ("get", "/api/rooms/general/reads", None),
    ("get", "/api/rooms/general/poll?timeout=1", None),
    ("get", "/api/rooms/general/members", None),
    ("patch", "/api/rooms/general/membership/", {"notify": "all"}),
    ("get", "/api/mentions/", None),
    ("get", "/api/search/?q=hello", None),
    ("post", "/api/rooms/general/files/", None),
]
# Most specific first: the first key found in the path wins.
WRONG_METHOD = {
    "reactions": "get", "/pins": "post", "/pin": "patch", "{id}": "put", "poll": "post", "messages": "put",
    "dms": "get", "reads": "post", "membership": "post", "members": "post", "mentions": "post", "search": "post",
    "files": "get", "/api/rooms/": "delete",
}  # fmt: skip


def call(client: Client, method: str, url: str, data, **kwargs):
    if data is None:
        return getattr(client, method)(url, **kwargs)
    return getattr(client, method)(url, json.dumps(data), "application/json", **kwargs)


@pytest.fixture
def own_message(user, room) -> Message:
    return services.message_create(room=room, author=user, body="mine")[0]


def no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    keys = [key for key, _ in pairs]
    assert len(keys) == len(set(keys)), f"duplicate keys: {keys}"
    return dict(pairs)


def schema_path(path: str) -> str:
    """ENDPOINTS' path as the schema names it: /api/rooms/{slug}/messages/{message_id}."""
    return path.split("?")[0].replace("general", "{slug}").replace("{id}", "{message_id}")


def test_the_openapi_schema_describes_every_endpoint_its_errors_and_both_ways_of_signing_in(client):
    response = client.get("/api/openapi.json")
    assert response.status_code == 200 and response["Content-Type"] == "application/json"
    schema = json.loads(response.content, object_pairs_hook=no_duplicate_keys)  # Swagger UI refuses duplicates
    assert schema["openapi"].startswith("3.1")
    # Stateful clients (and Schemathesis) follow these links from a post to its message.
    created = schema["paths"]["/api/rooms/{slug}/messages"]["post"]["responses"]["201"]
    assert set(created["links"]) == {
        "message_get", "message_edit", "message_delete", "message_react", "message_pin", "message_unpin"
    }  # fmt: skip
    assert created["links"]["message_get"]["parameters"] == {
        "slug": "$request.path.slug",
        "message_id": "$response.body#/id",
    }
    operations = {(method, path) for path, methods in schema["paths"].items() for method in methods}
    documented = {(method, schema_path(path)) for method, path, _ in ENDPOINTS}
    assert operations == documented
    schemes = schema["components"]["securitySchemes"]
    assert schemes["BearerToken"] == {
        "type": "http",
        "scheme": "bearer",
        "description": schemes["BearerToken"]["description"],
    }
    assert (schemes["SessionCookie"]["in"], schemes["SessionCookie"]["name"]) == ("cookie", "sessionid")
    assert (schemes["CsrfToken"]["in"], schemes["CsrfToken"]["name"]) == ("header", "X-CSRFToken")
    error_shape = schema["components"]["schemas"]["ErrorOut"]
    assert error_shape["required"] == ["error"]
    for path, methods in schema["paths"].items():
        for method, operation in methods.items():
            session = {"SessionCookie": []} if method == "get" else {"SessionCookie": [], "CsrfToken": []}
            assert operation["security"] == [{"BearerToken": []}, session], (method, path)
            assert set(operation["responses"]["429"]["headers"]) == {"Retry-After"}, (method, path)
            for status in ("400", "401", "405", "429", "503"):
                content = operation["responses"][status]["content"]["application/json"]["schema"]
                assert content == {"$ref": "#/components/schemas/ErrorOut"}, (method, path, status)


def test_the_api_docs_page_is_served_without_signing_in(client):
    response = client.get("/api/docs")
    assert response.status_code == 200
    page = response.content.decode()
    assert "/static/ninja/swagger-ui-bundle.js" in page and "/api/openapi.json" in page
    assert "cdn" not in page.lower()


@pytest.mark.parametrize(("method", "path", "data"), ENDPOINTS)
def test_every_endpoint_answers_401_without_credentials(method, path, data, own_message):
    response = call(Client(), method, path.format(id=own_message.pk), data)
    assert error_of(response) == (401, "not_authenticated")
    assert Message.objects.get() == own_message and Room.objects.count() == 1


@pytest.mark.parametrize(("method", "path", "data"), ENDPOINTS)
def test_every_endpoint_answers_405_to_a_wrong_method(alice_api, method, path, data, own_message):
    wrong = next(verb for key, verb in WRONG_METHOD.items() if key in path)
    response = call(alice_api, wrong, path.format(id=own_message.pk), None)
    assert error_of(response) == (405, "method_not_allowed")
    assert wrong.upper() not in response["Allow"]


@pytest.mark.parametrize(("method", "path", "data"), ENDPOINTS)
def test_every_endpoint_answers_429_over_the_rate_limit(
    alice_api, settings, monkeypatch, method, path, data, own_message
):
    settings.CHAT_API_REQUESTS_PER_MINUTE = 0  # this user's next request is over the limit
    # The limit is counted in Redis, and skipped for a second after Redis fails to answer (it fails
    # open). A publish that timed out while the fixtures saved own_message must not skip it here.
    monkeypatch.setattr(ephemeral, "_away_until", 0.0)
    response = call(alice_api, method, path.format(id=own_message.pk), data)
    assert error_of(response) == (429, "rate_limited")
    assert int(response["Retry-After"]) >= 1
    assert Message.objects.get().body == "mine" and Room.objects.count() == 1


@pytest.mark.parametrize(
    ("method", "path", "data"), [e for e in ENDPOINTS if e[0] in ("post", "patch") and e[2] is not None]
)  # the upload's own limit is tests/test_files.py's
def test_every_write_answers_413_to_a_request_over_64_kib(alice_api, method, path, data, own_message):
    response = call(alice_api, method, path.format(id=own_message.pk), {**data, "padding": "p" * 65 * 1024})
    assert error_of(response) == (413, "request_too_large")
    assert Message.objects.get().body == "mine" and Room.objects.count() == 1


def test_healthz_is_503_and_names_the_database_when_it_fails(client, monkeypatch):
    def broken() -> None:
        raise OperationalError("connection refused")

    monkeypatch.setattr(api, "_database_ping", broken)
    response = client.get("/healthz")
    assert response.status_code == 503
    assert response.json() == {"database": "error: OperationalError", "redis": "ok"}


def test_a_token_made_in_the_admin_shows_its_secret_once(admin_client, other_user):
    response = admin_client.post(
        "/admin/chat/apitoken/add/", {"user": other_user.pk, "name": "from the admin"}, follow=True
    )
    shown = re.search(r"chat_[A-Za-z0-9_-]{20,}", response.content.decode()).group(0)
    token = ApiToken.objects.get()
    assert token.name == "from the admin" and shown.startswith(token.prefix)
    assert Client().get("/api/rooms/", headers=bearer(shown)).status_code == 200
    change_page = admin_client.get(f"/admin/chat/apitoken/{token.pk}/change/").content.decode()
    assert shown not in change_page


def test_reading_a_room_through_the_api_joins_nothing(bob_secret, other_user, room):
    for path in (f"/api/rooms/{room.slug}/messages", f"/api/rooms/{room.slug}/poll?timeout=1", "/api/rooms/"):
        assert Client().get(path, headers=bearer(bob_secret)).status_code == 200
    assert Membership.objects.filter(user=other_user).count() == 0
