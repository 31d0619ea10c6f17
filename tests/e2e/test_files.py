"""Files in messages, in real browsers: pasted, dropped and chosen uploads, thumbnails and the lightbox,
refusals with Retry, private rooms' files, hostile names."""

from __future__ import annotations

import asyncio
import json
import re

import pytest
from playwright.async_api import JSHandle, Page, expect

from tests.e2e.helpers import expect_live, losing_sends, open_room
from tests.e2e.test_conversation import eventually
from tests.e2e.test_pages import serious_violations

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio(loop_scope="session"), pytest.mark.slow]

# A DataTransfer holding Files made in the page: {name, type, and one of png: [w, h] (drawn on a
# canvas), text, bytes: [...], zeros: n (that many bytes; or "over" for one more than the page's limit)}.
MAKE_FILES = """async (specs) => {
  const limit = JSON.parse(document.getElementById("chat-protocol").textContent).limits.uploadMaxBytes;
  const data = new DataTransfer();
  for (const spec of specs) {
    let part;
    if (spec.png) {
      const canvas = document.createElement("canvas");
      [canvas.width, canvas.height] = spec.png;
      const context = canvas.getContext("2d");
      context.fillStyle = "#e07a1f";
      context.fillRect(0, 0, canvas.width, canvas.height);
      context.fillStyle = "#2563eb";
      context.fillRect(canvas.width / 4, canvas.height / 4, canvas.width / 2, canvas.height / 2);
      part = await new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
    } else if (spec.zeros != null) {
      part = new Uint8Array(spec.zeros === "over" ? limit + 1 : spec.zeros);
    } else if (spec.bytes) {
      part = Uint8Array.from(spec.bytes);
    } else {
      part = spec.text;
    }
    data.items.add(new File([part], spec.name, { type: spec.type || "" }));
  }
  return data;
}"""

PASTE = """(data) => {
  const event = new ClipboardEvent("paste", { clipboardData: data, bubbles: true, cancelable: true });
  document.getElementById("message-input").dispatchEvent(event);
  return event.defaultPrevented;
}"""

# What a file input does when files are chosen in the system's dialog.
CHOOSE = """(data) => {
  const input = document.querySelector("#composer input[type=file]");
  input.files = data.files;
  input.dispatchEvent(new Event("change", { bubbles: true }));
}"""

HOSTILE_NAME = "<img src=x onerror=alert(1)>.txt"
# Not with a '"': browsers send that as %22 in a multipart file name (the HTML standard's escaping).
HOSTILE_IMAGE_NAME = "'><img src=x onerror=alert(2)>.png"
ELF = [0x7F, 0x45, 0x4C, 0x46, 2, 1, 1, 0] + [0] * 56


async def files(page: Page, *specs: dict) -> JSHandle:
    return await page.evaluate_handle(MAKE_FILES, list(specs))


def message(page: Page, seq: int):
    return page.locator(f"#messages li.message[data-seq='{seq}']")


def chips(page: Page):
    return page.locator("#composer .upload-chip")


def watch_uploads(page: Page) -> list[str]:
    """The URLs of the page's upload requests, as they go."""
    seen: list[str] = []
    page.on(
        "request",
        lambda request: seen.append(request.url) if request.method == "POST" and "/files/" in request.url else None,
    )
    return seen


def watch_dialogs(page: Page) -> list[str]:
    seen: list[str] = []
    page.on("dialog", lambda dialog: seen.append(dialog.message))
    return seen


async def expect_loaded(image) -> None:
    """Wait until an <img> has loaded a real picture (its naturalWidth > 0)."""
    await image.page.wait_for_function(
        "image => image.complete && image.naturalWidth > 0", arg=await image.element_handle()
    )


async def send_files_only(page: Page) -> None:
    """Press Enter in the empty box: the files go alone; wait until the server has the message."""
    await page.locator("#message-input").press("Enter")
    await expect(page.locator("#messages li.message.pending")).to_have_count(0)
    await expect(chips(page)).to_have_count(0)


