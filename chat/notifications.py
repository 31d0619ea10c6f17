"""Mentions, notification levels and missed-message email (docs/notifications.md).

A message's mentions are resolved once, when it is saved or edited: who its
"@name"s are, among the people who can read the room, and whether it says
"@room". They are stored three ways, each for one reader:

- on the message (`mentions`, `mentions_room`), for every path that serves it;
- as Mention rows, for unread-mention counts and the Mentions page;
- as EmailNotice rows (with direct messages), for the email sent if they stay
  unread: a task per notice, run `NOTIFY_EMAIL_DELAY` seconds later.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from datetime import timedelta

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import User
from django.core import signing
from django.core.exceptions import ValidationError
from django.core.mail import EmailMultiAlternatives
from django.core.validators import validate_email
from django.db import transaction
from django.template.loader import render_to_string
from django.urls import reverse
from django.utils import timezone

from chat import markdown, protocol, realtime
from chat.models import (
    RESERVED_USERNAMES,
    ROOM_MENTION,
    EmailNotice,
    Membership,
    Mention,
    Message,
    NotificationSettings,
    NotifyLevel,
    Room,
)
from chat.validation import ChatError


@dataclass
class Mentions:
    """Whom a message's body mentions: filled in while it is rendered (markdown.render's `mentionable`)."""

    room: Room
    author: User
    user_ids: dict[str, int] = field(default_factory=dict)  # username: pk, in the order written
    everyone: bool = False

    def __call__(self, candidates: list[str]) -> set[str]:
        """Answer which "@name"s mention someone: people who can read the room, and @room from its moderators."""
        usernames = [name for name in candidates if name not in RESERVED_USERNAMES]
        people = get_user_model().objects.filter(username__in=usernames, is_active=True)
        if self.room.is_private:  # direct rooms are private too
            people = people.filter(memberships__room=self.room)
        found = dict(people.values_list("username", "pk"))
        self.user_ids = {name: found[name] for name in usernames if name in found}
        self.everyone = ROOM_MENTION in candidates and may_mention_room(room=self.room, user=self.author)
        return set(self.user_ids) | ({ROOM_MENTION} if self.everyone else set())

    @property
    def usernames(self) -> list[str]:
        return list(self.user_ids)


def may_mention_room(*, room: Room, user: User) -> bool:
    """@room is for the room's owner and moderators (and staff); from anyone else it is text."""
    if room.is_direct:
        return False
    if user.is_staff:
        return True
    return Membership.objects.filter(
        room=room, user=user, role__in=[Membership.Role.OWNER, Membership.Role.MODERATOR]
    ).exists()


def render(*, room: Room, author: User, body: str) -> tuple[str, Mentions]:
    """Render a body's HTML with its mentions marked; return both."""
    mentions = Mentions(room=room, author=author)
    return markdown.render(body, mentionable=mentions), mentions


def record(message: Message, mentions: Mentions, *, replaced: bool = False) -> None:
    """Store whom `message` notifies (Mention and EmailNotice rows) and tell them live, once committed.

    Run in the message's transaction. `replaced`: an edit, whose mentions
    replace the ones it had; someone mentioned already is not notified again.
    """
    mentioned = set(mentions.user_ids.values())
    if mentions.everyone:
        mentioned |= set(Membership.objects.filter(room=message.room_id).values_list("user_id", flat=True))
    mentioned.discard(message.author_id)
    already: set[int] = set()
    if replaced:
        Mention.objects.filter(message=message).exclude(user__in=mentioned).delete()
        already = set(Mention.objects.filter(message=message).values_list("user_id", flat=True))
    Mention.objects.bulk_create(
        [
            Mention(message=message, user_id=user_id, room_id=message.room_id, seq=message.seq)
            for user_id in mentioned - already
        ],
        ignore_conflicts=True,
    )
    told = {user_id: "mention" for user_id in mentioned - already}
    if message.room.is_direct and not replaced:
        partners = Membership.objects.filter(room=message.room_id).exclude(user=message.author_id)
        told.update(
            {user_id: "direct" for user_id in partners.values_list("user_id", flat=True) if user_id not in told}
        )
    if not told:
        return
    _notice(message, told)


