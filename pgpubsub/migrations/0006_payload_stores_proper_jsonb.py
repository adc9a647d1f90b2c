import pgtrigger.compiler
import pgtrigger.migrations
from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [("pgpubsub", "0005_alter_notification_options")]

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
                    func="""
                    NEW.db_version := (
                        SELECT max(id)
                        FROM django_migrations
                        WHERE app = NEW.payload ->> 'app'
                    );
                    NEW.created_at := NOW();
                    RETURN NEW;
                """,
                    operation="INSERT",
                    pgid="pgtrigger_pgpubsub_notification_set_db_version_ac4cd",
                    table="pgpubsub_notification",
                    when="BEFORE",
                ),
            ),
        ),
    ]
