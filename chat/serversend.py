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
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

Send = Callable[[dict[str, Any]], Awaitable[None]]

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
