"""The JSON API (docs/api.md): request/response and long-poll, over the same services as the WebSocket.

django-ninja routes, parses and validates, and describes every endpoint in
the OpenAPI schema at /api/openapi.json (interactive at /api/docs). Every
answer, error or not, keeps the shape docs/api.md gives: errors are
`{"error": {"code", "detail"}}` with the codes the WebSocket uses too.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from channels.db import database_sync_to_async
from django.conf import settings
from django.contrib.auth.models import User
from django.core.exceptions import RequestDataTooBig
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.http.multipartparser import MultiPartParserError
from django.middleware.csrf import CsrfViewMiddleware
from django.urls import URLPattern
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt
from ninja import Field, NinjaAPI, Schema
from ninja.errors import AuthenticationError, HttpError
from ninja.errors import ValidationError as NinjaValidationError
from ninja.parser import Parser
from ninja.security import APIKeyCookie, HttpBearer
from pydantic import BeforeValidator, StrictBool, StrictInt, StrictStr
from pydantic_core import PydanticUseDefault

from chat import (
    database,
    ephemeral,
    files,
    longpoll,
    notifications,
    protocol,
    search,
    selectors,
    services,
    tokens,
    validation,
)
from chat.models import Room
from chat.validation import ChatError

logger = logging.getLogger(__name__)
# A balancer checks every second: said once a minute while a part is down (LOGGING's filter).
health_logger = logging.getLogger("chat.health")

SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
MESSAGES_MAX_LIMIT = 200

# Service error codes that are not plain "bad input" (400).
STATUS_FOR_CODE = {
    "forbidden": 403, "room_archived": 403, "not_found": 404, "body_too_long": 413, "rate_limited": 429,
    "file_too_large": 413, "quota_exceeded": 413, "file_type_not_allowed": 415,
}  # fmt: skip


class ApiError(Exception):
    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers or {}

    @classmethod
    def from_chat_error(cls, error: ChatError) -> ApiError:
        headers = {"Retry-After": str(error.retry_after)} if error.retry_after else None
        return cls(STATUS_FOR_CODE.get(error.code, 400), error.code, error.detail, headers)


def error_response(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> JsonResponse:
    return JsonResponse({"error": {"code": code, "detail": detail}}, status=status, headers=headers)


def _error_response(error: ApiError) -> JsonResponse:
    return error_response(error.status, error.code, error.detail, error.headers)


# --------------------------------------------------------------------------
# What the API takes and gives (the schema's components)
# --------------------------------------------------------------------------


class ErrorDetail(Schema):
    code: str = Field(description="Machine-readable reason, as in docs/api.md's table (`rate_limited`, ...).")
    detail: str = Field(description="What went wrong, for a person.")


class ErrorOut(Schema):
    error: ErrorDetail


class ReplyQuote(Schema):
    id: int
    seq: int
    author: str
    excerpt: str = Field(description='The first 140 characters of its source as it is now; "" once deleted.')


class ReactionOut(Schema):
    emoji: str
    count: int
    users: list[str] = Field(description="Who reacted, in the order they did.")


class FileOut(Schema):
    id: int = Field(description="Name it in a message's `attachments` to attach it.")
    name: str
    size: int = Field(description="In bytes.")
    content_type: str = Field(description="Decided from the content, never from the name.")
    url: str = Field(description="The file, for people who can read the room (its uploader alone until attached).")
    thumbnail_url: str | None = Field(description="A JPEG or PNG of at most 480×360, for raster images; else null.")


class MessageOut(Schema):
    id: int
    seq: int = Field(description="The message's place in its room: 1, 2, 3, ... without gaps.")
    room: str
    author: str
    body: str = Field(description='The Markdown source; "" once deleted.')
    created_at: str = Field(json_schema_extra={"format": "date-time"})
    edited_at: str | None = Field(json_schema_extra={"format": "date-time"})
    deleted_at: str | None = Field(json_schema_extra={"format": "date-time"})
    nonce: str | None
    system: bool
    html: str = Field(description="The body rendered from Markdown and sanitized: safe to show as HTML.")
    reply_to: ReplyQuote | None = Field(description="The message this one answers.")
    reactions: list[ReactionOut] = Field(description="One entry per emoji, in the order each was first used.")
    pinned_at: str | None = Field(json_schema_extra={"format": "date-time"})
    mentions: list[str] = Field(
        description="The usernames it mentions (@name), in order: people who can read the room."
    )
    mentions_room: bool = Field(description="It mentions every member (@room, written by an owner or moderator).")
    attachments: list[FileOut] = Field(description="Its files, in the order they were attached.")


# A body's length is validation.message_body's to refuse (413 body_too_long, on every path); the schema says it.
MESSAGE_BODY = Field(json_schema_extra={"maxLength": settings.CHAT_MESSAGE_MAX_LENGTH})


class MessageIn(Schema):
    body: StrictStr = MESSAGE_BODY
    nonce: StrictStr | None = Field(
        None,
        max_length=validation.NONCE_MAX_LENGTH,
        description="Unique per author: a retry with the same nonce returns the original and stores nothing.",
    )
    reply_to: StrictInt | None = Field(
        None, ge=1, le=validation.SEQ_MAX, description="The id of the message this one answers, in the same room."
    )
    attachments: list[Annotated[StrictInt, Field(ge=1, le=validation.SEQ_MAX)]] | None = Field(
        None,
        max_length=files.ATTACHMENTS_MAX,
        description="Ids of your own uploads to this room (POST …/files/), not yet attached. "
        "With files the body may be empty.",
    )


class ReactionIn(Schema):
    emoji: StrictStr = Field(
        description="One emoji. Toggles: your reaction is added, or taken back if you had reacted with it."
    )


class ReadMarks(Schema):
    marks: dict[str, int] = Field(
        description="How far each reader has read (username: seq), the furthest 200: `Seen by` counts these."
    )


class PinnedList(Schema):
    messages: list[MessageOut] = Field(description="The newest pin first, 50 at most.")


class MessageEdit(Schema):
    body: StrictStr = MESSAGE_BODY


class MessagesPage(Schema):
    messages: list[MessageOut]
    has_more: bool


class PollPage(Schema):
    messages: list[MessageOut]
    has_more: bool
    last_seq: int = Field(description="Send it as `after` in the next poll.")


class RoomOut(Schema):
    slug: str
    name: str
    topic: str
    is_private: bool
    is_direct: bool = Field(description="A direct conversation of two people (POST /api/dms/).")
    direct_with: str | None = Field(description="In a direct conversation, the other person's username.")
    last_seq: int
    unread: int = Field(description="Messages by others after your read mark (0 in rooms you never read).")
    unread_mentions: int = Field(description="Messages mentioning you after your read mark.")
    notify: str = Field(description='Your notification level here: "all", "mentions" or "nothing".')


class RoomIn(Schema):
    name: StrictStr = Field(min_length=1)
    slug: StrictStr = Field("", description="Made from the name when empty.")
    topic: StrictStr = ""
    is_private: StrictBool = False


class DirectIn(Schema):
    username: StrictStr = Field(description="Who to talk to.")


class RoomList(Schema):
    rooms: list[RoomOut]


class SearchResult(Schema):
    id: int
    seq: int
    room: str
    room_name: str = Field(description="A direct conversation's is the other person's username.")
    author: str
    created_at: str = Field(json_schema_extra={"format": "date-time"})
    snippet: str = Field(description="HTML: the text around the words found, escaped, each found word in <mark>.")
    url: str = Field(description="The room page at this message.")


class SearchResults(Schema):
    results: list[SearchResult] = Field(description="The most relevant first, then the most recent.")


class MemberNames(Schema):
    members: list[str] = Field(description="Usernames, alphabetical, 20 at most.")


class MembershipIn(Schema):
    notify: Literal["all", "mentions", "nothing", ""] = Field(
        description='What notifies you here: every message, mentions of you, or nothing. "" follows your default '
        '(/settings/; a direct conversation\'s is "all").'
    )


class MembershipOut(Schema):
    room: str
    role: str
    notify: str = Field(description="The level in force.")
    notify_is_default: bool = Field(description="The level follows your default: none is set for this room.")


def _digits(value: object) -> object:
    """Query numbers are digits only (no sign, space or exponent); an empty one is as if absent."""
    if value == "":
        raise PydanticUseDefault()
    if isinstance(value, str) and not (value.isascii() and value.isdigit()):
        raise ValueError("must be a whole number")
    return value


# Each number's bounds sit on an inner Annotated: on the outer one, next to the
# validator, the schema would show them as "ge"/"le" rather than minimum/maximum.
_SeqNumber = Annotated[int, Field(ge=0, le=validation.SEQ_MAX)]
_PositiveSeqNumber = Annotated[int, Field(ge=1, le=validation.SEQ_MAX)]
_LimitNumber = Annotated[int, Field(ge=1, le=MESSAGES_MAX_LIMIT)]
_TimeoutNumber = Annotated[int, Field(ge=1, le=settings.CHAT_POLL_MAX_TIMEOUT)]
Seq = Annotated[_SeqNumber, BeforeValidator(_digits), Field(description="A message's seq.")]
BeforeSeq = Annotated[_PositiveSeqNumber, BeforeValidator(_digits), Field(description="Only messages before this seq.")]
AroundSeq = Annotated[
    _PositiveSeqNumber, BeforeValidator(_digits), Field(description="The messages on both sides of this seq.")
]
MessageId = Annotated[
    _PositiveSeqNumber, BeforeValidator(_digits), Field(description="Only messages older than this id.")
]
PageLimit = Annotated[_LimitNumber, BeforeValidator(_digits), Field(description="At most this many messages.")]
POLL_DEFAULT_TIMEOUT = min(25, settings.CHAT_POLL_MAX_TIMEOUT)
PollTimeout = Annotated[_TimeoutNumber, BeforeValidator(_digits), Field(description="Seconds to wait at most.")]


def responses(ok: dict[int, Any], *errors: int) -> dict[int, Any]:
    """An operation's answers: `ok`, and the errors every endpoint may give plus `errors`."""
    return {**ok, **dict.fromkeys({400, 401, 405, 429, 503, *errors}, ErrorOut)}


