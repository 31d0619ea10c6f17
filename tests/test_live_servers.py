"""End-to-end tests against real Daphne processes sharing one Redis and one database.

Each test starts `python -m daphne ... chatsite.asgi:application` subprocesses
configured like production (DEBUG off, Redis pub/sub layer) but pointed at this
run's test database and channel-layer prefix, and talks to them over real
WebSockets. Rows are committed (transaction=True) so the servers see them.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import websockets
from channels.db import database_sync_to_async
from django.conf import settings
from django.db import connection
from websockets.exceptions import ConnectionClosed

from bench.serverprocess import ServerProcess
from chat import services, tokens
from chat.models import Message
from tests.conftest import session_cookie

pytestmark = pytest.mark.django_db(transaction=True)

APP = "chatsite.asgi:application"
READY_TIMEOUT = 15.0  # seconds for a server process to answer HTTP
FRAME_TIMEOUT = 5.0  # seconds to wait for a frame that must arrive
SILENCE = 1.0  # seconds a socket must stay quiet to count as "received nothing"


# --------------------------------------------------------------------------
# Server processes
# --------------------------------------------------------------------------


def subprocess_database_url() -> str:
    """Return a DATABASE_URL opening the test database this process is using right now."""
    db = connection.settings_dict
    engine = db["ENGINE"]
    name = str(db["NAME"])
    if engine == "django.db.backends.sqlite3":
        if name == ":memory:" or "mode=memory" in name:
            raise AssertionError("Live-server tests need a file-based SQLite test database, not an in-memory one.")
        return "sqlite:///" + str(Path(name).resolve())  # an absolute path gives sqlite:////abs/path
    if engine in {"django.db.backends.postgresql", "django.db.backends.postgresql_psycopg2"}:
        auth = quote(db.get("USER") or "", safe="")
        if db.get("PASSWORD"):
            auth += ":" + quote(db["PASSWORD"], safe="")
        host = db.get("HOST") or "localhost"
        host = quote(host, safe="") if host.startswith("/") else host  # a Unix socket directory
        port = f":{db['PORT']}" if db.get("PORT") else ""
        return f"postgres://{auth}@{host}{port}/{quote(name, safe='')}"
    raise AssertionError(f"No DATABASE_URL mapping for database engine {engine!r}.")


def channel_layer_prefix() -> str:
    """The prefix this run's channel layer uses (conftest makes it unique per run)."""
    prefix = settings.CHANNEL_LAYERS["default"].get("CONFIG", {}).get("prefix")
    # The test process itself may run on the in-memory layer; the servers still
    # need a prefix no other run uses.
    return prefix or f"test-live-{uuid.uuid4().hex[:12]}"


def server_env() -> dict[str, str]:
    env = os.environ.copy()
    env.update(
        DJANGO_SETTINGS_MODULE=settings.SETTINGS_MODULE,
        DATABASE_URL=subprocess_database_url(),
        SECRET_KEY=settings.SECRET_KEY,
        DEBUG="0",
        ALLOWED_HOSTS="127.0.0.1,localhost",
        CHANNEL_LAYER="redis",
        CHANNEL_LAYER_PREFIX=channel_layer_prefix(),
        REDIS_URL=settings.REDIS_URL,
        PYTHONUNBUFFERED="1",
    )
    return env


def ws_url(server: ServerProcess, slug: str, after: int | None = None) -> str:
    query = f"?after={after}" if after is not None else ""
    return f"ws://127.0.0.1:{server.port}/ws/rooms/{slug}/{query}"


