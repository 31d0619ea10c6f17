from __future__ import annotations

import asyncio
import threading
from unittest import mock

import pytest
from channels.db import database_sync_to_async
from django.core.exceptions import ValidationError
from django.db import IntegrityError, connection, connections

from chat import realtime, services
from chat.models import Message, Room
from chatsite.postgresql import base as postgresql_base
from tests.helpers import eventually

pytestmark = pytest.mark.django_db


def test_messages_get_consecutive_seqs_per_room(room, other_room, user):
    first, _ = services.message_create(room=room, author=user, body="one")
    second, _ = services.message_create(room=room, author=user, body="two")
    elsewhere, _ = services.message_create(room=other_room, author=user, body="three")

    assert (first.seq, second.seq, elsewhere.seq) == (1, 2, 1)
    room.refresh_from_db()
    assert room.last_seq == 2
    # Stamped as the second message was taken, and read back as an aware datetime on both databases.
    assert first.created_at <= room.last_message_at <= second.created_at


@pytest.mark.django_db(transaction=True)
def test_seq_is_gapless_under_concurrent_sends(room, django_user_model):
    senders = [django_user_model.objects.create_user(f"sender{i}") for i in range(6)]
    per_sender = 15
    errors: list[BaseException] = []
    start = threading.Barrier(len(senders))

    def send_all(author) -> None:
        try:
            start.wait()
            for n in range(per_sender):
                services.message_create(room=Room.objects.get(pk=room.pk), author=author, body=f"{author} {n}")
        except BaseException as error:  # reported below; a thread must not swallow it
            errors.append(error)
        finally:
            connections.close_all()

    with mock.patch.object(realtime, "publish_message"):
        threads = [threading.Thread(target=send_all, args=(author,)) for author in senders]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)

    assert errors == []
    seqs = sorted(Message.objects.filter(room=room).values_list("seq", flat=True))
    total = len(senders) * per_sender
    assert seqs == list(range(1, total + 1))
    room.refresh_from_db()
    assert room.last_seq == total


def test_retry_with_same_nonce_returns_original_and_creates_nothing(room, user):
    original, created = services.message_create(room=room, author=user, body="hello", nonce="abc")
    retried, created_again = services.message_create(room=room, author=user, body="hello", nonce="abc")

    assert created and not created_again
    assert retried.pk == original.pk
    assert Message.objects.count() == 1
    room.refresh_from_db()
    assert room.last_seq == 1


def test_same_nonce_from_another_author_is_a_different_message(room, user, other_user):
    mine, _ = services.message_create(room=room, author=user, body="hi", nonce="abc")
    theirs, created = services.message_create(room=room, author=other_user, body="hi", nonce="abc")
    assert created and theirs.pk != mine.pk and theirs.seq == 2


def test_nonce_reused_in_another_room_is_rejected(room, other_room, user):
    services.message_create(room=room, author=user, body="hi", nonce="abc")
    with pytest.raises(services.ChatError) as error:
        services.message_create(room=other_room, author=user, body="hi", nonce="abc")
    assert error.value.code == "invalid_nonce"
    assert Message.objects.filter(room=other_room).count() == 0


@pytest.mark.django_db(transaction=True)
def test_concurrent_sends_with_one_nonce_store_one_row(room, user):
    results: list[Message] = []
    start = threading.Barrier(5)

    def send() -> None:
        try:
            start.wait()
            results.append(services.message_create(room=room, author=user, body="once", nonce="same")[0])
        finally:
            connections.close_all()

    with mock.patch.object(realtime, "publish_message"):
        threads = [threading.Thread(target=send) for _ in range(5)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)

    assert len(results) == 5
    assert {message.pk for message in results} == {Message.objects.get().pk}
    room.refresh_from_db()
    assert room.last_seq == 1


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ("", "empty_body"),
        ("   \n\t ", "empty_body"),
        ("x" * 4001, "body_too_long"),
        (None, "invalid_body"),
        (42, "invalid_body"),
    ],
)
def test_bad_body_is_rejected_and_nothing_is_saved(room, user, body, code):
    with pytest.raises(services.ChatError) as error:
        services.message_create(room=room, author=user, body=body)
    assert error.value.code == code
    assert Message.objects.count() == 0
    room.refresh_from_db()
    assert room.last_seq == 0


def test_body_of_exactly_the_limit_is_accepted(room, user):
    message, _ = services.message_create(room=room, author=user, body="x" * 4000)
    assert len(message.body) == 4000


@pytest.mark.parametrize("nonce", [123, "n" * 65, ["a"]])
def test_bad_nonce_is_rejected(room, user, nonce):
    with pytest.raises(services.ChatError) as error:
        services.message_create(room=room, author=user, body="hi", nonce=nonce)
    assert error.value.code == "invalid_nonce"
    assert Message.objects.count() == 0


