"""Every statement on tasks' rows: store a task, read a page of ready ones by priority, find
when the next deferred one is due, write an attempt's outcome, read a result, prune.

A task waits as a row of ``pgpubsub_notification`` (claimed, held and acknowledged by
:mod:`pgpubsub.store` like any lockable message); its id is the task result's id. What its
attempts did is written to ``pgpubsub_taskresult`` (:class:`~pgpubsub.models.TaskResultRecord`)
in the transaction of each attempt.
"""

from __future__ import annotations

import datetime
import json
import threading
from typing import Any, NamedTuple

from django.db import connections

from pgpubsub import wire
from pgpubsub.models import Notification, TaskResultRecord
from pgpubsub.store import CLAIM_LEASE

_TABLE = Notification._meta.db_table
_RESULTS = TaskResultRecord._meta.db_table

#: The start of every task queue's channel name. The index of migration 0012 covers the rows
#: of these channels only; ``_IS_TASK`` and ``_ORDER`` repeat its predicate and expression word
#: for word, so that the planner uses it.
PREFIX = "pgpubsub_task_"
_IS_TASK = "left(channel, 14) = 'pgpubsub_task_'"
_ORDER = "(-((payload ->> 'priority')::integer))"
_DUE = "failed_at IS NULL AND (next_attempt_at IS NULL OR next_attempt_at <= now())"


def store(
    channel: str, payload: str, run_after: datetime.datetime | None, wake: bool, using: str
) -> int:
    """Store a task (JSON text ``payload``, with its ``enqueued_at``) in the current
    transaction; not claimed before ``run_after``. A deferred task with ``wake`` also NOTIFYs
    the queue's listeners (``PGPUBSUB_NOTIFY_ON_WRITE``; else the watcher tells them; a task
    due at once notifies as a lockable message would). Returns the row's id."""
    with connections[using].cursor() as cursor:
        if run_after is None:
            # What notify() stores lockable messages with: its INSERT's plan is kept by the
            # session (a plain INSERT is planned again each time: about 100 us more).
            cursor.execute("SELECT pgpubsub_store(%s, %s::jsonb)", [channel, payload])
            return cursor.fetchone()[0]
        cursor.execute(
            f"INSERT INTO {_TABLE} (channel, payload, next_attempt_at) "
            "VALUES (%s, %s::jsonb, %s) RETURNING id",
            [channel, payload, run_after],
        )
        row_id = cursor.fetchone()[0]
        if wake:
            cursor.execute("SELECT pg_notify(%s, %s)", [channel, wire.WAKE])
    return row_id


# The last row of each page read (its id) and its order key, so that the next page of the same
# sweep starts after it; the pages of a sweep are read in this process.
_page_ends: dict[tuple[str, int], int] = {}
_page_lock = threading.Lock()
_MAX_PAGE_ENDS = 4096


def ready_page(channel: str, after_id: int, using: str, limit: int) -> list[int]:
    """Ids of up to ``limit`` ready tasks of the queue ``channel`` (due, not failed), highest
    priority first, then oldest, after the last row of the page that ended at ``after_id``."""
    with _page_lock:
        after = _page_ends.pop((channel, after_id), None) if after_id else None
    where, params = "", []
    if after is not None:
        where = f" AND ({_ORDER}, id) > (%s, %s)"
        params = [after, after_id]
    with connections[using].cursor() as cursor:
        cursor.execute(
            f"SELECT id, {_ORDER} FROM {_TABLE} "
            f"WHERE channel = %s AND {_IS_TASK} AND failed_at IS NULL "
            f"AND (next_attempt_at IS NULL OR next_attempt_at <= now()){where} "
            f"ORDER BY {_ORDER}, id LIMIT %s",
            [channel, *params, limit],
        )
        rows = cursor.fetchall()
    if rows:
        with _page_lock:
            if len(_page_ends) >= _MAX_PAGE_ENDS:
                _page_ends.clear()
            _page_ends[(channel, rows[-1][0])] = rows[-1][1]
    return [row[0] for row in rows]


