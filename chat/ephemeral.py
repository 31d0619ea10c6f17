"""Short-lived room state shared by every server process: kept in Redis with an expiry.

With CHANNEL_LAYER=memory (one process) the same state lives in this process.
"""

from __future__ import annotations

import asyncio
import time
import weakref

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
