"""What an operator needs to know about the database side of pgpubsub, without any payload:
the stored backlog per channel, the age of its oldest row still to be processed, the rows
marked failed, and how full PostgreSQL's notification queue is, on each database that holds
stored notifications."""

from __future__ import annotations

import datetime
from dataclasses import asdict, dataclass, field
from typing import Any

from django.db import DatabaseError, connections
from django.db.models import Count, Min
from django.db.models.functions import Coalesce
from django.utils import timezone
from django.utils.connection import ConnectionDoesNotExist

from pgpubsub.channel import BaseChannel, registry
from pgpubsub.models import Notification, NotificationQuerySet, database_for, notifications_alias


@dataclass
class ChannelBacklog:
    channel: str  # the dotted class name when this process knows the channel, else as stored
    stored: int  # every row, failed ones included
    failed: int  # marked failed: kept, not tried again until retried
    # Of the rows a listener should take now (not failed, not waiting for their next attempt),
    # since they were stored or since their next attempt was due; None when there is none (or
    # for rows older than the created_at column).
    oldest_age_seconds: float | None


@dataclass
class DatabaseStatus:
    database: str
    stored: int
    failed: int
    oldest_age_seconds: float | None
    notification_queue_usage: float  # pg_notification_queue_usage(): 0.0 (empty) to 1.0 (full)
    channels: list[ChannelBacklog] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DatabaseFailure:
    """A database whose status could not be read."""

    database: str
    error: str  # the exception's type and message, on one line

    def as_dict(self) -> dict[str, Any]:
        return {"database": self.database, "error": self.error}


def channel_label(stored_name: str) -> str:
    """The dotted class name of the registered channel with LISTEN name ``stored_name``, else
    ``stored_name`` itself (a channel this process has no listener for, or a row stored by
    django-pgpubsub 1.x under the dotted name)."""
    found = BaseChannel.get(stored_name)
    return found[0].name() if found else stored_name


def _age(created: datetime.datetime | None, now: datetime.datetime) -> float | None:
    return None if created is None else max(0.0, (now - created).total_seconds())


def database_status(using: str | None = None) -> DatabaseStatus:
    """The stored backlog of database ``using`` (the alias of stored notifications by
    default), oldest channels first."""
    alias = using or notifications_alias()
    now = timezone.now()
    per_channel = (
        Notification.objects.using(alias)
        .order_by()
        .values("channel")
        .annotate(
            stored=Count("id"),
            failed=Count("id", filter=NotificationQuerySet.FAILED),
            # How long the rows a listener should take now (the due ones) have waited for
            # one: since they were stored, or since their next attempt was due; rows marked
            # failed, or waiting for their next attempt, wait for no listener.
            oldest=Min(Coalesce("next_attempt_at", "created_at"), filter=NotificationQuerySet.DUE),
        )
    )
    channels = sorted(
        (
            ChannelBacklog(
                channel_label(row["channel"]),
                row["stored"],
                row["failed"],
                _age(row["oldest"], now),
            )
            for row in per_channel
        ),
        key=lambda backlog: (-(backlog.oldest_age_seconds or 0.0), backlog.channel),
    )
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT pg_notification_queue_usage()")
        (usage,) = cursor.fetchone()
    ages = [backlog.oldest_age_seconds for backlog in channels if backlog.oldest_age_seconds]
    return DatabaseStatus(
        database=alias,
        stored=sum(backlog.stored for backlog in channels),
        failed=sum(backlog.failed for backlog in channels),
        oldest_age_seconds=max(ages) if ages else None,
        notification_queue_usage=float(usage),
        channels=channels,
    )


def monitored_databases() -> list[str]:
    """The alias of stored notifications, then each other database a channel with a listener
    names (``database = "..."``), in alphabetical order."""
    first = notifications_alias()
    others = {database_for(channel) for channel, callbacks in list(registry.items()) if callbacks}
    others.discard(first)
    return [first, *sorted(others)]


def databases_status(
    aliases: list[str] | None = None,
) -> list[DatabaseStatus | DatabaseFailure]:
    """:func:`database_status` of each of ``aliases`` (default: :func:`monitored_databases`),
    or what kept it from being read: one database down hides nothing of the others."""
    results: list[DatabaseStatus | DatabaseFailure] = []
    for alias in aliases or monitored_databases():
        try:
            results.append(database_status(alias))
        # Unreachable, not migrated, or (a channel's database = "...") not configured.
        except (DatabaseError, ConnectionDoesNotExist) as exc:
            results.append(DatabaseFailure(alias, " ".join(f"{type(exc).__name__}: {exc}".split())))
    return results
