from __future__ import annotations

from django import forms
from django.contrib.auth.forms import UserCreationForm

from chat.models import RESERVED_USERNAMES, Membership, NotifyLevel


class SignupForm(UserCreationForm):
    def clean_username(self) -> str:
        username = super().clean_username()  # None when the name is taken (its error is already recorded)
        if username and username.lower() in RESERVED_USERNAMES:
            raise forms.ValidationError("This name is reserved; choose another.")
        return username


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
    is_private = forms.BooleanField(
        required=False, label="Private", help_text="Only members you add can find, read and join it."
    )


class MemberForm(forms.Form):
    username = forms.CharField(max_length=150)
    role = forms.ChoiceField(
        choices=[(Membership.Role.MEMBER, "Member"), (Membership.Role.MODERATOR, "Moderator")],
        initial=Membership.Role.MEMBER,
        required=False,
    )

    def clean_role(self) -> str:
        return self.cleaned_data["role"] or Membership.Role.MEMBER


class NotificationSettingsForm(forms.Form):
    """The settings page: where email goes, whether it goes at all, and every room's default level."""

    email = forms.EmailField(required=False, help_text="Where missed mentions and direct messages are emailed.")
    email_notifications = forms.BooleanField(
        required=False,
        label="Email me mentions and direct messages I have not read",
        help_text="Sent once they have waited unread for a while, all of them in one email.",
    )
    default_notify = forms.ChoiceField(
        choices=NotifyLevel.choices,
        label="Notify me in rooms of",
        help_text="Each room can have its own level, set on its page. Direct messages notify unless muted there.",
    )


class NotifyLevelForm(forms.Form):
    """A room's level, from its page ("" follows the default)."""

    notify = forms.ChoiceField(choices=[("", "Default"), *NotifyLevel.choices], required=False)


class SearchForm(forms.Form):
    """The search page's query and filters; the query's syntax is chat/search.py's to check."""

    q = forms.CharField(label="Search", max_length=200, strip=False)
    room = forms.ChoiceField(required=False, label="In")
    author = forms.CharField(required=False, max_length=150, label="From")
    after = forms.DateField(required=False, label="On or after", widget=forms.DateInput(attrs={"type": "date"}))
    before = forms.DateField(required=False, label="On or before", widget=forms.DateInput(attrs={"type": "date"}))

    def __init__(self, *args, rooms=(), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        room_field = self.fields["room"]
        assert isinstance(room_field, forms.ChoiceField)
        room_field.choices = [("", "Every room"), *((room.slug, room_label(room)) for room in rooms)]


def room_label(room) -> str:
    return room.direct_with or room.name if room.is_direct else room.name
