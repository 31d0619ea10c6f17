from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from django.conf import settings
from django.urls import reverse

from chat import protocol, services
from chat.models import Room

pytestmark = pytest.mark.django_db

XSS = '<img src=x onerror=alert(1)><script>alert("x")</script>'


def test_signup_creates_the_account_and_signs_in(client, django_user_model):
    response = client.post(
        reverse("signup"), {"username": "carol", "password1": "a-long-pass-42", "password2": "a-long-pass-42"}
    )
    assert response.status_code == 302 and response.url == reverse("room-list")
    assert django_user_model.objects.filter(username="carol").exists()
    assert client.get(reverse("room-list")).context["user"].username == "carol"


def test_signup_with_mismatched_passwords_is_refused(client, django_user_model):
    response = client.post(reverse("signup"), {"username": "carol", "password1": "a-long-pass-42", "password2": "nope"})
    assert response.status_code == 400
    assert not django_user_model.objects.exists()


@pytest.mark.parametrize("taken", ["alice", "ALICE"])
def test_signup_with_a_taken_name_in_any_case_is_refused_with_a_message(client, user, taken, django_user_model):
    response = client.post(
        reverse("signup"), {"username": taken, "password1": "a-long-pass-42", "password2": "a-long-pass-42"}
    )
    assert response.status_code == 400
    assert "already exists" in response.content.decode()
    assert django_user_model.objects.count() == 1


def test_login_uses_djangos_form_and_redirects_to_rooms(client, user):
    page = client.get(reverse("login"))
    assert b'name="username"' in page.content and b'name="password"' in page.content
    response = client.post(reverse("login"), {"username": "alice", "password": "pw-alice-123"})
    assert response.status_code == 302 and response.url == reverse("room-list")


def test_logout_is_a_post_and_signs_out(client, user):
    client.force_login(user)
    assert client.get(reverse("logout")).status_code == 405
    assert client.post(reverse("logout")).status_code == 302
    assert not client.get(reverse("room-list")).context["user"].is_authenticated


def test_room_list_shows_name_topic_count_and_last_activity(client, user, room):
    services.message_create(room=room, author=user, body="hi")
    services.message_create(room=room, author=user, body="again")
    client.force_login(user)
    content = client.get(reverse("room-list")).content.decode()
    assert "General" in content and "Anything goes" in content
    assert "2 messages" in content
    assert "last active" in content
    assert reverse("room-detail", args=["general"]) in content


def test_room_list_hides_archived_rooms(client, user, room):
    Room.objects.filter(pk=room.pk).update(is_archived=True)
    client.force_login(user)
    assert "General" not in client.get(reverse("room-list")).content.decode()


def test_anonymous_visitor_sees_rooms_but_no_create_form(client, room):
    content = client.get(reverse("room-list")).content.decode()
    assert "General" in content
    assert 'action="/rooms/new/"' not in content


def test_signed_in_user_creates_a_room_and_lands_in_it(client, user):
    client.force_login(user)
    response = client.post(reverse("room-create"), {"name": "Team News", "slug": "", "topic": "Weekly"})
    assert response.status_code == 302 and response.url == reverse("room-detail", args=["team-news"])
    room = Room.objects.get(slug="team-news")
    assert (room.name, room.topic, room.created_by) == ("Team News", "Weekly", user)


def test_room_create_with_bad_slug_shows_the_error_and_creates_nothing(client, user):
    client.force_login(user)
    response = client.post(reverse("room-create"), {"name": "Bad", "slug": "Bad Slug!"})
    assert response.status_code == 400
    assert "lowercase letters" in response.content.decode()
    assert not Room.objects.exists()


def test_room_create_needs_a_signed_in_user(client):
    response = client.post(reverse("room-create"), {"name": "Nope"})
    assert response.status_code == 302 and reverse("login") in response.url
    assert not Room.objects.exists()


def test_room_page_needs_a_signed_in_user(client, room):
    response = client.get(reverse("room-detail", args=[room.slug]))
    assert response.status_code == 302 and reverse("login") in response.url


def test_unknown_room_page_is_404(client, user, room):
    client.force_login(user)
    assert client.get(reverse("room-detail", args=["nope"])).status_code == 404


def test_archived_room_page_shows_the_history_read_only(client, user, room):
    services.message_create(room=room, author=user, body="before the archive")
    services.room_archive(room=room)
    client.force_login(user)
    response = client.get(reverse("room-detail", args=[room.slug]))
    assert response.status_code == 200
    assert "before the archive" in response.content.decode()
    assert response.context["client_config"]["archived"] is True


@pytest.mark.parametrize("page", ["room-detail", "room-patterns"])
def test_pages_get_close_codes_and_limits_from_the_protocol_module(client, user, room, page):
    client.force_login(user)
    content = client.get(reverse(page, args=[room.slug])).content.decode()
    found = re.search(r'<script id="chat-protocol" type="application/json">(.*?)</script>', content)
    constants = json.loads(found.group(1))
    assert constants == protocol.client_constants()
    assert constants["close"]["signedOut"] == protocol.CLOSE_SIGNED_OUT
    assert constants["limits"]["messageMaxLength"] == settings.CHAT_MESSAGE_MAX_LENGTH


