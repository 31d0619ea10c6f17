"""`manage.py chatbench` (bench/): a smoke run against real servers, and its WebSocket client's framing.

The smoke run needs no test database: chatbench migrates its own database in a
subprocess and talks to the servers it starts only over HTTP and WebSockets
(pytest-django would fail the test if it touched this process's database).
"""

from __future__ import annotations

import asyncio
import io
import json
import struct

import pytest
from django.core.management import call_command

from bench import client, report


def run_chatbench(tmp_path, **options) -> tuple[dict, io.StringIO]:
    """One short chatbench run on a database of its own; its JSON report and what it printed."""
    out_path, stdout = tmp_path / "report.json", io.StringIO()
    database_url = f"sqlite:///{tmp_path}/bench.sqlite3"
    call_command(
        "chatbench", warmup=0.5, database_url=database_url, json=str(out_path), max_seconds=50, stdout=stdout, **options
    )
    return json.loads(out_path.read_text()), stdout


@pytest.mark.slow  # starts server processes
def test_chatbench_smoke_run_delivers_every_stored_message_once_to_every_socket(tmp_path):
    report, stdout = run_chatbench(tmp_path, sockets=4, senders=2, rate=5, duration=2)
    step = report["main"]["steps"][0]
    assert report["aborted"] is None, report["aborted"]
    assert report["sockets_connected"] == 4
    assert report["sent"] == step["sent"] == 10  # 5 msg/s for 2 s in the one room
    assert report["stored"] == 10
    assert report["delivered"] == report["expected"] == 10 * 4, step
    assert report["lost"] == 0
    assert report["duplicates"] == 0
    assert step["send_errors"] == 0 and step["unanswered"] == 0 and step["seq_gaps"] == 0
    assert step["latency_samples"] >= 40
    for key in ("p50_ms", "p95_ms", "p99_ms", "server_cpu_ms_per_1k", "client_cpu_ms_per_1k", "deliveries_per_s"):
        assert isinstance(report[key], (int, float)) and report[key] >= 0, (key, report[key])
    assert 0 < report["p50_ms"] <= report["p95_ms"] <= report["p99_ms"]
    assert report["server_cpu_ms_per_1k"] > 0
    assert all(isinstance(mib, float) and mib > 10 for mib in report["server_peak_rss_mib"])
    assert report["ok"] is True
    assert "delivered" in stdout.getvalue()  # the table header
    assert report["config"]["python_loop_ms"] > 0 and "-step Python loop takes" in stdout.getvalue()


@pytest.mark.slow  # starts server processes
def test_chatbench_with_one_user_prints_idle_cpu_and_each_seconds_deliveries_latency_and_cpu(tmp_path):
    report, stdout = run_chatbench(tmp_path, sockets=6, users=1, senders=2, rate=5, duration=3, timeline=True, idle=1)
    assert report["setup"]["users"] == 1
    idle = report["main"]["idle"]
    assert idle["seconds"] >= 1 and idle["server_cpu_pct"] >= 0 and idle["server_rss_mib"][0] > 10
    assert "idle 1 s (sockets open, nothing sent): servers " in stdout.getvalue()
    step = report["main"]["steps"][0]
    assert step["delivered"] == step["expected"] == 15 * 6, step
    seconds = step["timeline"]
    assert [row["second"] for row in seconds] == [0, 1, 2]  # by send time: 3 s of sending
    assert sum(row["deliveries"] for row in seconds) == step["latency_samples"]
    for row in seconds:
        assert 0 < row["p50_ms"] <= row["p99_ms"] <= row["max_ms"], row
    assert all(row["server_cpu_pct"] >= 0 for row in seconds[:-1])
    assert "second  deliveries  p50 ms  p99 ms  max ms  srv CPU%" in stdout.getvalue()


@pytest.mark.slow  # starts server processes
def test_chatbench_rerun_signs_its_users_in_again_and_its_baseline_delivers_everything(tmp_path):
    options = dict(sockets=4, senders=2, rate=5, duration=2, warmup=0.5, max_seconds=80, stdout=io.StringIO())
    database_url = f"sqlite:///{tmp_path}/bench.sqlite3"
    call_command("chatbench", database_url=database_url, **options)
    out_path = tmp_path / "report.json"
    # The users exist now: signing up is refused, and the run logs them in instead.
    call_command("chatbench", database_url=database_url, json=str(out_path), baseline=True, **options)
    report = json.loads(out_path.read_text())
    assert report["aborted"] is None, report["aborted"]
    for phase in ("main", "baseline"):
        step = report[phase]["steps"][0]
        assert step["delivered"] == step["expected"] == 10 * 4, (phase, step)
        assert step["lost"] == 0 and step["duplicates"] == 0, (phase, step)


