from __future__ import annotations

import math
from datetime import date, datetime, time, timedelta

from django.conf import settings
from django.contrib import messages as flash
from django.contrib.auth import login
from django.contrib.auth.decorators import login_required
from django.contrib.auth.models import User
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import FileResponse, Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render, resolve_url
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from chat import files, notifications, protocol, selectors, services
from chat import search as search_module
from chat.forms import MemberForm, NotificationSettingsForm, NotifyLevelForm, RoomForm, SearchForm, SignupForm
from chat.models import Attachment, Membership, NotifyLevel, Room


def authenticated_user(request: HttpRequest) -> User:
    """Return the signed-in user of a @login_required view or the admin (they check, but do not narrow the type)."""
    if not request.user.is_authenticated:
        raise PermissionDenied
    return request.user


@require_GET
def room_list(request: HttpRequest) -> HttpResponse:
    rooms = selectors.room_list(user=request.user)
    return render(request, "chat/room_list.html", {"rooms": rooms, "form": RoomForm()})


@require_POST
@login_required
def room_create(request: HttpRequest) -> HttpResponse:
    form = RoomForm(request.POST)
    if form.is_valid():
        try:
            room = services.room_create(created_by=authenticated_user(request), **form.cleaned_data)
        except ValidationError as error:
            form.add_error(None, error)
        else:
            return redirect("room-detail", slug=room.slug)
    response = render(request, "chat/room_list.html", {"rooms": selectors.room_list(user=request.user), "form": form})
    response.status_code = 400
    return response


@require_GET
@login_required
def room_detail(request: HttpRequest, slug: str) -> HttpResponse:
    room, membership = _visible_or_404(request, slug)
    can_moderate = (membership is not None and membership.can_moderate) or request.user.is_staff
    members = selectors.room_members(room=room)
    if not room.is_private:  # everyone who opened it is a member: list only who runs it
        members = [member for member in members if member.can_moderate]
    messages, has_more = selectors.message_list(room=room, limit=settings.CHAT_PAGE_MESSAGES)
    user_settings = notifications.settings_for(authenticated_user(request))
    notify = notifications.level_in(membership=membership, room=room, user_settings=user_settings)
    default_level = NotifyLevel.ALL if room.is_direct else user_settings.default_notify
    context = {
        "room": room,
        # The sidebar: the rooms this user may see, with unread counts (one query).
        "rooms": selectors.room_list(user=request.user),
        "membership": membership,
        "members": members,
        "member_form": MemberForm(),
        "chat_messages": messages,  # "messages" is the flash messages of django.contrib.messages
        "has_more": has_more,
        "pinned_messages": selectors.pinned_messages(room=room),
        # In a direct conversation, who the reader talks to (the page's title).
        "direct_with": next((m.user.get_username() for m in members if m.user_id != request.user.pk), None)
        if room.is_direct
        else None,
        "protocol": protocol.client_constants(),
        # The client starts from exactly what the server rendered.
        "client_config": {
            "room": room.slug,
            "lastSeq": messages[-1].seq if messages else room.last_seq,
            # Read with the room, before the messages: later edits reach the page on connect.
            "lastChange": room.last_change,
            "firstSeq": messages[0].seq if messages else None,
            "hasMore": has_more,
            "username": request.user.get_username(),
            # Nothing counts as new in a public room the user has not read before.
            "lastRead": membership.last_read_seq if membership is not None else room.last_seq,
            "canModerate": can_moderate,
            # Read receipts: "Seen by N" counts these, and `read_by` frames move them.
            "readMarks": selectors.read_marks(room=room),
            "readMarksMax": selectors.READ_MARKS_MAX,
            "archived": room.is_archived,
            "loginUrl": f"{resolve_url(settings.LOGIN_URL)}?next={request.path}",
            # Mentions and notifications (docs/notifications.md): the level in force here, and
            # whether @room from this reader mentions everyone.
            "notify": notify,
            "isMember": membership is not None,
            "mayMentionRoom": notifications.may_mention_room(room=room, user=authenticated_user(request)),
            # ?at=<seq> (a search result, a mention, an email): the page goes to that message once live.
            "jumpTo": _seq_in(request.GET.get("at"), room),
        },
        "notify_levels": NotifyLevel.choices,
        "notify_own": membership.notify if membership is not None else "",
        "notify_default_label": NotifyLevel(default_level).label,
    }
    return render(request, "chat/room_detail.html", context)


def _seq_in(value: str | None, room: Room) -> int | None:
    """A seq of the room, from a query parameter; None for anything else."""
    if not value or not value.isascii() or not value.isdigit():
        return None
    seq = int(value)
    return seq if 1 <= seq <= room.last_seq else None


