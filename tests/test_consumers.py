"""The WebSocket protocol through the full ASGI stack, on the real Redis pub/sub layer."""

from __future__ import annotations

import asyncio
import json
import uuid

import channels.auth
import pytest
import redis
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.contrib.sessions.models import Session
from django.db import OperationalError
from django.test import Client
from uvicorn.protocols.utils import ClientDisconnected

from chat import database, ephemeral, fanout, protocol, realtime, selectors, services
from chat.models import Membership, Message, Room
from chatsite.asgi import application
from tests.helpers import ORIGIN, joined, receive, receive_until_ready, send, session_cookie, silent

pytestmark = pytest.mark.django_db(transaction=True)


async def post(room, author, body: str, nonce: str | None = None) -> Message:
    message, _ = await database_sync_to_async(services.message_create)(room=room, author=author, body=body, nonce=nonce)
    return message


def test_tests_use_the_redis_pubsub_layer():
    backend = settings.CHANNEL_LAYERS["default"]["BACKEND"]
    assert backend == "channels_redis.pubsub.RedisPubSubChannelLayer"
    assert settings.CHANNEL_LAYERS["default"]["CONFIG"]["prefix"].startswith("test-")


async def test_both_sockets_in_a_room_receive_and_another_room_does_not(ws_connect, user, other_user, room, other_room):
    alice = await joined(ws_connect, user, room, after=0)
    bob = await joined(ws_connect, other_user, room, after=0)
    outsider = await joined(ws_connect, other_user, other_room, after=0)

    await send(alice, type="send", body="hello room", nonce="n-1")

    for communicator in (alice, bob):
        frame = await receive(communicator)
        assert frame["type"] == "message"
        assert frame["message"]["body"] == "hello room"
        assert frame["message"]["seq"] == 1
        assert frame["message"]["author"] == "alice"
        assert frame["message"]["room"] == "general"
        assert frame["message"]["nonce"] == "n-1"
    assert await silent(outsider, 0.5)


async def test_sender_gets_its_own_message_back_exactly_once(ws_connect, user, room):
    alice = await joined(ws_connect, user, room)
    await send(alice, type="send", body="echo", nonce="n-echo")
    frame = await receive(alice)
    assert frame["message"]["body"] == "echo"
    assert await silent(alice, 0.5)


async def test_message_is_in_the_database_before_any_socket_sees_it(ws_connect, user, other_user, room):
    seen_in_db: list[bool] = []

    async def checking_app(scope, receive, send):
        """The site's ASGI app, checking the database as each message frame leaves for the socket."""

        async def checked_send(event):
            if event["type"] == "websocket.send" and (frame := json.loads(event["text"]))["type"] == "message":
                query = Message.objects.filter(pk=frame["message"]["id"]).exists
                seen_in_db.append(await database_sync_to_async(query)())
            await send(event)

        await application(scope, receive, checked_send)

    bob = await joined(ws_connect, other_user, room, app=checking_app)
    alice = await joined(ws_connect, user, room, app=checking_app)
    await send(alice, type="send", body="persisted first")
    await receive(alice)
    await receive(bob)
    assert seen_in_db == [True, True]


async def test_message_frame_carries_the_shared_message_object(ws_connect, user, room):
    alice = await joined(ws_connect, user, room)
    await send(alice, type="send", body="shape")
    frame = await receive(alice)
    stored = await database_sync_to_async(Message.objects.select_related("room", "author").get)()
    assert frame == {"type": "message", "message": await database_sync_to_async(message_payload_of)(stored)}
    assert frame["message"]["created_at"].endswith("Z")
    assert set(frame["message"]) == {
        "id",
        "seq",
        "room",
        "author",
        "body",
        "created_at",
        "edited_at",
        "deleted_at",
        "nonce",
        "system",
        "html",
        "reply_to",
        "reactions",
        "pinned_at",
        "mentions",
        "mentions_room",
        "attachments",
    }
    assert frame["message"]["system"] is False


def message_payload_of(message):
    from chat.protocol import message_payload

    return message_payload(message)


async def test_anonymous_handshake_is_refused(ws_connect, room):
    _, connected = await ws_connect(None, room)
    assert not connected


async def test_a_session_from_before_a_password_change_is_refused_and_ended(user, room):
    cookie = await database_sync_to_async(session_cookie)(user)
    user.set_password("a-new-password-456")  # Django's session auth hash no longer matches the old session
    await database_sync_to_async(user.save)()
    headers = [(b"origin", ORIGIN.encode()), (b"cookie", f"{settings.SESSION_COOKIE_NAME}={cookie}".encode())]
    connected, _ = await WebsocketCommunicator(application, f"/ws/rooms/{room.slug}/", headers=headers).connect()
    assert not connected
    assert not await database_sync_to_async(Session.objects.filter(session_key=cookie).exists)()


async def test_foreign_origin_handshake_is_refused(ws_connect, user, room):
    _, connected = await ws_connect(user, room, origin="http://evil.example")
    assert not connected


