"""The JSON API (docs/api.md): request/response and long-poll, over the same services as the WebSocket."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, overload

from channels.db import database_sync_to_async
from django.conf import settings
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.middleware.csrf import CsrfViewMiddleware
from django.views.decorators.csrf import csrf_exempt

from chat import database, ephemeral, longpoll, protocol, selectors, services, tokens, validation
from chat.models import Room
from chat.validation import ChatError

logger = logging.getLogger(__name__)

SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
MESSAGES_MAX_LIMIT = 200

# Service error codes that are not plain "bad input" (400).
STATUS_FOR_CODE = {
    "forbidden": 403, "room_archived": 403, "not_found": 404, "body_too_long": 413, "rate_limited": 429
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
# Who is asking
# --------------------------------------------------------------------------


def authorize(request: HttpRequest, *, write: bool = False) -> User:
    """Return the user behind the request (token or session) once it passes CSRF and the rate limits."""
    user = identify(request)
    _check_rate(f"api:{user.pk}", settings.CHAT_API_REQUESTS_PER_MINUTE)
    if write:
        _check_rate(f"api-write:{user.pk}", settings.CHAT_API_WRITES_PER_MINUTE)
    return user


def identify(request: HttpRequest) -> User:
    """Return the user behind the request (token or session) once it passes CSRF; rates are not counted here."""
    header = request.headers.get("Authorization")
    if header is not None:
        scheme, _, secret = header.partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            raise ApiError(401, "invalid_credentials", "Use the header: Authorization: Bearer <token>.", _CHALLENGE)
        user = tokens.token_user(secret.strip())
        if user is None:
            raise ApiError(401, "invalid_token", "This token is unknown or was revoked.", _CHALLENGE)
        # A token is not sent by browsers on their own, so it needs no CSRF check.
    elif request.user.is_authenticated:
        user = request.user
        if request.method not in SAFE_METHODS and _csrf_failure(request):
            raise ApiError(
                403, "csrf_failed", "CSRF check failed: send the csrftoken cookie's value in an X-CSRFToken header."
            )
    else:
        raise ApiError(401, "not_authenticated", "Sign in, or send Authorization: Bearer <token>.", _CHALLENGE)
    return user


_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="chat"'}


def _csrf_failure(request: HttpRequest) -> bool:
    # The API views are csrf_exempt so that token requests pass; session
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


def _room(slug: str, user: User) -> Room:
    room = selectors.room_readable(slug=slug, user=user)
    if room is None:
        raise _room_not_found(slug)
    return room


def _room_not_found(slug: str) -> ApiError:
    return ApiError(404, "room_not_found", f'There is no room "{slug}" that you can see.')


# --------------------------------------------------------------------------
# Request parsing
# --------------------------------------------------------------------------


def _check_size(request: HttpRequest, size: int | None = None) -> None:
    """Refuse a request over the limit: by its Content-Length, or by `size`, the body read."""
    limit = settings.CHAT_API_REQUEST_MAX_BYTES
    if size is None:
        try:
            size = int(request.headers.get("Content-Length") or 0)
        except ValueError:
            size = 0
    if size > limit:
        raise ApiError(413, "request_too_large", f"Requests can be at most {limit} bytes.")


def _json_body(request: HttpRequest) -> dict[str, Any]:
    _check_size(request, len(request.body))
    try:
        data = json.loads(request.body or b"null")
    except ValueError:
        raise ApiError(400, "invalid_json", "The request body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_json", "The request body must be a JSON object.")
    return data


@overload
def _int_param(request: HttpRequest, name: str, low: int, high: int, default: int) -> int: ...
@overload
def _int_param(request: HttpRequest, name: str, low: int, high: int, default: None = None) -> int | None: ...
def _int_param(request: HttpRequest, name: str, low: int, high: int, default: int | None = None) -> int | None:
    value = validation.query_int(request.GET.get(name), name, low=low, high=high)
    return default if value is None else value


# --------------------------------------------------------------------------
# Endpoints
# --------------------------------------------------------------------------

Handler = Callable[..., tuple[int, dict[str, Any]]]


def endpoint(*methods: str, writes: tuple[str, ...] = ()) -> Callable[[Handler], Callable[..., JsonResponse]]:
    """Make a view answer only JSON: `handler(request, user, **kwargs)` returns (status, data)."""

    def decorate(handler: Handler) -> Callable[..., JsonResponse]:
        @csrf_exempt
        @functools.wraps(handler)
        def view(request: HttpRequest, **kwargs: Any) -> JsonResponse:
            try:
                if request.method not in methods:
                    raise ApiError(
                        405,
                        "method_not_allowed",
                        f"{request.method} is not allowed here; use {', '.join(methods)}.",
                        {"Allow": ", ".join(methods)},
                    )
                _check_size(request)
                user = authorize(request, write=request.method in writes)
                status, data = handler(request, user, **kwargs)
            except ApiError as error:
                return _error_response(error)
            except ChatError as error:
                return _error_response(ApiError.from_chat_error(error))
            except database.DATABASE_ERRORS:
                raise  # chatsite.middleware answers 503, and logs the outage once
            except Exception:
                logger.exception("API request %s %s failed", request.method, request.path)
                return error_response(500, "server_error", "Something went wrong on the server; try again.")
            return JsonResponse(data, status=status)

        return view

    return decorate


def room_payload(room: Room) -> dict[str, Any]:
    return {
        "slug": room.slug,
        "name": room.name,
        "topic": room.topic,
        "is_private": room.is_private,
        "last_seq": room.last_seq,
        "unread": getattr(room, "unread", 0),
    }


@endpoint("GET", "POST", writes=("POST",))
def rooms(request: HttpRequest, user: User) -> tuple[int, dict[str, Any]]:
    if request.method == "GET":
        return 200, {"rooms": [room_payload(room) for room in selectors.room_list(user=user)]}
    data = _json_body(request)
    try:
        room = services.room_create(
            slug=validation.string_field(data, "slug"),
            name=validation.string_field(data, "name", required=True),
            topic=validation.string_field(data, "topic"),
            is_private=validation.bool_field(data, "is_private"),
            created_by=user,
        )
    except ValidationError as error:
        detail = " ".join(f"{field}: {' '.join(problems)}" for field, problems in error.message_dict.items())
        raise ApiError(400, "invalid_room", detail) from None
    return 201, room_payload(room)


@endpoint("GET", "POST", writes=("POST",))
def messages(request: HttpRequest, user: User, slug: str) -> tuple[int, dict[str, Any]]:
    room = _room(slug, user)
    if request.method == "GET":
        page, has_more = selectors.message_list(
            room=room,
            after_seq=_int_param(request, "after", 0, 2**63 - 1),
            before_seq=_int_param(request, "before", 1, 2**63 - 1),
            limit=_int_param(request, "limit", 1, MESSAGES_MAX_LIMIT, default=50),
        )
        return 200, {"messages": [protocol.message_payload(m) for m in page], "has_more": has_more}
    data = _json_body(request)
    body = validation.required(data, "body", '{"body": "...", "nonce": "..."}')
    message, created = services.message_create(room=room, author=user, body=body, nonce=data.get("nonce"))
    # A retry with the same nonce answers with the original, and creates nothing.
    return (201 if created else 200), protocol.message_payload(message)


@endpoint("PATCH", "DELETE", writes=("PATCH", "DELETE"))
def message(request: HttpRequest, user: User, slug: str, message_id: int) -> tuple[int, dict[str, Any]]:
    room = _room(slug, user)
    if request.method == "PATCH":
        body = validation.required(_json_body(request), "body", '{"body": "..."}')
        changed = services.message_edit(room=room, message_id=message_id, user=user, body=body)
    else:
        changed = services.message_delete(room=room, message_id=message_id, user=user)
    return 200, protocol.message_payload(changed)


@csrf_exempt
def not_found(request: HttpRequest, **kwargs: Any) -> JsonResponse:
    return error_response(404, "not_found", f"There is no API endpoint at {request.path}; see docs/api.md.")


def json_errors_under_api(default_handler: Callable[..., HttpResponse], status: int, code: str, detail: str):
    """Wrap one of Django's error handlers (handler400 …) so that /api/ gets JSON, never an HTML page."""

    def handler(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if request.path.startswith("/api/"):
            return error_response(status, code, detail)
        return default_handler(request, *args, **kwargs)

    return handler


# --------------------------------------------------------------------------
# Long-poll
# --------------------------------------------------------------------------

# Database work for a poll runs on one thread that all polls share, not in a
# thread of the request's own, and no connection stays with the poll while it
# waits. One, as for the sockets, not the loop's default pool (six threads on
# two cores): a thousand polls arriving at once kept six threads fighting over
# the GIL, and set-up cost 2.3 ms of CPU per poll instead of 1.6
# (docs/performance.md). The thread never waits on Redis: the poll's rate is
# counted on the loop.
POLL_DATABASE_THREADS = ThreadPoolExecutor(max_workers=1, thread_name_prefix="poll-db")
in_pool = functools.partial(database_sync_to_async, thread_sensitive=False, executor=POLL_DATABASE_THREADS)


@csrf_exempt
async def poll(request: HttpRequest, slug: str) -> JsonResponse:
    """Answer with messages after `after` as soon as there are any, or empty when `timeout` runs out."""
    try:
        if request.method != "GET":
            raise ApiError(405, "method_not_allowed", "Use GET.", {"Allow": "GET"})
        after = _int_param(request, "after", 0, 2**63 - 1, default=0)
        timeout = _int_param(request, "timeout", 1, settings.CHAT_POLL_MAX_TIMEOUT, default=25)
        user, room = await in_pool(_poll_room)(request, slug)
        await _check_rate_async(f"api:{user.pk}", settings.CHAT_API_REQUESTS_PER_MINUTE)
        if room is None:
            raise _room_not_found(slug)
    except ApiError as error:
        return _error_response(error)
    except ChatError as error:
        return _error_response(ApiError.from_chat_error(error))

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


def _poll_room(request: HttpRequest, slug: str) -> tuple[User, Room | None]:
    """Who asks, and the room if they may read it: one trip to the database thread."""
    user = identify(request)
    return user, selectors.room_readable(slug=slug, user=user)


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
# Health
# --------------------------------------------------------------------------


def healthz(request: HttpRequest) -> JsonResponse:
    """200 when the database and Redis both answer, else 503 naming the failing part."""
    checks: dict[str, str] = {}
    parts = [("database", _database_ping), ("redis", ephemeral.redis_ping)]
    if settings.CHANNEL_LAYER != "redis":  # one process on the in-memory layer: no Redis to ask
        parts.pop()
        checks["redis"] = "not used"
    for part, check in parts:
        try:
            check()
            checks[part] = "ok"
        except Exception as error:
            logger.warning("Health check: %s is down: %s", part, error)
            checks[part] = f"error: {type(error).__name__}"
    healthy = all(state == "ok" for state in checks.values())
    return JsonResponse(checks, status=200 if healthy else 503)


def _database_ping() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
