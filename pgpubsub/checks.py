"""System checks: settings, listener signatures and, with ``check --database``, the triggers and
SQL functions in the database.

Every id is listed with its meaning in ``docs/settings.md``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import pgtrigger
from django.apps import AppConfig, apps
from django.conf import settings
from django.core.checks import Error, Tags, Warning, register
from django.core.exceptions import ImproperlyConfigured
from django.db import DatabaseError, connections
from django.db.utils import load_backend

from pgpubsub import conf, retries
from pgpubsub.channel import TriggerChannel, locate_channel, registry
from pgpubsub.exceptions import ChannelNotFound, ListenerSignatureError
from pgpubsub.models import notifications_alias

TAG = "pgpubsub"

#: The SQL functions every trigger and ``notify()`` publishes through, with their arguments.
SQL_FUNCTIONS = ("pgpubsub_notify(text,text)", "pgpubsub_store(text,jsonb)")

# Statuses of pgtrigger's Trigger.get_installation_status() (constants of pgtrigger.core).
_INSTALLED, _UNINSTALLED, _OUTDATED = "INSTALLED", "UNINSTALLED", "OUTDATED"


def _in_app_configs(module: str | None, app_configs: Sequence[AppConfig] | None) -> bool:
    if app_configs is None:
        return True
    app_config = apps.get_containing_app_config(module or "")
    return app_config is not None and app_config in app_configs


def _qualname(callback: Any) -> str:
    name = getattr(callback, "__qualname__", None) or repr(callback)
    module = getattr(callback, "__module__", None)
    return f"{module}.{name}" if module else name


def _valid_alias() -> str | None:
    """``PGPUBSUB_DATABASE`` when it names a configured database, else None."""
    alias = conf.database_alias()
    if isinstance(alias, str) and alias in settings.DATABASES:
        return alias
    return None


@register(TAG)
def check_settings(app_configs: Sequence[AppConfig] | None = None, **kwargs: Any) -> list:
    """The ``PGPUBSUB_*`` settings have the right types and the listener filter imports."""
    errors = []
    for number, name in (
        ("E003", "PGPUBSUB_PASS_CONTEXT_TO_LISTENERS"),
        ("E004", "PGPUBSUB_TX_BOUND_NOTIFICATION_CONTEXT"),
    ):
        value = getattr(settings, name, False)
        if not isinstance(value, bool):
            errors.append(
                Error(
                    f"{name} must be True or False, not {value!r}.",
                    hint=f"Set {name} = True or {name} = False (or remove it: it defaults to False).",
                    id=f"pgpubsub.{number}",
                )
            )
    alias = conf.database_alias()
    if not isinstance(alias, str):
        errors.append(
            Error(
                f"PGPUBSUB_DATABASE must be a database alias (a str), not {alias!r}.",
                hint='Set PGPUBSUB_DATABASE to a key of DATABASES, e.g. "default".',
                id="pgpubsub.E005",
            )
        )
    try:
        conf.health_max_backlog_age()
    except ImproperlyConfigured as exc:
        errors.append(
            Error(
                str(exc),
                hint="Set PGPUBSUB_HEALTH_MAX_BACKLOG_AGE to a number of seconds, e.g. 300.",
                id="pgpubsub.E010",
            )
        )
    errors.extend(_check_listener_filter())
    errors.extend(_check_runtime_settings())
    return errors


def _embedded() -> bool:
    try:
        return conf.embedded()
    except ImproperlyConfigured:
        return True  # reported as E011; meanwhile take the setting to be wanted


def _bad_runtime_setting(name: str, exc: ImproperlyConfigured, example: str) -> Any:
    """E011 for a Runtime setting of the wrong type; W004 for ``PGPUBSUB_WORKERS`` while
    embedded mode is off: only embedded Runtimes read it (listen takes --threads), so it must
    not keep listen, migrate or runserver from starting."""
    hint = f"Set it like {name} = {example}, or remove it for its default."
    if name == "PGPUBSUB_WORKERS" and not _embedded():
        return Warning(
            f"{exc} It is not used while PGPUBSUB_EMBEDDED is off "
            "(manage.py listen takes --threads).",
            hint=hint,
            id="pgpubsub.W004",
        )
    return Error(str(exc), hint=hint, id="pgpubsub.E011")


def _check_runtime_settings() -> list:
    errors = []
    for name, read, example in (
        ("PGPUBSUB_EMBEDDED", conf.embedded, "True"),
        ("PGPUBSUB_WORKERS", conf.workers, "2"),
        ("PGPUBSUB_QUEUE_SIZE", conf.queue_size, "100"),
        ("PGPUBSUB_CHANNELS", conf.channels, '["blog.channels.PostReads"]'),
        ("PGPUBSUB_RECOVER_ON_START", conf.recover_on_start, "True"),
        ("PGPUBSUB_SHUTDOWN_TIMEOUT", conf.shutdown_timeout, "10"),
        ("PGPUBSUB_MAX_ATTEMPTS", conf.max_attempts, "5"),
        ("PGPUBSUB_RETRY_DELAY", conf.retry_delay, "2"),
        ("PGPUBSUB_RETRY_MAX_DELAY", conf.retry_max_delay, "300"),
        ("PGPUBSUB_SWEEP_INTERVAL", conf.sweep_interval, "30"),
    ):
        try:
            read()
        except ImproperlyConfigured as exc:
            errors.append(_bad_runtime_setting(name, exc, example))
    try:
        names = conf.channels() or []
    except ImproperlyConfigured:
        names = []
    for name in names:
        try:
            locate_channel(name)
        except ChannelNotFound as exc:
            errors.append(
                Error(
                    f"PGPUBSUB_CHANNELS names an unknown channel: {exc}",
                    hint='PGPUBSUB_CHANNELS lists dotted paths of channel classes, e.g. ["blog.channels.PostReads"].',
                    id="pgpubsub.E011",
                )
            )
    # The other channel options (max_concurrency, max_attempts, retry_delay, a retry policy
    # object) are refused when the class is defined; what is left needs the settings, or
    # imports another module.
    for channel in registry:
        errors.extend(_check_channel_database(channel))
        try:
            retries.check(channel)
        except (ValueError, TypeError) as exc:
            errors.append(
                Error(
                    str(exc),
                    hint="Set retry to the dotted path of a retry policy (an object with "
                    "next_delay(attempt, error) and max_attempts, or a class made without "
                    "arguments), e.g. a pgpubsub.retries.RetryStrategy; or remove it for the "
                    "default policy.",
                    obj=channel,
                    id="pgpubsub.E015",
                )
            )
    if getattr(settings, "PGPUBSUB_EMBEDDED", False) is True:
        alias = notifications_alias()
        _, vendor = _vendor(alias)
        if vendor != "postgresql":
            errors.append(
                Error(
                    f"PGPUBSUB_EMBEDDED is on, but the database {alias!r} of pgpubsub's "
                    f"notifications is not PostgreSQL ({vendor}).",
                    hint="pgpubsub needs PostgreSQL: route pgpubsub's models to a PostgreSQL "
                    "database, or turn PGPUBSUB_EMBEDDED off.",
                    id="pgpubsub.E013",
                )
            )
    return errors


def _check_listener_filter() -> list:
    path = getattr(settings, "PGPUBSUB_LISTENER_FILTER", None)
    if not path:
        return []
    hint = (
        "Set PGPUBSUB_LISTENER_FILTER to the dotted path of a class (e.g. "
        '"myapp.filters.DeployFilter") whose get_filter() returns a Q on Notification, '
        "or remove the setting."
    )
    if not isinstance(path, str):
        return [
            Error(
                f"PGPUBSUB_LISTENER_FILTER must be a dotted path (a str), not {path!r}.",
                hint=hint,
                id="pgpubsub.E006",
            )
        ]
    try:
        conf.listener_filter_provider()
    except ImproperlyConfigured as exc:
        return [Error(str(exc), hint=hint, id="pgpubsub.E006")]
    except Exception as exc:  # the provider's own constructor failed
        return [
            Error(
                f"PGPUBSUB_LISTENER_FILTER = {path!r} cannot be instantiated: "
                f"{type(exc).__name__}: {exc}",
                hint=hint,
                id="pgpubsub.E006",
            )
        ]
    return []


def _check_channel_database(channel: type) -> list:
    alias = channel.database
    if alias is None:
        return []
    if isinstance(alias, str) and alias in settings.DATABASES:
        engine, vendor = _vendor(alias)
        if vendor == "postgresql":
            return []
        problem = f"uses the engine {engine} ({vendor}), not PostgreSQL"
    else:
        problem = "is not a key of DATABASES"
    return [
        Error(
            f"{channel.__name__}.database = {alias!r} {problem}.",
            hint="Set it to the alias of a PostgreSQL database in DATABASES (where pgpubsub "
            "is migrated), or remove it to use the default.",
            obj=channel,
            id="pgpubsub.E014",
        )
    ]


def _vendor(alias: str) -> tuple[str, str]:
    """(ENGINE, vendor) of the ``DATABASES`` entry ``alias``, from the settings as they are."""
    engine = settings.DATABASES.get(alias, {}).get("ENGINE") or "django.db.backends.dummy"
    try:
        return engine, load_backend(engine).DatabaseWrapper.vendor
    except ImproperlyConfigured:
        return engine, "unknown"


@register(TAG)
def check_database_setting(app_configs: Sequence[AppConfig] | None = None, **kwargs: Any) -> list:
    """``PGPUBSUB_DATABASE`` names a PostgreSQL database that LISTEN can work through."""
    alias = conf.database_alias()
    if not isinstance(alias, str):
        return []  # pgpubsub.E005
    if alias not in settings.DATABASES:
        return [
            Error(
                f"PGPUBSUB_DATABASE = {alias!r} is not a key of DATABASES "
                f"({', '.join(map(repr, settings.DATABASES)) or 'none configured'}).",
                hint="Set PGPUBSUB_DATABASE to one of the DATABASES aliases, or add that alias.",
                id="pgpubsub.E001",
            )
        ]
    engine, vendor = _vendor(alias)
    if vendor != "postgresql":
        return [
            Error(
                f"PGPUBSUB_DATABASE = {alias!r} uses the engine {engine} ({vendor}); pgpubsub "
                "needs PostgreSQL (LISTEN/NOTIFY and its SQL functions).",
                hint="Point PGPUBSUB_DATABASE at an alias whose ENGINE is "
                "django.db.backends.postgresql (or a backend built on it).",
                id="pgpubsub.E002",
            )
        ]
    return []


@register(TAG)
def check_listen_aliases(app_configs: Sequence[AppConfig] | None = None, **kwargs: Any) -> list:
    """``PGPUBSUB_LISTEN_ALIASES`` names PostgreSQL aliases, and no alias a Runtime LISTENs
    through is declared to go through transaction pooling."""
    try:
        mapping = conf.listen_aliases()
    except ImproperlyConfigured as exc:
        return [Error(str(exc), id="pgpubsub.E016")]
    errors = []
    for database, alias in mapping.items():
        if alias not in settings.DATABASES or _vendor(alias)[1] != "postgresql":
            errors.append(
                Error(
                    f"PGPUBSUB_LISTEN_ALIASES[{database!r}] = {alias!r} is not the alias of a "
                    "PostgreSQL database in DATABASES.",
                    hint="Map each database alias to a DATABASES alias of the same PostgreSQL "
                    "database that connects directly or through session pooling.",
                    id="pgpubsub.E016",
                )
            )
    if errors:
        return errors
    default = conf.listen_alias(None)
    listening = {default: "PGPUBSUB_DATABASE"} if isinstance(default, str) else {}
    for channel in registry:
        if isinstance(channel.database, str) and channel.database in settings.DATABASES:
            alias = conf.listen_alias(channel.database)
            listening.setdefault(alias, f"the channels on database {channel.database!r}")
    for alias, who in listening.items():
        if conf.transaction_pooled(alias):
            errors.append(
                Warning(
                    f"{who} LISTEN through the alias {alias!r}, which sets "
                    "DISABLE_SERVER_SIDE_CURSORS, as Django advises for PgBouncer in "
                    "transaction pooling mode. LISTEN through a transaction-pooling PgBouncer "
                    "loses notifications: the server connection that ran LISTEN is handed to "
                    "other clients between transactions.",
                    hint="Add a DATABASES entry that connects to PostgreSQL directly or through "
                    "session pooling, and LISTEN through it: PGPUBSUB_DATABASE for the default "
                    'database, PGPUBSUB_LISTEN_ALIASES = {"other": "other_direct"} for a '
                    "channel's database. If this alias does not go through transaction "
                    'pooling, add "pgpubsub.W003" to SILENCED_SYSTEM_CHECKS.',
                    id="pgpubsub.W003",
                )
            )
    return errors


@register(TAG)
def check_notification_context(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list:
    """A session-bound notification context leaks through transaction pooling."""
    if conf.tx_bound_notification_context():
        return []
    if not any(issubclass(channel, TriggerChannel) for channel in registry):
        return []  # only trigger payloads carry the context
    pooled = [alias for alias in settings.DATABASES if conf.transaction_pooled(alias)]
    if not pooled:
        return []
    return [
        Warning(
            f"{', '.join(map(repr, pooled))} declared to go through transaction pooling "
            "(DISABLE_SERVER_SIDE_CURSORS), and the notification context is session-bound "
            "(PGPUBSUB_TX_BOUND_NOTIFICATION_CONTEXT is off): a context that "
            "set_notification_context() sets outside a transaction stays on the server "
            "connection, and appears in the notifications of the next clients that use it.",
            hint="Set PGPUBSUB_TX_BOUND_NOTIFICATION_CONTEXT = True and call "
            "set_notification_context() inside transaction.atomic() (inside an atomic block "
            "on such an alias it is bound to the transaction already).",
            id="pgpubsub.W005",
        )
    ]


@register(TAG)
def check_listener_signatures(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list:
    """Every registered listener still accepts what its channel sends (the trigger channels'
    arguments depend on ``PGPUBSUB_PASS_CONTEXT_TO_LISTENERS``, which may change after the
    listener was decorated)."""
    from pgpubsub.listeners import check_signature

    errors = []
    for channel_cls, callbacks in list(registry.items()):
        for callback in list(callbacks):
            if not _in_app_configs(getattr(callback, "__module__", None), app_configs):
                continue
            try:
                check_signature(channel_cls, callback)
            except ListenerSignatureError as exc:
                errors.append(
                    Error(
                        str(exc),
                        hint="Give the listener the parameters its channel sends, or **kwargs "
                        "(trigger listeners receive `context` too while "
                        "PGPUBSUB_PASS_CONTEXT_TO_LISTENERS is True).",
                        obj=_qualname(callback),
                        id="pgpubsub.E007",
                    )
                )
    return errors


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
        if model._meta.app_label in pending or not _in_app_configs(model.__module__, app_configs):
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
    return messages


def _missing_functions(alias: str) -> list[str]:
    with connections[alias].cursor() as cursor:
        cursor.execute(
            "SELECT signature FROM unnest(%s::text[]) AS signature "
            "WHERE to_regprocedure(signature) IS NULL ORDER BY signature",
            [list(SQL_FUNCTIONS)],
        )
        return [row[0] for row in cursor.fetchall()]
