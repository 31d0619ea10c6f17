"""Markdown, replies, reactions and pins: on the WebSocket, the API, resume and the admin."""

from __future__ import annotations

import asyncio
import json
from unittest import mock

import pytest
from channels.db import database_sync_to_async
from django.apps import apps as django_apps
from django.db import connection
from django.test import Client
from hypothesis import given, settings
from hypothesis import strategies as st

from chat import markdown, presence, selectors, services
from chat.demo import BODIES
from chat.models import Message, Reaction, Room
from tests.helpers import joined, receive, receive_until_ready, send, silent

# --------------------------------------------------------------------------
# Markdown: what the renderer lets through
# --------------------------------------------------------------------------

LINK_REL = 'target="_blank" rel="nofollow noopener noreferrer ugc"'


@pytest.mark.parametrize(
    ("body", "html"),
    [
        ("**deploy** now", "<p><strong>deploy</strong> now</p>"),
        ("*a* _b_ ~~c~~ `d`", "<p><em>a</em> <em>b</em> <s>c</s> <code>d</code></p>"),
        ("- one\n- two", "<ul>\n<li>one</li>\n<li>two</li>\n</ul>"),
        ("> quoted", "<blockquote>\n<p>quoted</p>\n</blockquote>"),
        ("line one\nline two", "<p>line one<br>\nline two</p>"),
        ("# not a heading\n---", "<p># not a heading<br>\n---</p>"),
        ("see https://example.com/a?b=1&c=2.", f'<p>see <a href="https://example.com/a?b=1&amp;c=2" {LINK_REL}>'
         "https://example.com/a?b=1&amp;c=2</a>.</p>"),
        ("[docs](https://example.com)", f'<p><a href="https://example.com" {LINK_REL}>docs</a></p>'),
        ("[mail](mailto:ops@example.com)", f'<p><a href="mailto:ops@example.com" {LINK_REL}>mail</a></p>'),
    ],
)  # fmt: skip
def test_markdown_renders_what_chat_uses(body, html):
    assert markdown.render(body) == html


def test_a_fenced_code_block_keeps_its_text_and_escapes_html_inside():
    html = markdown.render('```python\nprint("<b>hi</b>")\n```')
    assert html == '<pre><code class="language-python">print("&lt;b&gt;hi&lt;/b&gt;")\n</code></pre>'


@pytest.mark.parametrize(
    "body",
    [
        "[click](javascript:alert(1))",
        "[click](JaVaScRiPt:alert(1))",
        "[click](data:text/html,<script>alert(1)</script>)",
        "[click](vbscript:msgbox(1))",
        "<javascript:alert(1)>",
        "![x](javascript:alert(1))",
    ],
)
def test_only_http_https_and_mailto_links_survive(body):
    html = markdown.render(body)
    assert 'href="javascript' not in html.lower() and 'href="data' not in html.lower()
    assert "href" not in html


@pytest.mark.parametrize(
    "body",
    ['<img src=x onerror="alert(1)">', "<svg onload=alert(1)>", "<script>alert(1)</script>", '<a href="x">x</a>'],
)
def test_raw_html_is_shown_as_text(body):
    html = markdown.render(body)
    assert "<img" not in html and "<svg" not in html and "<script" not in html and "<a " not in html
    assert "&lt;" in html


def test_an_image_becomes_a_link_so_nothing_loads():
    assert markdown.render("![cat](https://example.com/cat.png)") == (
        f'<p><a href="https://example.com/cat.png" {LINK_REL}>cat</a></p>'
    )


def test_a_code_class_other_than_a_language_is_dropped():
    assert markdown.render('```x" onclick="y\ncode\n```') == "<pre><code>code\n</code></pre>"
    assert markdown.render("```<b>\ncode\n```") == "<pre><code>code\n</code></pre>"


@settings(max_examples=2000, deadline=None)
@given(st.text(alphabet="aZé日ß9_ ,.?!:@-*#", max_size=40) | st.sampled_from(BODIES))
def test_the_plain_text_shortcut_renders_exactly_what_markdown_would(body):
    if markdown._PLAIN.fullmatch(body):
        assert markdown.render(body) == markdown._cleaner.clean(markdown._parser.render(body)).strip()


