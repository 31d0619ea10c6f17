import csv
import json
import sys
import time

from django.core.management.base import BaseCommand, CommandError

from chat import transfer
from chat.management.arguments import moment, room_named

PROGRESS_EVERY = 100_000


class Command(BaseCommand):
    help = (
        "Write a room's messages, in seq order, as JSON lines (the format importroom reads) or CSV. "
        "Streams in chunks, so memory stays flat for any number of messages. Deleted messages are kept, without text."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("slug", help="the room")
        parser.add_argument("--format", choices=["jsonl", "csv"], default="jsonl", help="jsonl (default) or csv")
        parser.add_argument("--output", metavar="FILE", help="write here instead of to standard output")
        parser.add_argument("--since", metavar="DATE", help="only messages created from then on (YYYY-MM-DD[THH:MM])")

    def handle(self, *args, slug: str, format: str, output: str | None, since: str | None, **options) -> None:
        room = room_named(slug)
        rows = transfer.export_rows(room=room, since=moment(since) if since else None)
        try:
            out = open(output, "w", newline="", encoding="utf-8") if output else sys.stdout  # noqa: SIM115
        except OSError as error:
            raise CommandError(f"Cannot write {output}: {error.strerror}. Check the path.") from None
        started = time.monotonic()
        count = 0
        try:
            # CSV is for reading: a message's files by name (JSON lines carry them whole, for importroom).
            writer = csv.DictWriter(out, fieldnames=[*transfer.FIELDS, "files"]) if format == "csv" else None
            if writer is not None:
                writer.writeheader()
            for count, row in enumerate(rows, start=1):
                if writer is not None:
                    names = ", ".join(attachment["name"] for attachment in row.pop("attachments", []))
                    writer.writerow({**row, "files": names})
                else:
                    out.write(json.dumps(row, ensure_ascii=False) + "\n")
                if count % PROGRESS_EVERY == 0:
                    self.stderr.write(f"  {count:,} messages…")
        finally:
            if output:
                out.close()
        where = output or "standard output"
        self.stderr.write(
            f'Exported {count:,} messages of "{room.slug}" to {where} in {time.monotonic() - started:.1f} s.'
        )
