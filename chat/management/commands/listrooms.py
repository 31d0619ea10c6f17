import json

from django.core.management.base import BaseCommand

from chat import ephemeral, selectors
from chat.management.arguments import write_table

COLUMNS = ["slug", "name", "messages", "members", "online", "last_activity", "flags"]


class Command(BaseCommand):
    help = "List every room (archived and private ones too): messages, members, online now, last activity."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--format", choices=["table", "json"], default="table", help="table (default) or json")

    def handle(self, *args, format: str, **options) -> None:
        rooms = selectors.room_overview()
        online = ephemeral.presence_now([room.pop("id") for room in rooms])
        rooms = [{**room, "online": len(users)} for room, users in zip(rooms, online.values(), strict=True)]
        if format == "json":
            self.stdout.write(json.dumps(rooms, indent=2))
            return
        rows = [
            {
                **room,
                "last_activity": (room["last_activity"] or "never")[:16].replace("T", " "),
                "flags": ",".join(flag for flag in ("private", "archived") if room[flag]),
            }
            for room in rooms
        ]
        write_table(self.stdout, COLUMNS, rows)
        self.stdout.write(f"{len(rows)} room(s)")
