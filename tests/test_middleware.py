"""Django's middleware in the async chain: hooks without I/O run on the event loop, writes still go to a thread."""

from __future__ import annotations

import pytest
from asgiref import sync
from channels.db import database_sync_to_async
from django.conf import settings
from django.contrib.sessions.models import Session
from django.test import AsyncClient
from django.utils import deprecation

from chatsite import middleware

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def hooks_in_threads(monkeypatch) -> list[str]:
    """The middleware hooks that were sent to a thread, by name."""
    hopped: list[str] = []

    def counted(function, **kwargs):
        hopped.append(function.__qualname__)
        return sync.sync_to_async(function, **kwargs)

    monkeypatch.setattr(middleware, "sync_to_async", counted)
    monkeypatch.setattr(deprecation, "sync_to_async", counted)  # Django's MiddlewareMixin, were it still in use
    return hopped


async def test_a_signed_in_get_runs_every_middleware_hook_on_the_event_loop(hooks_in_threads, user, alice_cookie):
    client = AsyncClient()
    client.cookies[settings.SESSION_COOKIE_NAME] = alice_cookie
    response = await client.get("/api/rooms/")
    assert response.status_code == 200
    # Every hook ran (their headers are there), none of them in a thread.
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert "Cookie" in response.headers["Vary"]
    assert hooks_in_threads == []


async def test_signing_in_saves_the_session_from_a_thread_and_it_holds(hooks_in_threads, user):
    client = AsyncClient()
    page = await client.get("/accounts/login/")
    csrf = page.cookies[settings.CSRF_COOKIE_NAME].value
    response = await client.post(
        "/accounts/login/", {"username": "alice", "password": "pw-alice-123", "csrfmiddlewaretoken": csrf}
    )
    assert response.status_code == 302
    # The form body's CSRF check and the session's save are the hooks that may do I/O.
    assert hooks_in_threads == ["CsrfViewMiddleware.process_view", "SessionMiddleware.process_response"]
    session_key = response.cookies[settings.SESSION_COOKIE_NAME].value
    assert await database_sync_to_async(Session.objects.filter(session_key=session_key).exists)()
    assert (await client.get("/api/rooms/")).status_code == 200