def test_most_chat_messages_take_the_plain_text_shortcut():
    assert sum(bool(markdown._PLAIN.fullmatch(body)) for body in BODIES) == len(BODIES)
    for body in ("see example.com", "a_b", "1. one", "- item", "x  y", "@bob hi", "end "):
        assert not markdown._PLAIN.fullmatch(body), body


# --------------------------------------------------------------------------
# Markdown: stored once, served everywhere
# --------------------------------------------------------------------------

pytestmark = pytest.mark.django_db(transaction=True)


def test_html_is_stored_on_save_re_rendered_on_edit_and_erased_on_delete(user, room):
    message, _ = services.message_create(room=room, author=user, body="**one**")
    assert Message.objects.get().html == "<p><strong>one</strong></p>"
    services.message_edit(room=room, message_id=message.pk, user=user, body="_two_")
    assert Message.objects.get().html == "<p><em>two</em></p>"
    services.message_delete(room=room, message_id=message.pk, user=user)
    assert Message.objects.get().html == ""


async def test_a_message_is_rendered_once_however_many_sockets_receive_it(ws_connect, user, other_user, room):
    sockets = [await joined(ws_connect, someone, room) for someone in (user, other_user, user)]
    with mock.patch.object(markdown, "render", wraps=markdown.render) as render:
        await send(sockets[0], type="send", body="**bold**")
        frames = [await receive(socket) for socket in sockets]
    assert render.call_count == 1
    assert {frame["message"]["html"] for frame in frames} == {"<p><strong>bold</strong></p>"}


def test_the_data_migration_renders_messages_saved_before_markdown(user, room):
    Message.objects.bulk_create(
        [Message(room=room, author=user, body="**old**", seq=1), Message(room=room, author=user, body="", seq=2)]
    )
    migration = __import__("chat.migrations.0007_render_markdown", fromlist=["render_existing"])
    with connection.schema_editor() as editor:
        migration.render_existing(django_apps, editor)
    assert list(Message.objects.order_by("seq").values_list("html", flat=True)) == ["<p><strong>old</strong></p>", ""]


def test_imported_messages_get_their_html(user, room):
    row = {"author": "alice", "body": "`x`", "created_at": "2026-11-01T10:00:00Z", "edited_at": None,
           "deleted_at": None, "room": "elsewhere", "seq": 1}  # fmt: skip
    services.messages_import(room=room, rows=[(1, row)])
    assert Message.objects.get().html == "<p><code>x</code></p>"


# --------------------------------------------------------------------------
# Replies
# --------------------------------------------------------------------------


async def test_a_reply_carries_a_quote_of_the_original(ws_connect, user, other_user, room):
    original = await post(room, other_user, "Who deploys today? " + "x" * 200)
    alice = await joined(ws_connect, user, room)
    await send(alice, type="send", body="me", reply_to=original.pk)
    frame = await receive(alice)
    assert frame["message"]["reply_to"] == {
        "id": original.pk,
        "seq": original.seq,
        "author": "bob",
        "excerpt": original.body[:140],
    }
    stored = await database_sync_to_async(Message.objects.get)(seq=2)
    assert stored.reply_to_id == original.pk


@pytest.mark.parametrize("target", ["other room", "deleted", "unknown", "a string", "true"])
async def test_a_reply_to_what_is_not_a_message_here_is_refused(ws_connect, user, room, other_room, target):
    elsewhere = await post(other_room, user, "elsewhere")
    deleted = await post(room, user, "gone")
    await database_sync_to_async(services.message_delete)(room=room, message_id=deleted.pk, user=user)
    reply_to = {"other room": elsewhere.pk, "deleted": deleted.pk, "unknown": 10**6, "a string": "1", "true": True}
    alice = await joined(ws_connect, user, room)
    await send(alice, type="send", body="answer", nonce="n1", reply_to=reply_to[target])
    frame = await receive(alice)
    assert (frame["type"], frame["code"], frame["nonce"]) == ("error", "invalid_reply", "n1")
    assert await database_sync_to_async(Message.objects.filter(room=room).count)() == 1
    await send(alice, type="send", body="still works")
    assert (await receive(alice))["message"]["body"] == "still works"


