"""Search latency at scale: GET /api/search/ against a million messages, one request at a time.

Run it with DATABASE_URL naming the database to search (seeded here when it
holds fewer messages than asked: `seeddemo --rooms R --messages M`, timed).
Then: the index is built again from scratch (`rebuild_search_index`, timed)
and its size read; one uvicorn process serves the site on that database; a
user who reads every room (the rooms are public, so the permission filter
still runs) searches over one keep-alive connection, `queries` times for each
kind of query. For each kind: p50, p95 and max latency as the client saw it,
and how many results a query found.
"""

from __future__ import annotations

import http.client
import json
import random
import time
from collections.abc import Callable
from urllib.parse import urlencode

from django.core.management import call_command
from django.db import connection

from bench.report import LOOP_STEPS, percentile, python_loop_ms
from bench.scenario import BenchFailed, log_dir, new_run_id, server_env
from bench.serverprocess import ServerFailed, ServerProcess
from chat import demo, search, services
from chat.models import Membership, Message, Room

SERVER_START_TIMEOUT = 30.0
MAX_QUERIES = 1000
COMMON = ["deploy", "coffee", "meeting", "review", "thanks"]
PHRASES = ['"coffee today"', '"ship review"', '"lunch later"']
EXCLUDING = ["deploy -coffee", "meeting -lunch -review"]


def run_search(
    *, rooms: int, messages: int, queries: int, private: int, database_url: str, say: Callable[[str], None]
) -> dict:
    if not 1 <= queries <= MAX_QUERIES:
        raise BenchFailed(f"--queries must be from 1 to {MAX_QUERIES}.")
    loop_ms = python_loop_ms()
    say(f"machine: a {LOOP_STEPS:,}-step Python loop takes {loop_ms:g} ms (slower machines give worse figures)")
    call_command("migrate", verbosity=0)
    result: dict = {"python_loop_ms": loop_ms, "database": connection.vendor}
    held = Message.objects.count()
    if held < messages:
        say(f"seeding {messages:,} messages over {rooms} rooms (the database holds {held:,})")
        started = time.monotonic()
        call_command("seeddemo", rooms=rooms, messages=messages, stdout=_Quiet())
        result["seed_seconds"] = round(time.monotonic() - started, 1)
    result["messages"] = Message.objects.count()
    say(f"building the index again from {result['messages']:,} messages")
    started = time.monotonic()
    search.rebuild()
    result["index_build_seconds"] = round(time.monotonic() - started, 1)
    result["index_mib"] = round(index_bytes() / 2**20, 1)
    say(f"index: {result['index_build_seconds']} s to build, {result['index_mib']} MiB")
    user = services.reserved_user("searchbench", active=True)
    _, secret = services.token_create(user=user, name="searchbench")
    readable = private_rooms(user, private)
    result["private_rooms"], result["member_of_private"] = private, (private + 1) // 2
    say(f"{private} of the rooms private, the searching user a member of {result['member_of_private']} of them")
    run_id = new_run_id()
    env = server_env(database_url=database_url, run_id=run_id)
    env["CHAT_API_REQUESTS_PER_MINUTE"] = env["CHAT_API_WRITES_PER_MINUTE"] = str(queries * 100)
    process = ServerProcess("search-1", "uvicorn", "chatsite.asgi:application", env, log_dir() / f"search-{run_id}.log")
    process.spawn()
    try:
        process.wait_ready(SERVER_START_TIMEOUT)
        result["kinds"] = measure(process, secret, queries, readable, say)
    except ServerFailed as error:
        raise BenchFailed(str(error)) from None
    finally:
        process.stop()
    result["admin"] = measure_admin(queries, say)
    return result


def measure_admin(queries: int, say: Callable[[str], None]) -> dict:
    """The admin's search (every room, the newest 1,000 matches), timed in this process: no permission filter."""
    results = {}
    for kind, texts in (("common word", COMMON), ("rare word", rare_words(queries))):
        search.newest_matches(texts[0])  # warm
        latencies = []
        for n in range(queries):
            started = time.perf_counter()
            search.newest_matches(texts[n % len(texts)])
            latencies.append((time.perf_counter() - started) * 1000)
        latencies.sort()
        results[kind] = {
            "p50_ms": round(percentile(latencies, 0.5), 1),
            "p95_ms": round(percentile(latencies, 0.95), 1),
        }
        say(f"admin, {kind:11} p50 {results[kind]['p50_ms']:6.1f} ms  p95 {results[kind]['p95_ms']:6.1f} ms")
    return results


