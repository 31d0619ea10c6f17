"""The Channels tutorial's chat consumer on this site's stack: chatbench's baseline.

Serve with `uvicorn bench.tutorial_asgi:application` (or daphne). Each socket
joins the room's group on connect, sends through the same service (which saves,
then group_sends after the commit) and encodes every event it receives itself,
as docs.channels' tutorial does. Only chatbench uses it.
"""

from __future__ import annotations

import json
import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatsite.settings")
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.db import database_sync_to_async  # noqa: E402
from channels.generic.websocket import AsyncWebsocketConsumer  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.urls import path  # noqa: E402

from chat import realtime, selectors, services  # noqa: E402


class TutorialConsumer(AsyncWebsocketConsumer):
    async def connect(self) -> None:
        slug = self.scope["url_route"]["kwargs"]["slug"]
        self.room = await database_sync_to_async(selectors.room_get_open)(slug=slug)
        if self.room is None or not self.scope["user"].is_authenticated:
            await self.close()
            return
        self.group = realtime.room_group(self.room)
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()

    async def disconnect(self, code: int) -> None:
        if getattr(self, "group", None):
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        data = json.loads(text_data)
        await database_sync_to_async(services.message_create)(
            room=self.room, author=self.scope["user"], body=data["body"], nonce=data.get("nonce")
        )

    async def chat_message(self, event: dict) -> None:
        await self.send(text_data=json.dumps({"type": "message", "message": event["message"]}))

    async def chat_presence(self, event: dict) -> None:
        """Not the tutorial's: chatbench reads history through the site's own socket, which announces itself."""


application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": AllowedHostsOriginValidator(
            AuthMiddlewareStack(URLRouter([path("ws/tutorial/rooms/<slug:slug>/", TutorialConsumer.as_asgi())]))
        ),
    }
)
