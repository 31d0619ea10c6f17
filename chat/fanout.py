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

Redis pub/sub through the channel layer stays the only path between
processes (docs/performance.md has the measurements).

The channel layer is at most once: while the hub's subscription is down
(Redis killed, frozen or unreachable), messages published meanwhile never
reach this process. The pub/sub layer hides that (its own reader logs and
retries, and redis-py re-subscribes on reconnect), so the hub checks its
subscription itself: it publishes a probe to its own channel every second and
expects to hear it. When a probe cannot be published or is not heard, every
local socket is closed with 1012 and resumes from the database; once a probe
comes back, the hub re-joins its rooms' groups and accepts sockets again.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections import deque
from collections.abc import Collection
from contextvars import Context
from typing import Any

from channels.layers import get_channel_layer
from django.conf import settings
from redis.exceptions import ConnectionError as RedisConnectionError

from chat import protocol, realtime, serversend
from chat.serversend import Send

logger = logging.getLogger(__name__)

LAYER_ERRORS = realtime.LAYER_ERRORS
PROBE_EVENT = "fanout.probe"
PROBE_INTERVAL = 1.0  # seconds between probes of the hub's subscription
PROBE_TIMEOUT = 2.0  # seconds a probe's publish may take before Redis counts as away
PROBES_MISSED = 3  # probes published but not heard back: the subscription is lost


class LocalSocket:
    """One socket of this process, as the hub sees it."""

    __slots__ = (
        "room_id", "send", "user", "session", "writable", "replayed_through", "changes_through", "held", "outbox",
        "writer", "closed",
    )  # fmt: skip

    def __init__(self, room_id: int, send: Send, user: str, session: str, writable: asyncio.Event | None) -> None:
        self.room_id = room_id
        self.send = send
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


