"""Process-local fan-out: one channel-layer subscription per room per process.

The Channels way gives every socket its own layer channel, group membership,
queue, dispatch loop, msgpack decode, JSON encode and, per event, a thread
hop to close old database connections. Here each server process joins a
room's group once, with one channel of its own, encodes each message's frame
once, and hands it to every local socket's ASGI `send`: directly when the
server says the send will not wait, else through a writer task per socket
that exists only while that socket has frames waiting.

Redis pub/sub through the channel layer stays the only path between
processes. `CHAT_FAST_FANOUT = False` turns this off and the consumer joins
the group itself (docs/performance.md has the measurements).
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from contextvars import Context
from typing import Any

from django.conf import settings

from chat import protocol, realtime

logger = logging.getLogger(__name__)

Send = Callable[[dict[str, Any]], Awaitable[None]]


class LocalSocket:
    """One socket of this process, as the hub sees it."""

    __slots__ = (
        "send", "user", "writable", "replayed_through", "changes_through", "held", "outbox", "writer", "closed"
    )  # fmt: skip

    def __init__(self, send: Send, user: str) -> None:
        self.send = send
        self.user = user
        self.writable = _writable_event(send)
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
        self.lock = asyncio.Lock()

    async def join(self, room_id: int, send: Send, user: str = "") -> LocalSocket:
        """Register a socket; the room's group is subscribed before this returns."""
        socket = LocalSocket(send, user)
        async with self.lock:
            await self._subscribe(room_id)
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
        socket.writable = None  # the held frames go through the writer, in order
        for frame, seq, change in held:
            self._offer(socket, frame, seq=seq, change=change)
        socket.writable = _writable_event(socket.send)

    async def leave(self, room_id: int, socket: LocalSocket) -> None:
        socket.closed = True
        async with self.lock:
            sockets = self.rooms.get(room_id)
            if sockets is None:
                return
            sockets.discard(socket)
            if not sockets:
                del self.rooms[room_id]
                await self._unsubscribe_if_idle(room_id)

    async def deliver(self, event: dict[str, Any]) -> None:
        """Hand one published event to every local socket of its room it is meant for."""
        if event["type"] == realtime.MESSAGE_EVENT:
            for watch in self.waiters.get(event["room"], ()):
                watch.add(event["message"])
        sockets = self.rooms.get(event["room"])
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
        while True:
            try:
                event = await self.layer.receive(self.channel)
                if event.get("type") in realtime.ROOM_EVENTS:
                    await self.deliver(event)
                    # receive() does not suspend while events are queued; let the
                    # writers send this one before the next, so an outbox only
                    # grows for a socket whose client is not reading.
                    await asyncio.sleep(0)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("Fan-out reader failed; retrying")
                await asyncio.sleep(0.5)

    def _offer(self, socket: LocalSocket, frame: str, *, seq: int | None = None, change: int | None = None) -> bool:
        """Queue a frame for a socket; True when the caller should send it right away instead.

        `seq` marks a new message, `change` an edit or deletion; frames with
        neither (typing) are never filtered.
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
        elif socket.writer is None and socket.writable is not None and socket.writable.is_set():
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
            await socket.send({"type": "websocket.close", "code": code})
        except Exception:
            logger.debug("Closing a closed socket failed", exc_info=True)


def _writable_event(send: Send) -> asyncio.Event | None:
    """Return the event that tells whether `send` can complete without waiting, if the server has one.

    uvicorn's sans-I/O WebSocket protocol (the server bin/serve runs) waits on
    its `writable` event, cleared while the client's transport is full, and
    otherwise writes and returns without suspending. Under other servers every
    frame goes through the socket's writer task.
    """
    event = getattr(getattr(send, "__self__", None), "writable", None)
    return event if isinstance(event, asyncio.Event) else None


_hubs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, RoomHub] = weakref.WeakKeyDictionary()


def hub_for(channel_layer) -> RoomHub:
    """Return this event loop's hub (the channel layer, too, is per loop)."""
    loop = asyncio.get_running_loop()
    hub = _hubs.get(loop)
    if hub is None or (hub.reader is not None and hub.reader.done()):
        # A hub whose reader ended (cancelled at shutdown) no longer owns its channel.
        hub = _hubs[loop] = RoomHub(channel_layer)
    return hub
