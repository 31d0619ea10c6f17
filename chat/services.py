"""Write operations: every path (WebSocket, pages, API, commands) calls these."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import User
from django.core.files.base import ContentFile
from django.db import IntegrityError, connection, transaction
from django.db.models import F, OuterRef, Subquery, Value
from django.db.models.functions import Least
from django.utils import timezone
from django.utils.text import slugify

from chat import ephemeral, files, markdown, notifications, protocol, realtime, selectors, tokens, transfer, validation
from chat.models import (
    DIRECT_SLUG_PREFIX,
    PLACEHOLDER_USERNAME,
    RESERVED_USERNAMES,
    SYSTEM_USERNAME,
    ApiToken,
    Attachment,
    Membership,
    Message,
    Reaction,
    Room,
)
from chat.validation import ChatError

__all__ = ["ChatError"]  # what every service raises, defined with the rules in chat/validation.py


def room_create(
    *, slug: str = "", name: str, topic: str = "", is_private: bool = False, created_by: User | None
) -> Room:
    """Create a room owned by its creator; the slug defaults to the name, slugified."""
    room = Room(slug=slug or slugify(name)[:64], name=name, topic=topic, is_private=is_private, created_by=created_by)
    room.full_clean()
    with transaction.atomic():
        room.save()
        if created_by is not None:
            Membership.objects.create(room=room, user=created_by, role=Membership.Role.OWNER)
    return room


def direct_room_open(*, user: User, username: str) -> tuple[Room, bool]:
    """Return the direct room of `user` and `username`, creating it the first time; and whether it was created.

    One per pair, whoever opens it first: the unique `direct_pair` settles a race.
    """
    other = get_user_model().objects.filter(username=username, is_active=True).first()
    if other is None or username in RESERVED_USERNAMES:
        raise ChatError("unknown_user", f'There is no user called "{username}".')
    if other.pk == user.pk:
        raise ChatError("direct_self", "A direct conversation is with someone else.")
    low, high = sorted((user, other), key=lambda someone: someone.pk)
    pair = f"{low.pk}-{high.pk}"
    if (room := Room.objects.filter(direct_pair=pair).first()) is not None:
        return room, False
    try:
        with transaction.atomic():
            room = Room.objects.create(
                slug=f"{DIRECT_SLUG_PREFIX}{pair}",
                name=f"{low.get_username()}, {high.get_username()}",
                is_private=True,
                is_direct=True,
                direct_pair=pair,
            )
            Membership.objects.bulk_create([Membership(room=room, user=low), Membership(room=room, user=high)])
    except IntegrityError:
        return Room.objects.get(direct_pair=pair), False  # the other one opened it at the same moment
    return room, True


def room_update(*, room: Room, fields: list[str]) -> None:
    """Save changed room fields (the admin's form), with what each change means for open sockets.

    Archiving and unarchiving go through room_archive and room_unarchive. A
    room made private makes its sockets resume: the handshake then refuses
    everyone who is not a member.
    """
    room.full_clean()
    archive = room.is_archived if "is_archived" in fields else None
    fields = [field for field in fields if field != "is_archived"]
    with transaction.atomic():
        if fields:
            room.save(update_fields=fields)
        if "is_private" in fields and room.is_private:
            realtime.publish_after_commit(lambda: realtime.publish_resync(room_id=room.pk))
    if archive is not None:
        (room_archive if archive else room_unarchive)(room=room)


def room_archive(*, room: Room) -> bool:
    """Make the room read-only and close its open sockets (after the commit). False if it already was."""
    with transaction.atomic():
        archived = Room.objects.filter(pk=room.pk, is_archived=False).update(is_archived=True)
        if archived:
            realtime.publish_after_commit(lambda: realtime.publish_room_closed(room_id=room.pk))
    room.is_archived = True
    return bool(archived)


def room_unarchive(*, room: Room) -> bool:
    """Open an archived room again. False if it was not archived."""
    room.is_archived = False
    return bool(Room.objects.filter(pk=room.pk, is_archived=True).update(is_archived=False))


def room_clear_history(*, room: Room, batch_size: int = 10_000, progress: Callable[[int], None] | None = None) -> int:
    """Delete every message of the room as one change, in batches; return how many were deleted.

    The room records the clear first, so a client resuming meanwhile is told
    with one `history_cleared` frame; the live frame follows the last batch.
    """
    with transaction.atomic():
        Room.objects.filter(pk=room.pk).update(last_change=F("last_change") + 1)
        through_seq, change = Room.objects.values_list("last_seq", "last_change").get(pk=room.pk)
        Room.objects.filter(pk=room.pk).update(cleared_through_seq=through_seq, cleared_change=change)
    now = timezone.now()
    deleted = 0
    for low in range(0, through_seq, batch_size):
        deleted += Message.objects.filter(
            room=room, seq__gt=low, seq__lte=min(low + batch_size, through_seq), deleted_at__isnull=True
        ).update(
            body="", html="", deleted_at=now, pinned_at=None, mentions=[], mentions_room=False, attachments=[],
            change=change,
        )  # fmt: skip
        if progress is not None:
            progress(deleted)
    notifications.forget_room_history(room=room, through_seq=through_seq)
    files.forget(room=room, through_seq=through_seq)
    realtime.publish_after_commit(
        lambda: realtime.publish_history_cleared(room_id=room.pk, through_seq=through_seq, change=change)
    )
    room.cleared_through_seq, room.cleared_change, room.last_change = through_seq, change, change
    return deleted


def system_user() -> User:
    return reserved_user(SYSTEM_USERNAME)


def reserved_user(username: str, *, active: bool = False) -> User:
    """Return a user the site itself stands for (see RESERVED_USERNAMES, and seeddemo's authors), without a password.

    Inactive unless `active`: nobody can sign in as it either way.
    """
    user, created = get_user_model().objects.get_or_create(username=username, defaults={"is_active": active})
    if created:
        user.set_unusable_password()
        user.save(update_fields=["password"])
    return user


def room_join(*, room: Room, user: User) -> Membership:
    """Make the user a member of a public room (what their unread count is kept on); return the membership.

    Called where a user acts in a room (marking it read), never by reading a
    page: a GET never writes. Private rooms are joined only by being added.
    """
    membership = selectors.membership_get(room=room, user=user)
    if membership is not None:
        return membership
    if room.is_private:
        raise ChatError("forbidden", "You are not a member of this room.")
    membership, _ = Membership.objects.get_or_create(room=room, user=user)
    return membership


def session_signed_out(*, session_key: str) -> None:
    """Close the sockets a browser session has open, in every room, on every process (after the commit)."""
    realtime.publish_after_commit(lambda: realtime.publish_signed_out(session_key=session_key))


def member_add(*, room: Room, actor: User, username: str, role: str = Membership.Role.MEMBER) -> Membership:
    """Add a user to the room, or change their role; moderators add members, owners also appoint moderators."""
    _refuse_if_direct(room)
    actor_membership = _membership_moderating(room=room, actor=actor)
    if role not in (Membership.Role.MEMBER, Membership.Role.MODERATOR):
        raise ChatError("invalid_role", 'The role must be "member" or "moderator".')
    if role == Membership.Role.MODERATOR and actor_membership.role != Membership.Role.OWNER:
        raise ChatError("forbidden", "Only the room's owner can appoint moderators.")
    user = _user_named(username)
    membership, created = Membership.objects.get_or_create(room=room, user=user, defaults={"role": role})
    if not created and membership.role != role:
        if actor_membership.role != Membership.Role.OWNER or membership.role == Membership.Role.OWNER:
            raise ChatError("forbidden", "Only the room's owner can change roles, and the owner's role stays.")
        membership.role = role
        membership.save(update_fields=["role"])
    return membership


def member_remove(*, room: Room, actor: User, username: str) -> None:
    """Take a user out of a private room and close their open sockets there (after the commit)."""
    if not room.is_private:
        raise ChatError("public_room", "Anyone signed in can open a public room, so nobody can be removed from it.")
    _refuse_if_direct(room)
    actor_membership = _membership_moderating(room=room, actor=actor)
    user = _user_named(username)
    with transaction.atomic():
        membership = Membership.objects.select_for_update().filter(room=room, user=user).first()
        if membership is None:
            raise ChatError("not_found", f"{username} is not a member of this room.")
        if membership.role == Membership.Role.OWNER:
            raise ChatError("forbidden", "The room's owner cannot be removed.")
        if membership.role == Membership.Role.MODERATOR and actor_membership.role != Membership.Role.OWNER:
            raise ChatError("forbidden", "Only the room's owner can remove a moderator.")
        membership.room, membership.user = room, user
        membership_delete(membership)


def _refuse_if_direct(room: Room) -> None:
    if room.is_direct:
        raise ChatError("direct_room", "A direct conversation is between its two people: nobody joins or leaves it.")


def membership_save(membership: Membership) -> None:
    """Save a membership as staff do in the admin (adding someone, or changing a role)."""
    _refuse_if_direct(membership.room)
    membership.full_clean(validate_unique=False)
    membership.save()


def membership_delete(membership: Membership) -> None:
    """Delete a membership as staff do in the admin; in a private room the user's sockets close."""
    _refuse_if_direct(membership.room)
    with transaction.atomic():
        membership.delete()
        if membership.room.is_private:
            room_id, username = membership.room_id, membership.user.get_username()
            realtime.publish_after_commit(lambda: realtime.publish_removal(room_id=room_id, username=username))


def _membership_moderating(*, room: Room, actor: User) -> Membership:
    membership = selectors.membership_get(room=room, user=actor)
    if membership is None or not membership.can_moderate:
        raise ChatError("forbidden", "Only the room's owner and moderators can manage its members.")
    return membership


def _user_named(username: str) -> User:
    user = get_user_model().objects.filter(username=username).first()
    if user is None:
        raise ChatError("unknown_user", f'There is no user called "{username}".')
    return user


def token_create(*, user: User, name: str) -> tuple[ApiToken, str]:
    """Return the new token and its secret, which is shown this once and never stored."""
    secret, key_hash, prefix = tokens.new_secret()
    token = ApiToken.objects.create(user=user, name=name, key_hash=key_hash, prefix=prefix)
    return token, secret


def token_update(*, token: ApiToken, fields: list[str]) -> None:
    """Save a token's changed name or revocation time (the admin's form)."""
    if fields:
        token.save(update_fields=fields)


def token_revoke(token: ApiToken) -> None:
    if token.revoked_at is None:
        token.revoked_at = timezone.now()
        token.save(update_fields=["revoked_at"])


def read_mark(*, room: Room, user: User, seq: int) -> int | None:
    """Record that `user` has seen the room up to `seq`; only ever moves forward, never past the room's last seq.

    Returns the new mark when it moved (what `read_by` tells the room), else None.
    Reading a public room the user has not joined yet joins it.
    """
    room_last_seq = Subquery(Room.objects.filter(pk=OuterRef("room_id")).values("last_seq")[:1])
    target = Least(Value(seq), room_last_seq)
    mine = Membership.objects.filter(room=room, user=user)
    if mine.filter(last_read_seq__lt=target).update(last_read_seq=target):
        return mine.values_list("last_read_seq", flat=True).first()
    if not room.is_private and not mine.exists():
        room_join(room=room, user=user)
        return read_mark(room=room, user=user, seq=seq)
    return None


def message_create(
    *,
    room: Room,
    author: User,
    body: object,
    nonce: object = None,
    reply_to: object = None,
    attachments: object = None,
    rate_checked: bool = False,
) -> tuple[Message, bool]:
    """Save a message with the room's next seq, then publish it once committed.

    Returns (message, created). A nonce the author already used returns the
    original message with created=False: a retried send changes nothing.
    `reply_to`: the id of the message this one answers, in the same room.
    `rate_checked`: the caller counted this send already (message_rate_check).
    """
    attachment_ids = files.attachment_ids(attachments)
    body = validation.message_body(body, allow_empty=bool(attachment_ids))
    nonce = validation.nonce(nonce)
    reply_id = validation.reply_id(reply_to)
    if not rate_checked and (rate := _message_rate(author)):
        _raise_if_rate_limited(ephemeral.rate_limit(*rate))
    if (
        room.is_private
        and author.get_username() != SYSTEM_USERNAME  # operators post in any room
        and selectors.membership_get(room=room, user=author) is None
    ):
        raise ChatError("forbidden", "You are not a member of this room.")
    original = None if reply_id is None else _reply_target(room=room, message_id=reply_id)
    if attachment_ids and nonce is not None and (existing := _message_for_nonce(room=room, author=author, nonce=nonce)):
        return existing, False  # a retry of a send with files: they are attached to it already
    html, mentions = notifications.render(room=room, author=author, body=body)
    # No look-up first: a retry is rare, and the unique (author, nonce)
    # constraint catches it below at no cost to every other send.
    now = timezone.now()
    draft = Message(
        room=room,
        author=author,
        body=body,
        html=html,
        reply_to=original,
        nonce=nonce,
        created_at=now,
        seq=0,
        mentions=mentions.usernames,
        mentions_room=mentions.everyone,
    )
    notifies = mentions.everyone or bool(mentions.user_ids) or room.is_direct
    try:
        # A message that notifies someone, or carries files, is stored with their rows in one
        # transaction; most messages do neither, and stay one statement (_save_with_next_seq).
        with transaction.atomic() if notifies or attachment_ids else contextlib.nullcontext():
            claimed = files.claim(room=room, author=author, ids=attachment_ids)
            draft.attachments = files.summary(claimed)
            message = _save_with_next_seq(draft, now)
            if message is not None and claimed:
                files.attach(message, claimed)
            if message is not None and notifies:
                message.room = room
                notifications.record(message, mentions)
    except IntegrityError:
        # A retry, or a concurrent send with the same nonce: the stored row is the answer.
        if nonce is not None and (existing := _message_for_nonce(room=room, author=author, nonce=nonce)):
            return existing, False
        raise
    if message is None:
        raise ChatError("room_archived", "This room is archived and read-only.")
    realtime.publish_after_commit(lambda: realtime.publish_message(message))
    room.last_seq = message.seq
    room.last_message_at = now
    return message, True


def _reply_target(*, room: Room, message_id: int) -> Message:
    original = selectors.messages_served().filter(pk=message_id, room=room, deleted_at__isnull=True).first()
    if original is None:
        raise ChatError("invalid_reply", "You can only reply to a message in this room that is not deleted.")
    return original


def _save_with_next_seq(draft: Message, now: datetime) -> Message | None:
    """Save `draft` with its room's next seq (None, and nothing saved, if the room is archived).

    Taking the seq is an UPDATE of the room's row: it takes the row lock
    (PostgreSQL) or the write lock (SQLite) first, so concurrent senders queue
    there and each gets a seq nobody else has. On PostgreSQL the UPDATE and
    the INSERT are one statement, which outside a transaction is its own: one
    round trip instead of four (BEGIN, UPDATE, INSERT, COMMIT), each of which
    also waited for the GIL behind the event loop's fan-out (a stall at 200
    msg/s, docs/performance.md). SQLite has no UPDATE in a WITH clause and no
    round trips to save: there, a transaction of two statements.
    """
    quote = connection.ops.quote_name
    room_table, last_seq = quote(Room._meta.db_table), quote("last_seq")
    take_seq = (
        f"UPDATE {room_table} SET {last_seq} = {last_seq} + 1, {quote('last_message_at')} = %s "
        f"WHERE {quote(Room._meta.pk.column)} = %s AND NOT {quote('is_archived')} RETURNING {last_seq}"
    )
    take_params = [connection.ops.adapt_datetimefield_value(now), draft.room_id]
    if connection.vendor != "postgresql":
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(take_seq, take_params)
            row = cursor.fetchone()
            if row is None:
                return None
            draft.seq = row[0]
            draft.save(force_insert=True)
        return draft
    fields = [field for field in Message._meta.concrete_fields if not field.primary_key]
    columns = ", ".join(quote(field.column) for field in fields)
    values = ", ".join(f"next.{last_seq}" if field.attname == "seq" else "%s" for field in fields)
    params = [
        field.get_db_prep_save(getattr(draft, field.attname), connection) for field in fields if field.attname != "seq"
    ]
    pk = quote(Message._meta.pk.column)
    sql = (
        f"WITH next AS ({take_seq}) INSERT INTO {quote(Message._meta.db_table)} ({columns}) "
        f"SELECT {values} FROM next RETURNING {pk}, {quote('seq')}"
    )
    # Inside a caller's transaction, a savepoint: a duplicate nonce must not break it.
    with (
        transaction.atomic() if connection.in_atomic_block else contextlib.nullcontext(),
        connection.cursor() as cursor,
    ):
        cursor.execute(sql, [*take_params, *params])
        row = cursor.fetchone()
    if row is None:
        return None
    draft.pk, draft.seq = row
    draft._state.adding, draft._state.db = False, connection.alias
    return draft


async def message_rate_check(*, author: User, body: object, attachments: object = None) -> None:
    """Count a send against its author's rate from the event loop (then message_create(rate_checked=True)).

    The WebSocket consumer does this before it hands the save to the
    database thread, which then makes no Redis round trip: every wait there
    holds up every other socket's save (docs/performance.md).
    """
    validation.message_body(body, allow_empty=bool(files.attachment_ids(attachments)))  # bad input counts for nothing
    if rate := _message_rate(author):
        _raise_if_rate_limited(await ephemeral.rate_limit_async(*rate))


async def reaction_rate_check(*, user: User) -> None:
    """Count a reaction against its user's rate from the event loop (then message_react(rate_checked=True))."""
    if rate := _message_rate(user, "reactions"):
        _raise_if_rate_limited(await ephemeral.rate_limit_async(*rate), "reactions")


def _message_rate(author: User, kind: str = "messages") -> tuple[str, int, int] | None:
    """At most CHAT_MESSAGE_RATE_LIMIT messages (or reactions) per CHAT_MESSAGE_RATE_WINDOW seconds per user.

    Counted on every path, each kind apart: every one reaches every socket in
    the room. Returns the limit's key, limit and window; None for operators,
    who are not limited.
    """
    if author.get_username() == SYSTEM_USERNAME:
        return None
    return f"{kind}:{author.pk}", settings.CHAT_MESSAGE_RATE_LIMIT, settings.CHAT_MESSAGE_RATE_WINDOW


def _raise_if_rate_limited(retry_after: int, kind: str = "messages") -> None:
    if retry_after:
        limit, window = settings.CHAT_MESSAGE_RATE_LIMIT, settings.CHAT_MESSAGE_RATE_WINDOW
        raise ChatError(
            "rate_limited",
            f"Slow down: at most {limit} {kind} every {window} seconds. Try again in {retry_after} s.",
            retry_after=retry_after,
        )


def _message_for_nonce(*, room: Room, author: User, nonce: str) -> Message | None:
    message = selectors.messages_served().filter(author=author, nonce=nonce).first()
    if message is not None and message.room_id != room.pk:
        raise ChatError("invalid_nonce", "This nonce was already used for a message in another room.")
    return message


def message_edit(*, room: Room, message_id: object, user: User, body: object, by_staff: bool = False) -> Message:
    """Replace the body of the user's own message, then publish the change once committed.

    `by_staff` lets staff edit anyone's message: the admin's path, not the chat's.
    """
    body = validation.message_body(body)
    # Before the room's lock, which every send in the room waits for. Mentions are
    # resolved as the author wrote them (staff editing in the admin do not add @room).
    editor = user if not by_staff else _author_of(message_id) or user
    html, mentions = notifications.render(room=room, author=editor, body=body)
    with transaction.atomic():
        message = _message_for_change(room=room, message_id=message_id)
        if message.author_id != user.pk and not (by_staff and user.is_staff):
            raise ChatError("forbidden", "You can only edit your own messages.")
        message.body = body
        message.html = html
        message.edited_at = timezone.now()
        message.mentions, message.mentions_room = mentions.usernames, mentions.everyone
        _record_change(room=room, message=message, fields=["body", "html", "edited_at", "mentions", "mentions_room"])
        notifications.record(message, mentions, replaced=True)
    return message


def _author_of(message_id: object) -> User | None:
    """The author of a message, if `message_id` is one (the admin's edits keep the author's own mentions)."""
    try:
        message_id = validation.message_id(message_id)
    except ChatError:
        return None
    return get_user_model().objects.filter(messages__pk=message_id).first()


def message_delete(*, room: Room, message_id: object, user: User) -> Message:
    """Delete a message (its author, the room's moderators, or staff) and publish the change once committed.

    The row stays, so the room's seqs stay gapless; its body is erased.
    """
    with transaction.atomic():
        message = _message_for_change(room=room, message_id=message_id)
        if message.author_id != user.pk and not user.is_staff and not _moderates(room=room, user=user):
            raise ChatError("forbidden", "You can only delete your own messages.")
        message.body = message.html = ""
        message.deleted_at = timezone.now()
        message.pinned_at = None  # nothing left to show in the pinned list
        notifications.forget(message)
        files.forget([message])
        message.attachments = []
        _record_change(
            room=room,
            message=message,
            fields=["body", "html", "deleted_at", "pinned_at", "mentions", "mentions_room", "attachments"],
        )
    return message


REACTIONS_MAX_EMOJI = 20


def message_react(*, room: Room, message_id: object, user: User, emoji: object, rate_checked: bool = False) -> Message:
    """Toggle the user's reaction to a message with one emoji, then publish the message's reactions once committed.

    At most REACTIONS_MAX_EMOJI different emoji per message. `rate_checked`:
    the caller counted this reaction already (reaction_rate_check).
    """
    emoji = validation.reaction_emoji(emoji)
    if not rate_checked and (rate := _message_rate(user, "reactions")):
        _raise_if_rate_limited(ephemeral.rate_limit(*rate), "reactions")
    with transaction.atomic():
        message = _message_for_change(room=room, message_id=message_id)
        removed, _ = Reaction.objects.filter(message=message, user=user, emoji=emoji).delete()
        if not removed:
            in_use = {reaction["emoji"] for reaction in message.reactions}
            if emoji not in in_use and len(in_use) >= REACTIONS_MAX_EMOJI:
                raise ChatError("invalid_emoji", f"A message can have at most {REACTIONS_MAX_EMOJI} different emoji.")
            Reaction.objects.create(message=message, user=user, emoji=emoji)
        message.reactions = _reaction_summary(message)
        _record_change(room=room, message=message, fields=["reactions"], frame=protocol.reactions_payload)
    return message


def _reaction_summary(message: Message) -> list[dict[str, Any]]:
    """Return Message.reactions as the Reaction rows now say: each emoji in order of first use."""
    summary: dict[str, list[str]] = {}
    for emoji, username in Reaction.objects.filter(message=message).values_list("emoji", "user__username"):
        summary.setdefault(emoji, []).append(username)  # rows come in Reaction's order: oldest first
    return [{"emoji": emoji, "count": len(users), "users": users} for emoji, users in summary.items()]


def message_pin(*, room: Room, message_id: object, user: User, pinned: bool) -> Message:
    """Pin or unpin a message (the room's owner and moderators, or staff); publish the change once committed.

    Pinning a pinned message (or unpinning one that is not) changes nothing and publishes nothing.
    """
    with transaction.atomic():
        message = _message_for_change(room=room, message_id=message_id)
        # In a direct conversation either of the two pins, as in Slack.
        may_pin = user.is_staff or _moderates(room=room, user=user) or (room.is_direct and _member(room, user))
        if not may_pin:
            raise ChatError("forbidden", "Only the room's owner and moderators can pin messages.")
        if (message.pinned_at is not None) == pinned:
            transaction.set_rollback(True)  # the change counter stays as it was
            return message
        message.pinned_at = timezone.now() if pinned else None
        _record_change(room=room, message=message, fields=["pinned_at"])
    return message


def _member(room: Room, user: User) -> bool:
    return selectors.membership_get(room=room, user=user) is not None


def _moderates(*, room: Room, user: User) -> bool:
    membership = selectors.membership_get(room=room, user=user)
    return membership is not None and membership.can_moderate


def _message_for_change(*, room: Room, message_id: object) -> Message:
    message_id = validation.message_id(message_id)
    # Taking the room's lock first, as message_create does, orders this change
    # among the room's other writes.
    if not Room.objects.filter(pk=room.pk, is_archived=False).update(last_change=F("last_change") + 1):
        raise ChatError("room_archived", "This room is archived and read-only.")
    message = selectors.messages_served().filter(pk=message_id, room=room, deleted_at__isnull=True).first()
    if message is None:
        raise ChatError("not_found", "There is no such message in this room (it may have been deleted).")
    return message


def _record_change(
    *,
    room: Room,
    message: Message,
    fields: list[str],
    frame: Callable[[Message], dict[str, Any]] | None = None,
) -> None:
    """Save the changed fields with the room's new change number, and publish the change once committed.

    `frame` tells it live (by default: the message as it now is). However it
    was told, a client resuming past it gets the message as it now is.
    """
    message.change = Room.objects.values_list("last_change", flat=True).get(pk=room.pk)
    message.save(update_fields=[*fields, "change"])
    if frame is None:
        realtime.publish_after_commit(lambda: realtime.publish_change(message))
    else:
        realtime.publish_after_commit(lambda: realtime.publish_change(message, frame(message)))


def messages_purge(
    *,
    older_than: datetime,
    room: Room | None = None,
    dry_run: bool = False,
    batch_size: int = 5000,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Delete the messages created before `older_than` (a retention policy), in batches; return how many.

    Unlike a deletion in the chat the rows go, so a room's history then starts
    at a later seq; the seqs after it stay gapless.
    """
    messages = Message.objects.filter(created_at__lt=older_than)
    if room is not None:
        messages = messages.filter(room=room)
    if dry_run:
        return messages.count()
    purged = 0
    while batch := list(messages.order_by("pk").values_list("pk", flat=True)[:batch_size]):
        with transaction.atomic():
            files.forget(Message.objects.filter(pk__in=batch))  # the stored files, once the rows are gone
            # Counted by the messages alone: their reactions, mentions and files go with them.
            purged += Message.objects.filter(pk__in=batch).delete()[1].get(Message._meta.label, 0)
        if progress is not None:
            progress(purged)
    return purged


def messages_import(
    *,
    room: Room,
    rows: Iterable[tuple[int, dict[str, Any]]],
    batch_size: int = 2000,
    progress: Callable[[transfer.ImportResult], None] | None = None,
) -> transfer.ImportResult:
    """Append exported messages (line number, row) to the room, in order, with new seqs.

    Idempotent: each row's nonce is derived from this room and the row's
    origin (room and seq), so a row imported before is recognised and skipped.
    Raises ChatError naming the line of the first malformed row; the batches
    before it stay imported. Sockets open in the room then resume from the
    database (one `resync`, not a frame per imported message).
    """
    result = transfer.ImportResult()
    batch: list[tuple[int, dict[str, Any]]] = []
    try:
        for line_number, row in rows:
            batch.append((line_number, transfer.checked_row(line_number, row)))
            if len(batch) >= batch_size:
                _import_batch(room, batch, result)
                batch = []
                if progress is not None:
                    progress(result)
        if batch:
            _import_batch(room, batch, result)
    finally:
        if result.created:
            realtime.publish_after_commit(lambda: realtime.publish_resync(room_id=room.pk))
    return result


def _import_batch(room: Room, batch: list[tuple[int, dict[str, Any]]], result: transfer.ImportResult) -> None:
    keys = [transfer.import_key(room, row) for _, row in batch]
    # Rendered before the room's lock, which every send in the room waits for (rows already there too: a
    # re-import renders for nothing, but holds up nobody).
    rendered = [markdown.render(row["body"]) for _, row in batch]
    with transaction.atomic():
        # The room's row lock first, as message_create takes it: seqs stay gapless under concurrent posts.
        Room.objects.filter(pk=room.pk).update(last_seq=F("last_seq"))
        done = set(Message.objects.filter(room=room, nonce__in=keys).values_list("nonce", flat=True))
        new = [(key, row, html) for key, (_, row), html in zip(keys, batch, rendered, strict=True) if key not in done]
        result.already_there += len(batch) - len(new)
        if not new:
            return
        authors = _import_authors({row["author"] for _, row, _ in new}, result)
        first_seq = Room.objects.values_list("last_seq", flat=True).get(pk=room.pk) + 1
        created = Message.objects.bulk_create(
            Message(
                room=room,
                author=authors[row["author"]],
                body=row["body"],
                html=html,
                created_at=row["created_at"],
                edited_at=row["edited_at"],
                deleted_at=row["deleted_at"],
                seq=first_seq + offset,
                nonce=key,
            )
            for offset, (key, row, html) in enumerate(new)
        )
        stored: list[Attachment] = []  # if a later line fails, the batch rolls back: these go too
        try:
            for message, (_, row, _) in zip(created, new, strict=True):
                if row["attachments"] and not row["deleted_at"]:
                    _import_files(message, row["attachments"], stored)
        except Exception:
            files.forget_stored(stored)
            raise
        newest = max(row["created_at"] for _, row, _ in new)
        Room.objects.filter(pk=room.pk).update(last_seq=first_seq + len(new) - 1, last_message_at=newest)
        result.created += len(new)


def _import_files(message: Message, contents: list[tuple[str, bytes]], stored: list[Attachment]) -> None:
    """An imported message's files, checked as any upload is (the type from the content, images opened)."""
    mine = []
    for name, data in contents:
        if not data or len(data) > settings.CHAT_UPLOAD_MAX_BYTES:
            raise ChatError("invalid_line", f'The file "{name}" of message {message.seq} is empty or too large.')
        try:
            attachment = files.store(
                room=message.room, uploader=message.author, name=name, uploaded=ContentFile(data, name=name)
            )
        except ChatError as error:
            raise ChatError("invalid_line", f'The file "{name}" of message {message.seq}: {error.detail}') from None
        stored.append(attachment)
        mine.append(attachment)
    files.attach(message, mine)
    message.attachments = files.summary(mine)
    message.save(update_fields=["attachments"])


def _import_authors(usernames: set[str], result: transfer.ImportResult) -> dict[str, User]:
    users = {user.get_username(): user for user in get_user_model().objects.filter(username__in=usernames)}
    missing = usernames - users.keys()
    if missing:
        result.missing_authors |= missing
        placeholder = reserved_user(PLACEHOLDER_USERNAME)
        users.update(dict.fromkeys(missing, placeholder))
    return users
