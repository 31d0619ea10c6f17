"""A reconnect storm: every socket of a killed server process resumes on the others, quickly, losing nothing.

The short version of `manage.py stormbench` (docs/reliability.md, "Reconnect
storm"), with the same clients (bench/storm.py): three uvicorn processes as the
README runs them, serving bench/counted_asgi.py (the site's application, its
queries counted), on the suite's Redis and test database. 300 sockets in three
rooms connect to the first process while one sender per room posts through the
other two; the first is SIGKILLed; every client reconnects to the other two
with the room page's jittered backoff (live.js `backoff`) and resumes with
`?after=` the highest seq it holds without a hole, as the page does. The
checks below are made here, from the clients and the database, not taken
from the bench's verdict.
"""

from __future__ import annotations

import asyncio

import pytest
from channels.db import database_sync_to_async
from django.contrib.auth import get_user_model

from bench.storm import COUNTED_APP, Storm, StormPlan, figures, read_stats
from chat import services
from chat.models import Message
from tests.helpers import session_cookie
from tests.servers import assert_no_app_errors

pytestmark = pytest.mark.django_db(transaction=True)

SOCKETS = 300
ROOMS = 3
USERS = 5  # 60 sockets each; the suite's socket cap is 1,000 per user
RATE = 2.0  # messages per second per room, throughout
RESUME_LIMIT = 30.0  # seconds from the kill to the last socket's ready: the promise
# What a resume's handshake reads, and nothing else: the session and its user
# (Channels' AuthMiddleware), the room and the membership (selectors.room_visible),
# the room's cursors and one page of at most CHAT_RESUME_LIMIT messages
# (selectors.message_resume; a seventh query, and past CHAT_RESUME_LIMIT
# changes an eighth, only for a client whose changes_after is behind the
# room's, and nobody edits here).
MAX_QUERIES_PER_RESUME = 6
# On PostgreSQL each of the three database calls that query also begins with a
# `SELECT 1` health check (CONN_HEALTH_CHECKS; bench/counted_asgi.py counts them apart).
MAX_HEALTH_CHECKS_PER_RESUME = 3
TEST_LIMIT = 90.0


def make_rooms_and_users() -> tuple[list[str], list[str]]:
    User = get_user_model()
    users = [User.objects.create_user(f"storm{index}") for index in range(USERS)]  # no password: fast
    slugs = [services.room_create(slug=f"storm-{k}", name=f"Storm {k}", created_by=users[0]).slug for k in range(ROOMS)]
    return slugs, [session_cookie(user) for user in users]


@database_sync_to_async
def stored(slug: str) -> list[tuple[int, str]]:
    return list(Message.objects.filter(room__slug=slug).order_by("seq").values_list("seq", "body"))


@database_sync_to_async
def stored_nonces() -> list[str]:
    return list(Message.objects.values_list("nonce", flat=True))


@pytest.mark.slow
async def test_a_reconnect_storm_resumes_every_socket_within_30_s_without_loss_or_repeats(cluster):
    cluster.app = COUNTED_APP
    async with asyncio.timeout(TEST_LIMIT):
        slugs, session_ids = await database_sync_to_async(make_rooms_and_users)()
        home, *others = await cluster.start(3)
        plan = StormPlan(
            home=home,
            others=others,
            slugs=slugs,
            session_ids=session_ids,
            sockets=SOCKETS,
            rate=RATE,
            before_s=2.0,
            after_s=2.0,
            resume_limit_s=RESUME_LIMIT,
            wait_s=35.0,
            connect_s=30.0,
        )
        storm = Storm(plan, print, stored)
        raw = await storm.run()
        rooms = {slug: await stored(slug) for slug in slugs}
        nonces = await stored_nonces()
        stats = await read_stats(others, since=0)
    report = figures(storm, raw)
    print("\n[storm]", {k: v for k, v in report.items() if k != "resumes_per_s"})

    # Every socket resumed, on a surviving process, within the limit.
    killed_at = storm.killed_at
    assert killed_at is not None
    late = [c.index for c in storm.clients if c.resumed_at is None or c.resumed_at - killed_at > RESUME_LIMIT]
    assert not late, f"{len(late)} sockets not resumed within {RESUME_LIMIT:g} s: {storm.describe()}\n{cluster.logs()}"
    assert {c.resumed_on for c in storm.clients} <= {s.name for s in others}

    # Every send acknowledged and stored exactly once, with the room's seqs 1..N.
    sends = {item.nonce for sender in storm.senders for item in sender.sends.values()}
    assert all(item.seq is not None for sender in storm.senders for item in sender.sends.values())
    assert sorted(nonces) == sorted(sends), "the database holds other messages than those acknowledged, or twice"
    for slug, rows in rooms.items():
        assert [seq for seq, _ in rows] == list(range(1, len(rows) + 1)), f"{slug}: the stored seqs are not 1..N"
        assert len(rows) >= RATE * 4, f"{slug}: too few messages for a storm under load ({len(rows)})"

    # Every client holds exactly its room's messages: none lost across the kill, none repeated by a connection.
    for client in storm.clients:
        expected = set(range(1, len(rooms[slugs[client.room]]) + 1))
        assert client.held == expected, (
            f"client {client.index}: missing {sorted(expected - client.held)[:10]}, "
            f"stray {sorted(client.held - expected)[:10]}"
        )
        assert client.repeats == 0, f"client {client.index}: {client.repeats} seqs delivered twice or replayed"
        assert client.gaps == 0, f"client {client.index} was told of a gap: its resume missed over the limit"

    # Resume queries are bounded: each resume's connection ran at most MAX_QUERIES_PER_RESUME statements.
    for server, counted in zip(others, stats, strict=True):
        assert counted is not None, f"{server.name} does not count its queries (bench/counted_asgi.py)"
        resumes = [r for r in counted["resumes"] if r["opened_at"] >= raw["kill_wall"]]
        resumed_here = sum(c.resumed_on == server.name for c in storm.clients)
        assert len(resumes) >= resumed_here > 0, (server.name, len(resumes), resumed_here)
        worst = max(r["queries"] for r in resumes)
        assert worst <= MAX_QUERIES_PER_RESUME, f"{server.name}: a resume ran {worst} queries: {resumes[:3]}"
        checks = max(r["health_checks"] for r in resumes)
        assert checks <= MAX_HEALTH_CHECKS_PER_RESUME, f"{server.name}: a resume ran {checks} health checks"
        assert_no_app_errors(server)
