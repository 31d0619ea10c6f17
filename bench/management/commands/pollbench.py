"""Measure how many concurrent long-polls one server process holds (bench/polls.py says how).

python manage.py pollbench [--polls 1000] [--server daphne|uvicorn] [--hold 3]
"""

from __future__ import annotations

import json

from django.core.management.base import BaseCommand, CommandError

from bench.polls import run_polls
from bench.scenario import BenchFailed, default_database_url


class Command(BaseCommand):
    help = "Hold N concurrent long-polls on one server process and wake them all with one message."
    # It never touches this process's database: everything goes over HTTP.
    requires_system_checks = []

    def add_arguments(self, parser) -> None:
        parser.add_argument("--polls", type=int, default=1000, help="concurrent long-polls (1000)")
        parser.add_argument("--server", choices=["uvicorn", "daphne"], default="uvicorn", help="ASGI server (uvicorn)")
        parser.add_argument("--hold", type=float, default=3.0, help="seconds to hold the polls before posting (3)")
        parser.add_argument(
            "--database-url",
            default=default_database_url(),
            help="the server's database; migrated first (var/bench.sqlite3)",
        )
        parser.add_argument("--max-seconds", type=float, default=180.0, help="hard cap on the whole run (180)")

    def handle(self, *args, polls: int, server: str, hold: float, database_url: str, max_seconds: float, **options):
        try:
            result = run_polls(
                polls=polls,
                server=server,
                hold=hold,
                database_url=database_url,
                max_seconds=max_seconds,
                say=self.stdout.write,
            )
        except BenchFailed as error:
            raise CommandError(str(error), returncode=error.returncode) from None
        self.stdout.write(json.dumps(result, indent=2))
