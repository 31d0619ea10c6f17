from django.apps import AppConfig


class SiteConfig(AppConfig):
    """The project package as an app: only for its system checks."""

    name = "chatsite"

    def ready(self) -> None:
        from chatsite import checks  # noqa: F401  (teaches Django's deploy checks the site's middleware)
