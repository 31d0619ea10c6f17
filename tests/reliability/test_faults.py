"""Nothing lost across faults: Redis killed, frozen or blackholed, a server process killed, under chat load.

The promise: a message the server acknowledged (its sender got it back as a
`message` frame carrying its nonce) is stored exactly once, and every client
holds exactly the room's messages, 1..N, once each. While Redis is away the
chat goes on: no socket is closed, and every message acknowledged meanwhile
reaches every client within 3 s, in order, because each server process
follows its rooms from the database (chat/fanout.py). The clients do what
the room page does: reconnect with backoff and `?after=` the highest seq held
without a hole, resend unacknowledged sends with their nonce, and ask for a
hole with `history` after a grace period. At the end each client resumes
once more, and the test compares; it also checks that live delivery had
already given every client everything, without asking for holes.

Each test runs real server processes, uvicorn as the README runs it, on a
redis-server of its own (see conftest.py), loopback only, and is bounded in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import pytest
import websockets
from channels.db import database_sync_to_async
from django.conf import settings
from django.contrib.auth import get_user_model
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from bench.serverprocess import ServerProcess
from chat import fanout, realtime, services
from chat.models import Message, Room
from tests.helpers import session_cookie
from tests.servers import ASGI_ERROR_MARKERS, RedisServer, StallingTcpProxy, assert_no_app_errors

pytestmark = pytest.mark.django_db(transaction=True)

CLIENTS = 30
RATE = 2.0  # messages per second per client, while it is live
RECOVERY_LIMIT = 10.0  # seconds from Redis answering again to the first acknowledged new message
TEST_LIMIT = 150.0  # seconds any one test may take, start to end
FRAME_TIMEOUT = 10.0
BACKOFF_MAX = 2.0
GAP_GRACE = 1.0  # seconds a hole may stay open before the client asks for it, as the page does


# --------------------------------------------------------------------------
# The load: clients that behave like the room page
# --------------------------------------------------------------------------


@dataclass
class Send:
    nonce: str
    body: str
    sent_at: float  # the latest (re)send
    acked_at: float | None = None
    seq: int | None = None


@dataclass
class ChatClient:
    """One socket's worth of chat: sends at a steady rate while live, reconnects and resumes on any close."""

    name: str
    cookie: str
    slug: str
    servers: list[ServerProcess]
    server: int
    held: dict[int, dict] = field(default_factory=dict)  # seq -> message
    contiguous: int = 0  # highest seq held with no hole below it
    sends: dict[str, Send] = field(default_factory=dict)
    unacked: dict[str, Send] = field(default_factory=dict)
    sending: bool = True
    ws: object = None  # the connection while it is live
    connects: int = 0
    failed_connects: Counter = field(default_factory=Counter)
    closes: list[tuple[float, int | None]] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    repeats: list[int] = field(default_factory=list)  # seqs one connection delivered twice
    mismatches: list[str] = field(default_factory=list)
    gap_filled: set[int] = field(default_factory=set)  # seqs asked for with `history` while live
    received_at: dict[int, float] = field(default_factory=dict)  # seq -> when it first arrived
    out_of_order: list[tuple[int, int]] = field(default_factory=list)  # (seq, after seq) on one connection

    @property
    def url(self) -> str:
        port = self.servers[self.server].port
        return f"ws://127.0.0.1:{port}/ws/rooms/{self.slug}/?after={self.contiguous}"

    async def connect(self):
        return await websockets.connect(
            self.url,
            origin=self.servers[self.server].origin,
            additional_headers={"Cookie": f"{settings.SESSION_COOKIE_NAME}={self.cookie}"},
            open_timeout=5,
            close_timeout=1,
            max_size=None,
        )

    async def run(self) -> None:
        failures = 0
        while True:
            try:
                ws = await self.connect()
            except (OSError, InvalidHandshake, TimeoutError) as error:
                # The process is gone or not answering: try the next one, as a load balancer would.
                self.failed_connects[type(error).__name__] += 1
                self.server = (self.server + 1) % len(self.servers)
                reached_ready = False
            else:
                self.connects += 1
                reached_ready = await self.session(ws)
            failures = 0 if reached_ready else failures + 1
            delay = min(BACKOFF_MAX, 0.25 * 2**failures)
            await asyncio.sleep(delay * random.uniform(0.75, 1.25))  # the page's reconnect backoff: the scenario

    async def session(self, ws) -> bool:
        """Read one connection until it closes; True if it got as far as `ready`."""
        seen: set[int] = set()
        sender = gap_check = None
        ready = False
        newest = 0  # the highest seq this connection delivered live
        try:
            while True:
                try:
                    raw = await ws.recv()
                except ConnectionClosed as closed:
                    self.closes.append((time.monotonic(), closed.rcvd.code if closed.rcvd else None))
                    return ready
                frame = json.loads(raw)
                kind = frame["type"]
                if kind == "message":
                    seq = frame["message"]["seq"]
                    if ready and seq < newest and frame["message"]["nonce"] not in self.sends:
                        self.out_of_order.append((seq, newest))
                    newest = max(newest, seq)
                    self.receive(frame["message"], seen)
                    if ready and (gap_check is None or gap_check.done()) and max(self.held) > self.contiguous:
                        gap_check = asyncio.get_running_loop().create_task(self.fill_gap(ws))
                elif kind == "history":
                    for message in frame["messages"]:
                        if message["seq"] not in self.held:
                            self.gap_filled.add(message["seq"])
                        self.receive(message)
                elif kind == "ready":
                    ready = True
                    self.ws = ws
                    # Like the page: what was never acknowledged goes again, with its nonce.
                    for item in list(self.unacked.values()):
                        await self.send(ws, item)
                    sender = asyncio.get_running_loop().create_task(self.send_steadily(ws))
                elif kind == "error":
                    self.errors[frame["code"]] += 1
        finally:
            self.ws = None
            for task in (sender, gap_check):
                if task is not None:
                    task.cancel()
            await ws.close()

    async def fill_gap(self, ws) -> None:
        """Like the page: a hole still open after a grace period is asked for with `history`.

        A message can be stored and never published: its server process died
        between the commit and the publish. Its sender and every client that
        reconnects get it on resuming; clients that stayed connected learn of
        it from the hole it leaves once the next message arrives.
        """
        await asyncio.sleep(GAP_GRACE)  # the page's grace period: the scenario
        above = [seq for seq in self.held if seq > self.contiguous]
        if not above:
            return
        before = min(above)
        limit = min(100, before - self.contiguous - 1)
        with contextlib.suppress(ConnectionClosed):
            await ws.send(json.dumps({"type": "history", "before": before, "limit": limit}))

    async def send_steadily(self, ws) -> None:
        interval = 1 / RATE
        await asyncio.sleep(random.uniform(0, interval))  # the load's pace (RATE), here and below: the scenario
        count = len(self.sends)
        while True:
            if self.sending:
                count += 1
                item = Send(uuid.uuid4().hex, f"{self.name} #{count}", time.monotonic())
                self.sends[item.nonce] = self.unacked[item.nonce] = item
                if not await self.send(ws, item):
                    return
            await asyncio.sleep(interval)

    async def send(self, ws, item: Send) -> bool:
        item.sent_at = time.monotonic()
        try:
            await ws.send(json.dumps({"type": "send", "body": item.body, "nonce": item.nonce}))
        except ConnectionClosed:
            return False
        return True

    def receive(self, message: dict, seen: set[int] | None = None) -> None:
        seq = message["seq"]
        item = self.sends.get(message["nonce"])
        if item is not None:
            if item.seq is None:
                item.seq, item.acked_at = seq, time.monotonic()
                self.unacked.pop(item.nonce, None)
            elif item.seq != seq:
                self.mismatches.append(f"nonce {item.nonce} acknowledged as seq {item.seq}, then as {seq}")
        if seen is not None:
            # The answer to a resent nonce may repeat a message this connection had; anything else may not.
            if seq in seen and item is None:
                self.repeats.append(seq)
            seen.add(seq)
        self.received_at.setdefault(seq, time.monotonic())
        previous = self.held.get(seq)
        if previous is not None and previous["id"] != message["id"]:
            self.mismatches.append(f"seq {seq} was message {previous['id']}, then {message['id']}")
        self.held[seq] = message
        while self.contiguous + 1 in self.held:
            self.contiguous += 1

    async def final_resume(self) -> int:
        """Reconnect once more, resume, and fill every hole with `history`; return the room's last seq."""
        last_error = None
        for _ in range(2 * len(self.servers)):
            try:
                ws = await self.connect()
                break
            except (OSError, InvalidHandshake, TimeoutError) as error:
                last_error = error
                self.server = (self.server + 1) % len(self.servers)
        else:
            raise AssertionError(f"{self.name} could not reconnect for the final resume: {last_error!r}")
        try:
            last_seq = None
            while last_seq is None:
                frame = json.loads(await asyncio.wait_for(ws.recv(), FRAME_TIMEOUT))
                if frame["type"] == "message":
                    self.receive(frame["message"])
                elif frame["type"] == "ready":
                    last_seq = frame["last_seq"]
            while missing := [seq for seq in range(1, last_seq + 1) if seq not in self.held]:
                start = end = missing[0]  # the first hole; `history` answers the newest `limit` below `before`
                for seq in missing[1:]:
                    if seq != end + 1:
                        break
                    end = seq
                limit = min(100, end - start + 1)
                await ws.send(json.dumps({"type": "history", "before": end + 1, "limit": limit}))
                while True:
                    frame = json.loads(await asyncio.wait_for(ws.recv(), FRAME_TIMEOUT))
                    if frame["type"] == "message":
                        self.receive(frame["message"])
                    elif frame["type"] == "history":
                        for message in frame["messages"]:
                            self.receive(message)
                        break
            return last_seq
        finally:
            await ws.close()


