"""Nothing lost across faults: Redis killed, frozen or blackholed, a server process killed, under chat load.

The promise: a message the server acknowledged (its sender got it back as a
`message` frame carrying its nonce) is stored exactly once, and every client
holds exactly the room's messages, 1..N, once each. While Redis is away the
chat goes on: no socket is closed, and every message acknowledged meanwhile
reaches every client within 3 s, in order, because each server process
follows its rooms from the database (chat/fanout.py). The clients do what
the room page does: reconnect with backoff and `?after=` the highest seq held
without a hole, resend unacknowledged sends with their nonce, and ask for a
hole with `history` after a grace period. At the end each client resumes
once more, and the test compares; it also checks that live delivery had
already given every client everything, without asking for holes. The
clients and the comparison are tests/reliability/load.py.

Each test runs real server processes, uvicorn as the README runs it, on a
redis-server of its own (see conftest.py), loopback only, and is bounded in time.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import time
import uuid

import pytest
from channels.db import database_sync_to_async
from django.contrib.sessions.backends.db import SessionStore
from django.contrib.sessions.models import Session

from bench.serverprocess import ServerProcess
from chat import fanout, protocol, realtime, services
from chat.models import Message
from tests.reliability.load import (
    FRAME_TIMEOUT,
    ChatClient,
    Load,
    assert_logged_once_per_server,
    check_nothing_lost,
    delivery_delays,
    make_room_and_users,
    report,
)
from tests.servers import ASGI_ERROR_MARKERS, RedisServer, StallingTcpProxy, assert_no_app_errors

pytestmark = pytest.mark.django_db(transaction=True)

CLIENTS = 30
TEST_LIMIT = 150.0  # seconds any one test may take, start to end


def http_get_seconds(server: ServerProcess, timeout: float) -> float:
    """GET / and return how long the answer took; raise if it does not come within `timeout`."""
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        conn.request("GET", "/")
        response = conn.getresponse()
        response.read()
        assert response.status == 200, f"GET / on {server.name} answered {response.status}"
    finally:
        conn.close()
    return time.monotonic() - started


# --------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------


# How long each Redis outage lasts (seconds), and how it is made.
OUTAGES = {"killed": 10.0, "frozen": 15.0, "blackholed": 15.0}
DELIVERY_LIMIT = 3.0  # seconds from a message's acknowledgement to its arrival at every client
ANSWER_LIMIT = 1.0  # seconds a page or a new socket's resume may take while Redis is away
OUTAGE_CLIENTS = 24


def begin_outage(outage: str, redis: RedisServer, link: StallingTcpProxy) -> None:
    {"killed": redis.kill, "frozen": redis.freeze, "blackholed": link.stall}[outage]()


def end_outage(outage: str, redis: RedisServer, link: StallingTcpProxy) -> None:
    {"killed": redis.start, "frozen": redis.thaw, "blackholed": link.flow}[outage]()


async def resume_seconds(client: ChatClient, server: ServerProcess) -> float:
    """Open a new socket resuming from the client's position; return how long until `ready`."""
    started = time.monotonic()
    probe = ChatClient(f"{client.name}-probe", client.cookie, client.slug, [server], 0, contiguous=client.contiguous)
    ws = await probe.connect()
    try:
        while json.loads(await asyncio.wait_for(ws.recv(), FRAME_TIMEOUT))["type"] != "ready":
            pass
        return time.monotonic() - started
    finally:
        await ws.close()


