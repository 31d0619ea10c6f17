"""Measure search latency over a million messages (bench/searches.py says how).

DATABASE_URL=sqlite:////tmp/search.sqlite3 python manage.py searchbench [--rooms 100] [--messages 1000000]
"""

from __future__ import annotations

import json
import os

from django.core.management.base import BaseCommand, CommandError

from bench.scenario import BenchFailed
from bench.searches import run_search


class Command(BaseCommand):
    help = "Seed (if needed) a database of demo messages, build its search index, and time GET /api/search/."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--rooms", type=int, default=100, help="rooms to seed (100)")
        parser.add_argument("--messages", type=int, default=1_000_000, help="messages to seed, in all (1,000,000)")
        parser.add_argument("--queries", type=int, default=100, help="requests of each kind of query (100)")
        parser.add_argument(
            "--private",
            type=int,
            default=0,
            help="demo rooms made private, the searching user a member of every other one (0)",
        )

    def handle(self, *args, rooms: int, messages: int, queries: int, private: int, **options):
        database_url = os.environ.get("DATABASE_URL")
        if not database_url:
            raise CommandError("Set DATABASE_URL to the database to seed and search (a throwaway one).")
        try:
            result = run_search(
                rooms=rooms,
                messages=messages,
                queries=queries,
                private=private,
                database_url=database_url,
                say=self.stdout.write,
            )
        except BenchFailed as error:
            raise CommandError(str(error), returncode=error.returncode) from None
        self.stdout.write(json.dumps(result, indent=2))
