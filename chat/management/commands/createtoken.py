from django.core.management.base import BaseCommand, CommandError

from chat import services
from chat.management.arguments import user_named


class Command(BaseCommand):
    help = "Create an API token for a user and print its secret (shown this once; only a hash is stored)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("username", help="the user the token acts as")
        parser.add_argument("--name", required=True, help='what the token is for, e.g. "deploy bot"')

    def handle(self, *args, username: str, name: str, **options) -> None:
        user = user_named(username)
        if not name.strip():
            raise CommandError("--name must not be empty: say what the token is for.")
        token, secret = services.token_create(user=user, name=name.strip())
        self.stderr.write(f'Token "{token.name}" for {username} created. Copy the secret now; it is not shown again:')
        self.stdout.write(secret)