async def test_a_pasted_image_shows_as_a_thumbnail_live_and_opens_full_size_in_the_lightbox(
    server, browsers, user, other_user, room
):
    alice = await browsers.new_page(user)
    bob = await browsers.new_page(other_user)
    await open_room(alice, server, room.slug)
    await open_room(bob, server, room.slug)

    pasted = await alice.evaluate(
        PASTE, await files(alice, {"name": "cat.png", "type": "image/png", "png": [640, 400]})
    )
    assert pasted, "pasting a file into the box should upload it, not paste text"
    chip = chips(alice)
    await expect(chip).to_have_count(1)
    await expect(chip).to_have_attribute("data-state", "done")
    await expect(chip.locator(".upload-name")).to_have_text("cat.png")
    await expect_loaded(chip.locator(".upload-preview img"))

    # Enter in an empty box sends the image alone; the chip goes once the server has it.
    await send_files_only(alice)
    for page in (alice, bob):
        item = message(page, 1)
        await expect(item.locator(".body")).to_have_text("")
        link = item.locator(".attachments a.attachment-image")
        await expect(link).to_have_attribute("data-name", "cat.png")
        await expect(link).to_have_attribute("href", re.compile(r"^/files/[^/]+/cat\.png$"))
        thumbnail = link.locator("img")
        await expect(thumbnail).to_have_attribute("alt", "cat.png")
        await expect(thumbnail).to_have_attribute("src", re.compile(r"^/files/[^/]+/thumbnail/?$"))
        await expect_loaded(thumbnail)
        box = await thumbnail.bounding_box()
        assert box["width"] <= 320 and box["height"] <= 240, f"thumbnails are at most 320×240: {box}"

    # bob clicks it: the full image over the page, its name; Esc closes and focus goes back.
    link = message(bob, 1).locator("a.attachment-image")
    await link.click()
    lightbox = bob.get_by_role("dialog", name="cat.png")
    await expect(lightbox).to_be_visible()
    full = lightbox.locator("img.lightbox-image")
    await expect(full).to_have_attribute("src", re.compile(r"/files/[^/]+/cat\.png$"))
    await expect_loaded(full)
    assert await full.evaluate("image => [image.naturalWidth, image.naturalHeight]") == [640, 400]
    await expect(lightbox.get_by_role("button", name="Close")).to_be_focused()
    await bob.keyboard.press("Escape")
    await expect(lightbox).to_be_hidden()
    await expect(link).to_be_focused()
    # The Close button closes it too.
    await link.click()
    await expect(lightbox).to_be_visible()
    await lightbox.get_by_role("button", name="Close").click()
    await expect(lightbox).to_be_hidden()


async def test_a_private_rooms_file_is_served_to_its_members_only(
    server, browsers, user, other_user, third_user, private_room
):
    alice = await browsers.new_page(user)
    await open_room(alice, server, private_room.slug)
    # Through the 📎 button and the system's file dialog.
    async with alice.expect_file_chooser() as chosen:
        await alice.get_by_role("button", name="Attach files").click()
    chooser = await chosen.value
    assert chooser.is_multiple()
    await chooser.set_files([{"name": "plan.txt", "mimeType": "text/plain", "buffer": b"meet at the old mill"}])
    await expect(chips(alice)).to_have_attribute("data-state", "done")
    await alice.locator("#message-input").fill("the plan")
    await alice.locator("#message-input").press("Enter")
    await expect(alice.locator("#messages li.message.pending")).to_have_count(0)
    link = message(alice, 1).locator("a.attachment-file")
    await expect(link.locator(".attachment-name")).to_have_text("plan.txt")
    url = server.origin + await link.get_attribute("href")

    bob = await browsers.new_page(other_user)  # a member
    answer = await bob.request.get(url)
    assert answer.status == 200 and await answer.body() == b"meet at the old mill"
    carol = await browsers.new_page(third_user)  # not a member: as if there were no such file
    answer = await carol.request.get(url)
    assert answer.status == 404
    assert b"meet at the old mill" not in await answer.body()


