from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("pgpubsub", "0002_notification_created_at")]

    operations = [
        migrations.AddField(
            model_name="notification",
            name="db_version",
            field=models.IntegerField(null=True),
        ),
        # django_migrations is not a model, so the reference is a hand-made constraint.
        migrations.RunSQL(
            sql="""
                ALTER TABLE pgpubsub_notification
                ADD CONSTRAINT pgpubsub_notification_db_version_fk
                FOREIGN KEY (db_version) REFERENCES django_migrations (id)
                ON DELETE RESTRICT
            """,
            reverse_sql="""
                ALTER TABLE pgpubsub_notification
                DROP CONSTRAINT pgpubsub_notification_db_version_fk
            """,
        ),
    ]
