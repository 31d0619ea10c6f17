"""Time the message admin's changelist on a big table (docs/operations.md).

    DATABASE_URL=sqlite:////tmp/million.sqlite3 python manage.py seeddemo --rooms 10 --messages 1000000
    DATABASE_URL=sqlite:////tmp/million.sqlite3 python bench/admin_changelist.py

Signs in as a superuser (made if missing, with an unusable password) through
Django's test client, in this process, and reports the time and the queries of
each changelist view: the first page, a late page, each filter, a search.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatsite.settings")
os.environ.setdefault("SECRET_KEY", "bench-only")
os.environ["ALLOWED_HOSTS"] = "testserver"

import django  # noqa: E402

django.setup()

from django.contrib.auth import get_user_model  # noqa: E402
from django.db import connection  # noqa: E402
from django.test import Client  # noqa: E402
from django.test.utils import CaptureQueriesContext  # noqa: E402

from chat.models import Message, Room  # noqa: E402

REPEATS = 5


def main() -> None:
    staff, _ = get_user_model().objects.get_or_create(
        username="bench-admin", defaults={"is_staff": True, "is_superuser": True}
    )
    client = Client()
    client.force_login(staff)
    room = Room.objects.order_by("-last_seq").first()
    total = sum(Room.objects.values_list("last_seq", flat=True))
    print(f"{connection.vendor}, about {total:,} messages; room {room.slug} has {room.last_seq:,}")
    views = {
        "first page": "",
        "page 50": "?p=50",
        "filter: room": f"?room__id__exact={room.pk}",
        "filter: deleted": "?deleted=yes",
        "filter: not deleted": "?deleted=no",
        "filter: created today": "?created_at__gte=" + time.strftime("%Y-%m-%d"),
        "search: one word": "?q=coffee",
    }
    print(f"{'view':<24} {'median ms':>10} {'queries':>8}  slowest query ms")
    for name, query in views.items():
        timings = []
        for _ in range(REPEATS):
            with CaptureQueriesContext(connection) as queries:
                started = time.perf_counter()
                response = client.get(f"/admin/chat/message/{query}")
                timings.append((time.perf_counter() - started) * 1000)
            assert response.status_code == 200, (name, response.status_code)
        slowest = max(float(q["time"]) for q in queries.captured_queries) * 1000
        print(f"{name:<24} {statistics.median(timings):>10.1f} {len(queries.captured_queries):>8}  {slowest:.1f}")
    print(f"(Message rows: {Message.objects.count():,})")


if __name__ == "__main__":
    main()