async def test_missing_origin_handshake_is_refused(ws_connect, user, room):
    _, connected = await ws_connect(user, room, origin=None)
    assert not connected


async def test_unknown_room_handshake_is_refused(ws_connect, user):
    _, connected = await ws_connect(user, "no-such-room")
    assert not connected


async def test_archived_room_handshake_is_refused(ws_connect, user, room):
    await database_sync_to_async(Room.objects.filter(pk=room.pk).update)(is_archived=True)
    _, connected = await ws_connect(user, room)
    assert not connected


BAD_FRAMES = [
    pytest.param({"text_data": "not json"}, "invalid_json", id="not-json"),
    pytest.param({"text_data": "[1, 2]"}, "invalid_frame", id="not-an-object"),
    pytest.param({"text_data": json.dumps({"type": "dance"})}, "unknown_type", id="unknown-type"),
    pytest.param({"text_data": json.dumps({"body": "no type"})}, "unknown_type", id="missing-type"),
    pytest.param({"text_data": json.dumps({"type": "send"})}, "missing_body", id="missing-body"),
    pytest.param({"text_data": json.dumps({"type": "send", "body": ""})}, "empty_body", id="empty-body"),
    pytest.param({"text_data": json.dumps({"type": "send", "body": "  \n "})}, "empty_body", id="blank-body"),
    pytest.param({"text_data": json.dumps({"type": "send", "body": 5})}, "invalid_body", id="body-not-text"),
    pytest.param({"text_data": json.dumps({"type": "send", "body": "x" * 4001})}, "body_too_long", id="body-4001"),
    # PostgreSQL refuses NUL in text, and no database can store half a surrogate pair.
    pytest.param({"text_data": json.dumps({"type": "send", "body": "a\u0000b"})}, "invalid_body", id="body-nul"),
    pytest.param({"text_data": '{"type": "send", "body": "a\\ud800b"}'}, "invalid_body", id="body-surrogate"),
    pytest.param(
        {"text_data": json.dumps({"type": "send", "body": "x", "nonce": "n\u0000"})}, "invalid_nonce", id="nonce-nul"
    ),
    pytest.param(
        {"text_data": json.dumps({"type": "send", "body": "x", "pad": "y" * 65536})}, "frame_too_large", id="frame-64k"
    ),
    pytest.param({"text_data": json.dumps({"type": "send", "body": "x", "nonce": 7})}, "invalid_nonce", id="bad-nonce"),
    pytest.param({"bytes_data": b"\x00\x01binary"}, "binary_frame", id="binary"),
    pytest.param(
        {"text_data": json.dumps({"type": "history", "before": "9", "limit": 5})}, "invalid_frame", id="history-str"
    ),
    pytest.param(
        {"text_data": json.dumps({"type": "history", "before": 9, "limit": 101})}, "invalid_frame", id="limit-101"
    ),
    pytest.param(
        {"text_data": json.dumps({"type": "history", "before": 9, "limit": 0})}, "invalid_frame", id="limit-0"
    ),
    pytest.param({"text_data": json.dumps({"type": "history", "limit": 5})}, "invalid_frame", id="history-no-before"),
    pytest.param(
        {"text_data": json.dumps({"type": "history", "before": True, "limit": 5})}, "invalid_frame", id="bool"
    ),
]


@pytest.mark.parametrize(("frame", "code"), BAD_FRAMES)
async def test_bad_frame_gets_an_error_frame_saves_nothing_and_socket_keeps_working(
    ws_connect, user, room, frame, code
):
    alice = await joined(ws_connect, user, room)
    await alice.send_to(**frame)

    error = await receive(alice)
    assert error["type"] == "error"
    assert error["code"] == code
    assert error["detail"]
    assert await database_sync_to_async(Message.objects.count)() == 0

    await send(alice, type="send", body="still here")
    follow_up = await receive(alice)
    assert follow_up["type"] == "message" and follow_up["message"]["body"] == "still here"
    assert follow_up["message"]["seq"] == 1  # the rejected frame used no seq


async def test_error_frame_echoes_the_nonce_of_the_rejected_send(ws_connect, user, room):
    alice = await joined(ws_connect, user, room)
    await send(alice, type="send", body="", nonce="client-7")
    error = await receive(alice)
    assert (error["code"], error["nonce"]) == ("empty_body", "client-7")


async def test_send_in_a_room_archived_after_connect_is_refused(ws_connect, user, room):
    alice = await joined(ws_connect, user, room)
    await database_sync_to_async(Room.objects.filter(pk=room.pk).update)(is_archived=True)
    await send(alice, type="send", body="too late", nonce="late")
    error = await receive(alice)
    assert (error["type"], error["code"], error["nonce"]) == ("error", "room_archived", "late")
    assert await database_sync_to_async(Message.objects.count)() == 0


