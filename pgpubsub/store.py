"""Every query on stored notifications: find pending rows, claim rows by id, acknowledge them,
record a failed attempt, retry failed rows. (Over 400 lines on purpose: every statement on
``pgpubsub_notification`` is here, so that the claim protocol below -- claim, hold, acknowledge,
record, give back -- is read and changed as one.)

A row is *due* when it has not failed for good (``failed_at`` is empty) and its next attempt is
not in the future; listeners only ever claim due rows. The hot queries are plain SQL with
parameters (no payload or channel name is ever pasted into them; row ids and claim names, which
pgpubsub makes, are, in the statements sent along with another one); ``PGPUBSUB_LISTENER_FILTER``
joins them as a subquery built by the ORM.

Processing a batch of rows takes two transactions:

1. :func:`claim_ids` commits a *claim* on the due rows no one else holds: each gets the claim's
   name (``claimed_by``) and is not due again for ``CLAIM_LEASE`` seconds (``next_attempt_at``).
   This is the attempt's durable trace: should the process die while the listeners run (a
   segmentation fault, ``os._exit()``, the OOM killer), whatever its processing transaction
   wrote is rolled back, but the claim stays, and the next claim of the row counts the attempt
   that died (and marks the row failed once that makes ``max_attempts``) -- if the claim was
   of that row alone (a *solo* claim, see :func:`new_claim`). A process that died running a
   batch says nothing of which of its rows killed it: those rows are *suspects*, not charged,
   and each runs next under a solo claim of its own (:func:`reclaim`), so that a poison
   message is charged its deaths and the others of its batch are not.
2. The processing transaction locks the claimed rows again (:func:`hold_all_sql` with the
   first savepoint, or :func:`hold`; only rows still carrying this claim) and keeps them
   locked while the listeners run, each message in a savepoint. Every outcome is written in
   it, before the lock goes: the rows that succeeded are deleted (:func:`acknowledge`), a
   failed attempt is counted on its row (:func:`record_failure`), rows not run are given back
   (:func:`give_back`); each clears the claim. No other listener can take a row in between:
   the lease covers the moment from the claim's commit to the lock, the lock covers the rest,
   however long the listeners take.

A live process that loses its connection knows its claims and gives the rows back
(:func:`record_lost`), so a lost connection is not counted as an attempt.

A database that lacks a column or the table these statements use (a new version started before
``migrate``) makes them raise :class:`SchemaBehind`, which says so, instead of the driver's error.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import socket
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

from django.db import DatabaseError, connections

from pgpubsub import conf
from pgpubsub.channel import BaseChannel, listen_name
from pgpubsub.connection import LISTENER_TAG, UNDEFINED_COLUMN, UNDEFINED_TABLE, sqlstate
from pgpubsub.exceptions import PgpubsubError
from pgpubsub.models import Notification, notifications_alias

#: Seconds a claimed row is not due for other listeners. It only has to cover the moment from
#: the claim's commit to the processing transaction's lock (a round trip); after that the lock
#: keeps others off. It is also how long the rows of a process that died wait before they are
#: claimed again. Should a claim outlive it before its rows are locked (a process frozen for
#: that long), another listener may claim the rows: they are not run twice (the lock is taken
#: only on rows that still carry this claim), but the other claim counts a failed attempt.
CLAIM_LEASE = 5.0

_TABLE = Notification._meta.db_table
_DUE = "failed_at IS NULL AND (next_attempt_at IS NULL OR next_attempt_at <= now())"
#: ``last_error`` of an attempt whose process died, around the name of its claim.
_DIED = ("ListenerProcessDied: the process that claimed it (", ") ended while its listeners ran")


class SchemaBehind(PgpubsubError):
    """pgpubsub's table in database ``using`` lacks a column (or is missing) that this version's
    statements use: ``manage.py migrate`` was not run. Nothing was attempted."""

    def __init__(self, using: str, detail: str) -> None:
        self.using = using
        self.detail = detail  # the driver's message, or what schema_problem() found
        super().__init__(
            f"pgpubsub's table {_TABLE} in database {using!r} is behind this version of "
            f"pgpubsub ({detail}): run `manage.py migrate`"
        )


def schema_error(error: BaseException, using: str) -> SchemaBehind | None:
    """The :class:`SchemaBehind` that ``error``, raised by one of pgpubsub's own statements on
    database ``using``, means (an undefined column or table), else None. The one place that
    tells a database not migrated from other errors."""
    if sqlstate(error) not in (UNDEFINED_COLUMN, UNDEFINED_TABLE):
        return None
    # The first line: psycopg2 goes on with the statement ("LINE 1: ...") and a caret.
    lines = str(error).strip().splitlines()
    first = lines[0].strip() if lines else type(error).__name__
    # A statement of ours may name other tables too (PGPUBSUB_LISTENER_FILTER's subquery): an
    # undefined name that is none of the table's is the project's error, not a migrate to run.
    # (A message in another language names nothing we can read: taken to be ours.)
    named = _UNDEFINED_NAME.search(first)
    if named is not None and named[1].rsplit(".", 1)[-1] not in _OUR_NAMES:
        return None
    return SchemaBehind(using, first)


#: The name in PostgreSQL's "column ... does not exist" / "relation ... does not exist".
_UNDEFINED_NAME = re.compile(r'(?:column|relation) "?([\w.]+)"? does not exist')
_OUR_NAMES = frozenset([_TABLE, *(field.column for field in Notification._meta.concrete_fields)])


@contextlib.contextmanager
def _cursor(using: str) -> Iterator[Any]:
    """A cursor of ``using`` for pgpubsub's own statements: see :func:`schema_error`."""
    with connections[using].cursor() as cursor:
        try:
            yield cursor
        except DatabaseError as error:
            behind = schema_error(error, using)
            if behind is None:
                raise
            raise behind from error


