"""Thirty people chat through HAProxy while the cluster's parts fail, one after the other (bin/cluster).

The cluster is bin/cluster's: HAProxy on the loopback, three app hosts, a
Redis primary and replica with three Sentinels, and PostgreSQL, each in a
network namespace. The clients are tests/reliability/load.py's, which do
what the room page does (reconnect with backoff, resume after the highest
seq held, resend unacknowledged sends with their nonce). They sign up
through the site's form and connect only to HAProxy. In turn:

1. an app host is killed: its clients reconnect through HAProxy to the others;
2. the Redis primary is killed: Sentinel promotes the replica, every app
   host follows it (its health check passes again and its sockets are told
   delivery is live), and until then they deliver from the database;
3. one app host is cut off from Redis (blackhole routes): its sockets keep
   delivering, from the database, and HAProxy sends newcomers elsewhere;
4. HAProxy is restarted: every socket reconnects.

Each fault lasts a quarter of the run; the part is healed (restarted,
routes removed) before the next. At the end every client resumes once more
and tests/reliability/load.py's check compares what each holds with the
database: every acknowledged message stored once, every client holding
exactly the room's messages, in order.

The long run: `sudo .venv/bin/python -m tests.cluster.scenario --seconds 60`
(tests/cluster/test_failover.py runs it short in the suite).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parents[2]
CLIENTS = 30
FOLLOW_LIMIT = 10.0  # seconds from the Redis primary's death until every app host is live on the new one
MOVE_LIMIT = 15.0  # seconds for every client to be chatting again after its host or the balancer went away
# Seconds from a message's acknowledgement to its arrival at every client while Redis is away from a host
# (it delivers from the database) and every socket stays open.
DELIVERY_LIMIT = 3.0
SIGNUP_THREADS = 6
SIGNUP_TIMEOUT = 30.0  # seconds for one sign-up's requests


@dataclass
class Balancer:
    """HAProxy's listener on the loopback: the only server the clients know (ChatClient's `servers`, and
    bench.scenario.sign_in's)."""

    port: int
    directory: Path  # the cluster's
    name: str = "haproxy"
    proc: None = None

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self) -> str:
        log = self.directory / "logs" / "haproxy.log"
        return f"--- {log}, tail ---\n{log.read_text(errors='replace')[-4000:] if log.exists() else ''}"