async def test_failed_save_is_not_broadcast_and_sender_gets_an_error(ws_connect, user, other_user, room, monkeypatch):
    bob = await joined(ws_connect, other_user, room)
    alice = await joined(ws_connect, user, room)

    def broken_create(**kwargs):
        raise RuntimeError("database went away")

    monkeypatch.setattr(services, "message_create", broken_create)
    await send(alice, type="send", body="lost?", nonce="n-broken")
    error = await receive(alice)
    assert (error["type"], error["code"], error["nonce"]) == ("error", "not_saved", "n-broken")
    assert await silent(bob, 0.5)


def database_away(*args, **kwargs):
    raise OperationalError("connection to server at 127.0.0.1 failed: Connection refused")


async def test_while_the_database_is_away_each_frame_gets_an_error_and_the_socket_keeps_serving(
    ws_connect, user, other_user, room, monkeypatch
):
    monkeypatch.setattr(database, "_down", False)
    bob = await joined(ws_connect, other_user, room)
    alice = await joined(ws_connect, user, room)
    for module, name in ((services, "message_create"), (services, "read_mark"), (selectors, "message_list")):
        monkeypatch.setattr(module, name, database_away)

    await send(alice, type="send", body="later", nonce="n-away")
    assert await receive(alice) == {
        "type": "error", "code": "not_saved", "nonce": "n-away",
        "detail": "The message was not saved; send it again with the same nonce.",
    }  # fmt: skip
    for frame in ({"type": "history", "before": 5, "limit": 3}, {"type": "read", "seq": 1}):
        await send(alice, **frame)
        error = await receive(alice)
        assert (error["type"], error["code"], error["nonce"]) == ("error", "database_unavailable", None)
    assert await silent(bob, 0.3)

    monkeypatch.undo()  # the database is back: the same socket, the same nonce
    await send(alice, type="send", body="later", nonce="n-away")
    assert (await receive(alice))["message"]["nonce"] == "n-away"
    assert (await receive(bob))["message"]["body"] == "later"


@pytest.mark.parametrize("where", ["the user lookup", "the room lookup"])
async def test_a_handshake_while_the_database_is_away_is_told_unavailable_and_closed_with_1012(
    ws_connect, user, room, monkeypatch, where
):
    monkeypatch.setattr(database, "_down", False)
    if where == "the user lookup":  # in channels' AuthMiddleware, before any consumer runs
        monkeypatch.setattr(channels.auth, "get_user", database_sync_to_async(database_away))
    else:
        monkeypatch.setattr(selectors, "room_readable", database_away)
    alice, connected = await ws_connect(user, room)
    assert connected
    assert (await receive(alice))["code"] == "unavailable"
    assert await alice.receive_output(timeout=2) == {"type": "websocket.close", "code": protocol.CLOSE_SERVICE_RESTART}
    assert database._down

    monkeypatch.undo()
    await joined(ws_connect, user, room)


async def test_retried_nonce_answers_the_sender_with_the_original_and_stores_one_row(
    ws_connect, user, other_user, room
):
    bob = await joined(ws_connect, other_user, room)
    alice = await joined(ws_connect, user, room)
    await send(alice, type="send", body="only once", nonce="retry-me")
    original = await receive(alice)
    await receive(bob)

    await send(alice, type="send", body="only once", nonce="retry-me")
    retried = await receive(alice)

    assert retried == original
    assert await silent(bob, 0.5)  # the retry is not broadcast again
    assert await database_sync_to_async(Message.objects.count)() == 1


async def test_resume_after_seq_returns_only_missed_messages_then_ready(ws_connect, user, other_user, room):
    for n in range(1, 6):
        await post(room, user, f"message {n}")

    bob, connected = await ws_connect(other_user, room, after=2)
    assert connected
    replayed, ready = await receive_until_ready(bob)

    assert [frame["message"]["seq"] for frame in replayed] == [3, 4, 5]
    assert [frame["message"]["body"] for frame in replayed] == ["message 3", "message 4", "message 5"]
    assert ready == {"type": "ready", "last_seq": 5, "last_change": 0}

    await post(room, user, "live")
    live = await receive(bob)
    assert live["message"]["seq"] == 6
    assert await silent(bob, 0.5)


async def test_connect_without_after_sends_only_ready_with_the_rooms_last_seq(ws_connect, user, room):
    await post(room, user, "before")
    alice, _ = await ws_connect(user, room)
    replayed, ready = await receive_until_ready(alice)
    assert replayed == []
    assert ready["last_seq"] == 1


async def test_resume_of_more_than_the_limit_sends_newest_with_a_gap_frame(ws_connect, user, room, settings):
    settings.CHAT_RESUME_LIMIT = 3
    for n in range(1, 8):
        await post(room, user, f"m{n}")

    alice, _ = await ws_connect(user, room, after=1)
    replayed, ready = await receive_until_ready(alice)

    assert replayed[0] == {"type": "gap", "after": 1, "next_seq": 5}
    assert [frame["message"]["seq"] for frame in replayed[1:]] == [5, 6, 7]
    assert ready["last_seq"] == 7


