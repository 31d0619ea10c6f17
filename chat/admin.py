"""The staff's way into rooms, history, memberships and API tokens.

Changes that people in a room should see go through chat/services.py, as
they do from the chat: archiving closes the room's sockets, and editing or
deleting a message reaches open browsers live.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypedDict

from django import forms
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.core.paginator import Paginator
from django.db.models import OuterRef, Q, QuerySet, Subquery
from django.http import HttpRequest
from django.template.response import TemplateResponse
from django.utils.functional import cached_property

from chat import ephemeral, search, services
from chat.models import ApiToken, Attachment, EmailNotice, Membership, Message, NotificationSettings, Room
from chat.validation import ChatError
from chat.views import authenticated_user

if TYPE_CHECKING:
    from django_stubs_ext import WithAnnotations


class OwnerName(TypedDict):
    owner_name: str | None  # RoomAdmin.get_queryset's: the first owner's username


class CappedCountPaginator(Paginator):
    """Counts at most CAP rows: past that, the changelist shows "CAP+" pages' worth, not a full COUNT(*)."""

    CAP = 10_000

    @cached_property
    def count(self) -> int:
        if not isinstance(self.object_list, QuerySet):
            return len(self.object_list)  # a list is counted already
        return self.object_list.values("pk")[: self.CAP].count()


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0
    raw_id_fields = ("user",)
    fields = ("user", "role", "notify", "joined_at", "last_read_seq")
    readonly_fields = ("joined_at", "last_read_seq")

    # A direct conversation's two members are shown, never changed.
    def has_add_permission(self, request: HttpRequest, obj: Room | None = None) -> bool:
        return not (obj is not None and obj.is_direct) and super().has_add_permission(request, obj)

    def has_change_permission(self, request: HttpRequest, obj: Room | None = None) -> bool:
        return not (obj is not None and obj.is_direct) and super().has_change_permission(request, obj)

    def has_delete_permission(self, request: HttpRequest, obj: Room | None = None) -> bool:
        return not (obj is not None and obj.is_direct) and super().has_delete_permission(request, obj)


class MembershipForm(forms.ModelForm):
    def clean_room(self) -> Room:
        room = self.cleaned_data["room"]
        if room.is_direct:
            raise forms.ValidationError("A direct conversation is between its two people: nobody joins it.")
        return room


