from __future__ import annotations

from django import forms
from django.contrib.auth.forms import UserCreationForm

from chat.models import RESERVED_USERNAMES, Membership


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