async def test_resume_from_beyond_the_rooms_last_seq_still_receives_new_messages(ws_connect, user, room):
    await post(room, user, "only message")
    alice, _ = await ws_connect(user, room, after=40)
    replayed, ready = await receive_until_ready(alice)
    assert replayed == []
    assert ready["last_seq"] == 1  # the room's, so the client can tell it is ahead and start over
    await post(room, user, "next")
    assert (await receive(alice))["message"]["seq"] == 2


async def test_malformed_after_gets_an_error_and_the_socket_closes(ws_connect, user, room):
    alice, connected = await ws_connect(user, room, after="abc")
    assert connected
    error = await receive(alice)
    assert (error["type"], error["code"]) == ("error", "invalid_after")
    closing = await alice.receive_output(timeout=2)
    assert closing == {"type": "websocket.close", "code": protocol.CLOSE_BAD_REQUEST}


async def test_messages_committed_during_resume_are_delivered_exactly_once(
    ws_connect, user, other_user, room, monkeypatch
):
    """Messages committed around the catch-up query are neither lost nor doubled."""
    for n in range(1, 4):
        await post(room, user, f"old {n}")
    original_resume = selectors.message_resume

    def resume_while_someone_posts(**kwargs):
        # seq 4 commits (and is published) after the socket joined the group
        # but before the query, so it is in both the query and the stream;
        # seq 5 commits after the query, so only the stream has it.
        services.message_create(room=room, author=user, body="before the query")
        resume = original_resume(**kwargs)
        services.message_create(room=room, author=user, body="after the query")
        return resume

    monkeypatch.setattr(selectors, "message_resume", resume_while_someone_posts)
    bob, _ = await ws_connect(other_user, room, after=1)
    replayed, ready = await receive_until_ready(bob)
    monkeypatch.setattr(selectors, "message_resume", original_resume)

    assert [frame["message"]["seq"] for frame in replayed] == [2, 3, 4]
    assert ready["last_seq"] == 4
    assert (await receive(bob))["message"]["body"] == "after the query"
    await post(room, user, "later")
    assert (await receive(bob))["message"]["seq"] == 6
    assert await silent(bob, 0.5)


async def test_history_pages_backwards_in_seq_order(ws_connect, user, room):
    for n in range(1, 8):
        await post(room, user, f"m{n}")
    alice = await joined(ws_connect, user, room)

    await send(alice, type="history", before=8, limit=3)
    newest = await receive(alice)
    assert newest["type"] == "history"
    assert [m["seq"] for m in newest["messages"]] == [5, 6, 7]
    assert newest["has_more"] is True

    await send(alice, type="history", before=2, limit=3)
    oldest = await receive(alice)
    assert [m["seq"] for m in oldest["messages"]] == [1]
    assert oldest["has_more"] is False


async def test_history_only_reads_the_sockets_own_room(ws_connect, user, room, other_room):
    await post(other_room, user, "elsewhere")
    alice = await joined(ws_connect, user, room)
    await send(alice, type="history", before=100, limit=10)
    assert (await receive(alice))["messages"] == []


async def test_socket_that_falls_too_far_behind_is_closed_with_1013(ws_connect, user, room, settings):
    settings.CHAT_SOCKET_MAX_BACKLOG = 5

    async def slow_client_app(scope, receive, send):
        """The site's ASGI app, with a client that reads message frames slowly."""

        async def slow_send(event):
            if event["type"] == "websocket.send" and '"type":"message"' in event["text"]:
                await asyncio.sleep(0.05)
            await send(event)

        await application(scope, receive, slow_send)

    alice = await joined(ws_connect, user, room, app=slow_client_app)
    for n in range(40):
        await realtime.get_channel_layer().group_send(
            realtime.room_group(room),
            {"type": realtime.MESSAGE_EVENT, "room": room.pk, "seq": n + 1, "message": {"seq": n + 1}},
        )

    outputs = []
    while True:
        output = await alice.receive_output(timeout=5)
        outputs.append(output)
        if output["type"] == "websocket.close":
            break
    assert outputs[-1]["code"] == protocol.CLOSE_TRY_AGAIN_LATER
    assert len(outputs) - 1 < 40  # it did not wait to deliver everything


@pytest.mark.slow
async def test_a_quiet_room_keeps_its_subscription_and_still_receives_after_redis_timeouts(
    ws_connect, user, other_user, room
):
    """An idle subscription must not be taken for a lost one, nor time out.

    redis-py 8 times a connection out after 5 s by default. What keeps the
    hub's subscription alive through silence is its own probe, heard back every
    second (chat/fanout.py); channels_redis also polls the connection every
    0.1 s. Without the probes being heard the hub counts the subscription as
    lost and closes the socket, and this test fails.
    """
    bob = await joined(ws_connect, other_user, room)
    hub = fanout.hub()
    heard_before = hub.probes_heard
    await asyncio.sleep(6.5)  # the scenario: a room quiet for longer than redis-py's default timeout
    assert not hub.down
    assert hub.probes_heard - heard_before >= 4
    await post(room, user, "are you still there?")
    frame = await receive(bob, timeout=5)
    assert frame["message"]["body"] == "are you still there?"


