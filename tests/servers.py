"""Server processes for the live-server, reliability and browser tests (the fixtures are in conftest.py).

`ServerCluster` starts `chatsite.asgi:application` the way the README runs it
(uvicorn, uvloop, the sans-I/O websockets protocol, a 1 MiB frame cap; see
bench/serverprocess.py), configured like production (DEBUG off, the Redis
pub/sub layer) but pointed at this run's test database and channel-layer
prefix. Daphne stays supported: `ServerCluster(kind="daphne")`, or
`start(kinds=("uvicorn", "daphne"))` for a mixed pair.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import json
import mailbox
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import quote

import redis
import websockets
from channels.db import database_sync_to_async
from django.conf import settings
from django.db import connection
from redis.backoff import NoBackoff
from redis.retry import Retry
from websockets.exceptions import ConnectionClosed

from bench.serverprocess import ServerProcess
from chat.models import Message

APP = "chatsite.asgi:application"
READY_TIMEOUT = 15.0  # seconds for a server process to answer HTTP
FRAME_TIMEOUT = 5.0  # seconds to wait for a frame that must arrive
SILENCE = 1.0  # seconds a socket must stay quiet to count as "received nothing"
REDIS_START_TIMEOUT = 10.0  # seconds for a private redis-server to answer PING
# What uvicorn and daphne log when the application raised out of a connection.
ASGI_ERROR_MARKERS = ("Exception in ASGI application", "Exception inside application")
APP_ERROR_MARKERS = ("Traceback", *ASGI_ERROR_MARKERS)


# --------------------------------------------------------------------------
# Server processes
# --------------------------------------------------------------------------


def subprocess_database_url() -> str:
    """Return a DATABASE_URL opening the test database this process is using right now."""
    db = connection.settings_dict
    engine = db["ENGINE"]
    name = str(db["NAME"])
    if connection.vendor == "sqlite":
        if name == ":memory:" or "mode=memory" in name:
            raise AssertionError("Live-server tests need a file-based SQLite test database, not an in-memory one.")
        return "sqlite:///" + str(Path(name).resolve())  # an absolute path gives sqlite:////abs/path
    if connection.vendor == "postgresql":  # Django's backend, or chatsite.postgresql
        auth = quote(db.get("USER") or "", safe="")
        if db.get("PASSWORD"):
            auth += ":" + quote(db["PASSWORD"], safe="")
        host = db.get("HOST") or "localhost"
        host = quote(host, safe="") if host.startswith("/") else host  # a Unix socket directory
        port = f":{db['PORT']}" if db.get("PORT") else ""
        return f"postgres://{auth}@{host}{port}/{quote(name, safe='')}"
    raise AssertionError(f"No DATABASE_URL mapping for database engine {engine!r}.")


def channel_layer_prefix() -> str:
    """The prefix this run's channel layer uses (conftest makes it unique per run)."""
    prefix = settings.CHANNEL_LAYERS["default"].get("CONFIG", {}).get("prefix")
    # The test process itself may run on the in-memory layer; the servers still
    # need a prefix no other run uses.
    return prefix or f"test-live-{uuid.uuid4().hex[:12]}"


def server_env() -> dict[str, str]:
    env = os.environ.copy()
    env.update(
        DJANGO_SETTINGS_MODULE=settings.SETTINGS_MODULE,
        DATABASE_URL=subprocess_database_url(),
        SECRET_KEY=settings.SECRET_KEY,
        DEBUG="0",
        ALLOWED_HOSTS="127.0.0.1,localhost",
        CHANNEL_LAYER="redis",
        CHANNEL_LAYER_PREFIX=channel_layer_prefix(),
        REDIS_URL=settings.REDIS_URL,
        PYTHONUNBUFFERED="1",
    )
    return env


def ws_url(server: ServerProcess, slug: str, after: int | None = None) -> str:
    query = f"?after={after}" if after is not None else ""
    return f"ws://127.0.0.1:{server.port}/ws/rooms/{slug}/{query}"


