"""A reconnect storm: every socket of a killed server process comes back on the others.

Shared by `manage.py stormbench` (which reports the figures) and
tests/reliability/test_storm.py (which asserts them, against the database).

- `StormClient` is one socket's worth of the room page (chat/static/chat/live.js):
  it keeps messages by seq, connects with `?after=<highest seq held without a
  hole>&changes_after=<last change applied>`, and after any close reconnects
  after live.js's `backoff()` (the same formula and caps). A load balancer
  (`Storm.route`) sends it to the home process until that is killed, then to
  the others, alternately, moving on after a failed attempt. Senders are
  clients too, one per room on the other processes, posting at a steady rate
  with a nonce each and re-sending what was never acknowledged on reconnecting, as the page does.
- `Storm.run` connects every client to the home process, lets the senders post
  for a while, SIGKILLs home, waits until every client is resumed on the
  others, lets the senders post a little longer, stops them, and checks every
  client against the stored messages: each must hold exactly 1..N of its
  room, and no connection may deliver one seq twice or replay one at or
  below its `after`.

The servers should run `bench.counted_asgi:application` (this site's
application with its database work counted); the storm then reads each
survivor's queries per resume and its database thread's queue before and
after the kill. Everything is on 127.0.0.1 and bounded in time.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import random
import resource
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from itertools import count

import redis
from django.conf import settings

from bench import report
from bench.client import BenchSocket, HandshakeError, make_body, open_socket, parse_body, read_history
from bench.scenario import (
    READER_WS_PATH,
    BenchFailed,
    ChatBench,
    Options,
    OutOfTime,
    uvloop_factory,
)
from bench.serverprocess import ServerProcess

RESUME_PATH = "/ws/rooms/{slug}/?after={after}&changes_after={changes_after}"
# live.js: SOCKET_BACKOFF_CAP_MS, and UNAVAILABLE_BACKOFF_CAP_MS after an "unavailable" error frame.
SOCKET_BACKOFF_CAP_S = 15.0
UNAVAILABLE_BACKOFF_CAP_S = 3.0
# A browser gives a WebSocket handshake far longer; a storm that needs this long has failed anyway.
HANDSHAKE_TIMEOUT = 30.0
CONNECT_CONCURRENCY = 20  # handshakes at once while the clients first connect to the home process
STATS_TIMEOUT = 10.0
POLL = 0.05  # seconds between looks at a condition with a deadline
# What the survivors' logs are searched for, before and after the clients close.
LOG_MARKERS = ("Traceback", "MaxConnectionsError", "is unreachable", "Refreshing presence")


class StormFailed(Exception):
    """The storm could not be set up or did not finish in time; the message says what happened."""


def page_backoff(attempt: int, cap_s: float) -> float:
    """Return live.js `backoff(attempt, capMs)` in seconds: 0.5 s doubling up to 2**5, capped, times 0.75–1.25."""
    return min(cap_s, 0.5 * 2 ** min(max(attempt - 1, 0), 5)) * (0.75 + random.random() / 2)


def raise_fd_limit(needed: int) -> int:
    """Raise this process's soft limit on open files to `needed` if the hard limit allows; return the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise StormFailed(
                f"{needed} open files are needed and the hard limit is {hard}: "
                "raise it (ulimit -Hn) or use fewer sockets."
            )
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
        soft = needed
    return soft


@dataclass
class Attempt:
    """One connection attempt of one client."""

    server: str
    started: float
    ended: float | None = None
    outcome: str = ""  # "ready", or why it failed


@dataclass
class Send:
    number: int
    nonce: str
    body: str
    seq: int | None = None  # set when the sender gets its message back: the acknowledgement