async def test_a_file_over_the_limit_is_refused_in_the_page_without_uploading(server, browsers, user, room):
    alice = await browsers.new_page(user)
    uploads = watch_uploads(alice)
    await open_room(alice, server, room.slug)

    await alice.evaluate(CHOOSE, await files(alice, {"name": "huge.bin", "zeros": "over"}))
    chip = chips(alice)
    await expect(chip).to_have_attribute("data-state", "failed")
    await expect(chip.locator(".upload-status")).to_have_text("Too large: files can be at most 10 MB.")
    await expect(chip.get_by_role("button", name="Retry uploading huge.bin")).to_be_hidden()  # it would fail again
    # Nothing can be sent while it is there; it says why.
    await alice.locator("#message-input").fill("see the attached")
    await alice.locator("#message-input").press("Enter")
    await expect(alice.locator("#composer-hint")).to_have_text(
        "A file could not be uploaded: retry it or remove it, then send."
    )
    await expect(alice.locator("#messages li.message")).to_have_count(0)
    # Removed, the message goes without it.
    await chip.get_by_role("button", name="Remove huge.bin").click()
    await expect(chips(alice)).to_have_count(0)
    await expect(alice.locator("#message-input")).to_be_focused()
    await alice.locator("#message-input").press("Enter")
    await expect(message(alice, 1).locator(".body")).to_have_text("see the attached")
    await expect(message(alice, 1).locator(".attachments")).to_have_count(0)
    assert uploads == []


async def test_a_refused_upload_shows_the_servers_reason_and_retry_tries_again(server, browsers, user, room):
    alice = await browsers.new_page(user)
    uploads = watch_uploads(alice)
    await open_room(alice, server, room.slug)

    await alice.evaluate(CHOOSE, await files(alice, {"name": "tool", "bytes": ELF}))
    chip = chips(alice)
    await expect(chip).to_have_attribute("data-state", "failed")
    await expect(chip.locator(".upload-status")).to_contain_text("This type of file is not allowed")
    retry = chip.get_by_role("button", name="Retry uploading tool")
    await expect(retry).to_be_visible()
    assert len(uploads) == 1

    async with alice.expect_response(lambda response: "/files/" in response.url) as answered:
        await retry.click()
    assert (await answered.value).status == 415
    await expect(chip).to_have_attribute("data-state", "failed")
    await expect(chip.locator(".upload-status")).to_contain_text("This type of file is not allowed")
    await expect(retry).to_be_visible()
    assert len(uploads) == 2


async def test_a_dropped_file_goes_as_a_download_link_with_its_name_and_size(server, browsers, user, other_user, room):
    alice = await browsers.new_page(user)
    bob = await browsers.new_page(other_user)
    await open_room(alice, server, room.slug)
    await open_room(bob, server, room.slug)

    dropped = await files(alice, {"name": "notes.txt", "type": "text/plain", "text": "milk, eggs, flour\n"})
    pane = alice.locator("#messages-pane")
    target = alice.locator(".drop-target")
    await expect(target).to_be_hidden()
    await pane.dispatch_event("dragenter", {"dataTransfer": dropped})
    await expect(target).to_be_visible()
    await expect(target).to_have_text("Drop files to attach them")
    await pane.dispatch_event("dragover", {"dataTransfer": dropped})
    await pane.dispatch_event("drop", {"dataTransfer": dropped})
    await expect(target).to_be_hidden()
    await expect(chips(alice)).to_have_attribute("data-state", "done")
    await expect(chips(alice).locator(".upload-size")).to_have_text("18 bytes")

    await send_files_only(alice)
    link = message(bob, 1).locator(".attachments a.attachment-file")
    await expect(link.locator(".attachment-name")).to_have_text("notes.txt")
    await expect(link.locator(".attachment-size")).to_have_text("18 bytes")
    await expect(link).to_have_attribute("download", "")
    answer = await bob.request.get(server.origin + await link.get_attribute("href"))
    assert answer.status == 200 and await answer.text() == "milk, eggs, flour\n"


