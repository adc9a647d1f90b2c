"""System checks: settings and listener signatures. The checks of ``check --database``, which
look into the databases, are in ``pgpubsub.database_checks``; importing this module registers
them too.

Every id is listed with its meaning in ``docs/settings.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.apps import AppConfig
from django.conf import settings
from django.core.checks import Error, Warning, register
from django.core.exceptions import ImproperlyConfigured
from django.db.utils import load_backend

from pgpubsub import conf, retries
from pgpubsub.channel import TriggerChannel, locate_channel, registry
from pgpubsub.database_checks import TAG, in_app_configs
from pgpubsub.exceptions import ChannelNotFound, ListenerSignatureError
from pgpubsub.models import notifications_alias


def _qualname(callback: Any) -> str:
    name = getattr(callback, "__qualname__", None) or repr(callback)
    module = getattr(callback, "__module__", None)
    return f"{module}.{name}" if module else name


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
    for read, hint, check_id in (
        (
            conf.health_max_backlog_age,
            "Set PGPUBSUB_HEALTH_MAX_BACKLOG_AGE to a number of seconds, e.g. 300.",
            "pgpubsub.E010",
        ),
        (
            conf.health_token,
            'Set PGPUBSUB_HEALTH_TOKEN to a long random string, e.g. os.environ["HEALTH_TOKEN"], '
            "or None.",
            "pgpubsub.E017",
        ),
    ):
        try:
            read()
        except ImproperlyConfigured as exc:
            errors.append(Error(str(exc), hint=hint, id=check_id))
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
        ("PGPUBSUB_NOTIFY_ON_WRITE", conf.notify_on_write, "False"),
        ("PGPUBSUB_WATCH_INTERVAL", conf.watch_interval, "1.5"),
        ("PGPUBSUB_IDLE_CONNECTION_TIMEOUT", conf.idle_connection_timeout, "30"),
        ("PGPUBSUB_ASYNC_CONCURRENCY", conf.async_concurrency, "100"),
    ):
        try:
            read()
        except ImproperlyConfigured as exc:
            errors.append(_bad_runtime_setting(name, exc, example))
    errors.extend(_check_channels_setting())
    # The other channel options (max_concurrency, max_attempts, retry_delay, a retry policy
    # object) are refused when the class is defined; what is left needs the settings, or
    # imports another module.
    for channel in registry:
        errors.extend(_check_channel_database(channel))
        errors.extend(_check_channel_retry(channel))
    errors.extend(_check_embedded_database())
    return errors


def _check_channels_setting() -> list:
    """E011 for each name in ``PGPUBSUB_CHANNELS`` that is not a channel class."""
    try:
        names = conf.channels() or []
    except ImproperlyConfigured:
        names = []
    errors = []
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
    return errors


def _check_channel_retry(channel: type) -> list:
    """E015 when the channel's ``retry`` does not lead to a retry policy."""
    try:
        retries.check(channel)
    except (ValueError, TypeError) as exc:
        return [
            Error(
                str(exc),
                hint="Set retry to the dotted path of a retry policy (an object with "
                "next_delay(attempt, error) and max_attempts, or a class made without "
                "arguments), e.g. a pgpubsub.retries.RetryStrategy; or remove it for the "
                "default policy.",
                obj=channel,
                id="pgpubsub.E015",
            )
        ]
    return []


def _check_embedded_database() -> list:
    """E013 when embedded Runtimes would start on a database that is not PostgreSQL."""
    if getattr(settings, "PGPUBSUB_EMBEDDED", False) is not True:
        return []
    alias = notifications_alias()
    _, vendor = _vendor(alias)
    if vendor == "postgresql":
        return []
    return [
        Error(
            f"PGPUBSUB_EMBEDDED is on, but the database {alias!r} of pgpubsub's "
            f"notifications is not PostgreSQL ({vendor}).",
            hint="pgpubsub needs PostgreSQL: route pgpubsub's models to a PostgreSQL "
            "database, or turn PGPUBSUB_EMBEDDED off.",
            id="pgpubsub.E013",
        )
    ]


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
            if not in_app_configs(getattr(callback, "__module__", None), app_configs):
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
