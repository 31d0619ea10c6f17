"""Fault injection: a redis-server of each test's own, and server processes pointed at it.

The shared Redis (REDIS_URL, port 6379) that the rest of the suite uses is
never touched: these tests kill and freeze their own (tests/servers.py's RedisServer).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from tests.servers import RedisServer, ServerCluster, StallingTcpProxy


@pytest.fixture
def own_redis(tmp_path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.thaw()  # a stopped process cannot die of SIGKILL until it runs again
            server.kill()


@pytest.fixture
def cluster_on_own_redis(own_redis, cluster) -> ServerCluster:
    """tests/conftest.py's `cluster`, on this test's own Redis; its servers are killed before that Redis."""
    cluster.env["REDIS_URL"] = own_redis.url
    return cluster


@pytest.fixture
async def redis_link(own_redis) -> AsyncIterator[StallingTcpProxy]:
    """A proxy in front of this test's own Redis that can be blackholed (it stops forwarding)."""
    link = StallingTcpProxy(own_redis.port)
    await link.start()
    try:
        yield link
    finally:
        await link.close()


@pytest.fixture
def cluster_through_link(redis_link, cluster) -> ServerCluster:
    """tests/conftest.py's `cluster`, reaching this test's own Redis through `redis_link`."""
    cluster.env["REDIS_URL"] = redis_link.url
    return cluster