async def test_hostile_file_names_and_contents_stay_inert_for_sender_and_reader(
    server, browsers, user, other_user, room
):
    alice = await browsers.new_page(user)
    bob = await browsers.new_page(other_user)
    dialogs = {"alice": watch_dialogs(alice), "bob": watch_dialogs(bob)}
    await open_room(alice, server, room.slug)
    await open_room(bob, server, room.slug)

    chosen = await files(
        alice,
        {"name": HOSTILE_NAME, "type": "text/plain", "text": "just text"},
        # HTML that says it is a PNG: the server takes it by its content, as a download, never inline.
        {"name": "fake.png", "type": "image/png", "text": "<html><script>alert(3)</script></html>"},
        {"name": HOSTILE_IMAGE_NAME, "type": "image/png", "png": [60, 40]},
    )
    await alice.evaluate(CHOOSE, chosen)
    await expect(chips(alice)).to_have_count(3)
    for number in range(3):
        await expect(chips(alice).nth(number)).to_have_attribute("data-state", "done")
    await expect(chips(alice).locator(".upload-name")).to_have_text([HOSTILE_NAME, "fake.png", HOSTILE_IMAGE_NAME])
    await send_files_only(alice)

    for who, page in (("alice", alice), ("bob", bob)):
        item = message(page, 1)
        await expect(item.locator("a.attachment-file .attachment-name")).to_have_text([HOSTILE_NAME, "fake.png"])
        image = item.locator("a.attachment-image")
        await expect(image).to_have_attribute("data-name", HOSTILE_IMAGE_NAME)
        await expect(image.locator("img")).to_have_attribute("alt", HOSTILE_IMAGE_NAME)
        await expect_loaded(image.locator("img"))
        # The only image is the real one's thumbnail: no name became markup.
        assert await page.locator("#messages img").count() == 1, who
        assert await page.locator("img[src='x']").count() == 0, who
        await image.click()
        lightbox = page.get_by_role("dialog", name=HOSTILE_IMAGE_NAME)
        await expect(lightbox.locator(".lightbox-name")).to_have_text(HOSTILE_IMAGE_NAME)
        await page.keyboard.press("Escape")
        await expect(lightbox).to_be_hidden()
        assert dialogs[who] == [], f"{who}: a file name ran as script"

    fake = message(bob, 1).locator("a.attachment-file").nth(1)
    answer = await bob.request.get(server.origin + await fake.get_attribute("href"))
    assert answer.status == 200
    assert answer.headers["content-disposition"].startswith("attachment"), answer.headers
    assert "sandbox" in answer.headers["content-security-policy"], answer.headers  # opened anyway: no script runs


async def test_waiting_uploads_delay_the_send_and_chips_have_no_serious_accessibility_violations(
    server, browsers, user, room
):
    alice = await browsers.new_page(user)
    await open_room(alice, server, room.slug)
    # Uploads held until the test lets them go.
    held = []
    await alice.route("**/api/rooms/*/files/", lambda route: held.append(route))
    await alice.evaluate(PASTE, await files(alice, {"name": "chart.png", "type": "image/png", "png": [300, 200]}))
    await expect(chips(alice)).to_have_attribute("data-state", "uploading")
    await expect(chips(alice).locator("progress")).to_be_visible()
    await alice.locator("#message-input").fill("the chart")
    await alice.locator("#message-input").press("Enter")
    await expect(alice.locator("#composer-hint")).to_have_text("Waiting for uploads…")
    await expect(alice.locator("#messages li.message")).to_have_count(0)
    await alice.evaluate(CHOOSE, await files(alice, {"name": "huge.bin", "zeros": "over"}))  # and a failed chip

    violations = await serious_violations(alice)
    assert violations == [], f"axe with upload chips:\n{json.dumps(violations, indent=2)}"

    # The big one removed and the upload let through, the message goes by itself, with the image.
    await chips(alice).nth(1).get_by_role("button", name="Remove huge.bin").click()
    for route in held:
        await route.continue_()
    await expect(message(alice, 1).locator(".body")).to_have_text("the chart")
    await expect(message(alice, 1).locator("a.attachment-image")).to_have_attribute("data-name", "chart.png")
    await expect(chips(alice)).to_have_count(0)
    await message(alice, 1).locator("a.attachment-image").click()
    await expect(alice.get_by_role("dialog", name="chart.png")).to_be_visible()
    violations = await serious_violations(alice)
    assert violations == [], f"axe with the lightbox open:\n{json.dumps(violations, indent=2)}"


