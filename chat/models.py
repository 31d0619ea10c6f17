from __future__ import annotations

import secrets

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import RegexValidator
from django.db import models
from django.db.models import Q
from django.utils import timezone

SLUG_PATTERN = r"^[a-z0-9-]{1,64}$"
# The author of messages posted by operators (manage.py postmessage); it cannot sign in,
# and nobody can sign up with its name.
SYSTEM_USERNAME = "system"
# The author of imported messages whose author has no account here (manage.py importroom).
PLACEHOLDER_USERNAME = "former-member"
# "@room" mentions every member of a room (its owner and moderators may write it), so nobody is called "room".
ROOM_MENTION = "room"
RESERVED_USERNAMES = {SYSTEM_USERNAME, PLACEHOLDER_USERNAME, ROOM_MENTION}
# Direct rooms' slugs: dm-<lower user id>-<higher user id>. Other rooms cannot take them.
DIRECT_SLUG_PREFIX = "dm-"

slug_validator = RegexValidator(
    SLUG_PATTERN,
    "Use 1 to 64 lowercase letters, digits or hyphens.",
    code="invalid_slug",
)


class Room(models.Model):
    # The URL name; the channel-layer group uses the primary key instead,
    # so renaming a slug never strands an open socket.
    slug = models.CharField(max_length=64, unique=True, validators=[slug_validator])
    name = models.CharField(max_length=100)
    topic = models.CharField(max_length=200, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    # Archived rooms keep their history but accept no sockets and no messages.
    is_archived = models.BooleanField(default=False)
    # Private rooms exist only for their members: unlisted, and 404 to anyone else.
    is_private = models.BooleanField(default=False)
    # A direct conversation: private, with exactly its two users as members, and nobody else ever.
    is_direct = models.BooleanField(default=False, editable=False)
    # "<lower user id>-<higher user id>" of a direct room: unique, so a pair has one conversation.
    direct_pair = models.CharField(max_length=41, null=True, blank=True, unique=True, editable=False)
    # The seq of the newest message. Incremented in the transaction that saves
    # each message, which is what keeps the per-room sequence gapless.
    last_seq = models.PositiveBigIntegerField(default=0)
    # Counts edits and deletions in this room, as last_seq counts messages:
    # a reconnecting client asks for the changes after the last one it saw.
    last_change = models.PositiveBigIntegerField(default=0)
    last_message_at = models.DateTimeField(null=True, blank=True)
    # The newest "clear history": every message up to this seq was deleted as change
    # `cleared_change`. Resuming clients get one frame for it, not one per message.
    cleared_through_seq = models.PositiveBigIntegerField(default=0)
    cleared_change = models.PositiveBigIntegerField(default=0)

    class Meta:
        ordering = ["slug"]
        indexes = [models.Index(fields=["created_at"], name="room_created_at")]
        constraints = [
            models.CheckConstraint(
                condition=Q(is_direct=False, direct_pair__isnull=True)
                | Q(is_direct=True, is_private=True, direct_pair__isnull=False),
                name="room_direct_is_private_with_a_pair",
            )
        ]

    def __str__(self) -> str:
        return self.slug

    def clean(self) -> None:
        if self.is_direct and not self.is_private:
            raise ValidationError({"is_private": "A direct conversation stays private."})
        if not self.is_direct and self.slug.startswith(DIRECT_SLUG_PREFIX):
            raise ValidationError({"slug": f'"{DIRECT_SLUG_PREFIX}" starts the addresses of direct conversations.'})


class Message(models.Model):
    # No index of its own: the (room, seq) unique constraint's index starts with room.
    room = models.ForeignKey(Room, on_delete=models.CASCADE, related_name="messages", db_index=False)
    author = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="messages")
    body = models.TextField()
    # A default rather than auto_now_add, so that importroom can keep the original times.
    created_at = models.DateTimeField(default=timezone.now)
    edited_at = models.DateTimeField(null=True, blank=True)
    # Soft delete: the row keeps its seq so the sequence stays gapless.
    deleted_at = models.DateTimeField(null=True, blank=True)
    # 1, 2, 3 … within the room; what clients resume from.
    seq = models.PositiveBigIntegerField()
    # Chosen by the client so that a retried send is recognised, not repeated.
    nonce = models.CharField(max_length=64, null=True, blank=True)
    # The room's last_change when this message was last edited, deleted, reacted to or pinned (0: never).
    change = models.PositiveBigIntegerField(default=0)
    # The body rendered from Markdown and sanitized (chat/markdown.py): made once per save or edit,
    # never per delivery. "" for a deleted message.
    html = models.TextField(blank=True, default="")
    # The message this one answers, in the same room (services.message_create checks).
    reply_to = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="replies", editable=False
    )
    # Set while the room's owner, a moderator or staff has it pinned.
    pinned_at = models.DateTimeField(null=True, blank=True)
    # Who reacted with what: [{"emoji", "count", "users"}] in order of first use. A summary of
    # the Reaction rows, rewritten with them, so that serving a message never counts reactions.
    reactions = models.JSONField(default=list, blank=True, editable=False)
    # The usernames it mentions, in order (only people who can read the room), and whether it
    # mentions the whole room (@room). Kept with the message, as reactions are, so that serving
    # it never looks Mention rows up.
    mentions = models.JSONField(default=list, blank=True, editable=False)
    mentions_room = models.BooleanField(default=False, editable=False)
    # Its files: [{"id", "name", "size", "content_type", "url", "thumbnail_url"}], a summary of
    # its Attachment rows written with them, as reactions are.
    attachments = models.JSONField(default=list, blank=True, editable=False)

    class Meta:
        # By the column, not the relation: "room" would sort by the Room's own ordering, through a join.
        ordering = ["room_id", "seq"]
        constraints = [
            models.UniqueConstraint(fields=["room", "seq"], name="message_unique_room_seq"),
            models.UniqueConstraint(
                fields=["author", "nonce"], condition=Q(nonce__isnull=False), name="message_unique_author_nonce"
            ),
        ]
        # The (room, seq) unique constraint is the index most reads use.
        indexes = [
            models.Index(fields=["room", "change"], name="message_room_change"),
            # The admin's date filter, retention (purgemessages) and statistics.
            models.Index(fields=["created_at"], name="message_created_at"),
            # The admin's "deleted" filter: deleted messages are few.
            models.Index(fields=["deleted_at"], name="message_deleted", condition=Q(deleted_at__isnull=False)),
            # A room's pinned messages (its header): few per room.
            models.Index(fields=["room", "pinned_at"], name="message_pinned", condition=Q(pinned_at__isnull=False)),
        ]

    def __str__(self) -> str:
        return f"{self.room_id}#{self.seq}"

    @property
    def text(self) -> str:
        """What quotes, pins and notifications show of it: its body, or for files alone their names."""
        if self.body or not self.attachments:
            return self.body
        return "📎 " + ", ".join(attachment["name"] for attachment in self.attachments)

    @property
    def is_system(self) -> bool:
        """Posted by an operator (manage.py postmessage), not by a person."""
        return self.author.get_username() == SYSTEM_USERNAME


