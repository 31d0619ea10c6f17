"""Waiting for a room's next message without a thread or a database connection.

A long-poll subscribes first, then reads the database, then waits: a message
committed after the read is published after it too, so it wakes the poll,
which reads again. The process's RoomHub (one subscription per room,
chat/fanout.py) wakes every poll of the room.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from asgiref.sync import ThreadSensitiveContext

from chat import fanout


@contextlib.asynccontextmanager
async def watch_room(room_id: int) -> AsyncIterator[fanout.Watch]:
    """Yield a Watch that collects the messages published to the room while inside."""
    hub = fanout.hub()
    watch = await hub.watch(room_id)
    try:
        yield watch
    finally:
        await hub.unwatch(room_id, watch)


POLL_PATH = re.compile(r"^/api/rooms/[^/]+/poll$")


class SharedSyncThread:
    """ASGI middleware: the sync parts of long-poll requests share one thread.

    Django gives every request a thread of its own for its sync middleware and
    signal handlers, and keeps it until the response is sent: a waiting poll
    would hold an idle thread. Polls run those quick calls on one shared
    thread instead; their database work goes to the loop's pool (chat/api.py).
    """

    def __init__(self, app) -> None:
        self.app = app
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="poll-sync")

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and POLL_PATH.match(scope["path"]):
            async with ThreadSensitiveContext(executor=self.executor):
                return await self.app(scope, receive, send)
        return await self.app(scope, receive, send)


def followers(messages: list[dict], after: int) -> list[dict] | None:
    """Return the published messages that follow `after` without a hole, or None if there is a hole.

    Publishers in different processes may publish seq 6 before seq 5; then
    the poll reads the database instead, where 5 is already committed.
    """
    later = sorted({m["seq"]: m for m in messages if m["seq"] > after}.values(), key=lambda m: m["seq"])
    if not later or later[0]["seq"] != after + 1:
        return None
    if any(b["seq"] != a["seq"] + 1 for a, b in zip(later, later[1:], strict=False)):
        return None
    return later
