"""Measure how many concurrent long-polls one server process holds.

    python manage.py pollbench [--polls 1000] [--server daphne|uvicorn]

On 127.0.0.1 only, bounded in count and time: migrate the bench database,
start one server process (DEBUG off, Redis layer under a per-run prefix), sign
a user up through the site's forms and create a room, open N long-polls
(`GET /api/rooms/<slug>/poll?timeout=...`, session cookie, one connection
each) and wait until the server holds them all, then post ONE message through
the API. Report how many polls answered with that message, the latency from
the post to each answer, and the server's threads, open files, RSS and CPU
while holding the polls.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from bench.serverprocess import ServerFailed, ServerProcess
from chat.management.commands.chatbench import Command as ChatBench
from chat.management.commands.chatbench import create_room, sign_in

APP = "chatsite.asgi:application"


def proc_status(pid: int) -> dict[str, int]:
    """Threads, RSS (KiB) and open file descriptors of a process, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {
        "threads": int(fields["Threads"]),
        "rss_kib": int(fields["VmRSS"].split()[0]),
        "fds": len(list(Path(f"/proc/{pid}/fd").iterdir())),
    }


async def long_poll(port: int, path: str, cookie: str) -> tuple[int, dict, float]:
    """One GET on its own connection; returns (status, JSON body, monotonic time answered)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: {cookie}\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    raw = await reader.read()
    answered = time.monotonic()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head.lower():
        body = _unchunk(body)
    return status, json.loads(body or b"{}"), answered


def _unchunk(body: bytes) -> bytes:
    out = b""
    while body:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out, body = out + body[:size], body[size + 2 :]
    return out


class Command(BaseCommand):
    help = "Hold N concurrent long-polls on one server process and wake them all with one message."
    requires_system_checks = []

    def add_arguments(self, parser) -> None:
        parser.add_argument("--polls", type=int, default=1000, help="concurrent long-polls (1000)")
        parser.add_argument("--server", choices=["daphne", "uvicorn"], default="daphne", help="ASGI server (daphne)")
        parser.add_argument("--hold", type=float, default=3.0, help="seconds to hold the polls before posting (3)")
        parser.add_argument(
            "--database-url",
            default=f"sqlite:///{Path(settings.BASE_DIR) / 'var' / 'bench.sqlite3'}",
            help="the server's database; migrated first (var/bench.sqlite3)",
        )
        parser.add_argument("--max-seconds", type=float, default=180.0, help="hard cap on the whole run (180)")

    def handle(self, *args, polls: int, server: str, hold: float, **options) -> None:
        if not 1 <= polls <= 5000:
            raise CommandError("--polls must be from 1 to 5000.")
        run_id = time.strftime("%m%d%H%M%S") + secrets.token_hex(2)
        # The chat benchmark's setup: its environment, migrate, and servers on free ports.
        bench = ChatBench(stdout=self.stdout, stderr=self.stderr)
        bench.options = options
        bench.run_id = run_id
        bench.deadline = time.monotonic() + options["max_seconds"]
        bench.env = bench.server_env()
        bench.env["CHAT_API_REQUESTS_PER_MINUTE"] = str(polls * 10)
        bench.migrate()
        log_dir = Path(settings.BASE_DIR) / "var" / "bench-logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        process = ServerProcess("poll-1", server, APP, bench.env, log_dir / f"pollbench-{run_id}.log")
        process.spawn()
        try:
            process.wait_ready(20)
            site, _ = sign_in(process, f"poller-{run_id}", secrets.token_urlsafe(12), timeout=10)
            slug = f"polls-{run_id}"
            create_room(site, slug, f"Polls {run_id}")
            cookie = "; ".join(f"{name}={value}" for name, value in site.cookies.items())
            report = asyncio.run(self.measure(process, site, slug, cookie, polls, hold))
        except ServerFailed as error:
            raise CommandError(str(error)) from None
        finally:
            process.stop()
        self.stdout.write(json.dumps(report, indent=2))

    async def measure(self, process: ServerProcess, site, slug: str, cookie: str, polls: int, hold: float) -> dict:
        path = f"/api/rooms/{slug}/poll?after=0&timeout=30"
        idle = proc_status(process.proc.pid)
        self.stdout.write(f"server {process.kind} pid {process.proc.pid} idle: {idle}")
        tasks = []
        for i in range(polls):
            tasks.append(asyncio.ensure_future(long_poll(process.port, path, cookie)))
            if i % 100 == 99:
                await asyncio.sleep(0.05)  # the server accepts in bursts; no need to flood its backlog
        opened_at = time.monotonic()
        self.stdout.write(f"opened {polls} polls; waiting until the server is idle (all of them waiting)")
        setup_ticks = process.cpu_ticks()
        while True:  # the server is idle again once it has set every poll up
            ticks = process.cpu_ticks()
            await asyncio.sleep(0.5)
            if process.cpu_ticks() - ticks <= 2 or time.monotonic() - opened_at > 60:
                break
        setup = {"seconds": round(time.monotonic() - opened_at, 1), "cpu_s": (process.cpu_ticks() - setup_ticks) / 100}
        self.stdout.write(f"set up: {setup}; holding {hold:.0f} s")
        ticks_before = process.cpu_ticks()
        await asyncio.sleep(hold)
        early = sum(task.done() for task in tasks)
        holding = proc_status(process.proc.pid)
        self.stdout.write(f"holding: {holding}, answered early: {early}")

        csrf = site.cookies.get(settings.CSRF_COOKIE_NAME, "")
        body = json.dumps({"body": "wake up", "nonce": "pollbench"})
        posted_at = time.monotonic()
        status = await asyncio.to_thread(self.post, process.port, slug, cookie, csrf, body)
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 40)
        ticks_after = process.cpu_ticks()
        woken = [r for r in results if not isinstance(r, BaseException) and r[0] == 200 and r[1].get("messages")]
        latencies = sorted((answered - posted_at) * 1000 for _, _, answered in woken)
        failures = [repr(r) if isinstance(r, BaseException) else r[0] for r in results if r not in woken]
        return {
            "server": process.kind,
            "polls": polls,
            "post_status": status,
            "answered_with_the_message": len(woken),
            "answered_early": early,
            "failed": len(failures),
            "failure_examples": failures[:5],
            "latency_ms": {
                "p50": round(latencies[len(latencies) // 2], 1) if latencies else None,
                "p99": round(latencies[int(len(latencies) * 0.99) - 1], 1) if latencies else None,
                "max": round(latencies[-1], 1) if latencies else None,
            },
            "server_idle": idle,
            "server_holding": holding,
            "setup": setup,
            "server_cpu_s_hold_and_wake": round((ticks_after - ticks_before) / 100, 2),
        }

    @staticmethod
    def post(port: int, slug: str, cookie: str, csrf: str, body: str) -> int:
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        headers = {"Cookie": cookie, "X-CSRFToken": csrf, "Content-Type": "application/json"}
        headers["Origin"] = f"http://127.0.0.1:{port}"
        conn.request("POST", f"/api/rooms/{slug}/messages", body, headers)
        status = conn.getresponse().status
        conn.close()
        return status
