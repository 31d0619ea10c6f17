"""How the hub hands frames to the ASGI server: the one place that knows a server's internals.

uvicorn's sans-I/O WebSocket protocol (the server the README runs) writes a
frame to the transport and returns without suspending, unless the client's
transport is full; it then waits on its `writable` event, which it clears in
`pause_writing` and sets in `resume_writing`. Where the server offers that
event, the hub sends inline while it is set, and no task is made per frame or
per socket. Any other server (daphne, uvicorn's other protocols) gets every
frame through a writer task per socket, which exists only while that socket
has frames waiting. tests/test_fanout.py proves the inline path's promise
against a real uvicorn process: a client that stops reading delays nobody else.

With that server the hub goes one step further: a server's frame is the same
bytes for every socket (servers do not mask), so the hub frames a message
once and writes those bytes to each socket's transport, where uvicorn would
encode, frame and join them again per socket (`RawWriter`). It does so only
while the connection is open with no extension (per-message compression is
off, README), and hands the frame to the server's `send` otherwise.

The same server pings each socket on a timer of its own and arms a second
timer for each pong: at 10,000 sockets, 500 pings, 500 pongs and 1,000
timers a second, two thirds of a nearly idle process's CPU. `Keepalive`
takes that job over once a socket is live, with the server's own interval
and timeout: one task pings every socket of the process, a slice at a time,
with the same ready-made frame, and closes those whose pong never came, as
uvicorn would (1011).
"""

from __future__ import annotations

import asyncio
import logging
import math
import struct
from collections import deque
from collections.abc import Awaitable, Callable
from contextvars import Context
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

Send = Callable[[dict[str, Any]], Awaitable[None]]

try:  # the state of a websockets sans-I/O connection (uvicorn's websockets-sansio protocol)
    from websockets.protocol import State

    _OPEN: object = State.OPEN
except ImportError:  # pragma: no cover - websockets is pinned in requirements.txt
    _OPEN = object()

try:  # uvicorn raises this from `send` once the client has gone; it is an OSError, like a Redis socket's
    from uvicorn.protocols.utils import ClientDisconnected

    CLIENT_GONE: tuple[type[Exception], ...] = (ClientDisconnected,)
except ImportError:  # pragma: no cover - uvicorn is pinned in requirements.txt
    CLIENT_GONE = ()


@dataclass(frozen=True)
class SendMode:
    """Whether this process's server tells when a send will not wait."""

    inline: bool
    server: str

    def writable(self, send: Send) -> asyncio.Event | None:
        """Return the event that is set while `send` completes without waiting; None: always use a writer."""
        return _writable_event(send) if self.inline else None

    def raw_writer(self, send: Send) -> RawWriter | None:
        """Return a writer of ready-made frames to the socket behind `send`, where the server allows one."""
        owner = getattr(send, "__self__", None)
        if not self.inline or not all(hasattr(owner, name) for name in RawWriter.NEEDS):
            return None
        return RawWriter(owner)


class RawWriter:
    """Writes a frame made once (text_frame) straight to one uvicorn sans-I/O socket's transport.

    Only while uvicorn itself would write it at once: handshake done, not
    closing, the transport writable, the connection OPEN and without
    extensions. Otherwise it declines, and the frame goes through `send`.
    """

    __slots__ = ("owner",)
    NEEDS = ("transport", "conn", "writable", "handshake_complete", "close_sent", "disconnected", "initial_response")

    def __init__(self, owner: Any) -> None:
        self.owner = owner

    def __call__(self, frame: bytes) -> bool:
        owner = self.owner
        conn = owner.conn
        if (
            owner.close_sent
            or owner.disconnected
            or not owner.handshake_complete
            or owner.initial_response is not None
            or not owner.writable.is_set()
            or conn.state is not _OPEN
            or conn.extensions
            or owner.transport.is_closing()
        ):
            return False
        owner.transport.write(frame)
        return True


class Keepalive:
    """Pings this process's uvicorn sockets from one task, in slices, instead of two timers per socket.

    Each visit looks at the next slice of the sockets, in turn: a socket whose
    ping went unanswered for the server's ping timeout is closed (uvicorn's
    own `keepalive_timeout`); one last pinged an interval ago is pinged.
    uvicorn's pong handler clears the payload it waits for, so an answered
    ping reads as no ping pending.
    """

    PAYLOAD = b"chat"
    FRAME = bytes((0x89, len(PAYLOAD))) + PAYLOAD  # a final, unmasked ping
    SLICES = 20  # visits per interval: each pings a twentieth of the sockets
    NEEDS = ("stop_keepalive", "keepalive_timeout", "ping_interval", "ping_timeout", "pending_ping_payload")

    def __init__(self) -> None:
        self.owners: deque[Any] = deque()
        self.interval = 0.0
        self.timeout: float | None = None
        self.task: asyncio.Task | None = None

    def take(self, raw: RawWriter) -> asyncio.Task | None:
        """Take over the socket's keep-alive from the server; return the task if this started it."""
        owner = raw.owner
        if not all(hasattr(owner, name) for name in self.NEEDS) or not owner.ping_interval:
            return None  # an unknown protocol, or the server's keep-alive is off (--ws-ping-interval 0)
        owner.stop_keepalive()
        self.owners.append(owner)
        if self.task is not None:
            return None
        self.interval, self.timeout = owner.ping_interval, owner.ping_timeout
        # A fresh context: the task must not keep the first socket's context variables.
        self.task = asyncio.get_running_loop().create_task(self.run(), context=Context())
        return self.task

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval / self.SLICES)
            self.visit(math.ceil(len(self.owners) / self.SLICES))

    def visit(self, count: int) -> None:
        """Ping the next `count` sockets, close those whose last ping timed out, and forget closed ones."""
        owners = self.owners
        now = asyncio.get_running_loop().time()
        # A socket comes round once per interval, give or take a visit: not a whole interval later for that.
        slack = self.interval / self.SLICES
        for _ in range(min(count, len(owners))):
            owner = owners.popleft()
            if owner.close_sent or owner.disconnected or owner.conn.state is not _OPEN or owner.transport.is_closing():
                continue
            waited = now - owner.ping_sent_at + slack
            if owner.pending_ping_payload is not None:
                if self.timeout is not None and waited >= self.timeout:
                    owner.keepalive_timeout()
                    continue
            elif waited >= self.interval:
                owner.pending_ping_payload = self.PAYLOAD
                owner.ping_sent_at = now
                owner.transport.write(self.FRAME)
            owners.append(owner)


def text_frame(text: str) -> bytes:
    """One final, unmasked text frame (RFC 6455 5.2), as a server sends it."""
    payload = text.encode()
    length = len(payload)
    if length < 126:
        return bytes((0x81, length)) + payload
    if length < 65536:
        return struct.pack("!BBH", 0x81, 126, length) + payload
    return struct.pack("!BBQ", 0x81, 127, length) + payload


def detect(send: Send) -> SendMode:
    """Return the send mode of the server behind `send`, and log it (the hub does this once per process)."""
    owner = getattr(send, "__self__", None)
    server = f"{type(owner).__module__}.{type(owner).__qualname__}" if owner is not None else repr(send)
    mode = SendMode(inline=_writable_event(send) is not None, server=server)
    if mode.inline:
        logger.info("Fan-out sends inline while the server's transport is writable (%s)", mode.server)
    else:
        logger.info("Fan-out sends through a writer task per socket (%s offers no writable event)", mode.server)
    return mode


def _writable_event(send: Send) -> asyncio.Event | None:
    event = getattr(getattr(send, "__self__", None), "writable", None)
    return event if isinstance(event, asyncio.Event) else None
