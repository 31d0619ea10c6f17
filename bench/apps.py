from django.apps import AppConfig


class BenchConfig(AppConfig):
    """The benchmarks and their commands (chatbench, pollbench); no models."""

    name = "bench"
