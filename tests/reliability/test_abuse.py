"""No one let in, nothing stored twice, no input that takes a socket or a server down.

Real Redis, real database; the tests that need them start real server processes (uvicorn, as the README runs it).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from unittest import mock

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.contrib.sessions.models import Session
from django.test import Client
from django.utils import timezone
from websockets.exceptions import ConnectionClosed

from chat import ephemeral, protocol, services
from chat.models import Message
from chatsite.asgi import application
from tests.helpers import ORIGIN, joined, receive, send, session_cookie
from tests.servers import FRAME_TIMEOUT

pytestmark = pytest.mark.django_db(transaction=True)


# --------------------------------------------------------------------------
# 4. One nonce, five sends, two sockets, two processes
# --------------------------------------------------------------------------


@pytest.mark.slow
async def test_the_same_nonce_five_times_at_once_stores_one_row_and_acknowledges_one_id(
    cluster, sockets, user, room, alice_cookie
):
    server1, server2 = await cluster.start(2)
    first, _, _ = await sockets.join(server1, alice_cookie, room.slug)
    second, _, _ = await sockets.join(server2, alice_cookie, room.slug)
    frame = json.dumps({"type": "send", "body": "exactly once", "nonce": "the-same-nonce"})
    await asyncio.gather(*(ws.send(frame) for ws in (first, second, first, second, first)))

    acknowledged = []
    for ws in (first, second):
        deadline = time.monotonic() + 2
        while (left := deadline - time.monotonic()) > 0:
            try:
                reply = json.loads(await asyncio.wait_for(ws.recv(), left))
            except TimeoutError:
                break
            if reply["type"] == "message":
                acknowledged.append(reply["message"]["id"])
            else:
                assert reply["type"] == "presence", reply
    rows = await database_sync_to_async(lambda: list(Message.objects.values_list("id", flat=True)))()
    assert len(rows) == 1
    # One broadcast reaching both sockets, and one answer to each of the four retries.
    assert acknowledged == [rows[0]] * 6


# --------------------------------------------------------------------------
# 5. Origins and sessions
# --------------------------------------------------------------------------


@pytest.mark.parametrize("origin", ["http://evil.example", None, "null", "http://localhost.evil.example"])
async def test_a_foreign_missing_or_null_origin_is_refused(ws_connect, user, room, origin):
    _, connected = await ws_connect(user, room, origin=origin)
    assert not connected


async def test_the_sites_own_origin_is_accepted(ws_connect, user, room):
    _, connected = await ws_connect(user, room, origin=ORIGIN)
    assert connected


async def test_anonymous_and_expired_sessions_are_refused(ws_connect, user, room):
    _, connected = await ws_connect(None, room)
    assert not connected
    cookie = await database_sync_to_async(session_cookie)(user)
    await database_sync_to_async(Session.objects.filter(session_key=cookie).update)(
        expire_date=timezone.now() - timedelta(seconds=1)
    )
    communicator = await socket_with_cookie(cookie, room.slug)
    connected, _ = await communicator.connect(timeout=5)
    assert not connected


async def socket_with_cookie(cookie: str, slug: str) -> WebsocketCommunicator:
    headers = [(b"origin", ORIGIN.encode()), (b"cookie", f"{settings.SESSION_COOKIE_NAME}={cookie}".encode())]
    return WebsocketCommunicator(application, f"/ws/rooms/{slug}/", headers=headers)


# --------------------------------------------------------------------------
# 6. Private rooms, on every path
# --------------------------------------------------------------------------


async def test_a_non_member_is_refused_a_private_room_on_every_path(ws_connect, user, third_user, private_room):
    await database_sync_to_async(services.message_create)(room=private_room, author=user, body="members only")
    for query in ({}, {"after": 0}, {"after": 0, "changes_after": 0}):  # live, resume, resume with changes
        _, connected = await ws_connect(third_user, private_room, **query)
        assert not connected

    def http_paths() -> list[int]:
        carol = Client()
        carol.force_login(third_user)
        return [
            carol.get(f"/rooms/{private_room.slug}/").status_code,
            carol.get(f"/api/rooms/{private_room.slug}/messages").status_code,
            carol.get(f"/api/rooms/{private_room.slug}/messages?after=0").status_code,
            carol.post(f"/api/rooms/{private_room.slug}/messages", {"body": "x"}, "application/json").status_code,
        ]

    assert await database_sync_to_async(http_paths)() == [404, 404, 404, 404]
    assert "secret" not in await database_sync_to_async(lambda: Client().get("/").content.decode())()


async def test_a_removed_member_stops_receiving_within_a_second(ws_connect, user, other_user, private_room):
    alice = await joined(ws_connect, user, private_room)
    bob = await joined(ws_connect, other_user, private_room)
    await database_sync_to_async(services.member_remove)(room=private_room, actor=user, username=other_user.username)
    assert (await receive(bob, timeout=1))["code"] == "removed"
    assert (await bob.receive_output(timeout=1))["type"] == "websocket.close"
    await send(alice, type="send", body="after the removal")
    assert (await receive(alice))["message"]["body"] == "after the removal"


# --------------------------------------------------------------------------
# 7. Oversized input
# --------------------------------------------------------------------------


async def test_a_frame_just_over_64_kib_gets_an_error_and_the_socket_works_on(ws_connect, user, room):
    alice = await joined(ws_connect, user, room)
    too_big = json.dumps({"type": "send", "body": "x" * settings.CHAT_FRAME_MAX_BYTES})
    assert len(too_big.encode()) > settings.CHAT_FRAME_MAX_BYTES
    await alice.send_to(text_data=too_big)
    assert (await receive(alice))["code"] == "frame_too_large"
    await send(alice, type="send", body="still here", nonce="n-1")
    assert (await receive(alice))["message"]["body"] == "still here"


@pytest.mark.slow
async def test_a_frame_over_the_servers_maximum_is_refused_and_the_server_stays_healthy(
    cluster, sockets, user, room, alice_cookie
):
    (server,) = await cluster.start(1)
    ws, _, _ = await sockets.join(server, alice_cookie, room.slug)
    # Refused unread: as soon as the frame's header gives its length, the server fails the
    # connection with 1009 ("message too big") and closes it with the rest of the 2 MiB unread.
    # The client, perhaps still writing them, may then see the reset before the close frame.
    with pytest.raises(ConnectionClosed) as closed:
        await ws.send("x" * (2 * 1024 * 1024))  # over the 1 MiB the server accepts
        while True:
            await asyncio.wait_for(ws.recv(), FRAME_TIMEOUT)  # a frame taken in would time out here
    assert closed.value.rcvd is None or closed.value.rcvd.code == 1009, closed.value
    fresh, _, _ = await sockets.join(server, alice_cookie, room.slug)
    await sockets.send(fresh, "the server still works")
    after = await sockets.recv_message(fresh, "a message after the oversized frame")
    assert after["body"] == "the server still works"


# --------------------------------------------------------------------------
# 9. A flood
# --------------------------------------------------------------------------


@pytest.mark.slow
async def test_a_flooding_user_is_throttled_and_the_others_still_get_through(
    cluster, sockets, user, other_user, third_user, room, alice_cookie, bob_cookie
):
    limit, window = 50, 10  # above the 43 each measuring user sends
    cluster.env.update(CHAT_MESSAGE_RATE_LIMIT=str(limit), CHAT_MESSAGE_RATE_WINDOW=str(window))
    (server,) = await cluster.start(1)
    flooder, _, _ = await sockets.join(server, alice_cookie, room.slug)
    bob, _, _ = await sockets.join(server, bob_cookie, room.slug)
    carol_cookie = await database_sync_to_async(session_cookie)(third_user)
    carol, _, _ = await sockets.join(server, carol_cookie, room.slug)
    watcher, _, _ = await sockets.join(server, alice_cookie, room.slug)

    async def latencies(sender, count: int) -> list[float]:
        """Milliseconds from a send to the watcher seeing it, for `count` messages 80 ms apart (under the limit)."""
        measured = []
        for n in range(count):
            body = f"{n} {uuid.uuid4().hex}"
            sent = time.perf_counter()
            await sockets.send(sender, body)
            while True:
                frame = await sockets.recv(watcher, f"message {n} of the other user")
                if frame["type"] == "message" and frame["message"]["body"] == body:
                    measured.append((time.perf_counter() - sent) * 1000)
                    break
            await asyncio.sleep(0.08)  # the scenario: a person's pace, under the limit
        return measured

    await latencies(bob, 3)  # the first messages pay for warming up, flood or not
    quiet = await latencies(bob, 40)

    replies: list[dict] = []

    async def flood() -> None:
        for n in range(500):  # 100 a second for 5 s
            await flooder.send(json.dumps({"type": "send", "body": f"flood {n}", "nonce": f"flood-{n}"}))
            await asyncio.sleep(0.01)  # the scenario: the flood's pace

    async def read_flooder() -> None:
        with pytest.raises(TimeoutError):
            while True:
                replies.append(json.loads(await asyncio.wait_for(flooder.recv(), 3)))

    flooding = asyncio.gather(flood(), read_flooder())
    # Measure once the flood is in full swing: the flooder is being refused.
    async with asyncio.timeout(FRAME_TIMEOUT):
        while not any(r["type"] == "error" and r["code"] == "rate_limited" for r in replies):
            await asyncio.sleep(0.01)  # polling the replies until the deadline
    loud = await latencies(carol, 40)  # within the 5 s of flood
    await flooding

    stored = await database_sync_to_async(Message.objects.filter(author=user).count)()
    refused = [r for r in replies if r["type"] == "error" and r["code"] == "rate_limited"]
    assert stored <= limit
    assert len(refused) >= 500 - limit and all(1 <= r["retry_after"] <= window for r in refused)
    quiet_p95, loud_p95 = percentile(quiet, 95), percentile(loud, 95)
    # Twice the quiet figure (~6 ms here), with a floor of 10 ms for timer noise at this scale.
    print(f"\n[flood] quiet p95 {quiet_p95:.1f} ms, flooded p95 {loud_p95:.1f} ms")
    assert loud_p95 < max(2 * quiet_p95, 10.0), (quiet, loud)


def percentile(values: list[float], p: int) -> float:
    return statistics.quantiles(values, n=100)[p - 1]


# --------------------------------------------------------------------------
# Limits, and signing out
# --------------------------------------------------------------------------


async def test_messages_over_the_rate_limit_get_an_error_with_retry_after_and_are_not_stored(
    ws_connect, user, room, settings
):
    settings.CHAT_MESSAGE_RATE_LIMIT, settings.CHAT_MESSAGE_RATE_WINDOW = 3, 10
    alice = await joined(ws_connect, user, room)
    for n in range(4):
        await send(alice, type="send", body=f"m{n}", nonce=f"n{n}")
    frames = [await receive(alice) for _ in range(4)]
    assert [f["type"] for f in frames].count("message") == 3
    refused = next(f for f in frames if f["type"] == "error")
    assert (refused["code"], refused["nonce"]) == ("rate_limited", "n3")
    assert 1 <= refused["retry_after"] <= 10
    assert await database_sync_to_async(Message.objects.count)() == 3

    def api_post():
        client = Client()
        client.force_login(user)
        return client.post(f"/api/rooms/{room.slug}/messages", {"body": "via the API"}, "application/json")

    response = await database_sync_to_async(api_post)()  # the same limit on every path
    assert response.status_code == 429 and 1 <= int(response["Retry-After"]) <= 10
    assert response.json()["error"]["code"] == "rate_limited"


async def test_a_sends_bad_body_counts_nothing_against_the_rate_and_the_count_is_made_on_the_event_loop(
    ws_connect, user, room, settings, monkeypatch
):
    settings.CHAT_MESSAGE_RATE_LIMIT, settings.CHAT_MESSAGE_RATE_WINDOW = 2, 10
    # The database thread makes no Redis round trip for a socket's send (docs/performance.md).
    monkeypatch.setattr(ephemeral, "rate_limit", mock.Mock(side_effect=AssertionError("counted in the thread")))
    alice = await joined(ws_connect, user, room)
    for n in range(3):
        await send(alice, type="send", body="", nonce=f"bad{n}")
        assert (await receive(alice))["code"] == "empty_body"
    for n in range(3):
        await send(alice, type="send", body=f"m{n}", nonce=f"n{n}")
    frames = [await receive(alice) for _ in range(3)]
    assert sorted(f["message"]["nonce"] for f in frames if f["type"] == "message") == ["n0", "n1"]
    assert [(f["code"], f["nonce"]) for f in frames if f["type"] == "error"] == [("rate_limited", "n2")]
    assert await database_sync_to_async(Message.objects.count)() == 2


async def test_a_user_can_open_only_so_many_sockets(ws_connect, user, room, settings):
    settings.CHAT_MAX_SOCKETS_PER_USER = 2
    first = await joined(ws_connect, user, room)
    await joined(ws_connect, user, room)
    third, connected = await ws_connect(user, room)
    assert connected  # accepted only to say why
    assert (await receive(third))["code"] == "too_many_sockets"
    assert await third.receive_output(timeout=2) == {"type": "websocket.close", "code": protocol.CLOSE_TOO_MANY_SOCKETS}
    await first.disconnect()
    await joined(ws_connect, user, room)  # a slot is free again


async def test_signing_out_closes_that_sessions_sockets_and_the_session_cannot_reconnect(ws_connect, user, room):
    browser = Client()
    await database_sync_to_async(browser.force_login)(user)
    cookie = browser.cookies[settings.SESSION_COOKIE_NAME].value
    signed_in = await socket_with_cookie(cookie, room.slug)
    assert (await signed_in.connect(timeout=5))[0]
    while (await receive(signed_in))["type"] != "ready":
        pass
    other_device = await joined(ws_connect, user, room)  # another session of the same user

    started = time.monotonic()
    assert (await database_sync_to_async(browser.post)("/accounts/logout/")).status_code == 302
    assert await receive(signed_in, timeout=5) == json.loads(protocol.signed_out_frame())
    assert await signed_in.receive_output(timeout=5) == {"type": "websocket.close", "code": protocol.CLOSE_SIGNED_OUT}
    assert time.monotonic() - started < 5
    again = await socket_with_cookie(cookie, room.slug)
    assert not (await again.connect(timeout=5))[0]
    await send(other_device, type="send", body="still signed in elsewhere")
    assert (await receive(other_device))["message"]["body"] == "still signed in elsewhere"


# --------------------------------------------------------------------------
# 12. Production settings
# --------------------------------------------------------------------------


def test_production_settings_pass_the_deploy_check():
    env = {
        **os.environ,
        "DEBUG": "0",
        "HTTPS": "1",
        "SECRET_KEY": secrets.token_urlsafe(64),
        "ALLOWED_HOSTS": "chat.example.com",
        "DATABASE_URL": "sqlite:///" + str(settings.BASE_DIR / "var" / "deploy-check.sqlite3"),
    }
    done = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=settings.BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_pages_forbid_inline_script(client):
    policy = client.get("/accounts/login/")["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy.split("script-src")[1].split(";")[0]
