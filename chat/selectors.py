"""Read operations shared by the pages, the consumer and the API."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TypeVar

from django.contrib.auth.models import AnonymousUser, User
from django.contrib.sessions.models import Session
from django.db.models import Case, CharField, Count, Exists, F, OuterRef, Q, QuerySet, Subquery, Value, When
from django.db.models.functions import Coalesce, NullIf, TruncDate
from django.utils import timezone

from chat import search
from chat.models import Membership, Mention, Message, NotificationSettings, NotifyLevel, Room

_Row = TypeVar("_Row", Membership, Message, Room)


def room_list(*, user: User | AnonymousUser) -> QuerySet[Room]:
    """Return the open rooms `user` may see, most recently active first, in one query.

    For a signed-in user each room carries `unread`: messages by others after
    the user's last read seq, not deleted (0 in rooms they never opened).
    """
    rooms = Room.objects.filter(is_archived=False).order_by(F("last_message_at").desc(nulls_last=True), "slug")
    if not user.is_authenticated:
        return rooms.filter(is_private=False).annotate(
            unread=Value(0),
            unread_mentions=Value(0),
            direct_with=Value(None, output_field=CharField()),
            notify=Value(None, output_field=CharField()),
        )
    membership = Membership.objects.filter(room=OuterRef("pk"), user=user)
    unread = (
        Message.objects.filter(room=OuterRef("pk"), seq__gt=OuterRef("last_read_seq"), deleted_at__isnull=True)
        .exclude(author=user)
        .order_by()
        .values("room")
        .annotate(count=Count("pk"))
        .values("count")
    )
    # Mentions count in public rooms never read too (the mark is 0 there): someone asked for you.
    unread_mentions = (
        Mention.objects.filter(room=OuterRef("pk"), user=user, seq__gt=Coalesce(OuterRef("last_read_seq"), 0))
        .order_by()
        .values("room")
        .annotate(count=Count("pk"))
        .values("count")
    )
    # A direct room is named after the one the user talks to there.
    partner = Membership.objects.filter(room=OuterRef("pk"), room__is_direct=True).exclude(user=user)
    default_notify = Coalesce(
        Subquery(NotificationSettings.objects.filter(user=user).values("default_notify")[:1]),
        Value(NotifyLevel.MENTIONS),
    )
    return (
        rooms.filter(Q(is_private=False) | Exists(membership))
        .annotate(last_read_seq=Subquery(membership.values("last_read_seq")[:1]))
        .annotate(unread=Coalesce(Subquery(unread), 0))
        .annotate(unread_mentions=Coalesce(Subquery(unread_mentions), 0))
        .annotate(direct_with=Subquery(partner.values("user__username")[:1]))
        .annotate(
            notify=Coalesce(
                NullIf(Subquery(membership.values("notify")[:1]), Value("")),
                Case(When(is_direct=True, then=Value(NotifyLevel.ALL)), default=default_notify),
                output_field=CharField(),
            )
        )
    )


def _one(rows: QuerySet[_Row]) -> _Row | None:
    """The row of a lookup by a unique key, or None: first() without the ORDER BY that first() adds."""
    return next(iter(rows[:1]), None)


def room_visible(*, slug: str, user: User) -> tuple[Room, Membership | None] | None:
    """Return the room `user` may see, and their membership (None in a public room they never joined).

    A private room answers None to non-members exactly as a missing room does,
    so its existence is not given away. Archived rooms are returned too: they
    can be read, and every write refuses them.
    """
    room = _one(Room.objects.filter(slug=slug))
    if room is None:
        return None
    membership = membership_get(room=room, user=user)
    if membership is None and room.is_private:
        return None
    return room, membership


def room_readable(*, slug: str, user: User) -> Room | None:
    """Return the room `user` may see, as room_visible does, without the membership.

    The gate for the API and the handshake: one query for a public room,
    instead of two.
    """
    room = _one(Room.objects.filter(slug=slug))
    if room is None or (room.is_private and membership_get(room=room, user=user) is None):
        return None
    return room


def room_get_open(*, slug: str) -> Room | None:
    """Return the room a socket may join or a person may post in, or None."""
    return Room.objects.filter(slug=slug, is_archived=False).first()


def room_overview() -> list[dict]:
    """Every room, archived and private ones too, for operators: counts and activity, keyed by room pk in "id"."""
    rooms = Room.objects.annotate(members=Count("memberships")).order_by(
        F("last_message_at").desc(nulls_last=True), "slug"
    )
    return [
        {
            "id": room.pk,
            "slug": room.slug,
            "name": room.name,
            "private": room.is_private,
            "archived": room.is_archived,
            "messages": room.last_seq,
            "members": room.members,
            "last_activity": room.last_message_at.isoformat() if room.last_message_at else None,
        }
        for room in rooms
    ]


def chat_stats(*, days: int = 7, top: int = 5) -> dict:
    """Site-wide figures for operators: a handful of aggregate queries, whatever the table's size."""
    today = timezone.now().date()
    since = today - timedelta(days=days - 1)
    recent = Message.objects.filter(created_at__date__gte=since)
    per_day = dict(recent.annotate(day=TruncDate("created_at")).values_list("day").annotate(n=Count("pk")))
    busiest = (
        recent.values("room__slug").annotate(n=Count("pk")).order_by("-n", "room__slug").values_list("room__slug", "n")
    )
    return {
        "rooms": Room.objects.filter(is_archived=False).count(),
        "archived_rooms": Room.objects.filter(is_archived=True).count(),
        "messages": Message.objects.count(),
        "messages_per_day": {
            (since + timedelta(days=i)).isoformat(): per_day.get(since + timedelta(days=i), 0) for i in range(days)
        },
        "most_active_rooms": [{"room": slug, "messages": n} for slug, n in busiest[:top]],
    }


