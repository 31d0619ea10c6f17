"""Logging filters used by the settings' LOGGING."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter


class AtMostEvery(logging.Filter):
    """Let a record of one kind (logger and message) through once every `seconds`; count the rest.

    channels_redis logs a traceback every second while Redis is away, as its
    reader retries. The site says once what is wrong (chat/realtime.py), so
    the repeats only need to show that the reader is still at it.
    """

    def __init__(self, seconds: float = 60.0) -> None:
        super().__init__()
        self.seconds = seconds
        self.last_let_through: dict[tuple[str, str], float] = {}
        self.held_back: Counter[tuple[str, str]] = Counter()
        self.lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        kind = (record.name, str(record.msg))
        now = time.monotonic()
        with self.lock:
            last = self.last_let_through.get(kind)
            if last is not None and now - last < self.seconds:
                self.held_back[kind] += 1
                return False
            self.last_let_through[kind] = now
            held_back = self.held_back.pop(kind, 0)
        if held_back:
            record.msg = f"{record.msg} [{held_back} more like this since the last one shown]"
        return True
