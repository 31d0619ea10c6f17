"""A message's Markdown source becomes the HTML every path serves: rendered once per save or edit, never per delivery.

CommonMark (markdown-it-py) with raw HTML off, then sanitized (nh3) with an
allow-list of tags, so nothing a sender writes can run or load in a reader's
page. Only http, https and mailto links survive; images become links, so no
message makes a reader's browser fetch a URL (docs/protocol.md, "Markdown").
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterator, Sequence
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

ALLOWED_TAGS = {"p", "br", "em", "strong", "s", "code", "pre", "ul", "ol", "li", "blockquote", "a", "span"}
ALLOWED_ATTRIBUTES = {"a": {"href", "title"}, "ol": {"start"}, "code": {"class"}, "span": {"class", "data-mention"}}
# A mention's span: the only span, and the only class of the site's own a message may carry.
MENTION_CLASS = "mention"
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
    """A fenced block's language class only ("language-python"), and a mention's; no other class of the site's own."""
    if tag == "code" and attribute == "class":
        return value if value.startswith("language-") and value[9:].replace("-", "").isalnum() else None
    if tag == "span" and attribute == "class":
        return value if value == MENTION_CLASS else None
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


# "@name" after a space, a line's start or punctuation, never inside a word or an address
# ("bob@example.com"). A name is what Django allows but "@", and does not end in "." or "-",
# so that "@alice." at a sentence's end mentions alice.
_MENTION = re.compile(r"(?<![\w@.+-])@([\w.+-]*[\w+])")


def render(body: str, mentionable: Callable[[list[str]], Collection[str]] | None = None) -> str:
    """Return the sanitized HTML of a message body ("" for an empty one: a deleted message).

    `mentionable` is given the names written as "@name" (outside code and
    links, in order, once each) and answers which of them mention someone:
    those become `<span class="mention" data-mention="name">@name</span>`.
    """
    if not body:
        return ""
    if _PLAIN.fullmatch(body):
        return f"<p>{body}</p>"
    if mentionable is None or "@" not in body:
        return _cleaner.clean(_parser.render(body)).strip()
    env: dict[str, Any] = {}
    tokens = _parser.parse(body, env)
    candidates = list(dict.fromkeys(match[1] for text in _prose(tokens) for match in _MENTION.finditer(text.content)))
    names = set(mentionable(candidates)) if candidates else set()
    if names:
        _mark_mentions(tokens, names)
    return _cleaner.clean(_parser.renderer.render(tokens, _parser.options, env)).strip()


def _prose(tokens: list[Token]) -> Iterator[Token]:
    """The text tokens a mention may be in: not code (its own token type), not a link's text."""
    for block in tokens:
        in_link = 0
        for token in block.children or []:
            in_link += {"link_open": 1, "link_close": -1}.get(token.type, 0)
            if token.type == "text" and not in_link:
                yield token


def _mark_mentions(tokens: list[Token], names: set[str]) -> None:
    for text in list(_prose(tokens)):
        pieces, start = [], 0
        for match in _MENTION.finditer(text.content):
            if match[1] in names:
                pieces += [text.content[start : match.start()], _mention_span(match[1])]
                start = match.end()
        if not pieces:
            continue
        # The text token becomes the HTML of its pieces; the text around the spans escaped as text is.
        text.type = "html_inline"
        text.content = "".join(
            piece if index % 2 else _escape_text(piece) for index, piece in enumerate([*pieces, text.content[start:]])
        )


def _mention_span(name: str) -> str:
    return f'<span class="{MENTION_CLASS}" data-mention="{_escape_attribute(name)}">@{_escape_text(name)}</span>'


def _escape_text(value: str) -> str:
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
