"""The Django admin: staff changes go through the services, so open sockets see them live."""

from __future__ import annotations

import re

import pytest
from channels.db import database_sync_to_async
from django.contrib.auth.models import Permission
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from chat import protocol, selectors, services
from chat.models import Membership, Message, Room
from tests.helpers import joined, receive, receive_until_ready

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def staff(django_user_model):
    return django_user_model.objects.create_superuser("root", password="pw-root-123")


def admin_for(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def action(client: Client, model: str, name: str, objects, **extra):
    return client.post(
        f"/admin/chat/{model}/", {"action": name, "_selected_action": [o.pk for o in objects], **extra}, follow=True
    )


# --------------------------------------------------------------------------
# Who gets in
# --------------------------------------------------------------------------


def test_only_staff_reach_the_admin(user):
    response = admin_for(user).get("/admin/chat/room/")
    assert response.status_code == 302 and response.url.startswith("/admin/login/")


def test_a_staff_member_who_may_only_view_messages_cannot_delete_them(django_user_model, user, room):
    message, _ = services.message_create(room=room, author=user, body="keep me")
    viewer = django_user_model.objects.create_user("viewer", password="pw", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_message"))
    client = admin_for(viewer)
    assert client.get("/admin/chat/message/").status_code == 200
    assert client.post(f"/admin/chat/message/{message.pk}/delete/", {"post": "yes"}).status_code == 403
    assert client.post(f"/admin/chat/message/{message.pk}/change/", {"body": "changed"}).status_code == 403
    message.refresh_from_db()
    assert (message.body, message.deleted_at) == ("keep me", None)


# --------------------------------------------------------------------------
# Rooms
# --------------------------------------------------------------------------


def test_room_changelist_shows_owner_counts_and_flags(staff, user, room, private_room):
    services.message_create(room=room, author=user, body="one")
    page = admin_for(staff).get("/admin/chat/room/").content.decode()
    row = re.search(r"<tr>.*?general.*?</tr>", page, re.S).group(0)
    assert ">alice<" in row and ">1<" in row  # owner, messages
    for column in ("Owner", "Messages", "Online now", "Is private", "Is archived"):
        assert column in page


def test_room_changelist_queries_do_not_grow_with_rooms(staff, user, django_assert_max_num_queries):
    client = admin_for(staff)
    for n in range(30):
        services.room_create(slug=f"room-{n}", name=f"Room {n}", created_by=user)
    with django_assert_max_num_queries(8):
        assert client.get("/admin/chat/room/").status_code == 200


def test_adding_a_room_in_the_admin_makes_its_creator_the_owner(staff, user):
    response = admin_for(staff).post(
        "/admin/chat/room/add/",
        {
            "name": "Staff room",
            "slug": "staff-room",
            "topic": "",
            "created_by": user.pk,
            "memberships-TOTAL_FORMS": "0",
            "memberships-INITIAL_FORMS": "0",
        },  # fmt: skip
    )
    assert response.status_code == 302
    assert Membership.objects.get(room__slug="staff-room").role == "owner"


async def test_archiving_in_the_admin_closes_the_rooms_sockets_within_a_second(ws_connect, staff, user, room):
    alice = await joined(ws_connect, user, room)
    client = await database_sync_to_async(admin_for)(staff)
    response = await database_sync_to_async(action)(client, "room", "archive", [room])
    assert "Archived 1 room(s)." in response.content.decode()
    assert await receive(alice, timeout=1) == {
        "type": "error",
        "code": "room_archived",
        "detail": "This room was archived; it is read-only now.",
        "nonce": None,
    }
    assert await alice.receive_output(timeout=1) == {"type": "websocket.close", "code": 4410}
    _, connected = await ws_connect(user, room)
    assert not connected
    await database_sync_to_async(action)(client, "room", "unarchive", [room])
    _, connected = await ws_connect(user, room)
    assert connected


async def test_ticking_archived_in_the_room_form_closes_the_sockets_too(ws_connect, staff, user, room):
    alice = await joined(ws_connect, user, room)

    def archive_in_the_form():
        return admin_for(staff).post(
            f"/admin/chat/room/{room.pk}/change/",
            {
                "name": room.name,
                "slug": room.slug,
                "topic": room.topic,
                "is_archived": "on",
                "created_by": user.pk,
                "memberships-TOTAL_FORMS": "0",
                "memberships-INITIAL_FORMS": "0",
            },  # fmt: skip
        )

    assert (await database_sync_to_async(archive_in_the_form)()).status_code == 302
    assert (await receive(alice, timeout=1))["code"] == "room_archived"
    assert await database_sync_to_async(Room.objects.filter(is_archived=True).count)() == 1


async def test_clear_history_asks_first_then_deletes_and_tells_open_sockets(ws_connect, staff, user, room):
    for n in range(3):
        await database_sync_to_async(services.message_create)(room=room, author=user, body=f"m{n}")
    alice = await joined(ws_connect, user, room)
    client = await database_sync_to_async(admin_for)(staff)

    confirm = await database_sync_to_async(action)(client, "room", "clear_history", [room])
    assert "Delete every message of these rooms?" in confirm.content.decode()
    assert await database_sync_to_async(Message.objects.filter(deleted_at__isnull=True).count)() == 3

    done = await database_sync_to_async(action)(client, "room", "clear_history", [room], confirm="yes")
    assert "Deleted 3 message(s) in 1 room(s)." in done.content.decode()
    assert await receive(alice) == {"type": "history_cleared", "seq": 3, "change": 1}
    bodies = await database_sync_to_async(lambda: list(Message.objects.values_list("body", flat=True)))()
    assert bodies == ["", "", ""]


async def test_a_client_that_missed_a_clear_gets_one_frame_on_resume(ws_connect, user, room):
    for n in range(5):
        await database_sync_to_async(services.message_create)(room=room, author=user, body=f"m{n}")
    await database_sync_to_async(services.room_clear_history)(room=room, batch_size=2)
    message = await database_sync_to_async(services.message_create)(room=room, author=user, body="after")
    await database_sync_to_async(services.message_delete)(room=room, message_id=message[0].pk, user=user)

    communicator, _ = await ws_connect(user, room, after=4, changes_after=0)
    frames, ready = await receive_until_ready(communicator)
    # One frame for the four cleared messages the client holds, then the two it missed, as they are now.
    assert frames[0] == {"type": "history_cleared", "seq": 4, "change": 1}
    assert [(f["type"], f["message"]["seq"], f["message"]["body"]) for f in frames[1:]] == [
        ("message", 5, ""),
        ("message", 6, ""),
    ]
    assert ready["last_change"] == 2


# --------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------


async def test_editing_and_deleting_in_the_admin_reach_open_sockets(ws_connect, staff, user, room):
    message, _ = await database_sync_to_async(services.message_create)(room=room, author=user, body="helo")
    alice = await joined(ws_connect, user, room)
    client = await database_sync_to_async(admin_for)(staff)

    edited = await database_sync_to_async(client.post)(f"/admin/chat/message/{message.pk}/change/", {"body": "hello"})
    assert edited.status_code == 302
    updated = await receive(alice)
    assert (updated["type"], updated["message"]["body"]) == ("message_updated", "hello")

    deleted = await database_sync_to_async(client.post)(f"/admin/chat/message/{message.pk}/delete/", {"post": "yes"})
    assert deleted.status_code == 302
    assert await receive(alice) == {"type": "message_deleted", "id": message.pk, "seq": 1, "change": 2}
    stored = await database_sync_to_async(Message.objects.get)()
    assert (stored.body, stored.deleted_at is not None) == ("", True)  # the row stays: seqs stay gapless


def test_message_changelist_stays_a_few_queries_and_never_counts_the_whole_table(staff, user, room):
    Message.objects.bulk_create(Message(room=room, author=user, body=f"m{n}", seq=n) for n in range(1, 301))
    client = admin_for(staff)
    since = "?created_at__gte=2000-01-01+00:00:00%2B00:00"
    for query in ("", "?deleted=no", "?q=m1", f"?room__id__exact={room.pk}", since):
        with CaptureQueriesContext(connection) as queries:
            assert client.get(f"/admin/chat/message/{query}").status_code == 200
        statements = [q["sql"] for q in queries.captured_queries]
        assert len(statements) <= 10, statements
        counts = [sql for sql in statements if "COUNT(" in sql.upper()]
        assert counts and all("LIMIT" in sql.upper() for sql in counts), counts


async def test_deleting_a_membership_inline_closes_the_members_sockets(
    ws_connect, staff, user, other_user, private_room
):
    bob = await joined(ws_connect, other_user, private_room)
    membership = await database_sync_to_async(Membership.objects.get)(room=private_room, user=other_user)
    owner = await database_sync_to_async(Membership.objects.get)(room=private_room, user=user)
    form = {
        "name": private_room.name, "slug": private_room.slug, "topic": "", "is_private": "on", "created_by": user.pk,
        "memberships-TOTAL_FORMS": "2", "memberships-INITIAL_FORMS": "2",
        "memberships-0-id": owner.pk, "memberships-0-room": private_room.pk, "memberships-0-user": user.pk,
        "memberships-0-role": "owner",
        "memberships-1-id": membership.pk, "memberships-1-room": private_room.pk, "memberships-1-user": other_user.pk,
        "memberships-1-role": "member", "memberships-1-DELETE": "on",
    }  # fmt: skip
    response = await database_sync_to_async(
        lambda: admin_for(staff).post(f"/admin/chat/room/{private_room.pk}/change/", form)
    )()
    assert response.status_code == 302
    assert (await receive(bob, timeout=1))["code"] == "removed"
    assert await bob.receive_output(timeout=1) == {"type": "websocket.close", "code": protocol.CLOSE_REMOVED}


async def test_making_a_room_private_in_the_admin_shuts_out_the_sockets_of_non_members(
    ws_connect, staff, user, other_user, room
):
    alice = await joined(ws_connect, user, room)  # the owner
    bob = await joined(ws_connect, other_user, room)  # never joined: public rooms need no membership to read
    form = {
        "name": room.name, "slug": room.slug, "topic": room.topic, "is_private": "on", "created_by": user.pk,
        "memberships-TOTAL_FORMS": "0", "memberships-INITIAL_FORMS": "0",
    }  # fmt: skip
    response = await database_sync_to_async(
        lambda: admin_for(staff).post(f"/admin/chat/room/{room.pk}/change/", form)
    )()
    assert response.status_code == 302

    for socket in (alice, bob):  # everyone resumes, and the handshake decides again
        assert (await receive(socket, timeout=2))["code"] == "resync"
        assert await socket.receive_output(timeout=2) == {"type": "websocket.close", "code": 1012}
    _, bob_let_in = await ws_connect(other_user, room)
    _, alice_let_in = await ws_connect(user, room)
    assert (bob_let_in, alice_let_in) == (False, True)
    visible = await database_sync_to_async(lambda: [r.slug for r in selectors.room_list(user=other_user)])()
    assert visible.count(room.slug) == 0
