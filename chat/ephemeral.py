"""Short-lived room state shared by every server process: kept in Redis with an expiry.

With CHANNEL_LAYER=memory (one process) the same state lives in this process.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis
import redis.asyncio as aioredis
import redis.asyncio.sentinel
import redis.sentinel
from django.conf import settings

logger = logging.getLogger(__name__)

TYPING_INTERVAL_MS = 2000
# What a call to Redis raises while it is away, frozen or not answering in time.
REDIS_ERRORS = (redis.RedisError, OSError, asyncio.TimeoutError)
T = TypeVar("T")
# Connections per event loop: every call here is one short round trip.
REDIS_POOL_SIZE = 100

_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aioredis.Redis] = weakref.WeakKeyDictionary()
_local_expiry: dict[str, float] = {}


def client() -> aioredis.Redis:
    """This event loop's client (presence, rate limits, the health check)."""
    # redis-py's asyncio clients belong to the loop that made them, like the channel layer.
    loop = asyncio.get_running_loop()
    client = _clients.get(loop)
    if client is None:
        # A blocking pool: a call beyond the pool's size waits for a connection
        # (within bounded()'s timeout) instead of failing at once. redis-py's
        # default pool raises MaxConnectionsError, and in a reconnect storm
        # (5,000 handshakes at once) that read as Redis being away.
        options = {"max_connections": REDIS_POOL_SIZE, "timeout": 5, "socket_timeout": 5,
                   "socket_connect_timeout": 5, "health_check_interval": 15}  # fmt: skip
        if settings.REDIS_SENTINELS:
            pool: aioredis.ConnectionPool = _BlockingSentinelPool(
                settings.REDIS_SENTINEL_MASTER, aioredis.sentinel.Sentinel(**_sentinel_options()), **options
            )
        else:
            pool = aioredis.BlockingConnectionPool.from_url(settings.REDIS_URL, **options)
        client = _clients[loop] = aioredis.Redis(connection_pool=pool)
    return client


class _BlockingSentinelPool(aioredis.sentinel.SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """Sentinel's pool (connect to whichever server is the primary now), waiting for a free connection."""


def _sentinel_options() -> dict:
    timeout = settings.REDIS_SENTINEL_TIMEOUT
    return {
        "sentinels": settings.REDIS_SENTINELS,
        "sentinel_kwargs": {"socket_timeout": timeout, "socket_connect_timeout": timeout},
    }


_sync_client: redis.Redis | None = None


def _client_sync() -> redis.Redis:
    """The client for sync code (views, commands); its connection pool is thread-safe."""
    global _sync_client
    if _sync_client is None:
        # Short: every caller fails open or reports, and a frozen Redis must not stall the
        # thread that all consumers' database work shares.
        options = {"socket_timeout": settings.CHAT_REDIS_TIMEOUT, "socket_connect_timeout": settings.CHAT_REDIS_TIMEOUT,
                   "health_check_interval": 15}  # fmt: skip
        if settings.REDIS_SENTINELS:
            sentinel = redis.sentinel.Sentinel(**_sentinel_options())
            _sync_client = sentinel.master_for(settings.REDIS_SENTINEL_MASTER, **options)
        else:
            _sync_client = redis.Redis.from_url(settings.REDIS_URL, **options)
    return _sync_client


_warned_at: dict[str, float] = {}
# Until when Redis counts as away: after a call timed out or failed, the next
# ones go on without it at once for a moment, instead of each waiting out its
# own timeout (a request makes several calls; they must not add up).
AWAY_SECONDS = 1.0
_away_until = 0.0


def redis_away() -> bool:
    """True for a moment after a call to Redis failed or timed out: skip Redis rather than wait on it."""
    return time.monotonic() < _away_until


def redis_failed() -> None:
    skip_redis(AWAY_SECONDS)


def skip_redis(seconds: float) -> None:
    """Skip Redis for `seconds` from now (the hub, while it knows Redis is away, keeps this going)."""
    global _away_until
    _away_until = max(_away_until, time.monotonic() + seconds)


async def bounded(call: Callable[[], Awaitable[T]]) -> T:
    """Make one call to Redis from async code, giving up after CHAT_REDIS_TIMEOUT.

    A frozen Redis must not hold a socket's handshake or a send; right after a
    failure the call is not even tried, so a burst of callers do not each wait.
    """
    if redis_away():
        raise redis.ConnectionError("Redis failed a moment ago; not waiting on it again yet.")
    try:
        return await asyncio.wait_for(call(), settings.CHAT_REDIS_TIMEOUT)
    except REDIS_ERRORS:
        redis_failed()
        raise


def _warn_once(message: str, every: float = 60.0) -> None:
    """Log each warning at most once a minute: an outage is one event, not one per message."""
    key = message.split(":", 1)[0]
    if time.monotonic() - _warned_at.get(key, -every) >= every:
        _warned_at[key] = time.monotonic()
        logger.warning(message)


# A sliding window: the times of the hits in the last window, in a sorted set.
# Counting and adding is one Lua script, so no window ever holds more than the
# limit, however the hits fall and however many processes take them.
_RATE_LIMIT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1] - ARGV[2])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  if #oldest == 0 then return ARGV[2] end  -- a limit of 0
  return tostring(oldest[2] + ARGV[2] - ARGV[1])