class StormClient:
    """One socket of a room page: kept by seq, resumed with ?after= on every reconnect, with the page's backoff."""

    def __init__(self, storm: Storm, index: int, room: int, session_id: str, *, sender: bool = False) -> None:
        self.storm = storm
        self.index = index
        self.room = room
        self.session_id = session_id
        self.sender = sender
        self.held: set[int] = set()
        self.contiguous = 0  # highest seq held with no hole below it
        self.last_change = 0
        self.attempt = 0  # live.js RoomSocket.attempt: closes since the last ready
        self.error_code: str | None = None  # the last error frame's code on this connection
        self.sock: BenchSocket | None = None  # while live (after ready)
        self.server: ServerProcess | None = None
        self.attempts: list[Attempt] = []
        self.resumed_at: float | None = None  # the first ready after the kill
        self.resumed_on: str | None = None
        self.lost_at: float | None = None  # when the killed process's connection ended
        self.repeats = 0  # seqs a connection delivered twice, or replayed at or below its after
        self.replayed: list[int] = []  # messages each resume replayed (seq up to ready.last_seq)
        self.gaps = 0
        self.errors: Counter[str] = Counter()
        self.closes: Counter[str] = Counter()
        self.sends: dict[str, Send] = {}

    async def run(self, gate: asyncio.Semaphore) -> None:
        loop = asyncio.get_running_loop()
        first = True
        while True:
            server = self.storm.route(self)
            attempt = Attempt(server.name, loop.time())
            self.attempts.append(attempt)
            after = self.contiguous
            try:
                if first:
                    async with gate:
                        sock = await self.open(server, after)
                else:
                    sock = await self.open(server, after)
            except (OSError, HandshakeError, TimeoutError) as error:
                attempt.ended, attempt.outcome = loop.time(), type(error).__name__
                self.attempt += 1
                await asyncio.sleep(page_backoff(self.attempt, SOCKET_BACKOFF_CAP_S))
                continue
            attempt.ended, attempt.outcome = loop.time(), "ready"
            first = False
            if self.storm.killed_at is not None and self.resumed_at is None:
                self.resumed_at, self.resumed_on = attempt.ended, server.name
            self.attempt = 0
            self.error_code = None
            await self.session(sock, server, after)
            self.attempt += 1
            cap = UNAVAILABLE_BACKOFF_CAP_S if self.error_code == "unavailable" else SOCKET_BACKOFF_CAP_S
            await asyncio.sleep(page_backoff(self.attempt, cap))

    async def open(self, server: ServerProcess, after: int) -> BenchSocket:
        path = RESUME_PATH.format(slug=self.storm.slugs[self.room], after=after, changes_after=self.last_change)
        return await open_socket(
            host="127.0.0.1",
            port=server.port,
            path=path,
            headers={"Origin": server.origin, "Cookie": f"{settings.SESSION_COOKIE_NAME}={self.session_id}"},
            room=self.room,
            fast=False,  # every frame decoded: the client needs each message's seq
            timeout=HANDSHAKE_TIMEOUT,
        )

    async def session(self, sock: BenchSocket, server: ServerProcess, after: int) -> None:
        """Read one live connection until it closes."""
        last_seq = sock.ready.result()["last_seq"]
        self.sock, self.server = sock, server
        seen: set[int] = set()
        replayed = 0
        if self.sender:
            for item in self.sends.values():  # like the page: what was never acknowledged goes again
                if item.seq is None:
                    self.send(item)
        try:
            while (frame := await sock.frames.get()) is not None:
                kind = frame.get("type")
                if kind == "message":
                    message = frame["message"]
                    seq = message["seq"]
                    if seq in seen or seq <= after:
                        self.repeats += 1
                    seen.add(seq)
                    replayed += seq <= last_seq
                    self.hold(seq)
                    item = self.sends.get(message.get("nonce"))
                    if item is not None and item.seq is None:
                        item.seq = seq
                elif kind in ("message_updated", "message_deleted", "history_cleared"):
                    self.last_change = max(self.last_change, frame.get("change", 0))
                elif kind == "gap":
                    self.gaps += 1
                elif kind == "error":
                    self.error_code = frame.get("code")
                    self.errors[str(self.error_code)] += 1
        finally:
            self.replayed.append(replayed)
            self.sock = None
            if self.storm.killed_at is not None and server is self.storm.home and self.lost_at is None:
                self.lost_at = asyncio.get_running_loop().time()
            self.closes[str(sock.close_code)] += 1
            sock.close()

    def hold(self, seq: int) -> None:
        self.held.add(seq)
        while self.contiguous + 1 in self.held:
            self.contiguous += 1

    def send(self, item: Send) -> None:
        if self.sock is not None:
            self.sock.send_json({"type": "send", "body": item.body, "nonce": item.nonce})

    async def send_steadily(self, rate: float, numbers, nonce_prefix: str, body_size: int) -> None:
        """Post `rate` messages a second, live or not (one that finds no socket goes on reconnecting)."""
        loop = asyncio.get_running_loop()
        interval = 1.0 / rate
        due = loop.time() + random.uniform(0, interval)
        while True:
            await asyncio.sleep(max(0.0, due - loop.time()))
            number = next(numbers)
            item = Send(number, f"{nonce_prefix}{number}", make_body(number, body_size))
            self.sends[item.nonce] = item
            self.send(item)
            due += interval


