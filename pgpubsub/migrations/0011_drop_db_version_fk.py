"""Drop the foreign key from ``pgpubsub_notification.db_version`` to ``django_migrations``.

Checking it share-locked the same ``django_migrations`` row in every transaction that stored a
lockable message: with many concurrent writers, PostgreSQL made a multixact of each lock, and
the stores of 16 writers ran at about three quarters of their rate without it (pgbench, on the
project's 2-core test machine). ``db_version`` keeps its value, set by the insert trigger of
migration 0004; only deleting a ``django_migrations`` row that stored messages name is no longer
refused.
"""

from django.db import migrations

FOREIGN_KEY = """
ALTER TABLE pgpubsub_notification
ADD CONSTRAINT pgpubsub_notification_db_version_fk
FOREIGN KEY (db_version) REFERENCES django_migrations (id)
ON DELETE RESTRICT
"""


class Migration(migrations.Migration):
    dependencies = [("pgpubsub", "0010_set_db_version_without_django_migrations")]

    operations = [
        migrations.RunSQL(
            sql="ALTER TABLE pgpubsub_notification "
            "DROP CONSTRAINT IF EXISTS pgpubsub_notification_db_version_fk",
            reverse_sql=FOREIGN_KEY,
        ),
    ]
