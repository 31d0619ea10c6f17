"""While Redis or the database is away: what was saved stays saved, and the logs say so once, not once a second.

The database's outage for real (a PostgreSQL of the test's own, restarted
under chat load) is tests/reliability/test_database.py; here the queries fail
on purpose, and every query of the request fails, the session's included.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math

import pytest
from channels.db import database_sync_to_async
from django.conf import settings
from django.db import OperationalError, connection
from django.db.backends.signals import connection_created
from django.test import Client
from redis.exceptions import ConnectionError as RedisConnectionError

from chat import database, ephemeral, realtime, services
from chat.models import Message
from chatsite.logfilters import AtMostEvery
from tests.helpers import eventually


@pytest.fixture
def layer_state(monkeypatch):
    monkeypatch.setattr(realtime, "_logged_down_at", -math.inf)  # no outage logged in the last minute
    realtime._layer_down = False  # nor one going on (an earlier test's failed publish); not undone by undo()
    yield
    realtime.layer_back()  # the outage flag is per process: leave it as found


@pytest.mark.django_db
def test_messages_saved_while_redis_is_away_stay_saved_and_the_outage_is_logged_once(
    room, user, monkeypatch, caplog, django_capture_on_commit_callbacks, layer_state
):
    def redis_away(message):
        raise RedisConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    monkeypatch.setattr(realtime, "publish_message", redis_away)
    with caplog.at_level(logging.INFO):
        for n in range(3):
            with django_capture_on_commit_callbacks(execute=True):
                services.message_create(room=room, author=user, body=f"during the outage {n}")
        monkeypatch.undo()
        with django_capture_on_commit_callbacks(execute=True):
            services.message_create(room=room, author=user, body="after it")

    assert list(Message.objects.filter(room=room).values_list("seq", flat=True)) == [1, 2, 3, 4]
    logged = [record.getMessage() for record in caplog.records if record.name == "chat.realtime"]
    assert len(logged) == 2
    assert logged[0].startswith("The channel layer (Redis) is unreachable")
    assert logged[1] == "The channel layer (Redis) answers again."
    assert not [record for record in caplog.records if "on_commit" in record.getMessage()]


@pytest.mark.django_db(transaction=True)
async def test_a_publish_the_loop_could_not_make_is_logged_once_and_the_hubs_read_the_database_now(
    room, user, monkeypatch, caplog, layer_state
):
    async def redis_away(group: str, event: dict) -> None:
        raise RedisConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    read_now = []
    monkeypatch.setattr(realtime, "_group_send_now", redis_away)
    monkeypatch.setattr(realtime, "_missed_listeners", [lambda: read_now.append(True)])
    realtime.publish_through_loop()  # what the server's hub does
    with caplog.at_level(logging.INFO):
        for n in range(2):
            await database_sync_to_async(services.message_create)(room=room, author=user, body=f"m{n}")
        await eventually(lambda: len(read_now) == 2)
    assert await database_sync_to_async(Message.objects.filter(room=room).count)() == 2
    logged = [record.getMessage() for record in caplog.records if record.name == "chat.realtime"]
    assert len(logged) == 1 and logged[0].startswith("The channel layer (Redis) is unreachable")


async def test_while_redis_counts_as_away_a_sockets_rate_check_fails_open_without_keeping_redis_away():
    ephemeral.skip_redis(0.5)  # a call failed a moment ago
    away_until = ephemeral._away_until
    assert await ephemeral.rate_limit_async("messages:1", 1, 10) == 0
    assert await ephemeral.rate_limit_async("messages:1", 1, 10) == 0  # not counted: the limit of 1 would refuse
    assert ephemeral._away_until == away_until  # Redis comes back when the moment is over, however many sends


def test_a_repeated_log_record_is_let_through_once_a_minute_with_a_count_of_the_rest(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr("chatsite.logfilters.time.monotonic", lambda: clock[0])
    once_a_minute = AtMostEvery(seconds=60)

    def record(msg: str, name: str = "channels_redis.pubsub") -> logging.LogRecord:
        return logging.LogRecord(name, logging.ERROR, __file__, 1, msg, None, None)

    shown = []
    for second in range(125):  # a record a second for just over two minutes
        clock[0] = 1000.0 + second
        if once_a_minute.filter(entry := record("Unexpected exception in receive task")):
            shown.append((second, entry.getMessage()))
    assert shown == [
        (0, "Unexpected exception in receive task"),
        (60, "Unexpected exception in receive task [59 more like this since the last one shown]"),
        (120, "Unexpected exception in receive task [59 more like this since the last one shown]"),
    ]
    # Another message, or the same one from another logger, is its own kind.
    assert once_a_minute.filter(record("Unexpected exception while cleaning-up channel:"))
    assert once_a_minute.filter(record("Unexpected exception in receive task", name="other"))


@contextlib.contextmanager
def database_away():
    """Every query on this thread's connection fails the way a stopped PostgreSQL makes it fail."""

    def refuse(execute, sql, params, many, context):
        raise OperationalError('connection to server at "127.0.0.1", port 5432 failed: Connection refused')

    with connection.execute_wrapper(refuse):
        yield


