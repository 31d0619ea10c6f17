"""Exporting a room's history and importing it again (manage.py exportroom / importroom)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.models import User
from django.db import transaction
from django.db.models import F

from chat.models import PLACEHOLDER_USERNAME, Message, Room
from chat.services import ChatError, clean_body, reserved_user

FIELDS = ["room", "seq", "author", "body", "created_at", "edited_at", "deleted_at"]


def export_rows(*, room: Room, since: datetime | None = None, chunk_size: int = 2000) -> Iterator[dict[str, Any]]:
    """Yield the room's messages in seq order, a chunk at a time: memory stays flat however many there are."""
    messages = Message.objects.filter(room=room).order_by("seq")
    if since is not None:
        messages = messages.filter(created_at__gte=since)
    columns = ("seq", "author__username", "body", "created_at", "edited_at", "deleted_at")
    last_seq = 0
    while chunk := list(messages.filter(seq__gt=last_seq).values_list(*columns)[:chunk_size]):
        for seq, author, body, created_at, edited_at, deleted_at in chunk:
            yield {
                "room": room.slug,
                "seq": seq,
                "author": author,
                "body": body,
                "created_at": created_at.isoformat(),
                "edited_at": edited_at.isoformat() if edited_at else None,
                "deleted_at": deleted_at.isoformat() if deleted_at else None,
            }
        last_seq = chunk[-1][0]


@dataclass
class ImportResult:
    created: int = 0
    already_there: int = 0
    # Authors with no account here, whose messages now belong to PLACEHOLDER_USERNAME.
    missing_authors: set[str] = field(default_factory=set)


def import_rows(
    *,
    room: Room,
    rows: Iterable[tuple[int, dict[str, Any]]],
    batch_size: int = 2000,
    progress: Callable[[ImportResult], None] | None = None,
) -> ImportResult:
    """Append exported messages (line number, row) to the room, in order, with new seqs.

    Idempotent: each row's nonce is derived from this room and the row's
    origin (room and seq), so a row imported before is recognised and skipped.
    Raises ChatError naming the line of the first malformed row; the batches
    before it stay imported.
    """
    result = ImportResult()
    batch: list[tuple[int, dict[str, Any]]] = []
    for line_number, row in rows:
        batch.append((line_number, _checked(line_number, row)))
        if len(batch) >= batch_size:
            _import_batch(room, batch, result)
            batch = []
            if progress is not None:
                progress(result)
    if batch:
        _import_batch(room, batch, result)
    return result


def _checked(line_number: int, row: Any) -> dict[str, Any]:
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
    body = row["body"] if times["deleted_at"] else clean_body(row["body"])
    return {**row, **times, "body": body}


def _import_key(room: Room, row: dict[str, Any]) -> str:
    digest = hashlib.sha1(f"{room.pk}:{row['room']}:{row['seq']}".encode()).hexdigest()
    return f"import:{digest}"


def _import_batch(room: Room, batch: list[tuple[int, dict[str, Any]]], result: ImportResult) -> None:
    keys = [_import_key(room, row) for _, row in batch]
    with transaction.atomic():
        # The room's row lock first, as message_create takes it: seqs stay gapless under concurrent posts.
        Room.objects.filter(pk=room.pk).update(last_seq=F("last_seq"))
        done = set(Message.objects.filter(room=room, nonce__in=keys).values_list("nonce", flat=True))
        new = [(key, row) for key, (_, row) in zip(keys, batch, strict=True) if key not in done]
        result.already_there += len(batch) - len(new)
        if not new:
            return
        authors = _authors({row["author"] for _, row in new}, result)
        first_seq = Room.objects.values_list("last_seq", flat=True).get(pk=room.pk) + 1
        Message.objects.bulk_create(
            Message(
                room=room,
                author=authors[row["author"]],
                body=row["body"],
                created_at=row["created_at"],
                edited_at=row["edited_at"],
                deleted_at=row["deleted_at"],
                seq=first_seq + offset,
                nonce=key,
            )
            for offset, (key, row) in enumerate(new)
        )
        newest = max(row["created_at"] for _, row in new)
        Room.objects.filter(pk=room.pk).update(last_seq=first_seq + len(new) - 1, last_message_at=newest)
        result.created += len(new)


def _authors(usernames: set[str], result: ImportResult) -> dict[str, User]:
    users = {user.get_username(): user for user in get_user_model().objects.filter(username__in=usernames)}
    missing = usernames - users.keys()
    if missing:
        result.missing_authors |= missing
        placeholder = reserved_user(PLACEHOLDER_USERNAME)
        assert isinstance(placeholder, User)  # for mypy: reserved_user is typed as returning AbstractBaseUser
        users.update(dict.fromkeys(missing, placeholder))
    return users
