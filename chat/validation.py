"""Checking what clients send: one set of rules, and one set of error codes, for every path.

The WebSocket protocol (chat/protocol.py, chat/consumers.py), the JSON API
(chat/api.py) and the services raise the same `ChatError`s from here, so a
blank body, a bad seq or an oversized message is refused with the same code
whichever way it came in. The API maps codes to HTTP statuses; the socket
sends them in an `error` frame.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import emoji
from django.conf import settings

# The largest seq, change counter or id a client may name (PostgreSQL's bigint).
SEQ_MAX = 2**63 - 1
NONCE_MAX_LENGTH = 64


class ChatError(Exception):
    """A request the site refuses; `code` is the machine-readable reason."""

    def __init__(self, code: str, detail: str, *, retry_after: int | None = None) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        # Seconds until the request may succeed (rate limits).
        self.retry_after = retry_after


def query_int(
    raw: str | None, name: str, *, low: int = 0, high: int = SEQ_MAX, code: str = "invalid_param"
) -> int | None:
    """Return a whole number from a query string (?after=12), None when absent or empty.

    Digits only: no sign, no spaces, no exponent; then it must lie in [low, high].
    """
    if raw is None or raw == "":
        return None
    if not (raw.isascii() and raw.isdigit()) or len(raw) > len(str(high)) or not low <= int(raw) <= high:
        raise ChatError(code, f'"{name}" must be a whole number from {low} to {high}.')
    return int(raw)


def json_int(value: object, name: str, *, low: int = 0, high: int = SEQ_MAX, code: str = "invalid_frame") -> int:
    """Return a whole number given in JSON (an integer, not a boolean, not a string) within [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ChatError(code, f'"{name}" must be a whole number from {low} to {high}.')
    return value


def message_id(value: object) -> int:
    """Return the id of a message a client wants to change."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ChatError("invalid_frame", '"id" must be the id of a message.')
    return value


def required(data: Mapping[str, Any], name: str, example: str) -> Any:
    """Return data[name]; its absence is `missing_<name>`, with an example of what to send."""
    if name not in data:
        raise ChatError(f"missing_{name}", f'"{name}" is missing; send {example}.')
    return data[name]


def storable(text: str) -> bool:
    """True unless the text holds what no database column takes: NUL, or half a UTF-16 surrogate pair.

    JSON can carry both ("\\u0000", "\\ud800"); PostgreSQL refuses the first,
    and neither database can encode the second.
    """
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def message_body(body: object, *, allow_empty: bool = False) -> str:
    """Return the body to store, or raise saying what is wrong with it (`allow_empty`: it carries files)."""
    if not isinstance(body, str):
        raise ChatError("invalid_body", "body must be a string.")
    if not storable(body):
        raise ChatError("invalid_body", "body cannot contain NUL characters or unpaired surrogates.")
    if not body.strip() and not allow_empty:
        raise ChatError("empty_body", "A message needs some text.")
    limit = settings.CHAT_MESSAGE_MAX_LENGTH
    if len(body) > limit:
        raise ChatError("body_too_long", f"A message can be at most {limit} characters; this one has {len(body)}.")
    return body


def nonce(value: object) -> str | None:
    """Return the client's nonce for a send (None when not given)."""
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > NONCE_MAX_LENGTH or not storable(value):
        raise ChatError("invalid_nonce", f"nonce must be a string of at most {NONCE_MAX_LENGTH} characters.")
    return value


def string_field(data: Mapping[str, Any], name: str, *, required: bool = False) -> str:
    """Return a string field of a JSON object ("" when absent and optional)."""
    value = data.get(name, "")
    if not isinstance(value, str) or (required and not value.strip()) or not storable(value):
        raise ChatError("invalid_field", f'"{name}" must be a{" non-empty" if required else ""} string.')
    return value


def bool_field(data: Mapping[str, Any], name: str, *, default: bool = False) -> bool:
    value = data.get(name, default)
    if not isinstance(value, bool):
        raise ChatError("invalid_field", f'"{name}" must be true or false.')
    return value


REACTION_MAX_LENGTH = 64


def reaction_emoji(value: object) -> str:
    """Return one emoji to react with, in its fully qualified form ("❤" becomes "❤️": one chip, not two)."""
    if not isinstance(value, str) or len(value) > REACTION_MAX_LENGTH or not emoji.is_emoji(value):
        raise ChatError("invalid_emoji", '"emoji" must be one emoji, such as "👍".')
    qualified = value + "\ufe0f"
    if emoji.EMOJI_DATA[value]["status"] != emoji.STATUS["fully_qualified"] and qualified in emoji.EMOJI_DATA:
        return qualified
    return value


def reply_id(value: object) -> int | None:
    """Return the id of the message a new one answers (None: it answers none)."""
    return None if value is None else json_int(value, "reply_to", low=1, code="invalid_reply")
