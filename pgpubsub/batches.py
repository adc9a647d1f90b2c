"""Inside the transaction of one claimed batch: each message in a savepoint of its own, then one
statement that acknowledges (deletes) those that succeeded.

The rows are locked first (one round trip). A message's savepoint is opened only when its
listeners touch the database: just before their first statement (seen through Django's
``execute_wrapper``), or, after a message that did, in the round trip that checks that
message's deferred constraints (a violation raises there, while its savepoint can still undo
it; the last one's are checked with the acknowledging statement). A savepoint that succeeded is
not released (the commit ends it). So a message whose listeners do not use the database costs no
round trip, and one whose listeners do costs one more than their own statements.

A message that fails is rolled back to its savepoint, alone (one that never opened a savepoint
wrote nothing: only its ``on_commit()`` functions go), and its failed attempt is written in the
same transaction, while the row is still locked. Statements a listener sends on the driver's
connection directly, past Django's cursors, are not seen: they are undone with the message
only if the listener used a Django cursor first. When the processor is asked to stop, the rows
not started yet are given back, uncounted. Each batch's time goes to
:func:`pgpubsub.batch_size.measured`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from django.db import DatabaseError, connections
from django.db.transaction import TransactionManagementError

from pgpubsub import batch_size, connection, store
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
        self._opening: str | None = None  # the running message's savepoint, not open yet
        self._used = False  # the running message's listeners sent a statement
        self._unchecked: _Ran | None = None  # the last to use the database, not checked yet

    def _stop_wanted(self) -> bool:
        return self.stopping is not None and self.stopping.is_set()

    def run(self, rows: list[store.StoredRow], hold: str | None = None) -> list[Done]:
        """Run each row's callbacks in a savepoint of its own (after locking the rows with the
        statement ``hold``, if given), then delete the rows that succeeded. The failed attempts
        of the others are recorded in the same transaction, and the rows not run because the
        processor stops are given back."""
        db = connections[self.using]
        if hold is not None:
            execute_holding(db, hold)
        if not rows or self._stop_wanted():
            store.give_back([row.pk for row in rows], self.using)
            return []
        succeeded: list[Done] = []
        unrun: list[store.StoredRow] = []
        self._unchecked = None
        started = time.perf_counter()
        with db.execute_wrapper(self._before_statement):
            for index, row in enumerate(rows):
                if index and self._stop_wanted():
                    unrun = rows[index:]
                    break
                self._run_one(db, row, f"pgpubsub_{index}", succeeded)
        batch_size.measured(self.channel_cls, time.perf_counter() - started, len(rows) - len(unrun))
        unchecked, self._unchecked = self._unchecked, None
        acknowledged = unchecked is not None and self._check_deferred(
            unchecked, succeeded, store.acknowledge_sql([done.row_id for done in succeeded])
        )
        if not acknowledged:
            store.acknowledge([done.row_id for done in succeeded], self.using)
        # After the last check, which may roll back to the last message's savepoint.
        store.give_back([row.pk for row in unrun], self.using)
        return succeeded

    def _before_statement(
        self, statement: Callable, sql: Any, params: Any, many: bool, context: Any
    ) -> Any:
        """Django's execute wrapper while the batch runs: the running message uses the
        database, so its savepoint opens first, if it is not open yet."""
        self._used = True
        if self._opening is not None:
            execute(connections[self.using], f'SAVEPOINT "{self._opening}"')
            self._opening = None
        return statement(sql, params, many, context)

    def _run_one(
        self, db: Any, row: store.StoredRow, savepoint: str, succeeded: list[Done]
    ) -> None:
        """Run one row; its savepoint opens with its first statement, or now if the previous
        message's deferred constraints are to be checked anyway."""
        self.started = True
        opened = False
        if self._unchecked is not None:  # may undo that message, its on_commit() functions too
            ran, self._unchecked = self._unchecked, None
            opened = self._check_deferred(ran, succeeded, f'SAVEPOINT "{savepoint}"')
        started = time.perf_counter()
        hooks = len(db.run_on_commit)
        read = False
        self._opening = None if opened else savepoint
        self._used = False
        try:
            message = self.channel_cls.build_from_payload(row.payload, self.callbacks)
            read = True
            message.execute_callbacks()
            check_not_doomed(db)
        except Exception as error:
            opened = self._opening is None
            self._opening = None
            if connection.lost(self.using, self.used):
                raise
            if opened:
                undo(db, savepoint, hooks)
            else:  # it wrote nothing: only its on_commit() functions go
                db.needs_rollback = False
                del db.run_on_commit[hooks:]
            self.failures.attempt_failed(self.channel_cls, row, error, started, read)
            return
        self._opening = None
        # The message's on_commit() functions run after the commit, where one that fails
        # would skip the others': it is logged instead.
        robust_hooks(db, hooks)
        succeeded.append(Done(row.pk, time.perf_counter() - started, row.attempts + 1))
        if self._used:  # its deferred constraints are checked with the next statement of ours
            self._unchecked = _Ran(row, started, hooks, savepoint)

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
