"""What the chat's manage.py commands share: argument checks and plain-text tables.

Each bad argument is a CommandError saying what to do.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.models import User
from django.core.management.base import CommandError, OutputWrapper

from chat.models import Room

DURATION = re.compile(r"^(\d+)([smhdw])$")
UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def room_named(slug: str) -> Room:
    room = Room.objects.filter(slug=slug).first()
    if room is None:
        raise CommandError(f'There is no room "{slug}". See the rooms with: manage.py listrooms')
    return room


def user_named(username: str) -> User:
    user = get_user_model().objects.filter(username=username).first()
    if user is None:
        raise CommandError(f'There is no user "{username}". Check the name, or create the user first.')
    return user


def duration(text: str) -> timedelta:
    """'30d', '12h', '90m', '2w', '45s' → timedelta."""
    match = DURATION.match(text.strip())
    if not match or int(match.group(1)) == 0:
        raise CommandError(f'"{text}" is not a duration: use a whole number and a unit, like 30d, 12h, 90m or 2w.')
    return timedelta(seconds=int(match.group(1)) * UNIT_SECONDS[match.group(2)])


def moment(text: str) -> datetime:
    """An ISO date or date-time ('2026-11-01', '2026-11-01T09:30'); UTC unless it says otherwise."""
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise CommandError(f'"{text}" is not a date: use YYYY-MM-DD or YYYY-MM-DDTHH:MM.') from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def write_table(out: OutputWrapper, columns: list[str], rows: list[dict[str, Any]]) -> None:
    """Write rows as a plain-text table with a header, each column as wide as its widest cell."""
    widths = {c: max([len(c), *(len(str(row[c])) for row in rows)]) for c in columns}
    out.write("  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip())
    for row in rows:
        out.write("  ".join(str(row[c]).ljust(widths[c]) for c in columns).rstrip())