async def test_history_around_answers_both_sides_of_a_seq(ws_connect, user, room):
    for i in range(1, 31):
        await post(room, user, f"m{i}")
    alice = await joined(ws_connect, user, room)
    await send(alice, type="history", around=10, limit=6)
    frame = await receive(alice)
    assert frame["type"] == "history" and frame["around"] == 10
    assert [m["seq"] for m in frame["messages"]] == [7, 8, 9, 10, 11, 12]
    assert frame["has_more"] is True
    await send(alice, type="history", around=2, limit=6)
    frame = await receive(alice)
    assert ([m["seq"] for m in frame["messages"]], frame["has_more"]) == ([1, 2, 3, 4, 5, 6], False)


@pytest.mark.parametrize(
    "frame",
    [{"around": 0, "limit": 5}, {"around": "3", "limit": 5}, {"around": 3, "before": 4, "limit": 5}, {"around": 3}],
)
async def test_a_bad_history_around_frame_gets_invalid_frame(ws_connect, user, room, frame):
    alice = await joined(ws_connect, user, room)
    await send(alice, type="history", **frame)
    assert (await receive(alice))["code"] == "invalid_frame"


# --------------------------------------------------------------------------
# Reactions
# --------------------------------------------------------------------------


async def test_reactions_toggle_and_reach_every_socket(ws_connect, user, other_user, room):
    message = await post(room, user, "ship it?")
    alice = await joined(ws_connect, user, room)
    bob = await joined(ws_connect, other_user, room)
    await send(alice, type="react", id=message.pk, emoji="👍")
    first = await receive(bob)  # two sockets' commands race; wait so that alice is first to 👍
    await send(bob, type="react", id=message.pk, emoji="👍")
    await send(bob, type="react", id=message.pk, emoji="🎉")
    for socket, frames in ((alice, []), (bob, [first])):
        frames += [await receive(socket) for _ in range(3 - len(frames))]
        assert [f["type"] for f in frames] == ["reactions"] * 3
        assert [f["change"] for f in frames] == [1, 2, 3]
        assert frames[-1]["id"] == message.pk and frames[-1]["seq"] == message.seq
        assert frames[-1]["reactions"] == [
            {"emoji": "👍", "count": 2, "users": ["alice", "bob"]},
            {"emoji": "🎉", "count": 1, "users": ["bob"]},
        ]
    await send(alice, type="react", id=message.pk, emoji="👍")  # taken back
    assert (await receive(bob))["reactions"][0] == {"emoji": "👍", "count": 1, "users": ["bob"]}
    assert await database_sync_to_async(Reaction.objects.count)() == 2


async def test_a_client_resuming_past_a_reaction_gets_the_message_with_it(ws_connect, user, other_user, room):
    message = await post(room, user, "vote")
    await database_sync_to_async(services.message_react)(room=room, message_id=message.pk, user=other_user, emoji="✅")
    socket, _ = await ws_connect(user, room, after=1, changes_after=0)
    frames, ready = await receive_until_ready(socket)
    assert [f["type"] for f in frames] == ["message_updated"]
    assert frames[0]["message"]["reactions"] == [{"emoji": "✅", "count": 1, "users": ["bob"]}]
    assert ready["last_change"] == 1


@pytest.mark.parametrize("emoji", ["a", "👍👍", "", None, 1, ":+1:", "👍 ", "x" * 100])
async def test_anything_but_one_emoji_gets_invalid_emoji(ws_connect, user, room, emoji):
    message = await post(room, user, "hi")
    alice = await joined(ws_connect, user, room)
    await send(alice, type="react", id=message.pk, emoji=emoji)
    assert (await receive(alice))["code"] == "invalid_emoji"
    assert await database_sync_to_async(Reaction.objects.count)() == 0
    assert await database_sync_to_async(Room.objects.values_list("last_change", flat=True).get)() == 0


def test_a_message_takes_at_most_twenty_different_emoji(user, other_user, room):
    message, _ = services.message_create(room=room, author=user, body="react")
    twenty = ["😀", "😁", "😂", "🤣", "😃", "😄", "😅", "😆", "😉", "😊",
              "😋", "😎", "😍", "😘", "🥰", "😗", "😙", "😚", "🙂", "🤗"]  # fmt: skip
    for emoji in twenty:
        services.message_react(room=room, message_id=message.pk, user=user, emoji=emoji)
    with pytest.raises(services.ChatError) as refused:
        services.message_react(room=room, message_id=message.pk, user=user, emoji="🤩")
    assert refused.value.code == "invalid_emoji"
    services.message_react(room=room, message_id=message.pk, user=other_user, emoji="😀")  # one in use: fine
    message.refresh_from_db()
    assert len(message.reactions) == 20 and message.reactions[0] == {
        "emoji": "😀",
        "count": 2,
        "users": ["alice", "bob"],
    }


