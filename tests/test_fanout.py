"""The fast path (chat/fanout.py) against the pinned channels-redis pub/sub layer on the real Redis."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket as tcp
import time
from types import SimpleNamespace
from unittest import mock

import pytest
import websockets
from channels.layers import get_channel_layer
from channels_redis.pubsub import RedisPubSubChannelLayer
from django.conf import settings
from websockets.frames import Frame, Opcode
from websockets.protocol import State

from bench.client import client_frame
from chat import fanout, protocol, realtime, serversend
from tests.helpers import eventually
from tests.servers import ServerCluster

ROOM_ID = 424242
# The hub reads where its rooms stand in the database (no such rooms here).
pytestmark = pytest.mark.django_db


class FakeSocket:
    """Records what the hub sends; `gate` makes it a client that does not read."""

    def __init__(self, gate: asyncio.Event | None = None) -> None:
        self.sent: list[dict] = []
        self.gate = gate

    async def send(self, event: dict) -> None:
        if self.gate is not None and event["type"] == "websocket.send":
            await self.gate.wait()
        self.sent.append(event)

    @property
    def seqs(self) -> list[int]:
        return [json.loads(e["text"])["message"]["seq"] for e in self.sent if e["type"] == "websocket.send"]


async def publish(seq: int, room_id: int = ROOM_ID) -> None:
    payload = {"id": seq, "seq": seq, "room": "r", "author": "a", "body": f"m{seq}"}
    event = {"type": realtime.MESSAGE_EVENT, "room": room_id, "seq": seq, "message": payload}
    await get_channel_layer().group_send(realtime.room_group(room_id), event)


@pytest.fixture
async def hub():
    assert isinstance(get_channel_layer(), RedisPubSubChannelLayer)
    hub = fanout.hub()
    yield hub
    for sockets in list(hub.rooms.values()):
        for socket in list(sockets):
            await hub.leave(socket)
    for task in hub.tasks:
        task.cancel()


async def test_every_local_socket_gets_each_message_once_and_the_frame_is_encoded_once(hub):
    sockets = [FakeSocket() for _ in range(5)]
    for socket in sockets:
        hub.ready(await hub.join(ROOM_ID, socket.send), 0)

    with mock.patch.object(protocol, "encode", wraps=protocol.encode) as encode:
        for seq in (1, 2, 3):
            await publish(seq)
        await eventually(lambda: all(len(s.sent) == 3 for s in sockets))
    assert encode.call_count == 3  # once per message, not once per socket
    for socket in sockets:
        assert socket.seqs == [1, 2, 3]
    assert len({e["text"] for s in sockets for e in s.sent}) == 3


async def test_events_are_held_during_replay_and_only_newer_ones_are_released(hub):
    socket = FakeSocket()
    local = await hub.join(ROOM_ID, socket.send)
    for seq in (4, 5, 6):
        await publish(seq)
    await eventually(lambda: len(local.held) == 3)
    assert socket.sent == []

    hub.ready(local, 5)  # the replay already sent up to 5
    await eventually(lambda: socket.seqs == [6])
    await publish(7)
    await eventually(lambda: socket.seqs == [6, 7])


async def test_a_slow_socket_does_not_hold_up_the_others_and_catches_up_in_order(hub):
    gate = asyncio.Event()
    slow, fast = FakeSocket(gate), FakeSocket()
    hub.ready(await hub.join(ROOM_ID, slow.send), 0)
    hub.ready(await hub.join(ROOM_ID, fast.send), 0)

    for seq in (1, 2, 3):
        await publish(seq)
    await eventually(lambda: fast.seqs == [1, 2, 3])
    assert slow.sent == []

    gate.set()
    await eventually(lambda: slow.seqs == [1, 2, 3])


@pytest.fixture
def small_backlog(settings):
    settings.CHAT_SOCKET_MAX_BACKLOG = 3


async def test_a_socket_too_far_behind_is_closed_with_1013_and_gets_nothing_more(small_backlog, hub):
    assert hub.max_backlog == 3
    stuck, fine = FakeSocket(asyncio.Event()), FakeSocket()
    local = await hub.join(ROOM_ID, stuck.send)
    hub.ready(local, 0)
    hub.ready(await hub.join(ROOM_ID, fine.send), 0)

    for seq in range(1, 7):
        await publish(seq)
    await eventually(lambda: fine.seqs == [1, 2, 3, 4, 5, 6])
    await eventually(lambda: {"type": "websocket.close", "code": 1013} in stuck.sent)
    assert local.closed and not local.outbox


async def test_the_room_group_is_subscribed_once_per_process_and_dropped_with_the_last_socket(hub):
    layer = get_channel_layer()._get_layer()
    group_channel = layer._get_group_channel_name(realtime.room_group(ROOM_ID))
    first = await hub.join(ROOM_ID, FakeSocket().send)
    second = await hub.join(ROOM_ID, FakeSocket().send)
    assert layer.groups[group_channel] == {hub.channel}

    await hub.leave(first)
    assert group_channel in layer.groups
    await hub.leave(second)
    assert group_channel not in layer.groups
    assert ROOM_ID not in hub.rooms


async def test_messages_for_another_room_are_not_delivered(hub):
    here = FakeSocket()
    hub.ready(await hub.join(ROOM_ID, here.send), 6)
    elsewhere = FakeSocket()
    hub.ready(await hub.join(ROOM_ID + 1, elsewhere.send), 0)
    await publish(1, room_id=ROOM_ID + 1)
    await publish(7)  # one channel, in order: once this arrives, the other room's message was not for `here`
    await eventually(lambda: elsewhere.seqs == [1] and here.seqs == [7])
    assert here.seqs == [7]


async def test_a_socket_whose_send_fails_is_dropped_without_hurting_the_others(hub):
    async def broken_send(event: dict) -> None:
        raise OSError("connection reset")

    broken = await hub.join(ROOM_ID, broken_send)
    hub.ready(broken, 0)
    healthy = FakeSocket()
    hub.ready(await hub.join(ROOM_ID, healthy.send), 0)
    await publish(1)
    await publish(2)
    await eventually(lambda: healthy.seqs == [1, 2])
    assert broken.closed


class FakeServerProtocol:
    """Shaped like uvicorn's sans-I/O WebSocket protocol: `send` waits only while `writable` is clear."""

    def __init__(self) -> None:
        self.writable = asyncio.Event()
        self.writable.set()
        self.sent: list[dict] = []

    async def send(self, event: dict) -> None:
        await self.writable.wait()
        self.sent.append(event)