def schema_problem(using: str) -> str | None:
    """What the table of database ``using`` lacks of this version's model (``lacks column
    claimed_by``, ``does not exist``), read from the catalog; None when nothing is missing."""
    with connections[using].cursor() as cursor:
        cursor.execute(
            "SELECT to_regclass(%s) IS NOT NULL, ARRAY(SELECT attname::text FROM pg_attribute "
            "WHERE attrelid = to_regclass(%s) AND attnum > 0 AND NOT attisdropped)",
            [_TABLE, _TABLE],
        )
        exists, columns = cursor.fetchone()
    if not exists:
        return "does not exist"
    missing = [
        field.column for field in Notification._meta.concrete_fields if field.column not in columns
    ]
    if not missing:
        return None
    return f"lacks column{'s' if len(missing) > 1 else ''} {', '.join(missing)}"


def check_schema(using: str) -> None:
    """Raise :class:`SchemaBehind` when the table of database ``using`` lacks what this
    version uses."""
    problem = schema_problem(using)
    if problem is not None:
        raise SchemaBehind(using, problem)


class StoredRow(NamedTuple):
    """A claimed row: its id, its payload as JSON text (parsed later, by the channel), and the
    failed attempts it had before this one. ``died``: the claim of a process that died while it
    ran this row's listeners; ``suspect``: that claim was of a batch, so the attempt was not
    counted and the row is to run alone; else it is among ``attempts``, and ``failed``: that
    attempt was the last one, so the row was marked failed and is not to be run."""

    pk: int
    payload: str
    attempts: int = 0
    died: str | None = None
    failed: bool = False
    suspect: bool = False


#: The end of the name of a claim of one row (:func:`new_claim`).
SOLO = ":1"


