"""Nothing lost across faults: Redis killed, Redis frozen, a server process killed, under chat load.

The promise: a message the server acknowledged (its sender got it back as a
`message` frame carrying its nonce) is stored exactly once, and after
reconnecting and resuming from the database every client holds exactly the
room's messages, 1..N, once each. The channel layer is at most once, so the
clients do what the room page does: reconnect with backoff and `?after=` the
highest seq held without a hole, and resend unacknowledged sends with their
nonce. At the end each client resumes once more and fills any hole with
`history`, and the test compares; it also checks that live delivery plus the
resumes had already given every client everything (which holds only because
the server closes every socket whose subscription may have missed a message).
The clients and the comparison are tests/reliability/load.py.

Each test runs real server processes, uvicorn as the README runs it, on a
redis-server of its own (see conftest.py), loopback only, and is bounded in time.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import time
import uuid
from collections import Counter

import pytest
from channels.db import database_sync_to_async
from redis.exceptions import RedisError
from websockets.exceptions import ConnectionClosed

from bench.serverprocess import ServerProcess
from chat import fanout, protocol, services
from chat.models import Message
from tests.reliability.load import (
    RECOVERY_LIMIT,
    ChatClient,
    Load,
    assert_logged_once_per_server,
    check_nothing_lost,
    make_room_and_users,
    report,
)
from tests.servers import ASGI_ERROR_MARKERS, assert_no_app_errors

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


@pytest.mark.slow
async def test_redis_killed_and_restarted_under_load_loses_nothing(cluster_on_own_redis, own_redis):
    async with asyncio.timeout(TEST_LIMIT):
        servers = await cluster_on_own_redis.start(2)
        load = await Load.start(servers, CLIENTS)
        try:
            await asyncio.sleep(6)  # the scenario: 6 s of chat before the fault
            before = len(load.acked())
            assert before > CLIENTS * 6, f"too few acknowledged before the fault\n{load.describe()}"

            own_redis.kill()
            killed_at = time.monotonic()
            await asyncio.sleep(5)  # the scenario: Redis stays down for 5 s
            closed_during = sum(any(at > killed_at for at, _ in c.closes) for c in load.clients)
            own_redis.start()
            back_at = time.monotonic()

            recovery, last_seq = await load.recover_and_finish(back_at)
        finally:
            await load.stop()
        numbers = await check_nothing_lost(load, last_seq)

    # Every socket was told to resume when the subscription was lost, with the code the hub sent.
    assert closed_during == CLIENTS, f"only {closed_during} clients were disconnected\n{load.describe()}"
    codes = Counter(code for c in load.clients for at, code in c.closes if at > killed_at)
    assert set(codes) == {protocol.CLOSE_SERVICE_RESTART}, f"close codes {dict(codes)}\n{load.describe()}"
    assert recovery <= RECOVERY_LIMIT
    assert_logged_once_per_server(servers, "Fan-out lost its channel-layer subscription")
    assert_logged_once_per_server(servers, "The channel layer (Redis) is unreachable")
    for server in servers:  # once for the outage, not once a second or once per message
        log = server.log_text()
        assert log.count("Unexpected exception in receive task") <= 1, server.log_tail()
        assert "in on_commit()" not in log, server.log_tail()
    report("redis-kill", recovery_s=round(recovery, 2), **numbers, load=load.describe())


@pytest.mark.slow
async def test_redis_frozen_keeps_pages_answering_and_clients_recover(cluster_on_own_redis, own_redis):
    async with asyncio.timeout(TEST_LIMIT):
        servers = await cluster_on_own_redis.start(2)
        load = await Load.start(servers, CLIENTS)
        try:
            await asyncio.sleep(4)  # the scenario: 4 s of chat before the fault
            own_redis.freeze()
            frozen_at = time.monotonic()
            latencies = []
            while time.monotonic() - frozen_at < 15:
                for server in servers:
                    latencies.append(await asyncio.to_thread(http_get_seconds, server, 5.0))
                await asyncio.sleep(1)  # the scenario: a page load a second on each server while frozen (15 s)
            own_redis.thaw()
            back_at = time.monotonic()
            # The hub could not hear its probes: every socket was told to resume, soon.
            told = [
                min((at for at, _ in c.closes if at > frozen_at), default=back_at) - frozen_at for c in load.clients
            ]

            recovery, last_seq = await load.recover_and_finish(back_at)
        finally:
            await load.stop()
        numbers = await check_nothing_lost(load, last_seq)

    assert max(latencies) < 3, f"GET / took up to {max(latencies):.1f} s while Redis was frozen"
    assert max(told) < 6, f"sockets were closed {sorted(told)} s into the freeze"
    codes = Counter(code for c in load.clients for at, code in c.closes if at > frozen_at)
    assert set(codes) == {protocol.CLOSE_SERVICE_RESTART}, f"close codes {dict(codes)}\n{load.describe()}"
    assert recovery <= RECOVERY_LIMIT
    assert_logged_once_per_server(servers, "Fan-out lost its channel-layer subscription")
    report(
        "redis-freeze",
        recovery_s=round(recovery, 2),
        get_max_s=round(max(latencies), 2),
        closed_after_s=round(max(told), 2),
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


async def test_a_hub_that_stops_hearing_its_subscription_closes_its_sockets_and_rejoins_once_it_hears_again(
    monkeypatch,
):
    monkeypatch.setattr(fanout, "PROBE_INTERVAL", 0.02)
    layer = DeafeningLayer()
    hub = fanout.RoomHub(layer)
    sent: list[dict] = []

    async def send(event: dict) -> None:
        sent.append(event)

    async def eventually(condition, what: str) -> None:
        deadline = time.monotonic() + 2
        while not condition():
            assert time.monotonic() < deadline, f"not within 2 s: {what}; sent {sent}"
            await asyncio.sleep(0.01)  # polling the condition until the deadline

    try:
        hub.ready(await hub.join(7, send, "alice"), 0)
        poll = await hub.watch(8)
        layer.deaf = True  # no error anywhere: the probes just stop coming back
        await eventually(lambda: any(e["type"] == "websocket.close" for e in sent), "the socket closed")
        assert [json.loads(e["text"])["code"] for e in sent if e["type"] == "websocket.send"] == ["unavailable"]
        assert sent[-1] == {"type": "websocket.close", "code": 1012}
        assert poll.published.is_set()  # the long-poll reads the database again
        with pytest.raises(RedisError):  # "subscribed before this returns" would not be true
            await hub.join(7, send, "bob")

        poll.published.clear()
        layer.deaf = False
        await eventually(lambda: not hub.down, "the hub back")
        assert layer.groups_added.count("room.8") == 2  # joined, and joined again
        assert 7 not in hub.rooms  # the closed socket is forgotten
        assert poll.published.is_set()
        await hub.join(7, send, "bob")
    finally:
        hub.reader.cancel()


@pytest.mark.slow
async def test_a_socket_opened_while_redis_is_down_is_told_unavailable_then_works_once_it_is_back(
    cluster_on_own_redis, own_redis
):
    (server,) = await cluster_on_own_redis.start(1)
    slug, [(_, cookie)] = await database_sync_to_async(make_room_and_users)(1)
    client = ChatClient("solo", cookie, slug, [server], 0)
    own_redis.kill()

    async with asyncio.timeout(30):
        # The handshake is answered (no HTTP 500), with the frame the page retries on.
        ws = await client.connect()
        frame = json.loads(await ws.recv())
        assert frame["type"] == "error" and frame["code"] == "unavailable"
        with pytest.raises(ConnectionClosed):
            await ws.recv()

        own_redis.start()
        while True:  # the hub re-subscribes within its probe interval
            ws = await client.connect()
            frame = json.loads(await ws.recv())
            if frame["type"] != "error":
                break
            await ws.close()
            await asyncio.sleep(0.5)  # retrying, as the page does, until asyncio.timeout's deadline
        assert frame["type"] == "ready"
        await ws.close()
    # Redis's absence is logged (with tracebacks from the layer's reader); no connection may raise out of the app.
    assert_no_app_errors(server, ASGI_ERROR_MARKERS)


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
