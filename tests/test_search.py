"""Full-text search (chat/search.py), with the same expectations on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from datetime import timedelta
from io import StringIO

import pytest
from django.test import Client
from django.utils import timezone

from chat import search, services
from chat.models import Message
from chat.validation import ChatError

pytestmark = pytest.mark.django_db(transaction=True)


def post(room, author, body: str) -> Message:
    return services.message_create(room=room, author=author, body=body)[0]


def found(user, query: str, **filters) -> list[str]:
    return [hit.message.body for hit in search.search(user=user, query=query, **filters)]


def test_words_phrases_and_exclusions(user, room):
    post(room, user, "deploy the api today")
    post(room, user, "lunch today?")
    post(room, user, "today we deploy, no lunch")
    assert sorted(found(user, "deploy")) == ["deploy the api today", "today we deploy, no lunch"]
    assert found(user, '"the api"') == ["deploy the api today"]
    assert found(user, "today -lunch") == ["deploy the api today"]
    assert sorted(found(user, 'today -"no lunch"')) == ["deploy the api today", "lunch today?"]


def test_english_words_are_stemmed_on_both_databases(user, room):
    post(room, user, "we are deploying now")
    assert found(user, "deploy") == ["we are deploying now"]
    assert found(user, "deployed") == ["we are deploying now"]


@pytest.mark.parametrize(
    ("query", "code"),
    [("", "empty_query"), ("   ", "empty_query"), ("x" * 201, "query_too_long"), ("-lunch", "invalid_query"),
     ("!!! ???", "invalid_query"), (None, "empty_query"), ("a\x00b", "invalid_query"), ("\ud800x", "invalid_query")],
)  # fmt: skip
def test_a_query_with_nothing_to_find_is_a_clear_error(user, query, code):
    with pytest.raises(ChatError) as error:
        search.search(user=user, query=query)
    assert error.value.code == code


def test_operators_and_quotes_in_the_text_are_words_not_syntax(user, room):
    post(room, user, "NEAR the AND gate OR not")
    assert found(user, "NEAR AND OR") == ["NEAR the AND gate OR not"]
    assert found(user, 'gate "') == ["NEAR the AND gate OR not"]


def test_an_edit_is_found_at_once_and_the_old_text_no_longer(user, room):
    message = post(room, user, "coffee at ten")
    services.message_edit(room=room, message_id=message.pk, user=user, body="tea at ten")
    assert found(user, "coffee") == []
    assert found(user, "tea") == ["tea at ten"]


def test_deleted_messages_and_cleared_history_are_never_found(user, room, other_room):
    message = post(room, user, "secret plan")
    post(other_room, user, "plan b")
    services.message_delete(room=room, message_id=message.pk, user=user)
    assert found(user, "plan") == ["plan b"]
    post(room, user, "plan c")
    services.room_clear_history(room=other_room)
    assert found(user, "plan") == ["plan c"]


def test_private_rooms_are_searched_by_members_only(user, other_user, third_user, room, private_room):
    post(room, user, "budget public")
    post(private_room, user, "budget private one")
    post(private_room, other_user, "budget private two")
    assert len(found(user, "budget")) == 3
    assert len(found(other_user, "budget")) == 3
    assert found(third_user, "budget") == ["budget public"]
    assert found(third_user, "private") == []
    services.member_remove(room=private_room, actor=user, username="bob")
    assert found(other_user, "budget") == ["budget public"]


def test_direct_rooms_are_searched_by_their_two_people(user, other_user, third_user):
    direct, _ = services.direct_room_open(user=user, username="bob")
    post(direct, user, "between us")
    assert found(other_user, "between") == ["between us"]
    assert found(third_user, "between") == []


def test_filters_by_room_author_and_time(user, other_user, room, other_room):
    services.room_join(room=room, user=other_user)
    post(room, user, "report one")
    post(room, other_user, "report two")
    old = post(other_room, user, "report three")
    Message.objects.filter(pk=old.pk).update(created_at=timezone.now() - timedelta(days=3))
    assert sorted(found(user, "report", room=room)) == ["report one", "report two"]
    assert found(user, "report", author=other_user) == ["report two"]
    assert found(user, "report", before=timezone.now() - timedelta(days=1)) == ["report three"]
    assert sorted(found(user, "report", after=timezone.now() - timedelta(days=1))) == ["report one", "report two"]


def test_the_most_relevant_first_then_the_newest(user, room):
    post(room, user, "deploy now")
    post(room, user, "deploy deploy deploy the deploy")
    post(room, user, "deploy soon")
    bodies = found(user, "deploy")
    assert bodies[0] == "deploy deploy deploy the deploy"
    assert bodies[1:] == ["deploy soon", "deploy now"]  # as relevant as each other: the newest first


def test_snippets_mark_the_words_and_escape_everything_else(user, room):
    post(room, user, "<script>alert(1)</script> deploy 1<2 & <b>ship</b>")
    (hit,) = search.search(user=user, query="deploy")
    assert "<mark>deploy</mark>" in hit.snippet
    # PostgreSQL's headline leaves tags out; SQLite's keeps them as text. Neither leaves one in.
    assert "<script>" not in hit.snippet and "<b>" not in hit.snippet
    assert hit.snippet.replace("<mark>", "").replace("</mark>", "").count("<") == 0
    assert "&amp;" in hit.snippet and "1&lt;2" in hit.snippet


def test_the_limit_caps_the_results(user, room):
    for number in range(5):
        post(room, user, f"note {number}")
    assert len(search.search(user=user, query="note", limit=3)) == 3


def test_the_api_searches_with_filters_and_refuses_a_bad_query(user, other_user, room, private_room):
    post(room, user, "launch day")
    post(private_room, user, "launch secrets")
    bob = Client()
    bob.force_login(other_user)
    answer = bob.get("/api/search/", {"q": "launch"}).json()
    assert {r["room"] for r in answer["results"]} == {"general", "secret"}
    result = next(r for r in answer["results"] if r["room"] == "general")
    assert result["snippet"] == "<mark>launch</mark> day"
    assert set(result) >= {"id", "seq", "room", "room_name", "author", "created_at", "snippet", "url"}
    assert result["url"] == "/rooms/general/?at=1"
    assert [r["room"] for r in bob.get("/api/search/", {"q": "launch", "room": "secret"}).json()["results"]] == [
        "secret"
    ]
    bad = bob.get("/api/search/", {"q": ""})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "empty_query"
    carol = Client()
    carol.force_login(user.__class__.objects.create_user("carol2"))
    assert carol.get("/api/search/", {"q": "launch", "room": "secret"}).status_code == 404
    assert [r["room"] for r in carol.get("/api/search/", {"q": "launch"}).json()["results"]] == ["general"]


def test_the_search_page_shows_results_with_links_and_a_bad_query_says_why(user, other_user, room, private_room):
    post(room, user, "quarterly numbers")
    post(private_room, user, "quarterly secrets")
    carol = Client()
    carol.force_login(user.__class__.objects.create_user("carol2"))
    page = carol.get("/search/", {"q": "quarterly"}).content.decode()
    assert page.count('class="search-result"') == 1
    assert '<a href="/rooms/general/?at=1"><mark>quarterly</mark> numbers</a>' in page
    assert "secret" not in page
    alice = Client()
    alice.force_login(user)
    assert alice.get("/search/", {"q": "quarterly"}).content.decode().count('class="search-result"') == 2
    assert (
        alice.get("/search/", {"q": "quarterly", "room": "secret"}).content.decode().count('class="search-result"') == 1
    )
    bad = alice.get("/search/", {"q": "-quarterly"})
    assert bad.status_code == 400 and "at least one word" in bad.content.decode()
    assert alice.get("/search/").status_code == 200  # the empty form


def test_rebuild_search_index_restores_a_lost_index_with_progress(user, room):
    from io import StringIO

    from django.core.management import call_command
    from django.db import connection

    post(room, user, "before the loss")
    with connection.cursor() as cursor:  # what a restore without the index, or a rebuilt table, leaves
        for statement in search.DROP_DDL[connection.vendor]:
            cursor.execute(statement)
    out = StringIO()
    call_command("rebuild_search_index", stdout=out)
    assert "[##############################] 100% 1 of 1 messages" in out.getvalue()
    assert "Indexed 1 messages" in out.getvalue()
    assert found(user, "loss") == ["before the loss"]
    post(room, user, "after the rebuild")  # and it keeps itself current again
    assert found(user, "rebuild") == ["after the rebuild"]


def test_the_admins_message_search_uses_the_index_in_every_room(django_user_model, user, room, private_room):
    staff = django_user_model.objects.create_superuser("root", password="pw-root-123")
    post(room, user, "deploying the gateway")
    post(private_room, user, "gateway keys")
    post(room, user, "nothing to see")
    admin = Client()
    admin.force_login(staff)
    page = admin.get("/admin/chat/message/", {"q": "gateway"}).content.decode()
    assert page.count('class="field-body_start"') == 2
    assert "deploying the gateway" in page and "gateway keys" in page
    stemmed = admin.get("/admin/chat/message/", {"q": "deploy"}).content.decode()
    assert stemmed.count('class="field-body_start"') == 1
    by_author = admin.get("/admin/chat/message/", {"q": "alice"}).content.decode()
    assert by_author.count('class="field-body_start"') == 3


@pytest.mark.parametrize(("at", "jump_to"), [("2", 2), ("0", None), ("9", None), ("x", None), ("", None), ("²", None)])
def test_the_room_page_takes_at_as_the_message_to_go_to(client, user, room, at, jump_to):
    post(room, user, "one")
    post(room, user, "two")
    client.force_login(user)
    page = client.get(f"/rooms/general/?at={at}").content.decode()
    assert f'"jumpTo": {json.dumps(jump_to)}' in page


def test_seeded_demo_messages_are_found_and_the_index_keeps_itself_current_after(user):
    from django.core.management import call_command

    from chat import demo

    call_command("seeddemo", rooms=2, messages=40, workers=1, stdout=StringIO())
    seeded = Message.objects.get(room__slug="demo-1", seq=10)
    rare = seeded.body.split()[-1]
    assert rare in demo.RARE_WORDS
    assert found(user, rare) == [seeded.body]
    room = seeded.room
    post(room, user, "wombat after seeding")  # the triggers are back
    assert found(user, "wombat") == ["wombat after seeding"]


def test_only_the_newest_matches_are_ranked(user, room, monkeypatch):
    monkeypatch.setattr(search, "CANDIDATES", 3)
    for number in range(5):
        post(room, user, f"walrus {number}")
        post(room, user, "filler")
    assert sorted(found(user, "walrus")) == ["walrus 2", "walrus 3", "walrus 4"]
    assert len(search.newest_matches("walrus", limit=4)) == 4
