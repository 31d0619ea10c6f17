import json

from django.core.management.base import BaseCommand

from chat import ephemeral, selectors
from chat.management.arguments import write_table


class Command(BaseCommand):
    help = "Site figures: rooms, messages, messages per day over the last 7 days, the busiest rooms, who is online."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--format", choices=["table", "json"], default="table", help="table (default) or json")

    def handle(self, *args, format: str, **options) -> None:
        stats = selectors.chat_stats()
        online = ephemeral.presence_now(selectors.open_room_ids())
        stats["online_now"] = sorted({user for users in online.values() for user in users})
        if format == "json":
            self.stdout.write(json.dumps(stats, indent=2))
            return
        self.stdout.write(f"Rooms: {stats['rooms']} open, {stats['archived_rooms']} archived")
        self.stdout.write(f"Messages: {stats['messages']}")
        self.stdout.write("\nMessages per day (last 7 days):")
        write_table(
            self.stdout, ["day", "messages"], [{"day": d, "messages": n} for d, n in stats["messages_per_day"].items()]
        )
        self.stdout.write("\nMost active rooms (last 7 days):")
        write_table(self.stdout, ["room", "messages"], stats["most_active_rooms"])
        online = stats["online_now"]
        self.stdout.write(f"\nOnline now: {len(online)}{': ' + ', '.join(online) if online else ''}")
