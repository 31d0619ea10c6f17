"""Who is in a room and who is typing.

The state is short-lived and lives in Redis with an expiry (chat/ephemeral.py);
changes reach the room's sockets through chat/realtime.py. The consumer calls
these functions and never publishes itself.

While Redis is away both pause: a socket still opens, and is told that who
is online is unknown (chat/fanout.py); typing signals are dropped. Each
socket's heartbeat counts it again once Redis answers, and the hub recounts
its rooms at once when its subscription is back.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from dataclasses import dataclass, field

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
    heartbeat: asyncio.Task | None = field(default=None, repr=False)


# The sockets counted by this process, per room, for recount() (per event loop, as the hub).
_here: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[int, set[Presence]]] = weakref.WeakKeyDictionary()


def _local(room_id: int) -> set[Presence]:
    return _here.setdefault(asyncio.get_running_loop(), {}).setdefault(room_id, set())


async def arrive(*, room_id: int, user: User, socket_id: str) -> Presence:
    """Count the socket as present (the room is told if its list changed) and keep it counted."""
    member = ephemeral.presence_member(user.get_username(), socket_id)
    try:
        users, told = await _update(room_id=room_id, add=member)
    except realtime.LAYER_ERRORS as error:
        realtime.layer_down(error)
        users, told = None, False
    here = Presence(room_id=room_id, user_id=user.pk, socket_id=socket_id, member=member, users=users, told_room=told)
    here.heartbeat = asyncio.get_running_loop().create_task(_stay(here))
    _local(room_id).add(here)
    return here


async def leave(here: Presence) -> None:
    """Stop counting the socket; the room is told if its list changed."""
    if here.heartbeat is not None:
        here.heartbeat.cancel()
    _local(here.room_id).discard(here)
    await _update(room_id=here.room_id, remove=here.member)


async def recount(*, room_id: int) -> None:
    """Count this process's sockets in the room again and tell the room (after Redis was away)."""
    members = [here.member for here in _local(room_id)]
    if members:
        _, users = await ephemeral.presence_update(room_id=room_id, add=members)
        await realtime.publish_presence(room_id=room_id, users=users)


async def typing(*, room_id: int, username: str) -> None:
    """Tell the room's other sockets that this user is typing, at most once per user every 2 s.

    Dropped while Redis is away: a typing signal is not worth an error.
    """
    try:
        if await ephemeral.typing_allowed(room_id=room_id, username=username):
            await realtime.publish_typing(room_id=room_id, username=username)
    except realtime.LAYER_ERRORS as error:
        realtime.layer_down(error)


async def _stay(here: Presence) -> None:
    # Refreshing the member also drops those of sockets whose process died.
    while True:
        await asyncio.sleep(settings.CHAT_PRESENCE_TTL / 3)
        try:
            await _update(room_id=here.room_id, add=here.member)
            await ephemeral.socket_refresh(user_id=here.user_id, socket_id=here.socket_id)
        except realtime.LAYER_ERRORS as error:
            realtime.layer_down(error)  # once per outage, not once per socket
        except Exception:
            logger.warning("Refreshing presence in room %s failed", here.room_id, exc_info=True)


async def _update(*, room_id: int, add: str | None = None, remove: str | None = None) -> tuple[list[str], bool]:
    """Change one socket's member; tell the room when its list changed. Return (users, told)."""
    before, users = await ephemeral.presence_update(room_id=room_id, add=add, remove=remove)
    if users == before:
        return users, False
    await realtime.publish_presence(room_id=room_id, users=users)
    return users, True
