"""Mentions, notification levels, the notify frame and missed-message email (chat/notifications.py)."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from channels.db import database_sync_to_async
from django.core import mail
from django.test import Client
from django.utils import timezone

from chat import notifications, selectors, services
from chat.models import EmailNotice, Membership, Mention, Message, NotificationSettings
from tests.helpers import joined, receive, send

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def emails(user, other_user, third_user):
    """Everyone has an address: email is what the tests decide to send or not."""
    for person in (user, other_user, third_user):
        person.email = f"{person.username}@example.com"
        person.save(update_fields=["email"])


def post(room, author, body: str) -> Message:
    message, _ = services.message_create(room=room, author=author, body=body)
    return message


def mentions_of(user) -> list[tuple[str, int]]:
    return sorted(Mention.objects.filter(user=user).values_list("room__slug", "seq"))


# --------------------------------------------------------------------------
# Mentions
# --------------------------------------------------------------------------


def test_a_mention_is_stored_on_the_message_marked_in_its_html_and_counted(user, other_user, room):
    message = post(room, user, "@bob can you look? @nobody")
    assert message.mentions == ["bob"] and message.mentions_room is False
    assert message.html == ('<p><span class="mention" data-mention="bob">@bob</span> can you look? @nobody</p>')
    assert mentions_of(other_user) == [("general", 1)]
    assert Mention.objects.count() == 1


def test_code_links_and_addresses_mention_nobody(user, other_user, room):
    message = post(room, user, "`@bob` [@bob](https://example.com) bob@example.com")
    assert message.mentions == []
    assert 'class="mention"' not in message.html
    assert Mention.objects.count() == 0


def test_mentioning_yourself_marks_the_text_but_counts_nothing(user, room):
    message = post(room, user, "note to @alice")
    assert message.mentions == ["alice"]
    assert Mention.objects.count() == 0


def test_someone_who_cannot_read_a_private_room_is_not_mentioned_and_nothing_shows_they_exist(
    user, other_user, third_user, private_room, emails
):
    message = post(private_room, user, "@carol and @bob")
    assert message.mentions == ["bob"]
    assert "@carol" in message.html and 'data-mention="carol"' not in message.html
    assert mentions_of(third_user) == []
    assert Mention.objects.count() == 1
    assert EmailNotice.objects.filter(user=third_user).count() == 0


def test_room_mentions_every_member_from_an_owner_and_is_text_from_anyone_else(user, other_user, third_user, room):
    services.room_join(room=room, user=other_user)
    services.room_join(room=room, user=third_user)
    by_owner = post(room, user, "@room standup in 5")
    assert by_owner.mentions_room is True
    assert 'data-mention="room"' in by_owner.html
    assert sorted(Mention.objects.filter(message=by_owner).values_list("user__username", flat=True)) == ["bob", "carol"]
    by_member = post(room, other_user, "@room hello?")
    assert by_member.mentions_room is False and 'class="mention"' not in by_member.html
    assert Mention.objects.filter(message=by_member).count() == 0


def test_nobody_can_sign_up_as_room(client):
    response = client.post(
        "/accounts/signup/", {"username": "room", "password1": "a-long-pw-123!", "password2": "a-long-pw-123!"}
    )
    assert response.status_code == 400
    assert "reserved" in response.content.decode()


def test_an_edit_adds_and_removes_mentions_and_a_delete_forgets_them(user, other_user, third_user, room):
    message = post(room, user, "hi @bob")
    services.message_edit(room=room, message_id=message.pk, user=user, body="hi @carol")
    message.refresh_from_db()
    assert message.mentions == ["carol"]
    assert mentions_of(other_user) == [] and mentions_of(third_user) == [("general", 1)]
    services.message_delete(room=room, message_id=message.pk, user=user)
    message.refresh_from_db()
    assert message.mentions == [] and Mention.objects.count() == 0


def test_unread_mentions_count_until_read_in_the_room_list_and_the_api(user, other_user, room, other_room):
    services.room_join(room=room, user=other_user)
    post(room, user, "@bob one")
    post(room, user, "plain")
    post(room, user, "@bob two")
    post(other_room, user, "@bob elsewhere")  # a public room bob never opened: still counted
    counts = {r.slug: (r.unread, r.unread_mentions) for r in selectors.room_list(user=other_user)}
    assert counts == {"general": (3, 2), "random": (0, 1)}
    services.read_mark(room=room, user=other_user, seq=2)
    assert {r.slug: r.unread_mentions for r in selectors.room_list(user=other_user)} == {"general": 1, "random": 1}
    bob = Client()
    bob.force_login(other_user)
    rooms = {r["slug"]: r["unread_mentions"] for r in bob.get("/api/rooms/").json()["rooms"]}
    assert rooms == {"general": 1, "random": 1}


def test_the_mentions_page_and_api_list_newest_first_and_never_a_room_the_reader_left(
    user, other_user, room, private_room
):
    post(room, user, "@bob first")
    post(private_room, user, "@bob secret")
    bob = Client()
    bob.force_login(other_user)
    listed = bob.get("/api/mentions/").json()
    assert [m["body"] for m in listed["messages"]] == ["@bob secret", "@bob first"]
    page = bob.get("/mentions/").content.decode()
    assert page.count('class="mention-item') == 2
    assert "/rooms/secret/?at=1" in page and "/rooms/general/?at=1" in page
    services.member_remove(room=private_room, actor=user, username="bob")
    assert [m["body"] for m in bob.get("/api/mentions/").json()["messages"]] == ["@bob first"]
    page = bob.get("/mentions/").content.decode()
    assert page.count('class="mention-item') == 1 and "secret" not in page


def test_the_mentions_api_pages_with_before_id(user, other_user, room):
    first, second, third = (post(room, user, f"@bob {n}") for n in range(3))
    bob = Client()
    bob.force_login(other_user)
    page = bob.get("/api/mentions/?limit=2").json()
    assert [m["id"] for m in page["messages"]] == [third.pk, second.pk] and page["has_more"] is True
    page = bob.get(f"/api/mentions/?limit=2&before_id={second.pk}").json()
    assert [m["id"] for m in page["messages"]] == [first.pk] and page["has_more"] is False


def test_member_names_autocomplete_by_prefix_and_private_rooms_stay_hidden(user, other_user, third_user, private_room):
    alice = Client()
    alice.force_login(user)
    assert alice.get("/api/rooms/secret/members?prefix=B").json() == {"members": ["bob"]}
    assert alice.get("/api/rooms/secret/members").json() == {"members": ["alice", "bob"]}
    carol = Client()
    carol.force_login(third_user)
    assert carol.get("/api/rooms/secret/members").status_code == 404


# --------------------------------------------------------------------------
# Levels
# --------------------------------------------------------------------------


def patch_notify(client: Client, slug: str, notify: object):
    return client.patch(f"/api/rooms/{slug}/membership/", json.dumps({"notify": notify}), "application/json")


def test_the_level_is_set_through_the_api_and_follows_the_default_when_unset(user, other_user, room, private_room):
    bob = Client()
    bob.force_login(other_user)
    response = patch_notify(bob, "general", "all")  # a public room bob never joined: this joins it
    assert response.status_code == 200
    assert response.json() == {"room": "general", "role": "member", "notify": "all", "notify_is_default": False}
    NotificationSettings.objects.create(user=other_user, default_notify="nothing")
    assert patch_notify(bob, "general", "").json()["notify"] == "nothing"
    levels = {r["slug"]: r["notify"] for r in bob.get("/api/rooms/").json()["rooms"]}
    assert levels == {"general": "nothing", "secret": "nothing"}


def test_a_direct_room_notifies_of_everything_by_default(user, other_user):
    room, _ = services.direct_room_open(user=user, username="bob")
    assert notifications.level_for(room=room, user=other_user) == "all"
    NotificationSettings.objects.create(user=other_user, default_notify="nothing")
    assert notifications.level_for(room=room, user=other_user) == "all"


@pytest.mark.parametrize("bad", ["loud", None, 3, ["all"]])
def test_a_bad_level_is_refused_and_changes_nothing(user, room, bad):
    alice = Client()
    alice.force_login(user)
    response = patch_notify(alice, "general", bad)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_notify"
    assert Membership.objects.get(user=user, room=room).notify == ""


def test_a_private_room_level_is_404_for_a_non_member(third_user, private_room):
    carol = Client()
    carol.force_login(third_user)
    assert patch_notify(carol, "secret", "all").status_code == 404
    assert Membership.objects.filter(user=third_user).count() == 0


def test_the_room_page_form_sets_the_level(client, user, room):
    client.force_login(user)
    response = client.post("/rooms/general/notify/", {"notify": "nothing"})
    assert response.status_code == 302
    assert Membership.objects.get(user=user, room=room).notify == "nothing"
    page = client.get("/rooms/general/").content.decode()
    assert '<option value="nothing" selected>' in page
    assert '"notify": "nothing"' in page


def test_the_settings_page_saves_email_and_choices_and_refuses_a_bad_address(client, user):
    client.force_login(user)
    response = client.post("/settings/", {"email": "not an address", "default_notify": "all"})
    assert response.status_code == 400
    assert NotificationSettings.objects.count() == 0
    response = client.post("/settings/", {"email": "a@example.com", "default_notify": "all"})
    assert response.status_code == 302
    user.refresh_from_db()
    saved = NotificationSettings.objects.get(user=user)
    assert user.email == "a@example.com"
    assert (saved.email_notifications, saved.default_notify) == (False, "all")  # an unticked box is "off"


# --------------------------------------------------------------------------
# Live: the notify frame
# --------------------------------------------------------------------------


async def test_a_mention_reaches_the_mentioned_users_sockets_in_other_rooms(
    ws_connect, user, other_user, third_user, room, other_room, private_room
):
    bob_elsewhere = await joined(ws_connect, other_user, other_room)
    carol_elsewhere = await joined(ws_connect, third_user, other_room)
    alice = await joined(ws_connect, user, room)
    await send(alice, type="send", body="@bob @carol ping", nonce="n1")
    frame = await receive(bob_elsewhere)
    assert frame == {
        "type": "notify", "reason": "mention", "room": "general", "room_name": "General",
        "id": frame["id"], "seq": 1, "author": "alice", "excerpt": "@bob @carol ping",
    }  # fmt: skip
    assert (await receive(carol_elsewhere))["seq"] == 1
    # Carol cannot read the private room: she hears nothing of a mention there. The next
    # frame she gets is the one after it, in a room she reads.
    await database_sync_to_async(post)(private_room, user, "@carol @bob secret")
    assert (await receive(bob_elsewhere))["room"] == "secret"
    await database_sync_to_async(post)(room, user, "@carol again")
    after = await receive(carol_elsewhere)
    assert (after["room"], after["excerpt"]) == ("general", "@carol again")


async def test_a_direct_message_notifies_the_other_person(ws_connect, user, other_user, room):
    direct, _ = await database_sync_to_async(services.direct_room_open)(user=user, username="bob")
    bob_elsewhere = await joined(ws_connect, other_user, room)
    await database_sync_to_async(post)(direct, user, "psst")
    frame = await receive(bob_elsewhere)
    assert (frame["type"], frame["reason"], frame["room"], frame["excerpt"]) == (
        "notify",
        "direct",
        direct.slug,
        "psst",
    )


# --------------------------------------------------------------------------
# Missed-message email (the email backend here is Django's test outbox;
# tests/e2e/test_email.py sends through a real SMTP server process)
# --------------------------------------------------------------------------


def due(settings) -> None:
    """Make every waiting notice due now."""
    settings.NOTIFY_EMAIL_DELAY = 0


def test_missed_mentions_and_direct_messages_go_in_one_email_once(user, other_user, room, emails, settings):
    due(settings)
    direct, _ = services.direct_room_open(user=user, username="bob")
    post(room, user, "@bob the report?")
    post(direct, user, "and lunch?")
    assert notifications.email_missed(user_id=other_user.pk) == 2
    assert notifications.email_missed(user_id=other_user.pk) == 0  # never twice
    assert len(mail.outbox) == 1
    sent = mail.outbox[0]
    assert sent.to == ["bob@example.com"] and sent.subject == "2 messages you missed"
    assert "@bob the report?" in sent.body and "and lunch?" in sent.body
    assert "http://127.0.0.1:8000/rooms/general/?at=1" in sent.body
    assert sent.extra_headers["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert EmailNotice.objects.filter(emailed=True).count() == 2


def test_nothing_is_emailed_before_the_delay(user, other_user, room, emails, settings):
    settings.NOTIFY_EMAIL_DELAY = 600
    post(room, user, "@bob soon")
    assert notifications.email_missed(user_id=other_user.pk) == 0
    assert EmailNotice.objects.filter(handled_at=None).count() == 1  # still waiting for its turn
    EmailNotice.objects.update(created_at=timezone.now() - timedelta(seconds=601))
    assert notifications.email_missed(user_id=other_user.pk) == 1


def test_read_deleted_and_muted_messages_are_not_emailed(
    user, other_user, third_user, room, other_room, emails, settings
):
    due(settings)
    services.room_join(room=room, user=other_user)
    read = post(room, user, "@bob read this")
    services.read_mark(room=room, user=other_user, seq=read.seq)
    deleted = post(room, user, "@bob oops")
    services.message_delete(room=room, message_id=deleted.pk, user=user)
    notifications.notify_set(room=other_room, user=other_user, level="nothing")
    post(other_room, user, "@bob muted")
    assert notifications.email_missed(user_id=other_user.pk) == 0
    assert mail.outbox == []


def test_no_email_without_an_address_or_with_email_off(user, other_user, third_user, room, settings):
    due(settings)
    other_user.email = "bob@example.com"
    other_user.save()
    NotificationSettings.objects.create(user=other_user, email_notifications=False)
    post(room, user, "@bob @carol hi")  # carol has no address
    assert EmailNotice.objects.count() == 0
    assert notifications.email_missed(user_id=other_user.pk) == 0
    assert mail.outbox == []


def test_the_unsubscribe_link_asks_then_turns_email_off_and_a_forged_one_does_nothing(client, other_user):
    token = notifications.unsubscribe_token(other_user)
    page = client.get(f"/unsubscribe/{token}/")
    assert page.status_code == 200 and "Stop the emails" in page.content.decode()
    assert NotificationSettings.objects.count() == 0  # a GET (a link scanner) changes nothing
    forged = client.post(f"/unsubscribe/{token[:-2]}xx/")
    assert forged.status_code == 400 and NotificationSettings.objects.count() == 0
    done = client.post(f"/unsubscribe/{token}/")
    assert done.status_code == 200
    assert NotificationSettings.objects.get(user=other_user).email_notifications is False


def test_a_failed_send_leaves_the_notices_waiting_for_the_next_run(user, other_user, room, emails, settings):
    due(settings)
    post(room, user, "@bob hi")
    settings.EMAIL_BACKEND = "tests.test_notifications.FailingBackend"
    with pytest.raises(ConnectionRefusedError):
        notifications.email_missed(user_id=other_user.pk)
    assert EmailNotice.objects.filter(handled_at=None).count() == 1
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    assert notifications.email_missed(user_id=other_user.pk) == 1


class FailingBackend:
    def __init__(self, *args, **kwargs) -> None:
        pass

    def send_messages(self, messages) -> int:
        raise ConnectionRefusedError("the SMTP server is down")


def test_a_mention_enqueues_a_task_for_its_email(user, other_user, room, emails, settings):
    from django_tasks_db.models import DBTaskResult

    post(room, user, "@bob hi")
    post(room, user, "no mention")
    tasks = list(DBTaskResult.objects.values_list("task_path", "args_kwargs"))
    assert tasks == [("chat.tasks.email_missed_messages", {"args": [other_user.pk], "kwargs": {}})]


def test_a_mention_in_a_private_room_the_person_left_is_not_emailed(user, other_user, private_room, emails, settings):
    due(settings)
    post(private_room, user, "@bob the numbers")
    services.member_remove(room=private_room, actor=user, username="bob")
    assert notifications.email_missed(user_id=other_user.pk) == 0
    assert mail.outbox == []
    assert EmailNotice.objects.filter(handled_at__isnull=False, emailed=False).count() == 1
