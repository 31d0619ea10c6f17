"""Files in messages (chat/files.py): uploads checked as hostile, attached by a send, served only to readers."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from pathlib import Path

import pytest
from channels.db import database_sync_to_async
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from PIL import Image

from chat import files, services
from chat.models import Attachment, Message
from chatsite.middleware import RequestBodyLimit
from tests.helpers import joined, receive, send

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def media(settings, tmp_path) -> Path:
    settings.MEDIA_ROOT = tmp_path / "media"
    return settings.MEDIA_ROOT


def png(width: int = 40, height: int = 30, color=(200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, format="PNG")
    return out.getvalue()


def client_for(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def upload(client: Client, data: bytes, name: str = "picture.png", slug: str = "general"):
    return client.post(f"/api/rooms/{slug}/files/", {"file": SimpleUploadedFile(name, data)})


def stored_files(media: Path) -> list[Path]:
    return sorted(path for path in media.rglob("*") if path.is_file()) if media.exists() else []


def post_json(client: Client, url: str, data: object):
    return client.post(url, json.dumps(data), "application/json")


# --------------------------------------------------------------------------
# Uploading and attaching
# --------------------------------------------------------------------------


def test_an_image_uploads_with_a_thumbnail_and_a_send_attaches_it(user, other_user, room, media):
    alice, bob = client_for(user), client_for(other_user)
    response = upload(alice, png(), "cat.png")
    assert response.status_code == 201
    uploaded = response.json()
    assert uploaded["name"] == "cat.png" and uploaded["size"] == len(png()) and uploaded["content_type"] == "image/png"
    assert uploaded["thumbnail_url"] is not None
    assert alice.get(uploaded["url"]).status_code == 200
    assert bob.get(uploaded["url"]).status_code == 404  # not attached yet: its uploader's alone
    sent = post_json(alice, "/api/rooms/general/messages", {"body": "", "attachments": [uploaded["id"]]})
    assert sent.status_code == 201
    assert sent.json()["attachments"] == [uploaded] and sent.json()["body"] == ""
    image = bob.get(uploaded["url"])
    assert image.status_code == 200 and image["Content-Type"] == "image/png"
    assert image["Content-Security-Policy"] == "sandbox" and image["X-Content-Type-Options"] == "nosniff"
    assert "attachment" not in image.get("Content-Disposition", "")
    thumbnail = bob.get(uploaded["thumbnail_url"])
    assert thumbnail.status_code == 200 and thumbnail["Content-Type"] == "image/jpeg"
    assert len(stored_files(media)) == 2


async def test_a_websocket_send_attaches_uploads_and_every_socket_gets_them(ws_connect, user, other_user, room):
    attachment = await database_sync_to_async(files.upload)(
        room=room, user=user, uploaded=SimpleUploadedFile("notes.txt", b"plain notes\n")
    )
    alice = await joined(ws_connect, user, room)
    bob = await joined(ws_connect, other_user, room)
    await send(alice, type="send", body="see attached", nonce="f1", attachments=[attachment.pk])
    for socket in (alice, bob):
        frame = await receive(socket)
        assert frame["message"]["attachments"] == [files.payload(attachment)]
    assert frame["message"]["attachments"][0]["content_type"] == "text/plain"
    assert frame["message"]["attachments"][0]["thumbnail_url"] is None


def test_a_send_may_attach_only_the_senders_own_unattached_uploads_in_that_room(user, other_user, room, other_room):
    alice, bob = client_for(user), client_for(other_user)
    services.room_join(room=room, user=other_user)
    bobs = upload(bob, png()).json()["id"]
    elsewhere = upload(alice, png(), slug="random").json()["id"]
    mine = upload(alice, png()).json()["id"]
    for attachments in ([bobs], [elsewhere], [mine, mine], [999999], "x", [0], list(range(1, 12))):
        response = post_json(alice, "/api/rooms/general/messages", {"body": "files", "attachments": attachments})
        assert response.status_code == 400, attachments
        assert response.json()["error"]["code"] == "invalid_attachment"
    assert Message.objects.count() == 0
    assert (
        post_json(alice, "/api/rooms/general/messages", {"body": "", "attachments": []}).json()["error"]["code"]
        == "empty_body"
    )
    assert post_json(alice, "/api/rooms/general/messages", {"body": "one", "attachments": [mine]}).status_code == 201
    again = post_json(alice, "/api/rooms/general/messages", {"body": "two", "attachments": [mine]})
    assert again.status_code == 400 and Message.objects.count() == 1  # attached once only


@pytest.mark.parametrize(
    ("data", "name", "status", "code"),
    [
        (b"", "empty.txt", 400, "empty_file"),
        (b"\x7fELF\x02\x01\x01\x00" + b"\x00" * 64, "tool.png", 415, "file_type_not_allowed"),
        (b"MZ\x90\x00\x03\x00\x00\x00", "setup.exe", 415, "file_type_not_allowed"),
        (png()[:60], "cut.png", 400, "invalid_image"),
        (b"\x89PNG\r\n\x1a\n" + b"garbage" * 20, "fake.png", 400, "invalid_image"),
    ],
)
def test_bad_uploads_get_a_clear_error_and_store_nothing(user, room, media, data, name, status, code):
    response = upload(client_for(user), data, name)
    assert response.status_code == status
    assert response.json()["error"]["code"] == code
    assert Attachment.objects.count() == 0 and stored_files(media) == []


def test_a_file_too_big_and_a_full_quota_are_refused(user, room, settings, media):
    settings.CHAT_UPLOAD_MAX_BYTES = 1000
    alice = client_for(user)
    response = upload(alice, b"x" * 1001, "big.txt")
    assert response.status_code == 413 and response.json()["error"]["code"] == "file_too_large"
    settings.CHAT_UPLOAD_QUOTA_BYTES = 1500
    assert upload(alice, b"y" * 900, "first.txt").status_code == 201
    response = upload(alice, b"z" * 900, "second.txt")
    assert response.status_code == 413 and response.json()["error"]["code"] == "quota_exceeded"
    assert Attachment.objects.count() == 1 and len(stored_files(media)) == 1


def test_a_decompression_bomb_is_refused(user, room, monkeypatch, media):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow's limit, made small: 40×30 is past it
    response = upload(client_for(user), png(100, 100), "bomb.png")
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_image"
    assert stored_files(media) == []


def test_the_type_comes_from_the_content_and_scriptable_files_only_download(user, room):
    alice = client_for(user)
    cases = {
        "page.png": (b"<html><body><script>alert(1)</script></body></html>", "text/html"),
        "drawing.svg": (b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>', "image/svg+xml"),
        "doc.pdf": (b"%PDF-1.7\n...", "application/pdf"),
        "notes.png": (b"just text, named like an image", "text/plain"),
    }
    for name, (data, content_type) in cases.items():
        uploaded = upload(alice, data, name).json()
        assert uploaded["content_type"] == content_type and uploaded["thumbnail_url"] is None
        served = alice.get(uploaded["url"])
        assert served["Content-Type"].startswith(content_type)
        assert served["Content-Disposition"].startswith("attachment")
        assert served["Content-Security-Policy"] == "sandbox" and served["X-Content-Type-Options"] == "nosniff"


def test_a_hostile_name_is_kept_as_text_and_paths_are_dropped(user, room):
    alice = client_for(user)
    uploaded = upload(alice, b"hello", "../../etc/<img src=x onerror=alert(1)>.txt").json()
    assert uploaded["name"] == "<img src=x onerror=alert(1)>.txt"
    served = alice.get(uploaded["url"])
    assert served.status_code == 200
    # A header is not HTML: the name goes in a quoted string, as it is.
    assert served["Content-Disposition"] == 'attachment; filename="<img src=x onerror=alert(1)>.txt"'
    # No line breaks survive in a name, so none can start a header of its own.
    assert files._clean_name('say "hi"\r\nSet-Cookie: x=1.txt') == 'say "hi"Set-Cookie: x=1.txt'
    assert files._clean_name("C:\\Users\\me\\report.pdf") == "report.pdf"
    assert files._clean_name("\u202e") == "file"
    stored = Attachment.objects.get().file.name
    assert stored.startswith("attachments/") and "img" not in stored and ".." not in stored


def test_thumbnails_are_upright_without_metadata_and_an_animation_gives_its_first_frame(user, room):
    alice = client_for(user)
    photo = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to show
    exif[0x010E] = "secret description"
    Image.new("RGB", (80, 40), (0, 0, 255)).save(photo, format="JPEG", exif=exif.tobytes())
    thumbnail = alice.get(upload(alice, photo.getvalue(), "photo.jpg").json()["thumbnail_url"])
    with Image.open(io.BytesIO(b"".join(thumbnail.streaming_content))) as shown:
        assert shown.size == (40, 80)  # upright
        assert not shown.getexif() and "exif" not in shown.info
    frames = [Image.new("RGB", (20, 20), color) for color in ((255, 0, 0), (0, 255, 0))]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    thumbnail = alice.get(upload(alice, gif.getvalue(), "anim.gif").json()["thumbnail_url"])
    with Image.open(io.BytesIO(b"".join(thumbnail.streaming_content))) as first:
        red, green, _ = first.convert("RGB").getpixel((10, 10))
        assert red > 200 and green < 60


# --------------------------------------------------------------------------
# Who may download, and when the files go
# --------------------------------------------------------------------------


def test_only_readers_of_a_private_room_get_its_files(user, other_user, third_user, private_room):
    alice = client_for(user)
    uploaded = upload(alice, png(), slug="secret").json()
    post_json(alice, "/api/rooms/secret/messages", {"body": "plan", "attachments": [uploaded["id"]]})
    statuses = [client_for(person).get(uploaded["url"]).status_code for person in (user, other_user, third_user)]
    assert statuses == [200, 200, 404]
    thumbnails = [client_for(person).get(uploaded["thumbnail_url"]).status_code for person in (other_user, third_user)]
    assert thumbnails == [200, 404]
    assert Client().get(uploaded["url"]).status_code == 302  # signed out: the login page
    assert (
        client_for(third_user).post("/api/rooms/secret/files/", {"file": SimpleUploadedFile("a.txt", b"a")}).status_code
        == 404
    )
    services.member_remove(room=private_room, actor=user, username="bob")
    assert client_for(other_user).get(uploaded["url"]).status_code == 404


def test_deleting_the_message_or_clearing_the_room_deletes_its_files(user, room, other_room, media):
    alice = client_for(user)
    first = upload(alice, png(), "a.png").json()
    message = post_json(alice, "/api/rooms/general/messages", {"body": "a", "attachments": [first["id"]]}).json()
    second = upload(alice, b"text", "b.txt", slug="random").json()
    post_json(alice, "/api/rooms/random/messages", {"body": "b", "attachments": [second["id"]]})
    assert len(stored_files(media)) == 3  # an image and its thumbnail, and a text file
    services.message_delete(room=room, message_id=message["id"], user=user)
    assert alice.get(first["url"]).status_code == 404 and len(stored_files(media)) == 1
    assert Message.objects.get(pk=message["id"]).attachments == []
    services.room_clear_history(room=other_room)
    assert stored_files(media) == [] and Attachment.objects.count() == 0


def test_purging_old_messages_deletes_their_files_and_counts_messages_only(user, room, media):
    from django.utils import timezone

    alice = client_for(user)
    uploaded = upload(alice, png(), "a.png").json()
    post_json(alice, "/api/rooms/general/messages", {"body": "old", "attachments": [uploaded["id"]]})
    services.message_react(room=room, message_id=Message.objects.get().pk, user=user, emoji="👍")
    purged = services.messages_purge(older_than=timezone.now() + timezone.timedelta(seconds=1))
    assert purged == 1
    assert stored_files(media) == [] and Attachment.objects.count() == 0


# --------------------------------------------------------------------------
# Bodies too large never reach Django
# --------------------------------------------------------------------------


def test_a_body_over_the_cap_is_refused_before_the_application_reads_it():
    reached = []

    async def application(scope, receive, send):
        while (await receive()).get("more_body"):
            pass
        reached.append(scope["path"])

    async def run(headers, chunks):
        sent = []
        queue = [
            {"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1} for i, chunk in enumerate(chunks)
        ]

        async def receive():
            return queue.pop(0)

        async def record(message):
            sent.append(message)

        await RequestBodyLimit(application, 100)({"type": "http", "path": "/x", "headers": headers}, receive, record)
        return sent

    declared = asyncio.run(run([(b"content-length", b"101")], [b"x" * 101]))
    assert declared[0]["status"] == 413 and reached == []
    streamed = asyncio.run(run([], [b"x" * 60, b"x" * 60]))
    assert streamed[0]["status"] == 413 and reached == []
    fine = asyncio.run(run([(b"content-length", b"100")], [b"x" * 100]))
    assert fine == [] and reached == ["/x"]


@pytest.mark.parametrize(
    "content_type", ["multipart/form-data", "multipart/form-data; boundary=xyz", "application/json", "text/plain"]
)
def test_an_upload_that_is_not_proper_multipart_is_a_clear_400(user, room, content_type):
    # Schemathesis found the first: "multipart/form-data" without a boundary was a 500.
    response = client_for(user).post("/api/rooms/general/files/", b"--xyz\r\nnot really", content_type=content_type)
    assert response.status_code == 400
    assert response.json()["error"]["code"] in ("invalid_upload", "missing_file")
    assert Attachment.objects.count() == 0


# --------------------------------------------------------------------------
# Export and import carry files
# --------------------------------------------------------------------------


def test_export_and_import_carry_the_files_whole_and_check_them_again(user, room, tmp_path, media):
    from django.core.management import call_command

    alice = client_for(user)
    image = upload(alice, png(), "cat.png").json()["id"]
    text = upload(alice, b"minutes\n", "notes.txt").json()["id"]
    post_json(alice, "/api/rooms/general/messages", {"body": "", "attachments": [image, text]})
    path = tmp_path / "general.jsonl"
    call_command("exportroom", "general", "--output", str(path), stdout=io.StringIO(), stderr=io.StringIO())
    (row,) = [json.loads(line) for line in path.read_text().splitlines()]
    assert [a["name"] for a in row["attachments"]] == ["cat.png", "notes.txt"]
    copy = services.room_create(slug="copy", name="Copy", created_by=user)
    call_command("importroom", "copy", str(path), stdout=io.StringIO(), stderr=io.StringIO())
    imported = Message.objects.get(room=copy)
    assert [(a["name"], a["content_type"]) for a in imported.attachments] == [
        ("cat.png", "image/png"),
        ("notes.txt", "text/plain"),
    ]
    assert alice.get(imported.attachments[0]["thumbnail_url"]).status_code == 200
    assert b"".join(alice.get(imported.attachments[1]["url"]).streaming_content) == b"minutes\n"
    csv_path = tmp_path / "general.csv"
    call_command(
        "exportroom",
        "general",
        "--format",
        "csv",
        "--output",
        str(csv_path),
        stdout=io.StringIO(),
        stderr=io.StringIO(),
    )
    assert "cat.png, notes.txt" in csv_path.read_text()


def test_an_import_with_a_forbidden_or_broken_file_stores_none_of_the_batch(user, room, tmp_path, media):
    from django.core.management import call_command
    from django.core.management.base import CommandError

    copy = services.room_create(slug="copy", name="Copy", created_by=user)
    good = {"name": "ok.txt", "data": base64.b64encode(b"fine").decode()}
    bad = {"name": "tool.png", "data": base64.b64encode(b"\x7fELF\x02\x01\x01" + b"\x00" * 40).decode()}
    rows = [
        {"room": "general", "seq": n, "author": "alice", "body": "x", "created_at": "2026-11-30T10:00:00+00:00",
         "edited_at": None, "deleted_at": None, "attachments": files_}
        for n, files_ in ((1, [good]), (2, [bad]))
    ]  # fmt: skip
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows))
    with pytest.raises(CommandError, match="tool.png"):
        call_command("importroom", "copy", str(path), stdout=io.StringIO(), stderr=io.StringIO())
    assert Message.objects.filter(room=copy).count() == 0
    assert Attachment.objects.count() == 0 and stored_files(media) == []
    path.write_text(json.dumps({**rows[0], "attachments": [{"name": "x", "data": "not base64!"}]}))
    with pytest.raises(CommandError, match="base64"):
        call_command("importroom", "copy", str(path), stdout=io.StringIO(), stderr=io.StringIO())


def test_the_room_page_shows_files_with_hostile_names_as_text(client, user, room):
    alice = client_for(user)
    image = upload(alice, png(), '"><b onmouseover=alert(1)>x.png').json()
    text = upload(alice, b"notes", "<img src=x onerror=alert(1)>.txt").json()
    post_json(alice, "/api/rooms/general/messages", {"body": "files", "attachments": [image["id"], text["id"]]})
    page = alice.get("/rooms/general/").content.decode()
    assert page.count('class="attachment-image"') == 1 and page.count('class="attachment-file"') == 1
    assert f'<img src="{image["thumbnail_url"]}" alt="&quot;&gt;&lt;b onmouseover=alert(1)&gt;x.png"' in page
    assert '<span class="attachment-name">&lt;img src=x onerror=alert(1)&gt;.txt</span>' in page
    assert "<b onmouseover" not in page and "<img src=x" not in page


def test_a_retried_send_with_files_answers_the_original(user, room):
    alice = client_for(user)
    uploaded = upload(alice, b"notes", "notes.txt").json()
    data = {"body": "", "nonce": "n-1", "attachments": [uploaded["id"]]}
    first = post_json(alice, "/api/rooms/general/messages", data)
    again = post_json(alice, "/api/rooms/general/messages", data)  # its answer was lost: the client sends again
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json() == first.json() and Message.objects.count() == 1


def test_a_message_of_files_alone_is_quoted_and_excerpted_by_their_names(user, other_user, room):
    alice = client_for(user)
    uploaded = upload(alice, b"notes", "notes.txt").json()
    original = post_json(alice, "/api/rooms/general/messages", {"body": "", "attachments": [uploaded["id"]]}).json()
    reply = post_json(alice, "/api/rooms/general/messages", {"body": "see above", "reply_to": original["id"]}).json()
    assert reply["reply_to"]["excerpt"] == "📎 notes.txt"
    assert '<span class="reply-excerpt">📎 notes.txt</span>' in alice.get("/rooms/general/").content.decode()


def test_names_as_browsers_encode_them_are_decoded(user, room):
    assert files._clean_name("say %22hi%22%0D%0A.txt") == 'say "hi".txt'


def test_uploads_left_unattached_for_a_day_go_at_the_next_upload_and_free_the_quota(user, room, settings, media):
    from django.utils import timezone

    settings.CHAT_UPLOAD_QUOTA_BYTES = 1500
    alice = client_for(user)
    left = upload(alice, b"a" * 900, "left.txt").json()
    kept = upload(alice, b"b" * 100, "kept.txt").json()
    post_json(alice, "/api/rooms/general/messages", {"body": "kept", "attachments": [kept["id"]]})
    Attachment.objects.update(created_at=timezone.now() - files.ABANDONED_AFTER - timezone.timedelta(minutes=1))
    assert upload(alice, b"c" * 900, "new.txt").status_code == 201  # the quota counts the abandoned one no more
    assert sorted(Attachment.objects.values_list("name", flat=True)) == ["kept.txt", "new.txt"]
    assert alice.get(left["url"]).status_code == 404 and len(stored_files(media)) == 2