class Load:
    """CLIENTS clients in one public room, spread over the given server processes."""

    def __init__(self, clients: list[ChatClient]) -> None:
        self.clients = clients
        self.tasks: list[asyncio.Task] = []
        self.held_live: dict[str, set[int]] = {}
        self.stale_resends = 0  # sends resent on a socket that stayed open: their publish was lost

    @classmethod
    async def start(cls, servers: list[ServerProcess], count: int = CLIENTS) -> Load:
        slug, cookies = await database_sync_to_async(make_room_and_users)(count)
        clients = [
            ChatClient(name, cookie, slug, servers, index % len(servers))
            for index, (name, cookie) in enumerate(cookies)
        ]
        load = cls(clients)
        load.tasks = [asyncio.get_running_loop().create_task(client.run()) for client in clients]
        await load.wait(lambda: all(c.ws is not None for c in clients), 20, "every client live")
        return load

    async def wait(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"not within {timeout} s: {what}\n{self.describe()}")
            await asyncio.sleep(0.1)  # polling the condition until the deadline

    def live(self) -> int:
        return sum(client.ws is not None for client in self.clients)

    async def recover_and_finish(self, back_at: float) -> tuple[float, int]:
        """After Redis came back at `back_at`: (seconds to the first new acknowledgement, the room's last seq).

        Every client must be chatting again (a send made 5 s after Redis came back acknowledged) within 10 s
        of the first new acknowledgement.
        """
        await self.wait(lambda: self.first_ack_after(back_at) is not None, RECOVERY_LIMIT, "a new ack")
        first_ack = self.first_ack_after(back_at)
        recovery = first_ack - back_at

        def recovered(client: ChatClient) -> bool:
            return any(i.acked_at and i.sent_at >= back_at + 5 for i in client.sends.values())

        await self.wait(
            lambda: all(recovered(c) for c in self.clients),
            first_ack + 10 - time.monotonic(),
            "every client chatting again after Redis (a send made 5 s after it came back acknowledged)",
        )
        return recovery, await self.finish()

    async def finish(self) -> int:
        """Stop sending, let every send be acknowledged, then resume every client once more; return N."""
        for client in self.clients:
            client.sending = False

        async def drained() -> None:
            # Resends on a live socket too: a publish that failed leaves its sender waiting.
            while any(client.unacked for client in self.clients):
                now = time.monotonic()
                for client in self.clients:
                    if client.ws is not None:
                        for item in [i for i in client.unacked.values() if now - i.sent_at > 3]:
                            self.stale_resends += 1
                            await client.send(client.ws, item)
                await asyncio.sleep(0.2)  # polling for acknowledgements until wait_for's deadline

        try:
            await asyncio.wait_for(drained(), 30)
        except TimeoutError:
            raise AssertionError(f"sends still unacknowledged after 30 s\n{self.describe()}") from None
        await self.wait(lambda: self.live() == len(self.clients), 15, "every client live again")
        # The last broadcasts arrive. Only a client that never gets one (the assert in check_nothing_lost
        # names it) waits out the deadline.
        last = max(item.seq for item in self.acked().values())
        everything = set(range(1, last + 1))
        with contextlib.suppress(AssertionError):
            await self.wait(lambda: all(everything <= set(c.held) for c in self.clients), 5, "the last broadcasts")
        # What live delivery and resuming on reconnect gave each client, before any final catch-up.
        self.held_live = {client.name: set(client.held) for client in self.clients}
        await self.stop()
        last_seqs = await asyncio.gather(*(client.final_resume() for client in self.clients))
        assert len(set(last_seqs)) == 1, f"clients resumed to different last seqs: {Counter(last_seqs)}"
        return last_seqs[0]

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def first_ack_after(self, moment: float) -> float | None:
        """When the first message sent at or after `moment` was acknowledged."""
        times = [
            item.acked_at
            for client in self.clients
            for item in client.sends.values()
            if item.acked_at is not None and item.sent_at >= moment
        ]
        return min(times, default=None)

    def acked(self) -> dict[str, Send]:
        return {n: item for client in self.clients for n, item in client.sends.items() if item.seq is not None}

    def describe(self) -> str:
        sends = sum(len(c.sends) for c in self.clients)
        closes = Counter(code for c in self.clients for _, code in c.closes)
        errors = sum((c.errors for c in self.clients), Counter())
        failed = sum((c.failed_connects for c in self.clients), Counter())
        exits = {server.name: server.proc.poll() for server in self.clients[0].servers}
        return (
            f"exit codes {exits}, live {self.live()}/{len(self.clients)}, sends {sends}, acked {len(self.acked())}, "
            f"connects {sum(c.connects for c in self.clients)}, "
            f"failed connects {dict(failed)}, closes {dict(closes)}, "
            f"errors {dict(errors)}"
        )


