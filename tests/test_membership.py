"""Private rooms, roles and unread counts: the services, and the pages that use them."""

from __future__ import annotations

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from chat import selectors, services
from chat.models import Membership, Message, Room

pytestmark = pytest.mark.django_db


def role_of(room: Room, user) -> str | None:
    return Membership.objects.filter(room=room, user=user).values_list("role", flat=True).first()


def client_for(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


# --------------------------------------------------------------------------
# Membership and roles
# --------------------------------------------------------------------------


def test_the_creator_of_a_room_is_its_owner(user, room):
    assert role_of(room, user) == "owner"


def test_a_public_room_is_visible_to_everyone_and_reading_it_joins_it(other_user, room):
    assert selectors.room_visible(slug=room.slug, user=other_user) == (room, None)
    assert role_of(room, other_user) is None  # seeing is not joining
    services.read_mark(room=room, user=other_user, seq=0)
    assert role_of(room, other_user) == "member"


def test_a_private_room_is_entered_by_members_only(other_user, third_user, private_room):
    assert selectors.room_visible(slug=private_room.slug, user=other_user) is not None
    assert selectors.room_visible(slug=private_room.slug, user=third_user) is None
    with pytest.raises(services.ChatError):
        services.room_join(room=private_room, user=third_user)
    services.read_mark(room=private_room, user=third_user, seq=1)
    assert role_of(private_room, third_user) is None


def test_moderators_add_members_and_owners_appoint_moderators(user, other_user, third_user, private_room):
    services.member_add(room=private_room, actor=user, username=other_user.username, role="moderator")
    services.member_add(room=private_room, actor=other_user, username=third_user.username)
    assert (role_of(private_room, other_user), role_of(private_room, third_user)) == ("moderator", "member")


@pytest.mark.parametrize(
    ("actor_role", "role", "code"),
    [
        ("member", "member", "forbidden"),  # members do not manage members
        ("moderator", "moderator", "forbidden"),  # only the owner appoints moderators
        ("owner", "owner", "invalid_role"),  # ownership is not handed out
    ],
)
def test_adding_a_member_without_the_right_role_is_refused_and_changes_nothing(
    user, other_user, third_user, private_room, actor_role, role, code
):
    actor = user if actor_role == "owner" else other_user
    Membership.objects.filter(room=private_room, user=other_user).update(role=actor_role)
    with pytest.raises(services.ChatError) as error:
        services.member_add(room=private_room, actor=actor, username=third_user.username, role=role)
    assert error.value.code == code
    assert role_of(private_room, third_user) is None


def test_adding_an_unknown_user_says_so(user, private_room):
    with pytest.raises(services.ChatError) as error:
        services.member_add(room=private_room, actor=user, username="nobody")
    assert error.value.code == "unknown_user"
    assert "nobody" in error.value.detail


def test_the_owners_role_cannot_be_changed(user, other_user, private_room):
    with pytest.raises(services.ChatError) as error:
        services.member_add(room=private_room, actor=user, username=user.username, role="member")
    assert error.value.code == "forbidden"
    assert role_of(private_room, user) == "owner"


def test_owner_removes_a_member(user, other_user, private_room):
    services.member_remove(room=private_room, actor=user, username=other_user.username)
    assert role_of(private_room, other_user) is None
    assert selectors.room_visible(slug=private_room.slug, user=other_user) is None


@pytest.mark.parametrize(
    ("actor_role", "target_role", "code"),
    [
        ("member", "member", "forbidden"),
        ("moderator", "moderator", "forbidden"),  # only the owner removes moderators
        ("moderator", "owner", "forbidden"),
    ],
)
def test_removing_without_the_right_role_is_refused_and_changes_nothing(
    user, other_user, third_user, private_room, actor_role, target_role, code
):
    Membership.objects.create(room=private_room, user=third_user, role=actor_role)
    target = user if target_role == "owner" else other_user
    Membership.objects.filter(room=private_room, user=other_user).update(role=target_role)
    with pytest.raises(services.ChatError) as error:
        services.member_remove(room=private_room, actor=third_user, username=target.username)
    assert error.value.code == code
    assert role_of(private_room, target) == target_role


def test_nobody_is_removed_from_a_public_room(user, other_user, room):
    services.room_join(room=room, user=other_user)
    with pytest.raises(services.ChatError) as error:
        services.member_remove(room=room, actor=user, username=other_user.username)
    assert error.value.code == "public_room"
    assert role_of(room, other_user) == "member"


def test_a_non_member_cannot_post_in_a_private_room(third_user, private_room):
    with pytest.raises(services.ChatError) as error:
        services.message_create(room=private_room, author=third_user, body="let me in")
    assert error.value.code == "forbidden"
    assert not Message.objects.filter(room=private_room).exists()


def test_a_moderator_deletes_someone_elses_message_and_a_member_cannot(user, other_user, third_user, private_room):
    Membership.objects.create(room=private_room, user=third_user, role="member")
    message, _ = services.message_create(room=private_room, author=user, body="owner's words")
    with pytest.raises(services.ChatError) as error:
        services.message_delete(room=private_room, message_id=message.pk, user=third_user)
    assert error.value.code == "forbidden"

    Membership.objects.filter(room=private_room, user=other_user).update(role="moderator")
    services.message_delete(room=private_room, message_id=message.pk, user=other_user)
    message.refresh_from_db()
    assert (message.body, message.deleted_at is not None) == ("", True)


def test_a_moderator_still_cannot_edit_someone_elses_message(user, other_user, private_room):
    Membership.objects.filter(room=private_room, user=other_user).update(role="moderator")
    message, _ = services.message_create(room=private_room, author=user, body="mine")
    with pytest.raises(services.ChatError) as error:
        services.message_edit(room=private_room, message_id=message.pk, user=other_user, body="theirs")
    assert error.value.code == "forbidden"
    message.refresh_from_db()
    assert message.body == "mine"


# --------------------------------------------------------------------------
# Read marks and unread counts
# --------------------------------------------------------------------------


def post_many(room, author, count: int) -> list[Message]:
    return [services.message_create(room=room, author=author, body=f"m{i}")[0] for i in range(count)]


def last_read(room, user) -> int:
    return Membership.objects.get(room=room, user=user).last_read_seq


def test_read_mark_keeps_the_highest_seq_and_never_passes_the_rooms_last(user, other_user, private_room):
    post_many(private_room, user, 5)
    services.read_mark(room=private_room, user=other_user, seq=3)
    services.read_mark(room=private_room, user=other_user, seq=2)
    assert last_read(private_room, other_user) == 3
    services.read_mark(room=private_room, user=other_user, seq=10**12)
    assert last_read(private_room, other_user) == 5


def test_read_mark_of_a_non_member_changes_nothing(user, third_user, private_room):
    post_many(private_room, user, 2)
    services.read_mark(room=private_room, user=third_user, seq=2)
    assert not Membership.objects.filter(room=private_room, user=third_user).exists()


def unread_by_slug(user) -> dict[str, int]:
    return {room.slug: room.unread for room in selectors.room_list(user=user)}


def test_unread_counts_messages_by_others_after_the_read_mark_and_not_deleted(user, other_user, room, other_room):
    services.room_join(room=room, user=other_user)
    messages = post_many(room, user, 4)
    services.message_create(room=room, author=other_user, body="my own words are never unread")
    services.read_mark(room=room, user=other_user, seq=1)
    services.message_delete(room=room, message_id=messages[3].pk, user=user)

    # seqs 2 and 3 are unread; 4 is deleted, 5 is bob's own; bob never opened "random".
    assert unread_by_slug(other_user) == {"general": 2, "random": 0}
    assert unread_by_slug(user) == {"general": 1, "random": 0}  # bob's message, for alice


def test_room_list_shows_private_rooms_to_their_members_only(user, other_user, third_user, room, private_room):
    assert set(unread_by_slug(other_user)) == {"general", "secret"}
    assert set(unread_by_slug(third_user)) == {"general"}


def test_unread_counts_take_a_fixed_number_of_queries(
    client, django_assert_num_queries, django_user_model, user, other_user
):
    def load_room_list() -> None:
        with django_assert_num_queries(3):  # session, user, rooms with their unread counts
            response = client.get("/")
        assert response.status_code == 200

    client.force_login(other_user)
    for rooms in range(2):
        room = services.room_create(slug=f"r{rooms}", name=f"R{rooms}", created_by=user)
        services.room_join(room=room, user=other_user)
        post_many(room, user, 3)
    load_room_list()
    for rooms in range(2, 12):
        room = services.room_create(slug=f"r{rooms}", name=f"R{rooms}", is_private=rooms % 2 == 0, created_by=user)
        if not room.is_private:
            services.room_join(room=room, user=other_user)
        post_many(room, user, 2)
    load_room_list()


# --------------------------------------------------------------------------
# Pages
# --------------------------------------------------------------------------


def test_room_list_shows_unread_counts_and_hides_others_private_rooms(user, other_user, third_user, room, private_room):
    services.room_join(room=room, user=other_user)
    post_many(room, user, 3)
    page = client_for(other_user).get("/").content.decode()
    assert "3 unread" in page and "Secret" in page and "Private" in page

    for outsider in (client_for(third_user), Client()):
        page = outsider.get("/").content.decode()
        assert "General" in page and "Secret" not in page


def test_private_room_page_is_404_to_a_non_member_and_open_to_members(user, other_user, third_user, private_room):
    url = reverse("room-detail", args=[private_room.slug])
    assert client_for(third_user).get(url).status_code == 404
    assert client_for(other_user).get(url).status_code == 200


def test_the_page_tells_the_client_where_the_user_stopped_reading(user, other_user, room):
    post_many(room, user, 3)
    services.room_join(room=room, user=other_user)
    services.read_mark(room=room, user=other_user, seq=2)
    response = client_for(other_user).get(reverse("room-detail", args=[room.slug]))
    config = response.context["client_config"]
    assert (config["lastRead"], config["canModerate"]) == (2, False)


def test_opening_a_public_room_page_writes_nothing(other_user, room):
    services.message_create(room=room, author=room.created_by, body="hello")
    client = client_for(other_user)
    with CaptureQueriesContext(connection) as queries:
        assert client.get(reverse("room-detail", args=[room.slug])).status_code == 200
    writes = [q["sql"] for q in queries if not q["sql"].lstrip().upper().startswith(("SELECT", "SAVEPOINT", "RELEASE"))]
    assert writes == []
    assert role_of(room, other_user) is None


def test_owner_adds_and_removes_members_from_the_room_page(user, other_user, third_user, private_room):
    owner = client_for(user)
    response = owner.post(reverse("member-add", args=[private_room.slug]), {"username": "carol", "role": "member"})
    assert response.status_code == 302
    assert role_of(private_room, third_user) == "member"
    page = owner.get(response.url).content.decode()
    assert "carol is a member of Secret." in page

    response = owner.post(reverse("member-remove", args=[private_room.slug, "carol"]))
    assert response.status_code == 302
    assert role_of(private_room, third_user) is None
    assert "carol was removed from Secret." in owner.get(response.url).content.decode()


def test_a_member_managing_members_gets_an_error_and_nothing_changes(user, other_user, third_user, private_room):
    member = client_for(other_user)
    response = member.post(reverse("member-add", args=[private_room.slug]), {"username": "carol"}, follow=True)
    assert "Only the room&#x27;s owner and moderators can manage its members." in response.content.decode()
    response = member.post(reverse("member-remove", args=[private_room.slug, "alice"]), follow=True)
    assert "Only the room&#x27;s owner and moderators" in response.content.decode()
    assert (role_of(private_room, third_user), role_of(private_room, user)) == (None, "owner")


def test_a_non_member_managing_a_private_room_gets_404(third_user, private_room):
    outsider = client_for(third_user)
    assert outsider.post(reverse("member-add", args=[private_room.slug]), {"username": "carol"}).status_code == 404
    assert outsider.post(reverse("member-remove", args=[private_room.slug, "bob"])).status_code == 404
    assert role_of(private_room, third_user) is None


def test_creating_a_private_room_from_the_list_page(user):
    response = client_for(user).post(reverse("room-create"), {"name": "Team", "slug": "team", "is_private": "on"})
    assert response.status_code == 302
    room = Room.objects.get(slug="team")
    assert room.is_private and role_of(room, user) == "owner"