@pytest.fixture
def no_typing_claims():
    """Typing claims expire after 2 s in Redis; a test must not inherit the previous test's."""
    client = redis.Redis.from_url(settings.REDIS_URL)
    for key in client.scan_iter(f"{settings.CHANNEL_LAYER_PREFIX}:typing:*"):
        client.delete(key)
    client.close()


async def test_typing_reaches_the_others_and_is_not_echoed(ws_connect, user, other_user, room, no_typing_claims):
    bob = await joined(ws_connect, other_user, room)
    alice = await joined(ws_connect, user, room)
    await send(alice, type="typing")
    assert await receive(bob) == {"type": "typing", "user": "alice"}
    assert await silent(alice, 0.5)


@pytest.mark.slow
async def test_typing_is_relayed_at_most_once_per_two_seconds(ws_connect, user, other_user, room, no_typing_claims):
    bob = await joined(ws_connect, other_user, room)
    alice = await joined(ws_connect, user, room)
    second_tab = await joined(ws_connect, user, room)
    for typist in (alice, second_tab, alice, second_tab, alice):
        await send(typist, type="typing")
    assert await receive(bob) == {"type": "typing", "user": "alice"}
    assert await silent(bob, 0.7)
    assert await silent(second_tab, 0.1)  # the typist's other tab is not told either
    await asyncio.sleep(1.5)  # the scenario: the 2 s interval since the first signal runs out
    await send(alice, type="typing")
    assert await receive(bob) == {"type": "typing", "user": "alice"}


async def edit(room, user, message, body):
    return await database_sync_to_async(services.message_edit)(room=room, message_id=message.pk, user=user, body=body)


async def delete(room, user, message):
    return await database_sync_to_async(services.message_delete)(room=room, message_id=message.pk, user=user)


async def test_edit_and_delete_reach_every_socket_in_the_room(ws_connect, user, other_user, room):
    bob = await joined(ws_connect, other_user, room)
    alice = await joined(ws_connect, user, room)
    await send(alice, type="send", body="helo")
    sent = (await receive(alice))["message"]
    await receive(bob)

    await send(alice, type="edit", id=sent["id"], body="hello")
    for communicator in (alice, bob):
        updated = await receive(communicator)
        assert updated["type"] == "message_updated" and updated["change"] == 1
        message = updated["message"]
        assert (message["id"], message["seq"], message["body"]) == (sent["id"], 1, "hello")
        assert message["edited_at"]

    await send(alice, type="delete", id=sent["id"])
    for communicator in (alice, bob):
        assert await receive(communicator) == {"type": "message_deleted", "id": sent["id"], "seq": 1, "change": 2}


async def test_changing_someone_elses_message_gets_forbidden_and_changes_nothing(ws_connect, user, other_user, room):
    alice = await joined(ws_connect, user, room)
    bob = await joined(ws_connect, other_user, room)
    message = await post(room, user, "alice's words")
    await receive(alice)
    await receive(bob)

    await send(bob, type="edit", id=message.pk, body="bob's words")
    assert (await receive(bob))["code"] == "forbidden"
    await send(bob, type="delete", id=message.pk)
    assert (await receive(bob))["code"] == "forbidden"
    assert await silent(alice, 0.5)
    stored = await database_sync_to_async(Message.objects.get)()
    assert (stored.body, stored.edited_at, stored.deleted_at) == ("alice's words", None, None)


async def test_bad_edit_and_delete_frames_get_error_frames(ws_connect, user, room):
    alice = await joined(ws_connect, user, room)
    message = await post(room, user, "hi")
    await receive(alice)
    for frame, code in [
        ({"type": "edit", "id": message.pk}, "missing_body"),
        ({"type": "edit", "id": message.pk, "body": ""}, "empty_body"),
        ({"type": "edit", "id": "x", "body": "y"}, "invalid_frame"),
        ({"type": "delete"}, "invalid_frame"),
        ({"type": "delete", "id": 999999}, "not_found"),
    ]:
        await send(alice, **frame)
        assert (await receive(alice))["code"] == code
    assert (await database_sync_to_async(Message.objects.get)()).body == "hi"