@dataclass
class Cluster:
    """One cluster, driven through bin/cluster, as an operator would."""

    name: str
    port: int
    directory: Path

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "CLUSTER_NAME": self.name, "PORT": str(self.port), "CLUSTER_DIR": str(self.directory)}

    def call(self, *args: str, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BASE_DIR / "bin" / "cluster"), *args],
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=BASE_DIR,
        )

    def run(self, *args: str, timeout: float = 300, env: dict[str, str] | None = None) -> str:
        done = self.call(*args, timeout=timeout, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"bin/cluster {' '.join(args)} exited {done.returncode}:\n{done.stdout}{done.stderr}")
        return done.stdout

    def up(self) -> None:
        # 30 clients at 2 messages a second, resending after each fault, would meet the per-user
        # rate limit (20 in 10 s); the suite's own servers lift it the same way (tests/conftest.py).
        self.run("up", env={"CHAT_MESSAGE_RATE_LIMIT": "100000"})

    def down(self) -> None:
        self.run("down")

    def which(self, part: str) -> str:
        return self.run("which", part).strip()

    def haproxy_servers(self) -> dict[str, str]:
        """{"app/app1": "UP", ...}: what HAProxy's health checks make of each app host."""
        lines = self.run("servers").splitlines()
        return {key: state.split()[0] for key, _, state in (line.partition("=") for line in lines)}

    def healthy_hosts(self) -> int:
        """App hosts whose database and Redis both answer (HAProxy's main backend)."""
        return sum(state == "UP" for key, state in self.haproxy_servers().items() if key.startswith("app/"))

    def answers_healthy(self, host: str) -> bool:
        """The host's own /healthz is 200 (its database and Redis answer), asked from inside the cluster."""
        return self.call("health", host).returncode == 0

    def sentinels_name(self) -> set[str]:
        """The primary each Sentinel names now."""
        out = self.run("status")
        return set(re.findall(r"names (\S+) primary", out))

    def rows(self, slug: str) -> list[dict]:
        """The room's stored messages, read from the cluster's PostgreSQL over its unix socket."""
        query = (
            "SELECT json_agg(json_build_object('seq', m.seq, 'id', m.id, 'body', m.body, 'nonce', m.nonce) "
            "ORDER BY m.seq) FROM chat_message m JOIN chat_room r ON r.id = m.room_id WHERE r.slug = %s"
        )
        import psycopg

        with psycopg.connect(host=str(self.directory / "pg" / "socket"), user="postgres", dbname="chat") as conn:
            (rows,) = conn.execute(query, (slug,)).fetchone()
        return rows or []

    def logs(self) -> str:
        parts = []
        for log in sorted((self.directory / "logs").glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()[-15:]
            parts.append(f"--- {log.name}\n" + "\n".join(lines))
        return "\n".join(parts)


@dataclass
class Phase:
    fault: str
    started: float
    recovered_after: float | None = None  # seconds from the fault to recovery, as the phase measures it
    healed: float | None = None  # when the healing began
    sockets_stay: bool = False  # no socket is closed by this fault: every message must arrive live
    figures: dict = field(default_factory=dict)


class Scenario:
    def __init__(self, cluster: Cluster, seconds: float, say=print) -> None:
        self.cluster = cluster
        self.phase_seconds = seconds / 4
        self.say = say
        self.phases: list[Phase] = []

    async def run(self) -> dict:
        from bench.scenario import sign_in
        from tests.reliability.load import Load, check_nothing_lost, delivery_delays

        run_id = uuid.uuid4().hex[:6]
        slug = f"cluster-{run_id}"
        self.cluster.run("manage", "createroom", slug, "--name", f"Cluster {run_id}")
        names = [f"c{run_id}{index:02d}" for index in range(CLIENTS)]
        password = uuid.uuid4().hex
        self.say(f"signing up {CLIENTS} people through HAProxy ...")
        with ThreadPoolExecutor(SIGNUP_THREADS) as pool:
            balancer = Balancer(self.cluster.port, self.cluster.directory)
            sessions = pool.map(lambda name: sign_in(balancer, name, password, SIGNUP_TIMEOUT)[0].session_id, names)
            cookies = list(sessions)
        load = await Load.begin(slug, list(zip(names, cookies, strict=True)), [balancer])
        self.say(f"{CLIENTS} clients live through HAProxy; each fault in turn, {self.phase_seconds:.0f} s each")
        try:
            await self.app_host_killed(load)
            await self.redis_primary_killed(load)
            await self.app_host_cut_from_redis(load)
            await self.balancer_restarted(load)
            self.say("finishing: every send acknowledged, every client resumes once more ...")
            last_seq = await load.finish()
        finally:
            await load.stop()
        rows = await asyncio.to_thread(self.cluster.rows, slug)
        # An app host killed between a commit and its publish leaves a message its clients get by asking.
        counts = await check_nothing_lost(load, last_seq, holes_allowed=True, rows=rows)
        for phase in self.phases:
            if phase.sockets_stay:
                # Sent while the fault lasted: delivered to every client, live or from the database, in time.
                delays = delivery_delays(load, phase.started, phase.healed)
                phase.figures["max_delivery_s"] = round(max(delays), 2)
                # What the person sees: from pressing send to the message on every screen (the sender's included).
                phase.figures["max_send_to_all_s"] = round(max(
                    max(client.received_at[item.seq] for client in load.clients) - item.sent_at
                    for item in load.acked().values() if phase.started <= item.acked_at <= phase.healed
                ), 2)  # fmt: skip
                phase.figures["closed"] = sum(
                    phase.started <= at <= phase.healed for client in load.clients for at, _ in client.closes
                )
                assert phase.figures["closed"] == 0, (phase.fault, phase.figures)
                assert phase.figures["max_delivery_s"] <= DELIVERY_LIMIT, (phase.fault, phase.figures)
        return {
            **counts,
            "clients": CLIENTS,
            "reconnects": sum(client.connects for client in load.clients) - CLIENTS,
            "errors": dict(sum((client.errors for client in load.clients), Counter())),
            "phases": {phase.fault: {"recovered_s": phase.recovered_after, **phase.figures} for phase in self.phases},
        }

    async def wait(self, condition, limit: float, what: str, since: float | None = None) -> float:
        """Seconds from `since` (default: now) until `condition()` held; AssertionError past `limit`."""
        since = time.monotonic() if since is None else since
        while not await asyncio.to_thread(condition):
            if time.monotonic() - since > limit:
                raise AssertionError(f"not within {limit} s: {what}\n{self.cluster.logs()}")
            await asyncio.sleep(0.1)  # polling the condition until the limit
        return round(time.monotonic() - since, 2)

    async def chat_on(self, phase: Phase) -> None:
        """The fault (or its healing) goes on until the phase's time is up: the scenario's pace."""
        await asyncio.sleep(max(0.0, phase.started + self.phase_seconds - time.monotonic()))

    async def heal(self, phase: Phase) -> None:
        phase.healed = time.monotonic()
        await asyncio.to_thread(self.cluster.run, "heal")
        await self.wait(lambda: self.cluster.healthy_hosts() == 3, 30, "every app host healthy after healing")

    def begin(self, fault: str, *, sockets_stay: bool = False) -> Phase:
        phase = Phase(fault, time.monotonic(), sockets_stay=sockets_stay)
        self.phases.append(phase)
        self.say(f"- {fault}")
        return phase

    async def app_host_killed(self, load) -> None:
        phase = self.begin("app host killed")
        before = {id(client): client.connects for client in load.clients}
        await asyncio.to_thread(self.cluster.run, "kill", "app2")
        # Its clients lost their sockets: every client is live again, the moved ones on another host.
        phase.recovered_after = await self.wait(
            lambda: load.live() == len(load.clients) and any(c.connects > before[id(c)] for c in load.clients),
            MOVE_LIMIT,
            "app2's clients live again on the other hosts",
            since=phase.started,
        )
        phase.figures["moved"] = sum(client.connects > before[id(client)] for client in load.clients)
        await self.chat_on(phase)
        await self.heal(phase)

    async def redis_primary_killed(self, load) -> None:
        phase = self.begin("Redis primary killed", sockets_stay=True)
        old = await asyncio.to_thread(self.cluster.which, "redis-primary")
        await asyncio.to_thread(self.cluster.run, "kill", "redis-primary")
        new = "redis2" if old == "redis1" else "redis1"
        phase.figures["promoted_s"] = await self.wait(
            lambda: self.cluster.sentinels_name() == {new}, FOLLOW_LIMIT, f"Sentinel promoting {new}", phase.started
        )

        def followed() -> bool:
            # Every host answers /healthz with Redis (through Sentinel) and no socket is left "delayed".
            told = [client.delivery[-1][1] for client in load.clients if client.delivery]
            hosts = ("app1", "app2", "app3")
            return all(mode == "live" for mode in told) and all(map(self.cluster.answers_healthy, hosts))

        phase.recovered_after = await self.wait(
            followed, FOLLOW_LIMIT, "every app host following the new primary", since=phase.started
        )
        # HAProxy's checks see it next (two passing checks a second apart).
        phase.figures["balancer_s"] = await self.wait(
            lambda: self.cluster.healthy_hosts() == 3, MOVE_LIMIT, "HAProxy finding every host healthy", phase.started
        )
        phase.figures["told_delayed"] = sum(any(m == "delayed" for _, m in c.delivery) for c in load.clients)
        await self.chat_on(phase)
        await self.heal(phase)

    async def app_host_cut_from_redis(self, load) -> None:
        phase = self.begin("app host cut off from Redis", sockets_stay=True)
        await asyncio.to_thread(self.cluster.run, "cut", "app1")
        # HAProxy's check sees it (/healthz names Redis), so newcomers go to the two others.
        phase.recovered_after = await self.wait(
            lambda: self.cluster.haproxy_servers().get("app/app1") == "DOWN",
            MOVE_LIMIT,
            "HAProxy seeing app1 cut",
            since=phase.started,
        )
        await self.chat_on(phase)
        phase.figures["live_while_cut"] = load.live()
        await self.heal(phase)

    async def balancer_restarted(self, load) -> None:
        phase = self.begin("HAProxy restarted")
        before = sum(client.connects for client in load.clients)
        await asyncio.to_thread(self.cluster.run, "restart", "haproxy")
        phase.recovered_after = await self.wait(
            lambda: load.live() == len(load.clients) and sum(c.connects for c in load.clients) >= before + CLIENTS,
            MOVE_LIMIT,
            "every client reconnected through the restarted HAProxy",
            since=phase.started,
        )
        await self.chat_on(phase)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60, help="how long the clients chat (60)")
    parser.add_argument("--port", type=int, default=8090, help="HAProxy's port on 127.0.0.1 (8090)")
    parser.add_argument("--keep", action="store_true", help="leave the cluster up afterwards")
    args = parser.parse_args(argv)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatsite.settings")
    os.environ.setdefault("SECRET_KEY", "cluster-scenario-client")  # the clients import the settings' names only
    import django

    django.setup()
    cluster = Cluster("chatscn", args.port, Path("/tmp/chatscn-cluster"))
    print("bin/cluster up ...")
    cluster.up()
    try:
        result = asyncio.run(Scenario(cluster, args.seconds).run())
    finally:
        if not args.keep:
            cluster.down()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
