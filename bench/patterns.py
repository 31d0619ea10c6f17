"""What each messaging pattern costs, read off the patterns page (docs/messaging-patterns.md).

    .venv/bin/python bench/patterns.py [--idle 60] [--busy 60] [--rate 5] [--interval 3]
                                       [--server uvicorn|daphne] [--json FILE]

One server process (production-like: DEBUG off, the Redis channel layer under
a per-run prefix) on a throwaway SQLite database (var/patterns.sqlite3), and
headless Chromium (/usr/bin/chromium, or E2E_CHROMIUM) signed in as a viewer.
For each pattern in turn the viewer opens /rooms/<slug>/patterns/?panels=<it>
alone, so the server's CPU is that pattern's, and the script reads the page's
own figures (the panel's data-* attributes) and the server's CPU from /proc:

1. idle for --idle seconds: requests (or frames) per minute, server CPU
   (also measured once with no page open: the server's own idle work);
2. busy for --busy seconds while a bot posts --rate messages a second through
   the API: requests per minute, the panel's median and p95 delay, and the
   server's CPU per delivered message: the busy run's CPU less what the posts
   cost alone (a busy run with no page open, measured first) and less what
   following the quiet room cost over the same time (step 1), per message.

Everything is on 127.0.0.1 and stops by itself (the total is about
3 × (idle + busy) + busy seconds, plus start-up).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import secrets
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATABASE = ROOT / "var" / "patterns.sqlite3"
sys.path.insert(0, str(ROOT))
os.environ["DJANGO_SETTINGS_MODULE"] = "chatsite.settings"
os.environ["DATABASE_URL"] = f"sqlite:///{DATABASE}"
os.environ.setdefault("SECRET_KEY", "patterns-bench-only-" + "0" * 32)

import django  # noqa: E402

django.setup()

from django.conf import settings  # noqa: E402
from django.contrib.auth import get_user_model  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.test import Client  # noqa: E402
from playwright.async_api import async_playwright  # noqa: E402

from bench.serverprocess import ServerProcess  # noqa: E402
from chat import services  # noqa: E402

CHROMIUM = os.environ.get("E2E_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip
PATTERNS = {"short": "short polling", "long": "long-poll", "socket": "WebSocket"}
TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--idle", type=float, default=60, help="seconds of a quiet room per pattern (60)")
    parser.add_argument("--busy", type=float, default=60, help="seconds of a busy room per pattern (60)")
    parser.add_argument("--rate", type=float, default=5, help="messages a second while busy (5)")
    parser.add_argument("--interval", type=float, default=3, help="the short-poll interval, seconds (3)")
    parser.add_argument("--server", default="uvicorn", choices=["uvicorn", "daphne"])
    parser.add_argument("--json", help="also write the figures to this file")
    options = parser.parse_args()
    if not os.access(CHROMIUM, os.X_OK):
        sys.exit(f"No Chromium at {CHROMIUM}: apt-get install chromium (or set E2E_CHROMIUM).")
    slug, viewer_cookie, bot_token = prepare_database()
    results = asyncio.run(run(options, slug, viewer_cookie, bot_token))
    print_table(results, options)
    if options.json:
        Path(options.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"Figures written to {options.json}.")


async def run(options, slug: str, viewer_cookie: str, bot_token: str) -> dict:
    env = {
        **os.environ,
        "DEBUG": "0",
        "ALLOWED_HOSTS": "127.0.0.1",
        "CHANNEL_LAYER": "redis",
        "CHANNEL_LAYER_PREFIX": f"patterns-{secrets.token_hex(4)}:",
        "REDIS_URL": settings.REDIS_URL,
        "PYTHONUNBUFFERED": "1",
        # The bot posts faster than a person may: the limits are not what is measured here.
        "CHAT_MESSAGE_RATE_LIMIT": "1000000",
        "CHAT_API_WRITES_PER_MINUTE": "1000000",
        "CHAT_API_REQUESTS_PER_MINUTE": "1000000",
    }
    log_dir = ROOT / "var" / "bench-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    server = ServerProcess("patterns", options.server, "chatsite.asgi:application", env, log_dir / "patterns.log")
    server.spawn()
    try:
        await asyncio.to_thread(server.wait_ready, 30)
        bot = Bot(server, slug, bot_token)
        say(f"server {options.server} at {server.origin}; no page, idle {options.idle:.0f} s ...")
        ticks = server.cpu_ticks()
        await asyncio.sleep(options.idle)
        server_idle = (server.cpu_ticks() - ticks) / TICKS_PER_SECOND * 1000 * 60 / options.idle
        say(f"no page, posts alone, {options.busy:.0f} s ...")
        posts_alone = await busy(server, bot, options, page=None)
        results = {
            "server_idle_cpu_ms_per_minute": round(server_idle, 1),
            "posts_alone_cpu_ms_per_message": posts_alone["cpu_ms_per_message"],
            "patterns": {},
        }
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            context = await browser.new_context()
            await context.add_cookies(
                [{"name": settings.SESSION_COOKIE_NAME, "value": viewer_cookie, "url": server.origin}]
            )
            for pattern in PATTERNS:
                page = await context.new_page()
                await page.goto(f"{server.origin}/rooms/{slug}/patterns/?panels={pattern}&interval={options.interval}")
                panel = page.locator(f".pattern-panel[data-pattern='{pattern}']")
                await panel.locator(".connection[data-state='live'], .connection[data-state='polling']").wait_for()
                await asyncio.sleep(2)  # settled: the page's first requests are not the pattern's steady cost
                say(f"{PATTERNS[pattern]}: idle {options.idle:.0f} s ...")
                idle = await quiet(server, panel, options)
                say(f"{PATTERNS[pattern]}: busy {options.busy:.0f} s at {options.rate:g} msg/s ...")
                loud = await busy(server, bot, options, page=panel)
                # What delivering cost on top of the posts themselves and of following a quiet room.
                following = idle["server_cpu_ms_per_minute"] * loud["seconds"] / 60
                posting = posts_alone["cpu_ms_per_message"] * loud["posted"]
                loud["server_cpu_ms_per_delivery"] = round(
                    (loud["cpu_ms"] - posting - following) / max(1, loud["delivered"]), 2
                )
                idle["following_cpu_ms_per_minute"] = round(idle["server_cpu_ms_per_minute"] - server_idle, 1)
                results["patterns"][pattern] = {"idle": idle, "busy": loud}
                await page.close()
            await browser.close()
        return results
    finally:
        server.stop()


def prepare_database() -> tuple[str, str, str]:
    """A fresh database with a room, a viewer (signed in by cookie) and a bot (an API token)."""
    DATABASE.unlink(missing_ok=True)
    call_command("migrate", verbosity=0)
    call_command("collectstatic", interactive=False, verbosity=0)  # DEBUG off: WhiteNoise serves STATIC_ROOT
    User = get_user_model()
    viewer = User.objects.create_user("viewer")
    bot = User.objects.create_user("bot")
    room = services.room_create(slug="patterns", name="Patterns", created_by=viewer)
    _, secret = services.token_create(user=bot, name="patterns bench")
    browser = Client()
    browser.force_login(viewer)
    return room.slug, browser.cookies[settings.SESSION_COOKIE_NAME].value, secret


class Bot:
    """Posts through the API with a token, as a script would."""

    def __init__(self, server: ServerProcess, slug: str, token: str) -> None:
        self.server, self.slug, self.token = server, slug, token
        self.sent = 0

    def post(self) -> None:
        self.sent += 1
        body = json.dumps({"body": f"bench message {self.sent}", "nonce": f"bench-{secrets.token_hex(8)}"})
        conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=10)
        try:
            conn.request(
                "POST",
                f"/api/rooms/{self.slug}/messages",
                body=body,
                headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
            )
            response = conn.getresponse()
            response.read()
            if response.status != 201:
                raise RuntimeError(f"posting answered {response.status}")
        finally:
            conn.close()


async def figures(panel) -> dict:
    """The panel's own counters and delay statistics."""
    data = await panel.evaluate("element => ({...element.dataset})")
    return {
        "requests": int(data.get("requests") or 0),
        "frames": int(data["frames"]) if "frames" in data else None,
        "messages": int(data.get("messages") or 0),
        "median_ms": float(data["medianMs"]) if data.get("medianMs") else None,
        "p95_ms": float(data["p95Ms"]) if data.get("p95Ms") else None,
    }


