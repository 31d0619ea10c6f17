"""The load of the reliability tests: chat clients that behave like the room page.

Each client sends at a steady rate while its socket is live, keeps messages
by seq, reconnects with backoff and `?after=` the highest seq it holds
without a hole, fills holes with `history`, and sends again (same nonce)
what was never acknowledged: after a reconnect, and, with backoff, after a
`not_saved` error (the server could not save it). `check_nothing_lost`
compares what every client holds with what the database stores.

tests/reliability/test_faults.py (Redis and server faults) and
test_database.py (PostgreSQL restarted) share it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import websockets
from channels.db import database_sync_to_async
from django.conf import settings
from django.contrib.auth import get_user_model
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from bench.serverprocess import ServerProcess
from chat import services
from chat.models import Message, Room
from tests.helpers import session_cookie

RATE = 2.0  # messages per second per client, while it is live
RECOVERY_LIMIT = 10.0  # seconds from the fault's end to the first acknowledged new message
FRAME_TIMEOUT = 10.0
BACKOFF_MAX = 2.0
GAP_GRACE = 1.0  # seconds a hole may stay open before the client asks for it, as the page does
# Error codes after which the page sends the same nonce again (chat/static/chat/room/composer.js), and its backoff.
RETRYABLE = ("not_saved", "database_unavailable")
RETRY_FIRST = 0.5
RETRY_MAX = 5.0


@dataclass
class Send:
    nonce: str
    body: str
    sent_at: float  # the latest (re)send
    acked_at: float | None = None
    seq: int | None = None
    not_saved: int = 0  # error frames that said the server could not save it
    retries: int = 0  # resends after those, same nonce


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
    delivered: set[tuple[int, int, str | None]] = field(default_factory=set)  # (seq, id, nonce) of every message seen
    received_at: dict[int, float] = field(default_factory=dict)  # seq -> when it first arrived
    out_of_order: list[tuple[int, int]] = field(default_factory=list)  # (seq, after seq) on one connection
    delivery: list[tuple[float, str]] = field(default_factory=list)  # (when, "live" or "delayed") as told

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
        retries: set[asyncio.Task] = set()
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
                elif kind == "delivery":
                    self.delivery.append((time.monotonic(), frame["mode"]))
                elif kind == "error":
                    self.errors[frame["code"]] += 1
                    item = self.unacked.get(frame.get("nonce"))
                    if item is not None and frame["code"] in RETRYABLE:
                        item.not_saved += 1
                        retries.add(asyncio.get_running_loop().create_task(self.retry_later(ws, item)))
        finally:
            self.ws = None
            for task in (sender, gap_check, *retries):
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

    async def retry_later(self, ws, item: Send) -> None:
        """Like the page: a send the server could not save goes again, same nonce, after a backoff."""
        delay = min(RETRY_MAX, RETRY_FIRST * 2 ** (item.not_saved - 1))
        await asyncio.sleep(delay * random.uniform(0.75, 1.25))  # the page's retry backoff: the scenario
        if item.seq is None:
            item.retries += 1
            await self.send(ws, item)

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
        self.delivered.add((seq, message["id"], message["nonce"]))
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
    """Chat clients in one public room, spread over the given server processes."""

    def __init__(self, clients: list[ChatClient]) -> None:
        self.clients = clients
        self.tasks: list[asyncio.Task] = []
        self.held_live: dict[str, set[int]] = {}
        self.stale_resends = 0  # sends resent on a socket that stayed open: their publish was lost

    @classmethod
    async def start(cls, servers: list[ServerProcess], count: int) -> Load:
        slug, cookies = await database_sync_to_async(make_room_and_users)(count)
        return await cls.begin(slug, cookies, servers)

    @classmethod
    async def begin(cls, slug: str, cookies: list[tuple[str, str]], servers: list) -> Load:
        """Start a client for each (name, session cookie), spread over `servers`; return once all are live."""
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
        """After the fault ended at `back_at`: (seconds to the first new acknowledgement, the room's last seq).

        Every client must be chatting again (a send made 5 s after the fault ended acknowledged) within 10 s
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
            "every client chatting again after the fault (a send made 5 s after it ended acknowledged)",
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

    def not_saved(self) -> int:
        """How many sends the server answered `not_saved`."""
        return sum(client.errors["not_saved"] for client in self.clients)

    def acked(self) -> dict[str, Send]:
        return {n: item for client in self.clients for n, item in client.sends.items() if item.seq is not None}

    def describe(self) -> str:
        sends = sum(len(c.sends) for c in self.clients)
        closes = Counter(code for c in self.clients for _, code in c.closes)
        errors = sum((c.errors for c in self.clients), Counter())
        failed = sum((c.failed_connects for c in self.clients), Counter())
        exits = {server.name: server.proc.poll() for server in self.clients[0].servers if server.proc is not None}
        return (
            f"exit codes {exits}, live {self.live()}/{len(self.clients)}, sends {sends}, acked {len(self.acked())}, "
            f"connects {sum(c.connects for c in self.clients)}, "
            f"failed connects {dict(failed)}, closes {dict(closes)}, "
            f"errors {dict(errors)}"
        )


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


async def check_nothing_lost(
    load: Load, last_seq: int, *, holes_allowed: bool = False, rows: list[dict] | None = None
) -> dict:
    """Every acknowledged send stored exactly once; no client ever shown a message the database does not
    hold; every client holds exactly the room's messages.

    Unless `holes_allowed` (a message may have been stored and never
    published: its server process was killed, or the database went away
    between its commit and the answer), no client had to ask for a hole: live
    delivery and resuming on reconnect gave it everything. `rows` (seq, id,
    body, nonce) are the room's stored messages, read from the test database unless given.
    """
    if rows is None:
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

    # Live delivery (from Redis, or from the database while Redis is away) and resuming on reconnect
    # (and, where a publish died with its process, asking for the hole) gave every client every
    # message before the final catch-up.
    behind = {name: len(set(seqs) - held) for name, held in load.held_live.items() if set(seqs) - held}
    assert not behind, f"messages missing before the final resume, by client: {behind}"
    holes = {client.name: sorted(client.gap_filled) for client in load.clients if client.gap_filled}
    assert holes_allowed or not holes, f"holes a client had to ask for, with no process killed: {holes}"
    # Not even for a moment: a message is published only once its transaction committed.
    committed = {(row["seq"], row["id"], row["nonce"]) for row in rows}
    for client in load.clients:
        phantoms = sorted(client.delivered - committed)
        assert not phantoms, f"{client.name} was shown messages the database does not hold: {phantoms[:5]}"
    expected = [(row["seq"], row["id"], row["body"]) for row in rows]
    for client in load.clients:
        held = [(m["seq"], m["id"], m["body"]) for _, m in sorted(client.held.items())]
        assert held == expected, f"{client.name} holds {len(held)} messages, the room {len(expected)}"
        assert not client.repeats, f"{client.name}: one connection delivered seqs twice: {client.repeats[:10]}"
        assert not client.mismatches, f"{client.name}: {client.mismatches[:5]}"
    unpublished = len(set().union(*holes.values())) if holes else 0
    return {"messages": len(rows), "acked": len(acked), "stale_resends": load.stale_resends, "unpublished": unpublished}


def report(name: str, **numbers) -> None:
    print(f"\n[{name}] " + ", ".join(f"{key}={value}" for key, value in numbers.items()))


def assert_logged_once_per_server(servers: list[ServerProcess], marker: str) -> None:
    for server in servers:
        count = server.log_text().count(marker)
        assert count == 1, f"{marker!r} logged {count} times by {server.name}\n{server.log_tail()}"
