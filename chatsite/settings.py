"""Settings for the chat site, read from the environment (twelve-factor).

Every setting that differs between machines comes from an environment
variable; the defaults are safe for production except where DEBUG is on.
"""

from __future__ import annotations

import os
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = BASE_DIR / "var"  # git-ignored: the SQLite file, collected static files


def env_bool(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_list(name: str, default: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


DEBUG = env_bool("DEBUG")

SECRET_KEY = os.environ.get("SECRET_KEY", "")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            "SECRET_KEY is not set. Set the SECRET_KEY environment variable, "
            "or set DEBUG=1 to use the development key on your own machine."
        )
    SECRET_KEY = "dev-only-insecure-key-do-not-use-in-production"

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", "")

# Behind TLS (HTTPS=1): secure cookies, HTTPS redirects and HSTS; `manage.py check
# --deploy --fail-level WARNING` passes with DEBUG off, HTTPS=1 and a strong SECRET_KEY.
HTTPS = env_bool("HTTPS")
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = HTTPS
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", default=HTTPS)
SECURE_HSTS_SECONDS = int(os.environ.get("SECURE_HSTS_SECONDS", 31_536_000 if HTTPS else 0))
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", default=HTTPS)
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", default=HTTPS)
# A TLS-terminating proxy in front says so with this header (X-Forwarded-Proto: https).
if env_bool("BEHIND_TLS_PROXY"):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SESSION_COOKIE_HTTPONLY = True
X_FRAME_OPTIONS = "DENY"
# No inline script anywhere: the pages load their code from /static/ and pass
# data in <script type="application/json">. The admin needs inline styles.
CONTENT_SECURITY_POLICY = os.environ.get(
    "CONTENT_SECURITY_POLICY",
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'self'; form-action 'self'; object-src 'none'",
)

INSTALLED_APPS = [
    # daphne first, so that `manage.py runserver` serves WebSockets too.
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "ninja",  # the API's schema and docs page, its assets served from here (no CDN)
    "django_tasks",
    "django_tasks_db",  # missed-message email waits and runs as tasks in the database (docs/architecture.md)
    "chat",
    "bench",
    "chatsite",  # its system checks (chatsite/checks.py)
]

MIDDLEWARE = [
    "chatsite.middleware.ServerTimeMiddleware",  # first in, last out: the server's clock for API clients
    "chatsite.middleware.SecurityMiddleware",
    "chatsite.middleware.ContentSecurityPolicyMiddleware",
    "chatsite.middleware.StaticFilesMiddleware",  # WhiteNoise, async-capable
    "chatsite.middleware.SessionMiddleware",
    "chatsite.middleware.CommonMiddleware",
    "chatsite.middleware.CsrfViewMiddleware",
    "chatsite.middleware.AuthenticationMiddleware",
    "chatsite.middleware.MessageMiddleware",
    "chatsite.middleware.XFrameOptionsMiddleware",
    "chatsite.middleware.DatabaseUnavailableMiddleware",  # last: its 503 passes every response step above
]

ROOT_URLCONF = "chatsite.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

WSGI_APPLICATION = None
ASGI_APPLICATION = "chatsite.asgi.application"

# Database: SQLite under var/ unless DATABASE_URL says otherwise.
DATABASES = {
    "default": dj_database_url.parse(
        os.environ.get("DATABASE_URL", f"sqlite:///{VAR_DIR / 'db.sqlite3'}"),
        # Reused across requests and socket events: opening a connection per
        # message cost more CPU than saving the message (docs/performance.md).
        conn_max_age=int(os.environ.get("CONN_MAX_AGE", "60")),
        conn_health_checks=True,
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    # The same backend, its health check made at most once a second (chatsite/postgresql/base.py).
    DATABASES["default"]["ENGINE"] = "chatsite.postgresql"
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    VAR_DIR.mkdir(exist_ok=True)
    DATABASES["default"]["OPTIONS"] = {
        # IMMEDIATE takes the write lock at BEGIN, so two writers queue on the
        # busy timeout instead of failing with "database is locked" on upgrade.
        "transaction_mode": "IMMEDIATE",
        "timeout": 20,
        # WAL lets pages and sockets read while a message is being written.
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
    # A file, not the default in-memory database: tests start real server
    # processes that must open the same test database. Test databases are
    # named per test run, so two runs on one machine do not drop each other's.
    DATABASES["default"]["TEST"] = {"NAME": str(VAR_DIR / f"test-{os.getpid()}.sqlite3")}
else:
    DATABASES["default"]["TEST"] = {"NAME": f"test_{DATABASES['default']['NAME']}_{os.getpid()}"}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "room-list"
LOGOUT_REDIRECT_URL = "room-list"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"
# Uploaded files (docs/files.md): never served from here directly, only through chat.views.attachment,
# which checks who may read the room. An S3-compatible bucket instead: see docs/files.md.
MEDIA_ROOT = Path(os.environ.get("MEDIA_ROOT", VAR_DIR / "media"))
STORAGES = {
    "default": {"BACKEND": os.environ.get("FILE_STORAGE", "django.core.files.storage.FileSystemStorage")},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}
# django-storages' S3 backend (FILE_STORAGE=storages.backends.s3.S3Storage) reads these.
for _name in ("AWS_STORAGE_BUCKET_NAME", "AWS_S3_ENDPOINT_URL", "AWS_S3_REGION_NAME", "AWS_ACCESS_KEY_ID",
              "AWS_SECRET_ACCESS_KEY"):  # fmt: skip
    if _name in os.environ:
        globals()[_name] = os.environ[_name]
# In development WhiteNoise serves straight from the apps' static folders,
# so `collectstatic` is only needed with DEBUG off.
WHITENOISE_USE_FINDERS = DEBUG

# Channel layer: Redis pub/sub (one PUBLISH per room message, one
# subscription per room per process), or in-memory for a single process.
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
CHANNEL_LAYER = os.environ.get("CHANNEL_LAYER", "redis")
# Redis pub/sub ignores database numbers, so sites and test runs sharing one
# Redis are kept apart by this prefix on every channel and group name.
CHANNEL_LAYER_PREFIX = os.environ.get("CHANNEL_LAYER_PREFIX", "chat")

# Redis behind Sentinel (docs/scaling.md): REDIS_SENTINELS="host:port,host:port,..." and the
# monitored primary's name. Every Redis client of the site (the channel layer, presence, rate
# limits, the health check) then asks the Sentinels where the primary is, and follows a failover.
REDIS_SENTINELS = [
    (host, int(port)) for host, _, port in (item.rpartition(":") for item in env_list("REDIS_SENTINELS", ""))
]
REDIS_SENTINEL_MASTER = os.environ.get("REDIS_SENTINEL_MASTER", "chat")
# Seconds a question to one Sentinel may take before the next is asked: short, as a
# sync caller that finds no Sentinel waits this long for each.
REDIS_SENTINEL_TIMEOUT = float(os.environ.get("REDIS_SENTINEL_TIMEOUT", "0.2"))

if CHANNEL_LAYER == "redis":
    # redis-py 8 caps the async pool at 100 connections. The timeout bounds a
    # read from a Redis that stopped answering (pub/sub reads poll every 0.1 s,
    # and the hub's probes keep a quiet room's connection busy, so idleness never meets it).
    _layer_connection = {
        "socket_timeout": 30,
        "socket_connect_timeout": 5,
        "socket_keepalive": True,
        "health_check_interval": 15,
        "retry_on_timeout": True,
        "max_connections": 1000,
    }
    _layer_host = (
        {
            "master_name": REDIS_SENTINEL_MASTER,
            "sentinels": REDIS_SENTINELS,
            "sentinel_kwargs": {
                "socket_timeout": REDIS_SENTINEL_TIMEOUT,
                "socket_connect_timeout": REDIS_SENTINEL_TIMEOUT,
            },
            **_layer_connection,
        }
        if REDIS_SENTINELS
        else {"address": REDIS_URL, **_layer_connection}
    )
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
            "CONFIG": {"hosts": [_layer_host], "prefix": CHANNEL_LAYER_PREFIX},
        }
    }
elif CHANNEL_LAYER == "memory":
    # Capacity above CHAT_SOCKET_MAX_BACKLOG, so a slow socket is closed
    # rather than silently dropping events.
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer", "CONFIG": {"capacity": 10_000}}}
else:
    raise ImproperlyConfigured(f"CHANNEL_LAYER must be 'redis' or 'memory', not {CHANNEL_LAYER!r}.")

# Chat limits, shared by every path into the site.
CHAT_MESSAGE_MAX_LENGTH = 4000
CHAT_FRAME_MAX_BYTES = 64 * 1024
CHAT_RESUME_LIMIT = 500  # messages replayed on reconnect before a "gap" frame
CHAT_PAGE_MESSAGES = 50  # messages rendered with the room page
# Live events one socket may have waiting before it is closed with 1013;
# it resumes from the database when it reconnects.
CHAT_SOCKET_MAX_BACKLOG = int(os.environ.get("CHAT_SOCKET_MAX_BACKLOG", "1000"))
# Seconds after which a socket that stopped refreshing its presence (its
# server process died) no longer counts as online; refreshed every third of it.
CHAT_PRESENCE_TTL = float(os.environ.get("CHAT_PRESENCE_TTL", "45"))
# Seconds a request or the shared database thread may wait on Redis (a publish,
# a rate limit) before going on without it: what was saved stays saved.
CHAT_REDIS_TIMEOUT = float(os.environ.get("CHAT_REDIS_TIMEOUT", "0.5"))
# Server processes run a full garbage collection at most this often, in
# seconds; at 10,000 sockets one stops the process for 1-2 s (chatsite/collector.py). 0: Python's own pace.
CHAT_GC_FULL_EVERY = float(os.environ.get("CHAT_GC_FULL_EVERY", "300"))

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"once_a_minute": {"()": "chatsite.logfilters.AtMostEvery", "seconds": 60}},
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
    # Its reader logs a traceback a second while Redis is away; the site logs the outage itself.
    "loggers": {
        "channels_redis.pubsub": {"filters": ["once_a_minute"]},
        "chat.health": {"filters": ["once_a_minute"]},  # a load balancer's check every second
    },
}

