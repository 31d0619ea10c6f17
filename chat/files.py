"""Files in messages: checked as hostile, stored under random keys, served only to readers (docs/files.md).

An upload is stored first, unattached, for its uploader alone; a `send` then
names up to ATTACHMENTS_MAX of the sender's own uploads in that room. The type
is decided from the content against an allow-list, never from the name.
Raster images get a thumbnail (Pillow: EXIF orientation applied, metadata
gone, an animation's first frame). Deleting the message, or clearing the
room's history, deletes its files.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth.models import User
from django.core.files.base import ContentFile
from django.core.files.uploadedfile import UploadedFile
from django.db import transaction
from django.db.models import Sum
from django.urls import reverse
from django.utils import timezone
from PIL import Image, ImageOps, UnidentifiedImageError

from chat import selectors, validation
from chat.models import Attachment, Message, Room
from chat.validation import ChatError

ATTACHMENTS_MAX = 10
NAME_MAX_LENGTH = 255
THUMBNAIL_BOX = (480, 360)
# Raster images are shown inline, as <img>. Everything else, SVG and HTML included,
# is only ever a download (Content-Disposition: attachment), sandboxed.
RASTER = {"image/png", "image/jpeg", "image/gif", "image/webp"}
_SNIFF_BYTES = 2048
_MAGIC = [
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"%PDF-", "application/pdf"),
    (b"PK\x03\x04", "application/zip"),  # also .docx, .xlsx, .odt
]
_HTML_MARKERS = ("<!doctype html", "<html", "<head", "<body", "<script", "<iframe", "<meta", "<a ", "<img")


def sniff(head: bytes) -> str | None:
    """The content type of a file from its first bytes, if it is one we take; None if not."""
    for magic, content_type in _MAGIC:
        if head.startswith(magic):
            return content_type
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    try:
        text = head.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        if error.start < len(head) - 4:  # not a character cut at the sniffed bytes' end
            return None
        text = head[: error.start].decode("utf-8-sig", errors="ignore")
    if "\x00" in text:
        return None
    lowered = text.lstrip().lower()
    if lowered.startswith("<svg") or (lowered.startswith("<?xml") and "<svg" in lowered):
        return "image/svg+xml"
    if any(marker in lowered for marker in _HTML_MARKERS):
        return "text/html"
    return "text/plain"


def upload(*, room: Room, user: User, uploaded: UploadedFile) -> Attachment:
    """Check and store an upload into `room`; it waits, unattached, for its uploader's next send there."""
    if room.is_archived:
        raise ChatError("room_archived", "This room is archived and read-only.")
    if room.is_private and selectors.membership_get(room=room, user=user) is None:
        raise ChatError("forbidden", "You are not a member of this room.")
    name = _clean_name(uploaded.name)
    size = uploaded.size or 0
    if size == 0:
        raise ChatError("empty_file", "The file is empty.")
    if size > settings.CHAT_UPLOAD_MAX_BYTES:
        raise ChatError("file_too_large", f"A file can be at most {_human(settings.CHAT_UPLOAD_MAX_BYTES)}.")
    forget_abandoned(user)
    used = Attachment.objects.filter(uploader=user).aggregate(total=Sum("size"))["total"] or 0
    if used + size > settings.CHAT_UPLOAD_QUOTA_BYTES:
        raise ChatError(
            "quota_exceeded",
            f"Your files would take more than your {_human(settings.CHAT_UPLOAD_QUOTA_BYTES)}: "
            "delete some messages with files first.",
        )
    return store(room=room, uploader=user, name=name, uploaded=uploaded)


# An upload not attached by then was left behind (its chip removed, its page closed): it goes at the
# uploader's next upload, and stops counting against their quota.
ABANDONED_AFTER = timedelta(days=1)


def forget_abandoned(user: User) -> int:
    """Delete the user's uploads never attached within ABANDONED_AFTER; return how many."""
    abandoned = list(
        Attachment.objects.filter(uploader=user, message__isnull=True, created_at__lt=timezone.now() - ABANDONED_AFTER)
    )
    if abandoned:
        forget_stored(abandoned)
    return len(abandoned)


def store(*, room: Room, uploader: User, name: str, uploaded: UploadedFile | ContentFile) -> Attachment:
    """Check a file's type (and an image's soundness), then keep it with its thumbnail; the Attachment saved."""
    uploaded.seek(0)
    content_type = sniff(uploaded.read(_SNIFF_BYTES))
    if content_type is None:
        raise ChatError(
            "file_type_not_allowed", "This type of file is not allowed: images, PDFs, text and zip files are."
        )
    size = uploaded.size or 0
    attachment = Attachment(room=room, uploader=uploader, name=_clean_name(name), size=size, content_type=content_type)
    thumbnail = None
    if content_type in RASTER:
        attachment.width, attachment.height, thumbnail = _image(uploaded)
    uploaded.seek(0)
    attachment.file.save(f"attachments/{attachment.key[:2]}/{attachment.key}", uploaded, save=False)
    if thumbnail is not None:
        attachment.thumbnail.save(f"attachments/{attachment.key[:2]}/{attachment.key}-thumbnail", thumbnail, save=False)
    try:
        attachment.save()
    except Exception:
        _delete_stored([attachment])
        raise
    return attachment