def _notice(message: Message, told: dict[int, str]) -> None:
    """Tell the users live (after the commit); EmailNotice rows, and a task each, for those who take email."""
    people = get_user_model().objects.filter(pk__in=list(told), is_active=True)
    usernames = dict(people.values_list("pk", "username"))
    for reason in set(told.values()):
        names = [usernames[user_id] for user_id, why in told.items() if why == reason and user_id in usernames]
        frame = protocol.notify_payload(message, reason)
        realtime.publish_after_commit(functools.partial(realtime.publish_notify, usernames=names, frame=frame))
    takers = list(
        people.exclude(email="").exclude(notification_settings__email_notifications=False).values_list("pk", flat=True)
    )
    if not takers:
        return
    EmailNotice.objects.bulk_create(
        [EmailNotice(user_id=user_id, message=message, created_at=message.created_at) for user_id in takers],
        ignore_conflicts=True,
    )
    from chat import tasks  # the tasks module imports this one

    def enqueue() -> None:
        due = tasks.email_missed_messages.using(
            run_after=timezone.now() + timedelta(seconds=settings.NOTIFY_EMAIL_DELAY)
        )
        for user_id in takers:
            due.enqueue(user_id)

    # Robust: the message is saved whatever becomes of this; a notice whose task was lost
    # goes with the user's next one (email_missed takes all that wait).
    transaction.on_commit(enqueue, robust=True)


def forget(message: Message) -> None:
    """A deleted message mentions nobody any more: its counts go, and no email will name it."""
    Mention.objects.filter(message=message).delete()
    EmailNotice.objects.filter(message=message, handled_at=None).delete()
    message.mentions, message.mentions_room = [], False


def forget_room_history(*, room: Room, through_seq: int) -> None:
    """A cleared history mentions nobody any more, as forget() does for one message."""
    Mention.objects.filter(room=room, seq__lte=through_seq).delete()
    EmailNotice.objects.filter(message__room=room, message__seq__lte=through_seq, handled_at=None).delete()


def settings_for(user: User) -> NotificationSettings:
    """The user's notification settings, as stored or as the defaults (not saved until changed)."""
    return NotificationSettings.objects.filter(user=user).first() or NotificationSettings(user=user)


def level_in(*, membership: Membership | None, room: Room, user_settings: NotificationSettings) -> str:
    """The level in force in a room: the membership's own, else "all" in a direct room, else the user's default."""
    if membership is not None:
        return membership.notify_level(user_settings.default_notify)
    return NotifyLevel.ALL if room.is_direct else user_settings.default_notify


def level_for(*, room: Room, user: User) -> str:
    """The level in force for `user` in `room` (level_in, looking both up)."""
    membership = Membership.objects.filter(room=room, user=user).first()
    if membership is not None:
        membership.room = room
    return level_in(membership=membership, room=room, user_settings=settings_for(user))


def notify_set(*, room: Room, user: User, level: object) -> Membership:
    """Set the user's notification level in a room they are a member of ("" follows their default)."""
    if level not in NotifyLevel.values and level != "":
        raise ChatError("invalid_notify", 'notify is one of "all", "mentions", "nothing", or "" for your default.')
    membership = Membership.objects.filter(room=room, user=user).first()
    if membership is None:
        if room.is_private:
            raise ChatError("forbidden", "You are not a member of this room.")
        membership, _ = Membership.objects.get_or_create(room=room, user=user)
    membership.notify = str(level)
    membership.save(update_fields=["notify"])
    membership.room = room
    return membership


def settings_update(
    *, user: User, email: object, email_notifications: bool, default_notify: object
) -> NotificationSettings:
    """Save the settings page: the email address (the user's own) and the notification choices."""
    if default_notify not in NotifyLevel.values:
        raise ChatError("invalid_notify", 'The default level is one of "all", "mentions" or "nothing".')
    email = str(email or "").strip()
    if email:
        try:
            validate_email(email)
        except ValidationError:
            raise ChatError("invalid_email", "Enter a valid email address.") from None
    with transaction.atomic():
        if user.email != email:
            user.email = email
            user.save(update_fields=["email"])
        user_settings, _ = NotificationSettings.objects.update_or_create(
            user=user, defaults={"email_notifications": email_notifications, "default_notify": default_notify}
        )
    return user_settings


# --------------------------------------------------------------------------
# Missed-message email
# --------------------------------------------------------------------------

UNSUBSCRIBE_SALT = "chat.notifications.unsubscribe"


