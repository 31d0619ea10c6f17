"""Every operator command through call_command: what it does, and how it refuses bad input."""

from __future__ import annotations

import csv
import io
import json
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command
from django.utils import timezone

from chat import services
from chat.models import PLACEHOLDER_USERNAME, SYSTEM_USERNAME, ApiToken, Membership, Message, Room

pytestmark = pytest.mark.django_db


def run(*args: str) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out, stderr=io.StringIO())
    return out.getvalue()


def post_many(room, author, bodies) -> list[Message]:
    return [services.message_create(room=room, author=author, body=body)[0] for body in bodies]


# --------------------------------------------------------------------------
# createroom
# --------------------------------------------------------------------------


def test_createroom_makes_a_private_room_owned_by_the_user(user):
    output = run("createroom", "ops", "--name", "Ops", "--topic", "Deploys", "--private", "--owner", "alice")
    room = Room.objects.get(slug="ops")
    assert (room.name, room.topic, room.is_private) == ("Ops", "Deploys", True)
    assert Membership.objects.get(room=room).user == user
    assert 'Created private room "ops"' in output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["general", "--name", "Again"], "slug: Room with this Slug already exists."),
        (["Bad Slug", "--name", "X"], "slug: Use 1 to 64 lowercase letters"),
        (["new-room", "--name", "X", "--owner", "ghost"], 'There is no user "ghost"'),
    ],
)
def test_createroom_refuses_bad_input_and_creates_nothing(room, args, message):
    with pytest.raises(CommandError, match=message):
        run("createroom", *args)
    assert Room.objects.count() == 1


# --------------------------------------------------------------------------
# listrooms and chatstats
# --------------------------------------------------------------------------


def test_listrooms_shows_every_room_with_counts(user, other_user, room, private_room):
    post_many(room, user, ["a", "b"])
    services.room_archive(room=private_room)
    rooms = {r["slug"]: r for r in json.loads(run("listrooms", "--format", "json"))}
    assert rooms["general"]["messages"] == 2 and rooms["general"]["members"] == 1
    assert rooms["secret"]["members"] == 2 and rooms["secret"]["private"] and rooms["secret"]["archived"]
    assert rooms["general"]["online"] == 0 and rooms["general"]["last_activity"]
    table = run("listrooms")
    assert table.splitlines()[0].split() == ["SLUG", "NAME", "MESSAGES", "MEMBERS", "ONLINE", "LAST_ACTIVITY", "FLAGS"]
    assert "private,archived" in table and "2 room(s)" in table


def test_chatstats_counts_messages_per_day_and_the_busiest_rooms(user, room, other_room):
    post_many(room, user, ["a", "b", "c"])
    old = post_many(other_room, user, ["d"])[0]
    Message.objects.filter(pk=old.pk).update(created_at=timezone.now() - timedelta(days=2))
    stats = json.loads(run("chatstats", "--format", "json"))
    assert (stats["rooms"], stats["messages"]) == (2, 4)
    per_day = list(stats["messages_per_day"].values())
    assert len(per_day) == 7 and per_day[-1] == 3 and per_day[-3] == 1
    assert stats["most_active_rooms"] == [{"room": "general", "messages": 3}, {"room": "random", "messages": 1}]
    assert stats["online_now"] == []
    assert "Most active rooms" in run("chatstats")


# --------------------------------------------------------------------------
# postmessage
# --------------------------------------------------------------------------


def test_postmessage_without_as_posts_as_the_system_user(room):
    output = run("postmessage", "general", "Maintenance at 18:00")
    message = Message.objects.get()
    assert (message.author.username, message.body, message.seq) == (SYSTEM_USERNAME, "Maintenance at 18:00", 1)
    assert message.is_system and not message.author.is_active and not message.author.has_usable_password()
    assert "Posted message 1" in output


def test_postmessage_as_a_user(user, room):
    run("postmessage", "general", "hi", "--as", "alice")
    assert Message.objects.get().author == user


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nope", "hi"], 'There is no room "nope"'),
        (["general", "hi", "--as", "ghost"], 'There is no user "ghost"'),
        (["general", "   "], "Not posted: A message needs some text."),
    ],
)
def test_postmessage_refuses_bad_input_and_posts_nothing(room, args, message):
    with pytest.raises(CommandError, match=message):
        run("postmessage", *args)
    assert not Message.objects.exists()


def test_nobody_can_sign_up_as_the_system_user(client):
    response = client.post(
        "/accounts/signup/", {"username": "System", "password1": "x9!kQ2#pLm", "password2": "x9!kQ2#pLm"}
    )
    assert response.status_code == 400 and "reserved" in response.content.decode()


# --------------------------------------------------------------------------
# exportroom and importroom
# --------------------------------------------------------------------------


