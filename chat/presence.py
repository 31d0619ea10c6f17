"""Who is in a room and who is typing.

The state is short-lived and lives in Redis with an expiry (chat/ephemeral.py);
changes reach the room's sockets through chat/realtime.py. The consumer calls
these functions and never publishes itself.

Each process keeps its sockets counted with one task, not one per socket:
every CHAT_PRESENCE_TTL / 3 seconds it refreshes them, one round trip to
Redis per room, spread over the period in slices of the rooms so that no
moment pays for all of them.

While Redis is away both pause: a socket still opens, and is told that who
is online is unknown (chat/fanout.py); typing signals are dropped. The next
refresh counts the sockets again once Redis answers, and the hub recounts
its rooms at once when its subscription is back.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import weakref
from dataclasses import dataclass

from django.conf import settings
from django.contrib.auth.models import User

from chat import ephemeral, realtime

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Presence:
    """One socket counted in a room's presence, kept counted while it lives."""

    room_id: int
    user_id: int
    socket_id: str
    # The room's presence set member: "<username>|<socket id>".
    member: str
    # Who was online when the socket arrived (None: unknown, Redis is away), and whether the room was told.
    users: list[str] | None
    told_room: bool


# The sockets counted by this process, per room (per event loop, as the hub),
# and the one task per loop that keeps them all counted.
_here: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[int, set[Presence]]] = weakref.WeakKeyDictionary()
_refreshers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Task] = weakref.WeakKeyDictionary()


def _rooms() -> dict[int, set[Presence]]:
    return _here.setdefault(asyncio.get_running_loop(), {})


async def arrive(*, room_id: int, user: User, socket_id: str) -> Presence:
    """Count the socket as present (the room is told if its list changed) and keep it counted."""
    member = ephemeral.presence_member(user.get_username(), socket_id)
    try:
        users, told = await _update(room_id=room_id, add=member)
    except realtime.LAYER_ERRORS as error:
        realtime.layer_down(error)
        users, told = None, False
    here = Presence(room_id=room_id, user_id=user.pk, socket_id=socket_id, member=member, users=users, told_room=told)
    _rooms().setdefault(room_id, set()).add(here)
    _keep_counting()
    return here


async def leave(here: Presence) -> None:
    """Stop counting the socket; the room is told if its list changed."""
    rooms = _rooms()
    present = rooms.get(here.room_id, set())
    present.discard(here)
    if not present:
        rooms.pop(here.room_id, None)
    await _update(room_id=here.room_id, remove=here.member)


async def recount(*, room_id: int) -> None:
    """Count this process's sockets in the room again and tell the room (after Redis was away)."""
    members = [here.member for here in _rooms().get(room_id, ())]
    if members:
        _, users = await ephemeral.presence_update(room_id=room_id, add=members)
        await realtime.publish_presence(room_id=room_id, users=users)


async def refresh(*, part: int = 0, parts: int = 1) -> None:
    """Count this process's sockets again, in rooms whose id is `part` modulo `parts`.

    One round trip to Redis per room, one for those rooms' socket caps.
    Refreshing also drops the members of sockets whose process died, and
    tells their rooms.
    """
    rooms = {room_id: present for room_id, present in _rooms().items() if room_id % parts == part and present}
    for room_id, present in rooms.items():
        await _update(room_id=room_id, add=[here.member for here in present])
    await ephemeral.sockets_refresh([(here.user_id, here.socket_id) for p in rooms.values() for here in p])


async def typing(*, room_id: int, username: str) -> None:
    """Tell the room's other sockets that this user is typing, at most once per user every 2 s.

    Dropped while Redis is away: a typing signal is not worth an error.
    """
    try:
        if await ephemeral.typing_allowed(room_id=room_id, username=username):
            await realtime.publish_typing(room_id=room_id, username=username)
    except realtime.LAYER_ERRORS as error:
        realtime.layer_down(error)


READ_BY_INTERVAL = 1.0


# Per event loop (a process has one): (room id, username) -> the newest mark to tell, while its
# teller runs; and the tellers themselves, held so that they are not collected while they sleep.
_newest_reads: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[int, str], int]] = (
    weakref.WeakKeyDictionary()
)
_read_tellers: set[asyncio.Task] = set()


def read_advanced(*, room_id: int, username: str, seq: int) -> None:
    """Tell the room that `username` has read up to `seq` (`read_by`).

    At once, then at most once a second per user on this process while the
    mark keeps moving (however many tabs send it), always ending on the
    newest: the room never keeps an old mark. Dropped while Redis is away, as
    typing is.
    """
    loop = asyncio.get_running_loop()
    newest = _newest_reads.setdefault(loop, {})
    key = (room_id, username)
    if key in newest:  # a teller runs: it tells this when its second is up
        newest[key] = max(newest[key], seq)
        return
    newest[key] = seq
    task = loop.create_task(_tell_reads(newest, key), context=contextvars.Context())
    _read_tellers.add(task)
    task.add_done_callback(_read_tellers.discard)


async def _tell_reads(newest: dict[tuple[int, str], int], key: tuple[int, str]) -> None:
    room_id, username = key
    told = 0
    try:
        while newest[key] > told:
            told = newest[key]
            try:
                await realtime.publish_read(room_id=room_id, username=username, seq=told)
            except realtime.LAYER_ERRORS as error:
                realtime.layer_down(error)
            await asyncio.sleep(READ_BY_INTERVAL)
    finally:
        del newest[key]


def _keep_counting() -> None:
    """Start this loop's refresher, unless it runs: one task per process, however many sockets."""
    loop = asyncio.get_running_loop()
    task = _refreshers.get(loop)
    if task is None or task.done():
        # A fresh context: the task must not inherit the first socket's context variables.
        _refreshers[loop] = loop.create_task(_refresh_every_while(), context=contextvars.Context())


# The refresh is spread over its period in this many slices of the rooms:
# refreshing 10,000 sockets at once held the event loop for about 0.3 s.
REFRESH_SLICES = 30


async def _refresh_every_while() -> None:
    while True:
        for part in range(REFRESH_SLICES):
            await asyncio.sleep(settings.CHAT_PRESENCE_TTL / 3 / REFRESH_SLICES)
            try:
                await refresh(part=part, parts=REFRESH_SLICES)
            except realtime.LAYER_ERRORS as error:
                realtime.layer_down(error)  # once per outage
            except Exception:
                logger.warning("Refreshing presence failed", exc_info=True)


async def _update(
    *, room_id: int, add: str | list[str] | None = None, remove: str | None = None
) -> tuple[list[str], bool]:
    """Add or refresh sockets' members, or remove one; tell the room when its list changed. Return (users, told)."""
    changed, users = await ephemeral.presence_update(room_id=room_id, add=add, remove=remove)
    if not changed:
        return users, False
    await realtime.publish_presence(room_id=room_id, users=users)
    return users, True
