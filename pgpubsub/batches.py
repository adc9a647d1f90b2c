"""Inside the transaction of one claimed batch: each message in a savepoint of its own, then one
statement that acknowledges (deletes) those that succeeded.

The rows are locked in the round trip that opens the first savepoint; a savepoint that
succeeded is not released (the commit ends it); a message's deferred constraints are checked in
the statement that opens the next message's savepoint (the last one's, in the acknowledging
one): a message costs its listeners' queries and one round trip more. A message that fails is
rolled back to its savepoint, alone, and its failed attempt is written in the same transaction,
while the row is still locked. When the processor is asked to stop, the rows not started yet
are given back, uncounted.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from django.db import DatabaseError, connections
from django.db.transaction import TransactionManagementError

from pgpubsub import connection, store
from pgpubsub.channel import BaseChannel
from pgpubsub.failures import Failures

# Checks the deferred constraints a message's work left pending (a violation raises here, while
# the message's savepoint can still undo it), then defers them again as Django declares its
# foreign keys.
_CHECK_DEFERRED = "SET CONSTRAINTS ALL IMMEDIATE; SET CONSTRAINTS ALL DEFERRED"


class NotHeld(Exception):
    """Some of the claimed rows no longer carry the claim: lock them one by one."""


class Done(NamedTuple):
    """A message of the batch that succeeded."""

    row_id: int
    duration: float  # seconds its listeners took
    attempt: int


class _Ran(NamedTuple):
    """A message of a batch that succeeded: what undoing it needs."""

    row: store.StoredRow
    started: float
    hooks: int  # its on_commit() functions come after this many
    savepoint: str


class Batch:
    """Runs claimed rows of ``channel_cls`` in the current transaction of database ``using``,
    on the driver connection ``used`` (to tell a lost connection from a listener's error)."""

    def __init__(
        self,
        using: str,
        channel_cls: type[BaseChannel],
        callbacks: list[Callable],
        failures: Failures,
        stopping: threading.Event | None,
        used: Any,
    ) -> None:
        self.using = using
        self.channel_cls = channel_cls
        self.callbacks = callbacks
        self.failures = failures
        self.stopping = stopping
        self.used = used
        self.started = False  # a listener started: then the attempt happened

    def _stop_wanted(self) -> bool:
        return self.stopping is not None and self.stopping.is_set()

    def run(self, rows: list[store.StoredRow], hold: str | None = None) -> list[Done]:
        """Run each row's callbacks in a savepoint of its own (after locking the rows with the
        statement ``hold``, if given), then delete the rows that succeeded. The failed attempts
        of the others are recorded in the same transaction, and the rows not run because the
        processor stops are given back."""
        db = connections[self.using]
        if not rows or self._stop_wanted():
            if hold is not None:
                execute_holding(db, hold)
            store.give_back([row.pk for row in rows], self.using)
            return []
        succeeded: list[Done] = []
        unchecked: _Ran | None = None  # the last message that succeeded, not checked yet
        unrun: list[store.StoredRow] = []
        for index, row in enumerate(rows):
            if index and self._stop_wanted():
                unrun = rows[index:]
                break
            savepoint = f"pgpubsub_{index}"
            opening = f'SAVEPOINT "{savepoint}"'
            if unchecked is not None:
                if not self._check_deferred(unchecked, succeeded, opening):
                    execute(db, opening)
            elif hold is not None:
                execute_holding(db, f"{hold}; {opening}")
                hold = None
            else:
                execute(db, opening)
            unchecked = self._run_one(db, row, savepoint, succeeded)
        acknowledged = unchecked is not None and self._check_deferred(
            unchecked, succeeded, store.acknowledge_sql([done.row_id for done in succeeded])
        )
        if not acknowledged:
            store.acknowledge([done.row_id for done in succeeded], self.using)
        # After the last check, which may roll back to the last message's savepoint.
        store.give_back([row.pk for row in unrun], self.using)
        return succeeded

    def _run_one(
        self, db: Any, row: store.StoredRow, savepoint: str, succeeded: list[Done]
    ) -> _Ran | None:
        """Run one row in its savepoint; what undoing it needs if it succeeded."""
        started = time.perf_counter()
        hooks = len(db.run_on_commit)
        read = False
        self.started = True
        try:
            message = self.channel_cls.build_from_payload(row.payload, self.callbacks)
            read = True
            message.execute_callbacks()
            check_not_doomed(db)
        except Exception as error:
            if connection.lost(self.using, self.used):
                raise
            undo(db, savepoint, hooks)
            self.failures.attempt_failed(self.channel_cls, row, error, started, read)
            return None
        # The message's on_commit() functions run after the commit, where one that fails
        # would skip the others': it is logged instead.
        robust_hooks(db, hooks)
        succeeded.append(Done(row.pk, time.perf_counter() - started, row.attempts + 1))
        return _Ran(row, started, hooks, savepoint)

    def _check_deferred(self, ran: _Ran, succeeded: list[Done], then: str) -> bool:
        """Check the deferred constraints the message ``ran`` (the last of ``succeeded``) left
        pending, then run the statement ``then`` in the same round trip. A violation undoes
        that message and records its failed attempt; returns False then (``then`` did not
        run)."""
        db = connections[self.using]
        try:
            execute(db, f"{_CHECK_DEFERRED}; {then}")
        except Exception as error:
            if connection.lost(self.using, self.used):
                raise
            undo(db, ran.savepoint, ran.hooks)
            succeeded.pop()
            self.failures.attempt_failed(self.channel_cls, ran.row, error, ran.started, True)
            return False
        return True


def undo(db: Any, savepoint: str, hooks: int) -> None:
    """Roll a message's work back to its savepoint, its on_commit() functions with it."""
    # A listener's database error marked the transaction for rollback, which refuses every
    # query, the rollback to the savepoint included: that rollback is what repairs it.
    db.needs_rollback = False
    db.savepoint_rollback(savepoint)
    del db.run_on_commit[hooks:]


def execute(db: Any, sql: str) -> None:
    """Run pgpubsub's own statement ``sql`` (no parameters) on the driver's cursor: no query
    logging or execute wrappers for what users did not write; errors as Django's."""
    with db.wrap_database_errors, db.connection.cursor() as cursor:
        cursor.execute(sql)


def execute_holding(db: Any, sql: str) -> None:
    """:func:`execute` a statement that starts with ``store.hold_all_sql()``: its division by
    zero (some row no longer carries the claim) is raised as :class:`NotHeld`."""
    try:
        execute(db, sql)
    except DatabaseError as error:
        if connection.sqlstate(error) == "22012":
            raise NotHeld from error
        behind = store.schema_error(error, db.alias)
        if behind is not None:
            raise behind from error
        raise


def check_not_doomed(db: Any) -> None:
    """Raise when the listeners left the transaction marked for rollback (one caught a database
    error inside an ``atomic()`` block without a savepoint): Django would roll it back quietly,
    acknowledgement included, as if the message had succeeded."""
    if db.needs_rollback:
        raise TransactionManagementError(
            "A listener caught a database error inside an atomic block without a savepoint: "
            "its work cannot be committed"
        )


def robust_hooks(db: Any, start: int) -> None:
    """Make the on_commit() functions registered on ``db`` since the ``start``-th robust: one
    that fails is logged, and the others still run."""
    hooks = db.run_on_commit
    for index in range(start, len(hooks)):
        entry = hooks[index]
        if len(entry) == 3:  # (savepoint ids, function, robust) since Django 4.2
            hooks[index] = (entry[0], entry[1], True)