@pytest.fixture
def history(user, other_user, room) -> list[Message]:
    messages = post_many(room, user, ["first", 'ünïcode, "quotes", commas'])
    messages += post_many(room, other_user, ["third", "to delete"])
    services.message_delete(room=room, message_id=messages[3].pk, user=other_user)
    services.message_edit(room=room, message_id=messages[0].pk, user=user, body="first (edited)")
    return messages


def exported(tmp_path, slug: str, *options: str) -> list[dict]:
    path = tmp_path / f"{slug}.jsonl"
    run("exportroom", slug, "--output", str(path), *options)
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_export_writes_every_message_in_seq_order(tmp_path, history):
    rows = exported(tmp_path, "general")
    assert [(r["seq"], r["author"], r["body"]) for r in rows] == [
        (1, "alice", "first (edited)"),
        (2, "alice", 'ünïcode, "quotes", commas'),
        (3, "bob", "third"),
        (4, "bob", ""),
    ]
    assert rows[0]["edited_at"] and rows[3]["deleted_at"] and rows[2]["deleted_at"] is None


def test_export_as_csv_and_since_a_date(tmp_path, history):
    Message.objects.filter(seq__lte=2).update(created_at=timezone.now() - timedelta(days=10))
    path = tmp_path / "recent.csv"
    run("exportroom", "general", "--format", "csv", "--output", str(path), "--since", str(timezone.now().date()))
    rows = list(csv.DictReader(path.open()))
    assert [row["body"] for row in rows] == ["third", ""]


def test_export_streams_in_chunks(history, django_assert_max_num_queries):
    from chat import transfer

    with django_assert_max_num_queries(3):  # chunks of 2: four rows, two chunks and the empty one that ends it
        rows = list(transfer.export_rows(room=history[0].room, chunk_size=2))
    assert len(rows) == 4


def test_export_import_export_round_trips(tmp_path, history, user):
    first = exported(tmp_path, "general")
    copy = services.room_create(slug="copy", name="Copy", created_by=user)
    output = run("importroom", "copy", str(tmp_path / "general.jsonl"))
    assert "Imported 4 messages" in output
    second = exported(tmp_path, "copy")

    def essence(rows):
        return [(r["seq"], r["author"], r["body"], r["created_at"], bool(r["deleted_at"])) for r in rows]

    assert essence(second) == essence(first)
    copy.refresh_from_db()
    assert copy.last_seq == 4


def test_import_is_idempotent(tmp_path, history, user):
    exported(tmp_path, "general")
    services.room_create(slug="copy", name="Copy", created_by=user)
    run("importroom", "copy", str(tmp_path / "general.jsonl"))
    again = run("importroom", "copy", str(tmp_path / "general.jsonl"))
    assert "Imported 0 messages" in again and "(4 were already there)" in again
    assert Message.objects.filter(room__slug="copy").count() == 4


