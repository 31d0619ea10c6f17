"""Take the screenshots in this folder: the room list and a room, desktop and mobile, light and dark.

    .venv/bin/python docs/screenshots/make.py

Starts the site (daphne, DEBUG off, a scratch SQLite database under var/,
the Redis layer under its own prefix) with a short conversation in it, and
drives Debian's Chromium with Playwright.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

DATABASE = ROOT / "var" / "screenshots.sqlite3"
ENV = {
    **os.environ,
    "DJANGO_SETTINGS_MODULE": "chatsite.settings",
    "DATABASE_URL": f"sqlite:///{DATABASE}",
    "SECRET_KEY": "screenshots-only",
    "DEBUG": "0",
    "ALLOWED_HOSTS": "127.0.0.1,localhost",
    "CHANNEL_LAYER_PREFIX": "screenshots",
}
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip
CONVERSATION = [
    ("maya", "Morning! Is the release still on for today?"),
    ("maya", "I saw the migration finished overnight."),
    ("theo", "Yes, 14:00 UTC. Checklist is here: https://example.com/release/2026-11"),
    ("ines", "I'll watch the dashboards while it rolls out."),
    ("theo", "Great, thanks Ines!"),
    ("maya", "I can take the changelog."),
    ("theo", "Perfect. Let's do a quick sync at 13:30?"),
]
SEED = """
from django.contrib.auth import get_user_model
from chat import services
User = get_user_model()
users = {name: User.objects.create_user(name, password="screenshots-" + name) for name in ("maya", "theo", "ines")}
team = services.room_create(slug="release", name="Release", topic="Shipping 2026.11 together", created_by=users["theo"])
design = services.room_create(slug="design", name="Design", topic="Pixels and feelings", created_by=users["ines"])
services.room_create(slug="ops", name="Ops", topic="On call", is_private=True, created_by=users["maya"])
services.room_join(room=design, user=users["maya"])
for name, body in CONVERSATION:
    services.room_join(room=team, user=users[name])
    services.message_create(room=team, author=users[name], body=body)
services.message_create(room=design, author=users["ines"], body="New icons are up for review.")
"""


def main() -> None:
    os.environ.update(ENV)
    import django
    from playwright.sync_api import sync_playwright

    django.setup()

    from bench.serverprocess import ServerProcess

    DATABASE.unlink(missing_ok=True)
    manage = [sys.executable, "manage.py"]
    for command in (["migrate", "-v0"], ["collectstatic", "--noinput", "-v0"], ["seeddemo"]):
        subprocess.run(manage + command, cwd=ROOT, env=ENV, check=True)
    script = f"CONVERSATION = {CONVERSATION!r}\n{SEED}"
    subprocess.run(manage + ["shell", "-c", script], cwd=ROOT, env=ENV, check=True, capture_output=True)

    log = Path(tempfile.gettempdir()) / "screenshots-daphne.log"
    server = ServerProcess("screenshots", "daphne", "chatsite.asgi:application", ENV, log)
    server.spawn()
    try:
        server.wait_ready(20)
        base = server.origin
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            theo = sign_in(browser.new_context(), base, "theo")  # online, and typing now and then
            theo.goto(f"{base}/rooms/release/")
            theo.wait_for_selector("#connection-state[data-state=live]")
            for scheme in ("light", "dark"):
                for device, viewport in (("desktop", (1280, 800)), ("mobile", (390, 844))):
                    context = browser.new_context(
                        viewport={"width": viewport[0], "height": viewport[1]},
                        color_scheme=scheme,
                        device_scale_factor=1 if device == "desktop" else 2,
                    )
                    page = sign_in(context, base, "maya")
                    page.screenshot(path=OUT / f"room-list-{device}-{scheme}.png")
                    page.goto(f"{base}/rooms/release/")
                    page.wait_for_selector("#connection-state[data-state=live]")
                    page.fill("#message-input", "On it")
                    theo.fill("#message-input", "")
                    theo.wait_for_timeout(2100)  # the server relays one typing signal per user per 2 s
                    theo.type("#message-input", "See you")
                    page.wait_for_selector("#typing:has-text('theo is typing')")
                    page.screenshot(path=OUT / f"room-{device}-{scheme}.png")
                    context.close()
            browser.close()
    finally:
        server.stop()
    print(f"Screenshots in {OUT}")


def sign_in(context, base: str, username: str):
    page = context.new_page()
    page.goto(f"{base}/accounts/login/")
    page.fill("#id_username", username)
    page.fill("#id_password", f"screenshots-{username}")
    page.click("button[type=submit]")
    page.wait_for_url(f"{base}/")
    return page


if __name__ == "__main__":
    main()
