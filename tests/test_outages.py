"""While Redis is away: what was saved stays saved, and the logs say so once, not once a second."""

from __future__ import annotations

import logging
import math

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from chat import realtime, services
from chat.models import Message
from chatsite.logfilters import AtMostEvery


@pytest.fixture
def layer_state(monkeypatch):
    monkeypatch.setattr(realtime, "_logged_down_at", -math.inf)  # no outage logged in the last minute
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
