"""Background work, run by `manage.py db_worker` from the tasks the database holds (django-tasks)."""

from __future__ import annotations

from django_tasks import task

from chat import notifications


@task()
def email_missed_messages(user_id: int) -> int:
    """Email a user what waits for them, once the oldest notice is due: all of it in one (email_missed)."""
    return notifications.email_missed(user_id=user_id)