class Watch:
    """The messages published to one room while a long-poll waits, as message payloads, in arrival order."""

    __slots__ = ("published", "messages")

    def __init__(self) -> None:
        self.published = asyncio.Event()
        self.messages: list[dict[str, Any]] = []

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
        self.channel: str | None = None
        self.reader: asyncio.Task | None = None
        # How the server takes frames, found at the first socket (one server per process).
        self.send_mode: serversend.SendMode | None = None
        self.lock = asyncio.Lock()
        # Set when the subscription was lost, until a probe published after that is heard.
        self.down = False
        self.probes_sent = self.probes_heard = self.down_since = 0

    async def join(self, room_id: int, send: Send, user: str = "", session: str = "") -> LocalSocket:
        """Register a socket; the room's group is subscribed before this returns."""
        if self.send_mode is None:
            self.send_mode = serversend.detect(send)
        socket = LocalSocket(room_id, send, user, session, self.send_mode.writable(send))
        async with self.lock:
            if not self.down:
                await self._subscribe(room_id)
            if self.down:  # "subscribed" would not be true: the consumer closes with 1012, the client retries
                raise RedisConnectionError("The fan-out's channel-layer subscription is not back yet.")
            self.rooms.setdefault(room_id, set()).add(socket)
        return socket

    async def watch(self, room_id: int) -> Watch:
        """Collect the messages published to the room from now on; subscribed before this returns."""
        watch = Watch()
        async with self.lock:
            await self._subscribe(room_id)
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
        # Called with the lock held.
        if self.channel is None:
            self.channel = await self.layer.new_channel(prefix="fanout.")
            await self.layer.group_add(realtime.SESSIONS_GROUP, self.channel)
            self.reader = asyncio.get_running_loop().create_task(self._read(), context=Context())
        if room_id not in self.rooms and room_id not in self.waiters:
            await self.layer.group_add(realtime.room_group(room_id), self.channel)

    async def _unsubscribe_if_idle(self, room_id: int) -> None:
        # Called with the lock held.
        if room_id not in self.rooms and room_id not in self.waiters:
            await self.layer.group_discard(realtime.room_group(room_id), self.channel)

    def ready(self, socket: LocalSocket, last_seq: int, last_change: int = 0) -> None:
        """Start live delivery after the replay: release held events above `last_seq` / `last_change`."""
        socket.replayed_through = last_seq
        socket.changes_through = last_change
        held, socket.held = socket.held, []
        for frame, seq, change in held:
            self._offer(socket, frame, seq=seq, change=change, inline=False)  # through the writer, in order

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
        """Hand one published event to every local socket of its room it is meant for."""
        if event["type"] == realtime.SIGNED_OUT_EVENT:  # site-wide: the session's sockets in every room
            for room_sockets in self.rooms.values():
                for socket in [s for s in room_sockets if s.session and s.session == event["session"]]:
                    self._close(socket, protocol.CLOSE_SIGNED_OUT, protocol.signed_out_frame())
            return
        if event["type"] == realtime.MESSAGE_EVENT:
            for watch in self.waiters.get(event["room"], ()):
                watch.add(event["message"])
        elif event["type"] == realtime.RESYNC_EVENT:
            self._wake_waiters(event["room"])  # polls read the database again
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
        elif event["type"] == realtime.PRESENCE_EVENT:
            frame = protocol.presence_frame(event["users"])  # held for a replaying socket, never filtered
        elif event["type"] == realtime.CHANGE_EVENT:
            frame = protocol.encode(event["frame"])
            change = event["change"]
        else:
            frame = protocol.message_frame_from_payload(event["message"])
            seq = event["seq"]
        for socket in list(sockets):
            if self._offer(socket, frame, seq=seq, change=change):
                try:
                    await socket.send({"type": "websocket.send", "text": frame})
                except Exception:
                    logger.debug("Sending to a closed socket failed", exc_info=True)
                    socket.closed = True

    async def _read(self) -> None:
        monitor = asyncio.get_running_loop().create_task(self._monitor(), context=Context())
        try:
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
        finally:
            monitor.cancel()

    async def _monitor(self) -> None:
        """Probe the subscription every second: publish to the hub's own channel and expect to hear it."""
        while True:
            await asyncio.sleep(PROBE_INTERVAL)
            self.probes_sent += 1
            try:
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
        """Messages may have been published that this process never heard: every local socket resumes.

        The error frame and 1012 make clients reconnect (with backoff) and
        resume from the database; long-polls wake and read it again. Logged
        once per outage.
        """
        if self.down:
            return
        self.down, self.down_since = True, self.probes_sent
        count = sum(len(sockets) for sockets in self.rooms.values())
        logger.error(
            "Fan-out lost its channel-layer subscription (%s: %s); closing %d local sockets so they resume",
            type(error).__name__,
            error,
            count,
        )
        frame = protocol.unavailable_frame()
        for sockets in self.rooms.values():
            for socket in list(sockets):
                self._close(socket, protocol.CLOSE_SERVICE_RESTART, frame)
        self._wake_waiters()

    async def _rejoin(self) -> None:
        """The subscription is back: re-join the groups of rooms still in use, forget closed sockets.

        The pub/sub layer's connection re-subscribes by itself on reconnect (in
        redis-py), so there this only repairs a group_add that failed; the core
        layer keeps groups in Redis, which a restart empties.
        """
        async with self.lock:
            for room_id in list(self.rooms):
                # Consumers that could not leave while Redis was away left closed sockets behind.
                self.rooms[room_id] = {socket for socket in self.rooms[room_id] if not socket.closed}
                if not self.rooms[room_id]:
                    del self.rooms[room_id]
                    await self._unsubscribe_if_idle(room_id)
            for group in {realtime.SESSIONS_GROUP, *map(realtime.room_group, {*self.rooms, *self.waiters})}:
                await self.layer.group_add(group, self.channel)
            self.down = False
        logger.warning("Fan-out's channel-layer subscription is back; accepting sockets again")
        self._wake_waiters()  # a poll that started meanwhile reads the database again

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


_hubs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, RoomHub] = weakref.WeakKeyDictionary()


def hub() -> RoomHub:
    """Return this event loop's hub (the channel layer, too, is per loop)."""
    loop = asyncio.get_running_loop()
    current = _hubs.get(loop)
    if current is None or (current.reader is not None and current.reader.done()):
        # A hub whose reader ended (cancelled at shutdown) no longer owns its channel.
        current = _hubs[loop] = RoomHub(get_channel_layer())
    return current
