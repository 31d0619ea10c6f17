"""Process-local fan-out: one channel-layer subscription per room per process.

The Channels way gives every socket its own layer channel, group membership,
queue, dispatch loop, msgpack decode, JSON encode and, per event, a thread
hop to close old database connections. Here each server process joins a
room's group once, with one channel of its own, encodes each message's frame
once, and hands it to every local socket's ASGI `send`: directly when the
server says the send will not wait, else through a writer task per socket
that exists only while that socket has frames waiting (chat/serversend.py).
It is the only way a socket receives room events. Each hub also joins one
site-wide group, for events about a browser session in every room (signing
out).

Redis pub/sub through the channel layer stays the only fast path between
processes (docs/performance.md has the measurements), but the database holds
the truth, and the hub follows it too. Twice a second it reads where its
rooms stand (one query for all of them) and compares that with what it has
delivered (a RoomCursor per room, which live events and rows from the
database both pass through, so nothing is delivered twice):

- While the subscription is down (Redis killed, frozen or unreachable), it
  delivers from the database whatever its rooms' sockets and long-polls have
  not had: the same frames, in seq order, about half a second late. Sockets
  stay open; they are told delivery is delayed and presence unknown. The
  hub checks every second whether its subscription is back (it publishes a
  probe to its own channel and expects to hear it), then re-joins its groups
  and reads the database once more, so nothing published in between is lost.
- While live, a message committed more than a second ago that never arrived
  (its publisher died between commit and publish) is read from the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Collection
from contextvars import Context
from typing import Any, TypeVar, cast

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings

from chat import ephemeral, presence, protocol, realtime, selectors, serversend
from chat.serversend import Send

logger = logging.getLogger(__name__)
T = TypeVar("T")

LAYER_ERRORS = realtime.LAYER_ERRORS
PROBE_EVENT = "fanout.probe"
PROBE_INTERVAL = 1.0  # seconds between probes of the hub's subscription
PROBE_TIMEOUT = 2.0  # seconds a probe's publish may take before Redis counts as away
PROBES_MISSED = 3  # probes published but not heard back: the subscription is lost
FOLLOW_INTERVAL = 0.5  # seconds between reads of where the hub's rooms stand in the database
HOLE_GRACE = 1.0  # seconds a committed message may take to arrive live before it is read from the database
# Seconds after the subscription is back during which anything missing is read at once: publishers
# that failed a moment ago skip Redis for a second (chat/ephemeral.py), so their messages never arrive live.
SETTLE_SECONDS = 3.0
# Seconds a message published above a hole waits for the ones below before they are read from the database.
HOLE_WAIT = 0.2
# Seconds at least between two reads of the database, however often the hub is woken (a failed publish wakes it).
READ_GAP = 0.1


class LocalSocket:
    """One socket of this process, as the hub sees it."""

    __slots__ = (
        "room_id", "send", "raw", "user", "session", "writable", "replayed_through", "changes_through", "held",
        "outbox", "writer", "closed",
    )  # fmt: skip

    def __init__(
        self,
        room_id: int,
        send: Send,
        user: str,
        session: str,
        writable: asyncio.Event | None,
        raw: serversend.RawWriter | None = None,
    ) -> None:
        self.room_id = room_id
        self.send = send
        # Writes a frame made once for the whole room, where the server allows it (chat/serversend.py).
        self.raw = raw
        self.user = user
        # The browser session's key: signing out closes that session's sockets only.
        self.session = session
        # Set while the server's send will not wait (chat/serversend.py); None: always through the writer.
        self.writable = writable
        # None while the consumer replays missed messages: events are held
        # until then, and afterwards only those above this seq are sent.
        self.replayed_through: int | None = None
        self.changes_through = 0
        self.held: list[tuple[str, int | None, int | None]] = []
        # Frames not yet handed to the server, written in order by one task
        # that exists only while there is something to write.
        self.outbox: deque[str] = deque()
        self.writer: asyncio.Task | None = None
        self.closed = False


class RoomCursor:
    """What the hub has handed a room's sockets: each message once and in seq order, each change once.

    `seq`: every message up to it was delivered. A message published out of
    order (publishers in different processes may publish 6 before 5, and a
    publisher may die between commit and publish) waits in `held` until the
    ones below it arrive, live or read from the database. `change`: every edit
    or deletion up to it was delivered, and those in `changes_above` (change
    numbers have gaps: a message edited twice keeps only its last). Both are
    None until the room's first socket (or long-poll) has read the database;
    until then messages are only noted in `seqs_above`, and each replaying
    socket filters them itself.
    """

    __slots__ = (
        "seq", "seqs_above", "held", "held_since", "change", "changes_above", "awaited_seq", "awaited_change",
    )  # fmt: skip

    def __init__(self) -> None:
        self.seq: int | None = None
        self.seqs_above: set[int] = set()
        self.held: dict[int, dict[str, Any]] = {}
        self.held_since: float | None = None
        self.change: int | None = None
        self.changes_above: set[int] = set()
        # (position in the database, when it was first seen there) of what has not arrived yet.
        self.awaited_seq: tuple[int, float] | None = None
        self.awaited_change: tuple[int, float] | None = None

    def start(self, seq: int, change: int | None) -> None:
        """Set where the room stood when it was first read; later reads do not move it back."""
        if self.seq is None:
            self.seq = seq
            self.seqs_above = {s for s in self.seqs_above if s > seq}
            while self.seq + 1 in self.seqs_above:
                self.seq += 1
                self.seqs_above.remove(self.seq)
            # Above a hole: the next read of the database fills it.
            self.held_since = time.monotonic() if self.seqs_above else None
        if self.change is None and change is not None:
            self.change = change
            self.changes_above = {c for c in self.changes_above if c > change}

    def settled_at(self, seq: int | None, change: int | None) -> tuple[int, int] | None:
        """Return (seq, change) if this is exactly what was handed out, with nothing held or noted above it.

        `None` asks for wherever the cursor stands. A socket or poll that has
        that much needs nothing from the database: what comes next reaches it
        through the hub, live or read by the follower.
        """
        if self.seq is None or self.change is None or self.held or self.seqs_above or self.changes_above:
            return None
        if (seq is not None and seq != self.seq) or (change is not None and change != self.change):
            return None
        return self.seq, self.change

    def admit(self, event: dict[str, Any]) -> bool:
        """True if a message event is the next to deliver; one already delivered or above a hole is not."""
        seq = event["seq"]
        if self.has_seq(seq) or seq in self.held:
            return False
        if self.seq is None:
            self.seqs_above.add(seq)
        elif seq == self.seq + 1:
            self.seq = seq
            while self.seq + 1 in self.seqs_above:  # delivered while the room's first socket replayed
                self.seq += 1
                self.seqs_above.remove(self.seq)
        else:
            self.held[seq] = event
            self.held_since = self.held_since or time.monotonic()
            return False
        return True

    def release(self) -> list[dict[str, Any]]:
        """Return the held message events that are next in line now, in seq order."""
        released = []
        while self.seq is not None and self.seq + 1 in self.held:
            self.seq += 1
            released.append(self.held.pop(self.seq))
        if self.seq is not None:
            self.held = {seq: event for seq, event in self.held.items() if seq > self.seq}
        if not self.held and not self.seqs_above:
            self.held_since = None
        return released

    def take_change(self, change: int) -> bool:
        """Count an edit or deletion as delivered; False if it was already."""
        if (self.change is not None and change <= self.change) or change in self.changes_above:
            return False
        self.changes_above.add(change)
        return True

    def has_seq(self, seq: int) -> bool:
        return (self.seq is not None and seq <= self.seq) or seq in self.seqs_above

    def skip_to(self, seq: int) -> None:
        """The sockets resume from the database themselves: count everything up to `seq` as theirs."""
        if self.seq is not None and seq > self.seq:
            self.seq = seq
            self.release()

    def changes_read(self, through: int) -> None:
        """Every change up to `through` was read from the database, or heard, and delivered."""
        if self.change is not None and through > self.change:
            self.change = through
            self.changes_above = {c for c in self.changes_above if c > through}

    def missing(self, position: selectors.RoomPosition, now: float, grace: float) -> bool:
        """True when the database holds a message or change this room's sockets have not had for `grace` seconds.

        A message above a hole waits at most HOLE_WAIT, whatever the grace.
        """
        assert self.seq is not None and self.change is not None
        if position.last_seq <= self.seq:
            self.awaited_seq = None
        elif self.awaited_seq is None or self.awaited_seq[0] <= self.seq:
            self.awaited_seq = (position.last_seq, now)
        newest_change_heard = position.last_change <= self.change or position.last_change in self.changes_above
        if newest_change_heard:
            # Live, a lost change that a later one overtook stays lost (docs/reliability.md#known-limits).
            self.changes_read(position.last_change)
            self.awaited_change = None
        elif self.awaited_change is None:
            self.awaited_change = (position.last_change, now)
        if self.held_since is not None and now - self.held_since >= HOLE_WAIT:
            return True
        return any(
            awaited is not None and now - awaited[1] >= grace for awaited in (self.awaited_seq, self.awaited_change)
        )


class Watch:
    """The messages published to one room while a long-poll waits, as message payloads, in arrival order."""

    __slots__ = ("published", "messages", "cursor", "waiting")

    def __init__(self, cursor: RoomCursor) -> None:
        self.published = asyncio.Event()
        self.messages: list[dict[str, Any]] = []
        self.cursor = cursor
        # Past its read of the database (or sure it needs none), and waiting.
        self.waiting = False

    def read_through(self, last_seq: int) -> None:
        """The poll read the room up to `last_seq`: the hub follows the room from there at the latest."""
        self.cursor.start(last_seq, None)

    def delivered_through(self, seq: int) -> bool:
        """True if a poll that has every message up to `seq` need not read the database (RoomCursor.settled_at)."""
        return self.cursor.settled_at(seq, None) is not None

    async def wait(self, timeout: float) -> bool:
        """Wait for the room's next message (True), or until `timeout` runs out (False)."""
        self.waiting = True
        try:
            await asyncio.wait_for(self.published.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def add(self, message: dict[str, Any]) -> None:
        self.messages.append(message)
        self.published.set()


class DirectSend:
    """ASGI middleware, outermost: keep the server's own `send` in the scope.

    Frames the hub sends need none of the middleware below (the session
    middleware alone inspects the session on every send), so the hub writes
    to the server directly.
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        return await self.app({**scope, "fanout.send": send}, receive, send)


class RoomHub:
    """The rooms with sockets in this process (one hub per event loop)."""

    def __init__(self, channel_layer) -> None:
        self.layer = channel_layer
        self.max_backlog: int = settings.CHAT_SOCKET_MAX_BACKLOG
        self.rooms: dict[int, set[LocalSocket]] = {}
        # Long-polls waiting for the next message in a room (chat/longpoll.py).
        self.waiters: dict[int, set[Watch]] = {}
        # What each room with sockets or long-polls here has been delivered.
        self.cursors: dict[int, RoomCursor] = {}
        self.channel: str | None = None
        # The monitor and the follower, started with the first socket or poll; the reader, once subscribed.
        self.tasks: list[asyncio.Task] = []
        self.reader: asyncio.Task | None = None
        # How the server takes frames, found at the first socket (one server per process).
        self.send_mode: serversend.SendMode | None = None
        # Pings the live sockets whose server lets it (chat/serversend.py).
        self.keepalive = serversend.Keepalive()
        self.lock = asyncio.Lock()
        # Set while the subscription is lost: rooms are followed from the database until a probe is heard.
        self.down = False
        self.probes_sent = self.probes_heard = self.down_since = 0
        # When the subscription was last back (time.monotonic()).
        self.back_at = -SETTLE_SECONDS
        self.follow_now = asyncio.Event()
        self.follow_failing = False
        # Rooms whose presence this process has yet to count again after Redis was away.
        self.recount_rooms: set[int] = set()

    async def join(self, room_id: int, send: Send, user: str = "", session: str = "") -> LocalSocket:
        """Register a socket; the room is followed (live, or from the database) before this returns."""
        if self.send_mode is None:
            self.send_mode = serversend.detect(send)
        mode = self.send_mode
        socket = LocalSocket(room_id, send, user, session, mode.writable(send), mode.raw_writer(send))
        async with self.lock:
            await self._subscribe(room_id)
            self.rooms.setdefault(room_id, set()).add(socket)
        return socket

    async def watch(self, room_id: int) -> Watch:
        """Collect the messages published to the room from now on; followed before this returns.

        The poll calls Watch.read_through() once it has read the database.
        """
        async with self.lock:
            await self._subscribe(room_id)
            watch = Watch(self.cursors[room_id])
            self.waiters.setdefault(room_id, set()).add(watch)
        return watch

    async def unwatch(self, room_id: int, watch: Watch) -> None:
        async with self.lock:
            waiters = self.waiters.get(room_id)
            if waiters is not None:
                waiters.discard(watch)
                if not waiters:
                    del self.waiters[room_id]
            await self._unsubscribe_if_idle(room_id)

    async def _subscribe(self, room_id: int) -> None:
        # Called with the lock held. Never raises for want of Redis: the room is
        # then followed from the database, and the group joined once Redis is back.
        if not self.tasks:
            loop = asyncio.get_running_loop()
            # Fresh contexts: the tasks must not inherit whichever socket's context variables started the hub.
            self.tasks = [loop.create_task(job(), context=Context()) for job in (self._monitor, self._follow)]
        if room_id in self.cursors:
            return
        self.cursors[room_id] = RoomCursor()
        if self.down:
            return
        try:
            if self.channel is None:
                await self._open_channel()
            await _bounded(self.layer.group_add(realtime.room_group(room_id), self.channel))
        except LAYER_ERRORS as error:
            self._lost(error)

    async def _open_channel(self) -> None:
        channel = await _bounded(self.layer.new_channel(prefix="fanout."))
        self.channel = channel
        self.reader = asyncio.get_running_loop().create_task(self._read(), context=Context())
        self.tasks.append(self.reader)
        await _bounded(self.layer.group_add(realtime.SESSIONS_GROUP, channel))

    async def _unsubscribe_if_idle(self, room_id: int) -> None:
        # Called with the lock held.
        if room_id in self.rooms or room_id in self.waiters:
            return
        self.cursors.pop(room_id, None)
        if self.channel is not None and not self.down:
            # A subscription left behind only brings events nobody here wants.
            with contextlib.suppress(*LAYER_ERRORS):
                await _bounded(self.layer.group_discard(realtime.room_group(room_id), self.channel))

    def settled_at(self, room_id: int, seq: int | None, change: int | None) -> tuple[int, int] | None:
        """Where the room stands if a socket resuming from `seq` and `change` would be sent nothing (RoomCursor)."""
        cursor = self.cursors.get(room_id)
        return None if cursor is None else cursor.settled_at(seq, change)

    def ready(self, socket: LocalSocket, last_seq: int, last_change: int = 0) -> None:
        """Start live delivery after the replay: release held events above `last_seq` / `last_change`."""
        socket.replayed_through = last_seq
        socket.changes_through = last_change
        if socket.raw is not None and (started := self.keepalive.take(socket.raw)) is not None:
            self.tasks.append(started)
        cursor = self.cursors.get(socket.room_id)
        if cursor is not None:
            cursor.start(last_seq, last_change)
        held, socket.held = socket.held, []
        for frame, seq, change in held:
            self._offer(socket, frame, seq=seq, change=change, inline=False)  # through the writer, in order
        if self.down:
            self._offer(socket, protocol.delivery_frame(live=False), inline=False)

    async def leave(self, socket: LocalSocket) -> None:
        socket.closed = True
        async with self.lock:
            sockets = self.rooms.get(socket.room_id)
            if sockets is None:
                return
            sockets.discard(socket)
            if not sockets:
                del self.rooms[socket.room_id]
                await self._unsubscribe_if_idle(socket.room_id)

    async def deliver(self, event: dict[str, Any]) -> None:
        """Hand one event, published or read from the database, to every local socket of its room it is meant for."""
        if event["type"] == realtime.SIGNED_OUT_EVENT:  # site-wide: the session's sockets in every room
            for room_sockets in self.rooms.values():
                for socket in [s for s in room_sockets if s.session and s.session == event["session"]]:
                    self._close(socket, protocol.CLOSE_SIGNED_OUT, protocol.signed_out_frame())
            return
        if event["type"] == realtime.NOTIFY_EVENT:  # site-wide: these users' sockets in every room
            users, frame = set(event["users"]), protocol.encode(event["frame"])
            for room_sockets in self.rooms.values():
                for socket in [s for s in room_sockets if s.user in users and s.replayed_through is not None]:
                    if self._offer(socket, frame):
                        await self._send_now(socket, frame)
            return
        cursor = self.cursors.get(event["room"])
        if cursor is not None and event["type"] == realtime.MESSAGE_EVENT:
            if not cursor.admit(event):  # delivered already (live or from the database), or above a hole
                if len(cursor.held) == 1:  # a hole just opened: read it from the database unless it fills
                    asyncio.get_running_loop().call_later(HOLE_WAIT, self.follow_now.set)
                return
            await self._fan_out(event)
            for later in cursor.release():
                await self._fan_out(later)
            return
        if cursor is not None and event["type"] == realtime.CHANGE_EVENT and not cursor.take_change(event["change"]):
            return
        await self._fan_out(event)

    async def _fan_out(self, event: dict[str, Any]) -> None:
        if event["type"] == realtime.MESSAGE_EVENT:
            for watch in self.waiters.get(event["room"], ()):
                watch.add(event["message"])
        elif event["type"] == realtime.RESYNC_EVENT:
            self._wake_waiters(event["room"])  # polls read the database again
            if event["room"] in self.cursors:
                # Rows arrived unpublished (an import): the next socket or poll reads where the room stands.
                self.cursors[event["room"]] = RoomCursor()
        # A set, or for a typing event the list of the room's sockets it is meant for.
        sockets: Collection[LocalSocket] | None = self.rooms.get(event["room"])
        if not sockets:
            return
        seq = change = None
        if event["type"] == realtime.REMOVAL_EVENT:
            for socket in [s for s in sockets if s.user == event["user"]]:
                self._close(socket, protocol.CLOSE_REMOVED, protocol.removed_frame())
            return
        if event["type"] == realtime.ROOM_CLOSED_EVENT:
            for socket in list(sockets):
                self._close(socket, protocol.CLOSE_ROOM_ARCHIVED, protocol.archived_frame())
            return
        if event["type"] == realtime.RESYNC_EVENT:
            for socket in list(sockets):
                self._close(socket, protocol.CLOSE_SERVICE_RESTART, protocol.resync_frame())
            return
        if event["type"] == realtime.TYPING_EVENT:
            frame = protocol.typing_frame(event["user"])
            # Ephemeral: not for the typist's own tabs, and not held for a replaying socket.
            sockets = [s for s in sockets if s.user != event["user"] and s.replayed_through is not None]
        elif event["type"] == realtime.READ_EVENT:
            frame = protocol.read_by_frame(event["user"], event["seq"])
            # Ephemeral as typing, but for every socket: the reader's other tabs show receipts too.
            sockets = [s for s in sockets if s.replayed_through is not None]
        elif event["type"] == realtime.PRESENCE_EVENT:
            frame = protocol.presence_frame(event["users"])  # held for a replaying socket, never filtered
        elif event["type"] == realtime.CHANGE_EVENT:
            frame = protocol.encode(event["frame"])
            change = event["change"]
        else:
            frame = protocol.message_frame_from_payload(event["message"])
            seq = event["seq"]
        framed: bytes | None = None
        for socket in list(sockets):
            if self._offer(socket, frame, seq=seq, change=change):
                if socket.raw is not None:
                    framed = framed or serversend.text_frame(frame)
                    if socket.raw(framed):
                        continue
                await self._send_now(socket, frame, raw_written=True)

    async def _send_now(self, socket: LocalSocket, frame: str, *, raw_written: bool = False) -> None:
        """Send a frame _offer said to send at once (`raw_written`: the raw writer was tried already)."""
        if not raw_written and socket.raw is not None and socket.raw(serversend.text_frame(frame)):
            return
        try:
            await socket.send({"type": "websocket.send", "text": frame})
        except Exception:
            logger.debug("Sending to a closed socket failed", exc_info=True)
            socket.closed = True

    async def _read(self) -> None:
        while True:
            try:
                event = await self.layer.receive(self.channel)
                if event.get("type") in realtime.ROOM_EVENTS:
                    await self.deliver(event)
                    # receive() does not suspend while events are queued; let the
                    # writers send this one before the next, so an outbox only
                    # grows for a socket whose client is not reading.
                    await asyncio.sleep(0)
                elif event.get("type") == PROBE_EVENT:
                    self.probes_heard = max(self.probes_heard, event["n"])
            except asyncio.CancelledError:
                raise
            except LAYER_ERRORS as error:  # layers whose receive() talks to Redis itself
                self._lost(error)
                await asyncio.sleep(PROBE_INTERVAL)
            except Exception:
                logger.exception("Fan-out reader failed; retrying")
                await asyncio.sleep(0.5)

    async def _monitor(self) -> None:
        """Probe the subscription every second: publish to the hub's own channel and expect to hear it."""
        while True:
            await asyncio.sleep(PROBE_INTERVAL)
            try:
                if self.channel is None:
                    await self._open_channel()
                self.probes_sent += 1
                probe = {"type": PROBE_EVENT, "n": self.probes_sent}
                await asyncio.wait_for(self.layer.send(self.channel, probe), PROBE_TIMEOUT)
            except LAYER_ERRORS as error:
                self._lost(error)
                continue
            if self.probes_sent - self.probes_heard > PROBES_MISSED:
                self._lost(TimeoutError(f"{PROBES_MISSED} probes of the subscription were not heard back"))
            elif self.down and self.probes_heard > self.down_since:
                try:
                    await self._rejoin()
                except LAYER_ERRORS:
                    continue  # still away; the next probe tries again

    def _lost(self, error: BaseException) -> None:
        """Messages may be published that this process never hears: follow its rooms from the database.

        Sockets stay open and are told that delivery is delayed (and who is
        online unknown); long-polls are fed the same way. Logged once per outage.
        """
        if self.down:
            return
        self.down, self.down_since = True, self.probes_sent
        count = sum(len(sockets) for sockets in self.rooms.values())
        logger.error(
            "Fan-out lost its channel-layer subscription (%s: %s); following %d rooms (%d local sockets) "
            "from the database until it is back",
            type(error).__name__,
            error,
            len(self.cursors),
            count,
        )
        frame = protocol.delivery_frame(live=False)
        for sockets in self.rooms.values():
            for socket in list(sockets):
                if socket.replayed_through is not None:  # a replaying socket is told by ready()
                    self._offer(socket, frame, inline=False)
        self.follow_now.set()

    async def _rejoin(self) -> None:
        """The subscription is back: re-join the groups of rooms still in use, and switch back to live.

        The pub/sub layer's connection re-subscribes by itself on reconnect (in
        redis-py), so there this only repairs a group_add that failed or was
        skipped; the core layer keeps groups in Redis, which a restart empties.
        The database is read once more at once, so that a message published
        before the groups were joined again is not missed.
        """
        async with self.lock:
            for room_id in list(self.rooms):
                # Consumers that could not leave while Redis was away left closed sockets behind.
                self.rooms[room_id] = {socket for socket in self.rooms[room_id] if not socket.closed}
                if not self.rooms[room_id]:
                    del self.rooms[room_id]
                    await self._unsubscribe_if_idle(room_id)
            for group in {realtime.SESSIONS_GROUP, *map(realtime.room_group, self.cursors)}:
                await _bounded(self.layer.group_add(group, self.channel))
            self.down = False
            self.back_at = time.monotonic()
        logger.warning("Fan-out's channel-layer subscription is back; delivering live again")
        self.follow_now.set()
        frame = protocol.delivery_frame(live=True)
        for sockets in self.rooms.values():
            for socket in list(sockets):
                if socket.replayed_through is not None:
                    self._offer(socket, frame, inline=False)
        # Sockets show presence as unknown, and the lists may have been lost with Redis: the follower recounts.
        self.recount_rooms = set(self.rooms)

    async def _follow(self) -> None:
        """Twice a second, compare where the hub's rooms stand in the database with what was delivered."""
        while True:
            try:
                await asyncio.wait_for(self.follow_now.wait(), FOLLOW_INTERVAL)
            except TimeoutError:
                pass
            else:
                await asyncio.sleep(READ_GAP)  # woken early: what else is woken by then is read too
            self.follow_now.clear()
            if self.down:
                # Nobody in this process waits on Redis while the hub knows it is away.
                ephemeral.skip_redis(PROBE_INTERVAL + FOLLOW_INTERVAL)
            try:
                await self._recount_presence()
                await self._catch_up()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                # The database itself is away: log once, keep trying.
                if not self.follow_failing:
                    self.follow_failing = True
                    logger.error("Fan-out could not read its rooms from the database: %r", error)
            else:
                if self.follow_failing:
                    self.follow_failing = False
                    logger.warning("Fan-out reads its rooms from the database again")

    async def _recount_presence(self) -> None:
        """Count this process's sockets in each room again once Redis is back (until it succeeds)."""
        while self.recount_rooms and not self.down:
            room_id = next(iter(self.recount_rooms))
            try:
                if room_id in self.rooms:
                    await presence.recount(room_id=room_id)
            except LAYER_ERRORS:
                return  # Redis failed a moment ago: the next round tries again
            self.recount_rooms.discard(room_id)

    async def _catch_up(self) -> None:
        """Deliver from the database what the rooms' sockets and polls are missing.

        While the subscription is down, a publish from this process just
        failed, or the subscription came back a moment ago, anything missing is
        read at once; while live, only what has been missing for HOLE_GRACE
        (its publisher died between commit and publish). One query when
        nothing is missing, two when something is.
        """
        if not self.cursors:
            return
        now = time.monotonic()
        following = self.down or ephemeral.redis_away() or now - self.back_at < SETTLE_SECONDS
        positions = await database_sync_to_async(selectors.room_positions)(list(self.cursors))
        grace = 0.0 if following else HOLE_GRACE
        behind: dict[int, tuple[selectors.RoomPosition, int, int]] = {}
        for room_id, position in positions.items():
            cursor = self.cursors.get(room_id)
            if cursor is None or cursor.seq is None:
                continue  # its first socket or poll has not read the database yet
            cursor.start(position.last_seq, position.last_change)  # a poll sets only the seq
            if cursor.missing(position, now, grace):
                behind[room_id] = (position, cursor.seq, cast(int, cursor.change))
        if behind:
            news = await database_sync_to_async(selectors.rooms_news)(behind, limit=settings.CHAT_RESUME_LIMIT)
            for room_id, resume in news.items():
                await self._deliver_news(room_id, behind[room_id][0], resume)
        if following:
            await self._enforce_access(positions)

    async def _deliver_news(self, room_id: int, position: selectors.RoomPosition, resume: selectors.Resume) -> None:
        cursor = self.cursors.get(room_id)
        if cursor is None:
            return
        if resume.next_seq is not None:
            # Too many to stream: the sockets resume from the database themselves, and polls read it.
            cursor.skip_to(position.last_seq)
            self._wake_waiters(room_id)
            for socket in list(self.rooms.get(room_id, ())):
                self._close(socket, protocol.CLOSE_SERVICE_RESTART, protocol.resync_frame())
            return
        if resume.cleared is not None:
            through_seq, change = resume.cleared
            await self.deliver(realtime.history_cleared_event(room_id=room_id, through_seq=through_seq, change=change))
        for message in resume.messages:
            if not cursor.has_seq(message.seq):
                await self.deliver(realtime.message_event(message))
            elif message.change:  # delivered out of order before, and edited or deleted since
                await self.deliver(realtime.change_event(message))
        for message in resume.changed:
            await self.deliver(realtime.change_event(message))
        cursor.changes_read(resume.last_change)

    async def _enforce_access(self, positions: dict[int, selectors.RoomPosition]) -> None:
        """Close the sockets that events lost with Redis would have closed: removals, archives, sign-outs.

        Only the sockets open before the reads are judged: one that opened
        meanwhile was checked by its own handshake, perhaps against newer rows.
        """
        judged = [(room_id, s) for room_id, sockets in self.rooms.items() for s in sockets if not s.closed]
        private = {room_id for room_id, _ in judged if room_id in positions and positions[room_id].is_private}
        sessions = {s.session for _, s in judged if s.session}
        members = await database_sync_to_async(selectors.private_room_member_names)(private) if private else {}
        signed_in = await database_sync_to_async(selectors.live_session_keys)(sessions) if sessions else set()
        for room_id, socket in judged:
            position = positions.get(room_id)
            if position is not None and position.is_archived:
                self._close(socket, protocol.CLOSE_ROOM_ARCHIVED, protocol.archived_frame())
            elif room_id in private and socket.user not in members.get(room_id, ()):
                self._close(socket, protocol.CLOSE_REMOVED, protocol.removed_frame())
            elif socket.session and socket.session not in signed_in:
                self._close(socket, protocol.CLOSE_SIGNED_OUT, protocol.signed_out_frame())

    def _wake_waiters(self, room_id: int | None = None) -> None:
        """Wake the long-polls of one room, or of every room."""
        rooms = self.waiters.values() if room_id is None else [self.waiters.get(room_id, set())]
        for watches in rooms:
            for watch in watches:
                watch.published.set()

    def _offer(
        self, socket: LocalSocket, frame: str, *, seq: int | None = None, change: int | None = None, inline: bool = True
    ) -> bool:
        """Queue a frame for a socket; True when the caller should send it right away instead.

        `seq` marks a new message, `change` an edit or deletion; frames with
        neither (typing) are never filtered. `inline=False` always queues.
        """
        if socket.closed:
            return False
        if socket.replayed_through is None:
            socket.held.append((frame, seq, change))
            queued = len(socket.held)
        elif (seq is not None and seq <= socket.replayed_through) or (
            change is not None and change <= socket.changes_through
        ):  # the replay already covered it
            return False
        elif inline and socket.writer is None and socket.writable is not None and socket.writable.is_set():
            # Nothing queued and the server says its send will not wait: no task needed.
            return True
        else:
            socket.outbox.append(frame)
            queued = len(socket.outbox)
            if socket.writer is None:
                # A fresh context: the writer must not inherit whichever
                # task's context variables happened to start the hub.
                socket.writer = asyncio.get_running_loop().create_task(self._write(socket), context=Context())
        if queued > self.max_backlog:
            # Too far behind to catch up live; the client resumes from the database.
            self._close(socket, protocol.CLOSE_TRY_AGAIN_LATER)
        return False

    async def _write(self, socket: LocalSocket) -> None:
        # The server's send returns at once unless the client's transport is
        # full; then this socket's frames wait here while the others go on.
        try:
            while socket.outbox and not socket.closed:
                await socket.send({"type": "websocket.send", "text": socket.outbox.popleft()})
        except Exception:
            logger.debug("Sending to a closed socket failed", exc_info=True)
            socket.closed = True
        finally:
            socket.writer = None

    def _close(self, socket: LocalSocket, code: int, last_frame: str | None = None) -> None:
        """Close a socket now, dropping what it has not been sent, after `last_frame` if given."""
        if socket.closed:
            return
        socket.closed = True
        socket.held.clear()
        socket.outbox.clear()
        asyncio.get_running_loop().create_task(self._send_close(socket, code, last_frame), context=Context())

    async def _send_close(self, socket: LocalSocket, code: int, last_frame: str | None) -> None:
        try:
            if last_frame is not None:
                await socket.send({"type": "websocket.send", "text": last_frame})
            try:
                await socket.send({"type": "websocket.close", "code": code})
            except Exception:
                # Daphne (autobahn) refuses codes other than 1000 and 3000-4999,
                # so 1012 and 1013 raise there: close anyway, with its 1000. The
                # client reconnects on either; `last_frame` said why.
                await socket.send({"type": "websocket.close"})
        except Exception:
            logger.debug("Closing a closed socket failed", exc_info=True)


async def _bounded(call: Awaitable[T]) -> T:
    """A channel-layer call that gives up after CHAT_REDIS_TIMEOUT: a frozen Redis must not hold a handshake."""
    return await asyncio.wait_for(call, settings.CHAT_REDIS_TIMEOUT)


_hubs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, RoomHub] = weakref.WeakKeyDictionary()


def _read_database_now() -> None:
    """A publish after a commit failed (in some thread): every hub here reads the database now, not in 0.5 s."""
    with contextlib.suppress(RuntimeError):  # a closed loop, or a hub added meanwhile (it reads soon anyway)
        for loop, room_hub in list(_hubs.items()):
            loop.call_soon_threadsafe(room_hub.follow_now.set)


realtime.on_publish_missed(_read_database_now)


def hub() -> RoomHub:
    """Return this event loop's hub (the channel layer, too, is per loop)."""
    loop = asyncio.get_running_loop()
    current = _hubs.get(loop)
    if current is None or any(task.done() for task in current.tasks):
        # A hub whose tasks ended (cancelled at shutdown) no longer follows its rooms.
        current = _hubs[loop] = RoomHub(get_channel_layer())
        realtime.publish_through_loop()
    return current
