"""Redis behind Sentinel: the site's clients find the primary, and follow it when Sentinel promotes the replica.

Real processes on loopback ports of their own: a primary, its replica and three
Sentinels monitoring it as "chat" (quorum 2). The settings come from
chatsite/settings.py itself, run with REDIS_SENTINELS in the environment, so
the parsing and the channel layer's host dict are the site's own.
"""

from __future__ import annotations

import asyncio
import copy
import runpy
import subprocess
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from channels_redis.pubsub import RedisPubSubChannelLayer
from django.conf import settings as django_settings
from pytest_django.fixtures import Settings

import chatsite.settings
from chat import ephemeral
from tests.servers import REDIS_START_TIMEOUT, RedisServer

pytestmark = pytest.mark.slow  # starts five redis-server processes per test, and waits out failovers

MASTER_NAME = "chat"
READY_TIMEOUT = 15.0  # seconds for the Sentinels to find each other and the replica
FAILOVER_DEADLINE = 15.0  # seconds to poll after the kill before giving up
FAILOVER_BUDGET = 10.0  # seconds the site may take to write to the new primary after the kill
POLL = 0.05  # seconds between polls


class RedisProcess(RedisServer):
    """tests/servers.py's RedisServer, started with extra arguments (a replica) or as a Sentinel."""

    def __init__(self, directory: Path, *extra: str, sentinel_of: int | None = None) -> None:
        super().__init__(directory)
        self.extra = extra
        self.sentinel_of = sentinel_of

    def command(self) -> list[str]:
        if self.sentinel_of is None:
            return [
                "redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.directory), "--logfile", "", *self.extra,
            ]  # fmt: skip
        # Sentinel rewrites its config file (what it learnt about the others), so it gets one of its own.
        config = self.directory / "sentinel.conf"
        config.write_text(
            f'port {self.port}\nbind 127.0.0.1\ndir {self.directory}\nlogfile ""\n'
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.sentinel_of} 2\n"
            f"sentinel down-after-milliseconds {MASTER_NAME} 1000\n"
            f"sentinel failover-timeout {MASTER_NAME} 5000\n"
        )
        return ["redis-server", str(config), "--sentinel"]

    def start(self) -> None:
        """Start and wait until it answers PING (a Sentinel answers it too)."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + REDIS_START_TIMEOUT
        while not self.answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not start:\n{self.log_tail()}")
            time.sleep(POLL)  # polling PING until the deadline


def direct(port: int) -> redis.Redis:
    """A plain client to one server, asking it (not Sentinel) what it holds."""
    return redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1, decode_responses=True)


@dataclass
class SentinelSetup:
    primary: RedisProcess
    replica: RedisProcess
    sentinels: list[RedisProcess]

    @property
    def env_value(self) -> str:
        """REDIS_SENTINELS as an operator writes it."""
        return ",".join(f"127.0.0.1:{sentinel.port}" for sentinel in self.sentinels)

    def ready(self) -> bool:
        """The replica is in sync, and every Sentinel knows it and the two other Sentinels (else no quorum)."""
        try:
            with direct(self.replica.port) as replica:
                if replica.info("replication").get("master_link_status") != "up":
                    return False
            for sentinel in self.sentinels:
                with direct(sentinel.port) as client:
                    master = client.sentinel_master(MASTER_NAME)
                if master["num-other-sentinels"] != len(self.sentinels) - 1 or master["num-slaves"] != 1:
                    return False
                if master["port"] != self.primary.port or not master["is_master"] or master["is_sdown"]:
                    return False
        except redis.RedisError:
            return False
        return True


@pytest.fixture
def redis_sentinels(tmp_path: Path) -> Iterator[SentinelSetup]:
    """A primary, a replica and three Sentinels; every process is killed at teardown, whatever happened."""
    primary = RedisProcess(tmp_path / "primary")
    replica = RedisProcess(tmp_path / "replica", "--replicaof", "127.0.0.1", str(primary.port))
    sentinels = [RedisProcess(tmp_path / f"sentinel-{i}", sentinel_of=primary.port) for i in range(3)]
    setup = SentinelSetup(primary, replica, sentinels)
    try:
        for server in (primary, replica, *sentinels):
            server.start()
        deadline = time.monotonic() + READY_TIMEOUT
        while not setup.ready():
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {s.directory.name}\n{s.log_tail()}" for s in (replica, *sentinels))
                raise RuntimeError(f"the Sentinels did not find each other and the replica in time:\n{logs}")
            time.sleep(POLL)  # polling until the deadline
        yield setup
    finally:
        for server in (*sentinels, replica, primary):
            server.kill()


@pytest.fixture
async def site_on_sentinels(
    redis_sentinels: SentinelSetup, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[dict[str, Any]]:
    """The site's settings as chatsite/settings.py makes them from REDIS_SENTINELS; chat/ephemeral.py's clients anew.

    Yields the freshly computed settings module's namespace (its CHANNEL_LAYERS holds the Sentinel host dict).
    """
    monkeypatch.setenv("REDIS_SENTINELS", redis_sentinels.env_value)
    monkeypatch.setenv("CHANNEL_LAYER", "redis")
    monkeypatch.delenv("REDIS_SENTINEL_MASTER", raising=False)
    computed = runpy.run_path(chatsite.settings.__file__)
    assert computed["REDIS_SENTINELS"] == [("127.0.0.1", s.port) for s in redis_sentinels.sentinels]
    assert computed["REDIS_SENTINEL_MASTER"] == MASTER_NAME
    for name in ("REDIS_SENTINELS", "REDIS_SENTINEL_MASTER", "REDIS_SENTINEL_TIMEOUT", "CHANNEL_LAYER"):
        setattr(settings, name, computed[name])
    # Clients made before (on the test Redis) must not answer for the Sentinels' primary.
    monkeypatch.setattr(ephemeral, "_sync_client", None)
    monkeypatch.setattr(ephemeral, "_clients", weakref.WeakKeyDictionary())
    try:
        yield computed
    finally:
        # The clients' pools, and the connections they hold to the Sentinels themselves.
        async_client = ephemeral._clients.get(asyncio.get_running_loop())
        if async_client is not None:
            for sentinel in _sentinel_clients(async_client):
                await sentinel.aclose()
            await async_client.aclose(close_connection_pool=True)  # it was given its pool, so not closed by default
        if ephemeral._sync_client is not None:
            for sentinel in _sentinel_clients(ephemeral._sync_client):
                sentinel.close()
            ephemeral._sync_client.close()
            ephemeral._sync_client.connection_pool.disconnect()


def _sentinel_clients(client: Any) -> list[Any]:
    """The clients a Sentinel-backed client's pool holds to the Sentinels themselves (none if it has no Sentinels)."""
    manager = getattr(client.connection_pool, "sentinel_manager", None)
    return list(manager.sentinels) if manager is not None else []