async def test_a_send_that_will_not_wait_is_made_inline_without_a_writer_task(hub):
    server = FakeServerProtocol()
    local = await hub.join(ROOM_ID, server.send)
    hub.ready(local, 0)
    assert local.writable is server.writable

    with mock.patch.object(fanout.RoomHub, "_write", side_effect=AssertionError("no writer task expected")):
        await publish(1)
        await eventually(lambda: len(server.sent) == 1)
    assert local.writer is None


async def test_a_paused_transport_queues_behind_a_writer_and_catches_up_in_order(hub):
    paused, other = FakeServerProtocol(), FakeServerProtocol()
    hub.ready(await hub.join(ROOM_ID, paused.send), 0)
    hub.ready(await hub.join(ROOM_ID, other.send), 0)
    paused.writable.clear()  # the client stopped reading

    for seq in (1, 2, 3):
        await publish(seq)
    await eventually(lambda: len(other.sent) == 3)
    assert paused.sent == []

    paused.writable.set()
    await eventually(lambda: len(paused.sent) == 3)
    assert [json.loads(e["text"])["message"]["seq"] for e in paused.sent] == [1, 2, 3]


@pytest.mark.parametrize("length", [0, 125, 126, 65535, 65536, 70_000])
def test_a_frame_made_once_for_a_room_is_the_bytes_websockets_sends_each_socket(length):
    text = "é" * (length // 2) + "x" * (length % 2)  # `length` bytes of UTF-8
    assert len(text.encode()) == length
    assert serversend.text_frame(text) == Frame(Opcode.TEXT, text.encode()).serialize(mask=False, extensions=[])


class Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return self.closing


def uvicorn_socket(**changes):
    """The parts of uvicorn's sans-I/O protocol a RawWriter reads, as they are while a socket is open."""
    writable = asyncio.Event()
    writable.set()
    owner = SimpleNamespace(
        transport=Transport(), conn=SimpleNamespace(state=State.OPEN, extensions=[]), writable=writable,
        handshake_complete=True, close_sent=False, disconnected=False, initial_response=None,
    )  # fmt: skip
    for name, value in changes.items():
        target, _, attribute = name.rpartition("__")
        setattr(getattr(owner, target) if target else owner, attribute, value)
    return owner


@pytest.mark.parametrize(
    "changes",
    [
        {"close_sent": True},
        {"disconnected": True},
        {"handshake_complete": False},
        {"initial_response": (403, [], b"")},
        {"conn__state": State.CLOSING},
        {"conn__extensions": ["permessage-deflate"]},
        {"transport__closing": True},
    ],
    ids=lambda changes: next(iter(changes)),
)
def test_the_raw_writer_writes_only_while_uvicorn_would_write_the_frame_at_once(changes):
    writer = serversend.RawWriter(uvicorn_socket())
    assert writer(b"frame") and writer.owner.transport.written == [b"frame"]
    declined = serversend.RawWriter(uvicorn_socket(**changes))
    assert not declined(b"frame") and declined.owner.transport.written == []


def test_the_raw_writer_waits_like_uvicorn_while_the_transport_is_paused():
    owner = uvicorn_socket()
    owner.writable.clear()  # pause_writing
    assert not serversend.RawWriter(owner)(b"frame") and owner.transport.written == []


# --------------------------------------------------------------------------
# The inline send against the server the README runs
def pinged_socket(**changes):
    """A uvicorn socket as Keepalive reads it: its keep-alive settings, and the two methods it calls."""
    owner = uvicorn_socket()
    owner.ping_interval = owner.ping_timeout = 20.0
    owner.pending_ping_payload, owner.ping_sent_at = None, 0.0
    owner.stop_keepalive, owner.keepalive_timeout = mock.Mock(), mock.Mock()
    for name, value in changes.items():
        setattr(owner, name, value)
    return owner


async def test_keepalive_pings_a_slice_of_the_sockets_per_visit_with_one_frame():
    keepalive = serversend.Keepalive()
    owners = [pinged_socket() for _ in range(5)]
    for owner in owners:
        keepalive.take(serversend.RawWriter(owner))
    keepalive.task.cancel()
    assert all(owner.stop_keepalive.called for owner in owners)  # the server's own timers are off

    keepalive.visit(2)
    assert [owner.transport.written for owner in owners] == [[keepalive.FRAME]] * 2 + [[]] * 3
    assert keepalive.FRAME == Frame(Opcode.PING, keepalive.PAYLOAD).serialize(mask=False, extensions=[])
    keepalive.visit(3)
    assert all(owner.pending_ping_payload == keepalive.PAYLOAD for owner in owners)
    assert len(keepalive.owners) == 5


async def test_keepalive_closes_a_socket_whose_ping_went_unanswered_for_the_timeout_and_pings_the_others_again():
    keepalive = serversend.Keepalive()
    answered, silent, late = pinged_socket(), pinged_socket(), pinged_socket()
    for owner in (answered, silent, late):
        keepalive.take(serversend.RawWriter(owner))
    keepalive.task.cancel()
    keepalive.visit(3)
    answered.pending_ping_payload = None  # uvicorn's handle_pong clears it
    keepalive.visit(3)
    assert answered.transport.written == [keepalive.FRAME]  # not again within the interval

    now = asyncio.get_running_loop().time()
    answered.ping_sent_at = silent.ping_sent_at = now - 20.0
    late.ping_sent_at = now - 18.0  # still within the timeout
    keepalive.visit(3)
    assert answered.transport.written == [keepalive.FRAME] * 2
    assert silent.keepalive_timeout.called and late.keepalive_timeout.called is False
    assert late.transport.written == [keepalive.FRAME]  # not pinged twice while one ping is pending
    assert list(keepalive.owners) == [answered, late]


async def test_keepalive_forgets_closed_sockets_and_leaves_a_server_whose_keepalive_is_off_alone():
    keepalive = serversend.Keepalive()
    closed = pinged_socket(close_sent=True)
    keepalive.take(serversend.RawWriter(closed))
    keepalive.task.cancel()
    keepalive.visit(1)
    assert closed.transport.written == [] and not keepalive.owners

    off = pinged_socket(ping_interval=0)
    assert keepalive.take(serversend.RawWriter(off)) is None
    assert not off.stop_keepalive.called and not keepalive.owners


# --------------------------------------------------------------------------

STALL_BACKLOG = 20  # CHAT_SOCKET_MAX_BACKLOG for the server under test
STALL_READERS = 5  # clients that keep reading, in this process
# Loopback's kernel buffers take up to about 4.2 MB for a client that reads
# nothing (its receive buffer at 8 KiB, the server's send buffer growing to
# tcp_wmem's 4 MiB) before the server's transport pauses: 1,500 frames of 4 KB
# are well past that. The test publishes them to the room's group itself, as
# realtime does after a commit, so the load is the fan-out's, not the database's.
STALL_MESSAGES = 1500
STALL_BODY = "x" * 4000
STALL_RATE = 200  # messages a second


class StalledClient:
    """A WebSocket client that completes the handshake and then reads nothing, down to the TCP level.

    A client library keeps reading into its own buffers; this one leaves the
    bytes in the kernel, so the server's transport really fills up. Its
    receive buffer is small, so that happens as soon as the server's own
    buffers are full.
    """

    def __init__(self, port: int, path: str, headers: dict[str, str]) -> None:
        self.sock = tcp.socket(tcp.AF_INET, tcp.SOCK_STREAM)
        self.sock.setsockopt(tcp.SOL_SOCKET, tcp.SO_RCVBUF, 4096)
        self.sock.settimeout(5)
        self.sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Upgrade: websocket", "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13", *(f"{k}: {v}" for k, v in headers.items()),
        ]  # fmt: skip
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self.sock.recv(4096)
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 101"), head

    def drain(self) -> tuple[list[str], int | None]:
        """Read everything now: the text frames received, and the close code (None if the server never closed)."""
        texts: list[str] = []
        while True:
            frame = self._frame()
            if frame is None:
                return texts, None
            opcode, payload = frame
            if opcode == 0x8:
                return texts, int.from_bytes(payload[:2], "big")
            if opcode == 0x1:
                texts.append(payload.decode())

    def _frame(self) -> tuple[int, bytes] | None:
        header = self._read(2)
        if header is None:
            return None
        length = header[1] & 0x7F
        if length >= 126:
            extended = self._read(2 if length == 126 else 8)
            assert extended is not None
            length = int.from_bytes(extended, "big")
        payload = self._read(length)
        assert payload is not None
        return header[0] & 0x0F, payload

    def _read(self, count: int) -> bytes | None:
        while len(self.buffer) < count:
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                return None
            if not chunk:
                return None
            self.buffer += chunk
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
async def test_a_client_that_stops_reading_delays_nobody_else_on_uvicorn_and_is_closed_with_1013(
    tmp_path, user, room, alice_cookie
):
    cluster = ServerCluster(tmp_path)
    cluster.env["CHAT_SOCKET_MAX_BACKLOG"] = str(STALL_BACKLOG)
    try:
        (server,) = await cluster.start(1)
        headers = {"Cookie": f"{settings.SESSION_COOKIE_NAME}={alice_cookie}"}
        url = f"ws://127.0.0.1:{server.port}/ws/rooms/{room.slug}/"

        async def open_socket(**options):
            ws = await websockets.connect(url, origin=server.origin, additional_headers=headers, **options)
            while json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] != "ready":
                pass
            return ws

        readers = [await open_socket() for _ in range(STALL_READERS)]
        stalled = await asyncio.to_thread(
            StalledClient, server.port, f"/ws/rooms/{room.slug}/", {**headers, "Origin": server.origin}
        )

        sent_at: dict[int, float] = {}
        arrivals: list[list[tuple[int, float]]] = [[] for _ in readers]

        async def read(ws, into: list[tuple[int, float]]) -> None:
            while len(into) < STALL_MESSAGES:
                frame = json.loads(await ws.recv())
                if frame["type"] == "message":
                    into.append((int(frame["message"]["nonce"]), time.monotonic()))

        reading = [asyncio.create_task(read(ws, into)) for ws, into in zip(readers, arrivals, strict=True)]
        for n in range(STALL_MESSAGES):
            sent_at[n] = time.monotonic()
            payload = {
                "id": n + 1,
                "seq": n + 1,
                "room": room.slug,
                "author": "alice",
                "body": STALL_BODY,
                "nonce": str(n),
            }
            event = {"type": realtime.MESSAGE_EVENT, "room": room.pk, "seq": n + 1, "message": payload}
            await get_channel_layer().group_send(realtime.room_group(room), event)
            await asyncio.sleep(1 / STALL_RATE)  # the load's schedule, not a wait for anything
        await asyncio.wait_for(asyncio.gather(*reading), 20)

        delays = sorted((at - sent_at[n]) * 1000 for into in arrivals for n, at in into)
        assert all([n for n, _ in into] == list(range(STALL_MESSAGES)) for into in arrivals)
        p99 = delays[int(len(delays) * 0.99) - 1]
        assert p99 < 50, f"p99 {p99:.1f} ms for the clients still reading (max {delays[-1]:.1f} ms)"

        # The stalled client reads again: what was queued for it stopped at the backlog, then 1013.
        texts, close_code = await asyncio.to_thread(stalled.drain)
        received = sum('"type":"message"' in text for text in texts)
        assert close_code == protocol.CLOSE_TRY_AGAIN_LATER, f"close {close_code} after {received} messages"
        assert received < STALL_MESSAGES
        for ws in readers:
            await ws.close()
    finally:
        cluster.kill_all()