def links(status: int, *, to: list[str], **parameters: str) -> dict[str, Any]:
    """OpenAPI links from an answer to the operations that take what it made (`parameters`, as runtime expressions)."""
    # Keyed by the int status, as ninja keys its responses, so that the two merge into one "201".
    return {
        "responses": {
            status: {"links": {operation: {"operationId": operation, "parameters": parameters} for operation in to}}
        }
    }


# --------------------------------------------------------------------------
# Who is asking
# --------------------------------------------------------------------------

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="chat"'}

# Database work for a poll runs on one thread that all polls share, not in a
# thread of the request's own, and no connection stays with the poll while it
# waits. One, as for the sockets, not the loop's default pool (six threads on
# two cores): a thousand polls arriving at once kept six threads fighting over
# the GIL, and set-up cost 2.3 ms of CPU per poll instead of 1.6
# (docs/performance.md). The thread never waits on Redis: the poll's rate is
# counted on the loop.
POLL_DATABASE_THREADS = ThreadPoolExecutor(max_workers=1, thread_name_prefix="poll-db")
in_pool = functools.partial(database_sync_to_async, thread_sensitive=False, executor=POLL_DATABASE_THREADS)


class Credentials:
    """What both ways of signing a request have in common: the rate limits, and the poll's way of checking.

    For the synchronous endpoints the check runs in the request's thread. For
    the long-poll (`for_polls`) it runs on the polls' database thread and
    counts the rate on the event loop.
    """

    is_async: bool

    def __init__(self, *, for_polls: bool = False) -> None:
        super().__init__()
        self.is_async = for_polls

    def __call__(self, request: HttpRequest) -> Any:
        if self.is_async:
            return self._for_poll(request)
        user = self.identify(request)
        if user is not None:
            _check_rate(f"api:{user.pk}", settings.CHAT_API_REQUESTS_PER_MINUTE)
            if request.method not in SAFE_METHODS:
                _check_rate(f"api-write:{user.pk}", settings.CHAT_API_WRITES_PER_MINUTE)
        return user

    async def _for_poll(self, request: HttpRequest) -> User | None:
        if not self.present(request):
            return None
        user, room = await in_pool(self._identify_with_room)(request)
        if user is not None:
            await _check_rate_async(f"api:{user.pk}", settings.CHAT_API_REQUESTS_PER_MINUTE)
            request.poll_room = room  # type: ignore[attr-defined]  # None: 404, once the rate has had its say
        return user

    def _identify_with_room(self, request: HttpRequest) -> tuple[User | None, Room | None]:
        """A poll's one trip to the database thread: who asks, and the room they may read.

        One trip, not one for the credentials and one for the room: each trip
        is a hand-over to the thread and back, which every poll pays.
        """
        user = self.identify(request)
        if user is None:
            return None, None
        assert request.resolver_match is not None
        return user, selectors.room_readable(slug=request.resolver_match.kwargs["slug"], user=user)

    def present(self, request: HttpRequest) -> bool:
        """Whether the request carries these credentials at all (no database needed to say)."""
        raise NotImplementedError

    def identify(self, request: HttpRequest) -> User | None:
        raise NotImplementedError


