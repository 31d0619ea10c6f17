"""Python's cyclic garbage collector, paced for a process that holds thousands of sockets.

CPython runs a full (generation 2) collection whenever the objects that
survived the younger collections have grown by a quarter. A full collection
walks every tracked object with the event loop stopped: about 170 per open
socket (the server's protocol objects, the ASGI stack's suspended coroutines,
the consumer, its session and user), so at 10,000 sockets 1.7 million objects
and 1 to 2 s, which under steady load came every ~35 s and stopped every
delivery (docs/performance.md).

Here a full collection still happens when CPython's own rule asks for one,
but at most once every CHAT_GC_FULL_EVERY seconds, unless the process has
grown by half since the last one: cyclic garbage that reached the old
generation (a rendered page's context, say) waits longer, but not without
bound. The young generations are collected as usual. The objects made while
the process starts up (modules, settings, URL patterns) live as long as it
does, so they are frozen out of every collection.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable

# A generation-2 threshold that is never reached: gen-1 collections are far fewer than this.
NEVER = 2**31 - 1


class FullCollectionPacer:
    """For gc.callbacks: a full collection waits `every` seconds after the last, or for the process to grow by half."""

    # The resident size is read at most this often (seconds): young collections come by the hundred a second.
    MEASURE_EVERY = 1.0

    def __init__(
        self, every: float, clock: Callable[[], float] = time.monotonic, size: Callable[[], int] | None = None
    ) -> None:
        self.every = every
        self.clock = clock
        self.size = size or resident_bytes
        self.threshold2 = gc.get_threshold()[2]
        self.last_full = self.measured_at = clock()
        self.size_after_full = self.size()

    def __call__(self, phase: str, info: dict) -> None:
        if phase != "stop":
            return
        threshold0, threshold1, threshold2 = gc.get_threshold()
        now = self.clock()
        if info["generation"] == 2:
            self.last_full = self.measured_at = now
            self.size_after_full = self.size()
            gc.set_threshold(threshold0, threshold1, NEVER)
        elif threshold2 == NEVER and (now - self.last_full >= self.every or self._grown(now)):
            gc.set_threshold(threshold0, threshold1, self.threshold2)

    def _grown(self, now: float) -> bool:
        if now - self.measured_at < self.MEASURE_EVERY:
            return False
        self.measured_at = now
        return self.size() >= self.size_after_full * 1.5


def resident_bytes() -> int:
    """The process's resident size (0 where /proc is missing: then only the time paces)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def configure(full_every: float) -> None:
    """Freeze what start-up made, and pace full collections (0: CPython's own pace)."""
    gc.collect()
    gc.freeze()
    if full_every <= 0 or any(isinstance(hook, FullCollectionPacer) for hook in gc.callbacks):
        return
    pacer = FullCollectionPacer(full_every)
    threshold0, threshold1, _ = gc.get_threshold()
    gc.set_threshold(threshold0, threshold1, NEVER)
    gc.callbacks.append(pacer)