def _key(name: str) -> str:
    """The key chat/ephemeral.py stores `name` under."""
    return f"{django_settings.CHANNEL_LAYER_PREFIX}:{name}"


async def test_the_sites_clients_find_the_primary_through_the_sentinels(
    redis_sentinels: SentinelSetup, site_on_sentinels: dict[str, Any]
) -> None:
    """With only Sentinel addresses configured, the health check, rate limits and claims reach the primary."""
    ephemeral._client_sync().ping()
    tag = uuid.uuid4().hex
    # The rate limits fail open (0 when Redis is away), so the keys on the primary are the proof.
    assert ephemeral.rate_limit(f"sync-{tag}", limit=5) == 0
    assert await ephemeral.rate_limit_async(f"async-{tag}", limit=5) == 0
    assert await ephemeral.claim(f"claim-{tag}", 60_000) is True
    assert await ephemeral.claim(f"claim-{tag}", 60_000) is False  # the first claim was stored
    assert not ephemeral.redis_away()
    with direct(redis_sentinels.primary.port) as primary:
        assert primary.execute_command("ROLE")[0] == "master"
        assert primary.exists(_key(f"rate:sync-{tag}"), _key(f"rate:async-{tag}"), _key(f"claim-{tag}")) == 3


async def test_the_sites_clients_follow_a_failover_to_the_promoted_replica(
    redis_sentinels: SentinelSetup, site_on_sentinels: dict[str, Any]
) -> None:
    """SIGKILL the primary: within 10 s the health check answers and writes land on the former replica."""
    # Both clients hold connections to the primary when it dies, as a running site's do.
    ephemeral._client_sync().ping()
    assert await ephemeral.claim(f"before-{uuid.uuid4().hex}", 60_000) is True

    redis_sentinels.primary.kill()
    killed_at = time.monotonic()
    written: str | None = None
    last_error: BaseException | None = None
    while written is None:
        assert time.monotonic() - killed_at < FAILOVER_DEADLINE, f"no write reached a new primary: {last_error!r}"
        # After a failure the site skips Redis for AWAY_SECONDS; it is waited out as the site would.
        if not ephemeral.redis_away():
            key = f"after-{uuid.uuid4().hex}"  # fresh each try: a timed-out try may still have been stored
            try:
                ephemeral._client_sync().ping()
                if await ephemeral.claim(key, 60_000):
                    written = key
                    break
            except ephemeral.REDIS_ERRORS as error:
                last_error = error
        await asyncio.sleep(POLL)  # polling until the deadline
    took = time.monotonic() - killed_at
    assert took < FAILOVER_BUDGET, f"the site wrote to the new primary only {took:.1f} s after the kill"

    tag = uuid.uuid4().hex
    assert ephemeral.rate_limit(f"sync-{tag}", limit=5) == 0
    with direct(redis_sentinels.replica.port) as promoted:
        assert promoted.execute_command("ROLE")[0] == "master"
        assert promoted.exists(_key(written), _key(f"rate:sync-{tag}")) == 2