def new_claim(solo: bool = False) -> str:
    """A name for one claim, unique across processes and hosts, that says where it was made
    (``host:pid:random``, and ``:1`` at the end for a claim of one row, ``solo``): a row a dead
    process left claimed shows it in ``last_error``. Only letters, digits and ``.:_-``, so that
    it can be written into SQL (:func:`hold_all_sql`)."""
    host = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())[:80]
    return f"{host}:{os.getpid()}:{secrets.token_hex(6)}{SOLO if solo else ''}"


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

    Every condition but the ids is wrapped in ``IS TRUE`` so that the rows are found by the
    primary key alone: a table that was never analysed (a bulk insert, autovacuum off) made the
    planner look them up through the channel index (the channel test) or the partial indexes
    of due rows (the due test, which implies their predicates), reading every stored row of
    the channel for each id: 50 ms for a claim of 100 rows among 10,000, against 2.5 ms."""
    extra, params = _filter_sql(using)
    return (
        f"id = ANY(%s) AND (channel = ANY(%s) AND {_DUE}) IS TRUE{extra}",
        [list(row_ids), stored_names(channel_cls), *params],
    )


def claim_ids(
    channel_cls: type[BaseChannel],
    row_ids: list[int],
    claim: str,
    max_attempts: int,
    using: str,
) -> list[StoredRow]:
    """Claim those of the stored rows ``row_ids`` of the channel that are there, due, not
    locked by another listener and not excluded by ``PGPUBSUB_LISTENER_FILTER``, for
    ``CLAIM_LEASE`` seconds under the name ``claim``; oldest first. In autocommit (a worker's
    connection) the claim commits at once; inside a transaction, with it.

    A due row that still carries a claim was claimed by a process that died before it wrote
    the outcome (a live one writes it, or gives the row back). If that was a solo claim, the
    attempt is counted here, and a row it brings to ``max_attempts`` is marked failed instead
    of claimed (``failed``); if a batch's, the row is claimed uncounted, a ``suspect``."""
    where, params = _claimable(channel_cls, row_ids, using)
    asynchronous = _asynchronous_commit(using)
    # c.charged: the row carries the solo claim of a process that died (see the module's doc).
    exhausted = "c.charged AND n.attempts + 1 >= %s"
    with _cursor(using) as cursor:
        cursor.execute(
            # SET sees the row as it was: c.dead is the claim the row still carried, if any.
            f"UPDATE {_TABLE} AS n SET "
            "attempts = n.attempts + CASE WHEN c.charged THEN 1 ELSE 0 END, "
            "last_error = CASE WHEN c.charged THEN concat(%s::text, c.dead, %s::text) "
            "ELSE n.last_error END, "
            "last_traceback = CASE WHEN c.charged THEN NULL ELSE n.last_traceback END, "
            f"failed_at = CASE WHEN {exhausted} THEN clock_timestamp() END, "
            f"claimed_by = CASE WHEN {exhausted} THEN NULL ELSE %s END, "
            f"next_attempt_at = CASE WHEN {exhausted} THEN NULL "
            "ELSE clock_timestamp() + make_interval(secs => %s::float8) END "
            "FROM (SELECT id, claimed_by AS dead, "
            "coalesce(right(claimed_by, %s::int) = %s::text, false) AS charged "
            f"FROM {_TABLE} WHERE {where} "
            f"ORDER BY id FOR UPDATE SKIP LOCKED) AS c WHERE n.id = c.id{asynchronous} "
            "RETURNING n.id, n.payload::text, n.attempts, c.dead, n.failed_at IS NOT NULL, "
            "c.dead IS NOT NULL AND NOT c.charged",
            [
                *_DIED,
                max_attempts,
                max_attempts,
                claim,
                max_attempts,
                CLAIM_LEASE,
                len(SOLO),
                SOLO,
                *params,
            ],
        )
        claimed = [StoredRow(*row) for row in cursor.fetchall()]
    if getattr(channel_cls, "read_page", None) is not None:
        # A channel that orders its pages itself (tasks: by priority) runs them in that order.
        position = {pk: index for index, pk in enumerate(row_ids)}
        return sorted(claimed, key=lambda row: position.get(row.pk, 0))
    return sorted(claimed)


def _asynchronous_commit(using: str) -> str:
    """A condition that makes the claim's commit asynchronous, in autocommit.

    The claim must outlive the listener's process, not the server: it need not wait for its WAL
    to be flushed (the processing transaction's commit flushes it anyway). Were the server to
    crash first, the processing transaction would be lost with it, and the message run again,
    uncounted, as it would have been before. Not inside a caller's transaction, whose commit
    this setting would change."""
    if connections[using].in_atomic_block:
        return ""
    return " AND (SELECT set_config('synchronous_commit', 'off', true)) = 'off'"


def reclaim(row_id: int, claim: str, solo: str, using: str) -> bool:
    """Move row ``row_id`` from ``claim`` to the solo claim ``solo``, for a new lease: a
    suspect runs alone, so that its attempt is counted should its process die. False if the
    row no longer carries ``claim`` (its lease ran out and another listener claimed it)."""
    with _cursor(using) as cursor:
        cursor.execute(
            f"UPDATE {_TABLE} SET claimed_by = %s, "
            "next_attempt_at = clock_timestamp() + make_interval(secs => %s::float8) "
            "WHERE id = %s AND claimed_by = %s",
            [solo, CLAIM_LEASE, row_id, claim],
        )
        return cursor.rowcount == 1


def hold(row_ids: list[int], claim: str, using: str) -> set[int]:
    """Lock, for the processing transaction, those of the rows ``row_ids`` that still carry
    ``claim``; returns their ids. A row missing was claimed again by another listener after
    this claim's lease ran out: it is that listener's now.

    Not SKIP LOCKED: another listener's claim may be looking at a row (and lock it for that
    instant) to find it not due, which would make this transaction pass over its own row.
    Nothing else keeps a lock on a row that carries this claim, so the wait is that instant."""
    with _cursor(using) as cursor:
        cursor.execute(
            f"SELECT id FROM {_TABLE} WHERE id = ANY(%s) AND claimed_by = %s FOR UPDATE",
            [list(row_ids), claim],
        )
        return {row[0] for row in cursor.fetchall()}


