import pgtrigger.compiler
import pgtrigger.migrations
from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [
        ("pgpubsub", "0009_notification_claimed_by"),
    ]

    operations = [
        pgtrigger.migrations.RemoveTrigger(
            model_name="notification",
            name="pgpubsub_notification_set_db_version",
        ),
        pgtrigger.migrations.AddTrigger(
            model_name="notification",
            trigger=pgtrigger.compiler.Trigger(
                name="pgpubsub_notification_set_db_version",
                sql=pgtrigger.compiler.UpsertTriggerSql(
                    func="\n                    IF to_regclass('django_migrations') IS NOT NULL THEN\n                        NEW.db_version := (\n                            SELECT max(id)\n                            FROM django_migrations\n                            WHERE app = NEW.payload ->> 'app'\n                        );\n                    END IF;\n                    NEW.created_at := NOW();\n                    RETURN NEW;\n                ",
                    hash="9589adab75f86811c071a4d464d59fd56ed30049",
                    operation="INSERT",
                    pgid="pgtrigger_pgpubsub_notification_set_db_version_ac4cd",
                    table="pgpubsub_notification",
                    when="BEFORE",
                ),
            ),
        ),
    ]
