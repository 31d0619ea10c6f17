"""The browser tests' Chromium, for the cluster's browser test (tests/e2e/conftest.py starts it)."""

from tests.e2e.conftest import browser  # noqa: F401  (a fixture, used by name)
