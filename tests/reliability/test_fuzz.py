"""Fuzz a live server's WebSocket with generated frames: only error frames come back, nothing breaks."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.sync.client import ClientConnection, connect

from bench.serverprocess import ServerProcess
from tests.helpers import session_cookie
from tests.servers import APP, READY_TIMEOUT, assert_no_app_errors, server_env

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**80), max_value=2**80) | st.floats() | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=8,
)
FIELDS = ["body", "nonce", "id", "before", "limit", "seq", "around", "reply_to", "emoji", "pinned"]
frames = st.one_of(
    st.text(max_size=300),  # mostly not JSON
    st.binary(max_size=300),  # binary frames
    json_values.map(json.dumps),
    st.fixed_dictionaries(
        {
            "type": st.sampled_from(
                ["send", "history", "typing", "edit", "delete", "read", "react", "pin", "subscribe", ""]
            )
        },
        optional={field: json_values for field in FIELDS},
    ).map(json.dumps),
    # Bodies around the 4,000-character limit, and frames around the 64 KiB one.
    st.tuples(st.characters(), st.integers(3_990, 70_000)).map(
        lambda c: json.dumps({"type": "send", "body": c[0] * c[1]})
    ),
)
# What a frame may bring back besides an error: its own effects (a valid send, history, edit, reaction,
# read mark) and room news.
HARMLESS = {"error", "message", "history", "presence", "message_updated", "message_deleted", "reactions", "read_by"}


@pytest.fixture
def server(transactional_db, tmp_path) -> Iterator[ServerProcess]:
    process = ServerProcess("fuzz", "uvicorn", APP, server_env(), tmp_path / "fuzz.log")
    process.spawn()
    try:
        process.wait_ready(READY_TIMEOUT)
        yield process
    finally:
        process.kill()


@pytest.fixture
def socket(server, user, room) -> Iterator[ClientConnection]:
    cookie = session_cookie(user)
    with connect(
        f"ws://127.0.0.1:{server.port}/ws/rooms/{room.slug}/",
        origin=server.origin,
        additional_headers={"Cookie": f"sessionid={cookie}"},
        open_timeout=10,
        max_size=2**22,
    ) as ws:
        while json.loads(ws.recv(timeout=5))["type"] != "ready":
            pass
        yield ws


class Sentinel:
    """A frame that must come back as an unknown_type error: everything before it answered the fuzzed frame."""

    count = 0

    @classmethod
    def next(cls) -> str:
        cls.count += 1
        return f"sentinel-{cls.count}"


@settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(frame=frames)
def test_generated_frames_get_error_frames_and_never_break_the_socket_or_the_server(server, socket, frame):
    socket.send(frame)
    sentinel = Sentinel.next()
    socket.send(json.dumps({"type": sentinel}))
    while True:
        reply = json.loads(socket.recv(timeout=10))  # a closed socket raises here
        assert reply["type"] in HARMLESS, (frame[:200], reply)
        if reply["type"] == "error" and sentinel in reply["detail"]:
            break
    assert_no_app_errors(server)