@pytest.mark.slow
@pytest.mark.parametrize("outage", OUTAGES)
async def test_the_chat_goes_on_while_redis_is_away(outage, cluster_through_link, own_redis, redis_link):
    async with asyncio.timeout(TEST_LIMIT):
        servers = await cluster_through_link.start(2)
        load = await Load.start(servers, OUTAGE_CLIENTS)
        try:
            await asyncio.sleep(4)  # the scenario: 4 s of chat before the outage
            assert len(load.acked()) > OUTAGE_CLIENTS * 4, f"too few acknowledged before the outage\n{load.describe()}"
            begin_outage(outage, own_redis, redis_link)
            began = time.monotonic()
            pages, resumes = [], []
            while time.monotonic() - began < OUTAGES[outage]:
                for server in servers:
                    pages.append(await asyncio.to_thread(http_get_seconds, server, 5.0))
                    resumes.append(await resume_seconds(load.clients[0], server))
                await asyncio.sleep(1)  # the scenario: a page load and a resume a second on each server
            end_outage(outage, own_redis, redis_link)
            ended = time.monotonic()
            await asyncio.sleep(6)  # the scenario: 6 s of chat once Redis is back
            last_seq = await load.finish()
        finally:
            await load.stop()
        numbers = await check_nothing_lost(load, last_seq)

    # Nobody was disconnected, and every message reached everyone in time and in order.
    assert not any(c.closes or c.failed_connects for c in load.clients), load.describe()
    during = delivery_delays(load, began, ended)
    acks = sorted(
        item.acked_at - item.sent_at
        for item in load.acked().values()
        if item.acked_at is not None and began <= item.sent_at <= ended
    )
    overall = delivery_delays(load, 0, float("inf"))
    assert len(during) >= OUTAGE_CLIENTS * OUTAGE_CLIENTS * OUTAGES[outage], "too few messages during the outage"
    assert max(overall) <= DELIVERY_LIMIT, f"a message took {max(overall):.2f} s to reach a client"
    assert not any(c.out_of_order for c in load.clients), {c.name: c.out_of_order[:5] for c in load.clients}
    assert max(pages) < ANSWER_LIMIT, f"GET / took up to {max(pages):.2f} s while Redis was {outage}"
    assert max(resumes) < ANSWER_LIMIT, f"a resume took up to {max(resumes):.2f} s while Redis was {outage}"
    assert acks[-1] < ANSWER_LIMIT, f"a send was acknowledged after up to {acks[-1]:.2f} s while Redis was {outage}"
    # It switched to the database and back by itself, once each, and said so once.
    assert_logged_once_per_server(servers, "Fan-out lost its channel-layer subscription")
    assert_logged_once_per_server(servers, "Fan-out's channel-layer subscription is back")
    for server in servers:  # once for the outage, not once a second or once per message
        log = server.log_text()
        assert log.count("The channel layer (Redis) is unreachable") <= 2, server.log_tail()
        assert log.count("Unexpected exception in receive task") <= 1, server.log_tail()
        assert "in on_commit()" not in log, server.log_tail()
    during.sort()
    report(
        f"redis-{outage}",
        outage_s=OUTAGES[outage],
        delivered_during=len(during),
        delay_p50_ms=round(1000 * during[len(during) // 2]),
        delay_p99_ms=round(1000 * during[int(len(during) * 0.99)]),
        delay_max_ms=round(1000 * max(overall)),
        page_max_ms=round(1000 * max(pages)),
        resume_max_ms=round(1000 * max(resumes)),
        ack_p99_ms=round(1000 * acks[int(len(acks) * 0.99)]),
        ack_max_ms=round(1000 * acks[-1]),
        **numbers,
        load=load.describe(),
    )


@pytest.mark.slow
async def test_a_server_process_killed_under_load_loses_nothing(cluster_on_own_redis, own_redis):
    async with asyncio.timeout(TEST_LIMIT):
        servers = await cluster_on_own_redis.start(2)
        load = await Load.start(servers, CLIENTS)
        try:
            await asyncio.sleep(5)  # the scenario: 5 s of chat before the fault
            servers[1].kill()  # SIGKILL: its clients must move to the other process
            killed_at = time.monotonic()
            await load.wait(
                lambda: load.live() == CLIENTS and all(c.server == 0 for c in load.clients),
                15,
                f"all on {servers[0].name}",
            )
            moved = time.monotonic() - killed_at
            await asyncio.sleep(8)  # the scenario: 8 s of chat on the surviving process
            last_seq = await load.finish()
        finally:
            await load.stop()
        numbers = await check_nothing_lost(load, last_seq, holes_allowed=True)
    report("server-kill", moved_s=round(moved, 2), **numbers, load=load.describe())


class DeafeningLayer:
    """A channel layer whose subscription can go deaf without an error: publishes succeed, nothing arrives."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()
        self.deaf = False
        self.groups_added: list[str] = []

    async def new_channel(self, prefix: str = "") -> str:
        return f"{prefix}hub"

    async def send(self, channel: str, message: dict) -> None:
        if not self.deaf:
            self.queue.put_nowait(message)

    async def receive(self, channel: str) -> dict:
        return await self.queue.get()

    async def group_add(self, group: str, channel: str) -> None:
        self.groups_added.append(group)

    async def group_discard(self, group: str, channel: str) -> None:
        pass


async def test_a_hub_that_stops_hearing_its_subscription_follows_the_database_and_switches_back(
    monkeypatch, user, room
):
    monkeypatch.setattr(fanout, "PROBE_INTERVAL", 0.02)
    layer = DeafeningLayer()
    hub = fanout.RoomHub(layer)
    sent: list[dict] = []

    async def send(event: dict) -> None:
        sent.append(event)

    def frames() -> list[dict]:
        return [json.loads(e["text"]) for e in sent if e["type"] == "websocket.send"]

    async def eventually(condition, what: str) -> None:
        deadline = time.monotonic() + 3
        while not condition():
            assert time.monotonic() < deadline, f"not within 3 s: {what}; frames {frames()}"
            await asyncio.sleep(0.01)  # polling the condition until the deadline

    post = database_sync_to_async(services.message_create)
    try:
        hub.ready(await hub.join(room.pk, send, user.username), 0)
        poll = await hub.watch(room.pk)
        layer.deaf = True  # no error anywhere: the probes just stop coming back
        await eventually(lambda: hub.down, "the hub noticed")
        assert frames() == [{"type": "delivery", "mode": "delayed"}]
        message, _ = await post(room=room, author=user, body="while deaf")  # published elsewhere: never heard here
        await eventually(lambda: len(frames()) == 2, "the message, from the database")
        assert frames()[1]["message"]["body"] == "while deaf"
        assert [m["body"] for m in poll.messages] == ["while deaf"]  # long-polls are fed the same way
        await database_sync_to_async(services.message_edit)(room=room, message_id=message.pk, user=user, body="edited")
        await eventually(lambda: len(frames()) == 3, "the edit, from the database")
        assert (frames()[2]["type"], frames()[2]["message"]["body"]) == ("message_updated", "edited")
        await database_sync_to_async(services.message_delete)(room=room, message_id=message.pk, user=user)
        await eventually(lambda: len(frames()) == 4, "the deletion, from the database")
        assert (frames()[3]["type"], frames()[3]["seq"]) == ("message_deleted", 1)
        late = await hub.join(room.pk, send, "bob")  # a socket opened meanwhile is accepted, and told
        hub.ready(late, 1, 2)
        await eventually(lambda: len(frames()) == 5, "the late socket told")
        assert frames()[4] == {"type": "delivery", "mode": "delayed"}
        assert hub.rooms[room.pk] and not any(s.closed for s in hub.rooms[room.pk])

        layer.deaf = False
        await eventually(lambda: not hub.down, "the hub back")
        assert layer.groups_added.count(realtime.room_group(room.pk)) == 2  # joined, and joined again
        await eventually(lambda: len(frames()) == 7, "both sockets told")
        assert frames()[5:] == [{"type": "delivery", "mode": "live"}] * 2
        await post(room=room, author=user, body="after")
        await eventually(lambda: len(frames()) == 9, "the next message, to both sockets")
        bodies = [f["message"]["body"] for f in frames() if f["type"] == "message"]
        assert bodies == ["while deaf", "after", "after"]  # each once per socket, whichever path brought it
    finally:
        for task in hub.tasks:
            task.cancel()


async def test_while_the_hub_is_deaf_removals_archiving_and_sign_outs_still_close_exactly_those_sockets(
    monkeypatch, user, other_user, third_user, room, other_room, private_room
):
    monkeypatch.setattr(fanout, "PROBE_INTERVAL", 0.02)
    layer = DeafeningLayer()
    hub = fanout.RoomHub(layer)
    sent: dict[str, list[dict]] = {}

    async def join(name: str, room_id: int, username: str, session: str = "") -> fanout.LocalSocket:
        async def send(event: dict) -> None:
            sent.setdefault(name, []).append(event)

        socket = await hub.join(room_id, send, username, session)
        hub.ready(socket, 0)
        return socket

    def closes() -> dict[str, int]:
        return {name: e["code"] for name, events in sent.items() for e in events if e["type"] == "websocket.close"}

    def new_session(who) -> str:
        store = SessionStore()
        store["_auth_user_id"] = str(who.pk)
        store.create()
        return store.session_key

    carol_session, alice_session = await database_sync_to_async(lambda: (new_session(third_user), new_session(user)))()
    try:
        await join("bob in secret", private_room.pk, other_user.username)
        await join("alice in secret", private_room.pk, user.username)
        await join("carol in room", room.pk, third_user.username, carol_session)
        await join("alice in room", room.pk, user.username, alice_session)
        await join("bob in other room", other_room.pk, other_user.username)
        layer.deaf = True  # the events that close sockets are lost from now on
        deadline = time.monotonic() + 3
        while not hub.down:
            assert time.monotonic() < deadline, "the hub did not notice"
            await asyncio.sleep(0.01)  # polling the condition until the deadline

        def change_rows() -> None:
            services.member_remove(room=private_room, actor=user, username=other_user.username)
            services.room_archive(room=other_room)
            Session.objects.filter(session_key=carol_session).delete()  # carol signed out

        await database_sync_to_async(change_rows)()
        deadline = time.monotonic() + 3
        while len(closes()) < 3:
            assert time.monotonic() < deadline, f"closed so far: {closes()}"
            await asyncio.sleep(0.01)  # polling the condition until the deadline
        await asyncio.sleep(2 * fanout.FOLLOW_INTERVAL)  # two more reads: nobody else is closed
        assert closes() == {
            "bob in secret": protocol.CLOSE_REMOVED,
            "bob in other room": protocol.CLOSE_ROOM_ARCHIVED,
            "carol in room": protocol.CLOSE_SIGNED_OUT,
        }
    finally:
        for task in hub.tasks:
            task.cancel()


@pytest.mark.slow
async def test_a_socket_opened_while_redis_is_down_gets_messages_from_the_database_then_live(
    cluster_on_own_redis, own_redis
):
    (server,) = await cluster_on_own_redis.start(1)
    slug, [(_, alice), (_, bob)] = await database_sync_to_async(make_room_and_users)(2)
    own_redis.kill()

    async with asyncio.timeout(30):
        sockets = []
        for cookie in (alice, bob):
            ws = await ChatClient("client", cookie, slug, [server], 0).connect()
            frames = [json.loads(await ws.recv()) for _ in range(2)]
            assert frames == [
                {"type": "ready", "last_seq": 0, "last_change": 0},
                {"type": "delivery", "mode": "delayed"},
            ]
            sockets.append(ws)
        await sockets[0].send(json.dumps({"type": "send", "body": "hello", "nonce": "n1"}))
        for ws in sockets:
            frame = json.loads(await ws.recv())
            assert (frame["type"], frame["message"]["body"]) == ("message", "hello")

        own_redis.start()
        for ws in sockets:
            frame = json.loads(await ws.recv())
            while frame["type"] == "presence":
                frame = json.loads(await ws.recv())
            assert frame == {"type": "delivery", "mode": "live"}
        await sockets[1].send(json.dumps({"type": "send", "body": "back", "nonce": "n2"}))
        for ws in sockets:
            frame = json.loads(await ws.recv())
            while frame["type"] == "presence":
                frame = json.loads(await ws.recv())
            assert (frame["type"], frame["message"]["body"]) == ("message", "back")
        for ws in sockets:
            await ws.close()
    # Redis's absence is logged (with tracebacks from the layer's reader); no connection may raise out of the app.
    assert_no_app_errors(server, ASGI_ERROR_MARKERS)


async def test_a_message_whose_publisher_died_reaches_connected_clients_in_a_quiet_room(
    sockets, cluster, alice_cookie, bob_cookie, room, user, monkeypatch
):
    (server,) = await cluster.start(1)
    alice, _, _ = await sockets.join(server, alice_cookie, room.slug)
    bob, _, _ = await sockets.join(server, bob_cookie, room.slug)
    # Committed, never published: as if its process died between the two.
    monkeypatch.setattr(realtime, "publish_message", lambda message: None)
    await database_sync_to_async(services.message_create)(room=room, author=user, body="orphan")
    started = time.monotonic()
    for ws in (alice, bob):
        assert (await sockets.recv_message(ws, "the orphaned message"))["body"] == "orphan"
    assert time.monotonic() - started < 5
    await sockets.assert_silent(alice, "alice")


def api_post_seconds(server: ServerProcess, secret: str, slug: str, body: str) -> tuple[int, float]:
    """POST a message through the API; return its status and how long the answer took."""
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        payload = json.dumps({"body": body, "nonce": uuid.uuid4().hex})
        headers = {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}
        conn.request("POST", f"/api/rooms/{slug}/messages", payload, headers)
        response = conn.getresponse()
        response.read()
    finally:
        conn.close()
    return response.status, time.monotonic() - started


async def test_with_redis_frozen_an_api_post_is_stored_and_answered_within_a_second(
    cluster_on_own_redis, own_redis, user
):
    def room_and_token() -> tuple[str, str]:
        room = services.room_create(slug="frozen", name="Frozen", created_by=user)
        return room.slug, services.token_create(user=user, name="frozen bot")[1]

    slug, secret = await database_sync_to_async(room_and_token)()
    (server,) = await cluster_on_own_redis.start(1)
    assert (await asyncio.to_thread(api_post_seconds, server, secret, slug, "before"))[0] == 201
    own_redis.freeze()
    try:
        answers = [await asyncio.to_thread(api_post_seconds, server, secret, slug, f"frozen {n}") for n in range(3)]
    finally:
        own_redis.thaw()
    assert [status for status, _ in answers] == [201, 201, 201]
    assert max(seconds for _, seconds in answers) < 1, answers
    stored = await database_sync_to_async(
        lambda: list(Message.objects.filter(room__slug=slug).values_list("body", flat=True))
    )()
    assert stored == ["before", "frozen 0", "frozen 1", "frozen 2"]
