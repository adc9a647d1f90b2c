"""Migrations that install pgpubsub triggers run after pgpubsub's own migrations.

A trigger of a channel calls ``pgpubsub_notify()`` or ``pgpubsub_store()`` (and the latter
writes to ``pgpubsub_notification``), which pgpubsub's migrations create. Django orders the
migrations of unrelated apps by label, so the trigger migration of an app named ``accounts``
would run first, and a data migration of that app after it would fail in the trigger.
``makemigrations`` therefore gives every operation that installs such a trigger a dependency on
pgpubsub (Django turns it into one on pgpubsub's latest migration, as it does for a foreign
key to another app's model), and ``migrate`` creates the two functions before any migration
runs (:func:`install_functions_first`), which is all a plain channel's trigger needs.
"""

from __future__ import annotations

from typing import Any

from django.core.management.commands import makemigrations, migrate
from django.db import connections, router

#: SQL that marks a trigger as one of pgpubsub's (pgpubsub.triggers writes these calls).
PUBLISHING_CALLS = ("pgpubsub_notify(", "pgpubsub_store(")

try:  # Django 5.1+
    from django.db.migrations.autodetector import OperationDependency

    NEEDS_NOTIFICATIONS: Any = OperationDependency(
        "pgpubsub", "notification", None, OperationDependency.Type.CREATE
    )
except ImportError:  # Django 4.2 - 5.0: (app_label, model_name, field_name, created)
    NEEDS_NOTIFICATIONS = ("pgpubsub", "notification", None, True)


def publishes(operation: Any) -> bool:
    """Whether a migration operation installs a trigger that publishes through pgpubsub."""
    trigger = getattr(operation, "trigger", None)
    sql = str(getattr(trigger, "sql", ""))
    return any(call in sql for call in PUBLISHING_CALLS)


class DependsOnPgpubsub:
    """Autodetector mixin: operations installing pgpubsub triggers depend on pgpubsub."""

    def add_operation(self, app_label, operation, dependencies=None, beginning=False):
        if app_label != "pgpubsub" and publishes(operation):
            dependencies = [*(dependencies or ()), NEEDS_NOTIFICATIONS]
        return super().add_operation(app_label, operation, dependencies, beginning)


def patch_autodetector() -> None:
    """Put :class:`DependsOnPgpubsub` into the autodetector of ``makemigrations`` and of
    ``migrate`` (Django 5.2 wants the same class in both), on top of whatever is there:
    pgtrigger's, when its app is ready before ours; pgtrigger subclasses ours otherwise."""
    autodetector = makemigrations.MigrationAutodetector
    if not issubclass(autodetector, DependsOnPgpubsub):
        autodetector = type("MigrationAutodetector", (DependsOnPgpubsub, autodetector), {})
    makemigrations.MigrationAutodetector = migrate.MigrationAutodetector = autodetector
    if hasattr(makemigrations.Command, "autodetector"):  # Django 5.2+
        makemigrations.Command.autodetector = migrate.Command.autodetector = autodetector


def install_functions_first(sender: Any, using: str = "default", **kwargs: Any) -> None:
    """``pre_migrate``: create (or replace) the publishing functions before any migration
    runs, so that triggers calling them work whatever order the migrations run in."""
    from pgpubsub.db_functions import install_functions

    if connections[using].vendor == "postgresql" and router.allow_migrate(using, "pgpubsub"):
        install_functions(using)
