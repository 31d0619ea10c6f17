from __future__ import annotations

import contextlib
import functools
import logging
import uuid
from collections.abc import Callable
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings

from chat import database, ephemeral, fanout, presence, protocol, realtime, selectors, serversend, services, validation
from chat.models import Message, Room
from chat.validation import ChatError

logger = logging.getLogger(__name__)


class RoomConsumer(AsyncWebsocketConsumer):
    """One socket in one room: replays what the client missed, then the process's hub relays the room live."""

    # The hub (chat/fanout.py) hands this socket its frames: no layer channel of
    # its own, so no Redis subscription per socket, and no handshake that fails
    # (HTTP 500) before connect() can say "unavailable" while Redis is away.
    channel_layer_alias = None
    room: Room | None = None
    # The hub's handle on this socket, once it is subscribed.
    local: fanout.LocalSocket | None = None
    # This socket in the room's presence (chat/presence.py), once it counts there.
    present: presence.Presence | None = None
    closing = False
    accepted = False
    # Set once this socket counts against its user's cap (CHAT_MAX_SOCKETS_PER_USER).
    socket_id: str | None = None

    @property
    def joined_room(self) -> Room:
        """Return the room; frames are received only once join() has set it and accepted the socket."""
        assert self.room is not None, "The socket has not joined a room yet."
        return self.room

    async def connect(self) -> None:
        try:
            await self.join()
        except serversend.CLIENT_GONE:
            return  # the client left during the handshake; disconnect() cleans up
        except LAYER_ERRORS as error:
            # Redis is away: nothing was stored for this socket, and the client
            # resumes from the database once it is back.
            realtime.layer_down(error)
            await self.give_up()
        except DATABASE_ERRORS as error:
            # The database is away: the same answer; the client resumes once it is back.
            database.database_down(error)
            await self.give_up()

    async def give_up(self) -> None:
        """Undo what join() did so far, then tell the client to come back (`unavailable`, 1012)."""
        for cleanup in (self.unsubscribe, self.release_socket):
            with contextlib.suppress(*LAYER_ERRORS):
                await cleanup()
        if not self.accepted:
            await self.accept()
        await self.close_with(protocol.CLOSE_SERVICE_RESTART, protocol.unavailable_frame())

    async def accept(self, subprotocol: str | None = None, headers=None) -> None:
        await super().accept(subprotocol)
        self.accepted = True

    async def close(self, code: int | bool | None = None, reason: str | None = None) -> None:
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
        room = await database_sync_to_async(selectors.room_readable)(slug=slug, user=user)
        if room is None or room.is_archived:  # no such room, private to others, or read-only
            await self.close()
            return
        self.room = room
        try:
            after = validation.query_int(_query_value(self.scope, "after"), "after", code="invalid_after")
            changes_after = validation.query_int(
                _query_value(self.scope, "changes_after"), "changes_after", code="invalid_after"
            )
        except ChatError as error:
            await self.refuse(protocol.CLOSE_BAD_REQUEST, error.code, error.detail)
            return
        socket_id = uuid.uuid4().hex
        cap = settings.CHAT_MAX_SOCKETS_PER_USER
        if not await ephemeral.socket_open(user_id=user.pk, socket_id=socket_id, cap=cap):
            detail = f"You have {cap} chat windows open already; close one and reload."
            await self.refuse(protocol.CLOSE_TOO_MANY_SOCKETS, "too_many_sockets", detail)
            return
        self.socket_id = socket_id

        # Subscribe before querying: the hub holds events published meanwhile
        # until the replay is sent, so none is lost or sent twice.
        send = self.scope.get("fanout.send", self.base_send)
        session = self.scope["session"].session_key or ""
        hub = fanout.hub()
        self.local = await hub.join(room.pk, send, user.get_username(), session)
        if room.is_private and not await database_sync_to_async(selectors.membership_get)(room=room, user=user):
            # Removed between the check above and the subscription, so the
            # removal's broadcast came too early to close this socket.
            await self.unsubscribe()
            await self.release_socket()
            await self.close()
            return
        await self.accept()

        settled = hub.settled_at(room.pk, after, changes_after if after is not None else None)
        if settled is not None:
            # The hub has handed this process's sockets exactly what the client has: nothing to read.
            last_seq, last_change = settled
        elif after is None:
            last_seq, last_change = await database_sync_to_async(selectors.room_cursors)(room=room)
        else:
            resume = await database_sync_to_async(selectors.message_resume)(
                room=room, after_seq=after, limit=settings.CHAT_RESUME_LIMIT, changes_after=changes_after
            )
            for frame in protocol.resume_frames(resume, after):
                await self.send(frame)
            last_seq, last_change = resume.last_seq, resume.last_change
        await self.send(protocol.ready_frame(last_seq, last_change))
        hub.ready(self.local, last_seq, last_change)
        self.present = await presence.arrive(room_id=room.pk, user=user, socket_id=socket_id)
        # A list told to the room reaches this socket too; None: Redis is away, and the hub said so.
        if not self.present.told_room and self.present.users is not None:
            await self.send(protocol.presence_frame(self.present.users))

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

    async def disconnect(self, code: int) -> None:
        # Each step on its own: with Redis away one failing must not skip the others.
        for step in (self.leave, self.unsubscribe, self.release_socket):
            try:
                await step()
            except LAYER_ERRORS as error:
                realtime.layer_down(error)

    async def leave(self) -> None:
        if self.present is not None:
            present, self.present = self.present, None
            await presence.leave(present)

    async def release_socket(self) -> None:
        if self.socket_id is not None:
            socket_id, self.socket_id = self.socket_id, None
            await ephemeral.socket_close(user_id=self.scope["user"].pk, socket_id=socket_id)

    async def unsubscribe(self) -> None:
        if self.local is not None:
            local, self.local = self.local, None
            await fanout.hub().leave(local)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        try:
            command = protocol.parse_client_frame(text_data, bytes_data)
        except protocol.FrameError as error:
            await self.send(protocol.error_frame(error.code, error.detail, error.nonce))
            return
        try:
            await self.handle(command)
        except serversend.CLIENT_GONE:
            return  # the client left; disconnect() cleans up
        except LAYER_ERRORS as error:
            # A saved message is safe whatever happens here (it is published
            # after its commit, robustly); the client reconnects and resumes.
            realtime.layer_down(error)
            await self.close_with(protocol.CLOSE_SERVICE_RESTART, protocol.unavailable_frame())
        except DATABASE_ERRORS as error:
            # The database is away: this frame gets an error and the socket stays
            # open; a send gets `not_saved` with its nonce, and is sent again.
            database.database_down(error)
            await self.send(protocol.database_unavailable_frame(command))

    async def handle(self, command: protocol.ClientCommand) -> None:
        if isinstance(command, protocol.SendCommand):
            await self.send_message(command)
        elif isinstance(
            command, protocol.EditCommand | protocol.DeleteCommand | protocol.ReactCommand | protocol.PinCommand
        ):
            await self.change_message(command)
        elif isinstance(command, protocol.ReadCommand):
            marked = await database_sync_to_async(services.read_mark)(
                room=self.joined_room, user=self.scope["user"], seq=command.seq
            )
            if marked is not None:
                presence.read_advanced(
                    room_id=self.joined_room.pk, username=self.scope["user"].get_username(), seq=marked
                )
        elif isinstance(command, protocol.TypingCommand):
            await presence.typing(room_id=self.joined_room.pk, username=self.scope["user"].get_username())
        elif command.around is not None:
            messages, has_more = await database_sync_to_async(selectors.message_around)(
                room=self.joined_room, seq=command.around, limit=command.limit
            )
            await self.send(protocol.history_frame(messages, has_more, around=command.around))
        else:
            messages, has_more = await database_sync_to_async(selectors.message_list)(
                room=self.joined_room, before_seq=command.before, limit=command.limit
            )
            await self.send(protocol.history_frame(messages, has_more))

    async def send_message(self, command: protocol.SendCommand) -> None:
        author = self.scope["user"]
        try:
            await services.message_rate_check(author=author, body=command.body, attachments=list(command.attachments))
            message, created = await database_sync_to_async(services.message_create)(
                room=self.joined_room,
                author=author,
                body=command.body,
                nonce=command.nonce,
                reply_to=command.reply_to,
                attachments=list(command.attachments),
                rate_checked=True,
            )
        except ChatError as error:
            await self.send(
                protocol.error_frame(error.code, error.detail, command.nonce, retry_after=error.retry_after)
            )
            return
        except DATABASE_ERRORS:
            raise  # receive() answers not_saved, and logs the outage once rather than per message
        except Exception:
            logger.exception("Saving a message in room %s failed", self.joined_room.slug)
            await self.send(protocol.not_saved_frame(command.nonce))
            return
        if not created:
            # A retry: the original was broadcast already, so answer only this socket.
            await self.send(protocol.message_frame(message))

    async def change_message(
        self, command: protocol.EditCommand | protocol.DeleteCommand | protocol.ReactCommand | protocol.PinCommand
    ) -> None:
        change: Callable[..., Message]
        if isinstance(command, protocol.EditCommand):
            change = functools.partial(services.message_edit, body=command.body)
        elif isinstance(command, protocol.ReactCommand):
            change = functools.partial(services.message_react, emoji=command.emoji, rate_checked=True)
        elif isinstance(command, protocol.PinCommand):
            change = functools.partial(services.message_pin, pinned=command.pinned)
        else:
            change = services.message_delete
        try:
            if isinstance(command, protocol.ReactCommand):
                validation.reaction_emoji(command.emoji)  # bad input counts for nothing
                await services.reaction_rate_check(user=self.scope["user"])
            await database_sync_to_async(change)(room=self.joined_room, message_id=command.id, user=self.scope["user"])
        except ChatError as error:
            await self.send(protocol.error_frame(error.code, error.detail, retry_after=error.retry_after))
        # Success is the broadcast that every socket in the room, this one included, receives.


LAYER_ERRORS = realtime.LAYER_ERRORS
DATABASE_ERRORS = database.DATABASE_ERRORS


def _query_value(scope: dict, name: str) -> str | None:
    """Return the last value of a query-string parameter (?after=), None when absent."""
    values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get(name)
    return values[-1] if values else None