def make_room_and_users(count: int) -> tuple[str, list[tuple[str, str]]]:
    User = get_user_model()
    users = [User.objects.create_user(f"load{index:02d}") for index in range(count)]  # no password: fast
    room = services.room_create(slug="load", name="Load", created_by=users[0])
    return room.slug, [(user.username, session_cookie(user)) for user in users]


@database_sync_to_async
def stored(slug: str) -> list[dict]:
    room = Room.objects.get(slug=slug)
    rows = Message.objects.filter(room=room).order_by("seq").values("seq", "id", "body", "nonce")
    return list(rows)


async def check_nothing_lost(load: Load, last_seq: int, *, holes_allowed: bool = False) -> dict:
    """Every acknowledged send stored exactly once; every client holds exactly the room's messages.

    Unless `holes_allowed` (a server process was killed, so a publish may have
    died with it), no client had to ask for a hole: live delivery and resuming
    on reconnect gave it everything.
    """
    rows = await stored(load.clients[0].slug)
    seqs = [row["seq"] for row in rows]
    assert seqs == list(range(1, len(rows) + 1)), "the room's seqs are not 1..N"
    assert last_seq == len(rows)

    by_nonce = Counter(row["nonce"] for row in rows)
    repeated = [nonce for nonce, count in by_nonce.items() if count > 1]
    assert not repeated, f"nonces stored more than once: {repeated[:5]}"
    row_by_nonce = {row["nonce"]: row for row in rows}
    acked = load.acked()
    missing = [n for n in acked if n not in row_by_nonce]
    assert not missing, f"{len(missing)} acknowledged messages are not in the database: {missing[:5]}"
    wrong = [
        n for n, item in acked.items() if (row_by_nonce[n]["seq"], row_by_nonce[n]["body"]) != (item.seq, item.body)
    ]
    assert not wrong, f"acknowledged messages stored with another seq or body: {wrong[:5]}"
    sent = {n for c in load.clients for n in c.sends}
    assert set(by_nonce) <= sent, "the database holds messages nobody sent"

    # The hub closes every socket whose subscription may have missed a message, so reconnecting and
    # resuming (and, where a publish died with its process, asking for the hole) gave every client
    # every message before the final catch-up.
    behind = {name: len(set(seqs) - held) for name, held in load.held_live.items() if set(seqs) - held}
    assert not behind, f"messages missing before the final resume, by client: {behind}"
    holes = {client.name: sorted(client.gap_filled) for client in load.clients if client.gap_filled}
    assert holes_allowed or not holes, f"holes a client had to ask for, with no process killed: {holes}"
    expected = [(row["seq"], row["id"], row["body"]) for row in rows]
    for client in load.clients:
        held = [(m["seq"], m["id"], m["body"]) for _, m in sorted(client.held.items())]
        assert held == expected, f"{client.name} holds {len(held)} messages, the room {len(expected)}"
        assert not client.repeats, f"{client.name}: one connection delivered seqs twice: {client.repeats[:10]}"
        assert not client.mismatches, f"{client.name}: {client.mismatches[:5]}"
    unpublished = len(set().union(*holes.values())) if holes else 0
    return {"messages": len(rows), "acked": len(acked), "stale_resends": load.stale_resends, "unpublished": unpublished}