def test_an_unqualified_emoji_counts_as_its_emoji_form(user, other_user, room):
    message, _ = services.message_create(room=room, author=user, body="love")
    services.message_react(room=room, message_id=message.pk, user=user, emoji="❤")
    services.message_react(room=room, message_id=message.pk, user=other_user, emoji="❤️")
    message.refresh_from_db()
    assert message.reactions == [{"emoji": "❤️", "count": 2, "users": ["alice", "bob"]}]


async def test_reacting_to_a_deleted_or_unknown_message_is_not_found(ws_connect, user, room, other_room):
    gone = await post(room, user, "gone")
    await database_sync_to_async(services.message_delete)(room=room, message_id=gone.pk, user=user)
    elsewhere = await post(other_room, user, "elsewhere")
    alice = await joined(ws_connect, user, room)
    for message_id in (gone.pk, elsewhere.pk, 10**6):
        await send(alice, type="react", id=message_id, emoji="👍")
        assert (await receive(alice))["code"] == "not_found"
    assert await database_sync_to_async(Reaction.objects.count)() == 0


# --------------------------------------------------------------------------
# Pins
# --------------------------------------------------------------------------


async def test_an_owner_pins_and_every_socket_gets_the_message_with_pinned_at(ws_connect, user, other_user, room):
    message = await post(room, other_user, "the runbook: https://example.com")
    alice = await joined(ws_connect, user, room)  # the room's owner
    bob = await joined(ws_connect, other_user, room)
    await send(alice, type="pin", id=message.pk, pinned=True)
    for socket in (alice, bob):
        frame = await receive(socket)
        assert frame["type"] == "message_updated" and frame["change"] == 1
        assert frame["message"]["pinned_at"] is not None and frame["message"]["edited_at"] is None
    pinned = await database_sync_to_async(selectors.pinned_messages)(room=room)
    assert [m.pk for m in pinned] == [message.pk]
    await send(alice, type="pin", id=message.pk, pinned=True)  # already pinned: nothing changes
    assert await silent(bob, 0.3)
    await send(alice, type="pin", id=message.pk, pinned=False)
    frame = await receive(bob)
    assert frame["message"]["pinned_at"] is None and frame["change"] == 2


async def test_a_member_cannot_pin(ws_connect, user, other_user, room):
    message = await post(room, user, "pin me")
    bob = await joined(ws_connect, other_user, room)
    await send(bob, type="pin", id=message.pk, pinned=True)
    assert (await receive(bob))["code"] == "forbidden"
    await send(bob, type="pin", id=message.pk, pinned="yes")
    assert (await receive(bob))["code"] == "invalid_frame"
    stored = await database_sync_to_async(Message.objects.get)()
    assert stored.pinned_at is None
    assert await database_sync_to_async(Room.objects.values_list("last_change", flat=True).get)() == 0


def test_staff_pin_in_the_admin_through_the_service(admin_client, user, room):
    message, _ = services.message_create(room=room, author=user, body="pin from the admin")
    with mock.patch.object(services.realtime, "publish_change") as publish:
        response = admin_client.post(
            "/admin/chat/message/", {"action": "pin_messages", "_selected_action": [message.pk]}, follow=True
        )
    assert response.status_code == 200
    message.refresh_from_db()
    assert message.pinned_at is not None and message.change == 1
    publish.assert_called_once()
    listing = admin_client.get("/admin/chat/message/?pinned=yes").content.decode()
    assert "pin from the admin" in listing


# --------------------------------------------------------------------------
# The API
# --------------------------------------------------------------------------


@pytest.fixture
def alice_api(user, settings) -> Client:
    settings.CHAT_API_REQUESTS_PER_MINUTE = settings.CHAT_API_WRITES_PER_MINUTE = 100_000
    client = Client()
    client.force_login(user)
    return client