# JSON API (docs/api.md). Requests per user per minute, shared by all processes
# through Redis; writes (posting, editing, deleting, creating rooms) have their own, lower limit.
CHAT_API_REQUESTS_PER_MINUTE = int(os.environ.get("CHAT_API_REQUESTS_PER_MINUTE", "600"))
CHAT_API_WRITES_PER_MINUTE = int(os.environ.get("CHAT_API_WRITES_PER_MINUTE", "60"))
CHAT_API_REQUEST_MAX_BYTES = 64 * 1024
# Messages per user, on every path (WebSocket, API, commands), shared by all processes through Redis.
CHAT_MESSAGE_RATE_LIMIT = int(os.environ.get("CHAT_MESSAGE_RATE_LIMIT", "20"))
CHAT_MESSAGE_RATE_WINDOW = int(os.environ.get("CHAT_MESSAGE_RATE_WINDOW", "10"))  # seconds
# Open WebSockets per user, all processes together.
CHAT_MAX_SOCKETS_PER_USER = int(os.environ.get("CHAT_MAX_SOCKETS_PER_USER", "20"))
# Seconds a long-poll may wait at most (its `timeout`): below any proxy's idle timeout.
CHAT_POLL_MAX_TIMEOUT = int(os.environ.get("CHAT_POLL_MAX_TIMEOUT", "30"))

