from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [("pgpubsub", "0004_notification_pgpubsub_notification_set_db_version")]

    operations = [
        migrations.AlterModelOptions(name="notification", options={"ordering": ["created_at"]}),
    ]