def assert_no_app_errors(server: ServerProcess, markers: tuple[str, ...] = APP_ERROR_MARKERS) -> None:
    log = server.log_text()
    for marker in markers:
        assert marker not in log, f"{marker!r} in {server.name}'s log\n{server.log_tail()}"


class ServerCluster:
    """Starts servers for one test and remembers them so teardown can kill every one.

    `kind` is a bench/serverprocess.py server: "uvicorn" (the README's command) or "daphne";
    `app` the ASGI application they serve (the site's, or bench/counted_asgi.py's count of its queries).
    """

    def __init__(self, log_dir: Path, kind: str = "uvicorn", app: str = APP) -> None:
        self.log_dir = log_dir
        self.kind = kind
        self.app = app
        self.env = server_env()
        # Options added to the uvicorn servers' production command.
        self.uvicorn_options: list[str] = []
        self.servers: list[ServerProcess] = []

    async def start(self, count: int = 1, *, kinds: Sequence[str] = ()) -> list[ServerProcess]:
        """Start `count` servers of the cluster's kind, or one of each of `kinds` (a mixed cluster)."""
        kinds = list(kinds) or [self.kind] * count
        names = [f"{kind}-{len(self.servers) + i + 1}" for i, kind in enumerate(kinds)]
        new = [
            ServerProcess(name, kind, self.app, self.env, self.log_dir / f"{name}.log", self.uvicorn_options)
            for name, kind in zip(names, kinds, strict=True)
        ]
        self.servers.extend(new)  # before spawning: teardown must see them even if startup fails
        for server in new:
            server.spawn()
        await asyncio.gather(*(asyncio.to_thread(server.wait_ready, READY_TIMEOUT) for server in new))
        return new

    async def restart(self, server: ServerProcess) -> None:
        server.kill()
        server.spawn()
        await asyncio.to_thread(server.wait_ready, READY_TIMEOUT)

    def kill_all(self) -> None:
        for server in self.servers:
            server.kill()

    def logs(self) -> str:
        return "\n".join(server.log_tail() for server in self.servers)


# --------------------------------------------------------------------------
# WebSocket clients
# --------------------------------------------------------------------------