def open_room_ids() -> list[int]:
    return list(Room.objects.filter(is_archived=False).values_list("pk", flat=True))


def membership_get(*, room: Room, user: User) -> Membership | None:
    return _one(Membership.objects.filter(room=room, user=user))


def room_members(*, room: Room) -> list[Membership]:
    """Return the room's members, owner and moderators first, then by name."""
    rank: dict[str, int] = {Membership.Role.OWNER: 0, Membership.Role.MODERATOR: 1, Membership.Role.MEMBER: 2}
    members = Membership.objects.filter(room=room).select_related("user")
    return sorted(members, key=lambda membership: (rank[membership.role], membership.user.get_username().lower()))


def message_search(
    *,
    user: User,
    query: object,
    room: Room | None = None,
    author_name: str | None = None,
    after: datetime | None = None,
    before: datetime | None = None,
    limit: int = 20,
) -> list[search.Hit]:
    """Search what `user` may read (chat/search.py); an unknown author finds nothing, as one who never wrote."""
    author = None
    if author_name is not None:
        author = User.objects.filter(username=author_name).first()
        if author is None:
            search.parse(query)  # a bad query is still refused as such
            return []
    return search.search(user=user, query=query, room=room, author=author, after=after, before=before, limit=limit)


MEMBER_SEARCH_MAX = 20


def member_names(*, room: Room, prefix: str = "", limit: int = MEMBER_SEARCH_MAX) -> list[str]:
    """Usernames of the room's active members starting with `prefix` (any case), alphabetical: @-autocomplete."""
    members = Membership.objects.filter(room=room, user__is_active=True)
    if prefix:
        members = members.filter(user__username__istartswith=prefix)
    return list(members.order_by("user__username").values_list("user__username", flat=True)[:limit])


def messages_served() -> QuerySet[Message]:
    """Messages with what their payload names joined in (protocol.message_payload): no query per message."""
    return Message.objects.select_related("room", "author", "reply_to__author")


READ_MARKS_MAX = 200