@dataclass
class StormPlan:
    """What one storm does; the servers must be up and the rooms empty."""

    home: ServerProcess  # every client connects here first; it is SIGKILLed
    others: list[ServerProcess]  # where the clients resume, and the senders post
    slugs: list[str]  # the rooms; client i is in room i % len(slugs)
    session_ids: list[str]  # signed-in users' sessions; client i uses i % len(session_ids)
    sockets: int = 1000
    rate: float = 2.0  # messages per second per room, one sender per room
    before_s: float = 3.0  # seconds of sending before the kill
    after_s: float = 3.0  # seconds of sending once every client is resumed
    resume_limit_s: float = 30.0  # the promise: every client resumed within this
    wait_s: float = 60.0  # how long to wait for the last resume before giving up
    connect_s: float = 120.0  # how long the clients may take to connect to home
    body_size: int = 100
    nonce_prefix: str = field(default_factory=lambda: f"storm-{random.getrandbits(32):08x}-")


StoredMessages = Callable[[str], Awaitable[list[tuple[int, str]]]]


class Storm:
    """One reconnect storm; see the module docstring."""

    def __init__(self, plan: StormPlan, say: Callable[[str], None], stored: StoredMessages) -> None:
        self.plan = plan
        self.say = say
        self.stored = stored  # (seq, body) of every message stored in a room, by slug, from the database
        self.slugs = plan.slugs
        self.home = plan.home
        self.killed_at: float | None = None
        self.clients: list[StormClient] = []
        self.senders: list[StormClient] = []

    def route(self, client: StormClient) -> ServerProcess:
        """The load balancer: home until it is killed; then the others in turn, the next one after a failure."""
        if client.sender:
            return self.plan.others[(client.room + client.attempt) % len(self.plan.others)]
        if self.killed_at is None:
            return self.home
        return self.plan.others[(client.index + client.attempt) % len(self.plan.others)]

    async def run(self) -> dict:
        """Run the storm; return its figures (bench.storm.figures turns them into the report)."""
        p = self.plan
        loop = asyncio.get_running_loop()
        raise_fd_limit(p.sockets + len(p.slugs) + 256)
        gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
        self.clients = [
            StormClient(self, i, i % len(p.slugs), p.session_ids[i % len(p.session_ids)]) for i in range(p.sockets)
        ]
        self.senders = [
            StormClient(self, -1 - room, room, p.session_ids[room % len(p.session_ids)], sender=True)
            for room in range(len(p.slugs))
        ]
        tasks = [loop.create_task(c.run(gate)) for c in self.senders + self.clients]
        try:
            return await self.measure(tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for client in self.senders + self.clients:
                if client.sock is not None:
                    client.sock.close()
            await self.closed_everywhere()

    async def closed_everywhere(self, timeout: float = 15.0) -> None:
        """Wait until the survivors have run every closed socket's disconnect() (its log lines come then)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            counted = await read_stats(self.plan.others, since=time.time())
            if all(c is None or c["open_websockets"] == 0 for c in counted):
                return
            await asyncio.sleep(0.1)  # polling the servers until the deadline

    async def measure(self, tasks: list[asyncio.Task]) -> dict:
        p = self.plan
        loop = asyncio.get_running_loop()
        started = loop.time()
        await self.wait(lambda: all(c.sock is not None for c in self.senders + self.clients), p.connect_s, "connect")
        connect_s = loop.time() - started
        self.say(f"storm: {len(self.clients)} sockets live on {self.home.name} in {connect_s:.1f} s")
        numbers = count(1)
        sending = [
            loop.create_task(s.send_steadily(p.rate, numbers, p.nonce_prefix, p.body_size)) for s in self.senders
        ]
        tasks.extend(sending)
        await asyncio.sleep(p.before_s)  # the scenario: steady chat before the kill

        survivors = p.others
        stats_before = await read_stats(survivors, since=time.time())  # the counters; no resume listed
        redis_before = await asyncio.to_thread(redis_stats)
        usage_before = report.usage_snapshot(survivors)
        kill_wall = time.time()
        self.killed_at = loop.time()
        self.home.kill()  # SIGKILL: no close frames; every client sees its connection drop
        self.say(f"storm: SIGKILLed {self.home.name}; waiting for {len(self.clients)} resumes")
        resumed = await self.wait(lambda: all(c.resumed_at is not None for c in self.clients), p.wait_s, None)
        window_end = loop.time()
        usage_after = report.usage_snapshot(survivors)
        redis_after = await asyncio.to_thread(redis_stats)
        stats_after = await read_stats(survivors, since=kill_wall)
        done = sum(c.resumed_at is not None for c in self.clients)
        self.say(f"storm: {done}/{len(self.clients)} resumed in {window_end - self.killed_at:.2f} s")

        await asyncio.sleep(p.after_s)  # the scenario: chat goes on after the storm
        for task in sending:
            task.cancel()
        await self.wait(lambda: all(i.seq is not None for s in self.senders for i in s.sends.values()), 15, None)
        stored = {slug: await self.stored(slug) for slug in self.slugs}
        last = {room: len(stored[slug]) for room, slug in enumerate(self.slugs)}

        def complete() -> bool:
            return all(set(range(1, last[c.room] + 1)) <= c.held for c in self.clients)

        await self.wait(complete, 10, None)  # the last broadcasts arrive
        return {
            "connect_s": round(connect_s, 2),
            "kill_wall": kill_wall,  # unix time: the counters date each resume by it
            "resumed_all": resumed,
            "window_s": window_end - self.killed_at,
            "usage": (usage_before, usage_after),
            "stats": (stats_before, stats_after),
            "redis": (redis_before, redis_after),
            # Where each survivor's log stood before the clients closed: what follows is the teardown's.
            "log_marks": [len(server.log_text()) for server in survivors],
            "stored": stored,
        }

    async def wait(self, condition: Callable[[], bool], timeout: float, what: str | None) -> bool:
        """Poll `condition` until it holds (True) or `timeout` passes: StormFailed if `what` names it, else False."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not condition():
            if asyncio.get_running_loop().time() > deadline:
                if what is None:
                    return False
                raise StormFailed(f"not within {timeout:g} s: {what}; {self.describe()}")
            await asyncio.sleep(POLL)  # polling the condition until the deadline
        return True

    def describe(self) -> str:
        live = sum(c.sock is not None for c in self.clients)
        failed = Counter(a.outcome for c in self.clients for a in c.attempts if a.outcome != "ready")
        return f"{live}/{len(self.clients)} clients live, failed attempts {dict(failed)}"


# --------------------------------------------------------------------------
# The servers' database counters (bench/counted_asgi.py)
# --------------------------------------------------------------------------


def fetch_stats(server: ServerProcess, since: float) -> dict | None:
    """GET the counted application's /bench/db-stats; None when the server does not count."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=STATS_TIMEOUT)
    try:
        conn.request("GET", f"/bench/db-stats?since={since}")
        response = conn.getresponse()
        body = response.read()
        return json.loads(body) if response.status == 200 else None
    except (OSError, http.client.HTTPException, ValueError):
        return None
    finally:
        conn.close()


async def read_stats(servers: list[ServerProcess], since: float) -> list[dict | None]:
    return list(await asyncio.gather(*(asyncio.to_thread(fetch_stats, s, since) for s in servers)))


def redis_stats() -> dict | None:
    """Commands Redis has run and bytes it has sent, in all (shared with whatever else uses that Redis)."""
    client = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=STATS_TIMEOUT)
    try:
        info = client.info("stats")
    except redis.RedisError:
        return None
    finally:
        client.close()
    return {"commands": info["total_commands_processed"], "sent_bytes": info["total_net_output_bytes"]}


# --------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------


def spread(values: list[float], digits: int = 3) -> dict:
    ordered = sorted(values)
    pick = lambda q: None if not ordered else round(report.percentile(ordered, q), digits)  # noqa: E731
    return {"n": len(ordered), "p50": pick(0.5), "p95": pick(0.95), "max": pick(1.0)}


def figures(storm: Storm, raw: dict) -> dict:
    """Turn a storm's clients and counters into its report: resume times, loss, duplicates, database load, CPU."""
    p = storm.plan
    kill = storm.killed_at
    clients = storm.clients
    resume_s = [c.resumed_at - kill for c in clients if c.resumed_at is not None]
    after_kill = [a for c in clients for a in c.attempts if a.started >= kill]
    handshakes = [a.ended - a.started for a in after_kill if a.outcome == "ready"]
    per_second = Counter(int(s) for s in resume_s)
    by_process = Counter(c.resumed_on for c in clients if c.resumed_on)

    # Loss and duplicates, against what the database stored.
    stored = raw["stored"]
    lost = clients_with_loss = stray = 0
    for c in clients:
        expected = set(range(1, len(stored[p.slugs[c.room]]) + 1))
        missing = len(expected - c.held)
        lost += missing
        clients_with_loss += missing > 0
        stray += len(c.held - expected)
    seq_gaps = sum(1 for rows in stored.values() for i, (seq, _) in enumerate(rows, 1) if seq != i)
    numbers = Counter(parsed[1] for rows in stored.values() for _, body in rows if (parsed := parse_body(body)))
    sends = [item for s in storm.senders for item in s.sends.values()]

    window = raw["window_s"]
    usage_before, usage_after = raw["usage"]
    stats_before, stats_after = raw["stats"]
    processes = []
    for k, server in enumerate(p.others):
        a, b = usage_before["servers"][k], usage_after["servers"][k]
        row: dict = {
            "process": server.name,
            "resumes": by_process[server.name],
            "cpu_pct": None if a is None or b is None else round(100 * (b - a) / report.CLK_TCK / window, 1),
        }
        before, after = stats_before[k], stats_after[k]
        if before is not None and after is not None:
            resumes = after["resumes"]
            statements: Counter[str] = Counter()
            for r in resumes:
                statements.update(r["statements"])
            busy = after["db_thread"]["busy_s"] - before["db_thread"]["busy_s"]
            row.update(
                resume_connections=len(resumes),
                queries_per_resume=round(sum(r["queries"] for r in resumes) / len(resumes), 2) if resumes else None,
                max_queries_per_resume=max((r["queries"] for r in resumes), default=None),
                health_checks_per_resume=(
                    round(sum(r.get("health_checks", 0) for r in resumes) / len(resumes), 2) if resumes else None
                ),
                statements_per_resume={name: round(n / len(resumes), 2) for name, n in sorted(statements.items())}
                if resumes
                else {},  # fmt: skip
                db_ms_per_resume=round(1000 * sum(r["db_s"] for r in resumes) / len(resumes), 3) if resumes else None,
                queries=after["queries"] - before["queries"],
                db_thread_calls=after["db_thread"]["calls"] - before["db_thread"]["calls"],
                db_thread_busy_pct=round(100 * busy / window, 1),
                db_thread_peak_queue=after["db_thread"]["peak_waiting"],
                db_thread_max_wait_ms=round(1000 * after["db_thread"]["max_wait_s"], 1),
            )
        log = server.log_text()
        mark = raw["log_marks"][k]
        row["log_during"] = {m: log[:mark].count(m) for m in LOG_MARKERS if m in log[:mark]}
        row["log_teardown"] = {m: log[mark:].count(m) for m in LOG_MARKERS if m in log[mark:]}
        processes.append(row)
    client_cpu = usage_after["client"] - usage_before["client"]
    redis_before, redis_after = raw["redis"]
    redis_load = None
    if redis_before and redis_after:
        redis_load = {key: redis_after[key] - redis_before[key] for key in redis_before}
    other_cpu_pct = None
    if usage_before["machine"] and usage_after["machine"]:
        # What else ran meanwhile (another engineer's tests, say): it slows every figure above.
        busy = (usage_after["machine"][0] - usage_before["machine"][0]) / report.CLK_TCK
        servers = sum((b or 0) - (a or 0) for a, b in zip(usage_before["servers"], usage_after["servers"], strict=True))
        other_cpu_pct = max(0.0, round(100 * (busy - servers / report.CLK_TCK - client_cpu) / window, 1))
    ok_reasons = []
    if len(resume_s) < len(clients):
        ok_reasons.append(f"{len(clients) - len(resume_s)} clients not resumed")
    elif max(resume_s) > p.resume_limit_s:
        ok_reasons.append(f"the last resume took {max(resume_s):.1f} s > {p.resume_limit_s:g} s")
    if lost:
        ok_reasons.append(f"{lost} messages missing on {clients_with_loss} clients")
    if sum(c.repeats for c in clients) or stray:
        ok_reasons.append(f"{sum(c.repeats for c in clients)} duplicate deliveries, {stray} stray")
    if seq_gaps or any(n > 1 for n in numbers.values()):
        ok_reasons.append("the stored seqs have gaps or a message was stored twice")
    if any(item.seq is None for item in sends) or len(numbers) != len(sends):
        ok_reasons.append(f"{sum(item.seq is None for item in sends)} sends not acknowledged")
    if sum(c.gaps for c in clients):
        ok_reasons.append(f"{sum(c.gaps for c in clients)} gap frames (a resume missed more than the limit)")
    return {
        "sockets": len(clients),
        "rooms": len(p.slugs),
        "users": len(p.session_ids),
        "rate_per_room": p.rate,
        "home": p.home.name,
        "others": [s.name for s in p.others],
        "connect_s": raw["connect_s"],
        "resumed": len(resume_s),
        "resume_s": spread(resume_s),
        "all_resumed_s": round(max(resume_s), 3) if len(resume_s) == len(clients) else None,
        "resume_limit_s": p.resume_limit_s,
        "lost_connection_s": spread([c.lost_at - kill for c in clients if c.lost_at is not None]),
        "handshake_s": spread(handshakes),
        "attempts_after_kill": len(after_kill),
        "failed_attempts": dict(Counter(a.outcome for a in after_kill if a.outcome not in ("ready", ""))),
        "resumes_per_s_peak": max(per_second.values(), default=0),
        "resumes_per_s": {str(second): n for second, n in sorted(per_second.items())},
        "resumes_by_process": dict(by_process),
        "replayed_per_resume": spread([c.replayed[1] for c in clients if len(c.replayed) > 1], 0),
        "sent": len(sends),
        "acknowledged": sum(item.seq is not None for item in sends),
        "stored": sum(len(rows) for rows in stored.values()),
        "stored_twice": sum(n - 1 for n in numbers.values() if n > 1),
        "seq_gaps": seq_gaps,
        "lost": lost,
        "clients_with_loss": clients_with_loss,
        "duplicates": sum(c.repeats for c in clients),
        "stray": stray,
        "gap_frames": sum(c.gaps for c in clients),
        "errors": dict(sum((c.errors for c in clients), Counter())),
        "window_s": round(window, 3),
        "processes": processes,
        "client_cpu_pct": round(100 * client_cpu / window, 1),
        "other_cpu_pct": other_cpu_pct,
        # During the storm, anyone's: the senders and the other processes' probes are in it too.
        "redis_commands": redis_load and redis_load["commands"],
        "redis_sent_mib": redis_load and round(redis_load["sent_bytes"] / 2**20, 1),
        "ok": not ok_reasons,
        "fail_reasons": ok_reasons,
    }


def render(f: dict) -> str:
    """Return the storm's figures as the printed report."""
    ms = lambda s: "-" if s is None else f"{s * 1000:.0f}"  # noqa: E731
    r, h = f["resume_s"], f["handshake_s"]
    lines = [
        f"{f['sockets']} sockets in {f['rooms']} room(s), {f['users']} users, all on {f['home']}, SIGKILLed; "
        f"resumed on {' and '.join(f['others'])}; {f['rate_per_room']:g} msg/s per room throughout",
        f"resumed:    {f['resumed']}/{f['sockets']}, from the kill p50 {ms(r['p50'])} ms, p95 {ms(r['p95'])} ms, "
        f"max {ms(r['max'])} ms (limit {f['resume_limit_s']:g} s)",
        f"handshakes: {f['attempts_after_kill']} attempts after the kill, failed {f['failed_attempts'] or 0}; "
        f"connect to ready p50 {ms(h['p50'])} ms, p95 {ms(h['p95'])} ms, max {ms(h['max'])} ms",
        f"rate:       peak {f['resumes_per_s_peak']} resumes in one second; per second from the kill "
        f"{list(f['resumes_per_s'].values())}; replayed per resume p50 {f['replayed_per_resume']['p50']}, "
        f"max {f['replayed_per_resume']['max']} messages",
        f"messages:   sent {f['sent']}, acknowledged {f['acknowledged']}, stored {f['stored']} "
        f"(seq gaps {f['seq_gaps']}, stored twice {f['stored_twice']}); every client against the database: "
        f"lost {f['lost']}, duplicated {f['duplicates']}, stray {f['stray']}, gap frames {f['gap_frames']}",
    ]
    columns = [
        ("process", "process", 14),
        ("resumes", "resumes", 8),
        ("queries/resume", "queries_per_resume", 15),
        ("max", "max_queries_per_resume", 4),
        ("+SELECT 1", "health_checks_per_resume", 9),
        ("db ms/resume", "db_ms_per_resume", 13),
        ("db thread busy%", "db_thread_busy_pct", 16),
        ("peak queue", "db_thread_peak_queue", 11),
        ("max wait ms", "db_thread_max_wait_ms", 12),
        ("CPU%", "cpu_pct", 6),
    ]
    lines.append(
        f"during the storm ({f['window_s']:.2f} s, the kill to the last resume; client CPU {f['client_cpu_pct']}%, "
        f"anything else on the machine {report.fmt(f['other_cpu_pct'])}%):"
    )
    lines.append(" ".join(f"{label:>{width}}" for label, _, width in columns))
    for row in f["processes"]:
        lines.append(" ".join(f"{report.fmt(row.get(key)):>{width}}" for _, key, width in columns))
    for row in f["processes"]:
        if row.get("statements_per_resume"):
            shown = ", ".join(f"{name} {n:g}" for name, n in row["statements_per_resume"].items())
            lines.append(f"  {row['process']} statements per resume: {shown}")
    if f["redis_commands"] is not None:
        lines.append(
            f"Redis during the storm: {f['redis_commands']} commands, {f['redis_sent_mib']} MiB sent "
            "(everyone's on that Redis)"
        )
    for row in f["processes"]:
        if row["log_during"] or row["log_teardown"]:
            lines.append(
                f"  {row['process']} log: during the run {row['log_during'] or '-'}; "
                f"as the clients closed {row['log_teardown'] or '-'}"
            )
    if f["errors"]:
        lines.append(f"error frames: {f['errors']}")
    lines.append("PASS" if f["ok"] else "FAIL: " + "; ".join(f["fail_reasons"]))
    return "\n".join(lines)


# --------------------------------------------------------------------------
# manage.py stormbench
# --------------------------------------------------------------------------

COUNTED_APP = "bench.counted_asgi:application"


@dataclass
class StormOptions(Options):
    """What one `manage.py stormbench` run does, with its defaults."""

    processes: int = 3
    sockets: int = 1000
    rooms: int = 10
    rate: float = 2.0
    users: int = 10
    before: float = 3.0
    after: float = 3.0
    resume_limit: float = 30.0
    user_prefix: str = "storm"
    max_seconds: float = 300.0

    def check(self) -> list[float]:
        if self.processes < 2:
            raise BenchFailed("--processes must be at least 2: one to kill, one to resume on.")
        for name in ("sockets", "rooms", "users"):
            if getattr(self, name) < 1:
                raise BenchFailed(f"--{name} must be at least 1.")
        if self.sockets < self.rooms:
            raise BenchFailed("--sockets must be at least --rooms: every room needs a socket.")
        if self.rate <= 0 or self.before < 0 or self.after < 0 or self.resume_limit <= 0:
            raise BenchFailed("--rate and --resume-limit must be positive, --before and --after not negative.")
        return [self.rate]


class StormBench(ChatBench):
    """chatbench's set-up (servers, sign-ups, rooms, clean-up), then one reconnect storm in place of its steps."""

    options: StormOptions

    def empty_results(self) -> dict:
        return {"storm": None, "log_warnings": {}}

    def banner(self) -> str:
        o = self.options
        return (
            f"stormbench {self.run_id}: {o.sockets} sockets in {o.rooms} room(s), {o.users} users, "
            f"uvicorn x{o.processes}, {o.rate:g} msg/s per room; logs in {self.log_dir}"
        )

    def measured(self) -> bool:
        return self.report["storm"] is not None

    def config(self) -> dict:
        o = self.options
        return {
            "server": "uvicorn",
            "app": COUNTED_APP,
            "processes": o.processes,
            "sockets": o.sockets,
            "rooms": o.rooms,
            "users": o.users,
            "rate_per_room": o.rate,
            "before_s": o.before,
            "after_s": o.after,
            "resume_limit_s": o.resume_limit,
            "body_size": o.body_size,
            "database_url": o.database_url,
            "backoff": "live.js backoff(): min(cap, 0.5 s * 2**min(attempt - 1, 5)) * U(0.75, 1.25), "
            f"cap {SOCKET_BACKOFF_CAP_S:g} s ({UNAVAILABLE_BACKOFF_CAP_S:g} s after unavailable)",
            "cpu_count": os.cpu_count(),
            "python": sys.version.split()[0],
        }

    def run(self) -> None:
        o = self.options
        self.migrate_database()
        servers = self.start_servers("storm", COUNTED_APP, o.processes)
        home, others = servers[0], servers[1:]
        self.sessions = self.sign_in_users(others, o.users)
        self.reader = others[-1]  # serves `history` for the final check
        slugs = self.create_rooms("s")
        plan = StormPlan(
            home=home,
            others=others,
            slugs=slugs,
            session_ids=[s.session_id for s in self.sessions],
            sockets=o.sockets,
            rate=o.rate,
            before_s=o.before,
            after_s=o.after,
            resume_limit_s=o.resume_limit,
            body_size=o.body_size,
            nonce_prefix=f"{self.run_id}-",
        )
        storm = Storm(plan, self.say, self.stored_messages)
        try:
            with asyncio.Runner(loop_factory=uvloop_factory()) as runner:
                raw = runner.run(asyncio.wait_for(storm.run(), self.remaining("the storm")))
        except TimeoutError:
            raise OutOfTime("during the storm") from None
        except StormFailed as error:
            raise BenchFailed(f"{error}\n{home.log_tail()}\n{others[0].log_tail()}") from None
        finally:
            self.report["log_warnings"] = self.scan_logs(others)
        self.report["storm"] = figures(storm, raw)

    async def stored_messages(self, slug: str) -> list[tuple[int, str]]:
        """Every message stored in the room, read back through `history` frames (from the database)."""
        reader = await self.open_member_socket(
            self.reader, self.sessions[0].session_id, READER_WS_PATH.format(slug=slug), 0, fast=False
        )
        try:
            last_seq = (await asyncio.shield(reader.ready))["last_seq"]
            messages = await read_history(reader, last_seq, 0)
        finally:
            reader.close()
        return [(m["seq"], m.get("body") or "") for m in messages]

    def finish_report(self) -> None:
        lines = ["", f"stormbench {self.report['run_id']} — {self.report['elapsed_s']} s in all"]
        if self.report["storm"]:
            lines.append(render(self.report["storm"]))
        if self.report["log_warnings"]:
            lines.append(f"server logs with warnings: {self.report['log_warnings']}")
        if self.report["aborted"]:
            lines.append(f"ABORTED: {self.report['aborted']}")
        self.say("\n".join(lines))
        report.write(self.report, self.options.json_path, self.say)
