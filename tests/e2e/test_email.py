"""A missed mention arrives by email: the site as bin/serve runs it (uvicorn and the task worker), a real SMTP server.

Bob mentions alice from his browser; alice never reads it. After
NOTIFY_EMAIL_DELAY the worker (`manage.py db_worker`) sends one email through
aiosmtpd, which keeps it in a Maildir; alice follows its link to the message,
and its unsubscribe link turns her email off.
"""

from __future__ import annotations

import re

import pytest
from channels.db import database_sync_to_async
from playwright.async_api import expect

from chat.models import EmailNotice, NotificationSettings
from tests.e2e.helpers import open_room, send

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio(loop_scope="session"), pytest.mark.slow]

NOTIFY_EMAIL_DELAY = "1"  # seconds: long enough to be a delay, short for a test


def give_address(user, address: str) -> None:
    user.email = address
    user.save(update_fields=["email"])


def part(message, content_type: str) -> str:
    for piece in message.walk():
        if piece.get_content_type() == content_type:
            return piece.get_payload(decode=True).decode(piece.get_content_charset() or "utf-8")
    raise AssertionError(f"no {content_type} part")


async def test_a_missed_mention_arrives_by_email_and_its_links_work(
    browsers, cluster, smtp_server, task_worker, user, other_user, room
):
    await database_sync_to_async(give_address)(user, "alice@example.com")
    cluster.env["NOTIFY_EMAIL_DELAY"] = NOTIFY_EMAIL_DELAY
    (server,) = await cluster.start(1)
    task_worker(SITE_URL=server.origin, NOTIFY_EMAIL_DELAY=NOTIFY_EMAIL_DELAY)

    bob = await browsers.new_page(other_user)
    await open_room(bob, server, "general")
    await send(bob, "@alice can you review the draft?")
    await send(bob, "no mention here")

    (received,) = await smtp_server.wait_for_emails(1)
    assert received["To"] == "alice@example.com"
    assert received["Subject"] == "bob mentioned you in #general"
    assert received["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    text = part(received, "text/plain")
    assert "@alice can you review the draft?" in text and "no mention here" not in text
    assert part(received, "text/html").count("Read it in the chat") == 1
    message_url = f"{server.origin}/rooms/general/?at=1"
    assert f"Read it: {message_url}" in text
    unsubscribe_url = re.search(r"Stop these emails: (\S+)", text)[1]
    assert unsubscribe_url.startswith(f"{server.origin}/unsubscribe/")
    assert await database_sync_to_async(EmailNotice.objects.filter(emailed=True).count)() == 1

    alice = await browsers.new_page(user)
    await alice.goto(message_url)
    mentioned = alice.locator("#messages li.message[data-seq='1']")
    await expect(mentioned).to_have_class(re.compile(r"\bmentions-me\b"))
    await expect(mentioned.locator(".body")).to_contain_text("can you review the draft?")

    await alice.goto(unsubscribe_url)
    await alice.get_by_role("button", name="Stop the emails").click()
    await expect(alice.get_by_role("status")).to_contain_text("gets no more notification emails")
    settings = await database_sync_to_async(NotificationSettings.objects.get)(user=user)
    assert settings.email_notifications is False
    assert len(smtp_server.emails()) == 1