end
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[4])
redis.call('EXPIRE', KEYS[1], math.ceil(ARGV[2]) + 1)
return '0'
"""
_local_hits: dict[str, list[float]] = {}


def rate_limit(key: str, limit: int, window_s: int = 60) -> int:
    """Count one hit on `key` unless `limit` hits fell in the last `window_s` seconds.

    Returns 0 when the hit counts, else the whole seconds until one is allowed.
    """
    key, now = f"{settings.CHANNEL_LAYER_PREFIX}:rate:{key}", time.time()
    if settings.CHANNEL_LAYER != "redis":
        return _local_rate_limit(key, now, limit, window_s)
    if redis_away():
        return 0  # fail open, as below
    try:
        answer = _client_sync().eval(_RATE_LIMIT, 1, *_rate_limit_args(key, now, limit, window_s))
    except redis.RedisError as error:
        _rate_limit_unchecked(error)
        return 0
    return _seconds_to_wait(answer)


async def rate_limit_async(key: str, limit: int, window_s: int = 60) -> int:
    """rate_limit() from the event loop: the same window, without a thread waiting on Redis."""
    key, now = f"{settings.CHANNEL_LAYER_PREFIX}:rate:{key}", time.time()
    if settings.CHANNEL_LAYER != "redis":
        return _local_rate_limit(key, now, limit, window_s)
    if redis_away():
        return 0  # fail open, as below, and without failing again (which would keep Redis away)
    try:
        answer = await bounded(lambda: client().eval(_RATE_LIMIT, 1, *_rate_limit_args(key, now, limit, window_s)))
    except REDIS_ERRORS as error:
        _rate_limit_unchecked(error)
        return 0
    return _seconds_to_wait(answer)


def _rate_limit_args(key: str, now: float, limit: int, window_s: int) -> tuple[str | float, ...]:
    """The _RATE_LIMIT script's key and arguments; the hit's member is unique, so equal times count twice."""
    return key, now, window_s, limit, f"{now}:{uuid.uuid4().hex[:8]}"


def _seconds_to_wait(answer: str | bytes) -> int:
    wait = float(answer)
    return max(1, math.ceil(wait)) if wait > 0 else 0


def _local_rate_limit(key: str, now: float, limit: int, window_s: int) -> int:
    hits = _local_hits.setdefault(key, [])
    hits[:] = [hit for hit in hits if hit > now - window_s]
    if len(hits) >= limit:
        return max(1, math.ceil(hits[0] + window_s - now)) if hits else window_s
    hits.append(now)
    return 0


def _rate_limit_unchecked(error: BaseException) -> None:
    # Fail open: a limit is not worth refusing every message while Redis is away.
    redis_failed()
    _warn_once(f"Rate limits are not checked while Redis is unreachable: {error!r}")


async def claim(key: str, ttl_ms: int) -> bool:
    """Return True for the first claim of `key` in every `ttl_ms` window, across all processes."""
    key = f"{settings.CHANNEL_LAYER_PREFIX}:{key}"
    if settings.CHANNEL_LAYER != "redis":
        now = time.monotonic()
        if _local_expiry.get(key, 0) > now:
            return False
        _local_expiry[key] = now + ttl_ms / 1000
        return True
    return bool(await bounded(lambda: client().set(key, b"1", nx=True, px=ttl_ms)))


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
    *, room_id: int, add: str | list[str] | None = None, remove: str | None = None
) -> tuple[bool, list[str]]:
    """Add (or refresh) sockets' members or remove one, drop expired ones; return (the users changed, users now)."""
    key = _presence_key(room_id)
    added = [add] if isinstance(add, str) else add or []
    now = time.time()
    expires = now + settings.CHAT_PRESENCE_TTL
    if settings.CHANNEL_LAYER != "redis":
        members = _local_presence.setdefault(key, {})
        before = _users(members)
        for member in [m for m, until in members.items() if until <= now]:
            del members[member]
        for member in added:
            members[member] = expires
        if remove:
            members.pop(remove, None)
        users = _users(members)
        return users != before, users
    # The whole set outlives its members by a margin, so an empty room leaves nothing behind.
    ttl = int(settings.CHAT_PRESENCE_TTL * 2) + 1
    changed, users = await bounded(
        lambda: client().eval(_PRESENCE_UPDATE, 1, key, now, expires, ttl, remove or "", *added)
    )
    return bool(changed), [user.decode() for user in users]


