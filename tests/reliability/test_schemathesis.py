"""Schemathesis judges the API from outside, by its schema alone.

It reads /api/openapi.json from a live uvicorn process (run as the README runs
it) and sends what the schema allows and what it does not: every operation
and method, its examples and boundaries, random positive and negative data,
and sequences that follow the schema's links (create a room, post in it, then
get, edit and delete the message). Each answer must not be a 5xx, must match
the schema's status codes, body and content type.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest
from channels.db import database_sync_to_async

from chat import services

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
CHECKS = "not_a_server_error,status_code_conformance,response_schema_conformance,content_type_conformance"
RUN_TIMEOUT = 420


async def test_schemathesis_finds_no_server_error_and_every_answer_matches_the_schema(
    cluster, other_user, room, tmp_path
):
    # Schemathesis posts far more than a person: the limits stay on, far away.
    cluster.env.update(CHAT_API_REQUESTS_PER_MINUTE="100000", CHAT_API_WRITES_PER_MINUTE="100000")
    cluster.env.update(CHAT_MESSAGE_RATE_LIMIT="100000")
    # A poll of a room it made waits out its timeout: at most 1 s here (the schema's maximum follows).
    cluster.env.update(CHAT_POLL_MAX_TIMEOUT="1")
    (server,) = await cluster.start(1)
    secret = await database_sync_to_async(lambda: services.token_create(user=other_user, name="schemathesis")[1])()
    report = tmp_path / "junit.xml"
    command = [
        str(SCHEMATHESIS),
        "run",
        f"{server.origin}/api/openapi.json",
        "--header",
        f"Authorization: Bearer {secret}",
        "--checks",
        CHECKS,
        "--phases",
        "examples,coverage,fuzzing,stateful",
        "--mode",
        "all",
        "--max-examples",
        "25",
        "--seed",
        "16",
        "--workers",
        "1",
        "--request-timeout",
        "10",
        "--report",
        "junit",
        "--report-junit-path",
        str(report),
        "--generation-database",
        "none",
        "--no-color",
    ]
    run = await asyncio.create_subprocess_exec(
        *command,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=tmp_path,  # its cache too
    )
    try:
        output = (await asyncio.wait_for(run.communicate(), RUN_TIMEOUT))[0].decode()
    finally:
        if run.returncode is None:
            run.kill()
    assert run.returncode == 0, output + cluster.logs()
    # Every operation was tested, and the stateful phase ran.
    tested = {case.get("name") for case in ElementTree.parse(report).iter("testcase")}
    assert tested == {
        "GET /api/rooms/",
        "POST /api/rooms/",
        "POST /api/dms/",
        "GET /api/rooms/{slug}/messages",
        "POST /api/rooms/{slug}/messages",
        "GET /api/rooms/{slug}/messages/{message_id}",
        "PATCH /api/rooms/{slug}/messages/{message_id}",
        "DELETE /api/rooms/{slug}/messages/{message_id}",
        "POST /api/rooms/{slug}/messages/{message_id}/reactions/",
        "PUT /api/rooms/{slug}/messages/{message_id}/pin",
        "DELETE /api/rooms/{slug}/messages/{message_id}/pin",
        "GET /api/rooms/{slug}/pins",
        "GET /api/rooms/{slug}/reads",
        "GET /api/rooms/{slug}/poll",
        "GET /api/rooms/{slug}/members",
        "PATCH /api/rooms/{slug}/membership/",
        "GET /api/mentions/",
        "GET /api/search/",
        "POST /api/rooms/{slug}/files/",
        "Stateful tests",
    }, output