def post_json(client: Client, url: str, data: object, method: str = "post"):
    return getattr(client, method)(url, json.dumps(data), "application/json")


def test_the_api_posts_a_reply_and_answers_its_quote_and_html(alice_api, user, room):
    original, _ = services.message_create(room=room, author=user, body="question")
    response = post_json(alice_api, "/api/rooms/general/messages", {"body": "**answer**", "reply_to": original.pk})
    assert response.status_code == 201
    data = response.json()
    assert data["html"] == "<p><strong>answer</strong></p>"
    assert data["reply_to"] == {"id": original.pk, "seq": 1, "author": "alice", "excerpt": "question"}
    for bad in ("1", 10**6, True):
        response = post_json(alice_api, "/api/rooms/general/messages", {"body": "x", "reply_to": bad})
        assert (response.status_code, response.json()["error"]["code"]) == (400, "invalid_reply")
    assert Message.objects.count() == 2


def test_the_api_toggles_a_reaction_and_answers_the_message(alice_api, user, room):
    message, _ = services.message_create(room=room, author=user, body="react")
    url = f"/api/rooms/general/messages/{message.pk}/reactions/"
    assert post_json(alice_api, url, {"emoji": "🎉"}).json()["reactions"] == [
        {"emoji": "🎉", "count": 1, "users": ["alice"]}
    ]
    assert post_json(alice_api, url, {"emoji": "🎉"}).json()["reactions"] == []
    for bad in ({"emoji": "no"}, {"emoji": 5}, {}):
        response = post_json(alice_api, url, bad)
        assert (response.status_code, response.json()["error"]["code"]) == (400, "invalid_emoji")
    assert Reaction.objects.count() == 0


def test_the_api_pins_lists_and_unpins(alice_api, user, other_user, room):
    message, _ = services.message_create(room=room, author=other_user, body="pin")
    url = f"/api/rooms/general/messages/{message.pk}/pin"
    assert alice_api.put(url).json()["pinned_at"] is not None
    assert [m["id"] for m in alice_api.get("/api/rooms/general/pins").json()["messages"]] == [message.pk]
    assert alice_api.delete(url).json()["pinned_at"] is None
    assert alice_api.get("/api/rooms/general/pins").json() == {"messages": []}
    bob = Client()
    bob.force_login(other_user)
    response = bob.put(url)
    assert (response.status_code, response.json()["error"]["code"]) == (403, "forbidden")
    assert Message.objects.get().pinned_at is None


def test_the_api_answers_messages_around_a_seq(alice_api, user, room):
    for i in range(1, 11):
        services.message_create(room=room, author=user, body=f"m{i}")
    data = alice_api.get("/api/rooms/general/messages?around=5&limit=4").json()
    assert ([m["seq"] for m in data["messages"]], data["has_more"]) == ([3, 4, 5, 6], True)
    response = alice_api.get("/api/rooms/general/messages?around=5&after=1")
    assert (response.status_code, response.json()["error"]["code"]) == (400, "invalid_param")


def test_a_private_rooms_reactions_pins_and_replies_are_404_to_outsiders(user, other_user, third_user, private_room):
    message, _ = services.message_create(room=private_room, author=user, body="secret")
    carol = Client()
    carol.force_login(third_user)
    answers = [
        post_json(carol, f"/api/rooms/secret/messages/{message.pk}/reactions/", {"emoji": "👍"}),
        carol.put(f"/api/rooms/secret/messages/{message.pk}/pin"),
        carol.delete(f"/api/rooms/secret/messages/{message.pk}/pin"),
        carol.get("/api/rooms/secret/pins"),
        carol.get("/api/rooms/secret/messages?around=1"),
        carol.get("/api/rooms/secret/reads"),
    ]
    assert [response.status_code for response in answers] == [404] * 6
    assert [response.json()["error"]["code"] for response in answers] == ["room_not_found"] * 6
    with pytest.raises(services.ChatError) as refused:  # a reply from another room cannot quote it either
        general = services.room_create(slug="open", name="Open", created_by=third_user)
        services.message_create(room=general, author=third_user, body="leak?", reply_to=message.pk)
    assert refused.value.code == "invalid_reply"
    assert Reaction.objects.count() == 0 and Message.objects.filter(room=private_room).get().pinned_at is None
    assert Message.objects.count() == 1


