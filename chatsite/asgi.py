"""ASGI entry point: HTTP goes to Django, WebSockets to the chat consumers.

Serve with `daphne chatsite.asgi:application`.
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatsite.settings")
# Django must be set up before anything imports models.
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.conf import settings  # noqa: E402

from chat.fanout import DirectSend  # noqa: E402
from chat.longpoll import SharedSyncThread  # noqa: E402
from chat.routing import websocket_urlpatterns  # noqa: E402
from chatsite import collector  # noqa: E402
from chatsite.middleware import DatabaseUnavailableHandshake, RequestBodyLimit  # noqa: E402

application = ProtocolTypeRouter(
    {
        # The largest body: an upload and its multipart envelope.
        "http": RequestBodyLimit(SharedSyncThread(django_asgi_app), settings.CHAT_REQUEST_MAX_BYTES),
        "websocket": DirectSend(
            AllowedHostsOriginValidator(
                DatabaseUnavailableHandshake(AuthMiddlewareStack(URLRouter(websocket_urlpatterns)))
            )
        ),
    }
)

# Last: everything start-up made is frozen out of the collector's walks.
collector.configure(settings.CHAT_GC_FULL_EVERY)