class Reaction(models.Model):
    """One user's reaction to a message with one emoji; Message.reactions sums them up."""

    message = models.ForeignKey(Message, on_delete=models.CASCADE, related_name="reaction_rows")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    emoji = models.CharField(max_length=64)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["message", "created_at", "pk"]
        constraints = [
            models.UniqueConstraint(fields=["message", "user", "emoji"], name="reaction_unique_message_user_emoji")
        ]

    def __str__(self) -> str:
        return f"{self.emoji} by {self.user_id} on {self.message_id}"


def _attachment_key() -> str:
    return secrets.token_urlsafe(24)


class Attachment(models.Model):
    """A file uploaded into a room, then attached to one message (chat/files.py checks and serves it).

    Stored under its random key, never under the name it came with; served only
    to people who can read the room (before it is attached, only to its uploader).
    """

    key = models.CharField(max_length=40, unique=True, default=_attachment_key, editable=False)
    room = models.ForeignKey(Room, on_delete=models.CASCADE, related_name="+")
    uploader = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    message = models.ForeignKey(
        Message, null=True, blank=True, on_delete=models.CASCADE, related_name="attachment_rows"
    )
    name = models.CharField(max_length=255)
    size = models.PositiveBigIntegerField()
    # Decided from the content (chat/files.py sniff), never from the name.
    content_type = models.CharField(max_length=100)
    file = models.FileField(max_length=200)
    thumbnail = models.FileField(max_length=200, blank=True)
    width = models.PositiveIntegerField(null=True, blank=True)
    height = models.PositiveIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        # A person's quota, and their uploads not yet attached.
        indexes = [models.Index(fields=["uploader", "message"], name="attachment_uploader")]

    def __str__(self) -> str:
        return f"{self.name} ({self.key})"


