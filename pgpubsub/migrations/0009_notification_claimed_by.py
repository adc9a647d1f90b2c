from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("pgpubsub", "0008_notification_attempts")]

    operations = [
        # Nullable, no default: adding it rewrites nothing, however many rows are stored.
        migrations.AddField(
            model_name="notification",
            name="claimed_by",
            field=models.TextField(
                blank=True,
                help_text="The claim (host:pid:random) of the listener processing it, if any.",
                null=True,
            ),
        ),
    ]