async def test_a_send_with_files_lost_on_the_way_goes_again_with_them_after_the_reconnect(
    server, browsers, user, other_user, room
):
    alice = await browsers.new_page(user)
    sends: list[dict] = []
    ready = asyncio.Event()
    closing: list[asyncio.Future] = []
    await alice.route_web_socket(re.compile(r"/ws/rooms/"), losing_sends(sends, ready, closing))
    await open_room(alice, server, room.slug)
    bob = await browsers.new_page(other_user)
    await open_room(bob, server, room.slug)
    await alice.evaluate(CHOOSE, await files(alice, {"name": "a.txt", "text": "one"}, {"name": "b.txt", "text": "two"}))
    for number in range(2):
        await expect(chips(alice).nth(number)).to_have_attribute("data-state", "done")
    await alice.locator("#message-input").press("Enter")
    await eventually(lambda: len(sends) > 0)
    # Not acknowledged: the chips stay, sending, without their remove buttons.
    await expect(chips(alice).locator(".upload-status")).to_have_text(["Sending…", "Sending…"])
    await expect(chips(alice).get_by_role("button", name=re.compile("^Remove"))).to_have_count(0)
    ready.set()
    await expect_live(alice, timeout=20_000)
    await expect(message(bob, 1).locator(".attachment-name")).to_have_text(["a.txt", "b.txt"])
    await expect(chips(alice)).to_have_count(0)
    assert len(sends) >= 2 and len({frame["nonce"] for frame in sends}) == 1, sends
    assert all(frame["attachments"] == sends[0]["attachments"] and len(frame["attachments"]) == 2 for frame in sends), (
        sends
    )


# A message's attachments as comparable data: each element's tag, attributes (in any order) and text.
ATTACHMENTS_SHAPE = """box => ({
  text: box.textContent.replace(/\\s+/g, " ").trim(),
  elements: [...box.querySelectorAll("*")].map((element) => ({
    tag: element.tagName,
    attributes: Object.fromEntries([...element.attributes].map((attribute) => [attribute.name, attribute.value])),
    text: element.children.length ? null : element.textContent,
  })),
})"""


async def test_the_server_renders_attachments_as_the_page_does_and_its_thumbnails_open_too(
    server, browsers, user, other_user, room
):
    alice = await browsers.new_page(user)
    bob = await browsers.new_page(other_user)
    await open_room(alice, server, room.slug)
    await open_room(bob, server, room.slug)
    chosen = await files(
        alice,
        {"name": "map & <route>.png", "type": "image/png", "png": [500, 300]},
        {"name": "kit list.txt", "type": "text/plain", "text": "boots, map, water\n" * 90},
    )
    await alice.evaluate(CHOOSE, chosen)
    for number in range(2):
        await expect(chips(alice).nth(number)).to_have_attribute("data-state", "done")
    await alice.locator("#message-input").fill("for **Saturday**")
    await alice.locator("#message-input").press("Enter")
    box = message(bob, 1).locator(".attachments")
    await expect(box.locator("a")).to_have_count(2)
    live = await box.evaluate(ATTACHMENTS_SHAPE)
    assert live["elements"][0]["attributes"]["data-name"] == "map & <route>.png"
    assert live["elements"][4]["text"] == "1.6\xa0KB"  # as Django's filesizeformat: a no-break space

    await bob.reload()
    await expect_live(bob)
    await expect(box.locator("a")).to_have_count(2)
    assert await box.evaluate(ATTACHMENTS_SHAPE) == live
    # In its place: after the body, before the reactions.
    order = await message(bob, 1).evaluate("item => [...item.children].map((child) => child.className)")
    assert order.index("attachments") == order.index("body") + 1, order
    await expect_loaded(box.locator("img"))
    await box.locator("a.attachment-image").click()
    lightbox = bob.get_by_role("dialog", name="map & <route>.png")
    await expect_loaded(lightbox.locator("img"))