# --------------------------------------------------------------------------
# The client's framing, without a server
# --------------------------------------------------------------------------


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False

    def write(self, data) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


def server_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    first = (0x80 if fin else 0) | opcode
    if len(payload) < 126:
        return struct.pack("!BB", first, len(payload)) + payload
    if len(payload) < 65536:
        return struct.pack("!BBH", first, 126, len(payload)) + payload
    return struct.pack("!BBQ", first, 127, len(payload)) + payload


def read_client_frames(data: bytes) -> list[tuple[int, bytes]]:
    """Decode masked client frames (and check they are masked)."""
    frames = []
    pos = 0
    while pos < len(data):
        b0, b1 = data[pos], data[pos + 1]
        assert b1 & 0x80, "client frames must be masked"
        length, pos = b1 & 0x7F, pos + 2
        if length == 126:
            (length,), pos = struct.unpack_from("!H", data, pos), pos + 2
        elif length == 127:
            (length,), pos = struct.unpack_from("!Q", data, pos), pos + 8
        key, pos = data[pos : pos + 4], pos + 4
        frames.append((b0 & 0x0F, bytes(c ^ key[i % 4] for i, c in enumerate(data[pos : pos + length]))))
        pos += length
    return frames


def open_fake_socket(
    headers: dict[str, str] | None = None, answer: bytes = b""
) -> tuple[client.BenchSocket, FakeTransport]:
    """A client socket past its handshake; `headers` it sends besides Origin, `answer` header lines the server adds."""
    headers = {"Origin": "http://x", **(headers or {})}
    sock = client.BenchSocket(host="127.0.0.1", port=1, path="/ws/rooms/x/", headers=headers)
    transport = FakeTransport()
    sock.connection_made(transport)
    request = transport.written.decode()
    assert request.startswith("GET /ws/rooms/x/ HTTP/1.1\r\n")
    assert all(f"{name}: {value}\r\n" in request for name, value in headers.items())
    transport.written.clear()
    accept = client.base64.b64encode(client.hashlib.sha1(sock.key.encode() + client.WS_GUID).digest())
    sock.data_received(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n" + answer)
    sock.data_received(b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
    assert sock.handshake_done.done() and sock.is_open
    return sock, transport


def message_frame(n: int, sent_ns: int, pad: int = 0) -> bytes:
    message = {"seq": n, "body": f"t={sent_ns} n={n} " + "x" * pad, "nonce": f"nonce-{n}"}
    return server_frame(client.OP_TEXT, json.dumps({"type": "message", "message": message}).encode())


async def test_client_reads_split_frames_of_every_length_encoding():
    sock, transport = open_fake_socket()
    sock.recorder = client.Recorder(rooms=1)
    now = client.time.time_ns()
    fragmented = json.dumps({"type": "history", "messages": [], "has_more": False}).encode()
    stream = b"".join(
        [
            message_frame(1, now),  # 7-bit length
            message_frame(2, now, pad=300),  # 16-bit length
            message_frame(3, now, pad=70_000),  # 64-bit length
            server_frame(client.OP_TEXT, json.dumps({"type": "ready", "last_seq": 0}).encode()),
            server_frame(client.OP_TEXT, fragmented[:10], fin=False),
            server_frame(client.OP_CONT, fragmented[10:]),
            server_frame(client.OP_TEXT, json.dumps({"type": "error", "code": "not_saved"}).encode()),
        ]
    )
    for size in (1, 7, 1000):  # any split of the byte stream reads the same
        sock.received = client.array("q")
        sock.recorder = client.Recorder(rooms=1)
        for start in range(0, len(stream), size):
            sock.data_received(stream[start : start + size])
        assert list(sock.received) == [1, 2, 3]
        assert len(sock.recorder.latencies_ns) == 3 and min(sock.recorder.latencies_ns) >= 0
        assert sock.recorder.delivered == [3]
        assert sock.recorder.errors == {"not_saved": 1}
        assert (await sock.next_frame(1))["type"] == "history"
    assert (await sock.ready) == {"type": "ready", "last_seq": 0}
    assert transport.written == b""


async def test_client_masks_what_it_sends_and_answers_ping_and_close():
    sock, transport = open_fake_socket()
    body = "t=1 n=2 " + "y" * 200
    assert sock.send_json({"type": "send", "body": body, "nonce": "a"})
    sock.data_received(server_frame(client.OP_PING, b"are you there"))
    sock.data_received(server_frame(client.OP_CLOSE, struct.pack("!H", 1013)))
    frames = read_client_frames(bytes(transport.written))
    assert frames[0] == (
        client.OP_TEXT,
        json.dumps({"type": "send", "body": body, "nonce": "a"}, separators=(",", ":")).encode(),
    )
    assert frames[1] == (client.OP_PONG, b"are you there")
    assert frames[2] == (client.OP_CLOSE, struct.pack("!H", 1013))
    assert sock.close_code == 1013 and transport.closed and not sock.is_open


async def test_client_reports_a_refused_handshake():
    sock = client.BenchSocket(host="127.0.0.1", port=1, path="/", headers={})
    transport = FakeTransport()
    sock.connection_made(transport)
    sock.data_received(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
    assert sock.http_status == 403 and transport.closed
    try:
        await sock.handshake_done
    except client.HandshakeError as error:
        assert "403" in str(error)
    else:
        raise AssertionError("a 403 must fail the handshake")


def test_tally_counts_loss_duplicates_and_strays_per_socket():
    stored = {1, 2, 3}
    perfect = client.array("q", [3, 1, 2])  # order does not matter
    lossy = client.array("q", [1, 3])
    doubled = client.array("q", [1, 2, 2, 3, 3, 3, 9])  # 9 was not stored in this step
    counted = client.tally(stored, [perfect, lossy, doubled])
    assert counted == client.Tally(delivered=8, lost=1, duplicates=3, stray=1, sockets_with_loss=1)


def test_percentile_is_nearest_rank():
    values = list(range(1, 101))
    assert report.percentile(values, 0.50) == 50
    assert report.percentile(values, 0.99) == 99
    assert report.percentile([7], 0.99) == 7
    assert report.percentile([], 0.5) is None


async def test_client_offering_deflate_reads_the_frames_a_server_compressed_with_context_takeover():
    assert client.BROWSER_EXTENSIONS == "permessage-deflate; client_max_window_bits"  # what Chromium offers
    sock, _ = open_fake_socket(
        {"Sec-WebSocket-Extensions": client.BROWSER_EXTENSIONS}, b"Sec-WebSocket-Extensions: permessage-deflate\r\n"
    )
    sock.recorder = client.Recorder(rooms=1)
    compressor = client.zlib.compressobj(wbits=-15)
    now = client.time.time_ns()
    for n in (1, 2):  # the second one leans on the first's window
        text = json.dumps({"type": "message", "message": {"seq": n, "body": f"t={now} n={n} same words"}}).encode()
        deflated = compressor.compress(text) + compressor.flush(client.zlib.Z_SYNC_FLUSH)
        assert deflated.endswith(b"\x00\x00\xff\xff")
        sock.data_received(server_frame(client.OP_TEXT | client.RSV1, deflated[:-4]))
    assert list(sock.received) == [1, 2] and sock.recorder.delivered == [2]


@pytest.mark.slow  # starts a server process
def test_pollbench_wakes_every_poll_with_the_one_message_and_measures_a_do_nothing_request_beside_it(tmp_path):
    stdout = io.StringIO()
    database_url = f"sqlite:///{tmp_path}/bench.sqlite3"
    call_command("pollbench", polls=20, hold=0.5, database_url=database_url, max_seconds=60, stdout=stdout)
    report = json.loads(stdout.getvalue()[stdout.getvalue().index("{\n") :])
    assert report["post_status"] == 201
    assert report["answered_with_the_message"] == 20 and report["failed"] == 0 and report["answered_early"] == 0
    assert report["setup"]["cpu_ms_per_poll"] > 0
    assert report["floor"]["not_404"] == 0  # every do-nothing request was the API's JSON 404
    assert report["floor"]["cpu_ms_per_request"] > 0
    assert report["python_loop_ms"] > 0


def test_renderbench_times_each_kind_of_body():
    output = io.StringIO()
    call_command("renderbench", "--messages", "20", stdout=output)
    result = json.loads(output.getvalue()[output.getvalue().index("{") :])
    assert set(result) == {"python_loop_ms", "plain_us", "markdown_us", "code block_us"}
    assert all(value > 0 for value in result.values())