class BearerToken(Credentials, HttpBearer):
    """`Authorization: Bearer <token>`: a token made with `manage.py createtoken` or in the admin. No CSRF."""

    openapi_description = "A token's secret: `manage.py createtoken <user>`, or the admin's API tokens."

    def present(self, request: HttpRequest) -> bool:
        return "Authorization" in request.headers

    def identify(self, request: HttpRequest) -> User | None:
        header = request.headers.get("Authorization")
        if header is None:
            return None  # the session's turn
        scheme, _, secret = header.partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            raise ApiError(401, "invalid_credentials", "Use the header: Authorization: Bearer <token>.", _CHALLENGE)
        user = tokens.token_user(secret.strip())
        if user is None:
            raise ApiError(401, "invalid_token", "This token is unknown or was revoked.", _CHALLENGE)
        return user

    def authenticate(self, request: HttpRequest, token: str) -> User | None:  # HttpBearer's; identify() does it
        raise NotImplementedError


class SessionCookie(Credentials, APIKeyCookie):
    """A signed-in browser's session cookie; unsafe methods also need the CSRF token in X-CSRFToken."""

    param_name = settings.SESSION_COOKIE_NAME
    openapi_description = (
        "The session cookie of a signed-in browser. POST, PATCH and DELETE also need the `csrftoken` "
        "cookie's value in an `X-CSRFToken` header."
    )

    # The CSRF check is identify()'s, with this API's error; ninja reads the flag
    # only to have /api/docs send the token with "Try it out".
    csrf = True

    def present(self, request: HttpRequest) -> bool:
        return settings.SESSION_COOKIE_NAME in request.COOKIES

    def identify(self, request: HttpRequest) -> User | None:
        if "Authorization" in request.headers or not request.user.is_authenticated:
            return None
        if request.method not in SAFE_METHODS and _csrf_failure(request):
            raise ApiError(
                403, "csrf_failed", "CSRF check failed: send the csrftoken cookie's value in an X-CSRFToken header."
            )
        return request.user

    def authenticate(self, request: HttpRequest, key: str | None) -> User | None:  # APIKeyCookie's
        raise NotImplementedError


def _csrf_failure(request: HttpRequest) -> bool:
    # Ninja's views are csrf_exempt so that token requests pass; session
    # requests get Django's own check here.
    return CsrfViewMiddleware(_unchecked_view).process_view(request, _unchecked_view, (), {}) is not None


def _unchecked_view(request: HttpRequest) -> HttpResponse:
    """Stand in for the view: process_view only looks for its csrf_exempt flag (it has none), and never calls it."""
    raise NotImplementedError


def _check_rate(key: str, per_minute: int) -> None:
    _raise_if_limited(ephemeral.rate_limit(key, per_minute, 60), per_minute)


async def _check_rate_async(key: str, per_minute: int) -> None:
    """_check_rate() from the event loop: the same count, and no thread waits on Redis."""
    _raise_if_limited(await ephemeral.rate_limit_async(key, per_minute, 60), per_minute)


