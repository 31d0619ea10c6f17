"""This site's application with its database work counted: the servers of `manage.py stormbench`.

Serve with `uvicorn bench.counted_asgi:application` (the README's flags; bench/serverprocess.py).
It is `chatsite.asgi:application`, unchanged, plus counters that only
the bench and tests/reliability/test_storm.py read:

- every SQL statement Django runs (`connection.execute_wrapper`, installed on
  each new connection), in all and per WebSocket connection whose handshake
  carried `?after=`, that is per resume: how many, of what kind ("SELECT
  chat_message"), and how long the database took; on PostgreSQL also the
  `SELECT 1` health checks (`CONN_HEALTH_CHECKS`: the first query after each
  `close_old_connections()`, which Channels runs around every
  `database_sync_to_async` call), which bypass the execute wrappers;
- the thread Channels' `database_sync_to_async` runs everything on (thread
  sensitive, outside any request: one thread per process, so a process's
  sockets never run two queries at once): calls, the longest queue, the
  longest wait for the thread, and its busy time;
- the WebSocket connections still open (their `disconnect()` not yet done);
- `GET /bench/db-stats[?since=<unix time>]` answers them as JSON, before the
  site's own routing sees the request. The resumes listed are those opened at
  or after `since`; the longest queue and wait are since the previous read.

The counters cost a lock and a clock read per statement and per database
call: too little to change what is measured (a resume is a handful of queries).
"""

from __future__ import annotations

import contextvars
import json
import re
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import parse_qs

from asgiref.sync import SyncToAsync
from django.db.backends.signals import connection_created

from chatsite.asgi import application as site_application

STATS_PATH = "/bench/db-stats"
# The table a statement reads or writes first: enough to tell a resume's queries apart.
STATEMENT = re.compile(r'^\s*(\w+)\b.*?\b(?:FROM|INTO|UPDATE)\s+"?(\w+)', re.I | re.S)


@dataclass
class Resume:
    """The database work of one WebSocket connection opened with ?after=."""

    opened_at: float  # unix time
    queries: int = 0
    health_checks: int = 0
    db_s: float = 0.0
    statements: Counter = field(default_factory=Counter)


class Stats:
    """Everything counted in this process, under one lock (queries run on several threads)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.queries = 0
        self.health_checks = 0
        self.open_websockets = 0
        self.db_s = 0.0
        self.resumes: list[Resume] = []
        self.calls = 0  # jobs run on the shared database thread
        self.waiting = 0  # submitted and not finished: the queue, the running one included
        self.peak_waiting = 0  # since the previous read
        self.max_wait_s = 0.0  # since the previous read: submit to start
        self.busy_s = 0.0

    def query(self, sql: str, seconds: float) -> None:
        resume = current_resume.get()
        with self.lock:
            self.queries += 1
            self.db_s += seconds
            if resume is not None:
                resume.queries += 1
                resume.db_s += seconds
                match = STATEMENT.match(sql)
                resume.statements[f"{match.group(1).upper()} {match.group(2)}" if match else sql[:30]] += 1

    def health_check(self) -> None:
        resume = current_resume.get()
        with self.lock:
            self.health_checks += 1
            if resume is not None:
                resume.health_checks += 1

    def read(self, since: float) -> dict:
        with self.lock:
            answer = {
                "queries": self.queries,
                "health_checks": self.health_checks,
                "open_websockets": self.open_websockets,
                "db_s": round(self.db_s, 4),
                "db_thread": {
                    "calls": self.calls,
                    "busy_s": round(self.busy_s, 4),
                    "waiting_now": self.waiting,
                    "peak_waiting": self.peak_waiting,
                    "max_wait_s": round(self.max_wait_s, 4),
                },
                "resumes": [
                    {
                        "opened_at": r.opened_at,
                        "queries": r.queries,
                        "health_checks": r.health_checks,
                        "db_s": round(r.db_s, 5),
                        "statements": r.statements,
                    }
                    for r in self.resumes
                    if r.opened_at >= since
                ],
            }
            self.peak_waiting = self.waiting
            self.max_wait_s = 0.0
        return answer


stats = Stats()
current_resume: contextvars.ContextVar[Resume | None] = contextvars.ContextVar("bench_resume", default=None)


def count_query(execute, sql, params, many, context):
    started = time.perf_counter()
    try:
        return execute(sql, params, many, context)
    finally:
        stats.query(sql, time.perf_counter() - started)


def count_on(sender, connection, **kwargs) -> None:
    # The wrapper object outlives its DB-API connection (CONN_MAX_AGE): install once.
    if count_query not in connection.execute_wrappers:
        connection.execute_wrappers.append(count_query)
        if connection.vendor == "postgresql":  # SQLite's is_usable() runs no query
            is_usable = connection.is_usable

            def counted_is_usable() -> bool:
                stats.health_check()
                return is_usable()

            connection.is_usable = counted_is_usable


connection_created.connect(count_on)


class CountingExecutor(ThreadPoolExecutor):
    """A one-thread executor that counts its queue: stands in for asgiref's thread-sensitive thread."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        submitted = time.perf_counter()
        with stats.lock:
            stats.calls += 1
            stats.waiting += 1
            stats.peak_waiting = max(stats.peak_waiting, stats.waiting)

        def timed():
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                with stats.lock:
                    stats.busy_s += time.perf_counter() - started
                    stats.max_wait_s = max(stats.max_wait_s, started - submitted)

        future = super().submit(timed)
        future.add_done_callback(_finished)
        return future


def _finished(future: Future) -> None:
    with stats.lock:
        stats.waiting -= 1


# database_sync_to_async is thread sensitive: outside a request (a WebSocket
# consumer) every call goes to this one executor, shared by the process.
SyncToAsync.single_thread_executor = CountingExecutor(max_workers=1, thread_name_prefix="db-shared")


async def application(scope, receive, send):
    """The site's application; /bench/db-stats answered here; resumes' queries counted apart."""
    if scope["type"] == "http" and scope["path"] == STATS_PATH:
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        since = float(query.get("since", ["0"])[0])
        body = json.dumps(stats.read(since)).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})
        return
    if scope["type"] != "websocket":
        await site_application(scope, receive, send)
        return
    if b"after=" in scope.get("query_string", b""):
        resume = Resume(opened_at=time.time())
        with stats.lock:
            stats.resumes.append(resume)
        # Copied into every database_sync_to_async call this connection makes.
        current_resume.set(resume)
    with stats.lock:
        stats.open_websockets += 1
    try:
        await site_application(scope, receive, send)
    finally:
        with stats.lock:
            stats.open_websockets -= 1