@admin.register(Room)
class RoomAdmin(admin.ModelAdmin):
    list_display = (
        "slug", "name", "is_private", "is_archived", "owner", "messages_posted", "last_message_at", "online_now"
    )  # fmt: skip
    list_filter = ("is_private", "is_direct", "is_archived", "created_at")
    search_fields = ("slug", "name", "topic")
    prepopulated_fields = {"slug": ("name",)}
    raw_id_fields = ("created_by",)
    fields = ("name", "slug", "topic", "is_private", "is_archived", "created_by")
    readonly_fields = ()
    inlines = [MembershipInline]
    actions = ["archive", "unarchive", "clear_history"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[WithAnnotations[Room, OwnerName]]:
        owner = Membership.objects.filter(room=OuterRef("pk"), role=Membership.Role.OWNER).order_by("joined_at")
        return super().get_queryset(request).annotate(owner_name=Subquery(owner.values("user__username")[:1]))

    @admin.display(description="owner", ordering="owner_name")
    def owner(self, room: WithAnnotations[Room, OwnerName]) -> str:
        return room.owner_name or "—"

    @admin.display(description="messages", ordering="last_seq")
    def messages_posted(self, room: Room) -> int:
        # Seqs are gapless, so the last one counts the room's messages without a COUNT(*).
        return room.last_seq

    @admin.display(description="online now")
    def online_now(self, room: Room) -> int | str:
        # One Redis round trip per row (a page has at most 100).
        try:
            return len(ephemeral.presence_now([room.pk])[room.pk])
        except Exception:
            return "?"  # Redis is down; the page still works

    def save_model(self, request: HttpRequest, room: Room, form, change: bool) -> None:
        if change:
            services.room_update(room=room, fields=list(form.changed_data))
            return
        created = services.room_create(
            slug=room.slug, name=room.name, topic=room.topic, is_private=room.is_private, created_by=room.created_by
        )
        if room.is_archived:
            services.room_archive(room=created)
        # The admin goes on with the form's instance (logging, the inline, redirecting): make it the saved room.
        room.pk, room.created_at, room._state.adding = created.pk, created.created_at, False

    def save_formset(self, request: HttpRequest, form, formset, change: bool) -> None:
        memberships = formset.save(commit=False)
        for membership in formset.deleted_objects:
            services.membership_delete(membership)  # closes the member's sockets in a private room
        for membership in memberships:
            services.membership_save(membership)

    @admin.action(description="Archive the selected rooms (read-only; open sockets close)")
    def archive(self, request: HttpRequest, rooms: QuerySet[Room]) -> None:
        count = sum(services.room_archive(room=room) for room in rooms)
        self.message_user(request, f"Archived {count} room(s).", messages.SUCCESS)

    @admin.action(description="Unarchive the selected rooms")
    def unarchive(self, request: HttpRequest, rooms: QuerySet[Room]) -> None:
        count = sum(services.room_unarchive(room=room) for room in rooms)
        self.message_user(request, f"Unarchived {count} room(s).", messages.SUCCESS)

    @admin.action(description="Clear the history of the selected rooms…")
    def clear_history(self, request: HttpRequest, rooms: QuerySet[Room]):
        if request.POST.get("confirm") != "yes":
            context = {
                **self.admin_site.each_context(request),
                "title": "Clear history?",
                "rooms": rooms,
                "opts": self.model._meta,
                "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
            }
            return TemplateResponse(request, "admin/chat/room/clear_history_confirmation.html", context)
        deleted = sum(services.room_clear_history(room=room) for room in rooms)
        self.message_user(request, f"Deleted {deleted} message(s) in {len(rooms)} room(s).", messages.SUCCESS)
        return None


class DeletedFilter(admin.SimpleListFilter):
    title = "deleted"
    parameter_name = "deleted"

    def lookups(self, request, model_admin):
        return [("yes", "Deleted"), ("no", "Not deleted")]

    def queryset(self, request, queryset):
        if self.value() == "yes":
            return queryset.filter(deleted_at__isnull=False)
        if self.value() == "no":
            return queryset.filter(deleted_at__isnull=True)
        return queryset


class PinnedFilter(admin.SimpleListFilter):
    title = "pinned"
    parameter_name = "pinned"

    def lookups(self, request, model_admin):
        return [("yes", "Pinned")]

    def queryset(self, request, queryset):
        if self.value() == "yes":
            return queryset.filter(pinned_at__isnull=False)
        return queryset


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    list_display = ("room", "seq", "author", "body_start", "created_at", "edited_at", "deleted_at", "pinned")
    list_select_related = ("room", "author")
    # All rooms, from the room table: RelatedOnlyFieldListFilter would scan the messages for the rooms they use.
    list_filter = ("room", "created_at", DeletedFilter, PinnedFilter)
    search_fields = ("body", "author__username")
    raw_id_fields = ("room", "author")
    fields = (
        "room", "seq", "author", "body", "reply_to", "reaction_summary", "mentioned", "files", "nonce",
        "created_at", "edited_at", "deleted_at", "pinned_at",
    )  # fmt: skip
    readonly_fields = (
        "room", "seq", "author", "reply_to", "reaction_summary", "mentioned", "files", "nonce", "created_at",
        "edited_at", "deleted_at", "pinned_at",
    )  # fmt: skip
    actions = ["pin_messages", "unpin_messages"]
    # A million messages: no COUNT(*) of the whole table, a capped count of the filtered one.
    show_full_result_count = False
    paginator = CappedCountPaginator

    def get_ordering(self, request: HttpRequest) -> list[str]:
        # Newest first, along the index that serves the filter: (room, seq) within a room, deleted_at
        # for deleted messages, created_at for a date range; else the primary key's.
        if request.GET.get("room__id__exact"):
            return ["-seq"]
        if request.GET.get(DeletedFilter.parameter_name) == "yes":
            return ["-deleted_at"]
        if request.GET.get("created_at__gte"):
            return ["-created_at"]
        return ["-pk"]

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Message], search_term: str
    ) -> tuple[QuerySet[Message], bool]:
        """The full-text index for the body (the newest 1,000 matches), or an author's exact username."""
        if not search_term.strip():
            return queryset, False
        try:
            matches = search.newest_matches(search_term)
        except ChatError as error:
            self.message_user(request, error.detail, messages.WARNING)
            matches = []
        return queryset.filter(Q(pk__in=matches) | Q(author__username=search_term.strip())), False

    @admin.display(description="body")
    def body_start(self, message: Message) -> str:
        return message.body[:80]

    @admin.display(description="pinned", boolean=True)
    def pinned(self, message: Message) -> bool:
        return message.pinned_at is not None

    @admin.display(description="reactions")
    def reaction_summary(self, message: Message) -> str:
        return ", ".join(f"{r['emoji']} {r['count']} ({', '.join(r['users'])})" for r in message.reactions) or "–"

    @admin.display(description="mentions")
    def mentioned(self, message: Message) -> str:
        names = [f"@{name}" for name in message.mentions] + (["@room"] if message.mentions_room else [])
        return ", ".join(names) or "–"

    @admin.display(description="files")
    def files(self, message: Message) -> str:
        return ", ".join(f"{a['name']} ({a['content_type']}, {a['size']:,} bytes)" for a in message.attachments) or "–"

    @admin.action(description="Pin the selected messages in their rooms")
    def pin_messages(self, request: HttpRequest, queryset: QuerySet[Message]) -> None:
        self._pin(request, queryset, pinned=True)

    @admin.action(description="Unpin the selected messages")
    def unpin_messages(self, request: HttpRequest, queryset: QuerySet[Message]) -> None:
        self._pin(request, queryset, pinned=False)

    def _pin(self, request: HttpRequest, queryset: QuerySet[Message], *, pinned: bool) -> None:
        done = 0
        for message in queryset.select_related("room"):
            try:
                services.message_pin(
                    room=message.room, message_id=message.pk, user=authenticated_user(request), pinned=pinned
                )
                done += 1
            except services.ChatError as error:
                self.message_user(request, f"Message {message}: {error.detail}", messages.ERROR)
        if done:
            self.message_user(request, f"{'Pinned' if pinned else 'Unpinned'} {done} message(s).", messages.SUCCESS)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # messages are posted in the chat, by the API, or with manage.py postmessage

    def save_model(self, request: HttpRequest, message: Message, form, change: bool) -> None:
        if "body" in form.changed_data:
            try:
                services.message_edit(
                    room=message.room,
                    message_id=message.pk,
                    user=authenticated_user(request),
                    body=message.body,
                    by_staff=True,
                )
            except services.ChatError as error:
                self.message_user(request, f"Not saved: {error.detail}", messages.ERROR)

    def delete_model(self, request: HttpRequest, message: Message) -> None:
        # A soft delete: the row keeps its seq, the body is erased, open browsers are told.
        try:
            services.message_delete(room=message.room, message_id=message.pk, user=authenticated_user(request))
        except services.ChatError as error:
            self.message_user(request, f"Message {message} not deleted: {error.detail}", messages.ERROR)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Message]) -> None:
        for message in queryset.select_related("room"):
            self.delete_model(request, message)


