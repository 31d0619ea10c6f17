"""Middleware of the site's own."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.conf import settings
from django.contrib.auth import middleware as auth_middleware
from django.contrib.messages import middleware as messages_middleware
from django.contrib.sessions import middleware as sessions_middleware
from django.http import HttpRequest, HttpResponse
from django.middleware import clickjacking, common, csrf, security
from django.template import loader
from whitenoise.middleware import WhiteNoiseMiddleware

from chat import api, database, protocol


class SyncAndAsync:
    """Runs natively in Django's sync and async middleware chains.

    Django runs a sync-only middleware, and everything inside it, async views
    included, in a thread of the request's own: a long-poll would hold a
    thread for as long as it waits.
    """

    sync_capable = True
    async_capable = True

    def _choose_mode(self, get_response) -> None:
        self.async_mode = iscoroutinefunction(get_response)
        if self.async_mode:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest):
        return self._acall(request) if self.async_mode else self._call(request)

    def _call(self, request: HttpRequest) -> HttpResponse:
        raise NotImplementedError

    async def _acall(self, request: HttpRequest) -> HttpResponse:
        raise NotImplementedError


class OnTheLoop:
    """Mixed into Django's own middleware: in the async chain, hooks that do no I/O run on the event loop.

    MiddlewareMixin runs each process_request and process_response through
    sync_to_async, a thread hop each: six or seven per request in this stack.
    A thousand long-polls woken by one message queued their six response hops
    on their one shared thread (chat/longpoll.py) and answered over a second
    after the post. No `process_request` of these does I/O (the session and
    the user are lazy); the response hooks that may write (saving a modified
    session, storing flash messages) say so in `response_in_thread` and still
    go to a thread, as does a form body's CSRF check. The sync chain (WSGI,
    the test client) is Django's own, unchanged.
    """

    async_mode: bool
    get_response: Callable

    def response_in_thread(self, request: HttpRequest, response: HttpResponse) -> bool:
        return False

    async def __acall__(self, request: HttpRequest) -> HttpResponse:
        process_request = getattr(self, "process_request", None)
        response = process_request(request) if process_request is not None else None
        response = response or await self.get_response(request)
        process_response = getattr(self, "process_response", None)
        if process_response is not None:
            if self.response_in_thread(request, response):
                response = await sync_to_async(process_response, thread_sensitive=True)(request, response)
            else:
                response = process_response(request, response)
        return response


class SecurityMiddleware(OnTheLoop, security.SecurityMiddleware):
    """Headers and the HTTPS redirect: no I/O."""


class SessionMiddleware(OnTheLoop, sessions_middleware.SessionMiddleware):
    """Creating the (lazy) session store is no I/O; saving a modified session is a database write."""

    def response_in_thread(self, request: HttpRequest, response: HttpResponse) -> bool:
        session = getattr(request, "session", None)
        return session is not None and (session.modified or settings.SESSION_SAVE_EVERY_REQUEST)


class CommonMiddleware(OnTheLoop, common.CommonMiddleware):
    """URL checks and Content-Length: no I/O."""


class CsrfViewMiddleware(OnTheLoop, csrf.CsrfViewMiddleware):
    """The token lives in a cookie (not the session): only checking a form body means reading and parsing it."""

    def __init__(self, get_response) -> None:
        super().__init__(get_response)
        if self.async_mode:
            # Django sends a sync process_view to a thread, and awaits a coroutine as it is.
            self.process_view = self._process_view_async  # type: ignore[method-assign, assignment]

    async def _process_view_async(self, request: HttpRequest, view, args, kwargs) -> HttpResponse | None:
        check = csrf.CsrfViewMiddleware.process_view
        if request.method in ("GET", "HEAD", "OPTIONS", "TRACE") or getattr(view, "csrf_exempt", False):
            return check(self, request, view, args, kwargs)
        return await sync_to_async(check, thread_sensitive=True)(self, request, view, args, kwargs)


class AuthenticationMiddleware(OnTheLoop, auth_middleware.AuthenticationMiddleware):
    """request.user is lazy: the lookup happens where it is used, in the view."""


class MessageMiddleware(OnTheLoop, messages_middleware.MessageMiddleware):
    """Flash messages are stored only when a view used or added some (then the session may be read)."""

    def response_in_thread(self, request: HttpRequest, response: HttpResponse) -> bool:
        storage = getattr(request, "_messages", None)
        return storage is not None and (storage.used or storage.added_new)


class XFrameOptionsMiddleware(OnTheLoop, clickjacking.XFrameOptionsMiddleware):
    """One header: no I/O."""


class ResponseMiddleware(SyncAndAsync):
    """A middleware that only adds to the response, in either chain; `finish` says what."""

    def __init__(self, get_response) -> None:
        self.get_response = get_response
        self._choose_mode(get_response)

    def _call(self, request: HttpRequest) -> HttpResponse:
        received = time.time()
        return self.finish(request, self.get_response(request), received)

    async def _acall(self, request: HttpRequest) -> HttpResponse:
        received = time.time()
        return self.finish(request, await self.get_response(request), received)

    def finish(self, request: HttpRequest, response: HttpResponse, received: float) -> HttpResponse:
        """Return the response; `received` is when the request reached this middleware (time.time())."""
        raise NotImplementedError


class ContentSecurityPolicyMiddleware(ResponseMiddleware):
    """Sends settings.CONTENT_SECURITY_POLICY with every response (Django 5.2 has no CSP of its own)."""

    def finish(self, request: HttpRequest, response: HttpResponse, received: float) -> HttpResponse:
        if settings.CONTENT_SECURITY_POLICY:
            response.headers.setdefault("Content-Security-Policy", settings.CONTENT_SECURITY_POLICY)
        return response


class ServerTimeMiddleware(ResponseMiddleware):
    """Stamps API responses with the server's clock: when the request came in and when the answer left.

    X-Server-Received and X-Server-Time, in ms since the epoch: with its own
    send and receive times, a client estimates its clock's offset the way NTP
    does, whatever the server spent on the request (a long-poll waits up to
    25 s). The patterns page measures delivery delays with it.
    """

    def finish(self, request: HttpRequest, response: HttpResponse, received: float) -> HttpResponse:
        if request.path_info.startswith("/api/"):
            response.headers["X-Server-Received"] = f"{received * 1000:.1f}"
            response.headers["X-Server-Time"] = f"{time.time() * 1000:.1f}"
        return response


class StaticFilesMiddleware(SyncAndAsync, WhiteNoiseMiddleware):
    """WhiteNoise (sync-only as it comes), able to sit in the async chain."""

    def __init__(self, get_response, **kwargs) -> None:
        WhiteNoiseMiddleware.__init__(self, get_response, **kwargs)
        self._choose_mode(get_response)

    def _call(self, request: HttpRequest) -> HttpResponse:
        return WhiteNoiseMiddleware.__call__(self, request)

    async def _acall(self, request: HttpRequest) -> HttpResponse:
        static_file = self.find_file(request.path_info) if self.autorefresh else self.files.get(request.path_info)
        if static_file is not None:
            return self.serve(static_file, request)
        return await self.get_response(request)


class DatabaseUnavailableMiddleware(SyncAndAsync):
    """Answers 503 while the database is unreachable, instead of a 500 with a traceback per request.

    Pages get templates/503.html, the API its JSON error shape with code
    `database_unavailable`; both say `Retry-After`. The outage is logged once
    (chat/database.py). Last in MIDDLEWARE, so the answer still passes every
    other middleware's response step (the security headers, the API's clock).
    """

    def __init__(self, get_response) -> None:
        self.get_response = get_response
        self._choose_mode(get_response)

    def _call(self, request: HttpRequest) -> HttpResponse:
        return self.get_response(request)

    async def _acall(self, request: HttpRequest) -> HttpResponse:
        return await self.get_response(request)

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        if not isinstance(exception, database.DATABASE_ERRORS):
            return None  # Django's own handling: a 500 and the traceback in the log
        database.database_down(exception)
        response = database_unavailable_response(request)
        # The outage is logged once, above; not Django's "Service Unavailable" line per request too.
        response._has_been_logged = True  # type: ignore[attr-defined]
        return response


def database_unavailable_response(request: HttpRequest) -> HttpResponse:
    headers = {"Retry-After": str(database.RETRY_AFTER)}
    if request.path.startswith("/api/"):
        detail = f"The database is briefly unavailable; try again in {database.RETRY_AFTER} s."
        return api.error_response(503, "database_unavailable", detail, headers)
    # Rendered without the request: no context processor may look up the session or the user.
    return HttpResponse(loader.render_to_string("503.html"), status=503, headers=headers)


class DatabaseUnavailableHandshake:
    """ASGI middleware around the WebSocket stack's session and user lookup (channels' AuthMiddleware).

    While the database is unreachable that lookup fails before any consumer
    runs; the server would refuse the handshake with an HTTP 500 and log a
    traceback. Instead the socket is told `unavailable` and closed with 1012,
    as the consumer does when the database fails during its own handshake,
    and the page reconnects with backoff.
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        received = False

        async def receive_noted():
            nonlocal received
            received = True
            return await receive()

        try:
            return await self.app(scope, receive_noted, send)
        except database.DATABASE_ERRORS as error:
            if received:  # the consumer had started: not a failed lookup, and not for us to answer
                raise
            database.database_down(error)
            await receive()  # websocket.connect
            await send({"type": "websocket.accept"})
            await send({"type": "websocket.send", "text": protocol.unavailable_frame()})
            try:
                await send({"type": "websocket.close", "code": protocol.CLOSE_SERVICE_RESTART})
            except Exception:
                await send({"type": "websocket.close"})  # daphne refuses 1012 (see RoomConsumer.close)


class RequestBodyLimit:
    """ASGI middleware: refuse an HTTP request whose body would pass `max_bytes`, before Django reads it.

    Django's ASGI handler reads a whole body into a temporary file before any
    view or middleware sees the request, whatever its size; an upload's own
    limit (CHAT_UPLOAD_MAX_BYTES) is checked only after that. Here a declared
    Content-Length over the cap is answered 413 at once, and a body that keeps
    coming past it (chunked, or lying) is cut off with 413 too.
    """

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                return await self._refuse(send)
        received = 0

        async def receive_counted():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge
            return message

        try:
            return await self.app(scope, receive_counted, send)
        except _TooLarge:
            return await self._refuse(send)

    async def _refuse(self, send) -> None:
        body = json.dumps(
            {"error": {"code": "request_too_large", "detail": f"Requests can be at most {self.max_bytes} bytes."}}
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass
