"""Tasks (pgpubsub.tasks): the table of their results, and the order their stored rows are
claimed in (highest priority first, then oldest).

The index covers only tasks' rows (their channel names start with ``pgpubsub_task_``):
other channels' writers do not pay for it. pgpubsub/tasks/rows.py repeats its expression and
predicate word for word, so that the planner uses it.
"""

from django.db import migrations, models

TASK_ORDER_INDEX = """
CREATE INDEX IF NOT EXISTS pgpubsub_task_order_idx ON pgpubsub_notification
(channel, (-((payload ->> 'priority')::integer)), id)
WHERE failed_at IS NULL AND left(channel, 14) = 'pgpubsub_task_'
"""


class Migration(migrations.Migration):
    dependencies = [
        ("pgpubsub", "0011_drop_db_version_fk"),
    ]

    operations = [
        migrations.RunSQL(
            sql=TASK_ORDER_INDEX,
            reverse_sql="DROP INDEX IF EXISTS pgpubsub_task_order_idx",
        ),
        migrations.CreateModel(
            name="TaskResultRecord",
            fields=[
                (
                    "id",
                    models.BigIntegerField(
                        help_text="The task's result id.", primary_key=True, serialize=False
                    ),
                ),
                ("task_path", models.TextField(blank=True, default="")),
                ("queue_name", models.CharField(blank=True, default="", max_length=100)),
                ("payload", models.JSONField(blank=True, null=True)),
                ("status", models.CharField(max_length=10)),
                ("enqueued_at", models.DateTimeField(blank=True, null=True)),
                ("started_at", models.DateTimeField(blank=True, null=True)),
                ("finished_at", models.DateTimeField(blank=True, null=True)),
                ("last_attempted_at", models.DateTimeField(blank=True, null=True)),
                ("return_value", models.JSONField(blank=True, null=True)),
                ("errors", models.JSONField(blank=True, default=list)),
                ("worker_ids", models.JSONField(blank=True, default=list)),
            ],
            options={
                "verbose_name": "task result",
                "db_table": "pgpubsub_taskresult",
                "indexes": [
                    models.Index(fields=["finished_at"], name="pgpubsub_taskresult_done_idx")
                ],
            },
        ),
    ]
