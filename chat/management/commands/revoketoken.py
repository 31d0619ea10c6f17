from django.core.management.base import BaseCommand, CommandError

from chat import services
from chat.management.arguments import user_named
from chat.models import ApiToken


class Command(BaseCommand):
    help = "Revoke a user's API token by its name; requests with it get 401 from then on."

    def add_arguments(self, parser) -> None:
        parser.add_argument("username", help="the token's user")
        parser.add_argument("--name", required=True, help="the token's name (manage.py createtoken --name)")

    def handle(self, *args, username: str, name: str, **options) -> None:
        user = user_named(username)
        live = ApiToken.objects.filter(user=user, name=name, revoked_at__isnull=True)
        if not live:
            names = ", ".join(sorted(set(ApiToken.objects.filter(user=user, revoked_at__isnull=True).values_list(
                "name", flat=True)))) or "none"  # fmt: skip
            raise CommandError(f'{username} has no live token called "{name}". Their live tokens: {names}.')
        for token in live:
            services.token_revoke(token)
        self.stdout.write(self.style.SUCCESS(f'Revoked {len(live)} token(s) "{name}" of {username}.'))