async def test_resume_replays_edits_and_deletions_since_the_clients_last_change(ws_connect, user, other_user, room):
    one, two, three = [await post(room, user, f"m{n}") for n in (1, 2, 3)]
    await edit(room, user, one, "m1, first edit")  # change 1: the client saw this one
    await edit(room, user, two, "m2, edited")  # change 2
    await delete(room, user, three)  # change 3

    bob, _ = await ws_connect(other_user, room, after=3, changes_after=1)
    replayed, ready = await receive_until_ready(bob)

    assert [(f["type"], f["change"]) for f in replayed] == [("message_updated", 2), ("message_deleted", 3)]
    assert replayed[0]["message"]["body"] == "m2, edited"
    assert replayed[1] == {"type": "message_deleted", "id": three.pk, "seq": 3, "change": 3}
    assert ready == {"type": "ready", "last_seq": 3, "last_change": 3}

    await edit(room, user, one, "m1, live edit")
    live = await receive(bob)
    assert (live["type"], live["change"]) == ("message_updated", 4)
    assert await silent(bob, 0.5)


async def test_resume_with_more_changes_than_the_limit_starts_afresh_from_the_newest_page(
    ws_connect, user, other_user, room, settings
):
    settings.CHAT_RESUME_LIMIT = 3
    messages = [await post(room, user, f"m{n}") for n in range(1, 7)]
    for message in messages[:4]:  # changes 1-4, all at or below the client's after
        await delete(room, user, message)

    bob, _ = await ws_connect(other_user, room, after=6, changes_after=0)
    replayed, ready = await receive_until_ready(bob)

    # Four changes are more than a resume replays: a gap, then the newest three messages as they are now.
    assert replayed[0] == {"type": "gap", "after": 6, "next_seq": 4}
    assert [(f["type"], f["message"]["seq"], f["message"]["body"]) for f in replayed[1:]] == [
        ("message", 4, ""),
        ("message", 5, "m5"),
        ("message", 6, "m6"),
    ]
    assert ready == {"type": "ready", "last_seq": 6, "last_change": 4}


async def test_resumed_and_history_messages_never_carry_a_deleted_body(ws_connect, user, room):
    secret = await post(room, user, "my password is hunter2")
    await delete(room, user, secret)
    alice, _ = await ws_connect(user, room, after=0)
    replayed, _ = await receive_until_ready(alice)
    assert replayed[0]["message"]["body"] == "" and replayed[0]["message"]["deleted_at"]
    await send(alice, type="history", before=2, limit=10)
    history = await receive(alice)
    assert history["messages"][0]["seq"] == 1 and history["messages"][0]["body"] == ""
    assert "hunter2" not in json.dumps(replayed + [history])


async def presence_of(communicator) -> list[str]:
    return (await receive(communicator, presence=True))["users"]


async def no_presence_news(communicator, timeout: float = 0.5) -> bool:
    """True if no presence frame arrives within `timeout` (other frames are not expected either)."""
    return await communicator.receive_nothing(timeout=timeout)


async def test_presence_is_sent_on_connect_and_whenever_the_set_of_users_changes(ws_connect, user, other_user, room):
    alice, _ = await ws_connect(user, room)
    assert await presence_of(alice) == ["alice"]
    bob, _ = await ws_connect(other_user, room)
    assert await presence_of(bob) == ["alice", "bob"]
    assert await presence_of(alice) == ["alice", "bob"]

    second_tab, _ = await ws_connect(user, room)
    assert await presence_of(second_tab) == ["alice", "bob"]  # told on connect
    assert await no_presence_news(alice) and await no_presence_news(bob)  # a second tab changes nobody's list

    await second_tab.disconnect()
    assert await no_presence_news(bob)  # alice is still here in her first tab
    await alice.disconnect()
    assert await presence_of(bob) == ["bob"]


async def test_a_rooms_presence_is_answered_per_user_not_per_socket(room):
    tabs = [ephemeral.presence_member("alice", f"tab-{n}") for n in range(50)]
    assert await ephemeral.presence_update(room_id=room.pk, add=[*tabs, "bob|tab"]) == (True, ["alice", "bob"])
    assert await ephemeral.presence_update(room_id=room.pk, add="alice|tab-50") == (False, ["alice", "bob"])
    assert await ephemeral.presence_update(room_id=room.pk, remove="alice|tab-0") == (False, ["alice", "bob"])
    assert await ephemeral.presence_update(room_id=room.pk, remove="bob|tab") == (True, ["alice"])
    assert ephemeral.presence_now([room.pk]) == {room.pk: ["alice"]}


async def test_refreshing_the_socket_cap_extends_every_open_socket_and_revives_no_closed_one(settings):
    # Users of their own: sockets other tests left open count against a real user's cap.
    one, two = (int(uuid.uuid4().int % 10**9) + 10**9 for _ in range(2))
    for user_id, socket_id in [(one, "a1"), (one, "a2"), (one, "a3"), (two, "b1")]:
        assert await ephemeral.socket_open(user_id=user_id, socket_id=socket_id, cap=5)
    await ephemeral.socket_close(user_id=one, socket_id="a3")
    store = redis.Redis.from_url(settings.REDIS_URL)
    before = {
        sid: store.zscore(ephemeral._sockets_key(uid), sid) for uid, sid in [(one, "a1"), (one, "a2"), (two, "b1")]
    }
    settings.CHAT_PRESENCE_TTL += 60
    await ephemeral.sockets_refresh([(one, "a1"), (one, "a2"), (one, "a3"), (two, "b1")])
    after = {
        sid: store.zscore(ephemeral._sockets_key(uid), sid) for uid, sid in [(one, "a1"), (one, "a2"), (two, "b1")]
    }
    assert all(after[sid] >= before[sid] + 60 for sid in before)
    assert store.zscore(ephemeral._sockets_key(one), "a3") is None


