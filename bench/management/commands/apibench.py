"""Measure the JSON API's latency and server CPU per request, one request at a time (bench/apis.py says how).

python manage.py apibench [--requests 500] [--server daphne|uvicorn]
"""

from __future__ import annotations

import json

from django.core.management.base import BaseCommand, CommandError

from bench.apis import run_api
from bench.scenario import BenchFailed, default_database_url


class Command(BaseCommand):
    help = "Time each kind of JSON API request on one server process, one request at a time."
    # It never touches this process's database: everything goes over HTTP.
    requires_system_checks = []

    def add_arguments(self, parser) -> None:
        parser.add_argument("--requests", type=int, default=500, help="requests of each kind (500)")
        parser.add_argument("--server", choices=["uvicorn", "daphne"], default="uvicorn", help="ASGI server (uvicorn)")
        parser.add_argument(
            "--database-url",
            default=default_database_url(),
            help="the server's database; migrated first (var/bench.sqlite3)",
        )

    def handle(self, *args, requests: int, server: str, database_url: str, **options):
        try:
            result = run_api(requests=requests, server=server, database_url=database_url, say=self.stdout.write)
        except BenchFailed as error:
            raise CommandError(str(error), returncode=error.returncode) from None
        self.stdout.write(json.dumps(result, indent=2))
