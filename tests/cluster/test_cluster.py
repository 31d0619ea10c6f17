"""bin/cluster on this machine: real HAProxy, three app hosts, Redis with Sentinel and PostgreSQL in network
namespaces. Two people chat through it in Chromium across a Redis failover; thirty clients lose nothing while
its parts fail in turn (tests/cluster/scenario.py); and it leaves nothing behind.

bin/cluster needs root (it makes namespaces), as CI runs.
"""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.async_api import expect

from bench.serverprocess import free_port
from tests.cluster.scenario import FOLLOW_LIMIT, Cluster, Scenario
from tests.e2e.helpers import expect_live, send

pytestmark = pytest.mark.slow

NAME = "chattest"
SECONDS = 32.0  # the clients chat for this long: 8 s per fault (the long run is 60 s, see scenario.py)


def namespaces() -> list[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return sorted(line.split()[0] for line in listed.splitlines() if line.startswith(f"{NAME}-"))


def in_namespace(host: str, *command: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", f"{NAME}-{host}", *command], capture_output=True, text=True)


def machine_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def running(pid: int) -> bool:
    """Still running: a process killed a moment ago may stay a zombie until PID 1 reaps it, which counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture(scope="module")
def links_before() -> set[str]:
    return machine_links()


@pytest.fixture(scope="module")
def cluster(links_before) -> Iterator[Cluster]:
    cluster = Cluster(NAME, free_port(), Path(f"/tmp/{NAME}-cluster"))  # PostgreSQL's user must reach its files
    try:
        cluster.up()
        yield cluster
    finally:
        cluster.down()


def test_the_cluster_is_reachable_only_through_haproxy_on_the_loopback(cluster, links_before):
    assert namespaces() == sorted(
        f"{NAME}-{host}"
        for host in ("switch", "lb", "pg", "redis1", "redis2", "sentinel1", "sentinel2", "sentinel3", "app1", "app2")
        + ("app3",)
    )
    # No veth end, bridge or address was added to the machine: its links are what they were.
    assert machine_links() == links_before
    for host in ("lb", "app1", "redis1", "pg"):
        routes = [line.strip() for line in in_namespace(host, "ip", "route").stdout.splitlines()]
        assert routes == [f"10.77.0.0/24 dev eth0 proto kernel scope link src {routes[0].split()[-1]}"], routes
        # The machine's own Redis (its loopback) and any address outside the cluster are out of reach.
        outside = in_namespace(host, "redis-cli", "-h", "127.0.0.1", "-p", "6379", "PING")
        assert "PONG" not in outside.stdout
        unreachable = in_namespace(host, "ip", "route", "get", "192.0.2.1")
        assert unreachable.returncode != 0 and "unreachable" in unreachable.stderr.lower()
    # The one way in: HAProxy on 127.0.0.1, whose health checks find all three app hosts healthy.
    assert cluster.healthy_hosts() == 3


@pytest.mark.asyncio(loop_scope="session")
async def test_two_people_chat_in_browsers_through_haproxy_and_see_a_redis_failover_as_delayed(cluster, browser):
    origin = f"http://127.0.0.1:{cluster.port}"
    tag = uuid.uuid4().hex[:6]
    contexts = [await browser.new_context() for _ in range(2)]
    try:
        pages = [await context.new_page() for context in contexts]
        for page, name in zip(pages, (f"ann{tag}", f"ben{tag}"), strict=True):
            await page.goto(f"{origin}/accounts/signup/")
            await page.fill("#id_username", name)
            await page.fill("#id_password1", f"pw-{tag}-long-enough")
            await page.fill("#id_password2", f"pw-{tag}-long-enough")
            await page.get_by_role("button", name="Sign up").click()
            await expect(page.locator(".whoami")).to_contain_text(name)
            await page.goto(f"{origin}/rooms/lobby/")
            await expect_live(page)
        ann, ben = pages
        await send(ann, f"hello through HAProxy {tag}")
        await expect(ben.locator("#messages")).to_contain_text(f"hello through HAProxy {tag}")
        await send(ben, f"hi back {tag}")
        await expect(ann.locator("#messages")).to_contain_text(f"hi back {tag}")

        # The Redis primary dies: the pages say delivery is delayed, a message still goes through
        # (from the database), and once Sentinel has promoted the replica they are live again.
        await asyncio.to_thread(cluster.run, "kill", "redis-primary")
        for page in pages:
            await expect(page.locator("#connection-state")).to_have_attribute("data-state", "delayed", timeout=10_000)
        await send(ann, f"sent during the failover {tag}")
        await expect(ben.locator("#messages")).to_contain_text(f"sent during the failover {tag}", timeout=10_000)
        for page in pages:
            await expect_live(page, timeout=15_000)
        await send(ben, f"after the failover {tag}")
        await expect(ann.locator("#messages")).to_contain_text(f"after the failover {tag}")
    finally:
        for context in contexts:
            await context.close()
        await asyncio.to_thread(cluster.run, "heal")


async def test_thirty_clients_lose_nothing_while_a_host_redis_primary_link_and_balancer_fail_in_turn(cluster):
    result = await Scenario(cluster, SECONDS).run()  # asserts nothing lost, and each recovery in time
    phases = result["phases"]
    print(f"\n[cluster] {result}")
    assert result["acked"] == result["messages"] > 300
    assert phases["app host killed"]["moved"] >= 1
    redis = phases["Redis primary killed"]
    assert redis["promoted_s"] <= redis["recovered_s"] <= FOLLOW_LIMIT
    assert phases["app host cut off from Redis"]["live_while_cut"] == 30  # nobody was disconnected by the cut


def test_down_removes_every_namespace_process_and_file_even_after_failures(cluster, links_before):
    cluster.run("kill", "redis-primary")
    cluster.run("cut", "app3")
    processes = {int(pid) for name in namespaces() for pid in subprocess.check_output(
        ["ip", "netns", "pids", name], text=True).split()}  # fmt: skip
    assert len(processes) >= 10  # uvicorn and a worker per app host, Redis, Sentinels, PostgreSQL's
    cluster.run("kill", "haproxy")
    cluster.down()
    assert namespaces() == []
    assert not cluster.directory.exists()
    assert machine_links() == links_before
    assert {pid for pid in processes if running(pid)} == set()