class NotifyLevel(models.TextChoices):
    """Which messages of a room notify a person: in the browser, and by email for mentions and direct messages."""

    ALL = "all", "All messages"
    MENTIONS = "mentions", "Mentions only"
    NOTHING = "nothing", "Nothing"


class Membership(models.Model):
    """A user's place in a room: their role, how far they have read, and what notifies them."""

    class Role(models.TextChoices):
        MEMBER = "member"
        MODERATOR = "moderator"
        OWNER = "owner"

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships")
    room = models.ForeignKey(Room, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.MEMBER)
    joined_at = models.DateTimeField(auto_now_add=True)
    # The highest seq the user has seen; only ever raised.
    last_read_seq = models.PositiveBigIntegerField(default=0)
    # "" follows the user's default (NotificationSettings.default_notify); a direct room's is "all".
    notify = models.CharField(max_length=8, choices=NotifyLevel.choices, blank=True, default="")

    class Meta:
        ordering = ["room", "user"]
        constraints = [models.UniqueConstraint(fields=["room", "user"], name="membership_unique_room_user")]
        # The room list looks memberships up by user.
        indexes = [models.Index(fields=["user", "room"], name="membership_user_room")]

    def __str__(self) -> str:
        return f"{self.user_id} in {self.room_id} ({self.role})"

    @property
    def can_moderate(self) -> bool:
        """Moderators and owners delete others' messages and manage members."""
        return self.role in (self.Role.MODERATOR, self.Role.OWNER)

    def notify_level(self, default: str) -> str:
        """The level in force: its own, else "all" in a direct room, else the user's `default`."""
        return self.notify or (NotifyLevel.ALL if self.room.is_direct else default)


class NotificationSettings(models.Model):
    """A person's notification choices (/settings/); the email address itself is the user's."""

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, primary_key=True, related_name="notification_settings"
    )
    email_notifications = models.BooleanField(
        default=True, help_text="Email mentions and direct messages left unread (NOTIFY_EMAIL_DELAY)."
    )
    default_notify = models.CharField(
        max_length=8,
        choices=NotifyLevel.choices,
        default=NotifyLevel.MENTIONS,
        help_text="The level of every room whose own level is not set. Direct messages always notify, unless muted.",
    )

    class Meta:
        verbose_name_plural = "notification settings"

    def __str__(self) -> str:
        return f"notification settings of {self.user_id}"


class Mention(models.Model):
    """A person a message mentions: by @name, or as a member of the room by @room.

    What a reader's unread-mention counts and /mentions/ read. The room and seq
    are the message's, copied so that counting needs no join.
    """

    message = models.ForeignKey(Message, on_delete=models.CASCADE, related_name="mention_rows")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="mentions")
    room = models.ForeignKey(Room, on_delete=models.CASCADE, related_name="+", db_index=False)
    seq = models.PositiveBigIntegerField()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["message", "user"], name="mention_unique_message_user")]
        # Unread mentions per room (user, room, seq > mark), and the Mentions page (user, newest first).
        indexes = [models.Index(fields=["user", "room", "seq"], name="mention_user_room_seq")]

    def __str__(self) -> str:
        return f"{self.user_id} in {self.message_id}"


class EmailNotice(models.Model):
    """A mention or direct message that will be emailed to `user` if still unread after NOTIFY_EMAIL_DELAY.

    One row per (user, message), so nothing is emailed twice. `handled_at` is
    set when an email run took it: emailed, or dropped as read, deleted or muted.
    """

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    message = models.ForeignKey(Message, on_delete=models.CASCADE, related_name="+")
    created_at = models.DateTimeField(default=timezone.now)
    handled_at = models.DateTimeField(null=True, blank=True)
    emailed = models.BooleanField(default=False)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["user", "message"], name="email_notice_unique_user_message")]
        indexes = [
            models.Index(fields=["user", "created_at"], name="email_notice_pending", condition=Q(handled_at=None))
        ]

    def __str__(self) -> str:
        return f"{self.user_id} about {self.message_id}"


class ApiToken(models.Model):
    """A bearer token for the JSON API. Only a hash of the secret is stored."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100, help_text="What the token is for, e.g. “deploy bot”.")
    # SHA-256 of the whole secret: secrets are 256 random bits, so a fast hash is enough.
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    # The secret's first characters, to tell tokens apart in lists.
    prefix = models.CharField(max_length=16, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["user", "name"]
        verbose_name = "API token"

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"