def _raise_if_limited(retry_after: int, per_minute: int) -> None:
    if retry_after:
        raise ApiError(
            429,
            "rate_limited",
            f"Too many requests: at most {per_minute} a minute. Try again in {retry_after} s.",
            {"Retry-After": str(retry_after)},
        )


def _user(request: HttpRequest) -> User:
    """The user the operation's credentials named (ninja keeps it as request.auth)."""
    return request.auth  # type: ignore[attr-defined]


def _room(slug: str, user: User) -> Room:
    room = selectors.room_readable(slug=slug, user=user)
    if room is None:
        raise _room_not_found(slug)
    return room


def _room_not_found(slug: str) -> ApiError:
    # A private room of others gets the same answer as a missing one: its existence is not given away.
    return ApiError(404, "room_not_found", f'There is no room "{slug}" that you can see.')


# --------------------------------------------------------------------------
# Reading requests, and answering their errors
# --------------------------------------------------------------------------


class JsonObjectParser(Parser):
    """Bodies are JSON objects of at most CHAT_API_REQUEST_MAX_BYTES; anything else is refused before validation."""

    def parse_body(self, request: HttpRequest) -> dict[str, Any]:
        limit = settings.CHAT_API_REQUEST_MAX_BYTES
        try:
            declared = int(request.headers.get("Content-Length") or 0)
        except ValueError:
            declared = 0
        try:
            size = max(declared, len(request.body))
        except RequestDataTooBig:  # past Django's own limit, which is larger
            size = limit + 1
        if size > limit:
            raise ApiError(413, "request_too_large", f"Requests can be at most {limit} bytes.")
        try:
            data = super().parse_body(request)
        except ValueError:
            raise ApiError(400, "invalid_json", "The request body is not valid JSON.") from None
        if not isinstance(data, dict):
            raise ApiError(400, "invalid_json", "The request body must be a JSON object.")
        return data


class ChatAPI(NinjaAPI):
    """Ninja's API, whose schema also says what ninja cannot declare per operation.

    The headers that come with errors (Retry-After, WWW-Authenticate, Allow),
    and that a session's POST, PATCH and DELETE need the CSRF header too: the
    session cookie and the header together, or a token.
    """

    def get_openapi_schema(self, *, path_prefix: str | None = None, path_params: dict | None = None) -> Any:
        schema = super().get_openapi_schema(path_prefix=path_prefix, path_params=path_params)
        schema["components"]["securitySchemes"]["CsrfToken"] = {
            "type": "apiKey",
            "in": "header",
            "name": "X-CSRFToken",
            "description": "The `csrftoken` cookie's value: with the session cookie, for POST, PATCH and DELETE.",
        }
        for methods in schema["paths"].values():
            for method, operation in methods.items():
                for status, header, description in ERROR_HEADERS:
                    # Ninja keys the responses by int; they become strings in the JSON.
                    if status in operation["responses"]:
                        operation["responses"][status]["headers"] = {
                            header: {"description": description, "schema": {"type": "string"}}
                        }
                if method.upper() not in SAFE_METHODS:
                    operation["security"] = [{"BearerToken": []}, {"SessionCookie": [], "CsrfToken": []}]
        return schema


ERROR_HEADERS = [
    (401, "WWW-Authenticate", 'How to sign in: `Bearer realm="chat"`.'),
    (405, "Allow", "The methods this path takes."),
    (429, "Retry-After", "Whole seconds until the request may be made again."),
]

api = ChatAPI(
    title="Chat API",
    version="1",
    description=(
        "Rooms and messages of the chat, as the WebSocket serves them (docs/api.md). "
        'Errors are `{"error": {"code", "detail"}}`; 429 comes with Retry-After.'
    ),
    urls_namespace="api",
    parser=JsonObjectParser(),
    auth=[BearerToken(), SessionCookie()],
    docs_url="/docs",
    openapi_url="/openapi.json",
)
POLL_AUTH = [BearerToken(for_polls=True), SessionCookie(for_polls=True)]

# Which code a bad field of a body gets: the WebSocket's, where it has one.
FIELD_CODES = {
    "body": "invalid_body",
    "nonce": "invalid_nonce",
    "reply_to": "invalid_reply",
    "emoji": "invalid_emoji",
    "notify": "invalid_notify",
    "attachments": "invalid_attachment",
}


@api.exception_handler(ApiError)
def _api_error(request: HttpRequest, error: ApiError) -> HttpResponse:
    return _error_response(error)


@api.exception_handler(ChatError)
def _chat_error(request: HttpRequest, error: ChatError) -> HttpResponse:
    return _error_response(ApiError.from_chat_error(error))


@api.exception_handler(AuthenticationError)
def _not_authenticated(request: HttpRequest, error: AuthenticationError) -> HttpResponse:
    return error_response(401, "not_authenticated", "Sign in, or send Authorization: Bearer <token>.", _CHALLENGE)


@api.exception_handler(HttpError)
def _http_error(request: HttpRequest, error: HttpError) -> HttpResponse:
    if isinstance(error.__cause__, ApiError):  # the parser's, wrapped by ninja
        return _error_response(error.__cause__)
    return error_response(error.status_code, "bad_request", str(error))