class Sockets:
    """Real WebSocket clients of the servers; every socket opened is closed at teardown."""

    def __init__(self, logs: Callable[[], str]) -> None:
        self.logs = logs
        self.opened: list = []

    async def open(self, server: ServerProcess, cookie: str, slug: str, *, after: int | None = None):
        url = ws_url(server, slug, after)
        try:
            ws = await websockets.connect(
                url,
                origin=server.origin,
                additional_headers={"Cookie": f"{settings.SESSION_COOKIE_NAME}={cookie}"},
                open_timeout=FRAME_TIMEOUT,
                close_timeout=2,
            )
        except Exception as error:
            raise AssertionError(f"could not open {url}: {error!r}\n{self.logs()}") from error
        self.opened.append(ws)
        return ws

    async def join(self, server: ServerProcess, cookie: str, slug: str, *, after: int | None = None):
        """Open a socket and read up to its ready frame: (socket, frames before ready, ready frame)."""
        ws = await self.open(server, cookie, slug, after=after)
        before: list[dict] = []
        while True:
            frame = await self.recv(ws, f"the ready frame on {server.name} /{slug}/ after={after}")
            if frame["type"] == "ready":
                return ws, before, frame
            before.append(frame)

    async def recv(self, ws, waiting_for: str, timeout: float = FRAME_TIMEOUT, *, presence: bool = False) -> dict:
        """Return the next frame; presence frames, which come as people arrive and leave, only when asked for."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            try:
                raw = await asyncio.wait_for(ws.recv(), max(0.01, deadline - asyncio.get_running_loop().time()))
            except TimeoutError:
                raise AssertionError(
                    f"no frame within {timeout}s while waiting for {waiting_for}\n{self.logs()}"
                ) from None
            except ConnectionClosed as error:
                raise AssertionError(
                    f"socket closed ({error}) while waiting for {waiting_for}\n{self.logs()}"
                ) from None
            frame = json.loads(raw)
            if (frame["type"] == "presence") == presence:
                return frame

    async def send(self, ws, body: str, nonce: str | None = None) -> None:
        frame = json.dumps({"type": "send", "body": body, "nonce": nonce or uuid.uuid4().hex})
        try:
            await ws.send(frame)
        except ConnectionClosed as error:
            raise AssertionError(f"socket closed ({error}) before sending {body!r}\n{self.logs()}") from None

    async def recv_message(self, ws, waiting_for: str) -> dict:
        frame = await self.recv(ws, waiting_for)
        assert frame["type"] == "message", f"expected a message frame for {waiting_for}, got {frame}\n{self.logs()}"
        return frame["message"]

    async def assert_silent(self, ws, who: str, seconds: float = SILENCE) -> None:
        """Nothing but presence frames may arrive within `seconds`."""
        deadline = asyncio.get_running_loop().time() + seconds
        while (left := deadline - asyncio.get_running_loop().time()) > 0:
            try:
                raw = await asyncio.wait_for(ws.recv(), left)
            except TimeoutError:
                return
            except ConnectionClosed as error:
                raise AssertionError(
                    f"{who}: socket closed ({error}) instead of staying quiet\n{self.logs()}"
                ) from None
            if json.loads(raw)["type"] != "presence":
                raise AssertionError(f"{who} should have received nothing, got {raw}\n{self.logs()}")

    async def close_all(self) -> None:
        for ws in self.opened:
            try:
                await ws.close()
            except Exception:
                pass


def summary(frame: dict) -> tuple:
    """(type, seq, body) of a frame, for comparing frame sequences in one assert."""
    message = frame.get("message") or {}
    return (frame.get("type"), message.get("seq"), message.get("body"))


# database_sync_to_async closes the worker thread's connection afterwards, so no
# session is left open when the test database is flushed or dropped.
@database_sync_to_async
def stored_messages(room) -> list[tuple[int, str, str]]:
    return list(Message.objects.filter(room=room).order_by("seq").values_list("seq", "body", "author__username"))


# --------------------------------------------------------------------------
# A private redis-server, for fault injection
# --------------------------------------------------------------------------


def port_outside_ephemeral_range() -> int:
    """A free loopback port that no outgoing connection can take while Redis is down.

    Client sockets get their local port from the ephemeral range; a Redis port
    from that range could be taken by a server's reconnect attempt between a
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
        deadline = time.monotonic() + REDIS_START_TIMEOUT
        while not self.answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not start:\n{self.log_tail()}")
            time.sleep(0.05)  # polling PING until the deadline

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


# --------------------------------------------------------------------------
# Mail: a real SMTP server process, and the task worker that sends to it
# --------------------------------------------------------------------------

MAIL_TIMEOUT = 30.0  # seconds for an email to arrive: the notice's delay, the worker's poll, SMTP