def _image(uploaded: UploadedFile | ContentFile) -> tuple[int, int, ContentFile]:
    """Width, height and a thumbnail of a raster image; a clear error for a broken or hostile one."""
    uploaded.seek(0)
    data = uploaded.read()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:
                probe.verify()  # the structure: truncated or corrupt files fail here or at load()
            with Image.open(io.BytesIO(data)) as image:
                image.seek(0)  # an animation's first frame
                image.load()
                width, height = image.size
                picture = ImageOps.exif_transpose(image)
                picture.thumbnail(THUMBNAIL_BOX)
                keep_alpha = picture.mode in ("RGBA", "LA") or (picture.mode == "P" and "transparency" in picture.info)
                picture = picture.convert("RGBA" if keep_alpha else "RGB")
                out = io.BytesIO()
                # A new image, saved without the original's EXIF, ICC or comments.
                picture.save(out, format="PNG" if keep_alpha else "JPEG", quality=85, optimize=True)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ChatError("invalid_image", "This image is too large in pixels to open safely.") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
        raise ChatError("invalid_image", "This image is damaged or cut short.") from None
    return width, height, ContentFile(out.getvalue())


def _clean_name(name: str | None) -> str:
    """The name to show and download as: no path, no control characters, not empty, not too long."""
    # Browsers send '"' in a file's name as %22, and line breaks as %0D and %0A (the HTML standard).
    name = (name or "").replace("%22", '"').replace("%0D", "\r").replace("%0A", "\n")
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(ch for ch in base if ch.isprintable()).strip() or "file"
    if not validation.storable(base):
        base = "file"
    if len(base) > NAME_MAX_LENGTH:  # keep the extension
        stem, dot, extension = base.rpartition(".")
        keep = dot and len(extension) < 16
        base = stem[: NAME_MAX_LENGTH - len(extension) - 1] + dot + extension if keep else base[:NAME_MAX_LENGTH]
    return base


def attachment_ids(value: object) -> list[int]:
    """The upload ids a send names: a list of at most ATTACHMENTS_MAX distinct whole numbers."""
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > ATTACHMENTS_MAX:
        raise ChatError("invalid_attachment", f'"attachments" is a list of at most {ATTACHMENTS_MAX} file ids.')
    ids = [validation.json_int(item, "attachments", low=1, code="invalid_attachment") for item in value]
    if len(set(ids)) != len(ids):
        raise ChatError("invalid_attachment", "A file can be attached once.")
    return ids


def claim(*, room: Room, author: User, ids: list[int]) -> list[Attachment]:
    """The uploads a send attaches: the author's own, in this room, not attached yet (locked until the commit)."""
    if not ids:
        return []
    rows = list(
        Attachment.objects.select_for_update()
        .filter(pk__in=ids, uploader=author, room=room, message__isnull=True)
        .order_by("pk")
    )
    if len(rows) != len(ids):
        raise ChatError(
            "invalid_attachment", "Attach only files you uploaded to this room, not yet attached to a message."
        )
    order = {attachment_id: index for index, attachment_id in enumerate(ids)}
    return sorted(rows, key=lambda row: order[row.pk])


def attach(message: Message, attachments: list[Attachment]) -> None:
    """Tie the claimed uploads to the saved message (in its transaction)."""
    Attachment.objects.filter(pk__in=[a.pk for a in attachments]).update(message=message)


def summary(attachments: Iterable[Attachment]) -> list[dict[str, Any]]:
    """What a message payload says of its files."""
    return [payload(attachment) for attachment in attachments]


def payload(attachment: Attachment) -> dict[str, Any]:
    url = reverse("attachment", args=[attachment.key, attachment.name])
    return {
        "id": attachment.pk,
        "name": attachment.name,
        "size": attachment.size,
        "content_type": attachment.content_type,
        "url": url,
        "thumbnail_url": reverse("attachment-thumbnail", args=[attachment.key]) if attachment.thumbnail else None,
    }


def forget(messages: Iterable[Message] | None = None, *, room: Room | None = None, through_seq: int = 0) -> None:
    """Delete the files of these messages (or of a room's messages up to a seq), once the transaction commits."""
    rows = Attachment.objects.all()
    if room is not None:
        rows = rows.filter(room=room, message__seq__lte=through_seq)
    else:
        rows = rows.filter(message__in=messages if messages is not None else [])
    doomed = list(rows)
    if not doomed:
        return
    Attachment.objects.filter(pk__in=[a.pk for a in doomed]).delete()
    transaction.on_commit(lambda: _delete_stored(doomed), robust=True)


def forget_stored(attachments: list[Attachment]) -> None:
    """Delete files stored moments ago, and their rows, when what they came with fails (an import's line)."""
    Attachment.objects.filter(pk__in=[a.pk for a in attachments]).delete()
    _delete_stored(attachments)


def _delete_stored(attachments: Iterable[Attachment]) -> None:
    for attachment in attachments:
        for stored in (attachment.file, attachment.thumbnail):
            if stored:
                stored.storage.delete(stored.name)


def readable(attachment: Attachment, user: User) -> bool:
    """Whether `user` may download it: a reader of its room once attached, only its uploader before."""
    if attachment.message_id is None:
        return attachment.uploader_id == user.pk
    room = attachment.room
    return not room.is_private or selectors.membership_get(room=room, user=user) is not None


def _human(size: int) -> str:
    if size < 1024:
        return f"{size} bytes"
    if size < 1024**2:
        return f"{size / 1024:.0f} KiB"
    return f"{size / 1024**2:.0f} MiB"