def next_due(channel: str, using: str) -> float | None:
    """Seconds until the next deferred (or retried, or leased) task of ``channel`` is due, if
    any waits."""
    with connections[using].cursor() as cursor:
        cursor.execute(
            "SELECT extract(epoch FROM min(next_attempt_at) - clock_timestamp()) "
            f"FROM {_TABLE} WHERE channel = %s AND failed_at IS NULL "
            "AND next_attempt_at > clock_timestamp()",
            [channel],
        )
        seconds = cursor.fetchone()[0]
    return None if seconds is None else max(0.0, float(seconds))


class Success(NamedTuple):
    """A task's successful attempt, to be written with its batch's (:func:`write_successes`)."""

    row_id: int
    payload: str  # JSON, as stored
    started_at: datetime.datetime  # of its first attempt
    attempted_at: datetime.datetime  # of this one
    finished_at: datetime.datetime
    worker_id: str
    return_value: str  # JSON


_SUCCESS_VALUES = (
    "(%s::bigint, %s::jsonb, %s::timestamptz, %s::timestamptz, %s::timestamptz, %s, %s::jsonb)"
)


def write_successes(successes: list[Success], using: str) -> None:
    """Record the successful attempts of a batch's tasks, in one statement (in the transaction
    that acknowledges their rows)."""
    if not successes:
        return
    params: list[Any] = []
    for done in successes:
        params += [
            done.row_id,
            done.payload,
            done.started_at,
            done.attempted_at,
            done.finished_at,
            done.worker_id,
            done.return_value,
        ]
    with connections[using].cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {_RESULTS} AS r (id, task_path, queue_name, payload, status, "
            "enqueued_at, started_at, finished_at, last_attempted_at, return_value, errors, "
            "worker_ids) "
            "SELECT v.id, coalesce(v.payload ->> 'task', ''), coalesce(v.payload ->> 'queue', ''), "
            f"v.payload, 'SUCCESSFUL', {_enqueued_at('v.payload')}, v.started, v.finished, "
            "v.attempted, v.value, '[]'::jsonb, jsonb_build_array(v.worker) "
            f"FROM (VALUES {', '.join([_SUCCESS_VALUES] * len(successes))}) "
            "AS v(id, payload, started, attempted, finished, worker, value) "
            "ON CONFLICT (id) DO UPDATE SET payload = EXCLUDED.payload, "
            "status = EXCLUDED.status, started_at = coalesce(r.started_at, EXCLUDED.started_at), "
            "finished_at = EXCLUDED.finished_at, last_attempted_at = EXCLUDED.last_attempted_at, "
            "return_value = EXCLUDED.return_value, "
            "worker_ids = r.worker_ids || EXCLUDED.worker_ids",
            params,
        )


def _enqueued_at(payload: str) -> str:
    """When the task was enqueued, as the stored payload says (SQL)."""
    return f"({payload} ->> 'enqueued_at')::timestamptz"


def write_failure(
    row_id: int,
    final: bool,
    started_at: datetime.datetime | None,
    attempted_at: datetime.datetime,
    worker_id: str,
    error: dict[str, str],
    using: str,
) -> None:
    """Record a failed attempt (in the transaction that records it on the row, which is still
    there: the task's payload and when it was enqueued are read from it)."""
    with connections[using].cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {_RESULTS} AS r (id, task_path, queue_name, payload, status, "
            "enqueued_at, started_at, finished_at, last_attempted_at, return_value, errors, "
            "worker_ids) "
            "SELECT %s, coalesce(n.payload ->> 'task', ''), coalesce(n.payload ->> 'queue', ''), "
            f"n.payload, %s, coalesce({_enqueued_at('n.payload')}, n.created_at), %s, %s, %s, "
            "NULL, jsonb_build_array(%s::jsonb), jsonb_build_array(%s::text) "
            f"FROM (SELECT 1) AS one LEFT JOIN {_TABLE} AS n ON n.id = %s "
            "ON CONFLICT (id) DO UPDATE SET "
            "task_path = coalesce(EXCLUDED.task_path, r.task_path), "
            "queue_name = EXCLUDED.queue_name, "
            "payload = coalesce(EXCLUDED.payload, r.payload), status = EXCLUDED.status, "
            "enqueued_at = coalesce(r.enqueued_at, EXCLUDED.enqueued_at), "
            "started_at = coalesce(r.started_at, EXCLUDED.started_at), "
            "finished_at = EXCLUDED.finished_at, last_attempted_at = EXCLUDED.last_attempted_at, "
            "return_value = NULL, errors = r.errors || EXCLUDED.errors, "
            "worker_ids = r.worker_ids || EXCLUDED.worker_ids",
            [
                row_id,
                "FAILED" if final else "READY",
                started_at,
                attempted_at if final else None,
                attempted_at,
                json.dumps(error),
                worker_id,
                row_id,
            ],
        )


