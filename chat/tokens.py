"""API tokens: how secrets are made and checked on every API request (services.token_create makes them)."""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta

from django.contrib.auth.models import User
from django.utils import timezone

from chat.models import ApiToken

SECRET_PREFIX = "chat_"
# last_used_at is a hint for people, not an audit log: one write a minute per token at most.
LAST_USED_RESOLUTION = timedelta(minutes=1)


def new_secret() -> tuple[str, str, str]:
    """Return a new secret, the hash that is stored, and the prefix shown in lists."""
    secret = SECRET_PREFIX + secrets.token_urlsafe(32)
    return secret, key_hash(secret), secret[: len(SECRET_PREFIX) + 6]


def key_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def token_user(secret: str) -> User | None:
    """Return the active user a live token belongs to, or None; records when it was used."""
    token = (
        ApiToken.objects.select_related("user")
        .filter(key_hash=key_hash(secret), revoked_at__isnull=True, user__is_active=True)
        .first()
    )
    if token is None:
        return None
    now = timezone.now()
    if token.last_used_at is None or now - token.last_used_at >= LAST_USED_RESOLUTION:
        ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
    return token.user
