"""Measure what rendering a message's Markdown costs, per save, for each kind of body.

python manage.py renderbench [--messages 2000]

CPU time (process time) of chat.markdown.render, which runs once per save
or edit: never per delivery. Plain text takes a shortcut past the parser.
"""

from __future__ import annotations

import json
import time

from django.core.management.base import BaseCommand

from bench.report import LOOP_STEPS, python_loop_ms
from chat import markdown

BODIES = {
    "plain": "Deploy went fine, thanks everyone. Lunch at noon?",
    "markdown": "**Deploy** done: see https://example.com/runs/42 and run `make test` before _merging_.",
    "code block": "Try this:\n```python\nfor room in rooms:\n    print(room.slug)\n```\n- then *restart*",
}


class Command(BaseCommand):
    help = "Time chat.markdown.render per message for plain text, inline Markdown and a code block."
    requires_system_checks = []

    def add_arguments(self, parser) -> None:
        parser.add_argument("--messages", type=int, default=2000, help="renders of each kind (2000)")

    def handle(self, *args, messages: int, **options):
        loop_ms = python_loop_ms()
        self.stdout.write(f"machine: a {LOOP_STEPS:,}-step Python loop takes {loop_ms:g} ms")
        result: dict[str, float] = {"python_loop_ms": loop_ms}
        for kind, body in BODIES.items():
            markdown.render(body)  # warm
            started = time.process_time()
            for _ in range(messages):
                markdown.render(body)
            result[f"{kind}_us"] = round((time.process_time() - started) / messages * 1e6, 1)
        self.stdout.write(json.dumps(result, indent=2))
