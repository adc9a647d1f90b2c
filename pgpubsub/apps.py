from __future__ import annotations

from django.apps import AppConfig
from django.db.models.signals import post_migrate, pre_migrate


def _install_functions(sender, using: str = "default", **kwargs) -> None:
    from django.db import connections

    from pgpubsub.db_functions import install_defaults, install_functions

    if connections[using].vendor == "postgresql":
        install_functions(using)
        install_defaults(using)


class PgpubsubConfig(AppConfig):
    name = "pgpubsub"
    verbose_name = "pgpubsub"
    default_auto_field = "django.db.models.AutoField"

    def ready(self) -> None:
        from pgpubsub import (
            checks,  # noqa: F401  (registers the system checks)
            migration_order,
        )

        # Triggers call pgpubsub's functions as soon as they exist, whatever the migration order.
        migration_order.patch_autodetector()
        pre_migrate.connect(
            migration_order.install_functions_first,
            sender=self,
            dispatch_uid="pgpubsub_functions_first",
        )
        post_migrate.connect(_install_functions, sender=self, dispatch_uid="pgpubsub_functions")

        from pgpubsub.tasks import queues

        queues.register_configured()  # before a Runtime starts: it listens to the task queues

        from pgpubsub import embedded

        embedded.autostart()