@admin.register(Membership)
class MembershipAdmin(admin.ModelAdmin):
    form = MembershipForm
    list_display = ("user", "room", "role", "notify", "joined_at", "last_read_seq")
    list_select_related = ("user", "room")
    list_filter = ("role", "notify", "room__is_private")
    search_fields = ("user__username", "room__slug", "room__name")
    raw_id_fields = ("user", "room")
    readonly_fields = ("joined_at", "last_read_seq")

    def get_readonly_fields(self, request: HttpRequest, obj: Membership | None = None) -> tuple[str, ...]:
        # Moving a membership to another user or room would skip what removing one does (closing sockets).
        return (*self.readonly_fields, "user", "room") if obj is not None else self.readonly_fields

    def has_change_permission(self, request: HttpRequest, obj: Membership | None = None) -> bool:
        return not (obj is not None and obj.room.is_direct) and super().has_change_permission(request, obj)

    def has_delete_permission(self, request: HttpRequest, obj: Membership | None = None) -> bool:
        return not (obj is not None and obj.room.is_direct) and super().has_delete_permission(request, obj)

    def save_model(self, request: HttpRequest, membership: Membership, form, change: bool) -> None:
        services.membership_save(membership)

    def delete_model(self, request: HttpRequest, membership: Membership) -> None:
        services.membership_delete(membership)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Membership]) -> None:
        for membership in queryset.select_related("room", "user"):
            try:
                services.membership_delete(membership)
            except services.ChatError as error:
                self.message_user(request, f"{membership} kept: {error.detail}", messages.ERROR)


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ("name", "user", "prefix", "created_at", "last_used_at", "revoked_at")
    list_select_related = ("user",)
    list_filter = ("revoked_at",)
    search_fields = ("name", "user__username", "prefix")
    raw_id_fields = ("user",)
    fields = ("user", "name", "prefix", "created_at", "last_used_at", "revoked_at")
    readonly_fields = ("prefix", "created_at", "last_used_at")
    actions = ["revoke"]

    def get_readonly_fields(self, request: HttpRequest, obj: ApiToken | None = None) -> tuple[str, ...]:
        return (*self.readonly_fields, "user") if obj is not None else self.readonly_fields

    def save_model(self, request, token: ApiToken, form, change: bool) -> None:
        if change:
            services.token_update(token=token, fields=list(form.changed_data))
            return
        created, secret = services.token_create(user=token.user, name=token.name)
        # The admin goes on with the form's instance (logging, redirecting): make it the saved token.
        token.pk, token.key_hash, token.prefix, token.created_at = (
            created.pk,
            created.key_hash,
            created.prefix,
            created.created_at,
        )
        token._state.adding = False
        messages.warning(request, f"The secret of “{created.name}” is {secret} — copy it now; it is not shown again.")

    @admin.action(description="Revoke the selected tokens")
    def revoke(self, request, queryset) -> None:
        for token in queryset:
            services.token_revoke(token)