async def test_presence_drops_a_socket_whose_process_stopped_refreshing_it(ws_connect, other_user, room, settings):
    settings.CHAT_PRESENCE_TTL = 0.6
    # A member left behind by a server process that died: nobody refreshes it.
    await ephemeral.presence_update(room_id=room.pk, add=ephemeral.presence_member("ghost", "dead-process"))
    bob, _ = await ws_connect(other_user, room)
    assert await presence_of(bob) == ["bob", "ghost"]
    assert await presence_of(bob) == ["bob"]  # within the expiry, by bob's own refresh


# --------------------------------------------------------------------------
# Private rooms, moderators and read marks
# --------------------------------------------------------------------------


async def test_private_room_handshake_is_refused_to_a_non_member(ws_connect, other_user, third_user, private_room):
    _, connected = await ws_connect(third_user, private_room, after=0)
    assert not connected
    member, connected = await ws_connect(other_user, private_room, after=0)
    assert connected


async def test_removed_member_is_told_and_closed_within_a_second_and_cannot_reconnect(
    ws_connect, user, other_user, private_room
):
    alice = await joined(ws_connect, user, private_room)
    bob_tabs = [await joined(ws_connect, other_user, private_room) for _ in range(2)]

    await database_sync_to_async(services.member_remove)(room=private_room, actor=user, username=other_user.username)

    for bob in bob_tabs:
        assert await receive(bob, timeout=1) == {
            "type": "error",
            "code": "removed",
            "detail": "You were removed from this room.",
            "nonce": None,
        }
        assert await bob.receive_output(timeout=1) == {"type": "websocket.close", "code": protocol.CLOSE_REMOVED}
    assert await silent(alice)  # the others stay
    _, connected = await ws_connect(other_user, private_room)
    assert not connected


async def test_a_removed_members_send_saves_nothing(ws_connect, user, other_user, private_room):
    bob = await joined(ws_connect, other_user, private_room)
    await database_sync_to_async(Membership.objects.filter(user=other_user).delete)()  # no broadcast: the socket stays
    await send(bob, type="send", body="still here?", nonce="n-1")
    assert (await receive(bob))["code"] == "forbidden"
    assert not await database_sync_to_async(Message.objects.exists)()


async def test_a_moderator_deletes_someone_elses_message_over_the_socket(ws_connect, user, other_user, private_room):
    await database_sync_to_async(Membership.objects.filter(user=other_user).update)(role="moderator")
    alice = await joined(ws_connect, user, private_room)
    bob = await joined(ws_connect, other_user, private_room)
    message = await post(private_room, user, "alice's words")
    await receive(alice)
    await receive(bob)

    await send(bob, type="delete", id=message.pk)
    for communicator in (alice, bob):
        assert await receive(communicator) == {"type": "message_deleted", "id": message.pk, "seq": 1, "change": 1}


async def test_read_frame_stores_the_highest_seq_seen(ws_connect, user, other_user, room):
    for i in range(3):
        await post(room, user, f"m{i}")
    bob = await joined(ws_connect, other_user, room)  # connecting to a public room makes bob a member

    def last_read() -> int:
        return Membership.objects.get(room=room, user=other_user).last_read_seq

    for seq in (2, 1):
        await send(bob, type="read", seq=seq)
    await send(bob, type="history", before=2, limit=1)  # answered after the reads are stored
    await receive(bob)
    assert await database_sync_to_async(last_read)() == 2

    await send(bob, type="read", seq="3")
    assert await receive(bob) == {
        "type": "error",
        "code": "invalid_frame",
        "detail": '"seq" must be a whole number from 0 to 9223372036854775807.',
        "nonce": None,
    }
    assert await database_sync_to_async(last_read)() == 2


async def test_unread_counts_are_right_after_a_reconnect(ws_connect, user, other_user, room):
    def bobs_unread() -> int:
        return {r.slug: r.unread for r in selectors.room_list(user=other_user)}[room.slug]

    bob = await joined(ws_connect, other_user, room, after=0)
    for i in range(2):
        await post(room, user, f"seen {i}")
        last = await receive(bob)
    await send(bob, type="read", seq=last["message"]["seq"])
    await bob.disconnect()

    for i in range(3):
        await post(room, user, f"missed {i}")
    assert await database_sync_to_async(bobs_unread)() == 3

    bob = await ws_connect(other_user, room, after=2)
    missed, ready = await receive_until_ready(bob[0])
    assert [frame["message"]["body"] for frame in missed] == ["missed 0", "missed 1", "missed 2"]
    await send(bob[0], type="read", seq=ready["last_seq"])
    await send(bob[0], type="history", before=2, limit=1)  # answered after the read is stored
    await receive(bob[0])
    assert await database_sync_to_async(bobs_unread)() == 0


