"""Every query on stored notifications: find pending rows, claim rows by id, acknowledge them,
record a failed attempt, retry failed rows.

A row is *due* when it has not failed for good (``failed_at`` is empty) and its next attempt is
not in the future; listeners only ever claim due rows. The hot queries are plain SQL with
parameters (no payload or name is ever pasted into them); ``PGPUBSUB_LISTENER_FILTER`` joins
them as a subquery built by the ORM.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from django.db import connections

from pgpubsub import conf
from pgpubsub.channel import BaseChannel, listen_name
from pgpubsub.models import Notification

#: Most stored rows claimed per transaction: enough to share a commit among many messages,
#: few enough that concurrent listeners share a burst and a slow listener holds few rows.
BATCH_SIZE = 20

_TABLE = Notification._meta.db_table
_DUE = "failed_at IS NULL AND (next_attempt_at IS NULL OR next_attempt_at <= now())"


class StoredRow(NamedTuple):
    """A claimed row: its id, its payload as JSON text (parsed later, by the channel), and the
    failed attempts it had before this one."""

    pk: int
    payload: str
    attempts: int = 0


def stored_names(channel_cls: type[BaseChannel]) -> list[str]:
    """Names a channel's rows are stored under: its LISTEN name, and the dotted path that
    django-pgpubsub 1.x used for rows written by ``notify()``."""
    return [channel_cls.listen_safe_name(), channel_cls.name()]


def wire_name(stored: str) -> str:
    """The LISTEN name the listeners of a row stored under ``stored`` wait on: rows that
    django-pgpubsub 1.x ``notify()`` stored carry the channel's dotted path instead."""
    if BaseChannel.get(stored) or "." not in stored:
        return stored
    return listen_name(stored)


def _filter_sql(using: str) -> tuple[str, list]:
    """`` AND id IN (...)`` for ``PGPUBSUB_LISTENER_FILTER``, or nothing."""
    provider = conf.listener_filter_provider()
    if provider is None:
        return "", []
    # Without the model's ordering: an ORDER BY in the subquery costs a sort of the table.
    allowed = (
        Notification.objects.using(using).filter(provider.get_filter()).order_by().values("pk")
    )
    sql, params = allowed.query.get_compiler(using).as_sql()
    return f" AND id IN ({sql})", list(params)


def _claimable(channel_cls: type[BaseChannel], row_ids: list[int], using: str) -> tuple[str, list]:
    """The conditions of the due rows among ``row_ids``; locked with SKIP LOCKED, they give the
    rows no one else holds.

    The channel test is wrapped in ``IS TRUE`` so that no plan looks the rows up through the
    channel index: a table that was never analysed (a bulk insert, autovacuum off) made the
    planner combine it with the primary key, reading every stored row of the channel."""
    extra, params = _filter_sql(using)
    return (
        f"id = ANY(%s) AND (channel = ANY(%s)) IS TRUE AND {_DUE}{extra}",
        [list(row_ids), stored_names(channel_cls), *params],
    )


def claim_ids(channel_cls: type[BaseChannel], row_ids: list[int], using: str) -> list[StoredRow]:
    """Lock those of the stored rows ``row_ids`` of the channel that are there, due, not
    locked by another listener and not excluded by ``PGPUBSUB_LISTENER_FILTER``, for this
    transaction; oldest first."""
    where, params = _claimable(channel_cls, row_ids, using)
    with connections[using].cursor() as cursor:
        cursor.execute(
            f"SELECT id, payload::text, attempts FROM {_TABLE} WHERE {where} "
            "ORDER BY id FOR UPDATE SKIP LOCKED",
            params,
        )
        return [StoredRow(*row) for row in cursor.fetchall()]


def take_ids(channel_cls: type[BaseChannel], row_ids: list[int], using: str) -> list[StoredRow]:
    """Claim and acknowledge at once: delete those of the stored rows ``row_ids`` that
    :func:`claim_ids` would lock, returning them oldest first. Only a rollback of the
    transaction brings them back, so it suits a transaction that holds one message."""
    where, params = _claimable(channel_cls, row_ids, using)
    with connections[using].cursor() as cursor:
        cursor.execute(
            f"DELETE FROM {_TABLE} WHERE id IN (SELECT id FROM {_TABLE} WHERE {where} "
            "FOR UPDATE SKIP LOCKED) RETURNING id, payload::text, attempts",
            params,
        )
        return sorted(StoredRow(*row) for row in cursor.fetchall())


def pending_ids(
    channel_cls: type[BaseChannel], after_id: int, using: str, limit: int = BATCH_SIZE
) -> list[int]:
    """Ids of up to ``limit`` due rows of the channel above ``after_id``, oldest first,
    without locking them (claiming them skips those another listener holds).

    Per stored name, an ordered range of the index of rows not tried yet, and the due rows of
    the index of rows waiting for a retry; merged. Whatever the planner knows of the table, a
    page costs its own rows and the retries due, not the size of the backlog."""
    extra, params = _filter_sql(using)
    branches = (
        "failed_at IS NULL AND next_attempt_at IS NULL",
        "failed_at IS NULL AND next_attempt_at IS NOT NULL AND next_attempt_at <= now()",
    )
    sql, values = [], []
    for name in stored_names(channel_cls):
        for due in branches:
            sql.append(
                f"(SELECT id FROM {_TABLE} WHERE channel = %s AND {due} AND id > %s{extra} "
                "ORDER BY id LIMIT %s)"
            )
            values += [name, after_id, *params, limit]
    with connections[using].cursor() as cursor:
        cursor.execute(" UNION ALL ".join(sql) + " ORDER BY id LIMIT %s", [*values, limit])
        return [row[0] for row in cursor.fetchall()]


