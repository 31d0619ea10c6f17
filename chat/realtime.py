"""Publishing: the one module that sends to the channel layer.

A message is published once, after its transaction commits, to its room's
group; chat/fanout.py delivers it to the sockets of each server process.
Services and chat/presence.py call these functions; nothing else publishes.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import math
import time
import weakref
from collections import deque
from collections.abc import Callable

from asgiref.sync import SyncToAsync, async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction

from chat import ephemeral, protocol
from chat.models import Message, Room

logger = logging.getLogger(__name__)

MESSAGE_EVENT = "chat.message"
TYPING_EVENT = "chat.typing"
READ_EVENT = "chat.read"
CHANGE_EVENT = "chat.change"
PRESENCE_EVENT = "chat.presence"
REMOVAL_EVENT = "chat.removal"
ROOM_CLOSED_EVENT = "chat.room_closed"
SIGNED_OUT_EVENT = "chat.signed_out"
RESYNC_EVENT = "chat.resync"
# A message asks for some users (a mention, a direct message): their sockets in every room hear of it.
NOTIFY_EVENT = "chat.notify"
# The group every process's hub joins, for events about a browser session in all rooms.
SESSIONS_GROUP = "sessions"
# What a channel layer raises while Redis is away or not answering.
LAYER_ERRORS = ephemeral.REDIS_ERRORS

ROOM_EVENTS = (
    MESSAGE_EVENT, CHANGE_EVENT, TYPING_EVENT, READ_EVENT, PRESENCE_EVENT, REMOVAL_EVENT, ROOM_CLOSED_EVENT,
    SIGNED_OUT_EVENT, RESYNC_EVENT, NOTIFY_EVENT,
)  # fmt: skip


def publish_after_commit(publish: Callable[[], None]) -> None:
    """Publish once the transaction commits (at once outside one), whatever becomes of the publish.

    What was saved stays saved: clients that miss the event get it when they
    resume from the database, and while Redis is away every socket is told to
    do so (chat/fanout.py). So a publish that fails for want of Redis is only
    logged, once for the outage rather than once per event.
    """
    transaction.on_commit(functools.partial(_publish_saved, publish), robust=True)


# Called (from the thread that committed) when a publish after a commit failed:
# the fan-out hubs of this process read the database at once (chat/fanout.py).
_missed_listeners: list[Callable[[], None]] = []


def on_publish_missed(listener: Callable[[], None]) -> None:
    _missed_listeners.append(listener)


def _publish_saved(publish: Callable[[], None]) -> None:
    try:
        publish()
    except LAYER_ERRORS as error:
        _publish_failed(error)


def _publish_failed(error: BaseException) -> None:
    """A publish after a commit failed for want of Redis: log it once, and the hubs read the database now."""
    layer_down(error)
    for listener in _missed_listeners:
        listener()


_layer_down = False
# When the outage was last logged, and whether "answers again" is still owed for it.
_logged_down_at = -math.inf
_back_owed = False
LOG_EVERY = 60.0  # seconds: calls failing and succeeding by turns, as Redis comes back, are one outage


def layer_down(error: BaseException) -> None:
    """Log an outage of the channel layer once, not once per socket or per publish, nor per flap as it recovers."""
    global _layer_down, _logged_down_at, _back_owed
    if not _layer_down:
        _layer_down = True
        if time.monotonic() - _logged_down_at >= LOG_EVERY:
            _logged_down_at, _back_owed = time.monotonic(), True
            logger.error(
                "The channel layer (Redis) is unreachable; messages reach sockets from the database meanwhile: %r",
                error,
            )


def layer_back() -> None:
    global _layer_down, _back_owed
    if _layer_down:
        _layer_down = False
        if _back_owed:
            _back_owed = False
            logger.warning("The channel layer (Redis) answers again.")


def _group_send(group: str, event: dict) -> None:
    """Publish from sync code (a request, the shared database thread), giving up after CHAT_REDIS_TIMEOUT.

    A thread working for a server's event loop (database_sync_to_async, a
    request) hands the event to that loop's Publisher and goes on; elsewhere
    (a manage.py command, a loop of async_to_sync's own, which may end
    before its tasks run) it publishes and waits.
    """
    loop = getattr(SyncToAsync.threadlocal, "main_event_loop", None)
    publisher = _publishers.get(loop) if loop is not None else None
    if publisher is None or not publisher.loop.is_running():
        async_to_sync(_group_send_now)(group, event)
        layer_back()
        return
    publisher.put(group, event)


def publish_through_loop() -> None:
    """Let the running loop publish what its threads commit (called by a server's long-lived hub, chat/fanout.py)."""
    loop = asyncio.get_running_loop()
    if loop not in _publishers:
        _publishers[loop] = Publisher(loop)


class Publisher:
    """Publishes the events committed by a loop's threads, in the order they were handed over, from one task.

    The thread that committed does not wait for the loop: while the loop
    fans out, a database thread that waited for each publish could save
    nothing else meanwhile (the stall on PostgreSQL, docs/performance.md).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.events: deque[tuple[str, dict]] = deque()
        self.task: asyncio.Task | None = None

    def put(self, group: str, event: dict) -> None:
        """Queue an event (from any thread)."""
        self.loop.call_soon_threadsafe(self._add, group, event)

    def _add(self, group: str, event: dict) -> None:
        self.events.append((group, event))
        if self.task is None or self.task.done():
            self.task = self.loop.create_task(self._drain(), context=contextvars.Context())

    async def _drain(self) -> None:
        while self.events:
            group, event = self.events.popleft()
            try:
                await _group_send_now(group, event)
            except LAYER_ERRORS as error:
                _publish_failed(error)
            except Exception:
                logger.exception("Publishing %s to %s failed", event.get("type"), group)
            else:
                layer_back()


_publishers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Publisher] = weakref.WeakKeyDictionary()


async def _group_send_now(group: str, event: dict) -> None:
    """Publish, giving up after CHAT_REDIS_TIMEOUT: a frozen Redis must not hold a request or a thread.

    What was saved stays saved either way; clients that miss the event get it
    when they resume from the database.
    """
    await ephemeral.bounded(lambda: get_channel_layer().group_send(group, event))


def room_group(room: Room | int) -> str:
    """Return the channel-layer group of a room (by pk, so slug renames are harmless)."""
    return f"room.{room if isinstance(room, int) else room.pk}"


def message_event(message: Message) -> dict:
    return {
        "type": MESSAGE_EVENT,
        "room": message.room_id,
        "seq": message.seq,
        "message": protocol.message_payload(message),
    }


def publish_message(message: Message) -> None:
    """Send a committed message to every socket in its room, on every server process."""
    _group_send(room_group(message.room_id), message_event(message))


def change_event(message: Message, frame: dict | None = None) -> dict:
    """The event of a change to a message; `frame` says it (by default the message as it now is)."""
    return {
        "type": CHANGE_EVENT,
        "room": message.room_id,
        "change": message.change,
        "frame": protocol.change_payload(message) if frame is None else frame,
    }


def history_cleared_event(*, room_id: int, through_seq: int, change: int) -> dict:
    return {
        "type": CHANGE_EVENT,
        "room": room_id,
        "change": change,
        "frame": protocol.history_cleared_payload(through_seq, change),
    }


def publish_change(message: Message, frame: dict | None = None) -> None:
    """Tell every socket in the room that a message changed (after the commit)."""
    _group_send(room_group(message.room_id), change_event(message, frame))


async def publish_presence(*, room_id: int, users: list[str]) -> None:
    """Tell every socket in the room who is online now."""
    await _group_send_now(room_group(room_id), {"type": PRESENCE_EVENT, "room": room_id, "users": users})


async def publish_typing(*, room_id: int, username: str) -> None:
    """Tell the room's other sockets that this user is typing (ephemeral: nothing is stored)."""
    await _group_send_now(room_group(room_id), {"type": TYPING_EVENT, "room": room_id, "user": username})


async def publish_read(*, room_id: int, username: str, seq: int) -> None:
    """Tell every socket in the room how far this user has read (ephemeral: the mark itself is stored)."""
    await _group_send_now(room_group(room_id), {"type": READ_EVENT, "room": room_id, "user": username, "seq": seq})


def publish_removal(*, room_id: int, username: str) -> None:
    """Close the sockets a user removed from a private room has open there, on every server process."""
    _group_send(room_group(room_id), {"type": REMOVAL_EVENT, "room": room_id, "user": username})


def publish_signed_out(*, session_key: str) -> None:
    """Close the sockets of a browser session that signed out, in every room, on every process."""
    _group_send(SESSIONS_GROUP, {"type": SIGNED_OUT_EVENT, "session": session_key})


def publish_notify(*, usernames: list[str], frame: dict) -> None:
    """Tell these users' sockets, in every room, on every process, that a message asks for them (ephemeral).

    What their sidebars count and their browsers notify of; a client that was
    away reads the counts again (GET /api/rooms/). The Mention rows are the truth.
    """
    _group_send(SESSIONS_GROUP, {"type": NOTIFY_EVENT, "users": usernames, "frame": frame})


def publish_resync(*, room_id: int) -> None:
    """Make every socket in the room resume from the database (its history changed in bulk, e.g. an import)."""
    _group_send(room_group(room_id), {"type": RESYNC_EVENT, "room": room_id})


def publish_room_closed(*, room_id: int) -> None:
    """Close every socket in the room, on every server process (it was archived)."""
    _group_send(room_group(room_id), {"type": ROOM_CLOSED_EVENT, "room": room_id})


def publish_history_cleared(*, room_id: int, through_seq: int, change: int) -> None:
    """Tell every socket in the room that all its messages up to `through_seq` were deleted."""
    _group_send(room_group(room_id), history_cleared_event(room_id=room_id, through_seq=through_seq, change=change))