async def post(room, author, body: str) -> Message:
    message, _ = await database_sync_to_async(services.message_create)(room=room, author=author, body=body)
    return message


# --------------------------------------------------------------------------
# Read receipts
# --------------------------------------------------------------------------


def test_read_mark_answers_the_new_mark_only_when_it_moves(user, other_user, room):
    for i in range(3):
        services.message_create(room=room, author=user, body=f"m{i}")
    assert services.read_mark(room=room, user=other_user, seq=2) == 2  # joins the public room, too
    assert services.read_mark(room=room, user=other_user, seq=1) is None
    assert services.read_mark(room=room, user=other_user, seq=2) is None
    assert services.read_mark(room=room, user=other_user, seq=99) == 3  # never past the room's last seq
    assert selectors.read_marks(room=room) == {"bob": 3}


async def test_a_read_mark_that_moves_reaches_the_room_as_read_by(ws_connect, user, other_user, room):
    for i in range(3):
        await post(room, user, f"m{i}")
    alice = await joined(ws_connect, user, room)
    bob = await joined(ws_connect, other_user, room)
    await send(bob, type="read", seq=2)
    assert await receive(alice) == {"type": "read_by", "user": "bob", "seq": 2}
    assert await receive(bob) == {"type": "read_by", "user": "bob", "seq": 2}


async def test_read_by_is_told_at_most_once_a_second_and_always_ends_on_the_last_mark(
    ws_connect, user, other_user, room
):
    for i in range(5):
        await post(room, user, f"m{i}")
    alice = await joined(ws_connect, user, room)
    bob = await joined(ws_connect, other_user, room)
    loop = asyncio.get_running_loop()
    for seq in (1, 2, 3, 4, 5, 4):
        await send(bob, type="read", seq=seq)
    first = await receive(alice)
    first_at = loop.time()
    last = await receive(alice)
    assert (first["seq"], last["seq"]) == (1, 5)
    assert loop.time() - first_at >= presence.READ_BY_INTERVAL * 0.9
    assert await silent(alice, 1.5)


def test_the_api_answers_the_read_marks(user, other_user, room, settings):
    settings.CHAT_API_REQUESTS_PER_MINUTE = 100_000
    for i in range(2):
        services.message_create(room=room, author=user, body=f"m{i}")
    services.read_mark(room=room, user=other_user, seq=2)
    services.read_mark(room=room, user=user, seq=1)
    client = Client()
    client.force_login(user)
    assert client.get("/api/rooms/general/reads").json() == {"marks": {"bob": 2, "alice": 1}}


def test_the_room_page_carries_the_read_marks(user, other_user, room):
    services.message_create(room=room, author=user, body="hello")
    services.read_mark(room=room, user=other_user, seq=1)
    client = Client()
    client.force_login(user)
    config = client.get("/rooms/general/").context["client_config"]
    assert config["readMarks"] == {"bob": 1}


# --------------------------------------------------------------------------
# Direct messages
# --------------------------------------------------------------------------


def test_a_pair_has_one_direct_room_whoever_opens_it(user, other_user):
    room, created = services.direct_room_open(user=user, username="bob")
    again, created_again = services.direct_room_open(user=other_user, username="alice")
    assert (created, created_again) == (True, False) and again.pk == room.pk
    assert room.is_private and room.is_direct and room.slug == f"dm-{user.pk}-{other_user.pk}"
    assert sorted(room.memberships.values_list("user__username", flat=True)) == ["alice", "bob"]
    assert Room.objects.filter(is_direct=True).count() == 1


def test_the_database_keeps_one_direct_room_per_pair(user, other_user):
    from django.db import IntegrityError, transaction

    room, _ = services.direct_room_open(user=user, username="bob")
    with pytest.raises(IntegrityError), transaction.atomic():
        Room.objects.create(slug="dm-copy", name="copy", is_private=True, is_direct=True, direct_pair=room.direct_pair)
    with pytest.raises(IntegrityError), transaction.atomic():  # direct rooms are private, with their pair
        Room.objects.create(slug="dm-open", name="open", is_private=False, is_direct=True, direct_pair="1-99")


