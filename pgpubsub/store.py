"""Every query on stored notifications: claim one by id, claim a batch, acknowledge."""

from __future__ import annotations

from django.db.models import Q

from pgpubsub import conf
from pgpubsub.channel import BaseChannel
from pgpubsub.models import Notification

#: Rows claimed per transaction when processing a channel's backlog.
BATCH_SIZE = 100


def stored_names(channel_cls: type[BaseChannel]) -> list[str]:
    """Names a channel's rows are stored under: its LISTEN name, and the dotted path that
    django-pgpubsub 1.x used for rows written by ``notify()``."""
    return [channel_cls.listen_safe_name(), channel_cls.name()]


def _listener_filter() -> Q:
    provider = conf.listener_filter_provider()
    return provider.get_filter() if provider is not None else Q()


def claim(channel_cls: type[BaseChannel], row_id: int, using: str) -> Notification | None:
    """Lock the stored row ``row_id`` of the channel for this transaction, or None when it is
    gone, locked by another listener, or excluded by ``PGPUBSUB_LISTENER_FILTER``."""
    rows = (
        Notification.objects.using(using)
        .select_for_update(skip_locked=True)
        .filter(_listener_filter(), pk=row_id, channel__in=stored_names(channel_cls))
        .order_by()[:1]
    )
    return next(iter(rows), None)


def claim_batch(
    channel_cls: type[BaseChannel], after_id: int, using: str, limit: int = BATCH_SIZE
) -> list[Notification]:
    """Lock up to ``limit`` unlocked stored rows of the channel with ids above ``after_id``,
    oldest first."""
    return list(
        Notification.objects.using(using)
        .select_for_update(skip_locked=True)
        .filter(_listener_filter(), channel__in=stored_names(channel_cls), pk__gt=after_id)
        .order_by("pk")[:limit]
    )


def acknowledge(notification: Notification, using: str) -> None:
    """Delete a processed row (inside the transaction that processed it)."""
    Notification.objects.using(using).filter(pk=notification.pk).delete()