# Notifications (docs/notifications.md). A mention or direct message still unread after
# this many seconds is emailed, batched with everything else missed since the last email.
NOTIFY_EMAIL_DELAY = int(os.environ.get("NOTIFY_EMAIL_DELAY", "600"))
# Where links in emails point: the site as its readers reach it.
SITE_URL = os.environ.get("SITE_URL", "http://127.0.0.1:8000").rstrip("/")

# Tasks (django-tasks, the backport of Django 6's django.tasks): kept in the database, which
# holds the truth while Redis is away, and run by `manage.py db_worker` (bin/serve starts it).
TASKS = {
    "default": {
        "BACKEND": os.environ.get("TASKS_BACKEND", "django_tasks_db.DatabaseBackend"),
        "QUEUES": ["default"],
    }
}

# Email, from the environment; the console backend prints mail locally.
EMAIL_BACKEND = os.environ.get("EMAIL_BACKEND", "django.core.mail.backends.console.EmailBackend")
EMAIL_HOST = os.environ.get("EMAIL_HOST", "localhost")
EMAIL_PORT = int(os.environ.get("EMAIL_PORT", "25"))
EMAIL_HOST_USER = os.environ.get("EMAIL_HOST_USER", "")
EMAIL_HOST_PASSWORD = os.environ.get("EMAIL_HOST_PASSWORD", "")
EMAIL_USE_TLS = env_bool("EMAIL_USE_TLS")
EMAIL_USE_SSL = env_bool("EMAIL_USE_SSL")
EMAIL_TIMEOUT = int(os.environ.get("EMAIL_TIMEOUT", "10"))
DEFAULT_FROM_EMAIL = os.environ.get("DEFAULT_FROM_EMAIL", "Chat <chat@localhost>")

# Files in messages (docs/files.md): the largest file, and what one person may keep in all.
CHAT_UPLOAD_MAX_BYTES = int(os.environ.get("CHAT_UPLOAD_MAX_BYTES", str(10 * 1024 * 1024)))
CHAT_UPLOAD_QUOTA_BYTES = int(os.environ.get("CHAT_UPLOAD_QUOTA_BYTES", str(500 * 1024 * 1024)))
# Any HTTP request's body, refused before Django reads it (chatsite.middleware.RequestBodyLimit).
CHAT_REQUEST_MAX_BYTES = CHAT_UPLOAD_MAX_BYTES + 256 * 1024
