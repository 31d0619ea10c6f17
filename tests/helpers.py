"""Helpers the tests share (fixtures live in conftest.py; server processes in servers.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from django.conf import settings
from django.contrib.auth.hashers import PBKDF2PasswordHasher
from django.test import Client

ORIGIN = "http://localhost"  # the Origin header the in-process socket tests send


class FastPBKDF2PasswordHasher(PBKDF2PasswordHasher):
    """Django's default hasher with few iterations, for the tests' users.

    The hashes keep the "pbkdf2_sha256" name and carry their iteration count,
    so the server processes the live tests start (which use the default
    hashers) still check these passwords.
    """

    iterations = 1_000


def session_cookie(user) -> str:
    """Return the value of a session cookie signed in as `user`."""
    client = Client()
    client.force_login(user)
    return client.cookies[settings.SESSION_COOKIE_NAME].value


async def receive(communicator, timeout: float = 3, *, presence: bool = False) -> dict:
    """Return the next frame; presence frames, which come as people arrive and leave, only when asked for."""
    while True:
        frame = json.loads(await communicator.receive_from(timeout=timeout))
        if (frame["type"] == "presence") == presence:
            return frame


async def silent(communicator, timeout: float = 0.5) -> bool:
    """True if nothing but presence frames arrives within `timeout`."""
    while not await communicator.receive_nothing(timeout=timeout):
        if json.loads(await communicator.receive_from())["type"] != "presence":
            return False
    return True


async def receive_until_ready(communicator) -> tuple[list[dict], dict]:
    """Return the frames before the "ready" frame, and the ready frame."""
    frames = []
    while (frame := await receive(communicator))["type"] != "ready":
        frames.append(frame)
    return frames, frame


async def joined(ws_connect, user, room, **kwargs):
    communicator, connected = await ws_connect(user, room, **kwargs)
    assert connected
    await receive_until_ready(communicator)
    return communicator


async def send(communicator, **frame) -> None:
    await communicator.send_to(text_data=json.dumps(frame))


async def eventually(condition: Callable[[], bool], timeout: float = 3) -> None:
    """Wait until `condition()` holds (checked every 10 ms); fail after `timeout` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)
