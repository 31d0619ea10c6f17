"""Soak: minutes of steady chat load; server memory must stay flat, nothing lost, nothing refused.

    .venv/bin/python bench/soak.py [--minutes 5] [--warmup 60] [--sockets 100] [--rooms 4]
                                   [--rate 10] [--senders 10] [--server uvicorn|daphne|...]
                                   [--processes 2] [--database-url URL] [--json FILE]
                                   [--max-seconds S]

Too long for every CI run; run it by hand (docs/reliability.md gives the
figures measured). It is `manage.py chatbench` (bench/scenario.py) held at one rate: the same
server processes (production-like settings, Redis layer under a per-run
prefix), the same sign-ups through the site's forms, the same cheap client
(bench/client.py) and the same check of every socket against the database.
Only the steps differ: the load runs for `--warmup` seconds, then `--minutes`
more, in back-to-back checked chunks of 15 s (a progress line after each).

Meanwhile each server process's RSS (VmRSS in /proc/PID/status) is sampled
every 5 s. It PASSES, and exits 0, when over the whole run:

- every socket received every stored message exactly once (no missing, no
  duplicated, no stray deliveries; no gap or duplicate among the stored seqs),
- every send was stored and acknowledged (the sender got its message back):
  no refused sends (error frames), none unanswered, no socket closed,
  no Traceback or ERROR in the server logs,
- each process's RSS at the end is less than 10% above its RSS at the end of
  the warm-up.

Otherwise it prints why and exits 1. The database is a throwaway SQLite file
(var/soak.sqlite3, deleted and migrated afresh each run) unless --database-url
names another. Everything stops by itself: --max-seconds (by default the load
plus 3 minutes) is a hard cap, after which the servers are killed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
from array import array
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["DJANGO_SETTINGS_MODULE"] = "chatsite.settings"
# Only this process's settings need one; the servers get chatbench's own.
os.environ.setdefault("SECRET_KEY", "soak-only-not-secret-" + "0" * 30)

import django  # noqa: E402

django.setup()

from bench.client import HandshakeError, StepRaw  # noqa: E402
from bench.report import percentile  # noqa: E402
from bench.scenario import BenchFailed, ChatBench, Options  # noqa: E402
from bench.serverprocess import UVICORN_WS, ServerProcess  # noqa: E402

DEFAULT_DATABASE = ROOT / "var" / "soak.sqlite3"
CHUNK_S = 15.0  # seconds of sending per checked chunk; a progress line after each
SAMPLE_EVERY_S = 5.0  # RSS sampling interval
MAX_RSS_GROWTH_PCT = 10.0
RESUME_WS_PATH = "/ws/rooms/{slug}/?after={after}"
VMRSS = re.compile(r"^VmRSS:\s+(\d+) kB", re.M)


def rss_mib(server: ServerProcess) -> float | None:
    """Resident memory now (VmRSS), not the peak that ServerProcess.peak_rss_mib reads."""
    try:
        status = Path(f"/proc/{server.proc.pid}/status").read_text()
    except (OSError, AttributeError):
        return None
    match = VMRSS.search(status)
    return round(int(match.group(1)) / 1024, 1) if match else None


def fmt_or_dash(value) -> str:
    return "-" if value is None else str(value)


def growth_pct(before: float | None, after: float | None) -> float | None:
    if before is None or after is None or before <= 0:
        return None
    return round(100 * (after - before) / before, 2)


def slope_mib_per_min(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, MiB): whether memory still climbs, beyond two end points."""
    if len(points) < 3:
        return None
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_m = sum(m for _, m in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return None
    return round(60 * sum((t - mean_t) * (m - mean_m) for t, m in points) / var, 3)


def chunk_plan(seconds: float) -> list[float]:
    """`seconds` cut into CHUNK_S pieces, the last one shorter (never under 1 s)."""
    chunks = [CHUNK_S] * int(seconds // CHUNK_S)
    rest = seconds - sum(chunks)
    if rest >= 1.0 or not chunks and rest > 0:
        chunks.append(rest)
    elif rest > 0:
        chunks[-1] += rest
    return chunks


def acknowledged(raw: StepRaw) -> int:
    """Sends whose sender got its own message frame back: the protocol's acknowledgement."""
    by_sender: defaultdict[int, list[int]] = defaultdict(list)
    for number, index in raw.sender_of.items():
        by_sender[index].append(number)
    return sum(len(set(numbers).intersection(raw.received[index])) for index, numbers in by_sender.items())


class Soak(ChatBench):
    """chatbench with one long run of checked chunks in place of its rate steps."""

    def __init__(self, options: Options, say, minutes: float) -> None:
        super().__init__(options, say)
        self.minutes = minutes

    # -- the load --------------------------------------------------------------

    async def run_steps(self, phase: dict, servers, rooms, sockets: list) -> None:
        o = self.options
        loop = asyncio.get_running_loop()
        phase["senders_per_room"] = [len(s) for s in self.pick_senders(sockets, len(rooms))]
        known_last_seq = [0] * len(rooms)  # fresh rooms
        self.soak = soak = {
            "samples": [],  # {"t": seconds since the load began, "rss_mib": [per process]}
            "rss_after_warmup_mib": None,
            "rss_end_mib": None,
            "chunks": [],
            "closes": Counter(),
            "reconnects": 0,
            "reconnect_failures": Counter(),
            "latencies_ns": array("q"),  # after the warm-up
            "totals": Counter(),
            "load_s": None,
        }
        start = loop.time()

        def sample() -> list[float | None]:
            rss = [rss_mib(s) for s in servers]
            soak["samples"].append({"t": round(loop.time() - start, 1), "rss_mib": rss})
            return rss

        async def sampler() -> None:
            while True:
                sample()
                await asyncio.sleep(SAMPLE_EVERY_S)

        task = asyncio.create_task(sampler())
        plan = [("warm-up", s) for s in chunk_plan(o.warmup)] + [("soak", s) for s in chunk_plan(self.minutes * 60)]
        if not any(stage == "warm-up" for stage, _ in plan):
            soak["rss_after_warmup_mib"] = sample()
        try:
            for number, (stage, seconds) in enumerate(plan):
                self.remaining("the soak")
                await self.reopen_closed(servers, rooms, sockets, known_last_seq)
                step, raw = await self.measure(
                    phase, servers, rooms, sockets, known_last_seq, f"c{number}", o.rate, seconds
                )
                phase["steps"].append(step)
                self.count_chunk(stage, step, raw)
                rss = sample()
                if stage == "warm-up" and (number + 1 == len(plan) or plan[number + 1][0] != "warm-up"):
                    soak["rss_after_warmup_mib"] = rss
                self.say(self.progress_line(loop.time() - start, stage, step, rss))
            await self.reopen_closed(servers, rooms, sockets, known_last_seq, reopen=False)  # closes at the end
            soak["rss_end_mib"] = sample()
        finally:
            task.cancel()
            soak["load_s"] = round(loop.time() - start, 1)

    async def reopen_closed(self, servers, rooms, sockets: list, known_last_seq: list[int], reopen=True) -> None:
        """Count the sockets that closed; reconnect them (resuming, as a browser would) to keep the load whole."""
        soak = self.soak
        for i, sock in enumerate(sockets):
            if sock is None or sock.is_open:
                continue
            soak["closes"][str(sock.close_code)] += 1
            sock.close()
            sockets[i] = None  # counted once; if it cannot reconnect it drops out
            if not reopen:
                continue
            room, _, server, sid = self.targets[i]
            try:
                sockets[i] = await self.open_member_socket(
                    server, sid, RESUME_WS_PATH.format(slug=rooms[room], after=known_last_seq[room]), room
                )
                soak["reconnects"] += 1
            except (OSError, HandshakeError, TimeoutError) as error:
                soak["reconnect_failures"][f"{type(error).__name__}: {error}"[:160]] += 1

    def count_chunk(self, stage: str, step: dict, raw: StepRaw) -> None:
        soak = self.soak
        acked = acknowledged(raw)
        totals = soak["totals"]
        for key in (
            "sent", "not_sent", "stored", "send_errors", "expected", "delivered", "lost", "duplicates",
            "stray", "seq_gaps", "stored_duplicates",
        ):  # fmt: skip
            totals[key] += step[key]
        totals["acknowledged"] += acked
        totals["unanswered"] += max(0, step["unanswered"])
        totals["not_drained"] += not step["drained"]
        for code, count in step["send_errors_by_code"].items():
            totals[f"refused:{code}"] += count
        if stage == "soak":
            soak["latencies_ns"].extend(raw.recorder.latencies_ns)
        soak["chunks"].append(
            {
                "stage": stage,
                "seconds": step["send_window_s"],
                "sent": step["sent"],
                "acknowledged": acked,
                "stored": step["stored"],
                "delivered": step["delivered"],
                "lost": step["lost"],
                "duplicates": step["duplicates"],
                "send_errors": step["send_errors"],
                "p99_ms": step["p99_ms"],
                "server_cpu_pct_by_process": step["server_cpu_pct_by_process"],
                # CPU that neither the servers nor this client used: other work on the machine skews everything.
                "other_cpu_pct": step.get("other_cpu_pct"),
            }
        )

    def progress_line(self, elapsed: float, stage: str, step: dict, rss: list[float | None]) -> str:
        t = self.soak["totals"]
        closes = sum(self.soak["closes"].values())
        cpu = "/".join(f"{v:.0f}" if v is not None else "-" for v in step["server_cpu_pct_by_process"])
        other = fmt_or_dash(step.get("other_cpu_pct"))
        memory = " / ".join(f"{v:.1f}" if v else "-" for v in rss)
        return (
            f"[{elapsed:6.1f} s] {stage:<7} sent {t['sent']:>6} ack {t['acknowledged']:>6} "
            f"delivered {t['delivered']:>8} missing {t['lost']} dup {t['duplicates']} "
            f"refused {t['send_errors']} closes {closes} | chunk p99 {step['p99_ms']} ms, "
            f"CPU% {cpu} (other {other}) | RSS MiB {memory}"
        )

    # -- the verdict -------------------------------------------------------------

    def finish_report(self) -> None:
        report = self.report
        phase = report["main"] or {}
        soak = getattr(self, "soak", None) or {"totals": Counter(), "closes": Counter(), "samples": []}
        t = soak["totals"]
        servers = [s for s in self.servers if s.name.startswith("main-")]
        names = [s.name for s in servers]
        before = soak.get("rss_after_warmup_mib") or [None] * len(names)
        end = soak.get("rss_end_mib") or [None] * len(names)
        warmup = self.options.warmup
        after = [s["rss_mib"] for s in soak["samples"] if s["t"] >= warmup]
        rss = []
        for k, name in enumerate(names):
            points = [(s["t"], s["rss_mib"][k]) for s in soak["samples"] if s["t"] >= warmup and s["rss_mib"][k]]
            rss.append(
                {
                    "process": name,
                    "after_warmup_mib": before[k],
                    "end_mib": end[k],
                    "max_after_warmup_mib": max((r[k] for r in after if r[k] is not None), default=None),
                    "growth_pct": growth_pct(before[k], end[k]),
                    "slope_mib_per_min": slope_mib_per_min(points),
                }
            )
        latencies = sorted(soak.get("latencies_ns", []))
        ms = lambda q: None if not latencies else round(percentile(latencies, q) / 1e6, 2)  # noqa: E731
        log_errors = {
            name: {k: v for k, v in found.items() if k in ("Traceback", "ERROR")}
            for name, found in (phase.get("log_warnings") or {}).items()
            if "Traceback" in found or "ERROR" in found
        }
        closes = sum(soak["closes"].values())
        reasons = []
        if report["aborted"]:
            reasons.append(f"aborted: {report['aborted']}")
        if phase.get("sockets_connected", 0) < self.options.sockets:
            reasons.append(f"only {phase.get('sockets_connected', 0)}/{self.options.sockets} sockets connected")
        if t["lost"] or t["seq_gaps"] or t["unanswered"] or t["not_sent"]:
            reasons.append(
                f"loss: {t['lost']} missing deliveries, {t['seq_gaps']} seq gaps, "
                f"{t['unanswered']} sends unanswered, {t['not_sent']} not sent (socket closed)"
            )
        if t["duplicates"] or t["stored_duplicates"] or t["stray"]:
            reasons.append(
                f"duplicates: {t['duplicates']} delivered twice, {t['stored_duplicates']} stored twice, "
                f"{t['stray']} stray"
            )
        if t["send_errors"]:
            reasons.append(f"{t['send_errors']} sends refused")
        if closes or soak.get("reconnect_failures"):
            reasons.append(f"{closes} socket(s) closed {dict(soak['closes'])}")
        if log_errors:
            reasons.append(f"errors in server logs: {log_errors}")
        if t["acknowledged"] != t["sent"]:
            reasons.append(f"{t['sent'] - t['acknowledged']} sends not acknowledged")
        for r in rss:
            if r["growth_pct"] is None:
                reasons.append(f"no RSS figures for {r['process']}")
            elif r["growth_pct"] >= MAX_RSS_GROWTH_PCT:
                reasons.append(f"{r['process']} RSS grew {r['growth_pct']}% (limit {MAX_RSS_GROWTH_PCT:g}%)")
        passed = not reasons

        o = self.options
        figures = {
            "run_id": report["run_id"],
            "started_at": report["started_at"],
            "passed": passed,
            "fail_reasons": reasons,
            "config": {
                **report["config"],
                "minutes": self.minutes,
                "warmup_s": warmup,
                "chunk_s": CHUNK_S,
                "sample_every_s": SAMPLE_EVERY_S,
                "max_rss_growth_pct": MAX_RSS_GROWTH_PCT,
            },
            "setup": report["setup"],
            "elapsed_s": report.get("elapsed_s"),
            "load_s": soak.get("load_s"),
            "chunks_checked": len(soak.get("chunks", [])),
            **{k: t[k] for k in ("sent", "acknowledged", "stored", "not_sent", "unanswered", "send_errors")},
            "send_errors_by_code": {k.split(":", 1)[1]: v for k, v in t.items() if k.startswith("refused:")},
            **{k: t[k] for k in ("expected", "delivered", "lost", "duplicates", "stray", "seq_gaps")},
            "stored_duplicates": t["stored_duplicates"],
            "not_drained_chunks": t["not_drained"],
            "closes": dict(soak["closes"]),
            "reconnects": soak.get("reconnects", 0),
            "reconnect_failures": dict(soak.get("reconnect_failures", {})),
            "server_log_errors": log_errors,
            "server_log_warnings": phase.get("log_warnings") or {},
            "latency_after_warmup_ms": {
                "samples": len(latencies),
                "p50": ms(0.50),
                "p95": ms(0.95),
                "p99": ms(0.99),
                "max": ms(1.0),
            },
            "rss": rss,
            "rss_samples": soak["samples"],
            "chunks": soak.get("chunks", []),
            "aborted": report["aborted"],
        }
        self.figures = figures
        self.say(self.summary(figures))
        if o.json_path:
            Path(o.json_path).write_text(json.dumps(figures, indent=2) + "\n")
            self.say(f"JSON: {o.json_path}")

    def summary(self, f: dict) -> str:
        c = f["config"]
        lat = f["latency_after_warmup_ms"]
        refused = f" {f['send_errors_by_code']}" if f["send_errors_by_code"] else ""
        cpu = self.mean_cpu_after_warmup()
        lines = [
            "",
            f"soak {f['run_id']}: {c['server']} x{c['processes']}, {c['sockets']} sockets in {c['rooms']} room(s), "
            f"{c['rate_per_room']:g} msg/s per room from {c['senders_per_room']} senders each; "
            f"{c['warmup_s']:g} s warm-up + {c['minutes']:g} min; load {f['load_s']} s, {f['elapsed_s']} s in all",
            f"messages:   sent {f['sent']}, acknowledged {f['acknowledged']}, stored {f['stored']}, "
            f"unanswered {f['unanswered']}, not sent {f['not_sent']}",
            f"deliveries: expected {f['expected']}, delivered {f['delivered']}, missing {f['lost']}, "
            f"duplicated {f['duplicates']}, stray {f['stray']}; stored seq gaps {f['seq_gaps']}, "
            f"stored twice {f['stored_duplicates']} ({f['chunks_checked']} chunks checked, "
            f"{f['not_drained_chunks']} not drained)",
            f"errors:     refused sends {f['send_errors']}{refused}, closes {sum(f['closes'].values())}"
            f"{' ' + str(f['closes']) if f['closes'] else ''}, reconnects {f['reconnects']}, "
            f"server log errors {f['server_log_errors'] or 0}",
            f"latency after warm-up: p50 {lat['p50']} ms, p95 {lat['p95']} ms, p99 {lat['p99']} ms, "
            f"max {lat['max']} ms ({lat['samples']} deliveries)",
            f"server CPU after warm-up: {cpu}",
            f"{'RSS MiB':<22} {'after warm-up':>13} {'end':>8} {'max':>8} {'growth':>8} {'slope MiB/min':>14}",
        ]
        for r in f["rss"]:
            growth = "-" if r["growth_pct"] is None else f"{r['growth_pct']:+.1f}%"
            lines.append(
                f"{r['process']:<22} {fmt_or_dash(r['after_warmup_mib']):>13} {fmt_or_dash(r['end_mib']):>8} "
                f"{fmt_or_dash(r['max_after_warmup_mib']):>8} {growth:>8} {fmt_or_dash(r['slope_mib_per_min']):>14}"
            )
        if f["server_log_warnings"]:
            lines.append(f"server logs with warnings: {f['server_log_warnings']}")
        verdict = "PASS" if f["passed"] else "FAIL: " + "; ".join(f["fail_reasons"])
        lines.append(
            f"{verdict}  (RSS growth < {MAX_RSS_GROWTH_PCT:g}% after warm-up, no errors, no loss, no duplicates)"
        )
        return "\n".join(lines)

    def mean_cpu_after_warmup(self) -> str:
        chunks = [c for c in getattr(self, "soak", {}).get("chunks", []) if c["stage"] == "soak"]
        if not chunks:
            return "-"
        per_process = zip(*(c["server_cpu_pct_by_process"] for c in chunks), strict=True)
        means = [sum(v or 0 for v in values) / len(chunks) for values in per_process]
        return " / ".join(f"{m:.0f}%" for m in means) + " of one core per process"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="minutes of load after the warm-up (5)")
    parser.add_argument("--warmup", type=float, default=60.0, help="seconds of load before RSS is taken (60)")
    parser.add_argument("--sockets", type=int, default=100, help="WebSockets in all (100)")
    parser.add_argument("--rooms", type=int, default=4, help="rooms, the sockets spread evenly (4)")
    parser.add_argument("--rate", type=float, default=10.0, help="messages per second PER ROOM (10)")
    parser.add_argument("--senders", type=int, default=10, help="sockets per room that send, sharing its rate (10)")
    parser.add_argument("--server", choices=[*UVICORN_WS, "daphne"], default="uvicorn", help="(uvicorn)")
    parser.add_argument("--processes", type=int, default=2, help="server processes (2)")
    parser.add_argument(
        "--database-url", default=None, help="the servers' database (a fresh var/soak.sqlite3 each run)"
    )
    parser.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    parser.add_argument("--max-seconds", type=float, default=None, help="hard cap (the load plus 180 s)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.minutes <= 0 or args.warmup < 0:
        raise SystemExit("--minutes must be positive and --warmup not negative.")
    database_url = args.database_url
    if database_url is None:
        # Throwaway: the same empty start every run, whatever an earlier run left.
        DEFAULT_DATABASE.parent.mkdir(parents=True, exist_ok=True)
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(f"{DEFAULT_DATABASE}{suffix}").unlink(missing_ok=True)
        database_url = f"sqlite:///{DEFAULT_DATABASE}"
    load_s = args.warmup + args.minutes * 60
    options = Options(
        server=args.server,
        processes=args.processes,
        sockets=args.sockets,
        rooms=args.rooms,
        senders=args.senders,
        rate=args.rate,
        duration=CHUNK_S,
        warmup=args.warmup,
        database_url=database_url,
        user_prefix="soak",
        json_path=args.json,
        max_seconds=args.max_seconds or load_s + 180,
    )
    try:
        soak = Soak(options, lambda text: print(text, flush=True), minutes=args.minutes)
        soak.execute()
    except BenchFailed as error:
        print(f"soak: {error}", file=sys.stderr)
        return 1
    return 0 if getattr(soak, "figures", {}).get("passed") else 1


if __name__ == "__main__":
    sys.exit(main())
