"""A small, cheap WebSocket load client for `manage.py chatbench` (bench/scenario.py).

One asyncio Protocol per socket speaks just enough RFC 6455 for a benchmark:
the HTTP/1.1 Upgrade handshake (random Sec-WebSocket-Key, checked
Sec-WebSocket-Accept), masked client frames, and unmasked server frames with
7/16/64-bit lengths, fragments, ping (answered with pong) and close, and,
when asked to offer it as browsers do, permessage-deflate (RFC 7692) on the
frames it receives. It runs
on uvloop and never imports Django, so a client process costs a small fraction
of what the server spends on the same frames.

Message frames are not JSON-decoded: the body the senders write is
``t=<send time in ns> n=<message number> ...``, and one regular expression
over the frame's bytes gives both the one-way latency and which message it is.
Every other frame (ready, error, history, ...) is decoded with json.loads.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import http.client
import json
import os
import re
import struct
import time
import zlib
from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# The body every bench message carries; its first match in a frame is the body.
BODY_TAG = re.compile(rb"t=(\d+) n=(\d+)")
HISTORY_MAX_LIMIT = 100

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
RSV1 = 0x40  # a compressed message (permessage-deflate)
# What Chromium offers; the server may accept it and then compress what it sends.
BROWSER_EXTENSIONS = "permessage-deflate; client_max_window_bits"


class HandshakeError(Exception):
    """The server refused or broke the WebSocket handshake."""


def make_body(n: int, pad: int) -> str:
    """The body of bench message `n`: send time, number, and padding to the wanted size."""
    head = f"t={time.time_ns()} n={n} "
    return head + "x" * max(0, pad - len(head))


def parse_body(body: str) -> tuple[int, int] | None:
    """(send time ns, message number) of a bench body, None for anything else."""
    match = BODY_TAG.match(body.encode())
    return (int(match.group(1)), int(match.group(2))) if match else None


def client_frame(opcode: int, payload: bytes) -> bytes:
    """One final client frame, masked with a random key as RFC 6455 requires."""
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
    elif length < 65536:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
    key = os.urandom(4)
    if not length:
        return header + key
    # XOR the whole payload at once as one big integer: far cheaper than a byte loop.
    repeated = (key * (length // 4 + 1))[:length]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(length, "big")
    return header + key + masked


class Recorder:
    """What every socket of one measurement step received, shared by all sockets."""

    def __init__(self, rooms: int) -> None:
        self.latencies_ns = array("q")
        self.sent_ns = array("q")  # each delivery's send time (wall clock), beside its latency: the timeline
        self.delivered = [0] * rooms
        self.errors: Counter[str] = Counter()
        self.errors_by_room = [0] * rooms


class BenchSocket(asyncio.Protocol):
    """One client WebSocket; see the module docstring for what it understands."""

    def __init__(self, *, host: str, port: int, path: str, headers: dict[str, str], room: int = 0, fast: bool = True):
        self.host = host
        self.port = port
        self.path = path
        self.headers = headers
        self.room = room
        # fast: recognise message frames by their body without decoding JSON.
        self.fast = fast
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.handshake_done: asyncio.Future = loop.create_future()
        self.ready: asyncio.Future = loop.create_future()
        self.frames: asyncio.Queue = asyncio.Queue()  # decoded non-message frames, for whoever waits on them
        self.recorder: Recorder | None = None
        self.received = array("q")  # message numbers delivered to this socket in the current step
        self.key = base64.b64encode(os.urandom(16)).decode()
        self.head = bytearray()
        self.buf = bytearray()
        self.fragments: list[bytes] | None = None
        self.fragment_opcode = 0
        self.open = False
        self.close_sent = False
        self.close_code: int | None = None
        self.lost = False
        self.http_status: int | None = None
        # Set when the server accepted permessage-deflate: it inflates the frames the server compressed.
        self.inflater: zlib._Decompress | None = None
        self.fresh_inflater_each_message = False

    # -- asyncio callbacks ------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        lines = [
            f"GET {self.path} HTTP/1.1",
            f"Host: {self.host}:{self.port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {self.key}",
            "Sec-WebSocket-Version: 13",
            *(f"{name}: {value}" for name, value in self.headers.items()),
        ]
        transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        self.lost = True
        failure = HandshakeError(f"connection closed ({exc or 'by the server'})")
        for future in (self.handshake_done, self.ready):
            if not future.done():
                future.set_exception(failure)
                future.exception()  # mark retrieved: nobody may be waiting any more
        self.frames.put_nowait(None)

    def data_received(self, data: bytes) -> None:
        if not self.open:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                if len(self.head) > 65536:
                    self._fail_handshake("no end of the HTTP response headers within 64 KiB")
                return
            if not self._handshake(bytes(self.head[:end])):
                return
            data = bytes(self.head[end + 4 :])
            self.head = bytearray()
            if not data:
                return
        if self.buf:
            self.buf += data
            buf = self.buf
        else:
            buf = data
        now = time.time_ns()
        size = len(buf)
        pos = 0
        search = BODY_TAG.search
        while size - pos >= 2:
            b0 = buf[pos]
            b1 = buf[pos + 1]
            length = b1 & 0x7F
            start = pos + 2
            if length == 126:
                if size - pos < 4:
                    break
                length = (buf[pos + 2] << 8) | buf[pos + 3]
                start = pos + 4
            elif length == 127:
                if size - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                start = pos + 10
            if b1 & 0x80:  # servers must not mask; unmask anyway rather than misread
                if size - start < 4:
                    break
                mask = bytes(buf[start : start + 4])
                start += 4
                end = start + length
                if end > size:
                    break
                payload = bytes(buf[start:end])
                repeated = (mask * (length // 4 + 1))[:length]
                payload = (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(length, "big")
                self._frame(b0, payload, now)
                pos = end
                continue
            end = start + length
            if end > size:
                break
            if b0 & RSV1 and self.inflater is not None:
                self._frame(b0 & ~RSV1, self._inflate(bytes(buf[start:end])), now)
                pos = end
                continue
            if (b0 & 0x8F) == 0x81 and self.fast:  # a final text frame: the hot path
                match = search(buf, start, end)
                if match is not None:
                    self.received.append(int(match.group(2)))
                    recorder = self.recorder
                    if recorder is not None:
                        sent_ns = int(match.group(1))
                        recorder.latencies_ns.append(now - sent_ns)
                        recorder.sent_ns.append(sent_ns)
                        recorder.delivered[self.room] += 1
                    pos = end
                    continue
            self._frame(b0, bytes(buf[start:end]), now)
            pos = end
        if buf is self.buf:
            del self.buf[:pos]
        elif pos < size:
            self.buf = bytearray(buf[pos:])

    # -- handshake and frames ----------------------------------------------

    def _handshake(self, head: bytes) -> bool:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        try:
            self.http_status = int(parts[1])
        except (IndexError, ValueError):
            self._fail_handshake(f"not an HTTP response: {lines[0]!r}")
            return False
        if self.http_status != 101:
            self._fail_handshake(f"HTTP {self.http_status} instead of 101 Switching Protocols")
            return False
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        expected = base64.b64encode(hashlib.sha1(self.key.encode() + WS_GUID).digest()).decode()
        if headers.get("sec-websocket-accept") != expected:
            self._fail_handshake("wrong Sec-WebSocket-Accept")
            return False
        extensions = headers.get("sec-websocket-extensions", "")
        if extensions.startswith("permessage-deflate"):
            self.inflater = zlib.decompressobj(wbits=-15)
            self.fresh_inflater_each_message = "server_no_context_takeover" in extensions
        self.open = True
        self.handshake_done.set_result(None)
        return True

    def _inflate(self, payload: bytes) -> bytes:
        """One compressed message (unfragmented: the site's frames are small) back to its text."""
        if self.fresh_inflater_each_message:
            self.inflater = zlib.decompressobj(wbits=-15)
        assert self.inflater is not None
        return self.inflater.decompress(payload + b"\x00\x00\xff\xff")

    def _fail_handshake(self, reason: str) -> None:
        if not self.handshake_done.done():
            self.handshake_done.set_exception(HandshakeError(reason))
        if self.transport is not None:
            self.transport.close()

    def _frame(self, b0: int, payload: bytes, now: int) -> None:
        opcode = b0 & 0x0F
        fin = b0 & 0x80
        if opcode >= 0x8:  # control frames are never fragmented
            if opcode == OP_PING:
                self._write(OP_PONG, payload)
            elif opcode == OP_CLOSE:
                self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                if not self.close_sent:
                    self._write(OP_CLOSE, payload[:2])
                    self.close_sent = True
                self.open = False
                if self.transport is not None:
                    self.transport.close()
            return
        if opcode == OP_CONT:
            if self.fragments is None:
                return
            self.fragments.append(payload)
            if not fin:
                return
            payload = b"".join(self.fragments)
            opcode = self.fragment_opcode
            self.fragments = None
        elif not fin:
            self.fragments = [payload]
            self.fragment_opcode = opcode
            return
        if opcode != OP_TEXT:
            return
        if self.fast:
            match = BODY_TAG.search(payload)
            if match is not None:
                self.received.append(int(match.group(2)))
                if self.recorder is not None:
                    sent_ns = int(match.group(1))
                    self.recorder.latencies_ns.append(now - sent_ns)
                    self.recorder.sent_ns.append(sent_ns)
                    self.recorder.delivered[self.room] += 1
                return
        try:
            frame = json.loads(payload)
        except ValueError:
            return
        if not isinstance(frame, dict):
            return
        kind = frame.get("type")
        if kind == "ready":
            if not self.ready.done():
                self.ready.set_result(frame)
            return
        if kind == "error" and self.fast:
            if self.recorder is not None:
                self.recorder.errors[str(frame.get("code"))] += 1
                self.recorder.errors_by_room[self.room] += 1
            return
        self.frames.put_nowait(frame)

    # -- sending -------------------------------------------------------------

    def _write(self, opcode: int, payload: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(client_frame(opcode, payload))

    def send_text(self, text: str) -> bool:
        if not self.open or self.transport is None or self.transport.is_closing():
            return False
        self.transport.write(client_frame(OP_TEXT, text.encode()))
        return True

    def send_json(self, frame: dict) -> bool:
        return self.send_text(json.dumps(frame, separators=(",", ":")))

    def close(self, code: int = 1000) -> None:
        if self.open and not self.close_sent:
            self._write(OP_CLOSE, struct.pack("!H", code))
            self.close_sent = True
        if self.transport is not None:
            self.transport.close()

    @property
    def is_open(self) -> bool:
        return self.open and not self.lost and self.transport is not None and not self.transport.is_closing()

    async def next_frame(self, timeout: float) -> dict:
        frame = await asyncio.wait_for(self.frames.get(), timeout)
        if frame is None:
            self.frames.put_nowait(None)  # stay closed for later callers
            raise HandshakeError(f"socket closed (code {self.close_code})")
        return frame


async def open_socket(
    *,
    host: str,
    port: int,
    path: str,
    headers: dict[str, str],
    room: int = 0,
    fast: bool = True,
    wait_ready: bool = True,
    timeout: float = 15.0,
) -> BenchSocket:
    """Connect, finish the handshake, and (wait_ready) read up to the ready frame."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    _, sock = await asyncio.wait_for(
        loop.create_connection(
            lambda: BenchSocket(host=host, port=port, path=path, headers=headers, room=room, fast=fast), host, port
        ),
        timeout,
    )
    try:
        await asyncio.wait_for(asyncio.shield(sock.handshake_done), max(0.01, deadline - loop.time()))
        if wait_ready:
            await asyncio.wait_for(asyncio.shield(sock.ready), max(0.01, deadline - loop.time()))
    except BaseException:
        sock.close()
        raise
    return sock


# --------------------------------------------------------------------------
# One measurement step
# --------------------------------------------------------------------------


@dataclass
class StepPlan:
    """What one step sends: `rate` messages per second per room for `duration` seconds."""

    rate: float
    duration: float
    senders: list[list[BenchSocket]]  # per room, the sockets that send
    sockets: list[BenchSocket]
    rooms: int
    nonce_prefix: str
    first_number: int  # message numbers of this step start here
    body_size: int = 100
    drain: float = 5.0  # longest wait for deliveries after the last send


@dataclass
class StepRaw:
    """What one step saw on the client side, before checking against the database."""

    sent_numbers: list[list[int]] = field(default_factory=list)  # per room
    not_sent: int = 0  # sends skipped because the sender's socket had closed
    open_at_start: list[list[int]] = field(default_factory=list)  # per room, indexes into plan.sockets
    sender_of: dict[int, int] = field(default_factory=dict)  # message number -> its sender's index in plan.sockets
    received: list[array] = field(default_factory=list)  # per socket
    close_codes: dict[int, int | None] = field(default_factory=dict)  # socket index -> code, for those that closed
    recorder: Recorder | None = None
    send_window_s: float = 0.0
    window_s: float = 0.0
    drained: bool = False
    max_send_lag_ms: float = 0.0


async def run_step(plan: StepPlan, on_window_start: Callable[[], None], on_window_end: Callable[[], None]) -> StepRaw:
    """Send on a fixed schedule, then wait for the deliveries; calls the hooks at the window's edges."""
    loop = asyncio.get_running_loop()
    recorder = Recorder(plan.rooms)
    raw = StepRaw(recorder=recorder)
    raw.sent_numbers = [[] for _ in range(plan.rooms)]
    raw.open_at_start = [[] for _ in range(plan.rooms)]
    index_of: dict[int, int] = {}
    for index, sock in enumerate(plan.sockets):
        sock.received = array("q")
        sock.recorder = recorder
        index_of[id(sock)] = index
        if sock.is_open:
            raw.open_at_start[sock.room].append(index)
    per_room = max(1, round(plan.rate * plan.duration))
    interval = 1.0 / plan.rate
    number = plan.first_number
    next_index = [0] * plan.rooms
    # Rooms are offset within one interval so their sends do not all land on one tick.
    offsets = [interval * room / plan.rooms for room in range(plan.rooms)]
    body_size = plan.body_size
    nonce_prefix = plan.nonce_prefix

    on_window_start()
    start = loop.time()
    started_ns = time.perf_counter_ns()
    while True:
        now = loop.time() - start
        pending = False
        for room in range(plan.rooms):
            senders = plan.senders[room]
            index = next_index[room]
            while index < per_room and offsets[room] + index * interval <= now:
                sock = senders[index % len(senders)] if senders else None
                if sock is not None and sock.is_open:
                    sock.send_json(
                        {"type": "send", "body": make_body(number, body_size), "nonce": f"{nonce_prefix}{number}"}
                    )
                    raw.sent_numbers[room].append(number)
                    raw.sender_of[number] = index_of[id(sock)]
                    lag = (now - (offsets[room] + index * interval)) * 1000
                    if lag > raw.max_send_lag_ms:
                        raw.max_send_lag_ms = lag
                else:
                    raw.not_sent += 1
                number += 1
                index += 1
            next_index[room] = index
            if index < per_room:
                pending = True
        if not pending:
            break
        due = min(
            offsets[room] + next_index[room] * interval for room in range(plan.rooms) if next_index[room] < per_room
        )
        await asyncio.sleep(max(0.0, due - (loop.time() - start)))
    raw.send_window_s = max(loop.time() - start, plan.duration)

    # Drain: until every open socket of each room has as many deliveries as its room had sends
    # (less those refused with an error frame), or `drain` seconds after the last send.
    drain_deadline = loop.time() + plan.drain
    while True:
        expected = [
            (len(raw.sent_numbers[room]) - recorder.errors_by_room[room]) * len(raw.open_at_start[room])
            for room in range(plan.rooms)
        ]
        if all(recorder.delivered[room] >= expected[room] for room in range(plan.rooms)):
            raw.drained = True
            break
        if loop.time() >= drain_deadline:
            break
        await asyncio.sleep(0.01)
    raw.window_s = (time.perf_counter_ns() - started_ns) / 1e9
    on_window_end()
    for index, sock in enumerate(plan.sockets):
        # What arrives from now on is too late: it goes to a list nobody counts.
        sock.recorder = None
        raw.received.append(sock.received)
        sock.received = array("q")
        if not sock.is_open:
            raw.close_codes[index] = sock.close_code
    return raw


async def read_history(sock: BenchSocket, last_seq: int, down_to: int, timeout: float = 10.0) -> list[dict]:
    """Every stored message with down_to < seq <= last_seq, by paging `history` backwards (seq order)."""
    pages: list[list[dict]] = []
    before = last_seq + 1
    while before - 1 > down_to:
        sock.send_json({"type": "history", "before": before, "limit": HISTORY_MAX_LIMIT})
        while True:
            frame = await sock.next_frame(timeout)
            if frame.get("type") == "history":
                break
            if frame.get("type") == "error":
                raise HandshakeError(f"history was refused: {frame}")
            # a live message frame on the reader socket: not what we asked for
        messages = [m for m in frame.get("messages", []) if m.get("seq", 0) > down_to]
        pages.append(messages)
        if not frame.get("has_more") or not frame.get("messages"):
            break
        before = frame["messages"][0]["seq"]
    return [message for page in reversed(pages) for message in page]


@dataclass
class Tally:
    """How the sockets' deliveries compare with the stored messages."""

    delivered: int = 0  # (socket, stored message) pairs received at least once
    lost: int = 0  # (socket, stored message) pairs never received
    duplicates: int = 0  # extra copies of stored messages
    stray: int = 0  # deliveries of messages not stored in this step
    sockets_with_loss: int = 0


def tally(stored: set[int], received_per_socket) -> Tally:
    """Check that every socket received every stored message exactly once."""
    result = Tally()
    for received in received_per_socket:
        counts = Counter(received)
        missing = len(stored - counts.keys())
        result.lost += missing
        result.delivered += len(stored) - missing
        result.sockets_with_loss += missing > 0
        for number, count in counts.items():
            if number in stored:
                result.duplicates += count - 1
            else:
                result.stray += count
    return result


# --------------------------------------------------------------------------
# Long-polls (manage.py pollbench)
# --------------------------------------------------------------------------


async def long_poll(port: int, path: str, cookie: str) -> tuple[int, dict, float]:
    """One GET on its own connection; returns (status, JSON body, monotonic time answered)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: {cookie}\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    raw = await reader.read()
    answered = time.monotonic()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head.lower():
        body = _unchunk(body)
    return status, json.loads(body or b"{}"), answered


def _unchunk(body: bytes) -> bytes:
    out = b""
    while body:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out, body = out + body[:size], body[size + 2 :]
    return out


def post_message(port: int, slug: str, cookie: str, csrf: str, body: str) -> int:
    """POST one message through the API with a session cookie; returns the HTTP status."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Cookie": cookie, "X-CSRFToken": csrf, "Content-Type": "application/json"}
    headers["Origin"] = f"http://127.0.0.1:{port}"
    try:
        conn.request("POST", f"/api/rooms/{slug}/messages", body, headers)
        return conn.getresponse().status
    finally:
        conn.close()