def test_archived_room_accepts_no_messages(room, user):
    Room.objects.filter(pk=room.pk).update(is_archived=True)
    with pytest.raises(services.ChatError) as error:
        services.message_create(room=room, author=user, body="hi")
    assert error.value.code == "room_archived"
    assert Message.objects.count() == 0


def test_message_is_published_only_after_commit(room, user, django_capture_on_commit_callbacks):
    with mock.patch.object(realtime, "publish_message") as publish:
        with django_capture_on_commit_callbacks(execute=True) as callbacks:
            message, _ = services.message_create(room=room, author=user, body="hi")
            assert publish.call_count == 0  # not before the commit
        assert len(callbacks) == 1
    publish.assert_called_once_with(message)


def test_failed_save_publishes_nothing(room, user, django_capture_on_commit_callbacks):
    # A row already holds seq 1 behind the room's back: the insert fails in the database itself.
    Message.objects.create(room=room, author=user, body="squatter", seq=1)
    with mock.patch.object(realtime, "publish_message") as publish:
        with django_capture_on_commit_callbacks(execute=True) as callbacks, pytest.raises(IntegrityError):
            services.message_create(room=room, author=user, body="hi")
    assert callbacks == []
    publish.assert_not_called()
    room.refresh_from_db()
    assert room.last_seq == 0  # the seq increment rolled back with the failed insert


def test_retry_is_not_published_again(room, user, django_capture_on_commit_callbacks):
    with mock.patch.object(realtime, "publish_message") as publish:
        with django_capture_on_commit_callbacks(execute=True):
            services.message_create(room=room, author=user, body="hi", nonce="n1")
            services.message_create(room=room, author=user, body="hi", nonce="n1")
    assert publish.call_count == 1


def test_body_is_stored_verbatim(room, user):
    payload = "<img src=x onerror=alert(1)> & <script>alert('x')</script>"
    message, _ = services.message_create(room=room, author=user, body=payload)
    message.refresh_from_db()
    assert message.body == payload


def test_room_slug_defaults_to_slugified_name(user):
    room = services.room_create(name="Team News 2026", created_by=user)
    assert room.slug == "team-news-2026"


@pytest.mark.parametrize("slug", ["Has Caps", "under_score", "x" * 65, "émoji"])
def test_room_with_bad_slug_is_rejected(user, slug):
    with pytest.raises(ValidationError):
        services.room_create(slug=slug, name="Room", created_by=user)
    assert Room.objects.count() == 0


def test_duplicate_room_slug_is_rejected(room, user):
    with pytest.raises(ValidationError):
        services.room_create(slug=room.slug, name="Again", created_by=user)


def test_failed_publish_keeps_the_saved_message_and_raises_nothing(room, user, django_capture_on_commit_callbacks):
    with mock.patch.object(realtime, "publish_message", side_effect=ConnectionError("redis down")) as publish:
        with django_capture_on_commit_callbacks(execute=True):
            message, created = services.message_create(room=room, author=user, body="hi", nonce="n1")
    publish.assert_called_once()
    assert created and Message.objects.get().pk == message.pk
    retried, created_again = services.message_create(room=room, author=user, body="hi", nonce="n1")
    assert retried.pk == message.pk and not created_again


@pytest.mark.django_db(transaction=True)
async def test_a_loops_database_thread_saves_without_waiting_for_the_publish_and_the_loop_publishes_in_order(
    room, user, monkeypatch
):
    gate, published = asyncio.Event(), []

    async def slow_redis(group: str, event: dict) -> None:
        await gate.wait()
        published.append((group, event["seq"]))

    monkeypatch.setattr(realtime, "_group_send_now", slow_redis)
    realtime.publish_through_loop()  # what the server's hub does
    create = database_sync_to_async(services.message_create)
    for n in range(3):
        # Would wait for the gate, and time out, if the thread waited for its publish.
        await asyncio.wait_for(create(room=room, author=user, body=f"m{n}"), 5)
    assert published == []
    gate.set()
    await eventually(lambda: published == [(realtime.room_group(room), seq) for seq in (1, 2, 3)])


