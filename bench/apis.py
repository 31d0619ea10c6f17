"""The JSON API's request/response latency: one client, one keep-alive connection, one request at a time.

On 127.0.0.1 only, bounded in count and time: migrate the bench database,
start one server process (as pollbench does), sign a user up through the
site's forms and create a room, then make `requests` requests of each kind in
turn: list the rooms, read a page of 50 messages, post a message, read one
message, a long-poll that answers at once, and read one message. For each kind: the latency
the client saw (p50, p99) and the server's CPU per request.
"""

from __future__ import annotations

import http.client
import itertools
import json
import secrets
import time
from collections.abc import Callable

from django.conf import settings

from bench.polls import SERVER_START_TIMEOUT
from bench.report import CLK_TCK, LOOP_STEPS, percentile, python_loop_ms
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

MAX_REQUESTS = 10_000


def run_api(*, requests: int, server: str, database_url: str, say: Callable[[str], None]) -> dict:
    if not 1 <= requests <= MAX_REQUESTS:
        raise BenchFailed(f"--requests must be from 1 to {MAX_REQUESTS}.")
    run_id = new_run_id()
    env = server_env(database_url=database_url, run_id=run_id)
    env["CHAT_API_REQUESTS_PER_MINUTE"] = env["CHAT_API_WRITES_PER_MINUTE"] = str(requests * 20)
    env["CHAT_MESSAGE_RATE_LIMIT"] = str(requests * 20)
    loop_ms = python_loop_ms()
    say(f"machine: a {LOOP_STEPS:,}-step Python loop takes {loop_ms:g} ms (slower machines give worse figures)")
    say(f"migrate: {database_url}")
    migrate(env, timeout=180.0)
    process = ServerProcess("api-1", server, MAIN_APP, env, log_dir() / f"apibench-{run_id}.log")
    process.spawn()
    try:
        process.wait_ready(SERVER_START_TIMEOUT)
        site, _ = sign_in(process, f"api-{run_id}", secrets.token_urlsafe(12), timeout=10)
        slug = f"api-{run_id}"
        create_room(site, slug, f"API {run_id}")
        return {"python_loop_ms": loop_ms, "server": server, **measure(process, site, slug, requests, say)}
    except ServerFailed as error:
        raise BenchFailed(str(error)) from None
    finally:
        process.stop()


def measure(process: ServerProcess, site: SiteSession, slug: str, requests: int, say: Callable[[str], None]) -> dict:
    connection = http.client.HTTPConnection("127.0.0.1", process.port, timeout=30)
    headers = {
        "Cookie": site.cookie_header,
        "X-CSRFToken": site.cookies.get(settings.CSRF_COOKIE_NAME, ""),
        "Origin": process.origin,
        "Content-Type": "application/json",
    }

    def call(method: str, path: str, body: dict | None = None) -> dict:
        connection.request(method, path, None if body is None else json.dumps(body), headers)
        response = connection.getresponse()
        data = response.read()
        if response.status not in (200, 201):
            raise BenchFailed(f"{method} {path} answered {response.status}: {data[:200]!r}")
        return json.loads(data)

    for n in range(50):  # a page to read
        call("POST", f"/api/rooms/{slug}/messages", {"body": f"page {n}", "nonce": f"page-{n}"})
    newest = call("GET", f"/api/rooms/{slug}/messages?limit=1")["messages"][-1]
    posted = itertools.count()
    kinds: dict[str, Callable[[], dict]] = {
        "GET /api/rooms/": lambda: call("GET", "/api/rooms/"),
        "GET messages (50)": lambda: call("GET", f"/api/rooms/{slug}/messages?limit=50"),
        "POST a message": lambda: call(
            "POST", f"/api/rooms/{slug}/messages", {"body": "hello", "nonce": f"n-{next(posted)}"}
        ),
        "GET poll (answers at once)": lambda: call("GET", f"/api/rooms/{slug}/poll?after={newest['seq'] - 1}"),
        "GET one message": lambda: call("GET", f"/api/rooms/{slug}/messages/{newest['id']}"),
    }
    results = {}
    for kind, request in kinds.items():
        request()  # warm
        latencies = []
        ticks = process.cpu_ticks()
        for _ in range(requests):
            started = time.perf_counter()
            request()
            latencies.append((time.perf_counter() - started) * 1000)
        cpu_ms = (process.cpu_ticks() - ticks) * 1000 / CLK_TCK
        latencies.sort()
        results[kind] = {
            "p50_ms": round(percentile(latencies, 0.50), 2),
            "p99_ms": round(percentile(latencies, 0.99), 2),
            "server_cpu_ms_per_request": round(cpu_ms / requests, 2),
        }
        say(
            f"{kind:28} p50 {results[kind]['p50_ms']:6.2f} ms  p99 {results[kind]['p99_ms']:6.2f} ms  "
            f"server CPU {results[kind]['server_cpu_ms_per_request']:.2f} ms per request"
        )
    connection.close()
    return {"requests_per_kind": requests, "kinds": results}