def per_minute(count: int | None, seconds: float) -> float | None:
    return None if count is None else round(count * 60 / seconds, 1)


def grown(after: dict, before: dict, key: str) -> int | None:
    return None if after[key] is None else after[key] - before[key]


async def quiet(server: ServerProcess, panel, options) -> dict:
    before, ticks, started = await figures(panel), server.cpu_ticks(), time.monotonic()
    await asyncio.sleep(options.idle)
    after, seconds = await figures(panel), time.monotonic() - started
    return {
        "requests_per_minute": per_minute(after["requests"] - before["requests"], seconds),
        "frames_per_minute": per_minute(after["frames"] - before["frames"], seconds)
        if after["frames"] is not None
        else None,
        "server_cpu_ms_per_minute": round((server.cpu_ticks() - ticks) / TICKS_PER_SECOND * 1000 * 60 / seconds, 1),
    }


async def busy(server: ServerProcess, bot: Bot, options, page) -> dict:
    """Post at the rate for the duration; with a page, wait until it shows every message."""
    before = await figures(page) if page is not None else None
    ticks, started = server.cpu_ticks(), time.monotonic()
    count = int(options.busy * options.rate)
    for n in range(count):
        await asyncio.sleep(max(0.0, started + n / options.rate - time.monotonic()))
        await asyncio.to_thread(bot.post)
    await asyncio.sleep(max(0.0, started + options.busy - time.monotonic()))
    result = {"posted": count}
    if page is not None:
        deadline = time.monotonic() + options.interval + 10
        while (now := await figures(page))["messages"] - before["messages"] < count and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        seconds = time.monotonic() - started
        result.update(
            delivered=now["messages"] - before["messages"],
            requests_per_minute=per_minute(now["requests"] - before["requests"], seconds),
            frames_per_minute=per_minute(now["frames"] - before["frames"], seconds)
            if now["frames"] is not None
            else None,
            median_ms=now["median_ms"],
            p95_ms=now["p95_ms"],
        )
    cpu_ms = (server.cpu_ticks() - ticks) / TICKS_PER_SECOND * 1000
    result["seconds"] = round(time.monotonic() - started, 2)
    result["cpu_ms"] = round(cpu_ms, 1)
    result["cpu_ms_per_message"] = round(cpu_ms / max(1, count), 2)
    return result


