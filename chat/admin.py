from django.contrib import admin, messages

from chat import tokens
from chat.models import ApiToken, Message, Room


@admin.register(Room)
class RoomAdmin(admin.ModelAdmin):
    list_display = ("slug", "name", "is_archived", "last_seq", "last_message_at", "created_at")
    list_filter = ("is_archived",)
    search_fields = ("slug", "name", "topic")
    prepopulated_fields = {"slug": ("name",)}
    raw_id_fields = ("created_by",)
    readonly_fields = ("last_seq", "last_message_at", "created_at")


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    list_display = ("room", "seq", "author", "body_start", "created_at")
    list_select_related = ("room", "author")
    list_filter = ("room",)
    search_fields = ("body", "author__username")
    raw_id_fields = ("room", "author")
    readonly_fields = ("seq", "nonce", "created_at", "edited_at", "deleted_at")
    show_full_result_count = False

    @admin.display(description="body")
    def body_start(self, message: Message) -> str:
        return message.body[:80]


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

    def save_model(self, request, token: ApiToken, form, change: bool) -> None:
        if change:
            super().save_model(request, token, form, change)
            return
        created, secret = tokens.token_create(user=token.user, name=token.name)
        # The admin goes on with the form's instance (logging, redirecting): make it the saved token.
        token.pk, token.key_hash, token.prefix, token.created_at = (
            created.pk, created.key_hash, created.prefix, created.created_at
        )
        token._state.adding = False
        messages.warning(request, f"The secret of “{created.name}” is {secret} — copy it now; it is not shown again.")

    @admin.action(description="Revoke the selected tokens")
    def revoke(self, request, queryset) -> None:
        for token in queryset:
            tokens.token_revoke(token)