@api.exception_handler(NinjaValidationError)
def _invalid(request: HttpRequest, error: NinjaValidationError) -> HttpResponse:
    problem = error.errors[0]
    source, *where = problem["loc"]
    name = str(where[-1]) if where else ""
    if source == "body":
        if len(where) < 2:
            return error_response(400, "invalid_json", "The request body must be a JSON object.")
        name = str(where[1])  # the field, also for an item of a list field ("attachments", 0)
        if problem["type"] == "missing":
            # "missing_body", as on the socket; a missing emoji is as invalid as a wrong one (invalid_emoji).
            code = "missing_body" if name == "body" else FIELD_CODES.get(name, "invalid_field")
            return error_response(400, code, f'"{name}" is missing.')
        return error_response(400, FIELD_CODES.get(name, "invalid_field"), f'"{name}": {problem["msg"]}.')
    return error_response(400, "invalid_param", f'"{name}": {problem["msg"]}.')


def _database_error(request: HttpRequest, error: Exception) -> HttpResponse:
    raise error  # chatsite.middleware answers 503, and logs the outage once


for _error in database.DATABASE_ERRORS:
    api.add_exception_handler(_error, _database_error)  # type: ignore[arg-type]


@api.exception_handler(Exception)
def _server_error(request: HttpRequest, error: Exception) -> HttpResponse:
    logger.error("API request %s %s failed", request.method, request.path, exc_info=error)
    return error_response(500, "server_error", "Something went wrong on the server; try again.")


# --------------------------------------------------------------------------
# Endpoints
# --------------------------------------------------------------------------


def room_payload(room: Room, *, direct_with: str | None = None, notify: str | None = None) -> dict[str, Any]:
    return {
        "slug": room.slug,
        "name": room.name,
        "topic": room.topic,
        "is_private": room.is_private,
        "is_direct": room.is_direct,
        "direct_with": getattr(room, "direct_with", direct_with),
        "last_seq": room.last_seq,
        "unread": getattr(room, "unread", 0),
        "unread_mentions": getattr(room, "unread_mentions", 0),
        "notify": getattr(room, "notify", notify),
    }


@api.get(
    "/rooms/",
    response=responses({200: RoomList}),
    summary="The rooms you may see",
    operation_id="room_list",
    tags=["rooms"],
    url_name="rooms",
)
def rooms(request: HttpRequest) -> JsonResponse:
    """Public rooms and private rooms you are a member of, most recently active first, with your unread count."""
    return JsonResponse({"rooms": [room_payload(room) for room in selectors.room_list(user=_user(request))]})


@api.post(
    "/rooms/",
    response=responses({201: RoomOut}, 403, 413),
    summary="Create a room",
    operation_id="room_create",
    tags=["rooms"],
    url_name="rooms",
    openapi_extra=links(201, slug="$response.body#/slug", to=["message_list", "message_create"]),
)
def room_create(request: HttpRequest, data: RoomIn) -> JsonResponse:
    """You become its owner."""
    fields = data.model_dump()
    try:
        room = services.room_create(
            slug=validation.string_field(fields, "slug"),
            name=validation.string_field(fields, "name", required=True),
            topic=validation.string_field(fields, "topic"),
            is_private=data.is_private,
            created_by=_user(request),
        )
    except DjangoValidationError as error:
        detail = " ".join(f"{field}: {' '.join(problems)}" for field, problems in error.message_dict.items())
        raise ApiError(400, "invalid_room", detail) from None
    return JsonResponse(room_payload(room, notify=notifications.level_for(room=room, user=_user(request))), status=201)


@api.post(
    "/dms/",
    response=responses({200: RoomOut, 201: RoomOut}),
    summary="Open a direct conversation",
    operation_id="direct_open",
    tags=["rooms"],
    url_name="dms",
    openapi_extra=links(201, slug="$response.body#/slug", to=["message_list", "message_create"]),
)
def direct_open(request: HttpRequest, data: DirectIn) -> JsonResponse:
    """The one private room of you and `username`: 201 the first time, then 200 with the same room.
    Nobody else can join it or see that it exists. An unknown user, or yourself: 400."""
    room, created = services.direct_room_open(user=_user(request), username=data.username)
    payload = room_payload(
        room, direct_with=data.username, notify=notifications.level_for(room=room, user=_user(request))
    )
    return JsonResponse(payload, status=201 if created else 200)


@api.get(
    "/rooms/{slug:slug}/messages",
    response=responses({200: MessagesPage}, 404),
    summary="A page of messages",
    operation_id="message_list",
    tags=["messages"],
    url_name="messages",
)
def message_list(
    request: HttpRequest,
    slug: str,
    after: Seq | None = None,
    before: BeforeSeq | None = None,
    around: AroundSeq | None = None,
    limit: PageLimit = 50,
) -> JsonResponse:
    """In seq order. With `after`, the page starts just after it and `has_more` means newer ones follow;
    without, it is the newest (before `before`) and `has_more` means older ones exist. With `around`
    (alone), half the page is before that seq and the rest from it on; `has_more` means older ones exist."""
    room = _room(slug, _user(request))
    if around is not None:
        if after is not None or before is not None:
            raise ApiError(400, "invalid_param", '"around" goes alone: without "after" or "before".')
        page, has_more = selectors.message_around(room=room, seq=around, limit=limit)
    else:
        page, has_more = selectors.message_list(room=room, after_seq=after, before_seq=before, limit=limit)
    return JsonResponse({"messages": [protocol.message_payload(m) for m in page], "has_more": has_more})


