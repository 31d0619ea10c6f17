from django.core.management.base import BaseCommand
from django.utils import timezone

from chat import services
from chat.management.arguments import duration, room_named


class Command(BaseCommand):
    help = (
        "Delete messages older than a duration (a retention policy), in batches. Unlike a deletion in the chat, "
        "the rows are gone. --dry-run only counts them."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("--older-than", required=True, metavar="AGE", help="e.g. 30d, 12h, 2w")
        parser.add_argument("--room", metavar="SLUG", help="only this room (default: every room)")
        parser.add_argument("--dry-run", action="store_true", help="count what would be deleted; delete nothing")

    def handle(self, *args, older_than: str, room: str | None, dry_run: bool, **options) -> None:
        cutoff = timezone.now() - duration(older_than)
        target = room_named(room) if room else None
        where = f'in "{target.slug}"' if target else "in all rooms"

        def progress(purged: int) -> None:
            self.stdout.write(f"  {purged:,} deleted…")

        count = services.messages_purge(older_than=cutoff, room=target, dry_run=dry_run, progress=progress)
        verb = "Would delete" if dry_run else "Deleted"
        self.stdout.write(
            self.style.SUCCESS(f"{verb} {count:,} messages created before {cutoff:%Y-%m-%d %H:%M} UTC {where}.")
        )