class DaphneCluster:
    """Starts servers for one test and remembers them so teardown can kill every one."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.env = server_env()
        self.servers: list[ServerProcess] = []

    async def start(self, count: int = 1) -> list[ServerProcess]:
        names = [f"daphne-{len(self.servers) + i + 1}" for i in range(count)]
        new = [ServerProcess(name, "daphne", APP, self.env, self.log_dir / f"{name}.log") for name in names]
        self.servers.extend(new)  # before spawning: teardown must see them even if startup fails
        for server in new:
            server.spawn()
        await asyncio.gather(*(asyncio.to_thread(server.wait_ready, READY_TIMEOUT) for server in new))
        return new

    async def restart(self, server: ServerProcess) -> None:
        server.kill()
        server.spawn()
        await asyncio.to_thread(server.wait_ready, READY_TIMEOUT)

    def kill_all(self) -> None:
        for server in self.servers:
            server.kill()

    def logs(self) -> str:
        return "\n".join(server.log_tail() for server in self.servers)


@pytest.fixture
def daphne(transactional_db, tmp_path) -> Iterator[DaphneCluster]:
    # Depending on transactional_db makes these servers die before the database
    # is flushed (or dropped), so they never hold it open.
    cluster = DaphneCluster(tmp_path)
    try:
        yield cluster
    finally:
        cluster.kill_all()


# --------------------------------------------------------------------------
# WebSocket clients
# --------------------------------------------------------------------------


@pytest.fixture
def alice_cookie(user) -> str:
    return session_cookie(user)


@pytest.fixture
def bob_cookie(other_user) -> str:
    return session_cookie(other_user)


class Sockets:
    def __init__(self, logs: Callable[[], str]) -> None:
        self.logs = logs
        self.opened: list = []

    async def open(self, server: ServerProcess, cookie: str, slug: str, *, after: int | None = None):
        url = ws_url(server, slug, after)
        try:
            ws = await websockets.connect(
                url,
                origin=server.origin,
                additional_headers={"Cookie": f"{settings.SESSION_COOKIE_NAME}={cookie}"},
                open_timeout=FRAME_TIMEOUT,
                close_timeout=2,
            )
        except Exception as error:
            raise AssertionError(f"could not open {url}: {error!r}\n{self.logs()}") from error
        self.opened.append(ws)
        return ws

    async def join(self, server: ServerProcess, cookie: str, slug: str, *, after: int | None = None):
        """Open a socket and read up to its ready frame: (socket, frames before ready, ready frame)."""
        ws = await self.open(server, cookie, slug, after=after)
        before: list[dict] = []
        while True:
            frame = await self.recv(ws, f"the ready frame on {server.name} /{slug}/ after={after}")
            if frame["type"] == "ready":
                return ws, before, frame
            before.append(frame)

    async def recv(self, ws, waiting_for: str, timeout: float = FRAME_TIMEOUT, *, presence: bool = False) -> dict:
        """Return the next frame; presence frames, which come as people arrive and leave, only when asked for."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            try:
                raw = await asyncio.wait_for(ws.recv(), max(0.01, deadline - asyncio.get_running_loop().time()))
            except TimeoutError:
                raise AssertionError(
                    f"no frame within {timeout}s while waiting for {waiting_for}\n{self.logs()}"
                ) from None
            except ConnectionClosed as error:
                raise AssertionError(
                    f"socket closed ({error}) while waiting for {waiting_for}\n{self.logs()}"
                ) from None
            frame = json.loads(raw)
            if (frame["type"] == "presence") == presence:
                return frame

    async def send(self, ws, body: str, nonce: str | None = None) -> None:
        frame = json.dumps({"type": "send", "body": body, "nonce": nonce or uuid.uuid4().hex})
        try:
            await ws.send(frame)
        except ConnectionClosed as error:
            raise AssertionError(f"socket closed ({error}) before sending {body!r}\n{self.logs()}") from None

    async def recv_message(self, ws, waiting_for: str) -> dict:
        frame = await self.recv(ws, waiting_for)
        assert frame["type"] == "message", f"expected a message frame for {waiting_for}, got {frame}\n{self.logs()}"
        return frame["message"]

    async def assert_silent(self, ws, who: str, seconds: float = SILENCE) -> None:
        """Nothing but presence frames may arrive within `seconds`."""
        deadline = asyncio.get_running_loop().time() + seconds
        while (left := deadline - asyncio.get_running_loop().time()) > 0:
            try:
                raw = await asyncio.wait_for(ws.recv(), left)
            except TimeoutError:
                return
            except ConnectionClosed as error:
                raise AssertionError(
                    f"{who}: socket closed ({error}) instead of staying quiet\n{self.logs()}"
                ) from None
            if json.loads(raw)["type"] != "presence":
                raise AssertionError(f"{who} should have received nothing, got {raw}\n{self.logs()}")

    async def close_all(self) -> None:
        for ws in self.opened:
            try:
                await ws.close()
            except Exception:
                pass


@pytest.fixture
async def sockets(daphne) -> Sockets:
    opened = Sockets(daphne.logs)
    try:
        yield opened
    finally:
        await opened.close_all()


def summary(frame: dict) -> tuple:
    """(type, seq, body) of a frame, for comparing frame sequences in one assert."""
    message = frame.get("message") or {}
    return (frame.get("type"), message.get("seq"), message.get("body"))


# database_sync_to_async closes the worker thread's connection afterwards, so no
# session is left open when the test database is flushed or dropped.
@database_sync_to_async
def stored_messages(room) -> list[tuple[int, str, str]]:
    return list(Message.objects.filter(room=room).order_by("seq").values_list("seq", "body", "author__username"))


# --------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------


async def test_message_sent_to_one_server_process_reaches_a_socket_on_another(
    daphne, sockets, user, other_user, room, other_room, alice_cookie, bob_cookie
):
    server1, server2 = await daphne.start(2)
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


async def test_socket_idle_longer_than_redis_socket_timeout_still_receives(
    daphne, sockets, user, other_user, room, alice_cookie, bob_cookie
):
    # redis-py 8 defaults socket_timeout to 5 s: channel-layer reads on a Redis
    # connection idle longer than that time out, which killed idle consumers.
    server1, server2 = await daphne.start(2)
    alice, _, _ = await sockets.join(server1, alice_cookie, room.slug)
    bob, _, _ = await sockets.join(server2, bob_cookie, room.slug)
    bob_same_process, _, _ = await sockets.join(server1, bob_cookie, room.slug)

    await asyncio.sleep(7)  # both processes, and their Redis connections, idle

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