def http_get_seconds(server: ServerProcess, timeout: float) -> float:
    """GET / and return how long the answer took; raise if it does not come within `timeout`."""
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        conn.request("GET", "/")
        response = conn.getresponse()
        response.read()
        assert response.status == 200, f"GET / on {server.name} answered {response.status}"
    finally:
        conn.close()
    return time.monotonic() - started


def report(name: str, **numbers) -> None:
    print(f"\n[{name}] " + ", ".join(f"{key}={value}" for key, value in numbers.items()))


def assert_logged_once_per_server(servers: list[ServerProcess], marker: str) -> None:
    for server in servers:
        count = server.log_text().count(marker)
        assert count == 1, f"{marker!r} logged {count} times by {server.name}\n{server.log_tail()}"


# --------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------


# How long each Redis outage lasts (seconds), and how it is made.
OUTAGES = {"killed": 10.0, "frozen": 15.0, "blackholed": 15.0}
DELIVERY_LIMIT = 3.0  # seconds from a message's acknowledgement to its arrival at every client
ANSWER_LIMIT = 1.0  # seconds a page or a new socket's resume may take while Redis is away
OUTAGE_CLIENTS = 24


def begin_outage(outage: str, redis: RedisServer, link: StallingTcpProxy) -> None:
    {"killed": redis.kill, "frozen": redis.freeze, "blackholed": link.stall}[outage]()


