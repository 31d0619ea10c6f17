"""Measure a reconnect storm: every socket of a killed server process resumes on the others.

    python manage.py stormbench [--sockets 1000] [--rooms 10] [--users 10] [--processes 3]
                                [--rate 2] [--before 3] [--after 3] [--resume-limit 30]
                                [--database-url URL] [--json FILE|-] [--max-seconds 300]

bench/storm.py says what a run does: K uvicorn processes (as the README runs
them, serving bench/counted_asgi.py: the site with its queries counted) on one
Redis; every socket on the first, one sender per room posting through the
others; the first is SIGKILLed and every socket reconnects to the others with
the room page's jittered backoff, resuming with ?after=. It reports the time
from the kill to each socket's resume (p50, p95, max), handshakes and resumes
per second, messages lost or duplicated on any socket (against the database),
and for each surviving process its resumes, queries per resume, the shared
database thread's load and queue, and CPU during the storm.

Like chatbench, a measurement that shows loss still exits 0 (the report says
FAIL); a setup failure raises CommandError with what to fix.
"""

from __future__ import annotations

from dataclasses import fields

from bench.management.benchcommand import BenchCommand
from bench.storm import StormBench, StormOptions


class Command(BenchCommand):
    help = (
        "Benchmark a reconnect storm: kill the server process holding every socket and measure how fast, "
        "and at what database cost, they resume on the others, and that none loses or repeats a message."
    )

    def add_arguments(self, parser) -> None:
        d = StormOptions()
        parser.add_argument(
            "--processes", type=int, default=d.processes, help=f"uvicorn processes; the first is killed ({d.processes})"
        )
        parser.add_argument(
            "--sockets", type=int, default=d.sockets, help=f"WebSockets, all on the first ({d.sockets})"
        )
        parser.add_argument(
            "--rooms", type=int, default=d.rooms, help=f"rooms; the sockets are spread evenly ({d.rooms})"
        )
        parser.add_argument("--users", type=int, default=d.users, help=f"signed-in users the sockets share ({d.users})")
        parser.add_argument(
            "--rate", type=float, default=d.rate, help=f"messages per second PER ROOM, one sender each ({d.rate:g})"
        )
        parser.add_argument(
            "--before", type=float, default=d.before, help=f"seconds of chat before the kill ({d.before:g})"
        )
        parser.add_argument(
            "--after", type=float, default=d.after, help=f"seconds of chat after the last resume ({d.after:g})"
        )
        parser.add_argument(
            "--resume-limit",
            type=float,
            default=d.resume_limit,
            help=f"seconds within which every socket must be resumed to PASS ({d.resume_limit:g})",
        )
        self.add_run_arguments(parser, d)

    def handle(self, *args, **options) -> None:
        chosen = StormOptions(**{f.name: options[f.name] for f in fields(StormOptions) if f.name in options})
        self.run_bench(StormBench(chosen, self.say))
