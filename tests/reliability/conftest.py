"""Fault injection: server processes reaching a redis-server of the test's own through a proxy that can stall.

The own Redis (`own_redis`, in tests/conftest.py) is what these tests kill
and freeze; the shared Redis (REDIS_URL, port 6379) that the rest of the
suite uses is never touched.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.servers import ServerCluster, StallingTcpProxy


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