def end_outage(outage: str, redis: RedisServer, link: StallingTcpProxy) -> None:
    {"killed": redis.start, "frozen": redis.thaw, "blackholed": link.flow}[outage]()


async def resume_seconds(client: ChatClient, server: ServerProcess) -> float:
    """Open a new socket resuming from the client's position; return how long until `ready`."""
    started = time.monotonic()
    probe = ChatClient(f"{client.name}-probe", client.cookie, client.slug, [server], 0, contiguous=client.contiguous)
    ws = await probe.connect()
    try:
        while json.loads(await asyncio.wait_for(ws.recv(), FRAME_TIMEOUT))["type"] != "ready":
            pass
        return time.monotonic() - started
    finally:
        await ws.close()


def delivery_delays(load: Load, since: float, until: float) -> list[float]:
    """For each message acknowledged in [since, until], and each client: seconds from the ack to its arrival.

    A client that never got it counts as infinitely late.
    """
    delays = []
    for item in load.acked().values():
        if item.acked_at is not None and since <= item.acked_at <= until:
            for client in load.clients:
                arrived = client.received_at.get(item.seq)
                delays.append(float("inf") if arrived is None else max(0.0, arrived - item.acked_at))
    return delays


@pytest.mark.slow
@pytest.mark.parametrize("outage", OUTAGES)
async def test_the_chat_goes_on_while_redis_is_away(outage, cluster_through_link, own_redis, redis_link):
    async with asyncio.timeout(TEST_LIMIT):
        servers = await cluster_through_link.start(2)
        load = await Load.start(servers, OUTAGE_CLIENTS)
        try:
            await asyncio.sleep(4)  # the scenario: 4 s of chat before the outage
            assert len(load.acked()) > OUTAGE_CLIENTS * 4, f"too few acknowledged before the outage\n{load.describe()}"
            begin_outage(outage, own_redis, redis_link)
            began = time.monotonic()
            pages, resumes = [], []
            while time.monotonic() - began < OUTAGES[outage]:
                for server in servers:
                    pages.append(await asyncio.to_thread(http_get_seconds, server, 5.0))
                    resumes.append(await resume_seconds(load.clients[0], server))
                await asyncio.sleep(1)  # the scenario: a page load and a resume a second on each server
            end_outage(outage, own_redis, redis_link)
            ended = time.monotonic()
            await asyncio.sleep(6)  # the scenario: 6 s of chat once Redis is back
            last_seq = await load.finish()
        finally:
            await load.stop()
        numbers = await check_nothing_lost(load, last_seq)

    # Nobody was disconnected, and every message reached everyone in time and in order.
    assert not any(c.closes or c.failed_connects for c in load.clients), load.describe()
    during = delivery_delays(load, began, ended)
    overall = delivery_delays(load, 0, float("inf"))
    assert len(during) >= OUTAGE_CLIENTS * OUTAGE_CLIENTS * OUTAGES[outage], "too few messages during the outage"
    assert max(overall) <= DELIVERY_LIMIT, f"a message took {max(overall):.2f} s to reach a client"
    assert not any(c.out_of_order for c in load.clients), {c.name: c.out_of_order[:5] for c in load.clients}
    assert max(pages) < ANSWER_LIMIT, f"GET / took up to {max(pages):.2f} s while Redis was {outage}"
    assert max(resumes) < ANSWER_LIMIT, f"a resume took up to {max(resumes):.2f} s while Redis was {outage}"
    # It switched to the database and back by itself, once each, and said so once.
    assert_logged_once_per_server(servers, "Fan-out lost its channel-layer subscription")
    assert_logged_once_per_server(servers, "Fan-out's channel-layer subscription is back")
    for server in servers:  # once for the outage, not once a second or once per message
        log = server.log_text()
        assert log.count("The channel layer (Redis) is unreachable") <= 2, server.log_tail()
        assert log.count("Unexpected exception in receive task") <= 1, server.log_tail()
        assert "in on_commit()" not in log, server.log_tail()
    during.sort()
    report(
        f"redis-{outage}",
        outage_s=OUTAGES[outage],
        delivered_during=len(during),
        delay_p50_ms=round(1000 * during[len(during) // 2]),
        delay_p99_ms=round(1000 * during[int(len(during) * 0.99)]),
        delay_max_ms=round(1000 * max(overall)),
        page_max_ms=round(1000 * max(pages)),
        resume_max_ms=round(1000 * max(resumes)),
        **numbers,
        load=load.describe(),
    )


@pytest.mark.slow
async def test_a_server_process_killed_under_load_loses_nothing(cluster_on_own_redis, own_redis):
    async with asyncio.timeout(TEST_LIMIT):
        servers = await cluster_on_own_redis.start(2)
        load = await Load.start(servers)
        try:
            await asyncio.sleep(5)  # the scenario: 5 s of chat before the fault
            servers[1].kill()  # SIGKILL: its clients must move to the other process
            killed_at = time.monotonic()
            await load.wait(
                lambda: load.live() == CLIENTS and all(c.server == 0 for c in load.clients),
                15,
                f"all on {servers[0].name}",
            )
            moved = time.monotonic() - killed_at
            await asyncio.sleep(8)  # the scenario: 8 s of chat on the surviving process
            last_seq = await load.finish()
        finally:
            await load.stop()
        numbers = await check_nothing_lost(load, last_seq, holes_allowed=True)
    report("server-kill", moved_s=round(moved, 2), **numbers, load=load.describe())


class DeafeningLayer:
    """A channel layer whose subscription can go deaf without an error: publishes succeed, nothing arrives."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()
        self.deaf = False
        self.groups_added: list[str] = []

    async def new_channel(self, prefix: str = "") -> str:
        return f"{prefix}hub"

    async def send(self, channel: str, message: dict) -> None:
        if not self.deaf:
            self.queue.put_nowait(message)

    async def receive(self, channel: str) -> dict:
        return await self.queue.get()

    async def group_add(self, group: str, channel: str) -> None:
        self.groups_added.append(group)

    async def group_discard(self, group: str, channel: str) -> None:
        pass


async def test_a_hub_that_stops_hearing_its_subscription_follows_the_database_and_switches_back(
    monkeypatch, user, room
):
    monkeypatch.setattr(fanout, "PROBE_INTERVAL", 0.02)
    layer = DeafeningLayer()
    hub = fanout.RoomHub(layer)
    sent: list[dict] = []

    async def send(event: dict) -> None:
        sent.append(event)

    def frames() -> list[dict]:
        return [json.loads(e["text"]) for e in sent if e["type"] == "websocket.send"]

    async def eventually(condition, what: str) -> None:
        deadline = time.monotonic() + 3
        while not condition():
            assert time.monotonic() < deadline, f"not within 3 s: {what}; frames {frames()}"
            await asyncio.sleep(0.01)  # polling the condition until the deadline

    post = database_sync_to_async(services.message_create)
    try:
        hub.ready(await hub.join(room.pk, send, user.username), 0)
        poll = await hub.watch(room.pk)
        layer.deaf = True  # no error anywhere: the probes just stop coming back
        await eventually(lambda: hub.down, "the hub noticed")
        assert frames() == [{"type": "delivery", "mode": "delayed"}]
        await post(room=room, author=user, body="while deaf")  # published elsewhere: this hub never hears it
        await eventually(lambda: len(frames()) == 2, "the message, from the database")
        assert frames()[1]["message"]["body"] == "while deaf"
        assert [m["body"] for m in poll.messages] == ["while deaf"]  # long-polls are fed the same way
        late = await hub.join(room.pk, send, "bob")  # a socket opened meanwhile is accepted, and told
        hub.ready(late, 1)
        await eventually(lambda: len(frames()) == 3, "the late socket told")
        assert frames()[2] == {"type": "delivery", "mode": "delayed"}
        assert hub.rooms[room.pk] and not any(s.closed for s in hub.rooms[room.pk])

        layer.deaf = False
        await eventually(lambda: not hub.down, "the hub back")
        assert layer.groups_added.count(realtime.room_group(room.pk)) == 2  # joined, and joined again
        await eventually(lambda: len(frames()) == 5, "both sockets told")
        assert frames()[3:] == [{"type": "delivery", "mode": "live"}] * 2
        await post(room=room, author=user, body="after")
        await eventually(lambda: len(frames()) == 7, "the next message, to both sockets")
        bodies = [f["message"]["body"] for f in frames() if f["type"] == "message"]
        assert bodies == ["while deaf", "after", "after"]  # each once per socket, whichever path brought it
    finally:
        for task in hub.tasks:
            task.cancel()


@pytest.mark.slow
async def test_a_socket_opened_while_redis_is_down_gets_messages_from_the_database_then_live(
    cluster_on_own_redis, own_redis
):
    (server,) = await cluster_on_own_redis.start(1)
    slug, [(_, alice), (_, bob)] = await database_sync_to_async(make_room_and_users)(2)
    own_redis.kill()

    async with asyncio.timeout(30):
        sockets = []
        for cookie in (alice, bob):
            ws = await ChatClient("client", cookie, slug, [server], 0).connect()
            frames = [json.loads(await ws.recv()) for _ in range(2)]
            assert frames == [
                {"type": "ready", "last_seq": 0, "last_change": 0},
                {"type": "delivery", "mode": "delayed"},
            ]
            sockets.append(ws)
        await sockets[0].send(json.dumps({"type": "send", "body": "hello", "nonce": "n1"}))
        for ws in sockets:
            frame = json.loads(await ws.recv())
            assert (frame["type"], frame["message"]["body"]) == ("message", "hello")

        own_redis.start()
        for ws in sockets:
            frame = json.loads(await ws.recv())
            while frame["type"] == "presence":
                frame = json.loads(await ws.recv())
            assert frame == {"type": "delivery", "mode": "live"}
        await sockets[1].send(json.dumps({"type": "send", "body": "back", "nonce": "n2"}))
        for ws in sockets:
            frame = json.loads(await ws.recv())
            while frame["type"] == "presence":
                frame = json.loads(await ws.recv())
            assert (frame["type"], frame["message"]["body"]) == ("message", "back")
        for ws in sockets:
            await ws.close()
    # Redis's absence is logged (with tracebacks from the layer's reader); no connection may raise out of the app.
    assert_no_app_errors(server, ASGI_ERROR_MARKERS)


async def test_a_message_whose_publisher_died_reaches_connected_clients_in_a_quiet_room(
    sockets, cluster, alice_cookie, bob_cookie, room, user, monkeypatch
):
    (server,) = await cluster.start(1)
    alice, _, _ = await sockets.join(server, alice_cookie, room.slug)
    bob, _, _ = await sockets.join(server, bob_cookie, room.slug)
    # Committed, never published: as if its process died between the two.
    monkeypatch.setattr(realtime, "publish_message", lambda message: None)
    await database_sync_to_async(services.message_create)(room=room, author=user, body="orphan")
    started = time.monotonic()
    for ws in (alice, bob):
        assert (await sockets.recv_message(ws, "the orphaned message"))["body"] == "orphan"
    assert time.monotonic() - started < 5
    await sockets.assert_silent(alice, "alice")


def api_post_seconds(server: ServerProcess, secret: str, slug: str, body: str) -> tuple[int, float]:
    """POST a message through the API; return its status and how long the answer took."""
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        payload = json.dumps({"body": body, "nonce": uuid.uuid4().hex})
        headers = {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}
        conn.request("POST", f"/api/rooms/{slug}/messages", payload, headers)
        response = conn.getresponse()
        response.read()
    finally:
        conn.close()
    return response.status, time.monotonic() - started


async def test_with_redis_frozen_an_api_post_is_stored_and_answered_within_a_second(
    cluster_on_own_redis, own_redis, user
):
    def room_and_token() -> tuple[str, str]:
        room = services.room_create(slug="frozen", name="Frozen", created_by=user)
        return room.slug, services.token_create(user=user, name="frozen bot")[1]

    slug, secret = await database_sync_to_async(room_and_token)()
    (server,) = await cluster_on_own_redis.start(1)
    assert (await asyncio.to_thread(api_post_seconds, server, secret, slug, "before"))[0] == 201
    own_redis.freeze()
    try:
        answers = [await asyncio.to_thread(api_post_seconds, server, secret, slug, f"frozen {n}") for n in range(3)]
    finally:
        own_redis.thaw()
    assert [status for status, _ in answers] == [201, 201, 201]
    assert max(seconds for _, seconds in answers) < 1, answers
    stored = await database_sync_to_async(
        lambda: list(Message.objects.filter(room__slug=slug).values_list("body", flat=True))
    )()
    assert stored == ["before", "frozen 0", "frozen 1", "frozen 2"]
