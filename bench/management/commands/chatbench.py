"""Measure the live chat end to end: real servers, real sign-ups, many sockets, one table.

    python manage.py chatbench [--sockets 200] [--rate 20] [--duration 10]
                               [--server uvicorn|daphne] [--processes 1] [--rooms 1]
                               [--senders 10] [--users N] [--timeline] [--deflate]
                               [--find-max [--rates 10,20,...]] [--baseline]
                               [--json FILE|-] [--max-seconds 600]

bench/scenario.py says what a run does; bench/report.py what it reports:
missing and duplicated messages per socket, sends refused with an `error`
frame, latency percentiles, deliveries per second, server CPU per 1,000
deliveries, peak RSS per server process, and the client's own CPU.
`--find-max` reports the highest rate with no loss, no duplicates, no refused
or unanswered sends, and p99 under 250 ms; `--baseline` reports
ours-over-baseline ratios.

A measurement that shows loss still exits 0; a setup failure (a server that
does not start, a sign-up that fails) raises CommandError with what to fix.
"""

from __future__ import annotations

from dataclasses import fields

from bench.management.benchcommand import BenchCommand
from bench.scenario import BASELINE_APP, ChatBench, Options
from bench.serverprocess import UVICORN_WS


class Command(BenchCommand):
    help = (
        "Benchmark the live chat: starts servers, signs users up, connects sockets, sends at a fixed rate "
        "and reports loss, duplicates, latency percentiles, deliveries/s and server CPU per 1,000 deliveries."
    )

    def add_arguments(self, parser) -> None:
        d = Options()
        parser.add_argument(
            "--server",
            choices=[*UVICORN_WS, "daphne"],
            default=d.server,
            help=(
                "ASGI server: uvicorn as bin/serve runs it (websockets-sansio), uvicorn with the"
                " legacy websockets or wsproto protocol, uvicorn-deflate (bin/serve's with per-message"
                f" compression on, for --deflate), or daphne ({d.server})"
            ),
        )
        parser.add_argument(
            "--processes", type=int, default=d.processes, help=f"server processes, on separate ports ({d.processes})"
        )
        parser.add_argument(
            "--sockets", type=int, default=d.sockets, help=f"WebSockets in all, round-robin ({d.sockets})"
        )
        parser.add_argument(
            "--rooms", type=int, default=d.rooms, help=f"rooms; the sockets are spread evenly ({d.rooms})"
        )
        parser.add_argument(
            "--senders",
            type=int,
            default=d.senders,
            help=f"sockets per room that send; they share the room's rate ({d.senders})",
        )
        parser.add_argument(
            "--users",
            type=int,
            default=d.users,
            help="signed-in users the sockets belong to, 1 included (default: one per 20 sockets, like tabs)",
        )
        parser.add_argument("--rate", type=float, default=d.rate, help=f"messages per second PER ROOM ({d.rate:g})")
        parser.add_argument(
            "--duration", type=float, default=d.duration, help=f"seconds of sending per measurement ({d.duration:g})"
        )
        parser.add_argument(
            "--find-max", action="store_true", help="step the rate up; report the highest rate that passes"
        )
        parser.add_argument("--rates", default=d.rates, help=f"per-room rates for --find-max ({d.rates})")
        parser.add_argument(
            "--p99-limit-ms", type=float, default=d.p99_limit_ms, help="the p99 a passing step stays under"
        )
        parser.add_argument(
            "--drain", type=float, default=d.drain, help="longest wait for deliveries after the last send"
        )
        parser.add_argument(
            "--warmup",
            type=float,
            default=d.warmup,
            help=f"seconds of unreported sending before the first step ({d.warmup:g})",
        )
        parser.add_argument(
            "--idle",
            type=float,
            default=d.idle,
            help="seconds of no messages, after the warm-up, over which to measure the servers' idle CPU",
        )
        parser.add_argument(
            "--timeline",
            action="store_true",
            help="print each step's seconds: deliveries, p50 / p99 / max latency and server CPU (always in --json)",
        )
        parser.add_argument(
            "--deflate",
            action="store_true",
            help="offer permessage-deflate in the handshake, as browsers do (the server may then compress each frame)",
        )
        parser.add_argument(
            "--baseline", action="store_true", help=f"measure {BASELINE_APP} the same way afterwards and compare"
        )
        parser.add_argument(
            "--cluster",
            metavar="NAME",
            default=d.cluster,
            help="measure the app hosts of `bin/cluster up` with CLUSTER_NAME=NAME through its HAProxy, "
            "instead of starting servers (start it with CHAT_MESSAGE_RATE_LIMIT=1000000 "
            "CHAT_MAX_SOCKETS_PER_USER=100000, as the bench's own servers run)",
        )
        self.add_run_arguments(parser, d)

    def handle(self, *args, **options) -> None:
        chosen = Options(**{f.name: options[f.name] for f in fields(Options)})
        self.run_bench(ChatBench(chosen, self.say))