def email_missed(*, user_id: int) -> int:
    """Email `user_id` what they missed, once their oldest waiting notice is due; return how many messages it named.

    Everything waiting goes in one email, due or not (Zulip's batching), and
    each notice is taken once: a second run, or a worker beside this one,
    finds nothing. Notices read, deleted, muted or no longer readable by
    then are dropped. If the mail cannot be sent, the notices wait again and
    the error is raised (the task fails, visibly; the next notice's task retries).
    """
    now = timezone.now()
    with transaction.atomic():
        waiting = list(
            EmailNotice.objects.select_for_update()
            .filter(user_id=user_id, handled_at=None)
            .select_related("message__room", "message__author")
            .order_by("created_at", "pk")
        )
        if not waiting or waiting[0].created_at > now - timedelta(seconds=settings.NOTIFY_EMAIL_DELAY):
            return 0  # not due yet: the task of the oldest comes later
        taken = [notice.pk for notice in waiting]
        EmailNotice.objects.filter(pk__in=taken).update(handled_at=now)
    user = get_user_model().objects.filter(pk=user_id, is_active=True).first()
    if user is None or not user.email:
        return 0
    user_settings = settings_for(user)
    if not user_settings.email_notifications:
        return 0
    missed = _still_missed(user, user_settings, [notice.message for notice in waiting])
    if not missed:
        return 0
    try:
        _send_missed_email(user, missed)
    except Exception:
        EmailNotice.objects.filter(pk__in=taken).update(handled_at=None)
        raise
    EmailNotice.objects.filter(pk__in=taken, message__in=missed).update(emailed=True)
    return len(missed)


def _still_missed(user: User, user_settings: NotificationSettings, messages: list[Message]) -> list[Message]:
    """The messages still unread, not deleted, in rooms the user still reads and has not muted."""
    room_ids = {message.room_id for message in messages}
    memberships = {m.room_id: m for m in Membership.objects.filter(user=user, room__in=room_ids).select_related("room")}
    missed = []
    for message in messages:
        membership = memberships.get(message.room_id)
        if message.deleted_at is not None or (message.room.is_private and membership is None):
            continue
        if membership is not None and membership.last_read_seq >= message.seq:
            continue
        if level_in(membership=membership, room=message.room, user_settings=user_settings) == NotifyLevel.NOTHING:
            continue
        missed.append(message)
    return missed


def unsubscribe_token(user: User) -> str:
    return signing.dumps(user.pk, salt=UNSUBSCRIBE_SALT, compress=True)


def unsubscribe_user(token: str) -> User | None:
    """The user an unsubscribe link was made for, or None for a link that is not ours."""
    try:
        user_id = signing.loads(token, salt=UNSUBSCRIBE_SALT)
    except signing.BadSignature:
        return None
    return get_user_model().objects.filter(pk=user_id).first()


def unsubscribe(user: User) -> None:
    """Turn the user's email notifications off (one click, from an email's link)."""
    NotificationSettings.objects.update_or_create(user=user, defaults={"email_notifications": False})


def _send_missed_email(user: User, messages: list[Message]) -> None:
    unsubscribe_url = settings.SITE_URL + reverse("unsubscribe", args=[unsubscribe_token(user)])
    context = {
        "user": user,
        "items": [
            {
                "message": message,
                "room_name": _room_name(message.room, user),
                "url": settings.SITE_URL + reverse("room-detail", args=[message.room.slug]) + f"?at={message.seq}",
                "excerpt": message.text[:EXCERPT_LENGTH] + ("…" if len(message.text) > EXCERPT_LENGTH else ""),
            }
            for message in messages
        ],
        "settings_url": settings.SITE_URL + reverse("settings"),
        "unsubscribe_url": unsubscribe_url,
    }
    first = messages[0]
    if len(messages) == 1:
        where = _room_name(first.room, user)
        subject = (
            f"{first.author.get_username()} sent you a direct message"
            if first.room.is_direct
            else f"{first.author.get_username()} mentioned you in {where}"
        )
    else:
        subject = f"{len(messages)} messages you missed"
    mail = EmailMultiAlternatives(
        subject=subject,
        body=render_to_string("chat/email/missed.txt", context),
        to=[user.email],
        headers={"List-Unsubscribe": f"<{unsubscribe_url}>", "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"},
    )
    mail.attach_alternative(render_to_string("chat/email/missed.html", context), "text/html")
    mail.send()


EXCERPT_LENGTH = 300


def _room_name(room: Room, reader: User) -> str:
    if room.is_direct:
        other = room.memberships.exclude(user=reader).values_list("user__username", flat=True).first()
        return f"your conversation with {other}" if other else room.name
    return f"#{room.slug}"
