from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("pgpubsub", "0007_functions_and_channel_index")]

    operations = [
        migrations.AddField(
            model_name="notification",
            name="attempts",
            field=models.PositiveIntegerField(default=0, help_text="Failed attempts so far."),
        ),
        # Rows are stored by SQL functions that name only channel and payload.
        migrations.RunSQL(
            "ALTER TABLE pgpubsub_notification ALTER COLUMN attempts SET DEFAULT 0",
            migrations.RunSQL.noop,
        ),
        migrations.AddField(
            model_name="notification",
            name="next_attempt_at",
            field=models.DateTimeField(
                blank=True, help_text="Not claimed before this time (empty: at once).", null=True
            ),
        ),
        migrations.AddField(
            model_name="notification",
            name="failed_at",
            field=models.DateTimeField(
                blank=True,
                help_text="When pgpubsub gave up on it; it is not tried again unless retried.",
                null=True,
            ),
        ),
        migrations.AddField(
            model_name="notification",
            name="last_error",
            field=models.TextField(blank=True, help_text="Type and message.", null=True),
        ),
        migrations.AddField(
            model_name="notification",
            name="last_traceback",
            field=models.TextField(blank=True, null=True),
        ),
        migrations.RemoveIndex(model_name="notification", name="pgpubsub_channel_id_idx"),
        migrations.AddIndex(
            model_name="notification",
            index=models.Index(
                condition=models.Q(("failed_at__isnull", True), ("next_attempt_at__isnull", True)),
                fields=["channel", "id"],
                name="pgpubsub_pending_idx",
            ),
        ),
        migrations.AddIndex(
            model_name="notification",
            index=models.Index(
                condition=models.Q(("failed_at__isnull", True), ("next_attempt_at__isnull", False)),
                fields=["channel", "next_attempt_at"],
                name="pgpubsub_retry_idx",
            ),
        ),
    ]
