"""The database's own faults: PostgreSQL stopped (fast, and immediate: a crash) and started again under chat load.

While the database is away, a send gets `not_saved` with its nonce and the
clients send it again, same nonce, with backoff (as the room page does); the
sockets stay open; a page answers a friendly 503 and the API its JSON error,
both with Retry-After; a new socket is told `unavailable` and closed with 1012.
Once it is back: the first new acknowledgement within RECOVERY_LIMIT (10 s),
every acknowledged message stored once, every client holding each once, in
order, and no client ever shown a message the database does not hold. A
process that held a database connection through the outage without using it
serves its next send at once: the dead connection is discarded, not tried.

The PostgreSQL is the test's own (tests/pgcluster.py: initdb and pg_ctl on a
free loopback port), never the machine's shared one. The test process uses it
too, for the users, their sessions and the final comparison
(`default_database_on`). Uvicorn processes as the README runs them (two
under load, a third with one quiet socket), on the suite's Redis, loopback
only, bounded in time. On SQLite there is no database server to stop: the
test is skipped there.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import time
from collections.abc import Iterator

import pytest
from channels.db import database_sync_to_async
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.db import connection
from websockets.exceptions import ConnectionClosed

from bench.serverprocess import ServerProcess
from chat import database, protocol, services
from tests.helpers import session_cookie
from tests.pgcluster import PostgresCluster, default_database_on
from tests.reliability.load import (
    RECOVERY_LIMIT,
    ChatClient,
    Load,
    assert_logged_once_per_server,
    check_nothing_lost,
    report,
)
from tests.servers import APP_ERROR_MARKERS, ServerCluster, assert_no_app_errors

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(
        connection.vendor != "postgresql",
        reason="stops a database server under load: PostgreSQL only (run with DATABASE_URL=postgres://…)",
    ),
]

CLIENTS = 10
OUTAGE = 5.0  # seconds the database stays down: the scenario
TEST_LIMIT = 120.0  # seconds the test may take, start to end


@pytest.fixture
def own_postgres(transactional_db, tmp_path) -> Iterator[PostgresCluster]:
    """A migrated PostgreSQL of this test's own, and this process's `default` database meanwhile."""
    cluster = PostgresCluster()
    try:
        cluster.start()
        cluster.create_database()
        with default_database_on(cluster):
            call_command("migrate", verbosity=0, interactive=False)
            yield cluster
    finally:
        cluster.destroy(keep_log_in=tmp_path)


@pytest.fixture
def cluster_on_own_postgres(own_postgres, cluster) -> ServerCluster:
    """tests/conftest.py's `cluster`, on this test's own PostgreSQL; its servers die before that PostgreSQL."""
    cluster.env["DATABASE_URL"] = own_postgres.url
    return cluster


def http_get(server: ServerProcess, path: str, cookie: str) -> tuple[int, str | None, str | None, str]:
    """GET `path` signed in by `cookie`: (status, Retry-After, Content-Type, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("GET", path, headers={"Cookie": f"{settings.SESSION_COOKIE_NAME}={cookie}"})
        response = conn.getresponse()
        body = response.read().decode()
        return response.status, response.getheader("Retry-After"), response.getheader("Content-Type"), body
    finally:
        conn.close()


async def first_ok_after(server: ServerProcess, path: str, cookie: str, moment: float) -> float:
    """Seconds from `moment` until GET `path` answers 200."""
    while (await asyncio.to_thread(http_get, server, path, cookie))[0] != 200:
        await asyncio.sleep(0.1)  # polling until the caller's deadline
    return time.monotonic() - moment


def quiet_room_and_user() -> tuple[str, str]:
    user = get_user_model().objects.create_user("quiet")
    return services.room_create(slug="quiet", name="Quiet", created_by=user).slug, session_cookie(user)


async def next_frame(ws) -> dict:
    """The next frame but presence."""
    while (frame := json.loads(await asyncio.wait_for(ws.recv(), 5)))["type"] == "presence":
        pass
    return frame


async def handshake_answer(server: ServerProcess, cookie: str, slug: str) -> tuple[list[dict], int | None]:
    """Open a socket and read it until it closes: (its frames, its close code)."""
    ws = await ChatClient("newcomer", cookie, slug, [server], 0).connect()
    frames = []
    try:
        while True:
            frames.append(json.loads(await asyncio.wait_for(ws.recv(), 5)))
    except ConnectionClosed:
        return frames, ws.close_code
    finally:
        await ws.close()


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["fast", "immediate"])  # a clean shutdown; a crash, recovered at the start
async def test_postgres_restarted_under_load_loses_nothing_and_pages_answer_503(
    own_postgres, cluster_on_own_postgres, stop
):
    async with asyncio.timeout(TEST_LIMIT):
        *servers, quiet_server = await cluster_on_own_postgres.start(3)
        load = await Load.start(servers, CLIENTS)
        slug, cookie = load.clients[0].slug, load.clients[0].cookie
        # A socket on a process of its own that joins (so the process holds a database connection) and then
        # says nothing until the database is back: its first send then must not trip on the dead connection.
        quiet_slug, quiet_cookie = await database_sync_to_async(quiet_room_and_user)()
        quiet = await ChatClient("quiet", quiet_cookie, quiet_slug, [quiet_server], 0).connect()
        try:
            while (await next_frame(quiet))["type"] != "ready":
                pass
            await load.wait(lambda: len(load.acked()) >= 4 * CLIENTS, 15, "chat before the fault")

            await asyncio.to_thread(own_postgres.stop, stop)
            stopped_at = time.monotonic()
            await load.wait(lambda: load.not_saved() > 0, 5, "a send answered not_saved")
            page = await asyncio.to_thread(http_get, servers[0], f"/rooms/{slug}/", cookie)
            api = await asyncio.to_thread(http_get, servers[1], f"/api/rooms/{slug}/messages", cookie)
            newcomer = await handshake_answer(servers[0], cookie, slug)
            await asyncio.sleep(stopped_at + OUTAGE - time.monotonic())  # the scenario: down for OUTAGE seconds
            closed_during = sum(at > stopped_at for c in load.clients for at, _ in c.closes)
            not_saved_during = load.not_saved()

            await asyncio.to_thread(own_postgres.start)
            back_at = time.monotonic()
            outage = back_at - stopped_at
            await quiet.send(json.dumps({"type": "send", "body": "first after the outage", "nonce": "quiet-1"}))
            quiet_answer = await next_frame(quiet)
            page_back = asyncio.get_running_loop().create_task(first_ok_after(servers[1], "/", cookie, back_at))
            recovery, last_seq = await load.recover_and_finish(back_at)
            page_recovery = await asyncio.wait_for(page_back, RECOVERY_LIMIT)
        finally:
            await load.stop()
            await quiet.close()
        # Holes allowed: a commit whose answer the outage cut off is stored but never published (its retry
        # answers only its sender), so the others may have to ask for it.
        numbers = await check_nothing_lost(load, last_seq, holes_allowed=True)

    # During the outage: sends refused as retryable, and sent again with their nonce until stored.
    assert not_saved_during > 0, load.describe()
    unsaved = [item for client in load.clients for item in client.sends.values() if item.not_saved]
    assert unsaved and all(item.seq is not None for item in unsaved)
    assert sum(item.retries for item in unsaved) > 0
    assert closed_during == 0, f"sockets closed during the outage\n{load.describe()}"
    # A page and the API answer 503, friendly, with Retry-After; a new socket is told to come back.
    status, retry_after, content_type, body = page
    assert (status, retry_after) == (503, str(database.RETRY_AFTER)) and content_type.startswith("text/html")
    assert "Back in a moment" in body and "Traceback" not in body
    status, retry_after, content_type, body = api
    assert (status, retry_after, content_type) == (503, str(database.RETRY_AFTER), "application/json")
    assert json.loads(body)["error"]["code"] == "database_unavailable"
    frames, close_code = newcomer
    assert [frame["code"] for frame in frames] == ["unavailable"]
    assert close_code == protocol.CLOSE_SERVICE_RESTART
    # Back: chatting again within RECOVERY_LIMIT, the quiet socket's first send stored at once; the outage
    # logged once per process that met it, and no traceback anywhere.
    assert recovery <= RECOVERY_LIMIT
    assert (quiet_answer["type"], quiet_answer.get("message", {}).get("nonce")) == ("message", "quiet-1"), quiet_answer
    assert_logged_once_per_server(servers, "The database is unreachable")
    assert_logged_once_per_server(servers, "The database answers again.")
    for server in [*servers, quiet_server]:
        assert_no_app_errors(server, APP_ERROR_MARKERS)
    report(
        f"postgres-restart ({stop})",
        outage_s=round(outage, 2),
        not_saved=not_saved_during,
        retried_sends=len(unsaved),
        recovery_s=round(recovery, 2),
        page_recovery_s=round(page_recovery, 2),
        quiet_process_met_the_outage="The database is unreachable" in quiet_server.log_text(),
        **numbers,
        load=load.describe(),
    )
