"""Every query on stored notifications: claim one by id, claim a batch, acknowledge."""

from __future__ import annotations

from typing import NamedTuple

from django.db.models import Q, TextField
from django.db.models.functions import Cast

from pgpubsub import conf
from pgpubsub.channel import BaseChannel
from pgpubsub.models import Notification

#: Rows claimed per transaction when processing a channel's backlog.
BATCH_SIZE = 100


class StoredRow(NamedTuple):
    """A claimed row: its id and its payload as JSON text (parsed later, by the channel)."""

    pk: int
    payload: str


def stored_names(channel_cls: type[BaseChannel]) -> list[str]:
    """Names a channel's rows are stored under: its LISTEN name, and the dotted path that
    django-pgpubsub 1.x used for rows written by ``notify()``."""
    return [channel_cls.listen_safe_name(), channel_cls.name()]


def _listener_filter() -> Q:
    provider = conf.listener_filter_provider()
    return provider.get_filter() if provider is not None else Q()


def _locked(using: str):
    return (
        Notification.objects.using(using)
        .select_for_update(skip_locked=True, of=("self",))
        .filter(_listener_filter())
    )


def claim(channel_cls: type[BaseChannel], row_id: int, using: str) -> StoredRow | None:
    """Lock the stored row ``row_id`` of the channel for this transaction, or None when it is
    gone, locked by another listener, or excluded by ``PGPUBSUB_LISTENER_FILTER``."""
    rows = (
        _locked(using)
        .filter(pk=row_id, channel__in=stored_names(channel_cls))
        .order_by()
        .values_list("pk", Cast("payload", TextField()))[:1]
    )
    row = next(iter(rows), None)
    return StoredRow(*row) if row else None


def claim_batch(
    channel_cls: type[BaseChannel], after_id: int, using: str, limit: int = BATCH_SIZE
) -> list[StoredRow]:
    """Lock up to ``limit`` unlocked stored rows of the channel with ids above ``after_id``,
    oldest first."""
    rows = (
        _locked(using)
        .filter(channel__in=stored_names(channel_cls), pk__gt=after_id)
        .order_by("pk")
        .values_list("pk", Cast("payload", TextField()))[:limit]
    )
    return [StoredRow(*row) for row in rows]


def acknowledge(row: StoredRow, using: str) -> None:
    """Delete a processed row (inside the transaction that processed it)."""
    Notification.objects.using(using).filter(pk=row.pk)._raw_delete(using)