@pytest.mark.parametrize("username", ["alice", "nobody", "system", "former-member"])
def test_a_direct_room_with_yourself_or_no_one_is_refused(user, username):
    with pytest.raises(services.ChatError) as refused:
        services.direct_room_open(user=user, username=username)
    assert refused.value.code == ("direct_self" if username == "alice" else "unknown_user")
    assert Room.objects.count() == 0


def test_nobody_joins_or_leaves_a_direct_room(user, other_user, third_user):
    room, _ = services.direct_room_open(user=user, username="bob")
    with pytest.raises(services.ChatError) as refused:
        services.member_add(room=room, actor=user, username="carol")
    assert refused.value.code in ("direct_room", "forbidden")
    with pytest.raises(services.ChatError):
        services.member_remove(room=room, actor=user, username="bob")
    membership = room.memberships.get(user=other_user)
    with pytest.raises(services.ChatError):
        services.membership_delete(membership)
    assert room.memberships.count() == 2


def test_a_room_cannot_take_a_direct_rooms_address(user):
    from django.core.exceptions import ValidationError

    with pytest.raises(ValidationError):
        services.room_create(slug="dm-1-2", name="Sneaky", created_by=user)


def test_dm_url_opens_the_room_and_the_room_list_names_the_partner(user, other_user, third_user):
    alice = Client()
    alice.force_login(user)
    response = alice.get("/dm/bob/")
    room = Room.objects.get(is_direct=True)
    assert response.status_code == 302 and response["Location"] == f"/rooms/{room.slug}/"
    assert alice.get("/dm/bob/")["Location"] == f"/rooms/{room.slug}/" and Room.objects.count() == 1
    page = alice.get(response["Location"])
    assert page.status_code == 200 and page.context["direct_with"] == "bob"
    services.message_create(room=room, author=other_user, body="psst")
    rooms = {r.slug: r for r in selectors.room_list(user=user)}
    assert rooms[room.slug].direct_with == "bob" and rooms[room.slug].unread == 1
    unknown = alice.get("/dm/nobody/", follow=True)
    assert (
        unknown.redirect_chain[-1][0] == "/"
        and "There is no user called &quot;nobody&quot;" in unknown.content.decode()
    )


def test_others_cannot_see_a_direct_room_exists_on_any_path(user, other_user, third_user):
    room, _ = services.direct_room_open(user=user, username="bob")
    message, _ = services.message_create(room=room, author=user, body="between us")
    carol = Client()
    carol.force_login(third_user)
    answers = [
        carol.get(f"/rooms/{room.slug}/"),
        carol.get(f"/api/rooms/{room.slug}/messages"),
        carol.get(f"/api/rooms/{room.slug}/messages/{message.pk}"),
        carol.get(f"/api/rooms/{room.slug}/pins"),
        carol.get(f"/api/rooms/{room.slug}/poll?timeout=1"),
    ]
    assert [response.status_code for response in answers] == [404] * 5
    assert [r["slug"] for r in carol.get("/api/rooms/").json()["rooms"]] == []
    assert selectors.room_list(user=third_user).filter(pk=room.pk).count() == 0
    assert [r.pk for r in selectors.room_list(user=other_user)] == [room.pk]


def test_the_api_opens_a_direct_room(user, other_user, settings):
    settings.CHAT_API_REQUESTS_PER_MINUTE = settings.CHAT_API_WRITES_PER_MINUTE = 100_000
    alice = Client()
    alice.force_login(user)
    first = post_json(alice, "/api/dms/", {"username": "bob"})
    assert first.status_code == 201
    assert first.json()["is_direct"] is True and first.json()["direct_with"] == "bob"
    again = post_json(alice, "/api/dms/", {"username": "bob"})
    assert again.status_code == 200 and again.json()["slug"] == first.json()["slug"]
    for body, code in (
        ({"username": "alice"}, "direct_self"),
        ({"username": "zed"}, "unknown_user"),
        ({}, "invalid_field"),
    ):
        response = post_json(alice, "/api/dms/", body)
        assert (response.status_code, response.json()["error"]["code"]) == (400, code)
    listed = alice.get("/api/rooms/").json()["rooms"]
    assert [(r["is_direct"], r["direct_with"]) for r in listed] == [(True, "bob")]
    assert Room.objects.count() == 1