def acknowledge(row_ids: list[int], using: str) -> None:
    """Delete processed rows (inside the transaction that processed them)."""
    if row_ids:
        with connections[using].cursor() as cursor:
            cursor.execute(f"DELETE FROM {_TABLE} WHERE id = ANY(%s)", [list(row_ids)])


def record_failure(
    row_id: int,
    attempts: int,
    error: str,
    traceback: str,
    retry_in: float | None,
    using: str,
    locked: bool = True,
) -> bool:
    """Count a failed attempt of row ``row_id``, which had ``attempts`` when it was claimed,
    and keep its error: it is due again in ``retry_in`` seconds, or (``None``) marked failed.

    ``locked``: this transaction holds the row. Otherwise the attempt's transaction is over and
    the row was due again meanwhile: it is locked here first and left alone if another
    listener holds it, or if another attempt was recorded since the claim (the row is that
    attempt's now; counting both would count past the attempt that marks it failed). False if
    the row was not updated."""
    where = (
        "id = %s"
        if locked
        else f"id = (SELECT id FROM {_TABLE} WHERE id = %s FOR UPDATE SKIP LOCKED)"
    )
    with connections[using].cursor() as cursor:
        cursor.execute(
            f"UPDATE {_TABLE} SET attempts = attempts + 1, last_error = %s, last_traceback = %s, "
            # clock_timestamp(): now() is when the transaction began, maybe long before the
            # failure (a batch), which would bring the next attempt forward.
            "next_attempt_at = CASE WHEN %s::float8 IS NULL THEN NULL "
            "ELSE clock_timestamp() + make_interval(secs => %s::float8) END, "
            "failed_at = CASE WHEN %s::float8 IS NULL THEN clock_timestamp() END "
            f"WHERE {where} AND attempts = %s",
            [error, traceback, retry_in, retry_in, retry_in, row_id, attempts],
        )
        return cursor.rowcount == 1


def record_lost(
    row_ids: list[int],
    retry_in: float,
    charged: list[int],
    max_attempts: int,
    error: str,
    using: str,
) -> None:
    """Put off rows whose processing lost its connection by ``retry_in`` seconds; the rows
    ``charged`` also count a failed attempt (marked failed at ``max_attempts``). Rows another
    listener holds are left to it."""
    with connections[using].cursor() as cursor:
        cursor.execute(
            f"UPDATE {_TABLE} SET "
            "attempts = attempts + CASE WHEN id = ANY(%s) THEN 1 ELSE 0 END, "
            "last_error = CASE WHEN id = ANY(%s) THEN %s ELSE last_error END, "
            "failed_at = CASE WHEN id = ANY(%s) AND attempts + 1 >= %s "
            "THEN clock_timestamp() END, "
            "next_attempt_at = CASE WHEN id = ANY(%s) AND attempts + 1 >= %s THEN NULL "
            "ELSE clock_timestamp() + make_interval(secs => %s::float8) END "
            f"WHERE id IN (SELECT id FROM {_TABLE} WHERE id = ANY(%s) AND failed_at IS NULL "
            "FOR UPDATE SKIP LOCKED)",
            [
                charged,
                charged,
                error,
                charged,
                max_attempts,
                charged,
                max_attempts,
                retry_in,
                list(row_ids),
            ],
        )


def retry(
    channels: Iterable[type[BaseChannel]] | None = None,
    row_ids: Iterable[int] | None = None,
    using: str | None = None,
) -> list[tuple[int, str]]:
    """Make rows due now with a fresh count of attempts, and return their (id, stored channel
    name). With ``row_ids``, those rows (failed, waiting for their next attempt, or not tried
    yet); otherwise every row marked failed, of ``channels`` if given."""
    alias = using or conf.notifications_alias()
    conditions, params = [], []
    if row_ids is not None:
        conditions.append("id = ANY(%s)")
        params.append(list(row_ids))
    else:
        conditions.append("failed_at IS NOT NULL")
    if channels is not None:
        conditions.append("channel = ANY(%s)")
        params.append([name for channel in channels for name in stored_names(channel)])
    # Rows a listener holds right now are skipped (not waited for): they are being processed.
    with connections[alias].cursor() as cursor:
        cursor.execute(
            f"UPDATE {_TABLE} SET attempts = 0, next_attempt_at = NULL, failed_at = NULL "
            f"WHERE id IN (SELECT id FROM {_TABLE} WHERE {' AND '.join(conditions)} "
            "FOR UPDATE SKIP LOCKED) RETURNING id, channel",
            params,
        )
        return sorted(cursor.fetchall())


def notify_rows(rows: Iterable[tuple[int, str]], using: str) -> int:
    """Send the NOTIFY of each stored row ``(id, stored channel name)`` again, so that a
    running listener claims it; returns how many were sent."""
    rows = [(pk, wire_name(name)) for pk, name in rows if name]
    if not rows:
        return 0
    with connections[using].cursor() as cursor:
        cursor.execute(
            "SELECT pg_notify(wire, pk::text) FROM unnest(%s::text[], %s::bigint[]) "
            "AS rows(wire, pk) ORDER BY pk",
            [[wire for _, wire in rows], [pk for pk, _ in rows]],
        )
    return len(rows)
