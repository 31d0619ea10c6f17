"""A message's Markdown source becomes the HTML every path serves: rendered once per save or edit, never per delivery.

CommonMark (markdown-it-py) with raw HTML off, then sanitized (nh3) with an
allow-list of tags, so nothing a sender writes can run or load in a reader's
page. Only http, https and mailto links survive; images become links, so no
message makes a reader's browser fetch a URL (docs/protocol.md, "Markdown").
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import nh3
from markdown_it import MarkdownIt
from markdown_it.token import Token

# What a chat message may use: no headings, tables or horizontal rules (a "#"
# or "---" line in chat is text, as in Slack). Bare web addresses are linked,
# as they were before Markdown.
_parser = (
    MarkdownIt("commonmark", {"html": False, "linkify": True, "breaks": True, "typographer": False})
    .enable(["linkify", "strikethrough"])
    .disable(["heading", "lheading", "hr"])
)
_parser.validateLink = lambda url: url.lower().startswith(("http://", "https://", "mailto:"))  # type: ignore[method-assign]

ALLOWED_TAGS = {"p", "br", "em", "strong", "s", "code", "pre", "ul", "ol", "li", "blockquote", "a"}
ALLOWED_ATTRIBUTES = {"a": {"href", "title"}, "ol": {"start"}, "code": {"class"}}
LINK_REL = "nofollow noopener noreferrer ugc"


def _image_as_link(renderer: Any, tokens: Sequence[Token], index: int, options: Any, env: Any) -> str:
    """`![alt](url)` becomes a link to the image, named by its alt text: nothing loads by itself."""
    token = tokens[index]
    url = _parser.normalizeLink(str(token.attrGet("src") or ""))
    label = renderer.renderInline(token.children or [], options, env)
    if not _parser.validateLink(url):
        return label
    label = label or _escape_attribute(url)
    return f'<a href="{_escape_attribute(url)}">{label}</a>'


def _escape_attribute(value: str) -> str:
    return value.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;").replace(">", "&gt;")


_parser.add_render_rule("image", _image_as_link)


def _language_class_only(tag: str, attribute: str, value: str) -> str | None:
    """A fenced block's language class only ("language-python"), never a class of the site's own."""
    if tag == "code" and attribute == "class":
        return value if value.startswith("language-") and value[9:].replace("-", "").isalnum() else None
    return value


# Made once: a Cleaner keeps its rules compiled, half the cost of nh3.clean() per message.
_cleaner = nh3.Cleaner(
    tags=ALLOWED_TAGS,
    attributes=ALLOWED_ATTRIBUTES,
    url_schemes={"http", "https", "mailto"},
    link_rel=LINK_REL,
    set_tag_attribute_values={"a": {"target": "_blank"}},
    attribute_filter=_language_class_only,
)


# Words, single spaces, and commas, full stops and question marks before a space or at the end,
# starting with a letter: nothing Markdown or link detection acts on ("example.com" has no space
# after its dot), so the HTML is the text in a paragraph. Most chat messages are like this, and
# skip the parser (`manage.py renderbench`, docs/performance.md).
_PLAIN = re.compile(r"[^\W\d_](?:[^\W_]| (?=\S)|[,.?](?= \S))*[.?]?", re.UNICODE)


def render(body: str) -> str:
    """Return the sanitized HTML of a message body ("" for an empty one: a deleted message)."""
    if not body:
        return ""
    if _PLAIN.fullmatch(body):
        return f"<p>{body}</p>"
    return _cleaner.clean(_parser.render(body)).strip()
