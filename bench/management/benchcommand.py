"""What `manage.py chatbench` and `stormbench` share: their run-wide options, running, printing."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from bench.scenario import BenchFailed, ChatBench, Options


class BenchCommand(BaseCommand):
    # It never touches this process's database: everything goes over HTTP and WebSockets.
    requires_system_checks = []

    def add_run_arguments(self, parser, d: Options) -> None:
        """The options every bench run has: message size, database, usernames, report, time cap."""
        parser.add_argument(
            "--body-size", type=int, default=d.body_size, help=f"characters per message body ({d.body_size})"
        )
        parser.add_argument(
            "--database-url", default=d.database_url, help="the servers' database; migrated first (var/bench.sqlite3)"
        )
        parser.add_argument(
            "--user-prefix", default=d.user_prefix, help=f"usernames are PREFIX-u001, ... ({d.user_prefix})"
        )
        parser.add_argument("--json", dest="json_path", metavar="FILE", help="write the report as JSON; - for stdout")
        parser.add_argument(
            "--max-seconds", type=float, default=d.max_seconds, help=f"hard cap on the whole run ({d.max_seconds:g})"
        )

    def run_bench(self, bench: ChatBench) -> None:
        """Run it; a setup failure becomes a CommandError with what to fix (a measured loss does not)."""
        try:
            bench.execute()
        except BenchFailed as error:
            raise CommandError(str(error), returncode=error.returncode) from None

    def say(self, text: str) -> None:
        self.stdout.write(text)
        self.stdout.flush()
