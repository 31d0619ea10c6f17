"""Hostile text in every place a person can put it stays text: server-rendered and JS-rendered, in Chromium."""

from __future__ import annotations

import pytest
from channels.db import database_sync_to_async
from django.contrib.auth import get_user_model
from django.utils.html import escape
from playwright.async_api import Page, expect

from chat import services
from tests.e2e.helpers import expect_live, open_room, send

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio(loop_scope="session"), pytest.mark.slow]


def payload(where: str) -> str:
    return f'<img src=x onerror="window.__xss=\'{where}\'"><script>window.__xss="{where}"</script>{where}'


@database_sync_to_async
def hostile_room_and_person(user):
    # The sign-up form allows only letters, digits and @.+-_ in names; an account
    # made another way (the admin, a future SSO) must not be able to inject either.
    mallory = get_user_model().objects.create_user(payload("username"), password="pw-mallory-123")
    room = services.room_create(slug="xss", name=payload("room name"), topic=payload("topic"), created_by=user)
    services.room_join(room=room, user=mallory)
    services.message_create(room=room, author=mallory, body=payload("rendered body"))
    return mallory, room


async def assert_inert(page: Page, *texts: str) -> None:
    assert await page.evaluate("window.__xss") is None, "a hostile script ran"
    injected = await page.locator("img[src=x], script:not([src]):not([type='application/json'])").count()
    assert injected == 0, "hostile markup became elements"
    content = await page.locator("body").inner_text()
    for text in texts:
        assert payload(text) in content, f"{text!r} is not shown literally"


async def assert_shown_as_text(page: Page, shown: dict[str, str]) -> None:
    """Each element (by selector) shows exactly its hostile text, tags and all, as text."""
    for selector, where in shown.items():
        await expect(page.locator(selector)).to_have_text([payload(where)])


def assert_served_escaped(html: str, *texts: str) -> None:
    """The server sent each hostile text HTML-escaped, and never raw."""
    for text in texts:
        assert escape(payload(text)) in html, f"{text!r} is not in the page HTML-escaped"
        assert payload(text) not in html, f"{text!r} is in the page raw"


async def test_hostile_names_topics_and_bodies_are_inert_on_every_page(server, browsers, user):
    mallory, room = await hostile_room_and_person(user)
    alice = await browsers.new_page(user)
    response = await alice.goto(f"{server.origin}/")
    assert_served_escaped(await response.text(), "room name", "topic")
    await assert_inert(alice, "room name", "topic")
    await assert_shown_as_text(alice, {".room-name": "room name", ".room-topic": "topic"})

    response = await alice.goto(f"{server.origin}/rooms/{room.slug}/")
    assert_served_escaped(await response.text(), "room name", "topic", "username", "rendered body")
    await expect_live(alice)
    await assert_inert(alice, "room name", "topic", "username", "rendered body")
    await expect(alice).to_have_title(f"{payload('room name')} · Chat")
    rendered = "#messages li.message[data-seq='1']"
    await assert_shown_as_text(
        alice,
        {
            "#room-title": "room name",
            ".room-topic": "topic",
            f"{rendered} .author": "username",
            f"{rendered} .body": "rendered body",
        },
    )

    intruder = await browsers.new_page(mallory)
    await open_room(intruder, server, room.slug)
    await expect(alice.locator("#online")).to_contain_text(payload("username"))  # presence, rendered by room.js
    await intruder.locator("#message-input").press_sequentially("x")
    await expect(alice.locator("#typing")).to_contain_text(payload("username"))  # typing, rendered by room.js
    await intruder.locator("#message-input").fill("")  # the "x" typed above is not part of the message
    await send(intruder, payload("live body"))
    await expect(alice.locator("#messages li.message").last).to_contain_text(payload("live body"))
    await expect_live(alice)
    await assert_inert(alice, "room name", "topic", "username", "rendered body", "live body")
    live = "#messages li.message[data-seq='2']"  # rendered by room.js
    await assert_shown_as_text(alice, {f"{live} .author": "username", f"{live} .body": "live body"})


# Markdown is rendered to HTML (chat/markdown.py): none of these may become a
# script, an element that runs one, or a javascript: link. Each is shown as
# the text it was, in a code span or block where it was written in one.
MARKDOWN_ATTACKS = {
    "link": ("[x](javascript:alert('link'))", ".body", "[x](javascript:alert('link'))"),
    "image": ("![x](javascript:alert('image'))", ".body", "![x](javascript:alert('image'))"),
    "raw img": ("<img src=x onerror=alert('img')>", ".body", "<img src=x onerror=alert('img')>"),
    "raw svg": ("<svg onload=alert('svg')>", ".body", "<svg onload=alert('svg')>"),
    "code span": ("`<img src=x onerror=alert('span')>`", ".body code", "<img src=x onerror=alert('span')>"),
    "code block": (
        "```html\n<script>alert('block')</script><svg onload=alert('block')>\n```",
        ".body pre code",
        "<script>alert('block')</script><svg onload=alert('block')>",
    ),
    "link text": (
        "[<img src=x onerror=alert('text')>](https://example.com/)",
        ".body a",
        "<img src=x onerror=alert('text')>",
    ),
}