@pytest.mark.skipif(connection.vendor != "postgresql", reason="the PostgreSQL backend's health check")
@pytest.mark.django_db(transaction=True)  # outside a transaction, as a server's connection is between calls
def test_postgresql_checks_a_connections_health_at_most_once_a_second(monkeypatch):
    connection.ensure_connection()
    checks, usable = [], [True]
    monkeypatch.setattr(connection, "is_usable", lambda: checks.append(clock[0]) or usable[0])
    clock = [1000.0]
    monkeypatch.setattr(postgresql_base.time, "monotonic", lambda: clock[0])
    connection.checked_at = 1000.0
    for now in (1000.0, 1000.5, 1001.0, 1001.2, 1002.5):
        clock[0] = now
        connection.health_check_done = False  # what close_old_connections() does around each database call
        connection.close_if_health_check_failed()
    assert checks == [1001.0, 1002.5]
    usable[0], clock[0] = False, 1004.0
    connection.health_check_done = False
    connection.close_if_health_check_failed()
    assert connection.connection is None  # closed; the next query opens a new one


def test_author_edits_own_message_and_the_change_is_published(room, user, django_capture_on_commit_callbacks):
    message, _ = services.message_create(room=room, author=user, body="helo")
    with mock.patch.object(realtime, "publish_change") as publish:
        with django_capture_on_commit_callbacks(execute=True):
            edited = services.message_edit(room=room, message_id=message.pk, user=user, body="hello")
    message.refresh_from_db()
    assert (message.body, message.seq) == ("hello", 1)
    assert message.edited_at is not None and message.change == 1
    publish.assert_called_once_with(edited)
    room.refresh_from_db()
    assert (room.last_seq, room.last_change) == (1, 1)


def test_someone_else_cannot_edit_a_message(room, user, other_user, django_user_model):
    message, _ = services.message_create(room=room, author=user, body="mine")
    staff = django_user_model.objects.create_user("staff", is_staff=True)
    for intruder in (other_user, staff):
        with pytest.raises(services.ChatError) as error:
            services.message_edit(room=room, message_id=message.pk, user=intruder, body="theirs")
        assert error.value.code == "forbidden"
    message.refresh_from_db()
    assert message.body == "mine" and message.edited_at is None
    room.refresh_from_db()
    assert room.last_change == 0


def test_delete_erases_the_body_and_keeps_the_seq(room, user, django_capture_on_commit_callbacks):
    first, _ = services.message_create(room=room, author=user, body="oops, my password")
    services.message_create(room=room, author=user, body="second")
    with mock.patch.object(realtime, "publish_change") as publish:
        with django_capture_on_commit_callbacks(execute=True):
            services.message_delete(room=room, message_id=first.pk, user=user)
    first.refresh_from_db()
    assert (first.body, first.seq) == ("", 1)
    assert first.deleted_at is not None
    assert publish.call_count == 1
    assert sorted(Message.objects.values_list("seq", flat=True)) == [1, 2]


def test_staff_may_delete_anyones_message_but_others_may_not(room, user, other_user, django_user_model):
    message, _ = services.message_create(room=room, author=user, body="hi")
    with pytest.raises(services.ChatError) as error:
        services.message_delete(room=room, message_id=message.pk, user=other_user)
    assert error.value.code == "forbidden"
    staff = django_user_model.objects.create_user("staff", is_staff=True)
    services.message_delete(room=room, message_id=message.pk, user=staff)
    message.refresh_from_db()
    assert message.deleted_at is not None


@pytest.mark.parametrize("message_id", [None, "1", True, 10**6])
def test_changing_a_missing_message_is_refused(room, user, message_id):
    services.message_create(room=room, author=user, body="hi")
    with pytest.raises(services.ChatError) as error:
        services.message_edit(room=room, message_id=message_id, user=user, body="x")
    assert error.value.code in {"invalid_frame", "not_found"}
    assert Message.objects.get().body == "hi"


def test_a_deleted_message_cannot_be_edited_or_deleted_again(room, user):
    message, _ = services.message_create(room=room, author=user, body="hi")
    services.message_delete(room=room, message_id=message.pk, user=user)
    for change in (
        lambda: services.message_edit(room=room, message_id=message.pk, user=user, body="back"),
        lambda: services.message_delete(room=room, message_id=message.pk, user=user),
    ):
        with pytest.raises(services.ChatError) as error:
            change()
        assert error.value.code == "not_found"
    room.refresh_from_db()
    assert room.last_change == 1


def test_a_message_in_another_room_cannot_be_changed_through_this_one(room, other_room, user):
    elsewhere, _ = services.message_create(room=other_room, author=user, body="there")
    with pytest.raises(services.ChatError) as error:
        services.message_delete(room=room, message_id=elsewhere.pk, user=user)
    assert error.value.code == "not_found"


def test_edit_with_a_bad_body_changes_nothing(room, user):
    message, _ = services.message_create(room=room, author=user, body="hi")
    with pytest.raises(services.ChatError) as error:
        services.message_edit(room=room, message_id=message.pk, user=user, body="  ")
    assert error.value.code == "empty_body"
    message.refresh_from_db()
    assert message.body == "hi" and message.edited_at is None
