"""Short-lived room state shared by every server process: kept in Redis with an expiry.

With CHANNEL_LAYER=memory (one process) the same state lives in this process.
"""

from __future__ import annotations

import asyncio
import time
import weakref

import redis
import redis.asyncio as aioredis
from django.conf import settings

TYPING_INTERVAL_MS = 2000

_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aioredis.Redis] = weakref.WeakKeyDictionary()
_local_expiry: dict[str, float] = {}


def _client() -> aioredis.Redis:
    # redis-py's asyncio clients belong to the loop that made them, like the channel layer.
    loop = asyncio.get_running_loop()
    client = _clients.get(loop)
    if client is None:
        client = _clients[loop] = aioredis.Redis.from_url(
            settings.REDIS_URL, socket_timeout=5, socket_connect_timeout=5, health_check_interval=15
        )
    return client


_sync_client: redis.Redis | None = None


def _client_sync() -> redis.Redis:
    """The client for sync code (views, commands); its connection pool is thread-safe."""
    global _sync_client
    if _sync_client is None:
        _sync_client = redis.Redis.from_url(
            settings.REDIS_URL, socket_timeout=5, socket_connect_timeout=5, health_check_interval=15
        )
    return _sync_client


def rate_limit(key: str, limit: int, window_s: int = 60) -> int:
    """Count one hit on `key`; return 0 if within `limit` per window, else seconds until the window ends.

    A fixed window: simple and shared by all processes, at the cost of
    allowing up to twice the limit across a window boundary.
    """
    now = time.time()
    window = int(now // window_s)
    retry_after = max(1, int((window + 1) * window_s - now + 0.999))
    key = f"{settings.CHANNEL_LAYER_PREFIX}:rate:{key}:{window}"
    if settings.CHANNEL_LAYER != "redis":
        _local_counts[key] = count = _local_counts.get(key, 0) + 1
        for stale in [k for k in _local_counts if not k.endswith(f":{window}")]:
            del _local_counts[stale]
        return 0 if count <= limit else retry_after
    pipe = _client_sync().pipeline(transaction=True)
    pipe.incr(key)
    pipe.expire(key, window_s + 1)
    count, _ = pipe.execute()
    return 0 if count <= limit else retry_after


_local_counts: dict[str, int] = {}


def redis_ping() -> None:
    """Raise if Redis does not answer (the health check)."""
    _client_sync().ping()


async def claim(key: str, ttl_ms: int) -> bool:
    """Return True for the first claim of `key` in every `ttl_ms` window, across all processes."""
    key = f"{settings.CHANNEL_LAYER_PREFIX}:{key}"
    if settings.CHANNEL_LAYER != "redis":
        now = time.monotonic()
        if _local_expiry.get(key, 0) > now:
            return False
        _local_expiry[key] = now + ttl_ms / 1000
        return True
    return bool(await _client().set(key, b"1", nx=True, px=ttl_ms))


async def typing_allowed(*, room_id: int, username: str) -> bool:
    """Relay a typing signal at most once per user per room every 2 seconds."""
    return await claim(f"typing:{room_id}:{username}", TYPING_INTERVAL_MS)


# ---- presence ------------------------------------------------------------------
#
# One sorted set per room: a member per open socket, "<username>|<socket id>",
# scored with the time it expires. Sockets refresh their member every
# CHAT_PRESENCE_TTL / 3 seconds; a server process that dies stops refreshing,
# and its members fall out within CHAT_PRESENCE_TTL. A user counts once however
# many sockets (tabs) they have.


def _presence_key(room_id: int) -> str:
    return f"{settings.CHANNEL_LAYER_PREFIX}:presence:{room_id}"


def _users(members) -> list[str]:
    return sorted({(m.decode() if isinstance(m, bytes) else m).rsplit("|", 1)[0] for m in members})


_local_presence: dict[str, dict[str, float]] = {}


async def presence_update(
    *, room_id: int, add: str | None = None, remove: str | None = None
) -> tuple[list[str], list[str]]:
    """Add or remove a socket's member, drop expired ones; return (users before, users after)."""
    key = _presence_key(room_id)
    now = time.time()
    expires = now + settings.CHAT_PRESENCE_TTL
    if settings.CHANNEL_LAYER != "redis":
        members = _local_presence.setdefault(key, {})
        before = _users(members)
        for member in [m for m, until in members.items() if until <= now]:
            del members[member]
        if add:
            members[add] = expires
        if remove:
            members.pop(remove, None)
        return before, _users(members)
    # "Before" counts expired members still in the set: whoever drops them
    # sees the list change, and so tells the room.
    async with _client().pipeline(transaction=True) as pipe:
        pipe.zrange(key, 0, -1)
        pipe.zremrangebyscore(key, "-inf", now)
        if add:
            pipe.zadd(key, {add: expires})
        if remove:
            pipe.zrem(key, remove)
        pipe.zrange(key, 0, -1)
        # The whole set outlives its members by a margin, so an empty room leaves nothing behind.
        pipe.expire(key, int(settings.CHAT_PRESENCE_TTL * 2) + 1)
        results = await pipe.execute()
    return _users(results[0]), _users(results[-2])


def presence_now(room_ids: list[int]) -> dict[int, list[str]]:
    """Who is online in each room now, for the admin, commands and statistics (sync; one round trip)."""
    now = time.time()
    if settings.CHANNEL_LAYER != "redis":
        return {
            room_id: _users(m for m, until in _local_presence.get(_presence_key(room_id), {}).items() if until > now)
            for room_id in room_ids
        }
    pipe = _client_sync().pipeline(transaction=False)
    for room_id in room_ids:
        pipe.zrangebyscore(_presence_key(room_id), now, "+inf")
    return {room_id: _users(members) for room_id, members in zip(room_ids, pipe.execute(), strict=True)}


def presence_member(username: str, socket_id: str) -> str:
    return f"{username}|{socket_id}"
