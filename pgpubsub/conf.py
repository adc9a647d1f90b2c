"""Settings, read lazily at call time so ``override_settings`` and late configuration work.

Every setting is documented with its default in ``docs/settings.md``.
"""

from __future__ import annotations

import importlib
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured


def _get(name: str, default: Any) -> Any:
    return getattr(settings, name, default)


def pass_context_to_listeners() -> bool:
    """``PGPUBSUB_PASS_CONTEXT_TO_LISTENERS`` (default ``False``): give trigger listeners ``context``."""
    return bool(_get("PGPUBSUB_PASS_CONTEXT_TO_LISTENERS", False))


def tx_bound_notification_context() -> bool:
    """``PGPUBSUB_TX_BOUND_NOTIFICATION_CONTEXT`` (default ``False``): context lasts one transaction."""
    return bool(_get("PGPUBSUB_TX_BOUND_NOTIFICATION_CONTEXT", False))


def database_alias() -> str:
    """``PGPUBSUB_DATABASE`` (default ``"default"``): the alias the LISTEN connection is built
    from. It needs a direct connection or session pooling; messages are processed on
    :func:`pgpubsub.models.notifications_alias`."""
    return _get("PGPUBSUB_DATABASE", "default")


def listen_aliases() -> dict[str, str]:
    """``PGPUBSUB_LISTEN_ALIASES`` (default ``{}``): for the channels on a database of their own
    (a channel's ``database``), the alias to LISTEN through, e.g. ``{"other": "other_direct"}``
    when ``other`` goes through a transaction-pooling PgBouncer. As ``PGPUBSUB_DATABASE`` for
    the others, it needs a direct connection or session pooling."""
    value = _get("PGPUBSUB_LISTEN_ALIASES", {})
    if not isinstance(value, dict) or not all(
        isinstance(key, str) and isinstance(alias, str) for key, alias in value.items()
    ):
        raise ImproperlyConfigured(
            "PGPUBSUB_LISTEN_ALIASES must map database aliases to the aliases to LISTEN "
            f'through, e.g. {{"other": "other_direct"}}, not {value!r}'
        )
    return dict(value)


def listen_alias(database: str | None) -> str:
    """The alias a Runtime LISTENs through for the channels on ``database`` (None: the
    channels without a ``database`` of their own, which LISTEN through ``PGPUBSUB_DATABASE``)."""
    if database is None:
        return database_alias()
    return listen_aliases().get(database, database)


def transaction_pooled(alias: str) -> bool:
    """Whether ``DATABASES[alias]`` is declared to go through transaction pooling (PgBouncer):
    Django's advice for it is ``DISABLE_SERVER_SIDE_CURSORS = True``. LISTEN loses
    notifications there, and session state (a session-bound notification context) passes
    from one client to the next."""
    return bool(settings.DATABASES.get(alias, {}).get("DISABLE_SERVER_SIDE_CURSORS"))


def health_max_backlog_age() -> float:
    """``PGPUBSUB_HEALTH_MAX_BACKLOG_AGE`` (default ``300``): seconds the oldest stored
    notification may wait before the health view reports a failure."""
    return float(_positive("PGPUBSUB_HEALTH_MAX_BACKLOG_AGE", 300, float))


def health_token() -> str | None:
    """``PGPUBSUB_HEALTH_TOKEN`` (default ``None``): a secret that lets a request to the health
    view see its details (``Authorization: Bearer <token>``); ``None`` or ``""``: no token does."""
    value = _get("PGPUBSUB_HEALTH_TOKEN", None)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ImproperlyConfigured(
            f"PGPUBSUB_HEALTH_TOKEN must be a string (a long random secret) or None, not "
            f"{type(value).__name__}"
        )
    return value


def listener_filter_provider() -> Any | None:
    """``PGPUBSUB_LISTENER_FILTER`` (default ``None``): dotted path of a ``ListenerFilterProvider``.

    Returns an instance, or ``None`` when the setting is unset.
    """
    path = _get("PGPUBSUB_LISTENER_FILTER", None)
    if not path:
        return None
    module_name, _, class_name = str(path).rpartition(".")
    try:
        provider_cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ImproperlyConfigured(
            f"PGPUBSUB_LISTENER_FILTER = {path!r} cannot be imported ({exc}). "
            "Set it to the dotted path of a class with a get_filter() method returning a Q."
        ) from exc
    try:
        provider = provider_cls()
    except Exception as exc:
        raise ImproperlyConfigured(
            f"PGPUBSUB_LISTENER_FILTER = {path!r} cannot be instantiated ({exc}). "
            "Set it to the dotted path of a class that takes no arguments."
        ) from exc
    if not callable(getattr(provider, "get_filter", None)):
        raise ImproperlyConfigured(
            f"PGPUBSUB_LISTENER_FILTER = {path!r} has no get_filter() method."
        )
    return provider


def _positive(name: str, default: float, kind: type = int) -> Any:
    """Setting ``name``: a positive int (``kind=int``) or number of seconds (``kind=float``)."""
    value = _get(name, default)
    allowed = int if kind is int else int | float
    if isinstance(value, bool) or not isinstance(value, allowed) or value <= 0:
        what = "a positive integer" if kind is int else "a positive number of seconds"
        raise ImproperlyConfigured(f"{name} must be {what}, not {value!r}")
    return value