async def assert_markdown_inert(page: Page, who: str, dialogs: list[str]) -> None:
    for seq, (_, selector, text) in enumerate(MARKDOWN_ATTACKS.values(), start=1):
        await expect(page.locator(f"#messages li.message[data-seq='{seq}'] {selector}")).to_have_text(text)
    injected = await page.locator(
        "#messages img, #messages svg, #messages script, #messages [onerror], #messages [onload]"
    ).count()
    assert injected == 0, f"{who}: hostile Markdown became elements"
    # In the bodies: the page's own links (an author's name opens a direct conversation) are not Markdown.
    bad_links = await page.locator(
        "#messages .body a[href^='javascript' i], #messages .body a:not([href^='https://'])"
    ).count()
    assert bad_links == 0, f"{who}: a link that is not https"
    assert await page.locator("#messages a:not(.body a):not(a.author)").count() == 0, f"{who}: a link outside a body"
    assert dialogs == [], f"{who}: a hostile script ran: {dialogs}"
    # The only link is the one written as one, opened away from the page.
    link = page.locator("#messages .body a")
    await expect(link).to_have_count(1)
    await expect(link).to_have_attribute("rel", "nofollow noopener noreferrer ugc")
    await expect(link).to_have_attribute("target", "_blank")


async def test_hostile_markdown_is_inert_for_the_sender_live_and_server_rendered(
    server, browsers, user, other_user, room
):
    pages = {}
    dialogs: dict[str, list[str]] = {}
    for who, person in (("alice", user), ("bob", other_user)):
        page = await browsers.new_page(person)
        dialogs[who] = []
        page.on("dialog", lambda dialog, seen=dialogs[who]: seen.append(dialog.message))
        await open_room(page, server, room.slug)
        pages[who] = page
    for body, _, _ in MARKDOWN_ATTACKS.values():
        await send(pages["alice"], body)

    await assert_markdown_inert(pages["alice"], "alice (her own)", dialogs["alice"])
    await assert_markdown_inert(pages["bob"], "bob (live)", dialogs["bob"])
    await pages["bob"].reload()
    await expect_live(pages["bob"])
    await assert_markdown_inert(pages["bob"], "bob (after a reload)", dialogs["bob"])

    # The edit box holds the source as typed, not HTML.
    item = pages["alice"].locator("#messages li.message[data-seq='3']")
    await item.hover()
    await item.get_by_role("button", name="Edit this message").click()
    await expect(item.locator(".edit-form textarea")).to_have_value(MARKDOWN_ATTACKS["raw img"][0])
    assert dialogs["alice"] == [] and await pages["alice"].locator("#messages img").count() == 0


UPLOAD_AND_SEND = """async ([name, content, type]) => {
  const csrf = document.querySelector("input[name=csrfmiddlewaretoken]").value;
  const form = new FormData();
  form.append("file", new File([content], name, { type }));
  const uploaded = await (await fetch("/api/rooms/general/files/", {
    method: "POST", body: form, headers: { "X-CSRFToken": csrf } })).json();
  await fetch("/api/rooms/general/messages", {
    method: "POST", headers: { "X-CSRFToken": csrf, "Content-Type": "application/json" },
    body: JSON.stringify({ body: "", attachments: [uploaded.id] }) });
  return uploaded;
}"""


async def test_an_svg_with_script_and_html_named_png_only_download_and_never_run(
    server, browsers, user, other_user, room
):
    dialogs: list[str] = []
    alice = await browsers.new_page(user)
    bob = await browsers.new_page(other_user)
    for page in (alice, bob):
        page.on("dialog", lambda dialog: dialogs.append(dialog.message))
    await open_room(alice, server, room.slug)
    await open_room(bob, server, room.slug)
    svg = await alice.evaluate(
        UPLOAD_AND_SEND,
        ["pic.svg", '<svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)"><script>alert(2)</script></svg>',
         "image/svg+xml"],
    )  # fmt: skip
    html = await alice.evaluate(
        UPLOAD_AND_SEND, ["cat.png", "<html><body><script>alert(3)</script></body></html>", "image/png"]
    )
    assert (svg["content_type"], svg["thumbnail_url"]) == ("image/svg+xml", None)
    assert (html["content_type"], html["thumbnail_url"]) == ("text/html", None)
    # Shown as download links, not images, to the sender and the reader alike.
    for page in (alice, bob):
        await expect(page.locator("#messages .attachment-file")).to_have_count(2)
        await expect(page.locator("#messages .attachments img")).to_have_count(0)
    for uploaded in (svg, html):
        async with bob.expect_download() as downloading:
            await bob.locator(f'#messages a.attachment-file[href="{uploaded["url"]}"]').click()
        assert (await downloading.value).suggested_filename == uploaded["name"]
        served = await bob.request.get(f"{server.origin}{uploaded['url']}")
        assert served.headers["content-disposition"].startswith("attachment")
        assert served.headers["content-security-policy"] == "sandbox"
        assert served.headers["x-content-type-options"] == "nosniff"
    await expect(bob.locator("#messages .attachment-file").first).to_be_visible()
    assert dialogs == []
