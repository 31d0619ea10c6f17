from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from chat import services
from chat.management.arguments import user_named


class Command(BaseCommand):
    help = "Create a room. Its owner (--owner) manages its members; without one, staff manage it in the admin."

    def add_arguments(self, parser) -> None:
        parser.add_argument("slug", help="the room's address: lowercase letters, digits and hyphens")
        parser.add_argument("--name", required=True, help="the room's name, as people see it")
        parser.add_argument("--topic", default="", help="one line about the room")
        parser.add_argument("--private", action="store_true", help="only members can find, read and join it")
        parser.add_argument("--owner", metavar="USER", help="the username of its owner")

    def handle(self, *args, slug: str, name: str, topic: str, private: bool, owner: str | None, **options) -> None:
        owner_user = user_named(owner) if owner else None
        try:
            room = services.room_create(slug=slug, name=name, topic=topic, is_private=private, created_by=owner_user)
        except ValidationError as error:
            problems = "; ".join(f"{field}: {' '.join(texts)}" for field, texts in error.message_dict.items())
            raise CommandError(f"The room was not created. {problems}") from None
        kind = "private" if room.is_private else "public"
        self.stdout.write(self.style.SUCCESS(f'Created {kind} room "{room.slug}" ({room.name}).'))
