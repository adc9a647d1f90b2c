"""Every query on stored notifications: find pending rows, claim rows by id, acknowledge."""

from __future__ import annotations

from typing import NamedTuple

from django.db import connections
from django.db.models import Q, TextField
from django.db.models.functions import Cast

from pgpubsub import conf
from pgpubsub.channel import BaseChannel
from pgpubsub.models import Notification

#: Most stored rows claimed per transaction: enough to share a commit among many messages,
#: few enough that concurrent listeners share a burst and a slow listener holds few rows.
BATCH_SIZE = 20


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


def claim_ids(channel_cls: type[BaseChannel], row_ids: list[int], using: str) -> list[StoredRow]:
    """Lock those of the stored rows ``row_ids`` of the channel that are there, not locked by
    another listener and not excluded by ``PGPUBSUB_LISTENER_FILTER``, for this transaction;
    oldest first."""
    rows = (
        _locked(using)
        .filter(pk__in=row_ids, channel__in=stored_names(channel_cls))
        .order_by("pk")
        .values_list("pk", Cast("payload", TextField()))
    )
    return [StoredRow(*row) for row in rows]


def take_ids(channel_cls: type[BaseChannel], row_ids: list[int], using: str) -> list[StoredRow]:
    """Claim and acknowledge at once: delete those of the stored rows ``row_ids`` that
    :func:`claim_ids` would lock, returning them oldest first. Only a rollback of the
    transaction brings them back, so it suits a transaction that holds one message."""
    locked = (
        _locked(using)
        .filter(pk__in=row_ids, channel__in=stored_names(channel_cls))
        .order_by("pk")
        .values("pk")
    )
    sql, params = locked.query.get_compiler(using).as_sql()
    table = connections[using].ops.quote_name(Notification._meta.db_table)
    with connections[using].cursor() as cursor:
        cursor.execute(
            f"DELETE FROM {table} WHERE id IN ({sql}) RETURNING id, payload::text", params
        )
        return sorted(StoredRow(*row) for row in cursor.fetchall())


def pending_ids(
    channel_cls: type[BaseChannel], after_id: int, using: str, limit: int = BATCH_SIZE
) -> list[int]:
    """Ids of up to ``limit`` stored rows of the channel above ``after_id``, oldest first,
    without locking them (claiming them skips those another listener holds)."""
    return list(
        Notification.objects.using(using)
        .filter(_listener_filter(), channel__in=stored_names(channel_cls), pk__gt=after_id)
        .order_by("pk")
        .values_list("pk", flat=True)[:limit]
    )


def acknowledge(row_ids: list[int], using: str) -> None:
    """Delete processed rows (inside the transaction that processed them)."""
    if row_ids:
        Notification.objects.using(using).filter(pk__in=row_ids)._raw_delete(using)
