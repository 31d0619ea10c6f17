"""WebSocket protocol v1: the frames both sides exchange (see docs/protocol.md).

Frame building lives here so the consumer, the pages and the API encode
messages one way only.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.urls import reverse

from chat import search, validation
from chat.files import ATTACHMENTS_MAX, attachment_ids
from chat.models import Message, Room
from chat.validation import ChatError

if TYPE_CHECKING:
    from chat.selectors import Resume

HISTORY_MAX_LIMIT = 100


def message_payload(message: Message) -> dict[str, Any]:
    """Return the message object every path serves."""
    return {
        "id": message.pk,
        "seq": message.seq,
        "room": message.room.slug,
        "author": message.author.get_username(),
        "body": message.body,
        "created_at": _iso(message.created_at),
        "edited_at": _iso(message.edited_at),
        "deleted_at": _iso(message.deleted_at),
        "nonce": message.nonce,
        "system": message.is_system,
        "html": message.html,
        "reply_to": _quote(message),
        "reactions": message.reactions,
        "pinned_at": _iso(message.pinned_at),
        "mentions": message.mentions,
        "mentions_room": message.mentions_room,
        "attachments": message.attachments,
    }


REPLY_EXCERPT_LENGTH = 140


def _quote(message: Message) -> dict[str, Any] | None:
    """The message this one answers, as it is now ("" once it is deleted); None if it answers none."""
    if message.reply_to_id is None:
        return None
    original = message.reply_to
    assert original is not None
    return {
        "id": original.pk,
        "seq": original.seq,
        "author": original.author.get_username(),
        "excerpt": original.text[:REPLY_EXCERPT_LENGTH],
    }


def _iso(moment) -> str | None:
    # ISO 8601 in UTC with a Z, which every browser's Date() parses.
    return None if moment is None else moment.isoformat().replace("+00:00", "Z")


def encode(frame: dict[str, Any]) -> str:
    return json.dumps(frame, ensure_ascii=False, separators=(",", ":"))


def message_frame(message: Message) -> str:
    return message_frame_from_payload(message_payload(message))


def message_frame_from_payload(payload: dict[str, Any]) -> str:
    """Encode a message frame from the payload a published event carries."""
    return encode({"type": "message", "message": payload})


# Close codes (RFC 6455, and 4000-4999 for this application).
CLOSE_SERVICE_RESTART = 1012
CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_REMOVED = 4403
CLOSE_BAD_REQUEST = 4400


CLOSE_ROOM_ARCHIVED = 4410
CLOSE_TOO_MANY_SOCKETS = 4429
CLOSE_SIGNED_OUT = 4401


def removed_frame() -> str:
    return error_frame("removed", "You were removed from this room.")


def unavailable_frame() -> str:
    return error_frame("unavailable", "The chat is briefly unavailable; reconnecting.")


def not_saved_frame(nonce: Any) -> str:
    return error_frame("not_saved", "The message was not saved; send it again with the same nonce.", nonce)


def database_unavailable_frame(command: ClientCommand) -> str:
    """Answer a frame the database could not serve: a send gets `not_saved` with its nonce."""
    if isinstance(command, SendCommand):
        return not_saved_frame(command.nonce)
    return error_frame("database_unavailable", "The database is briefly unavailable; try again in a moment.")


def resync_frame() -> str:
    return error_frame("resync", "This room's history changed; loading it again.")


def signed_out_frame() -> str:
    return error_frame("signed_out", "You signed out. Log in again to keep chatting.")


def archived_frame() -> str:
    return error_frame("room_archived", "This room was archived; it is read-only now.")


def error_frame(code: str, detail: str, nonce: Any = None, *, retry_after: int | None = None) -> str:
    frame = {"type": "error", "code": code, "detail": detail, "nonce": nonce}
    if retry_after is not None:
        frame["retry_after"] = retry_after
    return encode(frame)


def history_frame(messages: list[Message], has_more: bool, *, around: int | None = None) -> str:
    frame: dict[str, Any] = {"type": "history"}
    if around is not None:
        frame["around"] = around
    frame.update({"messages": [message_payload(m) for m in messages], "has_more": has_more})
    return encode(frame)


def change_payload(message: Message) -> dict[str, Any]:
    """Return the frame that tells clients a message they may hold was edited or deleted."""
    if message.deleted_at is not None:
        return {"type": "message_deleted", "id": message.pk, "seq": message.seq, "change": message.change}
    return {"type": "message_updated", "message": message_payload(message), "change": message.change}


def reactions_payload(message: Message) -> dict[str, Any]:
    """Tell clients the reactions to a message changed: its whole list as it now is."""
    return {
        "type": "reactions",
        "id": message.pk,
        "seq": message.seq,
        "change": message.change,
        "reactions": message.reactions,
    }


def history_cleared_payload(through_seq: int, change: int) -> dict[str, Any]:
    """Every message up to `through_seq` was deleted at once (the admin's "clear history")."""
    return {"type": "history_cleared", "seq": through_seq, "change": change}


def presence_frame(users: list[str]) -> str:
    return encode({"type": "presence", "users": users})


def delivery_frame(*, live: bool) -> str:
    """Say whether messages arrive live or, while Redis is away, from the database about a second late.

    While delayed, who is online is unknown and typing is not relayed.
    """
    return encode({"type": "delivery", "mode": "live" if live else "delayed"})


def change_frame(message: Message) -> str:
    return encode(change_payload(message))


def typing_frame(username: str) -> str:
    return encode({"type": "typing", "user": username})


def search_result(hit: search.Hit, reader: str) -> dict[str, Any]:
    """One search result: where the message is, who wrote it, and the snippet around what was found."""
    message = hit.message
    return {
        "id": message.pk,
        "seq": message.seq,
        "room": message.room.slug,
        "room_name": room_name_for(message.room, reader),
        "author": message.author.get_username(),
        "created_at": _iso(message.created_at),
        "snippet": hit.snippet,
        "url": f"{reverse('room-detail', args=[message.room.slug])}?at={message.seq}",
    }


def room_name_for(room: Room, reader: str) -> str:
    """A room's name as `reader` sees it: a direct conversation is named after the other person.

    Its stored name is both usernames, "alice, bob" (usernames hold no comma or space).
    """
    if not room.is_direct:
        return room.name
    others = [name for name in room.name.split(", ") if name != reader]
    return others[0] if others else room.name


NOTIFY_EXCERPT_LENGTH = 140


def notify_payload(message: Message, reason: str) -> dict[str, Any]:
    """Tell a user, in whichever room their socket is, that a message asks for them: "mention" or "direct"."""
    return {
        "type": "notify",
        "reason": reason,
        "room": message.room.slug,
        "room_name": message.room.name,
        "id": message.pk,
        "seq": message.seq,
        "author": message.author.get_username(),
        "excerpt": message.text[:NOTIFY_EXCERPT_LENGTH],
    }


def read_by_frame(username: str, seq: int) -> str:
    return encode({"type": "read_by", "user": username, "seq": seq})


def ready_frame(last_seq: int, last_change: int) -> str:
    return encode({"type": "ready", "last_seq": last_seq, "last_change": last_change})


def gap_frame(after: int, next_seq: int) -> str:
    return encode({"type": "gap", "after": after, "next_seq": next_seq})


def resume_frames(resume: Resume, after: int) -> Iterator[str]:
    """Yield what a client resuming after seq `after` missed, in the order it must apply them."""
    if resume.next_seq is not None:
        yield gap_frame(after, resume.next_seq)
    if resume.cleared is not None:
        yield encode(history_cleared_payload(*resume.cleared))
    for message in resume.messages:
        yield message_frame(message)
    for message in resume.changed:
        yield change_frame(message)


class FrameError(ChatError):
    """A client frame the server cannot act on; `nonce` is echoed so the client knows which send failed."""

    def __init__(self, code: str, detail: str, nonce: Any = None) -> None:
        super().__init__(code, detail)
        self.nonce = nonce


@dataclass(frozen=True)
class SendCommand:
    body: Any
    nonce: Any
    reply_to: int | None = None
    attachments: tuple[int, ...] = ()


@dataclass(frozen=True)
class TypingCommand:
    pass


@dataclass(frozen=True)
class EditCommand:
    id: Any
    body: Any


@dataclass(frozen=True)
class DeleteCommand:
    id: Any


@dataclass(frozen=True)
class ReadCommand:
    seq: int


@dataclass(frozen=True)
class HistoryCommand:
    limit: int
    before: int | None = None
    # Instead of `before`: the messages on both sides of this seq.
    around: int | None = None


@dataclass(frozen=True)
class ReactCommand:
    id: Any
    emoji: Any


@dataclass(frozen=True)
class PinCommand:
    id: Any
    pinned: bool


ClientCommand = (
    SendCommand | HistoryCommand | TypingCommand | EditCommand | DeleteCommand | ReadCommand | ReactCommand | PinCommand
)


def parse_client_frame(text_data: str | None, bytes_data: bytes | None) -> ClientCommand:
    """Decode and check one client frame, raising FrameError with what to fix."""
    if text_data is None:
        raise FrameError("binary_frame", "Send JSON in text frames; binary frames are not supported.")
    if len(text_data.encode("utf-8")) > settings.CHAT_FRAME_MAX_BYTES:
        raise FrameError("frame_too_large", f"Frames can be at most {settings.CHAT_FRAME_MAX_BYTES} bytes.")
    try:
        frame = json.loads(text_data)
    except ValueError:
        raise FrameError("invalid_json", "The frame is not valid JSON.") from None
    if not isinstance(frame, dict):
        raise FrameError("invalid_frame", 'A frame must be a JSON object with a "type".')
    nonce = frame.get("nonce")
    try:
        return _command(frame)
    except ChatError as error:
        raise FrameError(error.code, error.detail, nonce) from None


def _command(frame: dict[str, Any]) -> ClientCommand:
    kind = frame.get("type")
    if kind == "send":
        return SendCommand(
            body=validation.required(frame, "body", '{"type": "send", "body": "..."}'),
            nonce=frame.get("nonce"),
            reply_to=validation.reply_id(frame.get("reply_to")),
            attachments=tuple(attachment_ids(frame.get("attachments"))),
        )
    if kind == "history":
        limit = validation.json_int(frame.get("limit"), "limit", low=1, high=HISTORY_MAX_LIMIT)
        if "around" in frame:
            if "before" in frame:
                raise ChatError("invalid_frame", 'Send "before" or "around", not both.')
            return HistoryCommand(limit=limit, around=validation.json_int(frame.get("around"), "around", low=1))
        return HistoryCommand(limit=limit, before=validation.json_int(frame.get("before"), "before", low=1))
    if kind == "typing":
        return TypingCommand()
    if kind == "edit":
        return EditCommand(
            id=frame.get("id"), body=validation.required(frame, "body", '{"type": "edit", "id": 1, "body": "..."}')
        )
    if kind == "delete":
        return DeleteCommand(id=frame.get("id"))
    if kind == "read":
        return ReadCommand(seq=validation.json_int(frame.get("seq"), "seq"))
    if kind == "react":
        return ReactCommand(id=frame.get("id"), emoji=frame.get("emoji"))
    if kind == "pin":
        pinned = frame.get("pinned")
        if not isinstance(pinned, bool):
            raise ChatError("invalid_frame", '"pinned" must be true or false.')
        return PinCommand(id=frame.get("id"), pinned=pinned)
    raise ChatError(
        "unknown_type",
        f'Unknown frame type {kind!r}; use "send", "history", "typing", "edit", "delete", "read", "react" or "pin".',
    )


def client_constants() -> dict[str, Any]:
    """Return the close codes and limits the pages act on, for json_script (chat/static/chat/protocol.js)."""
    return {
        "close": {
            "tryAgainLater": CLOSE_TRY_AGAIN_LATER,
            "signedOut": CLOSE_SIGNED_OUT,
            "removed": CLOSE_REMOVED,
            "roomArchived": CLOSE_ROOM_ARCHIVED,
            "tooManySockets": CLOSE_TOO_MANY_SOCKETS,
        },
        "limits": {
            "messageMaxLength": settings.CHAT_MESSAGE_MAX_LENGTH,
            "historyMaxLimit": HISTORY_MAX_LIMIT,
            "uploadMaxBytes": settings.CHAT_UPLOAD_MAX_BYTES,
            "attachmentsMax": ATTACHMENTS_MAX,
        },
    }
