"""The format of a room's exported history (manage.py exportroom), read back by services.messages_import."""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from chat import validation
from chat.models import Attachment, Message, Room
from chat.validation import ChatError

FIELDS = ["room", "seq", "author", "body", "created_at", "edited_at", "deleted_at"]


def export_rows(*, room: Room, since: datetime | None = None, chunk_size: int = 2000) -> Iterator[dict[str, Any]]:
    """Yield the room's messages in seq order, a chunk at a time: memory stays flat however many there are."""
    messages = Message.objects.filter(room=room).order_by("seq")
    if since is not None:
        messages = messages.filter(created_at__gte=since)
    columns = ("pk", "seq", "author__username", "body", "created_at", "edited_at", "deleted_at", "attachments")
    last_seq = 0
    while chunk := list(messages.filter(seq__gt=last_seq).values_list(*columns)[:chunk_size]):
        with_files = {message_id for message_id, *_, attachments in chunk if attachments}
        stored = _attachments_of(with_files)
        for message_id, seq, author, body, created_at, edited_at, deleted_at, _ in chunk:
            row = {
                "room": room.slug,
                "seq": seq,
                "author": author,
                "body": body,
                "created_at": created_at.isoformat(),
                "edited_at": edited_at.isoformat() if edited_at else None,
                "deleted_at": deleted_at.isoformat() if deleted_at else None,
            }
            if message_id in stored:
                row["attachments"] = stored[message_id]
            yield row
        last_seq = chunk[-1][1]


def _attachments_of(message_ids: set[int]) -> dict[int, list[dict[str, str]]]:
    """Each message's files, with their content in base64: an export carries them whole."""
    found: dict[int, list[dict[str, str]]] = {}
    for attachment in Attachment.objects.filter(message__in=message_ids).order_by("pk"):
        with attachment.file.open("rb") as content:
            data = base64.b64encode(content.read()).decode()
        assert attachment.message_id is not None  # filtered on it
        found.setdefault(attachment.message_id, []).append({"name": attachment.name, "data": data})
    return found


@dataclass
class ImportResult:
    created: int = 0
    already_there: int = 0
    # Authors with no account here, whose messages now belong to PLACEHOLDER_USERNAME.
    missing_authors: set[str] = field(default_factory=set)


def checked_row(line_number: int, row: Any) -> dict[str, Any]:
    """Return an exported row ready to import, or raise ChatError naming its line and what is wrong."""

    def bad(why: str) -> ChatError:
        return ChatError("invalid_line", f"Line {line_number}: {why}")

    if not isinstance(row, dict) or not all(name in row for name in FIELDS):
        raise bad(f"expected an object with {', '.join(FIELDS)} (a line of manage.py exportroom).")
    if not isinstance(row["seq"], int) or not isinstance(row["author"], str) or not isinstance(row["room"], str):
        raise bad('"seq" must be a number, "author" and "room" strings.')
    try:
        times = {name: datetime.fromisoformat(row[name]) if row[name] else None for name in FIELDS[4:]}
    except (TypeError, ValueError):
        raise bad("created_at, edited_at and deleted_at must be ISO 8601 times or null.") from None
    if times["created_at"] is None:
        raise bad("created_at is missing.")
    attachments = row.get("attachments") or []
    if not isinstance(attachments, list) or not all(
        isinstance(item, dict) and isinstance(item.get("name"), str) and isinstance(item.get("data"), str)
        for item in attachments
    ):
        raise bad('"attachments" must be a list of objects with a "name" and their "data" in base64.')
    try:
        contents = [(item["name"], base64.b64decode(item["data"], validate=True)) for item in attachments]
    except (binascii.Error, ValueError):
        raise bad("an attachment's data is not base64.") from None
    body = row["body"] if times["deleted_at"] else validation.message_body(row["body"], allow_empty=bool(contents))
    return {**row, **times, "body": body, "attachments": contents}


def import_key(room: Room, row: dict[str, Any]) -> str:
    """The nonce an imported row gets: the same row imported into the same room again is recognised."""

    digest = hashlib.sha1(f"{room.pk}:{row['room']}:{row['seq']}".encode()).hexdigest()
    return f"import:{digest}"
