"""Full-text search over messages' bodies (chat/search.py): each database's own index.

PostgreSQL: a stored generated tsvector column and a GIN index on it, so that
every write (the ORM, bulk inserts, an UPDATE of many rows) keeps it current.
SQLite: an FTS5 table over the message table's bodies ("external content"),
kept in step by triggers, for the same reason. Neither is a model field: the
statements are chat.search.INDEX_DDL, which rebuild_search_index runs again.
"""

from django.db import migrations

from chat.search import DROP_DDL, INDEX_DDL


def create_index(apps, schema_editor) -> None:
    vendor = schema_editor.connection.vendor
    for statement in INDEX_DDL.get(vendor, []):
        schema_editor.execute(statement)
    if vendor == "sqlite":  # the rows already there; PostgreSQL computes the new column for them
        schema_editor.execute("INSERT INTO chat_message_fts(chat_message_fts) VALUES ('rebuild')")


def drop_index(apps, schema_editor) -> None:
    for statement in DROP_DDL.get(schema_editor.connection.vendor, []):
        schema_editor.execute(statement)


class Migration(migrations.Migration):
    dependencies = [("chat", "0009_mentions_and_notifications")]

    operations = [migrations.RunPython(create_index, drop_index, elidable=False)]