def read_marks(*, room: Room) -> dict[str, int]:
    """Return how far the room's readers have read (username: last_read_seq), the furthest first.

    "Seen by N" under a message counts the readers at or past it; the furthest
    READ_MARKS_MAX are all a page needs to count them (past that it says "200+").
    """
    marks = (
        Membership.objects.filter(room=room, last_read_seq__gt=0)
        .order_by("-last_read_seq")
        .values_list("user__username", "last_read_seq")[:READ_MARKS_MAX]
    )
    return dict(marks)


def _messages(room: Room) -> QuerySet[Message]:
    return messages_served().filter(room=room)


def message_get(*, room: Room, message_id: int) -> Message | None:
    """Return one message of the room as it is now (deleted ones too), or None."""
    return _one(_messages(room).filter(pk=message_id))


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


def message_around(*, room: Room, seq: int, limit: int) -> tuple[list[Message], bool]:
    """Return up to `limit` messages in seq order around `seq`: half before it, the rest from it on.

    The second value says whether older messages lie before the first one.
    """
    before = list(_messages(room).filter(seq__lt=seq).order_by("-seq")[: limit // 2 + 1])
    older_exist = len(before) > limit // 2
    before = before[: limit // 2][::-1]
    after = list(_messages(room).filter(seq__gte=seq).order_by("seq")[: limit - len(before)])
    return before + after, older_exist


PINNED_MAX = 50


MENTIONS_PAGE_SIZE = 50


def mentions_of(*, user: User, before_id: int | None = None, limit: int = MENTIONS_PAGE_SIZE) -> list[Message]:
    """The messages that mention `user`, newest first, in rooms they may read now (the Mentions page)."""
    readable = Q(room__is_private=False) | Q(Exists(Membership.objects.filter(room=OuterRef("room_id"), user=user)))
    messages = messages_served().filter(readable, mention_rows__user=user, deleted_at__isnull=True)
    if before_id is not None:
        messages = messages.filter(pk__lt=before_id)
    return list(messages.order_by("-pk")[:limit])


def read_positions(*, user: User, room_ids: Collection[int]) -> dict[int, int]:
    """How far `user` has read in each of these rooms (room pk: seq; absent where they never read)."""
    return dict(Membership.objects.filter(user=user, room__in=room_ids).values_list("room_id", "last_read_seq"))


def pinned_messages(*, room: Room) -> list[Message]:
    """Return the room's pinned messages, the newest pin first (the room header's list)."""
    return list(_messages(room).filter(pinned_at__isnull=False).order_by("-pinned_at", "-seq")[:PINNED_MAX])


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
    # (through_seq, change) of a "clear history" the client missed, else None.
    cleared: tuple[int, int] | None = None


def message_resume(*, room: Room, after_seq: int, limit: int, changes_after: int | None = None) -> Resume:
    """Return what a client holding everything up to `after_seq` missed, newest `limit` at most.

    With `changes_after`, also the messages up to `after_seq` edited or deleted
    since that change, in change order: `limit` at most too. Past that the
    client starts afresh, as after a gap: the newest `limit` messages as they
    are now, and none of the changes. However long the client was away, a
    resume is at most four queries of at most `limit` + 1 rows each.
    """
    # Read the room first: everything committed before this read is in the
    # queries below, and anything later reaches the socket live. A client ahead
    # of the room (it was recreated, say) is clamped to the room's last seq.
    room_last_seq_now, last_change, cleared_through_seq, cleared_change = Room.objects.values_list(
        "last_seq", "last_change", "cleared_through_seq", "cleared_change"
    ).get(pk=room.pk)
    after_seq = min(after_seq, room_last_seq_now)
    page = list(_messages(room).filter(seq__gt=after_seq).order_by("-seq")[: limit + 1])
    truncated = len(page) > limit
    messages = page[:limit][::-1]
    changed: list[Message] = []
    cleared = None
    if changes_after is not None and changes_after < last_change:
        changes = _messages(room).filter(seq__lte=after_seq, change__gt=changes_after)
        if changes_after < cleared_change:
            # One frame for the whole clear, however many messages it deleted.
            cleared = (min(cleared_through_seq, after_seq), cleared_change)
            changes = changes.filter(seq__gt=cleared_through_seq)
        changed = list(changes.order_by("change")[: limit + 1])
        if len(changed) > limit:
            # Too many to replay one by one (a moderator deleted a flood, say).
            newest = list(_messages(room).order_by("-seq")[:limit])[::-1]
            return Resume(
                messages=newest,
                changed=[],
                last_change=last_change,
                next_seq=newest[0].seq,  # changes exist, so messages do
                last_seq=newest[-1].seq,
            )
    return Resume(
        messages=messages,
        changed=changed,
        last_change=last_change,
        next_seq=messages[0].seq if truncated else None,
        last_seq=messages[-1].seq if messages else after_seq,
        cleared=cleared,
    )


@dataclass(frozen=True)
class RoomPosition:
    """Where a room stands in the database: what a process following it compares with what it delivered."""

    last_seq: int
    last_change: int
    cleared_through_seq: int
    cleared_change: int
    is_archived: bool
    is_private: bool


def room_positions(room_ids: Collection[int]) -> dict[int, RoomPosition]:
    """Return the positions of several rooms in one query (rooms that no longer exist are left out)."""
    rows = Room.objects.filter(pk__in=room_ids).values_list(
        "pk", "last_seq", "last_change", "cleared_through_seq", "cleared_change", "is_archived", "is_private"
    )
    return {
        pk: RoomPosition(last_seq, last_change, cleared_through, cleared_change, archived, private)
        for pk, last_seq, last_change, cleared_through, cleared_change, archived, private in rows
    }


def rooms_news(since: dict[int, tuple[RoomPosition, int, int]], *, limit: int) -> dict[int, Resume]:
    """Return what several rooms' sockets missed, in one query, as message_resume() would for each.

    `since` maps a room to its position (read first, by room_positions) and the
    seq and change its sockets hold. A room that missed more than `limit`
    messages gets no messages, only `next_seq`: its sockets resume on their own.
    """
    wanted = Q(pk__in=[])
    for room_id, (position, after_seq, changes_after) in since.items():
        if position.last_seq - after_seq <= limit:
            wanted |= Q(room_id=room_id, seq__gt=after_seq)
        if changes_after < position.last_change:
            changes = Q(room_id=room_id, seq__lte=after_seq, change__gt=changes_after)
            if changes_after < position.cleared_change:
                changes &= Q(seq__gt=position.cleared_through_seq)
            wanted |= changes
    rows = list(messages_served().filter(wanted).order_by("room_id", "seq"))
    news = {}
    for room_id, (position, after_seq, changes_after) in since.items():
        in_room = [m for m in rows if m.room_id == room_id]
        messages = [m for m in in_room if m.seq > after_seq]
        cleared = None
        if changes_after < position.cleared_change:
            cleared = (min(position.cleared_through_seq, after_seq), position.cleared_change)
        news[room_id] = Resume(
            messages=messages,
            changed=sorted((m for m in in_room if m.seq <= after_seq), key=lambda m: m.change),
            last_change=position.last_change,
            next_seq=position.last_seq - limit + 1 if position.last_seq - after_seq > limit else None,
            last_seq=messages[-1].seq if messages else after_seq,
            cleared=cleared,
        )
    return news


def private_room_member_names(room_ids: Collection[int]) -> dict[int, set[str]]:
    """Return the usernames of each private room's members, for rooms among `room_ids`."""
    names: dict[int, set[str]] = {}
    memberships = Membership.objects.filter(room_id__in=room_ids, room__is_private=True)
    for room_id, username in memberships.values_list("room_id", "user__username"):
        names.setdefault(room_id, set()).add(username)
    return names


def live_session_keys(session_keys: Collection[str]) -> set[str]:
    """Return which of these browser sessions still exist and have not expired (the others signed out)."""
    return set(
        Session.objects.filter(session_key__in=session_keys, expire_date__gt=timezone.now()).values_list(
            "session_key", flat=True
        )
    )


def room_cursors(*, room: Room) -> tuple[int, int]:
    """Return the room's (last_seq, last_change)."""
    return Room.objects.values_list("last_seq", "last_change").get(pk=room.pk)
