from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings

from chat import ephemeral, services
from chat.models import Room
from chatsite.asgi import application
from tests.helpers import ORIGIN, session_cookie
from tests.servers import RedisServer, ServerCluster, SmtpServer, Sockets, TaskWorker

# A prefix of its own keeps this run's pub/sub traffic apart from a site, or
# another test run, using the same Redis.
TEST_LAYER_PREFIX = f"test-{uuid.uuid4().hex[:12]}"
settings.CHANNEL_LAYER_PREFIX = TEST_LAYER_PREFIX  # also the prefix of chat/ephemeral.py's keys
if "CONFIG" in settings.CHANNEL_LAYERS["default"] and "hosts" in settings.CHANNEL_LAYERS["default"]["CONFIG"]:
    settings.CHANNEL_LAYERS["default"]["CONFIG"]["prefix"] = TEST_LAYER_PREFIX

# Connections that outlive a request live on in the thread pools the async
# tests use, where nothing closes them, and PostgreSQL then refuses to drop
# the test database. The site's persistent connections are a production
# setting; the tests open a connection per use, as Django's default does.
settings.DATABASES["default"]["CONN_MAX_AGE"] = 0

# Tests post faster, and open more sockets per user, than people do; the limits
# have tests of their own that set them back. Server processes the tests start
# inherit these through the environment.
for name, value in (("CHAT_MESSAGE_RATE_LIMIT", 100_000), ("CHAT_MAX_SOCKETS_PER_USER", 1_000)):
    os.environ[name] = str(value)
    setattr(settings, name, value)

# Each user fixture hashes a password; at Django's 1,000,000 iterations that
# was most of a fast test's time.
settings.PASSWORD_HASHERS = ["tests.helpers.FastPBKDF2PasswordHasher", *settings.PASSWORD_HASHERS]


@pytest.fixture(autouse=True)
def redis_not_away(monkeypatch):
    """A test that broke Redis must not leave the next one skipping it (chat/ephemeral.py's redis_away)."""
    monkeypatch.setattr(ephemeral, "_away_until", 0.0)


@pytest.fixture
def user(django_user_model):
    return django_user_model.objects.create_user("alice", password="pw-alice-123")


@pytest.fixture
def other_user(django_user_model):
    return django_user_model.objects.create_user("bob", password="pw-bob-123")


@pytest.fixture
def third_user(django_user_model):
    return django_user_model.objects.create_user("carol", password="pw-carol-123")


@pytest.fixture
def room(user) -> Room:
    return services.room_create(slug="general", name="General", topic="Anything goes", created_by=user)


@pytest.fixture
def other_room(user) -> Room:
    return services.room_create(slug="random", name="Random", created_by=user)


@pytest.fixture
def private_room(user, other_user) -> Room:
    """Owned by alice, with bob as a member; carol is not in it."""
    room = services.room_create(slug="secret", name="Secret", is_private=True, created_by=user)
    services.member_add(room=room, actor=user, username=other_user.username)
    return room


@pytest.fixture
async def ws_connect() -> AsyncIterator[Callable]:
    """Open sockets through the full ASGI stack (origin check, auth, routing); closed at teardown."""
    opened: list[WebsocketCommunicator] = []

    async def connect(
        user=None,
        room: Room | str = "general",
        *,
        after: int | str | None = None,
        changes_after: int | None = None,
        origin: str | None = ORIGIN,
        app=application,
    ) -> tuple[WebsocketCommunicator, bool]:
        slug = room if isinstance(room, str) else room.slug
        query = {"after": after, "changes_after": changes_after}
        path = f"/ws/rooms/{slug}/?" + "&".join(f"{key}={value}" for key, value in query.items() if value is not None)
        headers = []
        if origin is not None:
            headers.append((b"origin", origin.encode()))
        if user is not None:
            cookie = await database_sync_to_async(session_cookie)(user)
            headers.append((b"cookie", f"{settings.SESSION_COOKIE_NAME}={cookie}".encode()))
        communicator = WebsocketCommunicator(app, path, headers=headers)
        connected, _ = await communicator.connect(timeout=5)
        opened.append(communicator)
        return communicator, connected

    yield connect
    for communicator in opened:
        # A socket whose test already failed (a receive timed out, which
        # cancels the application) must not fail the teardown as well.
        if not communicator.future.done():
            await communicator.disconnect()


# --------------------------------------------------------------------------
# Server processes and real WebSocket clients (tests/servers.py)
# --------------------------------------------------------------------------


@pytest.fixture
def cluster(transactional_db, tmp_path) -> Iterator[ServerCluster]:
    """Server processes as the README runs them (uvicorn); each test's own, killed at teardown."""
    # Depending on transactional_db makes these servers die before the database
    # is flushed (or dropped), so they never hold it open.
    servers = ServerCluster(tmp_path)
    try:
        yield servers
    finally:
        servers.kill_all()


@pytest.fixture
def own_redis(tmp_path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.thaw()  # a stopped process cannot die of SIGKILL until it runs again
            server.kill()


@pytest.fixture
def cluster_on_own_redis(own_redis, cluster) -> ServerCluster:
    """tests/conftest.py's `cluster`, on this test's own Redis; its servers are killed before that Redis."""
    cluster.env["REDIS_URL"] = own_redis.url
    return cluster


@pytest.fixture
def smtp_server(tmp_path) -> Iterator[SmtpServer]:
    server = SmtpServer(tmp_path / "smtp")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def task_worker(cluster, smtp_server, tmp_path) -> Iterator[Callable[..., TaskWorker]]:
    """Starts `manage.py db_worker` on this test's database, sending mail to `smtp_server`; killed at teardown."""
    started: list[TaskWorker] = []

    def start(**env: str) -> TaskWorker:
        worker = TaskWorker({**cluster.env, **smtp_server.env(), **env}, tmp_path / "worker.log")
        started.append(worker)
        worker.start()
        return worker

    try:
        yield start
    finally:
        for worker in started:
            worker.stop()


@pytest.fixture
async def sockets(cluster) -> AsyncIterator[Sockets]:
    opened = Sockets(cluster.logs)
    try:
        yield opened
    finally:
        await opened.close_all()


@pytest.fixture
def alice_cookie(user) -> str:
    return session_cookie(user)


@pytest.fixture
def bob_cookie(other_user) -> str:
    return session_cookie(other_user)


def pytest_sessionfinish(session, exitstatus) -> None:
    # Django removes the SQLite test database but not its WAL side files.
    test_name = settings.DATABASES["default"].get("TEST", {}).get("NAME")
    if test_name and settings.DATABASES["default"]["ENGINE"].endswith("sqlite3"):
        for suffix in ("-wal", "-shm"):
            Path(test_name + suffix).unlink(missing_ok=True)