def print_table(results: dict, options) -> None:
    print()
    print(f"Idle, then {options.rate:g} msg/s posted through the API; short-poll interval {options.interval:g} s.")
    print(
        f"Server CPU with no page open: {results['server_idle_cpu_ms_per_minute']} ms a minute idle, "
        f"{results['posts_alone_cpu_ms_per_message']} ms per message posted."
    )
    header = (
        f"{'pattern':<14}{'idle req/min':>13}{'busy req/min':>13}{'frames/min':>11}"
        f"{'median ms':>10}{'p95 ms':>8}{'follow ms/min':>16}{'CPU ms/delivery':>16}{'delivered':>10}"
    )
    print(header)
    for pattern, figures_ in results["patterns"].items():
        idle, loud = figures_["idle"], figures_["busy"]
        frames = (
            f"{idle['frames_per_minute']:g}/{loud['frames_per_minute']:g}"
            if loud["frames_per_minute"] is not None
            else "–"
        )
        print(
            f"{PATTERNS[pattern]:<14}{idle['requests_per_minute']:>13}{loud['requests_per_minute']:>13}{frames:>11}"
            f"{loud['median_ms'] or '–':>10}{loud['p95_ms'] or '–':>8}{idle['following_cpu_ms_per_minute']:>16}"
            f"{loud['server_cpu_ms_per_delivery']:>16}{loud['delivered']:>6}/{loud['posted']}"
        )


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


if __name__ == "__main__":
    main()