# The users are worked out in Redis: the reply is one name per user, not one
# member per socket. Read whole, a room's set made each arrival cost as much
# as the sockets already there (5,000 sockets in 10 rooms: 2.5 million
# members over the wire). "Before" counts expired members still in the set:
# whoever drops them sees the list change, and so tells the room.
_PRESENCE_UPDATE = """
local function users()
  local seen, list = {}, {}
  for _, member in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
    local user = string.match(member, '^(.*)|')
    if user and not seen[user] then
      seen[user] = true
      list[#list + 1] = user
    end
  end
  table.sort(list)
  return list
end
local before = users()
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
for i = 5, #ARGV do
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[i])
end
if ARGV[4] ~= '' then
  redis.call('ZREM', KEYS[1], ARGV[4])
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
local after = users()
local changed = #before ~= #after
for i = 1, #after do
  if before[i] ~= after[i] then
    changed = true
  end
end
return {changed and 1 or 0, after}
"""


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


# ---- open sockets per user -----------------------------------------------------
#
# One sorted set per user: a member per open socket, scored with the time it
# expires, refreshed with presence. Checking the count and adding the socket
# is one Lua script, so two tabs opening at once cannot both slip past the cap.

_SOCKET_OPEN = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""
_local_sockets: dict[str, dict[str, float]] = {}


def _sockets_key(user_id: int) -> str:
    return f"{settings.CHANNEL_LAYER_PREFIX}:sockets:{user_id}"


async def socket_open(*, user_id: int, socket_id: str, cap: int) -> bool:
    """Count a new socket of the user; False (and nothing counted) if they already have `cap` open."""
    key, now = _sockets_key(user_id), time.time()
    expires = now + settings.CHAT_PRESENCE_TTL
    if settings.CHANNEL_LAYER != "redis":
        sockets = _local_sockets.setdefault(key, {})
        for stale in [s for s, until in sockets.items() if until <= now]:
            del sockets[stale]
        if len(sockets) >= cap:
            return False
        sockets[socket_id] = expires
        return True
    ttl = int(settings.CHAT_PRESENCE_TTL * 2) + 1
    try:
        return bool(await bounded(lambda: client().eval(_SOCKET_OPEN, 1, key, now, cap, expires, socket_id, ttl)))
    except REDIS_ERRORS as error:
        # Fail open: a cap is not worth refusing every socket while Redis is away.
        _warn_once(f"The per-user socket cap is not checked while Redis is unreachable: {error!r}")
        return True


async def sockets_refresh(sockets: list[tuple[int, str]]) -> None:
    """Keep counting these (user id, socket id) pairs for another CHAT_PRESENCE_TTL, in one round trip."""
    expires = time.time() + settings.CHAT_PRESENCE_TTL
    if settings.CHANNEL_LAYER != "redis":
        for user_id, socket_id in sockets:
            _local_sockets.setdefault(_sockets_key(user_id), {})[socket_id] = expires
        return
    if not sockets:
        return
    by_user: dict[int, dict[str, float]] = {}
    for user_id, socket_id in sockets:
        by_user.setdefault(user_id, {})[socket_id] = expires
    pipe = client().pipeline(transaction=False)
    for user_id, user_sockets in by_user.items():  # a command per user, not per socket
        pipe.zadd(_sockets_key(user_id), user_sockets, xx=True)
    try:
        await bounded(pipe.execute)
    finally:
        await pipe.reset()


async def socket_close(*, user_id: int, socket_id: str) -> None:
    if settings.CHANNEL_LAYER != "redis":
        _local_sockets.get(_sockets_key(user_id), {}).pop(socket_id, None)
        return
    await bounded(lambda: client().zrem(_sockets_key(user_id), socket_id))


def presence_member(username: str, socket_id: str) -> str:
    return f"{username}|{socket_id}"
