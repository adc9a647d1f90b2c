"""Publishing from Python: ``notify()`` and ``process_stored_notifications()``."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from typing import Any

from django.db import connections, transaction

from pgpubsub import wire
from pgpubsub.channel import BaseChannel, Channel, locate_channel, select_channels
from pgpubsub.exceptions import InvalidChannel

logger = logging.getLogger(__name__)


def notify(channel: type[Channel] | str, **kwargs: Any) -> str:
    """Send a message with fields ``kwargs`` to ``channel`` (a class or its dotted path).

    The message is delivered when the current transaction commits (at once in autocommit).
    For a lockable channel it is also stored, in the same transaction, until processed.
    It goes through the channel's ``database`` (see :class:`~pgpubsub.channel.BaseChannel`);
    ``using=alias`` picks another connection, unless the channel has a field of that name.
    Returns the serialised payload.
    """
    channel_cls = locate_channel(channel)
    if not issubclass(channel_cls, Channel):
        raise InvalidChannel(
            f"{channel_cls.name()} is a {channel_cls.__mro__[1].__name__}; notify() sends to "
            "Channel subclasses (trigger channels are fed by their database triggers)."
        )
    fields = {field.name for field in dataclasses.fields(channel_cls)}
    using = kwargs.pop("using", None) if "using" not in fields else None
    unknown = set(kwargs) - {field.name for field in dataclasses.fields(channel_cls) if field.init}
    if unknown:
        raise TypeError(
            f"{channel_cls.name()} has no field(s) {sorted(unknown)}; its fields are "
            f"{sorted(fields)}."
        )
    message = channel_cls(**kwargs)
    serialized = message.serialize()
    listen_name = channel_cls.listen_safe_name()
    alias = using or _database_for(channel_cls)
    with connections[alias].cursor() as cursor:
        if channel_cls.lock_notifications:
            cursor.execute("SELECT pgpubsub_store(%s, %s::jsonb)", [listen_name, serialized])
        else:
            cursor.execute("SELECT pgpubsub_notify(%s, %s)", [listen_name, serialized])
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("Notified %s (%s bytes)", channel_cls.name(), len(serialized))
    return serialized


def process_stored_notifications(
    channels: Iterable[type[BaseChannel] | str] | None = None, using: str | None = None
) -> None:
    """Ask running listeners to process every stored notification of the selected lockable
    channels (all registered ones by default), for example after every listener was down.

    Sends one empty-payload NOTIFY per channel.
    """
    if channels is None:
        selected = list(select_channels())
    else:
        named = [locate_channel(channel) for channel in channels]
        # Named channels count even where this process registered no listener for them.
        selected = list(dict.fromkeys([*select_channels(named), *named]))
    lockable = [channel_cls for channel_cls in selected if channel_cls.lock_notifications]
    if not lockable:
        logger.warning("process_stored_notifications(): no lockable channel selected")
    for channel_cls in lockable:
        logger.info("Asking listeners of %s to process stored notifications", channel_cls.name())
        alias = using or _database_for(channel_cls)
        with connections[alias].cursor() as cursor:
            cursor.execute(
                "SELECT pg_notify(%s, %s)", [channel_cls.listen_safe_name(), wire.RECOVER]
            )


def retry_failed(
    channels: Iterable[type[BaseChannel] | str] | None = None,
    ids: Iterable[int] | None = None,
    using: str | None = None,
) -> int:
    """Give stored notifications new attempts, now: every one marked failed (of ``channels``,
    when given), or the rows ``ids`` whatever their state (failed, waiting for their next
    attempt). Their attempts count from zero again, and their NOTIFY is sent again so that a
    running listener processes them at once. Returns how many rows were retried."""
    from pgpubsub import store  # needs the app registry (models)
    from pgpubsub.models import database_for, notifications_alias

    named = None if channels is None else [locate_channel(channel) for channel in channels]
    row_ids = None if ids is None else [int(pk) for pk in ids]
    by_alias: dict[str, list[type[BaseChannel]] | None] = {}
    if named is None:
        by_alias[using or notifications_alias()] = None
    else:
        for channel_cls in named:
            by_alias.setdefault(using or database_for(channel_cls), []).append(channel_cls)
    retried = 0
    for alias, selected in by_alias.items():
        with transaction.atomic(using=alias):  # the NOTIFYs go out with the commit
            rows = store.retry(selected, row_ids, alias)
            store.notify_rows(rows, alias)
        if rows:
            logger.info("Retrying %s stored notification(s) on %s", len(rows), alias)
        retried += len(rows)
    return retried


def _database_for(channel_cls: type[BaseChannel]) -> str:
    # pgpubsub.models needs the app registry, which is not ready when this module is imported.
    from pgpubsub.models import database_for

    return database_for(channel_cls)
