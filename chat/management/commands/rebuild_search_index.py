import time

from django.core.management.base import BaseCommand

from chat import search

BAR_WIDTH = 30


class Command(BaseCommand):
    help = (
        "Index every message's text again for search (docs/search.md): after a restore that left the index out, "
        "or a migration that rebuilt the message table. Creates the index first if it is missing."
    )

    def handle(self, *args, **options) -> None:
        started = time.monotonic()

        def progress(done: int, total: int) -> None:
            share = done / total if total else 1.0
            filled = round(BAR_WIDTH * share)
            bar = "#" * filled + "." * (BAR_WIDTH - filled)
            self.stdout.write(
                f"[{bar}] {share:4.0%} {done:,} of {total:,} messages, {time.monotonic() - started:.1f} s"
            )

        indexed = search.rebuild(progress=progress)
        self.stdout.write(self.style.SUCCESS(f"Indexed {indexed:,} messages in {time.monotonic() - started:.1f} s."))