async def test_a_message_published_above_a_hole_waits_for_it_and_each_is_delivered_once_in_order(hub):
    socket = FakeSocket()
    hub.ready(await hub.join(ROOM_ID, socket.send), 0)
    await publish(2)  # from one process, before 1 from another
    await publish(1)
    await publish(1)  # the same message again (read from the database, say)
    await publish(3)
    await eventually(lambda: socket.seqs == [1, 2, 3])
    assert hub.cursors[ROOM_ID].seq == 3 and not hub.cursors[ROOM_ID].held


class PingedClient(StalledClient):
    """A raw client that reads frames as they come, answering pings or not."""

    def pings(self, count: int, *, answer: bool) -> tuple[list[bytes], int | None]:
        """Read until `count` pings came (or a close): their payloads, and the close code if the server closed."""
        payloads: list[bytes] = []
        while len(payloads) < count:
            frame = self._frame()
            assert frame is not None, f"no frame within {self.sock.gettimeout()} s after {len(payloads)} pings"
            opcode, payload = frame
            if opcode == 0x8:
                return payloads, int.from_bytes(payload[:2], "big")
            if opcode == 0x9:
                payloads.append(payload)
                if answer:
                    self.sock.sendall(client_frame(0xA, payload))
        return payloads, None


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
async def test_uvicorn_sockets_are_pinged_by_the_hub_once_per_interval_and_closed_with_1011_when_silent(
    tmp_path, user, room, alice_cookie
):
    cluster = ServerCluster(tmp_path)
    cluster.uvicorn_options = ["--ws-ping-interval", "1", "--ws-ping-timeout", "1"]
    try:
        (server,) = await cluster.start(1)
        path = f"/ws/rooms/{room.slug}/"
        headers = {"Cookie": f"{settings.SESSION_COOKIE_NAME}={alice_cookie}", "Origin": server.origin}
        answering = await asyncio.to_thread(PingedClient, server.port, path, headers)
        silent = await asyncio.to_thread(PingedClient, server.port, path, headers)
        started = time.monotonic()
        payloads, closed = await asyncio.to_thread(answering.pings, 4, answer=True)
        # Only the hub's pings (uvicorn's own carry random payloads), one per interval: four take three intervals.
        assert closed is None and payloads == [serversend.Keepalive.PAYLOAD] * 4
        assert time.monotonic() - started >= 2.5
        payloads, closed = await asyncio.to_thread(silent.pings, 10, answer=False)
        assert closed == 1011 and 1 <= len(payloads) <= 2
    finally:
        cluster.kill_all()
