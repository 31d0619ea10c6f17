from django.contrib import admin

from chat.models import Message, Room


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
