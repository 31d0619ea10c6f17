"""Render the html of the messages saved before Markdown (chat/markdown.py), in batches."""

from django.db import migrations

BATCH_SIZE = 2000


def render_existing(apps, schema_editor):
    from chat.markdown import render

    Message = apps.get_model("chat", "Message")
    pending = Message.objects.using(schema_editor.connection.alias).filter(html="").exclude(body="")
    last_pk = 0
    while batch := list(pending.filter(pk__gt=last_pk).order_by("pk").only("pk", "body")[:BATCH_SIZE]):
        for message in batch:
            message.html = render(message.body)
        Message.objects.using(schema_editor.connection.alias).bulk_update(batch, ["html"])
        last_pk = batch[-1].pk


class Migration(migrations.Migration):
    dependencies = [("chat", "0006_message_markdown_replies_reactions_pins")]

    operations = [migrations.RunPython(render_existing, migrations.RunPython.noop, elidable=True)]
