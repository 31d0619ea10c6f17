from django.core.management.base import BaseCommand

from chat import services
from chat.models import Room

DEMO_ROOMS = [
    ("lobby", "Lobby", "Say hello: everyone who signs up can chat here."),
]


class Command(BaseCommand):
    help = "Create the demo rooms if they are missing (safe to run again)."

    def handle(self, *args, **options) -> None:
        for slug, name, topic in DEMO_ROOMS:
            if Room.objects.filter(slug=slug).exists():
                self.stdout.write(f"Room {slug!r} already exists.")
                continue
            services.room_create(slug=slug, name=name, topic=topic, created_by=None)
            self.stdout.write(self.style.SUCCESS(f"Created room {slug!r}."))
