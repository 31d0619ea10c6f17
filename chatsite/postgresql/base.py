"""Django's PostgreSQL backend, with its connection health check made at most once a second.

Django checks a persistent connection (CONN_HEALTH_CHECKS, a `SELECT 1`)
before its first query after every `close_old_connections()`, which Channels
calls around every `database_sync_to_async` call: one more round trip for
each message a socket sends, made by the process's one database thread. At
200+ messages a second that thread became the queue every save waited in
(docs/performance.md). A connection that passed a check less than a second
ago is not checked again; one that broke meanwhile fails its query, and
Django closes it after that error (`close_if_unusable_or_obsolete`).
"""

from __future__ import annotations

import time

from django.db.backends.postgresql import base

CHECK_EVERY = 1.0  # seconds


class DatabaseWrapper(base.DatabaseWrapper):
    checked_at = -CHECK_EVERY
    health_check_done: bool

    def close_if_health_check_failed(self) -> None:
        if self.health_check_done:
            return
        if time.monotonic() - self.checked_at < CHECK_EVERY:
            self.health_check_done = True
            return
        super().close_if_health_check_failed()
        self.checked_at = time.monotonic()

    def connect(self) -> None:
        super().connect()
        self.checked_at = time.monotonic()  # a new connection is as good as a checked one