def hold_all_sql(row_ids: list[int], claim: str) -> str:
    """:func:`hold` as a statement to send along with the one that follows it (one round trip
    for both): it fails with a division by zero unless every row still carries ``claim``
    (then roll back, and :func:`hold` tells which rows do)."""
    if not _SAFE_CLAIM.fullmatch(claim):
        raise ValueError(f"Not a claim made by new_claim(): {claim!r}")
    ids = ",".join(str(int(pk)) for pk in row_ids)
    return (
        f"SELECT 1 / (count(*) = {len(row_ids)})::int FROM (SELECT id FROM {_TABLE} "
        f"WHERE id = ANY('{{{ids}}}'::bigint[]) AND claimed_by = '{claim}' FOR UPDATE) AS held"
    )


_SAFE_CLAIM = re.compile(r"[A-Za-z0-9._:-]+")


def give_back(row_ids: list[int], using: str) -> None:
    """Make rows this transaction holds but did not run due again at once, with no attempt
    counted (a batch stopped midway)."""
    if row_ids:
        with _cursor(using) as cursor:
            cursor.execute(
                f"UPDATE {_TABLE} SET claimed_by = NULL, next_attempt_at = NULL WHERE id = ANY(%s)",
                [list(row_ids)],
            )


#: ``_DUE`` in two branches, each with an index of its own.
_DUE_BRANCHES = (
    "failed_at IS NULL AND next_attempt_at IS NULL",
    "failed_at IS NULL AND next_attempt_at IS NOT NULL AND next_attempt_at <= now()",
)


def due_names(cursor: Any, names: list[str]) -> set[str]:
    """Of the stored ``names``, those with due rows: a look on ``cursor`` (any connection to
    the table's database, e.g. a LISTEN connection), an index probe per name."""
    if not names:
        return set()
    exists = " OR ".join(
        f"EXISTS (SELECT 1 FROM {_TABLE} WHERE channel = name AND {due})" for due in _DUE_BRANCHES
    )
    cursor.execute(
        f"{LISTENER_TAG}SELECT name FROM unnest(%s::text[]) AS name WHERE {exists}", [names]
    )
    return {row[0] for row in cursor.fetchall()}


def pending_ids(channel_cls: type[BaseChannel], after_id: int, using: str, limit: int) -> list[int]:
    """Ids of up to ``limit`` due rows of the channel above ``after_id``, oldest first,
    without locking them (claiming them skips those another listener holds).

    Per stored name, an ordered range of the index of rows not tried yet, and the due rows of
    the index of rows waiting for a retry; merged. Whatever the planner knows of the table, a
    page costs its own rows and the retries due, not the size of the backlog."""
    extra, params = _filter_sql(using)
    sql, values = [], []
    for name in stored_names(channel_cls):
        for due in _DUE_BRANCHES:
            sql.append(
                f"(SELECT id FROM {_TABLE} WHERE channel = %s AND {due} AND id > %s{extra} "
                "ORDER BY id LIMIT %s)"
            )
            values += [name, after_id, *params, limit]
    with _cursor(using) as cursor:
        cursor.execute(" UNION ALL ".join(sql) + " ORDER BY id LIMIT %s", [*values, limit])
        return [row[0] for row in cursor.fetchall()]


def acknowledge(row_ids: list[int], using: str) -> None:
    """Delete processed rows (inside the transaction that holds them)."""
    if row_ids:
        with _cursor(using) as cursor:
            cursor.execute(acknowledge_sql(row_ids))


def acknowledge_sql(row_ids: list[int]) -> str:
    """The statement of :func:`acknowledge`, to send along with another one (ids are ints)."""
    ids = ",".join(str(int(pk)) for pk in row_ids)
    return f"DELETE FROM {_TABLE} WHERE id = ANY('{{{ids}}}'::bigint[])"


