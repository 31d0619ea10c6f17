"""How a message body becomes HTML: escaped text, with web links made clickable and nothing else."""

from __future__ import annotations

import re

from django import template
from django.utils.html import escape, format_html
from django.utils.safestring import SafeString, mark_safe

register = template.Library()

# chat/static/chat/room/render.js has the same pattern (setBody): keep the two in step.
URL = re.compile(r"https?://[^\s<>\"']+")
TRAILING = ".,;:!?)]}'\""


@register.filter
def linkify(text: str) -> SafeString:
    parts = []
    position = 0
    for match in URL.finditer(text):
        url = match.group(0).rstrip(TRAILING)
        parts.append(escape(text[position : match.start()]))
        parts.append(format_html('<a href="{}" rel="noopener noreferrer" target="_blank">{}</a>', url, url))
        position = match.start() + len(url)
    parts.append(escape(text[position:]))
    return mark_safe("".join(parts))
