"""Inside the transaction of one claimed batch: each message in a savepoint, then one statement
that acknowledges (deletes) those that succeeded.

A savepoint is open before each message starts, so that a message that fails, however it used
the database, is rolled back alone: the first opens in the round trip that locks the rows.
After a message that used Django's connection (it made a cursor: a query, ``callproc()``, a
copy, a nested ``atomic()``), the next savepoint opens in the round trip that checks the
deferred constraints that message left (a violation raises there, while its savepoint can still
undo it; the last one's are checked with the acknowledging statement). After a message that did
not, the next one keeps the same savepoint: nothing was written since it was set, so rolling
back to it undoes the failing message only (the earlier messages' ``on_commit()`` functions
stay). A savepoint that succeeded is not released (the commit ends it). So a message whose
listeners do not use the database costs no round trip, and one whose listeners do costs one
more than their own statements.

A message that fails is rolled back to its savepoint and its failed attempt is written in the
same transaction, while the row is still locked; a new savepoint follows (a later rollback must
not erase that record). Statements a listener sends on the driver's connection directly
(``connection.connection``), past Django's cursors, are not seen: should such a message succeed
and a later message of the batch that shares its savepoint fail, its writes are rolled back
with that one. When the processor is asked to stop, the rows not started yet are given back,
uncounted. Each batch's time goes to :func:`pgpubsub.batch_size.measured`.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from django.db import DatabaseError, connections
from django.db.transaction import TransactionManagementError

from pgpubsub import batch_size, connection, current, store
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
        self._savepoint = ""  # the savepoint the running message rolls back to
        self._savepoints = 0  # opened in this batch
        self._used = False  # the running message made a cursor on Django's connection
        self._unchecked: _Ran | None = None  # the last to use the database, not checked yet

    def _stop_wanted(self) -> bool:
        return self.stopping is not None and self.stopping.is_set()

    def run(self, rows: list[store.StoredRow], hold: str | None = None) -> list[Done]:
        """Run each row's callbacks in a savepoint (after locking the rows with the statement
        ``hold``, if given), then delete the rows that succeeded. The failed attempts of the
        others are recorded in the same transaction, and the rows not run because the
        processor stops are given back."""
        db = connections[self.using]
        if not rows or self._stop_wanted():
            if hold is not None:
                execute_holding(db, hold)
            store.give_back([row.pk for row in rows], self.using)
            return []
        self._savepoints = 0
        self._unchecked = None
        opening = self._new_savepoint()
        if hold is not None:
            execute_holding(db, f"{hold}; {opening}")
        else:
            execute(db, opening)
        succeeded: list[Done] = []
        unrun: list[store.StoredRow] = []
        started = time.perf_counter()
        with self._seeing_cursors(db):
            for index, row in enumerate(rows):
                if index and self._stop_wanted():
                    unrun = rows[index:]
                    break
                self._run_one(db, row, succeeded)
        batch_size.measured(self.channel_cls, time.perf_counter() - started, len(rows) - len(unrun))
        unchecked, self._unchecked = self._unchecked, None
        acknowledged = unchecked is not None and self._check_deferred(
            unchecked, succeeded, store.acknowledge_sql([done.row_id for done in succeeded])
        )
        if not acknowledged:
            store.acknowledge([done.row_id for done in succeeded], self.using)
        # After the last check, which may roll back to the last message's savepoint.
        store.give_back([row.pk for row in unrun], self.using)
        batch_done = getattr(self.channel_cls, "batch_done", None)
        if batch_done is not None:  # tasks write their results, in this transaction
            batch_done([done.row_id for done in succeeded], self.using)
        return succeeded

    def _new_savepoint(self) -> str:
        """The statement that opens the batch's next savepoint, now its current one."""
        self._savepoint = f"pgpubsub_{self._savepoints}"
        self._savepoints += 1
        return f'SAVEPOINT "{self._savepoint}"'

    @contextlib.contextmanager
    def _seeing_cursors(self, db: Any) -> Iterator[None]:
        """While the batch runs, every cursor made on Django's connection ``db`` (all of its
        queries, ``callproc()`` and copies go through one) tells that the running message used
        the database. The one place that reaches into the connection for that: Django's
        execute wrappers do not see ``callproc()`` or copies."""
        previous = db.__dict__.get("create_cursor")  # a batch run by a listener of this one
        make = db.create_cursor

        def create_cursor(*args: Any, **kwargs: Any) -> Any:
            self._used = True
            return make(*args, **kwargs)

        db.create_cursor = create_cursor
        try:
            yield
        finally:
            if previous is None:
                db.__dict__.pop("create_cursor", None)
            else:
                db.create_cursor = previous

    def _run_one(self, db: Any, row: store.StoredRow, succeeded: list[Done]) -> None:
        """Run one row in the current savepoint: a new one after a message that used the
        database (with that message's deferred check), else the one the previous had."""
        self.started = True
        if self._unchecked is not None:  # may undo that message, its on_commit() functions too
            ran, self._unchecked = self._unchecked, None
            opening = self._new_savepoint()
            if not self._check_deferred(ran, succeeded, opening):
                execute(db, opening)  # after that message's failure was written
        started = time.perf_counter()
        hooks = len(db.run_on_commit)
        read = False
        self._used = False
        token = current.enter(row.pk, row.attempts + 1)
        try:
            message = self.channel_cls.build_from_payload(row.payload, self.callbacks)
            read = True
            message.execute_callbacks()
            check_not_doomed(db)
        except Exception as error:
            if connection.lost(self.using, self.used):
                raise
            undo(db, self._savepoint, hooks)
            self.failures.attempt_failed(self.channel_cls, row, error, started, read)
            execute(db, self._new_savepoint())  # a later rollback must keep that record
            return
        finally:
            current.leave(token)
        # The message's on_commit() functions run after the commit, where one that fails
        # would skip the others': it is logged instead.
        robust_hooks(db, hooks)
        succeeded.append(Done(row.pk, time.perf_counter() - started, row.attempts + 1))
        if self._used:  # its deferred constraints are checked with the next statement of ours
            self._unchecked = _Ran(row, started, hooks, self._savepoint)

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