@api.post(
    "/rooms/{slug:slug}/messages",
    response=responses({200: MessageOut, 201: MessageOut}, 403, 404, 413),
    summary="Post a message",
    operation_id="message_create",
    tags=["messages"],
    url_name="messages",
    openapi_extra=links(
        201,
        slug="$request.path.slug",
        message_id="$response.body#/id",
        to=["message_get", "message_edit", "message_delete", "message_react", "message_pin", "message_unpin"],
    ),
)
def message_create(request: HttpRequest, slug: str, data: MessageIn) -> JsonResponse:
    """Saved, then published to every WebSocket in the room: 201. A retry with the same nonce: 200 and the original.

    The body is Markdown; the answer carries it rendered as `html`."""
    room = _room(slug, _user(request))
    message, created = services.message_create(
        room=room,
        author=_user(request),
        body=data.body,
        nonce=data.nonce,
        reply_to=data.reply_to,
        attachments=data.attachments,
    )
    return JsonResponse(protocol.message_payload(message), status=201 if created else 200)


@api.get(
    "/rooms/{slug:slug}/messages/{int:message_id}",
    response=responses({200: MessageOut}, 404),
    summary="One message",
    operation_id="message_get",
    tags=["messages"],
    url_name="message",
)
def message_get(request: HttpRequest, slug: str, message_id: int) -> JsonResponse:
    """As it is now: edited, or deleted (its body then "")."""
    message = selectors.message_get(room=_room(slug, _user(request)), message_id=message_id)
    if message is None:
        raise ApiError(404, "not_found", "There is no such message in this room.")
    return JsonResponse(protocol.message_payload(message))


@api.patch(
    "/rooms/{slug:slug}/messages/{int:message_id}",
    response=responses({200: MessageOut}, 403, 404, 413),
    summary="Edit your message",
    operation_id="message_edit",
    tags=["messages"],
    url_name="message",
)
def message_edit(request: HttpRequest, slug: str, message_id: int, data: MessageEdit) -> JsonResponse:
    room = _room(slug, _user(request))
    changed = services.message_edit(room=room, message_id=message_id, user=_user(request), body=data.body)
    return JsonResponse(protocol.message_payload(changed))


@api.delete(
    "/rooms/{slug:slug}/messages/{int:message_id}",
    response=responses({200: MessageOut}, 403, 404),
    summary="Delete a message",
    operation_id="message_delete",
    tags=["messages"],
    url_name="message",
)
def message_delete(request: HttpRequest, slug: str, message_id: int) -> JsonResponse:
    """Your own message, or anyone's if you own or moderate the room, or are staff."""
    room = _room(slug, _user(request))
    changed = services.message_delete(room=room, message_id=message_id, user=_user(request))
    return JsonResponse(protocol.message_payload(changed))


@api.post(
    "/rooms/{slug:slug}/messages/{int:message_id}/reactions/",
    response=responses({200: MessageOut}, 403, 404),
    summary="React to a message",
    operation_id="message_react",
    tags=["messages"],
    url_name="message-reactions",
)
def message_react(request: HttpRequest, slug: str, message_id: int, data: ReactionIn) -> JsonResponse:
    """Toggles your reaction with one emoji (20 different ones per message at most); published to every socket."""
    room = _room(slug, _user(request))
    changed = services.message_react(room=room, message_id=message_id, user=_user(request), emoji=data.emoji)
    return JsonResponse(protocol.message_payload(changed))


@api.put(
    "/rooms/{slug:slug}/messages/{int:message_id}/pin",
    response=responses({200: MessageOut}, 403, 404),
    summary="Pin a message",
    operation_id="message_pin",
    tags=["messages"],
    url_name="message-pin",
)
def message_pin(request: HttpRequest, slug: str, message_id: int) -> JsonResponse:
    """The room's owner and moderators, and staff (either person in a direct room). Pinning a pinned message
    changes nothing."""
    room = _room(slug, _user(request))
    changed = services.message_pin(room=room, message_id=message_id, user=_user(request), pinned=True)
    return JsonResponse(protocol.message_payload(changed))


@api.delete(
    "/rooms/{slug:slug}/messages/{int:message_id}/pin",
    response=responses({200: MessageOut}, 403, 404),
    summary="Unpin a message",
    operation_id="message_unpin",
    tags=["messages"],
    url_name="message-pin",
)
def message_unpin(request: HttpRequest, slug: str, message_id: int) -> JsonResponse:
    """The room's owner and moderators, and staff (either person in a direct room)."""
    room = _room(slug, _user(request))
    changed = services.message_pin(room=room, message_id=message_id, user=_user(request), pinned=False)
    return JsonResponse(protocol.message_payload(changed))


@api.get(
    "/rooms/{slug:slug}/pins",
    response=responses({200: PinnedList}, 404),
    summary="The room's pinned messages",
    operation_id="pin_list",
    tags=["messages"],
    url_name="pins",
)
def pin_list(request: HttpRequest, slug: str) -> JsonResponse:
    room = _room(slug, _user(request))
    return JsonResponse({"messages": [protocol.message_payload(m) for m in selectors.pinned_messages(room=room)]})


@api.get(
    "/rooms/{slug:slug}/reads",
    response=responses({200: ReadMarks}, 404),
    summary="How far the room's readers have read",
    operation_id="read_marks",
    tags=["rooms"],
    url_name="reads",
)
def read_marks(request: HttpRequest, slug: str) -> JsonResponse:
    """Read receipts: a message is seen by the readers whose mark is at or past its seq. Sockets hear of each
    move live (`read_by`); this is where a client that was away catches up."""
    room = _room(slug, _user(request))
    return JsonResponse({"marks": selectors.read_marks(room=room)})