@admin.register(NotificationSettings)
class NotificationSettingsAdmin(admin.ModelAdmin):
    """What people chose on /settings/ (their address is the user's own email field)."""

    list_display = ("user", "email_notifications", "default_notify")
    list_filter = ("email_notifications", "default_notify")
    search_fields = ("user__username", "user__email")
    raw_id_fields = ("user",)


@admin.register(EmailNotice)
class EmailNoticeAdmin(admin.ModelAdmin):
    """Missed-message email, as it waits and goes: read-only (the worker's tasks are under "Tasks")."""

    list_display = ("user", "message", "created_at", "handled_at", "emailed")
    list_select_related = ("user", "message")
    list_filter = ("emailed", ("handled_at", admin.EmptyFieldListFilter))
    search_fields = ("user__username",)
    raw_id_fields = ("user", "message")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: EmailNotice | None = None) -> bool:
        return False


@admin.register(Attachment)
class AttachmentAdmin(admin.ModelAdmin):
    """Uploaded files: what they are and where, read-only. Deleting the message deletes its files."""

    list_display = ("name", "content_type", "size", "room", "uploader", "message", "created_at")
    list_select_related = ("room", "uploader", "message")
    list_filter = ("content_type", ("message", admin.EmptyFieldListFilter))
    search_fields = ("name", "uploader__username", "room__slug")
    raw_id_fields = ("room", "uploader", "message")
    readonly_fields = ("key", "name", "size", "content_type", "file", "thumbnail", "width", "height", "created_at")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Attachment | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Attachment | None = None) -> bool:
        return False  # a file goes with its message (delete the message), so no summary names a missing file
