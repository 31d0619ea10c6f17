"""The long-poll scenario: hold N concurrent long-polls on one server process, then wake them all with one message.

On 127.0.0.1 only, bounded in count and time: migrate the bench database,
start one server process (DEBUG off, Redis layer under a per-run prefix), sign
a user up through the site's forms and create a room, open N long-polls
(`GET /api/rooms/<slug>/poll?timeout=...`, session cookie, one connection
each) and wait until the server holds them all, then post ONE message through
the API. The result says how many polls answered with that message, the
latency from the post to each answer, and the server's threads, open files,
RSS and CPU while holding the polls.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from django.conf import settings

from bench.client import long_poll, post_message
from bench.report import CLK_TCK, LOOP_STEPS, percentile, proc_status, python_loop_ms
from bench.scenario import (
    MAIN_APP,
    BenchFailed,
    SiteSession,
    create_room,
    log_dir,
    migrate,
    new_run_id,
    server_env,
    sign_in,
)
from bench.serverprocess import ServerFailed, ServerProcess

MAX_POLLS = 5000
SERVER_START_TIMEOUT = 20.0
T = TypeVar("T")


def run_polls(
    *, polls: int, server: str, hold: float, database_url: str, max_seconds: float, say: Callable[[str], None]
) -> dict:
    """Set up one server, a user and a room, and measure `polls` long-polls woken by one post."""
    if not 1 <= polls <= MAX_POLLS:
        raise BenchFailed(f"--polls must be from 1 to {MAX_POLLS}.")
    deadline = time.monotonic() + max_seconds
    run_id = new_run_id()
    env = server_env(database_url=database_url, run_id=run_id)
    env["CHAT_API_REQUESTS_PER_MINUTE"] = str(polls * 10)
    loop_ms = python_loop_ms()
    say(f"machine: a {LOOP_STEPS:,}-step Python loop takes {loop_ms:g} ms (slower machines give worse figures)")
    say(f"migrate: {database_url}")
    migrate(env, timeout=min(180.0, deadline - time.monotonic()))
    process = ServerProcess("poll-1", server, MAIN_APP, env, log_dir() / f"pollbench-{run_id}.log")
    process.spawn()
    try:
        process.wait_ready(SERVER_START_TIMEOUT)
        site, _ = sign_in(process, f"poller-{run_id}", secrets.token_urlsafe(12), timeout=10)
        slug = f"polls-{run_id}"
        create_room(site, slug, f"Polls {run_id}")
        return {"python_loop_ms": loop_ms, **asyncio.run(measure(process, site, slug, polls, hold, say))}
    except ServerFailed as error:
        raise BenchFailed(str(error)) from None
    finally:
        process.stop()


async def measure(process: ServerProcess, site: SiteSession, slug: str, polls: int, hold: float, say) -> dict:
    path = f"/api/rooms/{slug}/poll?after=0&timeout=30"
    cookie = site.cookie_header
    idle = proc_status(process.proc.pid)
    say(f"server {process.kind} pid {process.proc.pid} idle: {idle}")
    opened_at = time.monotonic()
    setup_ticks = process.cpu_ticks()  # from the first poll: the server starts on them while the rest open
    tasks = await open_in_bursts(polls, lambda: long_poll(process.port, path, cookie))
    say(f"opened {polls} polls; waiting until the server is idle (all of them waiting)")
    await server_idle(process, opened_at)
    cpu_s = (process.cpu_ticks() - setup_ticks) / CLK_TCK
    setup = {
        "seconds": round(time.monotonic() - opened_at, 1),
        "cpu_s": cpu_s,
        "cpu_ms_per_poll": round(cpu_s * 1000 / polls, 2),
    }
    say(f"set up: {setup}; holding {hold:.0f} s")
    ticks_before = process.cpu_ticks()
    await asyncio.sleep(hold)
    early = sum(task.done() for task in tasks)
    holding = proc_status(process.proc.pid)
    say(f"holding: {holding}, answered early: {early}")

    csrf = site.cookies.get(settings.CSRF_COOKIE_NAME, "")
    body = json.dumps({"body": "wake up", "nonce": "pollbench"})
    posted_at = time.monotonic()
    status = await asyncio.to_thread(post_message, process.port, slug, cookie, csrf, body)
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 40)
    ticks_after = process.cpu_ticks()
    woken = [r for r in results if not isinstance(r, BaseException) and r[0] == 200 and r[1].get("messages")]
    latencies = sorted((answered - posted_at) * 1000 for _, _, answered in woken)
    failures = [repr(r) if isinstance(r, BaseException) else r[0] for r in results if r not in woken]
    floor = await request_floor(process, polls, cookie)
    say(f"the same number of requests that do nothing: {floor}")
    rounded = lambda ms: None if ms is None else round(ms, 1)  # noqa: E731
    return {
        "server": process.kind,
        "polls": polls,
        "post_status": status,
        "answered_with_the_message": len(woken),
        "answered_early": early,
        "failed": len(failures),
        "failure_examples": failures[:5],
        "latency_ms": {
            "p50": rounded(percentile(latencies, 0.50)),
            "p99": rounded(percentile(latencies, 0.99)),
            "max": rounded(latencies[-1] if latencies else None),
        },
        "server_idle": idle,
        "server_holding": holding,
        "setup": setup,
        "server_cpu_s_hold_and_wake": round((ticks_after - ticks_before) / CLK_TCK, 2),
        "floor": floor,
    }


async def open_in_bursts(count: int, request: Callable[[], Awaitable[T]]) -> list[asyncio.Future[T]]:
    """Start `count` requests, 100 at a time: the server accepts in bursts, no need to flood its backlog."""
    tasks = []
    for i in range(count):
        tasks.append(asyncio.ensure_future(request()))
        if i % 100 == 99:
            await asyncio.sleep(0.05)
    return tasks


async def server_idle(process: ServerProcess, since: float) -> None:
    """Return once the server has used at most 2 ticks of CPU in half a second (or after a minute)."""
    while True:
        ticks = process.cpu_ticks()
        await asyncio.sleep(0.5)
        if process.cpu_ticks() - ticks <= 2 or time.monotonic() - since > 60:
            return


async def request_floor(process: ServerProcess, count: int, cookie: str) -> dict:
    """The server's CPU per request for `count` requests that do nothing, opened as the polls were.

    Each is a GET of an API path that does not exist, with the same cookie: the
    JSON 404 passes the whole middleware stack and reads nothing. What a poll's
    setup costs beyond it is the poll's own work.
    """
    started_at = time.monotonic()
    ticks = process.cpu_ticks()
    tasks = await open_in_bursts(count, lambda: long_poll(process.port, "/api/pollbench-floor", cookie))
    statuses = [status for status, _, _ in await asyncio.gather(*tasks)]
    await server_idle(process, started_at)
    cpu_s = (process.cpu_ticks() - ticks) / CLK_TCK
    return {
        "path": "/api/pollbench-floor",
        "not_404": len(statuses) - statuses.count(404),
        "cpu_ms_per_request": round(cpu_s * 1000 / count, 2),
    }