def _bool(name: str, default: bool) -> bool:
    value = _get(name, default)
    if not isinstance(value, bool):
        raise ImproperlyConfigured(f"{name} must be True or False, not {value!r}")
    return value


def embedded() -> bool:
    """``PGPUBSUB_EMBEDDED`` (default ``False``): run a Runtime inside each process that
    serves requests (runserver's serving process, every gunicorn worker, an ASGI server)."""
    return _bool("PGPUBSUB_EMBEDDED", False)


def workers() -> int:
    """``PGPUBSUB_WORKERS`` (default ``2``): worker threads of an embedded Runtime, each with
    a database connection of its own while it runs."""
    return _positive("PGPUBSUB_WORKERS", 2)


def queue_size() -> int:
    """``PGPUBSUB_QUEUE_SIZE`` (default ``100``): deliveries a Runtime holds for its workers
    before the listener waits (plain channels) or leaves rows to a sweep (lockable ones)."""
    return _positive("PGPUBSUB_QUEUE_SIZE", 100)


def channels() -> list[str] | None:
    """``PGPUBSUB_CHANNELS`` (default ``None``: every channel with a listener): dotted paths
    of the channels an embedded Runtime listens to."""
    value = _get("PGPUBSUB_CHANNELS", None)
    if value is None:
        return None
    if isinstance(value, str) or not all(isinstance(name, str) for name in value):
        raise ImproperlyConfigured(
            f"PGPUBSUB_CHANNELS must be a list of channel dotted paths, not {value!r}"
        )
    return list(value)


def recover_on_start() -> bool:
    """``PGPUBSUB_RECOVER_ON_START`` (default ``True``): an embedded Runtime first processes
    the lockable notifications already stored."""
    return _bool("PGPUBSUB_RECOVER_ON_START", True)


def shutdown_timeout() -> float:
    """``PGPUBSUB_SHUTDOWN_TIMEOUT`` (default ``10``): seconds a stopping Runtime gives the
    callbacks that are running to finish."""
    return float(_positive("PGPUBSUB_SHUTDOWN_TIMEOUT", 10, float))


def max_attempts() -> int:
    """``PGPUBSUB_MAX_ATTEMPTS`` (default ``5``): attempts a lockable message gets before it is
    marked failed (a channel's ``max_attempts`` wins)."""
    return _positive("PGPUBSUB_MAX_ATTEMPTS", 5)


def retry_delay() -> float:
    """``PGPUBSUB_RETRY_DELAY`` (default ``2``): seconds before the second attempt of a failed
    lockable message; each later one waits twice as long, with jitter (a channel's
    ``retry_delay`` wins)."""
    return float(_positive("PGPUBSUB_RETRY_DELAY", 2, float))


def retry_max_delay() -> float:
    """``PGPUBSUB_RETRY_MAX_DELAY`` (default ``300``): the longest wait between two attempts,
    in seconds."""
    return float(_positive("PGPUBSUB_RETRY_MAX_DELAY", 300, float))


def sweep_interval() -> float:
    """``PGPUBSUB_SWEEP_INTERVAL`` (default ``30``): seconds between two sweeps of a Runtime,
    which claim the stored messages nobody is processing (a missed NOTIFY, a dead process's
    messages)."""
    return float(_positive("PGPUBSUB_SWEEP_INTERVAL", 30, float))


def notify_on_write() -> bool:
    """``PGPUBSUB_NOTIFY_ON_WRITE`` (default ``False``): storing a lockable message also sends a
    NOTIFY in the writer's transaction (the lowest latency at low write rates, but every such
    commit takes PostgreSQL's instance-wide NOTIFY lock). By default writers only store the
    row and one elected Runtime wakes the others (see docs/delivery.md). A channel's
    ``notify_on_write`` wins. Read when ``migrate`` installs pgpubsub's SQL functions."""
    return _bool("PGPUBSUB_NOTIFY_ON_WRITE", False)


def watch_interval() -> float:
    """``PGPUBSUB_WATCH_INTERVAL`` (default ``1.5``): the longest pause, in seconds, between two
    looks of the elected watcher for newly stored lockable messages; it looks every few
    milliseconds while messages keep coming, and backs off to this when none do."""
    return float(_positive("PGPUBSUB_WATCH_INTERVAL", 1.5, float))


def async_concurrency() -> int:
    """``PGPUBSUB_ASYNC_CONCURRENCY`` (default ``100``): the most ``async def`` listeners and
    tasks that run at once on a Runtime's event loop."""
    return int(_positive("PGPUBSUB_ASYNC_CONCURRENCY", 100))


def idle_connection_timeout() -> float:
    """``PGPUBSUB_IDLE_CONNECTION_TIMEOUT`` (default ``30``): seconds a Runtime's worker thread
    keeps its database connections open without work; an idle Runtime holds only its LISTEN
    session."""
    return float(_positive("PGPUBSUB_IDLE_CONNECTION_TIMEOUT", 30, float))