@pytest.fixture
def database_state(monkeypatch):
    monkeypatch.setattr(database, "_down", False)  # the outage flag is per process: leave it as found


@pytest.mark.django_db
def test_while_the_database_is_away_a_page_is_a_friendly_503_that_needs_no_database(user, room, database_state):
    browser = Client()
    browser.force_login(user)
    with database_away():  # the session and the user cannot be read either
        response = browser.get(f"/rooms/{room.slug}/")

    assert response.status_code == 503
    assert response["Retry-After"] == str(database.RETRY_AFTER)
    assert response["Content-Type"].startswith("text/html")
    assert "Content-Security-Policy" in response  # the answer passed the other middleware
    page = response.content.decode()
    assert "Back in a moment" in page and "cannot reach its database" in page
    assert "Traceback" not in page and "OperationalError" not in page
    assert "Log in" not in page  # the header does not pretend to know who is signed in
    # The session cookie is kept: nobody is signed out by an outage.
    assert settings.SESSION_COOKIE_NAME not in response.cookies
    assert browser.get(f"/rooms/{room.slug}/").status_code == 200  # and once it is back, the page works


@pytest.mark.django_db
def test_while_the_database_is_away_the_api_answers_503_with_its_json_error_shape(user, room, database_state):
    secret = services.token_create(user=user, name="bot")[1]
    with database_away():
        responses = [
            Client().get(f"/api/rooms/{room.slug}/messages", headers={"Authorization": f"Bearer {secret}"}),
            Client().get("/api/rooms/", headers={"Authorization": f"Bearer {secret}"}),
        ]
    for response in responses:
        assert response.status_code == 503
        assert response["Content-Type"] == "application/json"
        assert response["Retry-After"] == str(database.RETRY_AFTER)
        assert response.json() == {
            "error": {
                "code": "database_unavailable",
                "detail": f"The database is briefly unavailable; try again in {database.RETRY_AFTER} s.",
            }
        }


@pytest.mark.django_db
def test_a_database_outage_is_logged_once_and_its_end_once_not_a_traceback_per_request(
    user, room, caplog, database_state
):
    browser = Client()
    browser.force_login(user)
    with caplog.at_level(logging.INFO), database_away():
        for path in ("/", f"/rooms/{room.slug}/", "/api/rooms/", "/"):
            assert browser.get(path).status_code == 503
    with caplog.at_level(logging.INFO):
        connection_created.send(sender=type(connection), connection=connection)  # a connection opens: it is back
        assert browser.get("/").status_code == 200
    logged = [(record.name, record.getMessage()) for record in caplog.records]
    assert [name for name, _ in logged] == ["chat.database", "chat.database"], logged
    assert logged[0][1].startswith("The database is unreachable; requests get 503 and sends not_saved")
    assert logged[1][1] == "The database answers again."
    assert not [record for record in caplog.records if record.exc_info]


async def test_the_per_user_socket_cap_fails_open_while_redis_is_away(monkeypatch, caplog):
    async def refused(*args, **kwargs):
        raise RedisConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    monkeypatch.setattr(settings, "CHANNEL_LAYER", "redis")
    monkeypatch.setattr(ephemeral.aioredis.Redis, "eval", refused)
    monkeypatch.setattr(ephemeral, "_warned_at", {})  # no warning given in the last minute
    with caplog.at_level(logging.WARNING):
        opened = [await ephemeral.socket_open(user_id=1, socket_id=f"s{n}", cap=1) for n in range(3)]
    assert opened == [True, True, True]  # over the cap of 1, and not refused
    warnings = [r.getMessage() for r in caplog.records if "socket cap is not checked" in r.getMessage()]
    assert len(warnings) == 1


async def test_more_calls_at_once_than_redis_connections_wait_their_turn_and_redis_stays_present(monkeypatch):
    # A reconnect storm makes thousands of these calls at once: redis-py's
    # default pool raised MaxConnectionsError past its size, and that counted as Redis being away.
    monkeypatch.setattr(settings, "CHANNEL_LAYER", "redis")
    monkeypatch.setattr(ephemeral, "REDIS_POOL_SIZE", 2)
    monkeypatch.setattr(ephemeral, "_clients", ephemeral.weakref.WeakKeyDictionary())  # a pool of 2 for this loop
    calls = [ephemeral.socket_open(user_id=7, socket_id=f"storm-{n}", cap=100) for n in range(50)]
    try:
        assert await asyncio.gather(*calls) == [True] * 50
        assert not ephemeral.redis_away()
        pool = ephemeral.client().connection_pool
        assert len(pool._available_connections) + len(pool._in_use_connections) <= 2
    finally:
        for n in range(50):
            await ephemeral.socket_close(user_id=7, socket_id=f"storm-{n}")
