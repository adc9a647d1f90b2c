"""The system checks of ``check --database``: they connect to each database named and look at
what is installed there (pgpubsub's SQL functions, the triggers of trigger channels).

``pgpubsub.checks`` imports this module, which registers them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import pgtrigger
from django.apps import AppConfig, apps
from django.conf import settings
from django.core.checks import Error, Tags, Warning, register
from django.db import DatabaseError, connections

from pgpubsub import conf
from pgpubsub.channel import TriggerChannel, registry
from pgpubsub.db_functions import notify_on_write_body

#: The tag of every pgpubsub system check (``manage.py check --tag pgpubsub``).
TAG = "pgpubsub"

#: The SQL functions every trigger and ``notify()`` publishes through, with their arguments.
SQL_FUNCTIONS = ("pgpubsub_notify(text,text)", "pgpubsub_store(text,jsonb)")

# Statuses of pgtrigger's Trigger.get_installation_status() (constants of pgtrigger.core).
_INSTALLED, _UNINSTALLED, _OUTDATED = "INSTALLED", "UNINSTALLED", "OUTDATED"


def in_app_configs(module: str | None, app_configs: Sequence[AppConfig] | None) -> bool:
    """Whether ``module`` belongs to one of ``app_configs`` (every module when None: the
    check runs for the whole project)."""
    if app_configs is None:
        return True
    app_config = apps.get_containing_app_config(module or "")
    return app_config is not None and app_config in app_configs


def _valid_alias() -> str | None:
    """``PGPUBSUB_DATABASE`` when it names a configured database, else None."""
    alias = conf.database_alias()
    if isinstance(alias, str) and alias in settings.DATABASES:
        return alias
    return None


@register(Tags.database, TAG)
def check_database_objects(
    app_configs: Sequence[AppConfig] | None = None,
    databases: Iterable[str] | None = None,
    **kwargs: Any,
) -> list:
    """In each database named by ``check --database``: the SQL functions exist and the triggers
    of trigger channels with listeners are installed and current."""
    if not databases:
        return []
    messages = []
    for alias in databases:
        connection = connections[alias]
        if connection.vendor != "postgresql":
            continue
        try:
            messages.extend(_check_database(alias, app_configs))
        except DatabaseError as exc:
            messages.append(
                Error(
                    f"Could not inspect database {alias!r} for pgpubsub's triggers and "
                    f"functions: {exc}".strip(),
                    hint=f"Check that DATABASES[{alias!r}] points at a running PostgreSQL "
                    "server the configured user can connect to.",
                    id="pgpubsub.E009",
                )
            )
    return messages


def _notify_triggers() -> list[tuple[Any, pgtrigger.Trigger]]:
    """(model, trigger) of every pgpubsub trigger on a model with a trigger channel that has
    listeners."""
    from pgpubsub.triggers import Notify

    models = {
        channel_cls.model
        for channel_cls, callbacks in registry.items()
        if callbacks and issubclass(channel_cls, TriggerChannel)
    }
    return [
        (model, trigger)
        for model, trigger in pgtrigger.registered()
        if model in models and isinstance(trigger, Notify)
    ]


def _channel_names(listen_name: str) -> str:
    names = [
        channel_cls.name()
        for channel_cls, callbacks in registry.items()
        if callbacks and channel_cls.listen_safe_name() == listen_name
    ]
    return ", ".join(sorted(names)) or listen_name


def _pending_migrations(alias: str) -> set[str]:
    """App labels with migrations not yet applied to database ``alias``."""
    from django.db.migrations.executor import MigrationExecutor

    executor = MigrationExecutor(connections[alias])
    plan = executor.migration_plan(executor.loader.graph.leaf_nodes())
    return {migration.app_label for migration, _backwards in plan}


def _check_database(alias: str, app_configs: Sequence[AppConfig] | None) -> list:
    # `migrate` runs the database checks before it migrates: a database that migrate is about
    # to bring up to date is not reported (an error here would stop the migrate that fixes it).
    pending = _pending_migrations(alias)
    messages = []
    uses_database = alias == _valid_alias()
    for model, trigger in _notify_triggers():
        status, enabled = trigger.get_installation_status(model, database=alias)
        if status not in (_INSTALLED, _UNINSTALLED, _OUTDATED):
            continue  # the database router keeps this model out of this database
        uses_database = True
        if model._meta.app_label in pending or not in_app_configs(model.__module__, app_configs):
            continue
        uri = trigger.get_uri(model)
        channel = _channel_names(trigger.channel)
        if status != _INSTALLED:
            state = (
                "is not installed in database {alias!r}: its listeners receive no "
                "notifications of writes to this table"
                if status == _UNINSTALLED
                else "in database {alias!r} differs from its definition in the code: its "
                "listeners receive what the installed, older version sends"
            ).format(alias=alias)
            messages.append(
                Warning(
                    f"Trigger {trigger.name!r} of channel {channel} {state}.",
                    hint="If no migration creates it yet, run `manage.py makemigrations` and "
                    f"`manage.py migrate`; otherwise reinstall it: `manage.py pgtrigger install "
                    f"{uri}`.",
                    obj=model,
                    id="pgpubsub.W001",
                )
            )
        elif enabled is False:
            messages.append(
                Warning(
                    f"Trigger {trigger.name!r} of channel {channel} is disabled in database "
                    f"{alias!r}: its listeners receive no notifications of writes to this table.",
                    hint=f"Run `manage.py pgtrigger enable {uri}`.",
                    obj=model,
                    id="pgpubsub.W002",
                )
            )
    if uses_database and not pending:
        messages += _function_messages(alias)
    return messages


def _function_messages(alias: str) -> list:
    """E008 for missing SQL functions, else W006 for functions installed under other
    settings."""
    messages = []
    missing = _missing_functions(alias)
    if missing:
        messages.append(
            Error(
                f"The SQL function(s) {', '.join(missing)} are missing from database "
                f"{alias!r} (or not on its search_path): every pgpubsub trigger and "
                "notify() fails there.",
                hint="Run `manage.py migrate`; pgpubsub creates the functions after every "
                "migrate (add --skip-checks if this error stops it).",
                id="pgpubsub.E008",
            )
        )
    elif not _wakes_as_configured(alias):
        messages.append(
            Warning(
                f"pgpubsub's SQL functions in database {alias!r} do not match "
                "PGPUBSUB_NOTIFY_ON_WRITE and the channels' notify_on_write: writers send "
                "a NOTIFY per stored row where these say not to, or the other way round "
                "(nothing is lost either way: the watcher and the sweeps find the rows).",
                hint="Run `manage.py migrate`: pgpubsub installs its functions, as the "
                "settings say, after every migrate.",
                id="pgpubsub.W006",
            )
        )
    return messages


def _wakes_as_configured(alias: str) -> bool:
    """The installed ``pgpubsub_notify_on_write()`` says what the settings and channels say now."""
    with connections[alias].cursor() as cursor:
        cursor.execute(
            "SELECT prosrc FROM pg_proc WHERE oid = to_regprocedure(%s)",
            ["pgpubsub_notify_on_write(text)"],
        )
        row = cursor.fetchone()
    return row is not None and row[0] == notify_on_write_body()


def _missing_functions(alias: str) -> list[str]:
    with connections[alias].cursor() as cursor:
        cursor.execute(
            "SELECT signature FROM unnest(%s::text[]) AS signature "
            "WHERE to_regprocedure(signature) IS NULL ORDER BY signature",
            [list(SQL_FUNCTIONS)],
        )
        return [row[0] for row in cursor.fetchall()]