@api.patch(
    "/rooms/{slug:slug}/membership/",
    response=responses({200: MembershipOut}, 403, 404),
    summary="Set your notification level in a room",
    operation_id="membership_update",
    tags=["rooms"],
    url_name="membership",
)
def membership_update(request: HttpRequest, slug: str, data: MembershipIn) -> JsonResponse:
    """In a public room you have not joined, this joins it. A private room you are not in: 404."""
    user = _user(request)
    membership = notifications.notify_set(room=_room(slug, user), user=user, level=data.notify)
    level = notifications.level_in(
        membership=membership, room=membership.room, user_settings=notifications.settings_for(user)
    )
    return JsonResponse(
        {"room": slug, "role": membership.role, "notify": level, "notify_is_default": membership.notify == ""}
    )


@api.get(
    "/rooms/{slug:slug}/members",
    response=responses({200: MemberNames}, 404),
    summary="The room's members, by the start of their names",
    operation_id="member_list",
    tags=["rooms"],
    url_name="members",
)
def member_list(
    request: HttpRequest,
    slug: str,
    prefix: Annotated[StrictStr, Field(max_length=150, description="The start of a username, any case.")] = "",
) -> JsonResponse:
    """Who `@` can mention by name here (the composer's autocomplete). In a public room, people who joined it;
    anyone who can read the room can be mentioned."""
    room = _room(slug, _user(request))
    return JsonResponse({"members": selectors.member_names(room=room, prefix=prefix)})


@api.post(
    "/rooms/{slug:slug}/files/",
    response=responses({201: FileOut}, 403, 404, 413, 415),
    summary="Upload a file",
    operation_id="file_upload",
    tags=["files"],
    url_name="files",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {"file": {"type": "string", "format": "binary"}},
                    }
                }
            },
        }
    },
)
def file_upload(request: HttpRequest, slug: str) -> JsonResponse:
    """Multipart form data, the file in a field named `file`: at most 10 MiB, and of a type allowed (images,
    PDF, text, zip; decided from the content). It waits for your next message in the room to name it in its
    `attachments`. Empty, damaged or disallowed: 400 (`empty_file`, `invalid_image`, `missing_file`), 413
    (`file_too_large`, `quota_exceeded`), 415 (`file_type_not_allowed`)."""
    user = _user(request)
    room = _room(slug, user)
    try:
        uploaded = request.FILES.get("file")
    except MultiPartParserError:  # a multipart body without its boundary, or cut short
        raise ApiError(400, "invalid_upload", "The multipart form data is malformed.") from None
    if uploaded is None:
        raise ApiError(400, "missing_file", 'Send the file as multipart form data, in a field named "file".')
    return JsonResponse(files.payload(files.upload(room=room, user=user, uploaded=uploaded)), status=201)


@api.get(
    "/search/",
    response=responses({200: SearchResults}, 404),
    summary="Search messages",
    operation_id="search",
    tags=["messages"],
    url_name="search",
)
def message_search(
    request: HttpRequest,
    q: Annotated[StrictStr, Field(description='Words, "phrases" and -exclusions, all of which must hold.')],
    room: Annotated[StrictStr | None, Field(description="Only this room (its slug).")] = None,
    author: Annotated[StrictStr | None, Field(description="Only messages by this username.")] = None,
    after: Annotated[
        datetime | None, Field(description="Only messages sent at or after (ISO 8601; UTC if no zone).")
    ] = None,
    before: Annotated[
        datetime | None, Field(description="Only messages sent before (ISO 8601; UTC if no zone).")
    ] = None,
    limit: Annotated[int, BeforeValidator(_digits), Field(ge=1, le=search.RESULTS_MAX)] = 20,
) -> JsonResponse:
    """Every room you may read, direct conversations included. A blank or too long query: 400 (`empty_query`,
    `query_too_long`), and one with only exclusions: 400 `invalid_query`."""
    user = _user(request)
    hits = selectors.message_search(
        user=user,
        query=q,
        room=_room(room, user) if room is not None else None,
        author_name=author,
        after=_aware(after),
        before=_aware(before),
        limit=limit,
    )
    return JsonResponse({"results": [protocol.search_result(hit, user.get_username()) for hit in hits]})


def _aware(moment: datetime | None) -> datetime | None:
    if moment is None or timezone.is_aware(moment):
        return moment
    return timezone.make_aware(moment, UTC)


@api.get(
    "/mentions/",
    response=responses({200: MessagesPage}),
    summary="Messages that mention you",
    operation_id="mention_list",
    tags=["messages"],
    url_name="mentions",
)
def mention_list(request: HttpRequest, before_id: MessageId | None = None, limit: PageLimit = 50) -> JsonResponse:
    """Newest first, from every room you may read now; `has_more` means older ones exist (ask with `before_id`,
    the last one's id)."""
    page = selectors.mentions_of(user=_user(request), before_id=before_id, limit=limit + 1)
    return JsonResponse(
        {"messages": [protocol.message_payload(m) for m in page[:limit]], "has_more": len(page) > limit}
    )


# --------------------------------------------------------------------------
# Long-poll
# --------------------------------------------------------------------------


