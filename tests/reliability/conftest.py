"""Fault injection: a redis-server of each test's own, and server processes pointed at it.

The shared Redis (REDIS_URL, port 6379) that the rest of the suite uses is
never touched: these tests kill and freeze their own (tests/servers.py's RedisServer).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.servers import RedisServer, ServerCluster


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