async def test_the_channel_layer_delivers_group_messages_before_and_after_a_failover(
    redis_sentinels: SentinelSetup, site_on_sentinels: dict[str, Any]
) -> None:
    """The pub/sub layer built from the site's Sentinel host dict reaches a group member across a failover."""
    config = copy.deepcopy(site_on_sentinels["CHANNEL_LAYERS"]["default"]["CONFIG"])
    assert config["hosts"][0]["sentinels"] == [("127.0.0.1", s.port) for s in redis_sentinels.sentinels]
    config["prefix"] = f"test-sentinel-{uuid.uuid4().hex[:12]}"
    layer = RedisPubSubChannelLayer(**config)
    received: asyncio.Queue[dict] = asyncio.Queue()

    async def receive_all(channel: str) -> None:
        # One receive() at a time that is never timed out: cancelling one unsubscribes its channel.
        while True:
            await received.put(await layer.receive(channel))

    async def deliver(since: float, budget: float) -> None:
        """group_send until one of the messages sent in this call arrives; fail `budget` seconds after `since`."""
        sent: set[str] = set()
        last_error: BaseException | None = None
        while True:
            assert time.monotonic() - since < budget, f"no group message arrived: {last_error!r}"
            token = uuid.uuid4().hex
            try:
                sent.add(token)
                await asyncio.wait_for(layer.group_send("room", {"type": "chat.event", "token": token}), 1)
            except ephemeral.REDIS_ERRORS as error:
                last_error = error
            try:
                message = await asyncio.wait_for(received.get(), 0.5)
            except TimeoutError:
                continue
            if message.get("token") in sent:
                return

    channel = await layer.new_channel()
    await layer.group_add("room", channel)
    receiver = asyncio.create_task(receive_all(channel))
    try:
        await deliver(time.monotonic(), 5.0)

        redis_sentinels.primary.kill()
        killed_at = time.monotonic()
        await deliver(killed_at, FAILOVER_DEADLINE)  # sent after the kill: only the promoted replica could carry it
        took = time.monotonic() - killed_at
        assert took < FAILOVER_BUDGET, f"the group message arrived only {took:.1f} s after the kill"
        with direct(redis_sentinels.replica.port) as promoted:
            assert promoted.execute_command("ROLE")[0] == "master"
    finally:
        receiver.cancel()
        await asyncio.gather(receiver, return_exceptions=True)
        # flush() closes the pools but not their connections to the Sentinels (channels_redis 4.3), so those here.
        sentinels = [
            sentinel
            for loop_layer in layer._layers.values()
            for shard in loop_layer._shards
            if shard._redis is not None
            for sentinel in _sentinel_clients(shard._redis)
        ]
        await layer.flush()
        for sentinel in sentinels:
            await sentinel.aclose()