@api.get(
    "/rooms/{slug:slug}/poll",
    auth=POLL_AUTH,
    response=responses({200: PollPage}, 404),
    summary="Wait for new messages",
    operation_id="room_poll",
    tags=["long-poll"],
    url_name="poll",
)
async def poll(
    request: HttpRequest, slug: str, after: Seq = 0, timeout: PollTimeout = POLL_DEFAULT_TIMEOUT
) -> JsonResponse:
    """Answers at once with up to 200 messages after `after` if there are any, else as soon as one is posted
    (over any path), or empty when `timeout` runs out."""
    room = request.poll_room  # type: ignore[attr-defined]  # read with the credentials (Credentials._for_poll)
    if room is None:
        raise _room_not_found(slug)
    async with longpoll.watch_room(room.pk) as watch:
        if watch.delivered_through(after):
            # This process's sockets and polls were handed everything up to
            # `after`, and whatever comes next reaches the watch: no need to read.
            data = {"messages": [], "has_more": False, "last_seq": after}
        else:
            # Subscribed before reading: whatever is committed after this read is
            # published after it, and wakes the wait below.
            data = await in_pool(_messages_after)(room, after)
            if data["messages"]:
                return JsonResponse(data)
            after = data["last_seq"]
            watch.read_through(after)
        if not await watch.wait(timeout):
            return JsonResponse(data)
    # Usually the published messages are exactly the next ones: no need to ask the database.
    published = longpoll.followers(watch.messages, after)
    if published is not None:
        return JsonResponse({"messages": published, "has_more": False, "last_seq": published[-1]["seq"]})
    return JsonResponse(await in_pool(_messages_after)(room, after))


def _messages_after(room: Room, after: int) -> dict[str, Any]:
    last_seq, _ = selectors.room_cursors(room=room)
    page, has_more = selectors.message_list(room=room, after_seq=after, limit=MESSAGES_MAX_LIMIT)
    return {
        "messages": [protocol.message_payload(m) for m in page],
        "has_more": has_more,
        # What to send as `after` next time.
        "last_seq": page[-1].seq if page else min(after, last_seq),
    }


# --------------------------------------------------------------------------
# URLs, and the errors Django answers for them
# --------------------------------------------------------------------------


def _json_405(view: Callable) -> Callable:
    """Ninja answers a method it does not route with plain text; ours is JSON, with Allow, as every error."""

    def answer(request: HttpRequest, response: HttpResponse) -> HttpResponse:
        if response.status_code != 405:
            return response
        allowed = [m for m in ("GET", "POST", "PUT", "PATCH", "DELETE") if m in response.get("Allow", "")]
        detail = f"{request.method} is not allowed here; use {', '.join(allowed)}."
        return error_response(405, "method_not_allowed", detail, {"Allow": ", ".join(allowed)})

    if iscoroutinefunction(view):

        async def async_view(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            return answer(request, await view(request, *args, **kwargs))

        async_view.csrf_exempt = True  # type: ignore[attr-defined]
        return markcoroutinefunction(async_view)

    def sync_view(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        return answer(request, view(request, *args, **kwargs))

    sync_view.csrf_exempt = True  # type: ignore[attr-defined]
    return sync_view


def urls() -> list[URLPattern]:
    """The API's URL patterns under /api/, every path's view answering 405 as JSON."""
    patterns, _app_name, _namespace = api.urls
    return [
        URLPattern(
            pattern.pattern,
            # /api/ itself: ninja's root (which it reverses for the schema's paths) answers our JSON 404.
            not_found if pattern.name == "api-root" else _json_405(pattern.callback),
            pattern.default_args,
            pattern.name,
        )
        for pattern in patterns
        if isinstance(pattern, URLPattern)
    ]


@csrf_exempt
def not_found(request: HttpRequest, **kwargs: Any) -> JsonResponse:
    return error_response(404, "not_found", f"There is no API endpoint at {request.path}; see /api/docs.")


def json_errors_under_api(default_handler: Callable[..., HttpResponse], status: int, code: str, detail: str):
    """Wrap one of Django's error handlers (handler400 …) so that /api/ gets JSON, never an HTML page."""

    def handler(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if request.path.startswith("/api/"):
            return error_response(status, code, detail)
        return default_handler(request, *args, **kwargs)

    return handler


# --------------------------------------------------------------------------
# Health
# --------------------------------------------------------------------------


async def healthz(request: HttpRequest) -> JsonResponse:
    """200 when the database and Redis both answer, else 503 naming the failing part.

    `?need=database` judges by the database alone: without Redis a host still
    serves, delivering from the database, and a load balancer that finds every
    host without Redis should keep sending people to them (docs/scaling.md).
    Redis is asked from the event loop within CHAT_REDIS_TIMEOUT: a balancer's
    check every second must not hold the thread all sockets' database work
    shares while Redis is unreachable.
    """
    checks: dict[str, str] = {}
    try:
        await database_sync_to_async(_database_ping)()
        checks["database"] = "ok"
    except Exception as error:
        health_logger.warning("Health check: the database is down: %s", type(error).__name__)
        checks["database"] = f"error: {type(error).__name__}"
    if settings.CHANNEL_LAYER != "redis":  # one process on the in-memory layer: no Redis to ask
        checks["redis"] = "not used"
    else:
        try:
            await ephemeral.bounded(lambda: ephemeral.client().ping())
            checks["redis"] = "ok"
        except ephemeral.REDIS_ERRORS as error:
            health_logger.warning("Health check: Redis is down: %s", type(error).__name__)
            checks["redis"] = f"error: {type(error).__name__}"
    needed = {"database"} if request.GET.get("need") == "database" else {"database", "redis"}
    healthy = all(state in ("ok", "not used") for part, state in checks.items() if part in needed)
    return JsonResponse(checks, status=200 if healthy else 503)


def _database_ping() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
