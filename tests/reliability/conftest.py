"""Fault injection: a redis-server of each test's own, and daphne processes pointed at it.

The shared Redis (REDIS_URL, port 6379) that the rest of the suite uses is
never touched: these tests kill and freeze their own.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.test_live_servers import DaphneCluster

START_TIMEOUT = 10.0  # seconds for a redis-server to answer PING


def port_outside_ephemeral_range() -> int:
    """A free loopback port that no outgoing connection can take while Redis is down.

    Client sockets get their local port from the ephemeral range; a Redis port
    from that range could be taken by a daphne's reconnect attempt between a
    kill and the restart on the same port.
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(200):
        port = random.randrange(10_000, max(10_001, low))
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


class RedisServer:
    """One redis-server subprocess on a loopback port of its own, with no persistence."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port_outside_ephemeral_range()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log_path = directory / "redis.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        """Start (or restart, on the same port) and wait until it answers PING."""
        command = [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(self.directory), "--logfile", "",
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while not self.answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not start:\n{self.log_tail()}")
            time.sleep(0.05)

    def answers(self, timeout: float = 0.5) -> bool:
        client = redis.Redis(
            port=self.port, socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0)
        )
        try:
            return bool(client.ping())
        except (redis.RedisError, OSError):
            return False
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: no goodbye to any client, and every key is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def freeze(self) -> None:
        """SIGSTOP: connections stay open, and nothing answers."""
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""


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
def cluster(transactional_db, tmp_path, own_redis) -> Iterator[DaphneCluster]:
    """Daphne processes on this test's own Redis; killed before the Redis and before the database is flushed."""
    servers = DaphneCluster(tmp_path)
    servers.env["REDIS_URL"] = own_redis.url
    try:
        yield servers
    finally:
        servers.kill_all()
