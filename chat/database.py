"""While the database is away: which errors say so, and an outage logged once rather than per request.

Pages and the API answer 503 (chatsite/middleware.py), a socket answers its
frame with an error and stays open (chat/consumers.py): a send gets
`not_saved` with its nonce, and the page sends it again. Nothing needs
resetting when the database returns: Django discards a broken persistent
connection (CONN_HEALTH_CHECKS; on PostgreSQL at most once a second,
chatsite/postgresql/base.py) before its next use, or after the one query
that found it broken, and opens a new one.
"""

from __future__ import annotations

import logging
import threading

from django.db import InterfaceError, OperationalError

logger = logging.getLogger(__name__)

# What Django raises while the database is unreachable, restarting, or has
# dropped the connection (also a lock or statement timeout: retryable too).
DATABASE_ERRORS = (OperationalError, InterfaceError)
# Seconds a client is told to wait before trying again (HTTP Retry-After).
RETRY_AFTER = 5

_lock = threading.Lock()
_down = False


def database_down(error: BaseException) -> None:
    """Log an outage of the database once, not once per request or frame."""
    global _down
    with _lock:
        if _down:
            return
        _down = True
    logger.error("The database is unreachable; requests get 503 and sends not_saved until it answers: %r", error)


def database_back() -> None:
    """Log the end of an outage; called whenever a connection opens (chat/signals.py)."""
    global _down
    if not _down:  # the usual case, read without the lock
        return
    with _lock:
        if not _down:
            return
        _down = False
    logger.warning("The database answers again.")
