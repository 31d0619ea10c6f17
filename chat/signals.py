"""Receivers of Django's signals."""

from __future__ import annotations

from django.contrib.auth.signals import user_logged_out
from django.db import connections
from django.db.backends.signals import connection_created
from django.db.models.signals import post_migrate
from django.dispatch import receiver

from chat import database, search, services


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


@receiver(post_migrate)
def keep_the_search_index_triggers(sender, using: str = "default", **kwargs) -> None:
    """SQLite: a migration that rebuilds the message table (Django copies it) leaves the search triggers behind.

    Made again after every migrate, if missing: the statements are idempotent.
    """
    if sender.name != "chat" or connections[using].vendor != "sqlite":
        return
    with connections[using].cursor() as cursor:
        for statement in search.INDEX_DDL["sqlite"]:
            cursor.execute(statement)