def private_rooms(user, count: int) -> set[str]:
    """Make the first `count` demo rooms private (the rest public), `user` a member of every other one of
    them; return the slugs `user` may read."""
    demo_rooms = sorted(Room.objects.filter(slug__startswith="demo-"), key=lambda room: int(room.slug[5:]))
    Membership.objects.filter(user=user).delete()
    for number, room in enumerate(demo_rooms):
        Room.objects.filter(pk=room.pk).update(is_private=number < count)
        if number < count and number % 2 == 0:
            Membership.objects.create(room=room, user=user)
    return {room.slug for number, room in enumerate(demo_rooms) if number >= count or number % 2 == 0}


def index_bytes() -> int:
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(
                "SELECT pg_relation_size('message_search') + "
                "(SELECT COALESCE(SUM(pg_column_size(search_vector)), 0) FROM chat_message)"
            )
        else:
            cursor.execute("SELECT SUM(pgsize) FROM dbstat WHERE name LIKE 'chat_message_fts%'")
        return int(cursor.fetchone()[0] or 0)


def rare_words(count: int) -> list[str]:
    """Rare words that are there: the rare word of demo messages picked at random (every tenth has one)."""
    choose = random.Random(7)
    last_id = Message.objects.order_by("-pk").values_list("pk", flat=True).first() or 0
    bodies = Message.objects.filter(pk__in=choose.sample(range(1, last_id + 1), min(last_id, count * 30)))
    found = [body.split()[-1] for body in bodies.values_list("body", flat=True) if body.split()[-1:] != []]
    words = [word for word in found if word in _RARE]
    if not words:
        raise BenchFailed("The database holds no demo message with a rare word: seed it with seeddemo.")
    return [words[n % len(words)] for n in range(count)]


_RARE = set(demo.RARE_WORDS)


def measure(process: ServerProcess, secret: str, queries: int, readable: set[str], say: Callable[[str], None]) -> dict:
    rare = rare_words(queries)
    kinds: dict[str, list[str]] = {
        "common word": COMMON,
        "rare word": rare,
        "phrase": PHRASES,
        "with exclusions": EXCLUDING,
        "no match": ["zzqxj"],
    }
    connection_ = http.client.HTTPConnection("127.0.0.1", process.port, timeout=30)
    headers = {"Authorization": f"Bearer {secret}"}

    def call(query: str) -> int:
        connection_.request("GET", "/api/search/?" + urlencode({"q": query}), headers=headers)
        response = connection_.getresponse()
        data = response.read()
        if response.status != 200:
            raise BenchFailed(f"search {query!r} answered {response.status}: {data[:200]!r}")
        found = json.loads(data)["results"]
        if leaked := {result["room"] for result in found} - readable:
            raise BenchFailed(f"search {query!r} found messages in rooms the user may not read: {sorted(leaked)}")
        return len(found)

    results = {}
    for kind, texts in kinds.items():
        call(texts[0])  # warm
        latencies, found = [], []
        for n in range(queries):
            started = time.perf_counter()
            found.append(call(texts[n % len(texts)]))
            latencies.append((time.perf_counter() - started) * 1000)
        latencies.sort()
        results[kind] = {
            "p50_ms": round(percentile(latencies, 0.50), 1),
            "p95_ms": round(percentile(latencies, 0.95), 1),
            "max_ms": round(latencies[-1], 1),
            "results_per_query": round(sum(found) / len(found), 1),
        }
        say(
            f"{kind:16} p50 {results[kind]['p50_ms']:6.1f} ms  p95 {results[kind]['p95_ms']:6.1f} ms  "
            f"max {results[kind]['max_ms']:6.1f} ms  ({results[kind]['results_per_query']} results a query)"
        )
    connection_.close()
    return results


class _Quiet:
    def write(self, text: str) -> None:
        pass

    def flush(self) -> None:
        pass
