"""Django's deploy checks, taught that chatsite.middleware's classes are Django's middleware.

Django's security checks look for the dotted paths of its own security,
clickjacking and CSRF middleware in MIDDLEWARE. The site runs subclasses of
them (chatsite.middleware.OnTheLoop: the same hooks, run on the event loop),
so without this every deploy check would report the protections missing and
skip the checks of their settings (HSTS, SSL redirect, secure cookies).
"""

from __future__ import annotations

from django.conf import settings
from django.core.checks.security import base, csrf
from django.middleware import clickjacking, security
from django.middleware import csrf as csrf_middleware
from django.utils.module_loading import import_string


def _uses(middleware: type) -> bool:
    return any(issubclass(import_string(path), middleware) for path in settings.MIDDLEWARE)


# Private helpers of Django's (not in its type stubs); were they renamed, the
# deploy check test (tests/reliability/test_abuse.py) would fail loudly.
base._security_middleware = lambda: _uses(security.SecurityMiddleware)  # type: ignore[attr-defined]
base._xframe_middleware = lambda: _uses(clickjacking.XFrameOptionsMiddleware)  # type: ignore[attr-defined]
csrf._csrf_middleware = lambda: _uses(csrf_middleware.CsrfViewMiddleware)  # type: ignore[attr-defined]