@require_GET
@login_required
def direct_room(request: HttpRequest, username: str) -> HttpResponse:
    """Open the direct conversation with `username`, creating it the first time (as a Slack or Zulip link does).

    The one write a GET makes here: idempotent, and it makes an empty private
    room of two people, nothing anyone else can see.
    """
    try:
        room, _ = services.direct_room_open(user=authenticated_user(request), username=username)
    except services.ChatError as error:
        flash.error(request, error.detail)
        return redirect("room-list")
    return redirect("room-detail", slug=room.slug)


# The patterns page's panels, in the order they are shown.
PATTERNS = ("short", "long", "socket")
SHORT_POLL_INTERVAL_S = 3.0
# 240 polls a minute at most, well inside CHAT_API_REQUESTS_PER_MINUTE with the page's other requests.
SHORT_POLL_INTERVAL_RANGE_S = (0.25, 60.0)


@require_GET
@login_required
def room_patterns(request: HttpRequest, slug: str) -> HttpResponse:
    """Show the room through short polling, long-polling and the WebSocket side by side, with delays and costs."""
    room, _ = _visible_or_404(request, slug)
    # ?panels=short,socket runs only those (a benchmark measures one pattern's cost alone); none known: all.
    asked = set(request.GET.get("panels", "").split(","))
    panels = [pattern for pattern in PATTERNS if pattern in asked] or list(PATTERNS)
    context = {
        "room": room,
        "panels": panels,
        "protocol": protocol.client_constants(),
        "client_config": {
            "room": room.slug,
            # Every panel starts here: it shows what arrives while the page is open.
            "lastSeq": room.last_seq,
            "lastChange": room.last_change,
            "panels": panels,
            "interval": _short_poll_interval(request.GET.get("interval")),
            "intervalRange": SHORT_POLL_INTERVAL_RANGE_S,
            "loginUrl": f"{resolve_url(settings.LOGIN_URL)}?next={request.path}",
        },
    }
    return render(request, "chat/patterns.html", context)


def _short_poll_interval(value: str | None) -> float:
    try:
        seconds = float(value or SHORT_POLL_INTERVAL_S)
    except ValueError:
        return SHORT_POLL_INTERVAL_S
    if math.isnan(seconds):
        return SHORT_POLL_INTERVAL_S
    low, high = SHORT_POLL_INTERVAL_RANGE_S
    return min(max(seconds, low), high)


@require_POST
@login_required
def member_add(request: HttpRequest, slug: str) -> HttpResponse:
    room, _ = _visible_or_404(request, slug)
    form = MemberForm(request.POST)
    if not form.is_valid():
        flash.error(request, "Give the username of the person to add.")
        return redirect("room-detail", slug=room.slug)
    try:
        membership = services.member_add(room=room, actor=authenticated_user(request), **form.cleaned_data)
    except services.ChatError as error:
        flash.error(request, error.detail)
    else:
        flash.success(request, f"{membership.user.get_username()} is a {membership.role} of {room.name}.")
    return redirect("room-detail", slug=room.slug)


@require_POST
@login_required
def member_remove(request: HttpRequest, slug: str, username: str) -> HttpResponse:
    room, _ = _visible_or_404(request, slug)
    try:
        services.member_remove(room=room, actor=authenticated_user(request), username=username)
    except services.ChatError as error:
        flash.error(request, error.detail)
    else:
        flash.success(request, f"{username} was removed from {room.name}.")
    return redirect("room-detail", slug=room.slug)


def _visible_or_404(request: HttpRequest, slug: str) -> tuple[Room, Membership | None]:
    visible = selectors.room_visible(slug=slug, user=authenticated_user(request))
    if visible is None:  # missing, or private to this user: both look the same
        raise Http404("No such room.")
    return visible


@require_POST
@login_required
def room_notify(request: HttpRequest, slug: str) -> HttpResponse:
    """Set the reader's notification level in the room (the page's form; scripts use PATCH …/membership/)."""
    room, _ = _visible_or_404(request, slug)
    form = NotifyLevelForm(request.POST)
    if not form.is_valid():
        flash.error(request, "Choose a notification level.")
        return redirect("room-detail", slug=room.slug)
    try:
        notifications.notify_set(room=room, user=authenticated_user(request), level=form.cleaned_data["notify"])
    except services.ChatError as error:
        flash.error(request, error.detail)
    else:
        flash.success(request, "Notifications for this room are saved.")
    return redirect("room-detail", slug=room.slug)


@require_GET
@login_required
def mentions(request: HttpRequest) -> HttpResponse:
    """The messages that mention the reader, newest first, each linking into its room at that message."""
    try:
        before_id = int(request.GET["before"]) if request.GET.get("before") else None
    except ValueError:
        before_id = None
    page = selectors.mentions_of(
        user=authenticated_user(request), before_id=before_id, limit=selectors.MENTIONS_PAGE_SIZE + 1
    )
    shown = page[: selectors.MENTIONS_PAGE_SIZE]
    marks = selectors.read_positions(user=authenticated_user(request), room_ids={m.room_id for m in shown})
    context = {
        "mentions": [(message, message.seq > marks.get(message.room_id, 0)) for message in shown],
        "older": shown[-1].pk if len(page) > len(shown) else None,
    }
    return render(request, "chat/mentions.html", context)