def test_either_person_pins_in_a_direct_room(user, other_user):
    room, _ = services.direct_room_open(user=user, username="bob")
    message, _ = services.message_create(room=room, author=user, body="remember this")
    pinned = services.message_pin(room=room, message_id=message.pk, user=other_user, pinned=True)
    assert pinned.pinned_at is not None


def test_the_admin_shows_a_direct_rooms_members_and_changes_none(admin_client, user, other_user, third_user):
    room, _ = services.direct_room_open(user=user, username="bob")
    response = admin_client.post(
        "/admin/chat/membership/add/", {"user": third_user.pk, "room": room.pk, "role": "member"}
    )
    assert response.status_code == 200 and "nobody joins it" in response.content.decode()
    bobs = room.memberships.get(user=other_user)
    assert admin_client.post(f"/admin/chat/membership/{bobs.pk}/delete/", {"post": "yes"}).status_code == 403
    assert room.memberships.count() == 2
    page = admin_client.get(f"/admin/chat/room/{room.pk}/change/").content.decode()
    assert "bob" in page and 'name="memberships-0-role"' not in page  # shown, read-only


def test_a_deleted_or_cleared_message_leaves_the_pinned_list(user, room):
    kept, gone = (services.message_create(room=room, author=user, body=body)[0] for body in ("kept", "gone"))
    for message in (kept, gone):
        services.message_pin(room=room, message_id=message.pk, user=user, pinned=True)
    services.message_delete(room=room, message_id=gone.pk, user=user)
    assert [m.pk for m in selectors.pinned_messages(room=room)] == [kept.pk]
    services.room_clear_history(room=room)
    assert selectors.pinned_messages(room=room) == []
    assert Message.objects.filter(pinned_at__isnull=False).count() == 0


async def test_reactions_have_a_rate_limit_of_their_own(ws_connect, user, room, settings):
    settings.CHAT_MESSAGE_RATE_LIMIT = 2
    message = await post(room, user, "react a lot")
    alice = await joined(ws_connect, user, room)
    for _ in range(2):
        await send(alice, type="react", id=message.pk, emoji="👍")
        assert (await receive(alice))["type"] == "reactions"
    await send(alice, type="react", id=message.pk, emoji="👍")
    refused = await receive(alice)
    assert (refused["code"], refused["retry_after"] >= 1) == ("rate_limited", True)
    assert "reactions" in refused["detail"]
    stored = await database_sync_to_async(Message.objects.get)(pk=message.pk)
    assert stored.change == 2 and stored.reactions == []  # on, off, and the third never happened
    await send(alice, type="send", body="messages have their own budget")
    assert (await receive(alice))["type"] == "message"


def test_the_apis_reactions_are_limited_too(user, room, settings):
    settings.CHAT_MESSAGE_RATE_LIMIT = 1
    settings.CHAT_API_REQUESTS_PER_MINUTE = settings.CHAT_API_WRITES_PER_MINUTE = 100_000
    message, _ = services.message_create(room=room, author=user, body="once")
    client = Client()
    client.force_login(user)
    url = f"/api/rooms/general/messages/{message.pk}/reactions/"
    assert post_json(client, url, {"emoji": "👍"}).status_code == 200
    response = post_json(client, url, {"emoji": "👍"})
    assert (response.status_code, response.json()["error"]["code"]) == (429, "rate_limited")
    assert int(response["Retry-After"]) >= 1 and Reaction.objects.count() == 1


async def test_read_by_counts_per_user_however_many_tabs_send_reads(ws_connect, user, other_user, room):
    for i in range(3):
        await post(room, user, f"m{i}")
    alice = await joined(ws_connect, user, room)
    bob_tabs = [await joined(ws_connect, other_user, room) for _ in range(2)]
    for tab, seq in zip((*bob_tabs, bob_tabs[0]), (1, 2, 3), strict=True):
        await send(tab, type="read", seq=seq)
    loop = asyncio.get_running_loop()
    told: list[tuple[float, int]] = []
    while not told or told[-1][1] != 3:
        seq = (await receive(alice))["seq"]
        told.append((loop.time(), seq))
    assert len(told) <= 2  # the tabs' three reads: told at once, then once more a second later at most
    if len(told) == 2:
        assert told[0][1] < 3 and told[1][0] - told[0][0] >= presence.READ_BY_INTERVAL * 0.9
    assert await silent(alice, 1.5)