def record_failure(
    row_id: int,
    claim: str,
    error: str,
    traceback: str,
    retry_in: float | None,
    using: str,
    locked: bool = True,
) -> bool:
    """Count a failed attempt of row ``row_id`` and keep its error: it is due again in
    ``retry_in`` seconds, or (``None``) marked failed. Its claim ends.

    ``locked``: this transaction holds the row, so no one else can have run it meanwhile.
    Otherwise (the attempt's transaction failed to commit) the row is updated only if it still
    carries ``claim``: if this claim's lease ran out meanwhile, another listener may have
    claimed the row, and that claim counted this attempt. False if the row was not updated."""
    where = "id = %s" if locked else "id = %s AND claimed_by = %s"
    with _cursor(using) as cursor:
        cursor.execute(
            f"UPDATE {_TABLE} SET attempts = attempts + 1, last_error = %s, last_traceback = %s, "
            # clock_timestamp(): now() is when the transaction began, maybe long before the
            # failure (a batch), which would bring the next attempt forward.
            "next_attempt_at = CASE WHEN %s::float8 IS NULL THEN NULL "
            "ELSE clock_timestamp() + make_interval(secs => %s::float8) END, "
            "failed_at = CASE WHEN %s::float8 IS NULL THEN clock_timestamp() END, "
            f"claimed_by = NULL WHERE {where}",
            [error, traceback, retry_in, retry_in, retry_in, row_id] + ([] if locked else [claim]),
        )
        return cursor.rowcount == 1


def record_lost(
    row_ids: list[int],
    claim: str,
    using: str,
    retry_in: float = 0.0,
    put_off: Iterable[int] = (),
    charged: Iterable[int] = (),
    max_attempts: int = 1,
    error: str = "",
) -> list[int]:
    """After the connection that processed rows ``row_ids`` under ``claim`` broke, on a new
    one: give the rows of the claim back, uncounted; those ``put_off`` are due in ``retry_in``
    seconds only, and those ``charged`` count a failed attempt (marked failed at
    ``max_attempts``). Rows another listener holds or has claimed are left to it.

    Returns the ids of the rows that still carry the claim but are locked: the broken session
    may not have ended yet. The caller gives them back later."""
    put_off, charged = list(put_off), list(charged)
    with _cursor(using) as cursor:
        cursor.execute(
            f"WITH given AS (UPDATE {_TABLE} SET "
            "attempts = attempts + CASE WHEN id = ANY(%s) THEN 1 ELSE 0 END, "
            "last_error = CASE WHEN id = ANY(%s) THEN %s ELSE last_error END, "
            "failed_at = CASE WHEN id = ANY(%s) AND attempts + 1 >= %s "
            "THEN clock_timestamp() END, "
            "next_attempt_at = CASE WHEN id = ANY(%s) AND attempts + 1 >= %s THEN NULL "
            "WHEN id = ANY(%s) THEN clock_timestamp() + make_interval(secs => %s::float8) "
            "WHEN claimed_by IS NOT NULL THEN NULL ELSE next_attempt_at END, "
            "claimed_by = NULL "
            f"WHERE id IN (SELECT id FROM {_TABLE} WHERE id = ANY(%s) AND failed_at IS NULL "
            "AND (claimed_by IS NULL OR claimed_by = %s) FOR UPDATE SKIP LOCKED) RETURNING id) "
            # The statement's snapshot: rows it just gave back still show the claim here.
            f"SELECT id FROM {_TABLE} WHERE id = ANY(%s) AND claimed_by = %s "
            "AND id NOT IN (SELECT id FROM given)",
            [
                charged,
                charged,
                error,
                charged,
                max_attempts,
                charged,
                max_attempts,
                put_off,
                retry_in,
                list(row_ids),
                claim,
                list(row_ids),
                claim,
            ],
        )
        return sorted(row[0] for row in cursor.fetchall())


def retry(
    channels: Iterable[type[BaseChannel]] | None = None,
    row_ids: Iterable[int] | None = None,
    using: str | None = None,
) -> list[tuple[int, str]]:
    """Make rows due now with a fresh count of attempts, and return their (id, stored channel
    name). With ``row_ids``, those rows (failed, waiting for their next attempt, or not tried
    yet); otherwise every row marked failed, of ``channels`` if given."""
    alias = using or notifications_alias()
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
    with _cursor(alias) as cursor:
        cursor.execute(
            f"UPDATE {_TABLE} SET attempts = 0, next_attempt_at = NULL, failed_at = NULL, "
            "claimed_by = NULL "
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
    with _cursor(using) as cursor:
        cursor.execute(
            "SELECT pg_notify(wire, pk::text) FROM unnest(%s::text[], %s::bigint[]) "
            "AS rows(wire, pk) ORDER BY pk",
            [[wire for _, wire in rows], [pk for pk, _ in rows]],
        )
    return len(rows)