@require_GET
@login_required
def search(request: HttpRequest) -> HttpResponse:
    """Search every room the reader may read (the header's box); results link into the room at the message."""
    user = authenticated_user(request)
    form = SearchForm(request.GET or None, rooms=selectors.room_list(user=user))
    context: dict[str, object] = {"form": form, "results": None}
    status = 200
    if form.is_bound and form.is_valid():
        filters = form.cleaned_data
        room = None
        if filters["room"]:
            visible = selectors.room_visible(slug=filters["room"], user=user)
            room = visible[0] if visible is not None else None
        try:
            hits = selectors.message_search(
                user=user,
                query=filters["q"],
                room=room,
                author_name=filters["author"] or None,
                after=_day_start(filters["after"]),
                before=_day_start(filters["before"], next_day=True),
                limit=search_module.RESULTS_MAX,
            )
        except services.ChatError as error:
            form.add_error("q", error.detail)
            status = 400
        else:
            context["results"] = [
                {**protocol.search_result(hit, user.get_username()), "message": hit.message} for hit in hits
            ]
    elif form.is_bound:
        status = 400
    return render(request, "chat/search.html", context, status=status)


def _day_start(day: date | None, *, next_day: bool = False) -> datetime | None:
    """Midnight (the site's time zone) at the start of `day`, or of the day after: the form's dates are whole days."""
    if day is None:
        return None
    start = datetime.combine(day + timedelta(days=1) if next_day else day, time.min)
    return timezone.make_aware(start)


@require_http_methods(["GET", "POST"])
@login_required
def notification_settings(request: HttpRequest) -> HttpResponse:
    user = authenticated_user(request)
    current = notifications.settings_for(user)
    initial = {
        "email": user.email,
        "email_notifications": current.email_notifications,
        "default_notify": current.default_notify,
    }
    form = NotificationSettingsForm(request.POST or None, initial=initial)
    if request.method == "POST" and form.is_valid():
        notifications.settings_update(user=user, **form.cleaned_data)
        flash.success(request, "Your settings are saved.")
        return redirect("settings")
    return render(request, "chat/settings.html", {"form": form}, status=400 if form.errors else 200)


@csrf_exempt  # the signed token is the credential: mail clients POST it with no session (RFC 8058)
@require_http_methods(["GET", "POST"])
def unsubscribe(request: HttpRequest, token: str) -> HttpResponse:
    """An email's one-click unsubscribe: GET asks to confirm (link scanners only GET), POST turns email off."""
    user = notifications.unsubscribe_user(token)
    if user is None:
        return render(request, "chat/unsubscribe.html", {"invalid": True}, status=400)
    if request.method == "POST":
        notifications.unsubscribe(user)
        return render(request, "chat/unsubscribe.html", {"done": True, "person": user})
    return render(request, "chat/unsubscribe.html", {"person": user})


@require_GET
@login_required
def attachment(request: HttpRequest, key: str, name: str) -> FileResponse:
    """A file of a message, for people who can read its room; 404 for anyone else, as for a missing file.

    Raster images are shown inline; everything else (SVG and HTML too) only
    downloads. Every file is sandboxed: no script of its own can run here.
    """
    found = _readable_attachment(request, key)
    inline = found.content_type in files.RASTER
    response = FileResponse(
        found.file.open("rb"), content_type=found.content_type, as_attachment=not inline, filename=found.name
    )
    return _file_headers(response)


@require_GET
@login_required
def attachment_thumbnail(request: HttpRequest, key: str) -> FileResponse:
    found = _readable_attachment(request, key)
    if not found.thumbnail:
        raise Http404("No thumbnail.")
    thumbnail = found.thumbnail.open("rb")
    is_png = thumbnail.read(8).startswith(b"\x89PNG")
    thumbnail.seek(0)
    response = FileResponse(thumbnail, content_type="image/png" if is_png else "image/jpeg")
    return _file_headers(response)


def _readable_attachment(request: HttpRequest, key: str) -> Attachment:
    found = Attachment.objects.select_related("room").filter(key=key).first()
    if found is None or not files.readable(found, authenticated_user(request)):
        raise Http404("No such file.")
    return found


def _file_headers(response: FileResponse) -> FileResponse:
    response.headers["Content-Security-Policy"] = "sandbox"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Cache-Control"] = "private, max-age=3600"  # never a shared cache: access is per person
    return response


@require_http_methods(["GET", "POST"])
def signup(request: HttpRequest) -> HttpResponse:
    form = SignupForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        user = form.save()
        login(request, user, backend="django.contrib.auth.backends.ModelBackend")
        return redirect("room-list")
    return render(request, "registration/signup.html", {"form": form}, status=400 if form.errors else 200)
