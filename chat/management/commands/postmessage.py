from django.core.management.base import BaseCommand, CommandError

from chat import services
from chat.management.arguments import room_named, user_named


class Command(BaseCommand):
    help = (
        "Post a message in a room, saved and published like any other: open browsers show it at once. "
        "Without --as it comes from the system user, shown as a system message."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("slug", help="the room")
        parser.add_argument("text", help="the message")
        parser.add_argument("--as", dest="username", metavar="USER", help="post as this user (default: system)")

    def handle(self, *args, slug: str, text: str, username: str | None, **options) -> None:
        room = room_named(slug)
        author = user_named(username) if username else services.system_user()
        try:
            message, _ = services.message_create(room=room, author=author, body=text)
        except services.ChatError as error:
            raise CommandError(f"Not posted: {error.detail}") from None
        self.stdout.write(self.style.SUCCESS(f'Posted message {message.seq} in "{room.slug}" as {author}.'))