async def test_resume_after_server_restart_delivers_missed_messages_once_in_order(
    daphne, sockets, user, other_user, room, alice_cookie, bob_cookie
):
    server1, server2 = await daphne.start(2)
    alice, _, _ = await sockets.join(server1, alice_cookie, room.slug)

    async def alice_says(body: str) -> int:
        await sockets.send(alice, body)
        message = await sockets.recv_message(alice, f"alice's echo of {body!r}")
        assert message["body"] == body
        return message["seq"]

    assert await alice_says("m1") == 1
    # Bob joins late and is replayed what he missed, then gets the room live.
    bob, replayed, ready = await sockets.join(server2, bob_cookie, room.slug, after=0)
    assert [summary(f) for f in replayed] == [("message", 1, "m1")], daphne.logs()
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
        raise AssertionError(f"bob's socket stayed open after its server was killed\n{daphne.logs()}") from None
    else:
        raise AssertionError(f"bob's socket should have been dropped with its server, got {frame}\n{daphne.logs()}")

    assert [await alice_says(body) for body in ("m3", "m4", "m5")] == [3, 4, 5]

    await daphne.restart(server2)  # same port, as a client reconnecting to one URL would see
    bob, replayed, ready = await sockets.join(server2, bob_cookie, room.slug, after=bob_last_seq)
    assert [summary(f) for f in replayed] == [
        ("message", 3, "m3"),
        ("message", 4, "m4"),
        ("message", 5, "m5"),
    ], daphne.logs()
    assert ready == {"type": "ready", "last_seq": 5, "last_change": 0}

    assert await alice_says("m6") == 6
    live = await sockets.recv_message(bob, "m6, live, after the resume")
    assert (live["seq"], live["body"]) == (6, "m6")
    await sockets.assert_silent(bob, "bob after m6")
    assert await stored_messages(room) == [(seq, f"m{seq}", user.username) for seq in range(1, 7)]


async def test_edit_and_delete_on_one_process_reach_a_socket_on_another(
    daphne, sockets, user, other_user, room, alice_cookie, bob_cookie
):
    server1, server2 = await daphne.start(2)
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
    daphne, sockets, user, other_user, room, alice_cookie, bob_cookie
):
    daphne.env["CHAT_PRESENCE_TTL"] = "1.5"  # a short expiry, for the test
    server1, server2 = await daphne.start(2)
    await sockets.join(server1, alice_cookie, room.slug)
    bob, _, _ = await sockets.join(server2, bob_cookie, room.slug)
    presence = await sockets.recv(bob, "presence with alice and bob", presence=True)
    assert presence["users"] == [user.username, other_user.username]

    server1.kill()  # SIGKILL: no goodbye, nobody removes alice's entry
    presence = await sockets.recv(bob, "presence without alice, once her entry expires", timeout=6, presence=True)
    assert presence == {"type": "presence", "users": [other_user.username]}


async def test_member_removed_on_one_process_is_closed_on_another_and_refused_everywhere(
    daphne, sockets, user, other_user, private_room, alice_cookie, bob_cookie
):
    server1, server2 = await daphne.start(2)
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


async def test_the_docs_bot_follows_a_room_by_long_poll_and_answers(
    daphne, sockets, tmp_path, user, other_user, room, alice_cookie
):
    (server,) = await daphne.start(1)
    secret = await database_sync_to_async(lambda: tokens.token_create(user=other_user, name="pingbot")[1])()
    alice, _, _ = await sockets.join(server, alice_cookie, room.slug)
    bot_path = tmp_path / "pingbot.py"
    bot_path.write_text(docs_bot_code())
    env = {**os.environ, "CHAT_URL": server.origin, "CHAT_TOKEN": secret, "CHAT_ROOM": room.slug}
    bot = await asyncio.create_subprocess_exec(
        sys.executable, str(bot_path), env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        hello = await sockets.recv_message(alice, "the bot's hello, posted through the API")
        assert (hello["author"], hello["body"]) == (other_user.username, "pingbot is here: say ping")
        await asyncio.sleep(0.5)  # the bot is long-polling
        await sockets.send(alice, "ping")
        assert (await sockets.recv_message(alice, "alice's ping"))["body"] == "ping"
        pong = await sockets.recv_message(alice, "the bot's pong, woken by the long-poll")
        assert (pong["author"], pong["body"]) == (other_user.username, f"pong, {user.username}")
        await sockets.assert_silent(alice, "alice, after one pong")
    finally:
        bot.kill()
        output = (await bot.communicate())[0].decode()
    assert "retrying" not in output, output
