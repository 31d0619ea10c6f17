import json
import time
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from chat import services, transfer
from chat.management.arguments import room_named
from chat.models import PLACEHOLDER_USERNAME


class Command(BaseCommand):
    help = (
        "Append the messages of an exportroom JSON-lines file to a room, in order. Authors without an account "
        f'here become "{PLACEHOLDER_USERNAME}". Safe to run again: rows imported before are skipped.'
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("slug", help="the room to import into (create it first with createroom)")
        parser.add_argument("file", help="a .jsonl file written by manage.py exportroom")

    def handle(self, *args, slug: str, file: str, **options) -> None:
        room = room_named(slug)
        path = Path(file)
        if not path.is_file():
            raise CommandError(f"There is no file {file}. Give the path of a file written by manage.py exportroom.")
        started = time.monotonic()

        def progress(result: transfer.ImportResult) -> None:
            self.stdout.write(f"  {result.created + result.already_there:,} lines…")

        with path.open(encoding="utf-8") as lines:
            try:
                result = services.messages_import(room=room, rows=_parsed(lines), progress=progress)
            except services.ChatError as error:
                raise CommandError(f"{error.detail} Nothing from that line on was imported.") from None
        self.stdout.write(
            self.style.SUCCESS(
                f'Imported {result.created:,} messages into "{room.slug}" '
                f"({result.already_there:,} were already there) in {time.monotonic() - started:.1f} s."
            )
        )
        if result.missing_authors:
            names = ", ".join(sorted(result.missing_authors))
            self.stdout.write(f'Authors without an account here, shown as "{PLACEHOLDER_USERNAME}": {names}')


def _parsed(lines):
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except ValueError:
            raise services.ChatError("invalid_line", f"Line {number}: not JSON.") from None
