"""Read operations shared by the pages, the consumer and the API."""

from __future__ import annotations

from dataclasses import dataclass

from django.db.models import F, QuerySet

from chat.models import Message, Room


def room_list() -> QuerySet[Room]:
    """Return the open rooms, most recently active first."""
    return Room.objects.filter(is_archived=False).order_by(F("last_message_at").desc(nulls_last=True), "slug")


def room_get_open(*, slug: str) -> Room | None:
    """Return the room a socket may join or a person may post in, or None."""
    return Room.objects.filter(slug=slug, is_archived=False).first()


def _messages(room: Room) -> QuerySet[Message]:
    return Message.objects.filter(room=room).select_related("room", "author")


def message_list(
    *, room: Room, after_seq: int | None = None, before_seq: int | None = None, limit: int = 50
) -> tuple[list[Message], bool]:
    """Return up to `limit` messages in seq order, and whether more lie beyond them.

    With `after_seq` the page starts just after it; otherwise it is the newest
    page (before `before_seq` when given), and "more" means older messages.
    """
    messages = _messages(room)
    if before_seq is not None:
        messages = messages.filter(seq__lt=before_seq)
    if after_seq is not None:
        page = list(messages.filter(seq__gt=after_seq).order_by("seq")[: limit + 1])
        return page[:limit], len(page) > limit
    page = list(messages.order_by("-seq")[: limit + 1])
    return page[:limit][::-1], len(page) > limit


@dataclass(frozen=True)
class Resume:
    messages: list[Message]
    # Messages the client already holds that were edited or deleted since.
    changed: list[Message]
    # The room's change counter when the resume was read.
    last_change: int
    # Set when more than the limit were missed: only seqs from here on are replayed.
    next_seq: int | None
    # The newest seq the client holds once it has the replayed messages.
    last_seq: int


def message_resume(*, room: Room, after_seq: int, limit: int, changes_after: int | None = None) -> Resume:
    """Return what a client holding everything up to `after_seq` missed, newest `limit` at most.

    With `changes_after`, also the messages up to `after_seq` edited or deleted
    since that change, in change order.
    """
    # Read the room first: everything committed before this read is in the
    # queries below, and anything later reaches the socket live. A client ahead
    # of the room (it was recreated, say) is clamped to the room's last seq.
    room_last_seq_now, last_change = Room.objects.values_list("last_seq", "last_change").get(pk=room.pk)
    after_seq = min(after_seq, room_last_seq_now)
    page = list(_messages(room).filter(seq__gt=after_seq).order_by("-seq")[: limit + 1])
    truncated = len(page) > limit
    messages = page[:limit][::-1]
    changed = []
    if changes_after is not None and changes_after < last_change:
        changed = list(_messages(room).filter(seq__lte=after_seq, change__gt=changes_after).order_by("change"))
    return Resume(
        messages=messages,
        changed=changed,
        last_change=last_change,
        next_seq=messages[0].seq if truncated else None,
        last_seq=messages[-1].seq if messages else after_seq,
    )


def room_cursors(*, room: Room) -> tuple[int, int]:
    """Return the room's (last_seq, last_change)."""
    return Room.objects.values_list("last_seq", "last_change").get(pk=room.pk)