class SmtpServer:
    """aiosmtpd in a process of its own, keeping every email it receives in a Maildir the test reads."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.maildir = directory / "Maildir"
        self.port = port_outside_ephemeral_range()
        self.log_path = directory / "smtp.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        command = [
            sys.executable, "-m", "aiosmtpd", "-n", "-l", f"127.0.0.1:{self.port}",
            "-c", "aiosmtpd.handlers.Mailbox", str(self.maildir),
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + READY_TIMEOUT
        while not self.answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"aiosmtpd on port {self.port} did not start:\n{self.log_tail()}")
            time.sleep(0.05)  # polling the port until the deadline

    def answers(self) -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
            return sock.recv(3) == b"220"  # the SMTP greeting
        return False

    def emails(self) -> list[email.message.Message]:
        """Every email received so far, oldest first."""
        if not self.maildir.exists():
            return []
        box = mailbox.Maildir(self.maildir, create=False)
        return [message for _, message in sorted(box.items(), key=lambda item: item[1].get_date())]

    async def wait_for_emails(self, count: int, timeout: float = MAIL_TIMEOUT) -> list[email.message.Message]:
        deadline = time.monotonic() + timeout
        while len(received := self.emails()) < count:
            assert time.monotonic() < deadline, f"{len(received)} of {count} emails arrived in {timeout:.0f} s"
            await asyncio.sleep(0.1)  # polling the Maildir until the deadline
        return received

    def env(self) -> dict[str, str]:
        """What a process that sends mail needs to send it here."""
        return {
            "EMAIL_BACKEND": "django.core.mail.backends.smtp.EmailBackend",
            "EMAIL_HOST": "127.0.0.1",
            "EMAIL_PORT": str(self.port),
        }

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""


class TaskWorker:
    """`manage.py db_worker`, as bin/serve starts it beside the server: runs the tasks the database holds."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        command = [
            sys.executable, "manage.py", "db_worker", "--no-reload", "--no-startup-delay", "--interval", "0.2",
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                command, cwd=settings.BASE_DIR, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


# --------------------------------------------------------------------------
# A TCP proxy in front of one server
# --------------------------------------------------------------------------


class TcpProxy:
    """A reverse proxy in front of one server; `forward(head)` sees (and may rewrite) each connection's request head."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener: asyncio.Server | None = None

    @property
    def origin(self) -> str:
        assert self.listener is not None, "start() the proxy first"
        return f"http://127.0.0.1:{self.listener.sockets[0].getsockname()[1]}"

    async def start(self) -> None:
        self.listener = await asyncio.start_server(self.serve, "127.0.0.1", 0)

    async def close(self) -> None:
        if self.listener is not None:
            self.listener.close()

    def forward(self, head: bytes) -> bytes:
        """Return the request head to send on (the first request of a connection, up to its blank line)."""
        return head

    def forwarded(self, head: bytes) -> None:
        """Called once the head has reached the server."""

    async def serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            head = self.forward(await client_reader.readuntil(b"\r\n\r\n"))
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except (asyncio.IncompleteReadError, OSError):
            client_writer.close()
            return
        server_writer.write(head)
        await server_writer.drain()
        self.forwarded(head)
        await asyncio.gather(_pipe(client_reader, server_writer), _pipe(server_reader, client_writer))


class StallingTcpProxy:
    """A TCP proxy (in front of Redis) that can stop forwarding, as a blackholed network path does.

    While stalled nothing is refused and nothing answers: open connections
    hang, and new ones are accepted and hang too. Once it flows again, what
    was sent meanwhile arrives late.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.listener: asyncio.Server | None = None
        self.connections: set[asyncio.Task] = set()

    @property
    def url(self) -> str:
        assert self.listener is not None, "start() the proxy first"
        return f"redis://127.0.0.1:{self.listener.sockets[0].getsockname()[1]}/0"

    async def start(self) -> None:
        self.listener = await asyncio.start_server(self.serve, "127.0.0.1", 0)

    async def close(self) -> None:
        self.flowing.set()
        if self.listener is not None:
            self.listener.close()
        for task in self.connections:
            task.cancel()
        await asyncio.gather(*self.connections, return_exceptions=True)

    def stall(self) -> None:
        self.flowing.clear()

    def flow(self) -> None:
        self.flowing.set()

    async def serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.connections.add(task)
        try:
            await self.flowing.wait()
            try:
                server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            except OSError:  # Redis is down: refuse, as it would
                return
            try:
                await asyncio.gather(
                    _pipe(client_reader, server_writer, self.flowing), _pipe(server_reader, client_writer, self.flowing)
                )
            finally:
                server_writer.close()
        except asyncio.CancelledError:
            pass  # close(): asyncio's server logs a connection task that ends cancelled
        finally:
            client_writer.close()
            self.connections.discard(task)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, gate: asyncio.Event | None = None) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            if gate is not None:
                await gate.wait()
            writer.write(data)
            await writer.drain()
    writer.close()