def earlier_attempts(row_id: int, using: str) -> tuple[list[str], list[dict], Any]:
    """The workers and errors of a task's earlier attempts, and when the first started."""
    with connections[using].cursor() as cursor:
        cursor.execute(
            f"SELECT worker_ids, errors, started_at FROM {_RESULTS} WHERE id = %s", [row_id]
        )
        found = cursor.fetchone()
    if found is None:
        return [], [], None
    workers, errors, started = found
    return _json(workers) or [], _json(errors) or [], started


class StoredResult(NamedTuple):
    """What the database knows of a task: its waiting row's state (if it waits) and what its
    attempts recorded (if any)."""

    payload: dict[str, Any]
    status: str  # READY, RUNNING, FAILED or SUCCESSFUL
    enqueued_at: datetime.datetime | None
    started_at: datetime.datetime | None
    finished_at: datetime.datetime | None
    last_attempted_at: datetime.datetime | None
    return_value: Any
    errors: list[dict[str, str]]
    worker_ids: list[str]


def read(row_id: int, using: str) -> StoredResult | None:
    """The task whose result id is ``row_id``, or None if there is none (or it was pruned)."""
    with connections[using].cursor() as cursor:
        cursor.execute(
            "SELECT n.id IS NOT NULL, coalesce(n.payload, r.payload)::text, "
            "CASE WHEN n.id IS NULL THEN r.status WHEN n.failed_at IS NOT NULL THEN 'FAILED' "
            "WHEN n.claimed_by IS NOT NULL THEN 'RUNNING' ELSE 'READY' END, "
            f"coalesce(r.enqueued_at, {_enqueued_at('coalesce(n.payload, r.payload)')}, "
            "n.created_at), "
            "coalesce(r.started_at, CASE WHEN n.claimed_by IS NOT NULL "
            "THEN n.next_attempt_at - make_interval(secs => %s::float8) END), "
            "CASE WHEN n.id IS NULL OR n.failed_at IS NOT NULL "
            "THEN coalesce(r.finished_at, n.failed_at) END, "
            "r.last_attempted_at, r.return_value::text, r.errors::text, r.worker_ids::text "
            f"FROM (SELECT %s::bigint AS id) AS k "
            f"LEFT JOIN {_TABLE} AS n ON n.id = k.id AND {_IS_TASK} "
            f"LEFT JOIN {_RESULTS} AS r ON r.id = k.id",
            [CLAIM_LEASE, row_id],
        )
        row = cursor.fetchone()
    waiting, payload = row[0], row[1]
    if payload is None:
        return None
    status = row[2]
    if not waiting and status is None:
        return None
    return StoredResult(
        payload=json.loads(payload),
        status=status,
        enqueued_at=row[3],
        started_at=row[4],
        finished_at=row[5],
        last_attempted_at=row[6],
        return_value=_json(row[7]),
        errors=_json(row[8]) or [],
        worker_ids=_json(row[9]) or [],
    )


def prune(channels: list[str], older_than: float, using: str) -> int:
    """Delete what is known of the tasks of ``channels`` that finished more than
    ``older_than`` seconds ago: results of successful ones, and failed ones (their row and
    result). Returns how many results went."""
    with connections[using].cursor() as cursor:
        cursor.execute(
            f"WITH gone AS (DELETE FROM {_TABLE} WHERE channel = ANY(%s) "
            "AND failed_at < now() - make_interval(secs => %s::float8) RETURNING id) "
            f"DELETE FROM {_RESULTS} WHERE finished_at < now() - make_interval(secs => %s::float8) "
            f"AND (id IN (SELECT id FROM gone) OR NOT EXISTS "
            f"(SELECT 1 FROM {_TABLE} AS n WHERE n.id = {_RESULTS}.id))",
            [channels, older_than, older_than],
        )
        return cursor.rowcount


def _json(text: str | None) -> Any:
    return None if text is None else json.loads(text)
