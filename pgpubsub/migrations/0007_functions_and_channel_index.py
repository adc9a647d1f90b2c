from django.db import migrations, models


def install_functions(apps, schema_editor):
    from pgpubsub.db_functions import install_functions

    install_functions(schema_editor.connection.alias)


def drop_functions(apps, schema_editor):
    from pgpubsub.db_functions import DROP_FUNCTIONS_SQL

    schema_editor.execute(DROP_FUNCTIONS_SQL)


class Migration(migrations.Migration):
    dependencies = [("pgpubsub", "0006_payload_stores_proper_jsonb")]

    operations = [
        migrations.AddIndex(
            model_name="notification",
            index=models.Index(fields=["channel", "id"], name="pgpubsub_channel_id_idx"),
        ),
        migrations.RunPython(install_functions, drop_functions),
    ]
