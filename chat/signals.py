"""Receivers of Django's signals."""

from __future__ import annotations

from django.contrib.auth.signals import user_logged_out
from django.db.backends.signals import connection_created
from django.dispatch import receiver

from chat import database, services


@receiver(user_logged_out)
def close_the_sessions_sockets(sender, request, user, **kwargs) -> None:
    """Signing out closes the sockets this browser session has open, on every process, at once."""
    session_key = getattr(getattr(request, "session", None), "session_key", None)
    if user is None or not session_key:
        return
    services.session_signed_out(session_key=session_key)


@receiver(connection_created)
def note_that_the_database_answers(sender, connection, **kwargs) -> None:
    """A connection opened after an outage ends it (chat/database.py logs that once)."""
    database.database_back()
