from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from channels.layers import get_channel_layer
from django.conf import settings

from chat import ephemeral, fanout, protocol, realtime, selectors, services

logger = logging.getLogger(__name__)

CLOSE_TRY_AGAIN_LATER = protocol.CLOSE_TRY_AGAIN_LATER
CLOSE_BAD_REQUEST = protocol.CLOSE_BAD_REQUEST
CLOSE_REMOVED = protocol.CLOSE_REMOVED


class RoomConsumer(AsyncWebsocketConsumer):
    """One socket in one room: replays what the client missed, then relays the room live."""

    room = None
    # The fast path's handle on this socket (chat/fanout.py), when it is on.
    local = None
    # This socket's member of the room's presence set (chat/ephemeral.py).
    presence = None
    heartbeat = None
    closing = False
    accepted = False
    # Set once this socket counts against its user's cap (CHAT_MAX_SOCKETS_PER_USER).
    socket_id = None
    # Live events at or below these were already sent by the resume replay.
    replayed_through = 0
    changes_through = 0

    async def __call__(self, scope, receive, send) -> None:
        if settings.CHAT_FAST_FANOUT:
            # The hub hands this socket its frames: no channel of its own, so no
            # Redis subscription per socket, and no handshake that fails (HTTP
            # 500) before connect() can say "unavailable" while Redis is away.
            self.channel_layer_alias = None
        await super().__call__(scope, receive, send)

    async def connect(self) -> None:
        try:
            await self.join()
        except LAYER_ERRORS as error:
            # Redis is away: nothing was stored for this socket, and the client
            # resumes from the database once it is back.
            realtime.layer_down(error)
            for cleanup in (self.unsubscribe, self.release_socket):
                with contextlib.suppress(*LAYER_ERRORS):
                    await cleanup()
            if not self.accepted:
                await self.accept()
            await self.close_with(protocol.CLOSE_SERVICE_RESTART, protocol.unavailable_frame())
        else:
            realtime.layer_back()

    async def accept(self, subprotocol: str | None = None) -> None:
        await super().accept(subprotocol)
        self.accepted = True

    async def close(self, code: int | None = None, reason: str | None = None) -> None:
        try:
            await super().close(code=code, reason=reason)
        except Exception:
            # daphne (autobahn) refuses close codes other than 1000 and 3000-4999,
            # such as 1012 and 1013: close with its 1000. The client reconnects
            # either way, and the error frame before the close said why.
            await super().close()

    async def join(self) -> None:
        user = self.scope["user"]
        slug = self.scope["url_route"]["kwargs"]["slug"]
        # Closing before accept() refuses the handshake: the client gets no frames.
        if not user.is_authenticated:
            await self.close()
            return
        entered = await database_sync_to_async(services.room_enter)(slug=slug, user=user)
        if entered is None or entered[0].is_archived:  # no such room, private to others, or read-only
            await self.close()
            return
        self.room = entered[0]
        try:
            after = _query_seq(self.scope, "after")
            changes_after = _query_seq(self.scope, "changes_after")
        except ValueError as error:
            await self.refuse(CLOSE_BAD_REQUEST, "invalid_after", f'"{error}" must be a whole number of 0 or more.')
            return
        socket_id = uuid.uuid4().hex
        cap = settings.CHAT_MAX_SOCKETS_PER_USER
        if not await ephemeral.socket_open(user_id=user.pk, socket_id=socket_id, cap=cap):
            detail = f"You have {cap} chat windows open already; close one and reload."
            await self.refuse(protocol.CLOSE_TOO_MANY_SOCKETS, "too_many_sockets", detail)
            return
        self.socket_id = socket_id

        # Subscribe before querying: events published meanwhile are held
        # (by the hub, or in this consumer's queue, as dispatch is sequential)
        # until the replay is sent, so none is lost or sent twice.
        if settings.CHAT_FAST_FANOUT:
            send = self.scope.get("fanout.send", self.base_send)
            session = self.scope["session"].session_key or ""
            self.local = await _hub().join(self.room.pk, send, user.get_username(), session)
        else:
            await self.channel_layer.group_add(realtime.room_group(self.room), self.channel_name)
        if self.room.is_private and not await database_sync_to_async(selectors.membership_get)(
            room=self.room, user=user
        ):
            # Removed between the check above and the subscription, so the
            # removal's broadcast came too early to close this socket.
            await self.unsubscribe()
            await self.release_socket()
            await self.close()
            return
        await self.accept()

        if after is None:
            last_seq, last_change = await database_sync_to_async(selectors.room_cursors)(room=self.room)
        else:
            resume = await database_sync_to_async(selectors.message_resume)(
                room=self.room, after_seq=after, limit=settings.CHAT_RESUME_LIMIT, changes_after=changes_after
            )
            if resume.next_seq is not None:
                await self.send(protocol.gap_frame(after, resume.next_seq))
            if resume.cleared is not None:
                await self.send(protocol.encode(protocol.history_cleared_payload(*resume.cleared)))
            for message in resume.messages:
                await self.send(protocol.message_frame(message))
            for message in resume.changed:
                await self.send(protocol.change_frame(message))
            last_seq, last_change = resume.last_seq, resume.last_change
        await self.send(protocol.ready_frame(last_seq, last_change))
        if self.local is not None:
            _hub().ready(self.local, last_seq, last_change)
        else:
            self.replayed_through, self.changes_through = last_seq, last_change
        await self.arrive()

    async def refuse(self, code: int, error: str, detail: str) -> None:
        """Accept only to say why, then close: a refused handshake would tell the client nothing."""
        await self.accept()
        await self.close_with(code, protocol.error_frame(error, detail))

    async def close_with(self, code: int, frame: str) -> None:
        """Send the error frame that says why, then close (once, however many events ask)."""
        if self.closing:
            return
        self.closing = True
        await self.send(frame)
        await self.close(code=code)

    async def arrive(self) -> None:
        """Count this socket as present, and keep it counted while it lives."""
        self.presence = ephemeral.presence_member(self.scope["user"].get_username(), self.socket_id)
        users, published = await self.update_presence(add=self.presence)
        if not published:  # a published list reaches this socket too
            await self.send(protocol.presence_frame(users))
        self.heartbeat = asyncio.get_running_loop().create_task(self.stay_present())

    async def stay_present(self) -> None:
        # Refreshing the member also drops those of sockets whose process died.
        while True:
            await asyncio.sleep(settings.CHAT_PRESENCE_TTL / 3)
            try:
                await self.update_presence(add=self.presence)
                await ephemeral.socket_refresh(user_id=self.scope["user"].pk, socket_id=self.socket_id)
            except Exception:
                logger.warning("Refreshing presence in room %s failed", self.room.slug, exc_info=True)

    async def leave(self) -> None:
        self.heartbeat.cancel()
        await self.update_presence(remove=self.presence)

    async def update_presence(self, *, add: str | None = None, remove: str | None = None) -> tuple[list[str], bool]:
        """Change this socket's presence entry; tell the room when its list changed. Return (users, told)."""
        before, users = await ephemeral.presence_update(room_id=self.room.pk, add=add, remove=remove)
        if users == before:
            return users, False
        await realtime.publish_presence(room_id=self.room.pk, users=users)
        return users, True

    async def disconnect(self, code: int) -> None:
        # Each step on its own: with Redis away one failing must not skip the others.
        steps = [self.leave] if self.presence is not None else []
        for step in [*steps, self.unsubscribe, self.release_socket]:
            try:
                await step()
            except LAYER_ERRORS as error:
                realtime.layer_down(error)

    async def release_socket(self) -> None:
        if self.socket_id is not None:
            socket_id, self.socket_id = self.socket_id, None
            await ephemeral.socket_close(user_id=self.scope["user"].pk, socket_id=socket_id)

    async def unsubscribe(self) -> None:
        if self.local is not None:
            local, self.local = self.local, None
            await _hub().leave(self.room.pk, local)
        elif self.room is not None and self.channel_layer is not None:
            await self.channel_layer.group_discard(realtime.room_group(self.room), self.channel_name)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        try:
            command = protocol.parse_client_frame(text_data, bytes_data)
        except protocol.FrameError as error:
            await self.send(protocol.error_frame(error.code, error.detail, error.nonce))
            return
        try:
            await self.handle(command)
        except LAYER_ERRORS as error:
            # A saved message is safe whatever happens here (it is published
            # after its commit, robustly); the client reconnects and resumes.
            realtime.layer_down(error)
            await self.close_with(protocol.CLOSE_SERVICE_RESTART, protocol.unavailable_frame())

    async def handle(self, command: protocol.ClientCommand) -> None:
        if isinstance(command, protocol.SendCommand):
            await self.send_message(command)
        elif isinstance(command, protocol.EditCommand | protocol.DeleteCommand):
            await self.change_message(command)
        elif isinstance(command, protocol.ReadCommand):
            await database_sync_to_async(services.read_mark)(room=self.room, user=self.scope["user"], seq=command.seq)
        elif isinstance(command, protocol.TypingCommand):
            username = self.scope["user"].get_username()
            if await ephemeral.typing_allowed(room_id=self.room.pk, username=username):
                await realtime.publish_typing(room_id=self.room.pk, username=username)
        else:
            messages, has_more = await database_sync_to_async(selectors.message_list)(
                room=self.room, before_seq=command.before, limit=command.limit
            )
            await self.send(protocol.history_frame(messages, has_more))

    async def send_message(self, command: protocol.SendCommand) -> None:
        try:
            message, created = await database_sync_to_async(services.message_create)(
                room=self.room, author=self.scope["user"], body=command.body, nonce=command.nonce
            )
        except services.ChatError as error:
            await self.send(
                protocol.error_frame(error.code, error.detail, command.nonce, retry_after=error.retry_after)
            )
            return
        except Exception:
            logger.exception("Saving a message in room %s failed", self.room.slug)
            await self.send(
                protocol.error_frame("not_saved", "The message was not saved; send it again.", command.nonce)
            )
            return
        if not created:
            # A retry: the original was broadcast already, so answer only this socket.
            await self.send(protocol.message_frame(message))

    async def change_message(self, command: protocol.EditCommand | protocol.DeleteCommand) -> None:
        user = self.scope["user"]
        try:
            if isinstance(command, protocol.EditCommand):
                await database_sync_to_async(services.message_edit)(
                    room=self.room, message_id=command.id, user=user, body=command.body
                )
            else:
                await database_sync_to_async(services.message_delete)(room=self.room, message_id=command.id, user=user)
        except services.ChatError as error:
            await self.send(protocol.error_frame(error.code, error.detail))
        # Success is the broadcast that every socket in the room, this one included, receives.

    async def chat_change(self, event: dict) -> None:
        """Relay an edit or deletion (the fast path off)."""
        if event["change"] > self.changes_through:
            await self.send(protocol.encode(event["frame"]))

    async def chat_presence(self, event: dict) -> None:
        """Relay who is online now (the fast path off)."""
        await self.send(protocol.presence_frame(event["users"]))

    async def chat_removal(self, event: dict) -> None:
        """Close this socket if its user was removed from the room (the fast path off)."""
        if event["user"] == self.scope["user"].get_username():
            await self.close_with(CLOSE_REMOVED, protocol.removed_frame())

    async def chat_signed_out(self, event: dict) -> None:
        """Close this socket if its browser session signed out (the fast path off)."""
        if event["session"] == self.scope["session"].session_key:
            await self.close_with(protocol.CLOSE_SIGNED_OUT, protocol.signed_out_frame())

    async def chat_room_closed(self, event: dict) -> None:
        """Close this socket: the room was archived (the fast path off)."""
        await self.close_with(protocol.CLOSE_ROOM_ARCHIVED, protocol.archived_frame())

    async def chat_typing(self, event: dict) -> None:
        """Relay another user's typing signal (the fast path off)."""
        if event["user"] != self.scope["user"].get_username():
            await self.send(protocol.typing_frame(event["user"]))

    async def chat_message(self, event: dict) -> None:
        """Forward a published message to this socket (the fast path off)."""
        if self.closing or event["seq"] <= self.replayed_through:
            return
        if realtime.backlog(self.channel_layer, self.channel_name) > settings.CHAT_SOCKET_MAX_BACKLOG:
            # Too far behind to catch up live; the client resumes from the database.
            self.closing = True
            await self.close(code=CLOSE_TRY_AGAIN_LATER)
            return
        await self.send(protocol.message_frame_from_payload(event["message"]))


LAYER_ERRORS = realtime.LAYER_ERRORS


def _hub() -> fanout.RoomHub:
    """This process's fast path: one subscription per room for all its sockets."""
    return fanout.hub_for(get_channel_layer())


def _query_seq(scope: dict, name: str) -> int | None:
    """Return a cursor the client resumes from (?after=, ?changes_after=), None when absent.

    Raises ValueError, carrying the parameter's name, when it is malformed.
    """
    values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get(name)
    if not values:
        return None
    value = values[-1]
    if not (value.isascii() and value.isdigit()) or len(value) > 18:
        raise ValueError(name)
    return int(value)
