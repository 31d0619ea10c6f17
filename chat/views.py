from __future__ import annotations

from django.conf import settings
from django.contrib.auth import login
from django.contrib.auth.decorators import login_required
from django.contrib.auth.forms import UserCreationForm
from django.core.exceptions import ValidationError
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render, resolve_url
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from chat import selectors, services
from chat.forms import RoomForm


@require_GET
def room_list(request: HttpRequest) -> HttpResponse:
    return render(request, "chat/room_list.html", {"rooms": selectors.room_list(), "form": RoomForm()})


@require_POST
@login_required
def room_create(request: HttpRequest) -> HttpResponse:
    form = RoomForm(request.POST)
    if form.is_valid():
        try:
            room = services.room_create(created_by=request.user, **form.cleaned_data)
        except ValidationError as error:
            form.add_error(None, error)
        else:
            return redirect("room-detail", slug=room.slug)
    response = render(request, "chat/room_list.html", {"rooms": selectors.room_list(), "form": form})
    response.status_code = 400
    return response


@require_GET
@login_required
def room_detail(request: HttpRequest, slug: str) -> HttpResponse:
    room = selectors.room_get_open(slug=slug)
    if room is None:
        raise Http404("No such room.")
    messages, has_more = selectors.message_list(room=room, limit=settings.CHAT_PAGE_MESSAGES)
    context = {
        "room": room,
        "messages": messages,
        "has_more": has_more,
        # The client starts from exactly what the server rendered.
        "client_config": {
            "room": room.slug,
            "lastSeq": messages[-1].seq if messages else room.last_seq,
            # Read with the room, before the messages: later edits reach the page on connect.
            "lastChange": room.last_change,
            "firstSeq": messages[0].seq if messages else None,
            "hasMore": has_more,
            "username": request.user.get_username(),
            "maxLength": settings.CHAT_MESSAGE_MAX_LENGTH,
            "loginUrl": f"{resolve_url(settings.LOGIN_URL)}?next={request.path}",
        },
    }
    return render(request, "chat/room_detail.html", context)


@require_http_methods(["GET", "POST"])
def signup(request: HttpRequest) -> HttpResponse:
    form = UserCreationForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        user = form.save()
        login(request, user, backend="django.contrib.auth.backends.ModelBackend")
        return redirect("room-list")
    return render(request, "registration/signup.html", {"form": form}, status=400 if form.errors else 200)
