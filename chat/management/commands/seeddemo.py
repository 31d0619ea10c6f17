import time

from django.core.management.base import BaseCommand, CommandError

from chat import demo


class Command(BaseCommand):
    help = (
        "Create the Lobby if it is missing (safe to run again). With --rooms N --messages M, also add N demo rooms "
        "holding M generated messages in all (bulk inserts, gapless seqs): for trying the site out and for benchmarks."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("--rooms", type=int, default=0, help="demo rooms to add (0)")
        parser.add_argument("--messages", type=int, default=0, help="messages in all, spread over the rooms (0)")
        parser.add_argument("--workers", type=int, default=2, help="processes inserting side by side (2; 1 for none)")

    def handle(self, *args, rooms: int, messages: int, workers: int, **options) -> None:
        if rooms < 0 or messages < 0 or (messages and not rooms):
            raise CommandError("--rooms and --messages must be 0 or more, and messages need at least one room.")
        if not 1 <= workers <= 16:
            raise CommandError("--workers must be from 1 to 16.")
        room, created = demo.lobby()
        self.stdout.write(
            self.style.SUCCESS(f'Created room "{room.slug}".') if created else f'Room "{room.slug}" already exists.'
        )
        if not rooms:
            return
        started = time.monotonic()
        last_report = [started]

        def progress(written: int, total: int) -> None:
            now = time.monotonic()
            if now - last_report[0] >= 2 or written == total:
                last_report[0] = now
                self.stdout.write(f"  {written:,}/{total:,} messages ({written / max(now - started, 1e-9):,.0f}/s)")

        made = demo.seed_rooms(rooms=rooms, messages=messages, workers=workers, progress=progress)
        seconds = time.monotonic() - started
        names = ", ".join(room.slug for room in made)
        self.stdout.write(
            self.style.SUCCESS(f"Added {len(made)} room(s) ({names}) with {messages:,} messages in {seconds:.1f} s.")
        )