def test_import_maps_unknown_authors_to_the_placeholder(tmp_path, history, user, other_user):
    exported(tmp_path, "general")
    get_user_model().objects.filter(pk=other_user.pk).delete()  # bob's messages go with him
    services.room_create(slug="copy", name="Copy", created_by=user)
    output = run("importroom", "copy", str(tmp_path / "general.jsonl"))
    authors = list(Message.objects.filter(room__slug="copy").order_by("seq").values_list("author__username", flat=True))
    assert authors == ["alice", "alice", PLACEHOLDER_USERNAME, PLACEHOLDER_USERNAME]
    assert "bob" in output


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json\n", "Line 1: not JSON."),
        ('{"seq": 1}\n', "Line 1: expected an object with room, seq, author"),
        (
            '{"room": "r", "seq": 1, "author": "a", "body": "x", "created_at": "yesterday", "edited_at": null,'
            ' "deleted_at": null}\n',
            "Line 1: created_at, edited_at and deleted_at must be ISO 8601",
        ),
    ],
)
def test_import_of_a_bad_file_names_the_line_and_imports_nothing(tmp_path, room, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(CommandError, match=message):
        run("importroom", "general", str(path))
    assert not Message.objects.exists()


def test_import_and_export_refuse_missing_rooms_and_files(tmp_path, room):
    with pytest.raises(CommandError, match="There is no file"):
        run("importroom", "general", str(tmp_path / "missing.jsonl"))
    with pytest.raises(CommandError, match='There is no room "nope"'):
        run("exportroom", "nope")
    with pytest.raises(CommandError, match="is not a date"):
        run("exportroom", "general", "--since", "last week")
    with pytest.raises(CommandError, match="Cannot write"):
        run("exportroom", "general", "--output", str(tmp_path / "no-such-dir" / "x.jsonl"))


# --------------------------------------------------------------------------
# purgemessages
# --------------------------------------------------------------------------


def age(messages, days: int) -> None:
    Message.objects.filter(pk__in=[m.pk for m in messages]).update(created_at=timezone.now() - timedelta(days=days))


def test_purge_deletes_only_older_messages_and_dry_run_deletes_nothing(user, room, other_room):
    old = post_many(room, user, ["old 1", "old 2"]) + post_many(other_room, user, ["old 3"])
    age(old, 40)
    post_many(room, user, ["new"])
    assert "Would delete 3 messages" in run("purgemessages", "--older-than", "30d", "--dry-run")
    assert Message.objects.count() == 4
    assert "Deleted 2 messages" in run("purgemessages", "--older-than", "30d", "--room", "general")
    assert sorted(Message.objects.values_list("body", flat=True)) == ["new", "old 3"]


def test_purge_works_in_batches(user, room):
    age(post_many(room, user, [f"m{i}" for i in range(5)]), 3)
    progress = []
    assert services.messages_purge(older_than=timezone.now(), batch_size=2, progress=progress.append) == 5
    assert progress == [2, 4, 5]


@pytest.mark.parametrize("value", ["30", "thirty days", "0d", "5y", "-3d"])
def test_purge_refuses_a_bad_duration(room, value):
    with pytest.raises(CommandError, match="is not a duration"):
        run("purgemessages", f"--older-than={value}")


def test_purge_refuses_an_unknown_room():
    with pytest.raises(CommandError, match='There is no room "nope"'):
        run("purgemessages", "--older-than", "1d", "--room", "nope")


# --------------------------------------------------------------------------
# tokens
# --------------------------------------------------------------------------


def test_revoketoken_revokes_the_named_token(other_user):
    run("createtoken", "bob", "--name", "ci")
    assert "Revoked 1 token(s)" in run("revoketoken", "bob", "--name", "ci")
    assert ApiToken.objects.get().revoked_at is not None


def test_revoketoken_says_which_tokens_exist(other_user):
    run("createtoken", "bob", "--name", "ci")
    with pytest.raises(CommandError, match='no live token called "deploy". Their live tokens: ci.'):
        run("revoketoken", "bob", "--name", "deploy")
    with pytest.raises(CommandError, match='no user "ghost"'):
        run("revoketoken", "ghost", "--name", "ci")


# --------------------------------------------------------------------------
# seeddemo
# --------------------------------------------------------------------------


def test_seeddemo_makes_rooms_with_gapless_seqs(user):
    output = run("seeddemo", "--rooms", "2", "--messages", "25", "--workers", "1")
    assert 'Created room "lobby"' in output and "Added 2 room(s)" in output
    for slug, count in (("demo-1", 13), ("demo-2", 12)):
        room = Room.objects.get(slug=slug)
        seqs = list(Message.objects.filter(room=room).order_by("seq").values_list("seq", flat=True))
        assert seqs == list(range(1, count + 1)) and room.last_seq == count
    assert not Message.objects.filter(html="").exists()  # rendered, as a posted message is
    # The rooms work like any other: the next message takes the next seq.
    message, _ = services.message_create(room=Room.objects.get(slug="demo-1"), author=user, body="after the seed")
    assert message.seq == 14
    again = run("seeddemo", "--rooms", "1", "--messages", "1", "--workers", "1")
    assert 'Room "lobby" already exists.' in again and Room.objects.filter(slug="demo-3").exists()


@pytest.mark.django_db(transaction=True)  # the workers are other processes: they see committed rows only
def test_seeddemo_workers_insert_side_by_side_with_gapless_seqs():
    run("seeddemo", "--rooms", "3", "--messages", "2000", "--workers", "2")
    for room in Room.objects.filter(slug__startswith="demo-"):
        seqs = list(Message.objects.filter(room=room).order_by("seq").values_list("seq", flat=True))
        assert seqs == list(range(1, room.last_seq + 1)) and room.last_seq in (666, 667)
    assert Message.objects.count() == 2000


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rooms", "-1"], "must be 0 or more"),
        (["--messages", "5"], "must be 0 or more"),
        (["--rooms", "1", "--messages", "-2"], "must be 0 or more"),
        (["--rooms", "1", "--workers", "0"], "--workers must be from 1 to 16"),
    ],
)
def test_seeddemo_refuses_bad_counts(args, message):
    with pytest.raises(CommandError, match=message):
        run("seeddemo", *args)
    assert not Room.objects.filter(slug__startswith="demo-").exists()


def test_postmessage_reaches_a_private_room_as_system_but_not_as_a_non_member(third_user, private_room):
    run("postmessage", "secret", "Maintenance tonight")
    with pytest.raises(CommandError, match="You are not a member of this room."):
        run("postmessage", "secret", "let me in", "--as", "carol")
    assert list(Message.objects.values_list("body", flat=True)) == ["Maintenance tonight"]
