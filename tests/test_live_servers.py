"""End-to-end tests against real uvicorn processes sharing one Redis and one database.

Each test starts the site as the README runs it (uvicorn; tests/servers.py),
configured like production (DEBUG off, Redis pub/sub layer) but pointed at this
run's test database and channel-layer prefix, and talks to them over real
WebSockets. Rows are committed (transaction=True) so the servers see them.
Two of them also run on daphne, and on a uvicorn and a daphne sharing Redis (PAIRS).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from pathlib import Path

import pytest
import websockets
from channels.db import database_sync_to_async
from django.conf import settings
from websockets.exceptions import ConnectionClosed

from chat import services
from tests.servers import FRAME_TIMEOUT, TcpProxy, stored_messages, summary, ws_url

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


# --------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------


# The README's server, daphne (still supported), and the two sharing one Redis (a rolling switch).
PAIRS = [
    pytest.param(("uvicorn", "uvicorn"), id="uvicorn"),
    pytest.param(("daphne", "daphne"), id="daphne"),
    pytest.param(("uvicorn", "daphne"), id="uvicorn+daphne"),
]


@pytest.mark.parametrize("kinds", PAIRS)
async def test_message_sent_to_one_server_process_reaches_a_socket_on_another(
    cluster, sockets, user, other_user, room, other_room, alice_cookie, bob_cookie, kinds
):
    server1, server2 = await cluster.start(kinds=kinds)
    alice, _, alice_ready = await sockets.join(server1, alice_cookie, room.slug)
    bob, _, bob_ready = await sockets.join(server2, bob_cookie, room.slug)
    bob_elsewhere, _, _ = await sockets.join(server2, bob_cookie, other_room.slug)
    assert alice_ready["last_seq"] == bob_ready["last_seq"] == 0

    nonce = uuid.uuid4().hex
    await sockets.send(alice, "hello from process 1", nonce)

    to_bob = await sockets.recv_message(bob, "alice's message relayed to bob on the other process")
    to_alice = await sockets.recv_message(alice, "alice's own message echoed on process 1")
    assert to_bob == to_alice
    assert to_bob["seq"] == 1
    assert to_bob["body"] == "hello from process 1"
    assert to_bob["author"] == user.username
    assert to_bob["room"] == room.slug
    assert to_bob["nonce"] == nonce

    # Exactly once on each socket, and nothing in the other room.
    await asyncio.gather(
        sockets.assert_silent(bob, "bob (second copy)"),
        sockets.assert_silent(alice, "alice (second copy)"),
        sockets.assert_silent(bob_elsewhere, f"bob's socket in /{other_room.slug}/"),
    )
    assert await stored_messages(room) == [(1, "hello from process 1", user.username)]
    assert await stored_messages(other_room) == []


async def test_sockets_idle_for_7_seconds_still_receive_on_both_processes(
    cluster, sockets, user, other_user, room, alice_cookie, bob_cookie
):
    """After 7 s of silence a message still reaches sockets on its own process and on another.

    This guards no setting. It was written for the channel layer's Redis host
    settings (settings.py: socket_timeout 30, keepalive, health checks), but it
    passes with all of them removed (redis-py's 5 s socket_timeout), on uvicorn
    and on daphne: the hub publishes a probe to its own channel every second, so
    no channel-layer connection is idle, and channels_redis's pub/sub reader reads
    with a timeout of its own (0.1 s), not socket_timeout. What it does guard is
    the hub's subscription living through a quiet spell, on both processes.
    """
    server1, server2 = await cluster.start(2)
    alice, _, _ = await sockets.join(server1, alice_cookie, room.slug)
    bob, _, _ = await sockets.join(server2, bob_cookie, room.slug)
    bob_same_process, _, _ = await sockets.join(server1, bob_cookie, room.slug)

    # The scenario: both processes, and their sockets, idle for longer than redis-py's default socket_timeout.
    await asyncio.sleep(7)

    await sockets.send(alice, "after a long silence")
    receivers = [(bob, "bob on the other process"), (bob_same_process, "bob on alice's process"), (alice, "alice")]
    for ws, where in receivers:
        message = await sockets.recv_message(ws, f"the message after 7 s idle, at {where}")
        assert (message["seq"], message["body"]) == (1, "after a long silence"), where

    for server in (server1, server2):
        log = server.log_text()
        for marker in ("Traceback", "Exception"):
            assert marker not in log, f"{marker!r} in {server.name}'s log\n{server.log_tail()}"
    assert await stored_messages(room) == [(1, "after a long silence", user.username)]


@pytest.mark.parametrize("kinds", PAIRS)
async def test_resume_after_server_restart_delivers_missed_messages_once_in_order(
    cluster, sockets, user, other_user, room, alice_cookie, bob_cookie, kinds
):
    server1, server2 = await cluster.start(kinds=kinds)  # bob's, the second, is killed and restarted
    alice, _, _ = await sockets.join(server1, alice_cookie, room.slug)

    async def alice_says(body: str) -> int:
        await sockets.send(alice, body)
        message = await sockets.recv_message(alice, f"alice's echo of {body!r}")
        assert message["body"] == body
        return message["seq"]

    assert await alice_says("m1") == 1
    # Bob joins late and is replayed what he missed, then gets the room live.
    bob, replayed, ready = await sockets.join(server2, bob_cookie, room.slug, after=0)
    assert [summary(f) for f in replayed] == [("message", 1, "m1")], cluster.logs()
    assert ready["last_seq"] == 1
    assert await alice_says("m2") == 2
    live = await sockets.recv_message(bob, "m2, live, at bob")
    bob_last_seq = live["seq"]
    assert bob_last_seq == 2

    server2.kill()  # SIGKILL: no close frame, no cleanup
    try:
        while True:  # presence frames sent before the kill may still be in flight
            frame = await asyncio.wait_for(bob.recv(), FRAME_TIMEOUT)
            if json.loads(frame)["type"] != "presence":
                break
    except ConnectionClosed:
        pass  # dropped with its server, as it should be
    except TimeoutError:
        raise AssertionError(f"bob's socket stayed open after its server was killed\n{cluster.logs()}") from None
    else:
        raise AssertionError(f"bob's socket should have been dropped with its server, got {frame}\n{cluster.logs()}")

    assert [await alice_says(body) for body in ("m3", "m4", "m5")] == [3, 4, 5]

    await cluster.restart(server2)  # same port, as a client reconnecting to one URL would see
    bob, replayed, ready = await sockets.join(server2, bob_cookie, room.slug, after=bob_last_seq)
    assert [summary(f) for f in replayed] == [
        ("message", 3, "m3"),
        ("message", 4, "m4"),
        ("message", 5, "m5"),
    ], cluster.logs()
    assert ready == {"type": "ready", "last_seq": 5, "last_change": 0}

    assert await alice_says("m6") == 6
    live = await sockets.recv_message(bob, "m6, live, after the resume")
    assert (live["seq"], live["body"]) == (6, "m6")
    await sockets.assert_silent(bob, "bob after m6")
    assert await stored_messages(room) == [(seq, f"m{seq}", user.username) for seq in range(1, 7)]


async def test_edit_and_delete_on_one_process_reach_a_socket_on_another(
    cluster, sockets, user, other_user, room, alice_cookie, bob_cookie
):
    server1, server2 = await cluster.start(2)
    alice, _, _ = await sockets.join(server1, alice_cookie, room.slug)
    bob, _, _ = await sockets.join(server2, bob_cookie, room.slug)
    await sockets.send(alice, "helo")
    sent = await sockets.recv_message(alice, "alice's own message")
    await sockets.recv_message(bob, "alice's message on the other process")

    await alice.send(json.dumps({"type": "edit", "id": sent["id"], "body": "hello"}))
    updated = await sockets.recv(bob, "the edit relayed to bob on the other process")
    assert (updated["type"], updated["message"]["body"], updated["change"]) == ("message_updated", "hello", 1)

    await alice.send(json.dumps({"type": "delete", "id": sent["id"]}))
    deleted = await sockets.recv(bob, "the deletion relayed to bob on the other process")
    assert deleted == {"type": "message_deleted", "id": sent["id"], "seq": 1, "change": 2}
    await sockets.assert_silent(bob, "bob (a second copy of a change)")


async def test_users_of_a_killed_server_process_drop_out_of_presence(
    cluster, sockets, user, other_user, room, alice_cookie, bob_cookie
):
    cluster.env["CHAT_PRESENCE_TTL"] = "1.5"  # a short expiry, for the test
    server1, server2 = await cluster.start(2)
    await sockets.join(server1, alice_cookie, room.slug)
    bob, _, _ = await sockets.join(server2, bob_cookie, room.slug)
    presence = await sockets.recv(bob, "presence with alice and bob", presence=True)
    assert presence["users"] == [user.username, other_user.username]

    server1.kill()  # SIGKILL: no goodbye, nobody removes alice's entry
    presence = await sockets.recv(bob, "presence without alice, once her entry expires", timeout=6, presence=True)
    assert presence == {"type": "presence", "users": [other_user.username]}


async def test_member_removed_on_one_process_is_closed_on_another_and_refused_everywhere(
    cluster, sockets, user, other_user, private_room, alice_cookie, bob_cookie
):
    server1, server2 = await cluster.start(2)
    alice, _, _ = await sockets.join(server1, alice_cookie, private_room.slug)
    bob, _, _ = await sockets.join(server2, bob_cookie, private_room.slug)

    await database_sync_to_async(services.member_remove)(room=private_room, actor=user, username=other_user.username)

    frame = await sockets.recv(bob, "the removal, on the other process", timeout=1)
    assert (frame["type"], frame["code"]) == ("error", "removed")
    with pytest.raises(ConnectionClosed) as closed:
        await asyncio.wait_for(bob.recv(), 1)
    assert closed.value.rcvd.code == 4403
    for server in (server1, server2):
        with pytest.raises(websockets.InvalidStatus) as refused:
            await websockets.connect(
                ws_url(server, private_room.slug),
                origin=server.origin,
                additional_headers={"Cookie": f"{settings.SESSION_COOKIE_NAME}={bob_cookie}"},
                open_timeout=FRAME_TIMEOUT,
            )
        assert refused.value.response.status_code == 403
    await sockets.assert_silent(alice, "alice, who stays")


def docs_bot_code() -> str:
    """The bot example of docs/api.md, exactly as the docs show it."""
    text = (Path(settings.BASE_DIR) / "docs" / "api.md").read_text()
    section = text.split("## A bot", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


class RequestWatchingProxy(TcpProxy):
    """A proxy that remembers the request line of each connection it forwards."""

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self.requests: list[str] = []
        self.arrived = asyncio.Event()

    def forwarded(self, head: bytes) -> None:
        self.requests.append(head.split(b"\r\n", 1)[0].decode(errors="replace"))
        self.arrived.set()

    async def seen(self, fragment: str) -> None:
        """Return once a request whose line contains `fragment` has been passed on to the server."""
        while not any(fragment in line for line in self.requests):
            self.arrived.clear()
            await self.arrived.wait()


async def test_the_docs_bot_follows_a_room_by_long_poll_and_answers(
    cluster, sockets, tmp_path, user, other_user, room, alice_cookie
):
    (server,) = await cluster.start(1)
    secret = await database_sync_to_async(lambda: services.token_create(user=other_user, name="pingbot")[1])()
    alice, _, _ = await sockets.join(server, alice_cookie, room.slug)
    bot_path = tmp_path / "pingbot.py"
    bot_path.write_text(docs_bot_code())
    proxy = RequestWatchingProxy(server.port)
    await proxy.start()
    env = {**os.environ, "CHAT_URL": proxy.origin, "CHAT_TOKEN": secret, "CHAT_ROOM": room.slug}
    bot = await asyncio.create_subprocess_exec(
        sys.executable, str(bot_path), env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        hello = await sockets.recv_message(alice, "the bot's hello, posted through the API")
        assert (hello["author"], hello["body"]) == (other_user.username, "pingbot is here: say ping")
        # The bot's long-poll for what comes after its hello has reached the server.
        try:
            await asyncio.wait_for(proxy.seen(f"/poll?after={hello['seq']}&"), FRAME_TIMEOUT)
        except TimeoutError:
            raise AssertionError(f"the bot never long-polled after its hello: {proxy.requests}") from None
        await sockets.send(alice, "ping")
        assert (await sockets.recv_message(alice, "alice's ping"))["body"] == "ping"
        pong = await sockets.recv_message(alice, "the bot's pong, woken by the long-poll")
        assert (pong["author"], pong["body"]) == (other_user.username, f"pong, {user.username}")
        await sockets.assert_silent(alice, "alice, after one pong")
    finally:
        bot.kill()
        output = (await bot.communicate())[0].decode()
        await proxy.close()
    assert "retrying" not in output, output