async def test_signing_out_closes_the_sessions_sockets_in_rooms_it_never_joined(user, other_user, room, other_room):
    browser = Client()
    await database_sync_to_async(browser.force_login)(other_user)
    cookie = f"{settings.SESSION_COOKIE_NAME}={browser.cookies[settings.SESSION_COOKIE_NAME].value}"
    sockets = []
    for joined_room in (room, other_room):
        socket = WebsocketCommunicator(
            application,
            f"/ws/rooms/{joined_room.slug}/",
            headers=[(b"origin", b"http://localhost"), (b"cookie", cookie.encode())],
        )
        assert (await socket.connect(timeout=5))[0]
        await receive_until_ready(socket)
        sockets.append(socket)
    assert await database_sync_to_async(Membership.objects.filter(user=other_user).count)() == 0

    assert (await database_sync_to_async(browser.post)("/accounts/logout/")).status_code == 302
    for socket in sockets:
        assert (await receive(socket, timeout=5))["code"] == "signed_out"
        assert await socket.receive_output(timeout=5) == {"type": "websocket.close", "code": protocol.CLOSE_SIGNED_OUT}


async def test_an_import_makes_the_rooms_open_sockets_resume_and_they_get_every_imported_message(
    ws_connect, user, room, other_room
):
    await post(room, user, "already here")
    alice = await joined(ws_connect, user, room, after=1)
    exported = {"room": "elsewhere", "author": "alice", "created_at": "2026-01-01T00:00:00Z", "edited_at": None}
    rows = [(n, {**exported, "seq": n, "body": f"imported {n}", "deleted_at": None}) for n in (1, 2, 3)]
    result = await database_sync_to_async(services.messages_import)(room=room, rows=rows)
    assert result.created == 3

    assert (await receive(alice))["code"] == "resync"
    assert await alice.receive_output(timeout=2) == {"type": "websocket.close", "code": protocol.CLOSE_SERVICE_RESTART}
    again, _ = await ws_connect(user, room, after=1)
    replayed, ready = await receive_until_ready(again)
    assert [frame["message"]["body"] for frame in replayed] == ["imported 1", "imported 2", "imported 3"]
    assert ready["last_seq"] == 4


@pytest.fixture
def resume_reads(monkeypatch) -> list[str]:
    """The replay's reads of the database, by selector."""
    reads: list[str] = []
    for name in ("message_resume", "room_cursors"):
        read = getattr(selectors, name)
        monkeypatch.setattr(
            selectors,
            name,
            lambda *args, _read=read, _name=name, **kwargs: (reads.append(_name), _read(*args, **kwargs))[1],
        )
    return reads


async def test_a_socket_that_has_what_the_hub_handed_out_resumes_without_reading_the_database(
    ws_connect, user, other_user, room, resume_reads
):
    await post(room, user, "one")
    bob = await joined(ws_connect, other_user, room, after=0)  # the first socket reads: the hub is at seq 1 now
    await post(room, user, "two")
    assert (await receive(bob))["message"]["seq"] == 2
    assert resume_reads == ["message_resume"]

    alice, connected = await ws_connect(user, room, after=2, changes_after=0)
    replayed, ready = await receive_until_ready(alice)
    assert (replayed, ready["last_seq"], ready["last_change"]) == ([], 2, 0)
    assert resume_reads == ["message_resume"]  # none for alice
    await post(room, user, "three")
    assert [(await receive(socket))["message"]["seq"] for socket in (alice, bob)] == [3, 3]

    # Behind the hub, or asking for changes it has not seen: read as before.
    carol, _ = await ws_connect(other_user, room, after=1, changes_after=0)
    replayed, ready = await receive_until_ready(carol)
    assert [frame["message"]["seq"] for frame in replayed] == [2, 3] and ready["last_seq"] == 3
    assert resume_reads == ["message_resume", "message_resume"]


async def test_a_client_gone_during_the_resume_is_not_taken_for_a_redis_outage(ws_connect, user, room, caplog):
    async def app_whose_client_leaves(scope, receive, send):
        """The site, behind a server whose client vanished: uvicorn's send raises ClientDisconnected (an OSError)."""

        async def send_to_nobody(event):
            if event["type"] == "websocket.send":
                raise ClientDisconnected()
            await send(event)

        await application(scope, receive, send_to_nobody)

    await post(room, user, "replayed to nobody")
    _, connected = await ws_connect(user, room, after=0, app=app_whose_client_leaves)
    assert connected
    bob = await joined(ws_connect, user, room, after=1)  # the site still serves
    await post(room, user, "live")
    assert (await receive(bob))["message"]["body"] == "live"
    assert "unreachable" not in caplog.text