def test_room_page_renders_the_last_50_messages_in_seq_order(client, user, room):
    for n in range(1, 61):
        services.message_create(room=room, author=user, body=f"message number {n}")
    client.force_login(user)
    response = client.get(reverse("room-detail", args=[room.slug]))
    content = response.content.decode()

    seqs = [int(seq) for seq in re.findall(r'data-seq="(\d+)"', content)]
    assert seqs == list(range(11, 61))
    config = json.loads(re.search(r'<script id="chat-config" type="application/json">(.*?)</script>', content).group(1))
    assert config["room"] == "general" and config["lastSeq"] == 60 and config["hasMore"] is True
    assert 'id="load-older"' in content and "hidden" not in re.search(
        r'<button[^>]*id="load-older"[^>]*>', content
    ).group(0)


def test_message_body_with_html_is_rendered_escaped(client, user, room):
    services.message_create(room=room, author=user, body=XSS)
    client.force_login(user)
    content = client.get(reverse("room-detail", args=[room.slug])).content.decode()
    assert XSS not in content
    assert "&lt;img src=x onerror=alert(1)&gt;&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in content


def test_room_name_and_topic_with_html_are_rendered_escaped(client, user):
    services.room_create(slug="xss", name=XSS, topic=XSS[:100], created_by=user)
    client.force_login(user)
    escaped = "&lt;img src=x onerror=alert(1)&gt;&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;"
    shown = {
        reverse("room-list"): [r'class="room-name"[^>]*>(.*?)</a>', r'class="room-topic">(.*?)</p>'],
        reverse("room-detail", args=["xss"]): [r'id="room-title">(.*?)</h1>', r'class="room-topic">(.*?)</p>'],
    }
    for url, patterns in shown.items():
        content = client.get(url).content.decode()
        assert "<script>alert" not in content and "<img src=x" not in content
        for pattern in patterns:  # the name and the topic, each shown as text: its escaped form
            assert [match.strip() for match in re.findall(pattern, content, re.S)] == [escaped], (url, pattern)


def test_page_scripts_parse_html_in_one_place_only_an_inert_document_of_the_servers_html():
    from django.contrib.staticfiles import finders

    # room.js is an ES module importing the others in chat/static/chat/: check them all.
    folder = Path(finders.find("chat/room.js")).parent
    scripts = {path.relative_to(folder).as_posix(): path.read_text(encoding="utf-8") for path in folder.rglob("*.js")}
    parsers = ("innerHTML", "outerHTML", "insertAdjacentHTML", "createContextualFragment", "new DOMParser(", ".write(")
    parsing = {name: sum(script.count(p) for p in parsers) for name, script in scripts.items()}
    assert {name: count for name, count in parsing.items() if count} == {"room/render.js": 1}
    # An inert document (nothing in it runs or loads), then an allow-list as the server's.
    assert 'new DOMParser().parseFromString(html, "text/html")' in scripts["room/render.js"]
    assert "textContent" in scripts["room/render.js"]


def test_room_page_shows_deleted_messages_as_placeholders_and_marks_edits(client, user, room):
    secret, _ = services.message_create(room=room, author=user, body="my password is hunter2")
    typo, _ = services.message_create(room=room, author=user, body="helo")
    services.message_delete(room=room, message_id=secret.pk, user=user)
    services.message_edit(room=room, message_id=typo.pk, user=user, body="hello")
    client.force_login(user)
    content = client.get(reverse("room-detail", args=[room.slug])).content.decode()
    assert "hunter2" not in content
    assert "Message deleted" in content and "(edited)" in content
    config = json.loads(re.search(r'<script id="chat-config" type="application/json">(.*?)</script>', content).group(1))
    assert config["lastChange"] == 2


def test_messages_show_their_markdown_with_links_and_raw_html_as_text(client, user, room):
    services.message_create(room=room, author=user, body='**see** https://example.com/a?b=1&c=2. <a href="x">no</a>')
    client.force_login(user)
    content = client.get(reverse("room-detail", args=[room.slug])).content.decode()
    assert (
        '<strong>see</strong> <a href="https://example.com/a?b=1&amp;c=2" target="_blank" '
        'rel="nofollow noopener noreferrer ugc">https://example.com/a?b=1&amp;c=2</a>. '
        '&lt;a href="x"&gt;no&lt;/a&gt;'
    ) in content
    assert '<a href="x">' not in content


def test_room_page_sidebar_lists_the_users_rooms_with_unread_and_marks_the_current(
    client, user, other_user, room, other_room
):
    services.room_join(room=other_room, user=other_user)
    services.message_create(room=other_room, author=user, body="unread for bob")
    client.force_login(other_user)
    content = client.get(reverse("room-detail", args=[room.slug])).content.decode()
    sidebar = re.search(r'<nav class="sidebar".*?</nav>', content, re.S).group(0)
    assert re.search(r'href="/rooms/general/" [^>]*class="current" aria-current="page"', sidebar)
    badge = r'href="/rooms/random/" [^>]*>.*?class="unread-badge">1<span class="visually-hidden"> unread'
    assert re.search(badge, sidebar, re.S)
