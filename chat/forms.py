from __future__ import annotations

from django import forms


class RoomForm(forms.Form):
    """Checks the fields' shape; the room_create service validates the room as a whole."""

    name = forms.CharField(max_length=100)
    slug = forms.CharField(
        max_length=64,
        required=False,
        label="Address",
        help_text="Optional: lowercase letters, digits and hyphens, e.g. team-news. Made from the name when empty.",
    )
    topic = forms.CharField(max_length=200, required=False)
