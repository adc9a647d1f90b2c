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
    :func:`notifications_alias`."""
    return _get("PGPUBSUB_DATABASE", "default")


def notifications_alias() -> str:
    """The alias stored notifications live in: ``"default"`` unless a database router sends
    the ``Notification`` model elsewhere. Lockable messages are stored, claimed and processed
    there, so a listener's writes on it commit together with the acknowledgement."""
    from django.db import router

    from pgpubsub.models import Notification

    return router.db_for_write(Notification)


def health_max_backlog_age() -> float:
    """``PGPUBSUB_HEALTH_MAX_BACKLOG_AGE`` (default ``300``): seconds the oldest stored
    notification may wait before the health view reports a failure."""
    value = _get("PGPUBSUB_HEALTH_MAX_BACKLOG_AGE", 300)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ImproperlyConfigured(
            f"PGPUBSUB_HEALTH_MAX_BACKLOG_AGE must be a positive number of seconds, not {value!r}"
        )
    return float(value)


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
    provider = provider_cls()
    if not callable(getattr(provider, "get_filter", None)):
        raise ImproperlyConfigured(
            f"PGPUBSUB_LISTENER_FILTER = {path!r} has no get_filter() method."
        )
    return provider
