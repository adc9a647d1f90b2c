"""From a received notification to its listeners: plain messages run their callbacks; lockable
messages are claimed, then run and acknowledged in one transaction, so each runs exactly once.

Lockable messages that arrive together are handled together, up to ``store.BATCH_SIZE`` at a
time: one statement claims them (committed at once: the attempt's durable trace, see
:mod:`pgpubsub.store`), one locks them in the processing transaction, each runs in a savepoint
of its own, and one statement deletes those that succeeded. A message's effects commit if and
only if its acknowledgement does:

- a message that fails is rolled back to its savepoint, alone, and its failed attempt is
  written in the same transaction, while the row is still locked: no other listener can run it
  before the attempt is counted;
- deferred constraints are checked at the end of each message, so a message that violates one
  fails alone instead of failing the commit of the whole batch;
- should the commit still fail, the batch's attempt failed for each of its messages: each
  counts it, and runs again in a transaction of its own (so that one message cannot fail the
  others again and again);
- when the processor is asked to stop, the messages of the batch not started yet are given
  back, uncounted.

A savepoint that succeeded is not released (the commit ends it), a message's constraint check
goes with the next message's SAVEPOINT (the last one's, with the deletion), and the lock with
the first SAVEPOINT: a message of a batch costs its listeners' queries and one round trip more;
a batch, three (the claim, the last check with the deletion, the commit).

A failed attempt is recorded on the message's row (:mod:`pgpubsub.retries` says when it is
tried again, or that it is marked failed); a message that cannot be read is marked failed at
once; an attempt whose process died is counted by the next claim of its row. Failures never
propagate (unless ``raise_errors``): one bad message or listener cannot stop the thread that
processes messages. The exception is :class:`pgpubsub.store.SchemaBehind` (the database lacks
pgpubsub's migrations): raised as soon as pgpubsub's own statements meet it, with the rows
untouched, for the caller to wait for ``migrate``.

Each message that ran is logged at DEBUG (channel, row id, attempt, duration, outcome), and the
records about one message carry ``channel``, ``row_id`` and ``attempt`` as attributes
(:func:`message_fields`), for formatters that write them out.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import NamedTuple

from django.db import DatabaseError, connections, transaction
from django.db.transaction import TransactionManagementError

from pgpubsub import deliveries, retries, signals, store
from pgpubsub.channel import BaseChannel
from pgpubsub.connection import sqlstate

logger = logging.getLogger(__name__)

# Checks the deferred constraints a message's work left pending (a violation raises here, while
# the message's savepoint can still undo it), then defers them again as Django declares its
# foreign keys.
_CHECK_DEFERRED = "SET CONSTRAINTS ALL IMMEDIATE; SET CONSTRAINTS ALL DEFERRED"

#: Seconds between progress lines while a channel's backlog is processed.
PROGRESS_INTERVAL = 5.0
#: Losses of the connection in a row while a stored message was processed from which on each
#: counts as a failed attempt of the message.
LOSSES_PER_ATTEMPT = 3


def message_fields(channel_cls: type[BaseChannel], row_id: int | None, attempt: int) -> dict:
    """The attributes (``extra=``) of a log record about one message: ``channel`` (its dotted
    name), ``row_id`` (its stored row; None for a plain message), ``attempt`` (1 for the
    first)."""
    return {"channel": channel_cls.name(), "row_id": row_id, "attempt": attempt}


def _log_ran(
    channel_cls: type[BaseChannel],
    row_id: int | None,
    attempt: int,
    duration: float,
    outcome: str,
    detail: str = "",
) -> None:
    """The DEBUG line of a message that ran (callers check that DEBUG is on: once a batch)."""
    milliseconds = duration * 1000
    logger.debug(
        "%s: %s%s (row %s, attempt %s, %.1f ms)",
        channel_cls.name(),
        outcome,
        detail,
        "-" if row_id is None else row_id,
        attempt,
        milliseconds,
        extra={
            **message_fields(channel_cls, row_id, attempt),
            "duration_ms": round(milliseconds, 3),
            "outcome": outcome,
        },
    )


class Losses:
    """How many times in a row the connection broke while each stored row was processed;
    shared by the workers of a Runtime."""

    #: Rows remembered at most (a flood of losses forgets the oldest).
    LIMIT = 10_000

    def __init__(self) -> None:
        self._counts: dict[int, int] = {}
        self._lock = threading.Lock()
        # (database alias, claim) -> ids of rows a lost connection kept from being given back.
        self._unreturned: dict[tuple[str, str], list[int]] = {}

    def lost(self, row_ids: Iterable[int]) -> dict[int, int]:
        """Count one more loss for each row; their counts."""
        with self._lock:
            counts = {pk: self._counts.get(pk, 0) + 1 for pk in row_ids}
            self._counts.update(counts)
            while len(self._counts) > self.LIMIT:
                del self._counts[next(iter(self._counts))]
            return counts

    def forget(self, row_ids: Iterable[int]) -> None:
        """The rows were processed."""
        if self._counts:
            with self._lock:
                for pk in row_ids:
                    self._counts.pop(pk, None)

    def unreturned(self, using: str, claim: str, row_ids: list[int]) -> None:
        """Rows of ``claim`` are still to be given back (or no longer, if empty)."""
        with self._lock:
            if row_ids:
                self._unreturned[using, claim] = list(row_ids)
            else:
                self._unreturned.pop((using, claim), None)

    def to_give_back(self, using: str) -> list[tuple[str, list[int]]]:
        """(claim, row ids) of the rows of database ``using`` still to be given back."""
        if not self._unreturned:
            return []
        with self._lock:
            return [
                (claim, ids) for (alias, claim), ids in self._unreturned.items() if alias == using
            ]


class _Tally:
    """Counts and errors, shared by a Processor and those it made for other databases."""

    def __init__(
        self,
        on_retry: Callable[[type[BaseChannel], float], None] | None,
        losses: Losses | None,
    ) -> None:
        self.on_retry = on_retry
        self.losses = losses or Losses()
        self.processed = 0
        self.failed = 0
        self.invalid = 0  # of the failed: messages that could not be read
        self.catch_up_needed = False
        self.first_error: BaseException | None = None
        self.last_error: BaseException | None = None
        self.lock = threading.Lock()


def _shared(name: str) -> property:
    return property(
        lambda self: getattr(self._tally, name),
        lambda self, value: setattr(self._tally, name, value),
    )


class Processor:
    """Processes notifications on the calling thread's Django connection for ``using`` (or
    for the ``database`` of a channel that names one).

    Failures are logged and counted; they do not propagate (unless ``raise_errors``). A failed
    lockable message stays stored, with its attempt recorded; ``on_retry(channel, seconds)`` is
    told when it is due again. When the connection breaks while a lockable message is
    processed, the message stays stored (no attempt is counted) and ``catch_up_needed`` is set:
    the caller should process the stored messages once the connection is back.
    """

    processed = _shared("processed")
    failed = _shared("failed")
    invalid = _shared("invalid")
    catch_up_needed = _shared("catch_up_needed")
    first_error = _shared("first_error")
    last_error = _shared("last_error")

    def __init__(
        self,
        using: str = "default",
        raise_errors: bool = False,
        stopping: threading.Event | None = None,
        on_retry: Callable[[type[BaseChannel], float], None] | None = None,
        losses: Losses | None = None,
        _tally: _Tally | None = None,
    ) -> None:
        self.using = using
        self.raise_errors = raise_errors
        self.stopping = stopping
        self._tally = _tally or _Tally(on_retry, losses)
        self._others: dict[str, Processor] = {}

    def for_channel(self, channel_cls: type[BaseChannel]) -> Processor:
        """The processor for the database of ``channel_cls``'s messages: this one, or one
        for the channel's ``database`` (sharing this one's counts)."""
        alias = channel_cls.database
        if alias is None or alias == self.using:
            return self
        other = self._others.get(alias)
        if other is None:
            other = Processor(alias, self.raise_errors, self.stopping, _tally=self._tally)
            self._others[alias] = other
        return other

    def _count(self, processed: int = 0, failed: int = 0, invalid: int = 0) -> None:
        with self._tally.lock:
            self._tally.processed += processed
            self._tally.failed += failed
            self._tally.invalid += invalid

    def record_failure(self, error: BaseException, invalid: bool = False) -> None:
        """Count a failed message (already logged) and keep its error."""
        self._count(failed=1, invalid=int(invalid))
        self.last_error = error
        if self.first_error is None:
            self.first_error = error

    def _open_connection(self) -> object:
        """The driver connection stored-row work is about to run on (opened if need be)."""
        db = connections[self.using]
        db.ensure_connection()
        return db.connection

    def _connection_lost(self, used: object | None) -> bool:
        """After a failure: True when the connection the work ran on (``used``; None if the
        work did not need one) broke. A broken connection is closed; Django may already have
        replaced it (``atomic()`` does when its rollback fails).

        The driver tells, without a query: in a transaction that a listener's database error
        aborted, a query would fail too, and that is no lost connection."""
        db = connections[self.using]
        if used is not None and db.connection is not used:
            return True
        if db.connection is None or not _broken(db.connection):
            return False
        db.close()
        return True

    def process(self, channel_name: str, payload: str) -> None:
        """Handle one whole (re-assembled) notification received on ``channel_name``."""
        self.process_many([(channel_name, payload)])

    def process_many(self, notifications: Iterable[tuple[str, str]]) -> None:
        """Handle whole notifications ``(channel name, payload)`` in arrival order; consecutive
        lockable ones of a channel are claimed and acknowledged together.

        With ``raise_errors``, the first failure is raised once all of them were handled."""
        self.first_error = None
        for delivery in deliveries.plan(notifications):
            self.run(delivery)
        if self.raise_errors and self.first_error is not None:
            raise self.first_error

    def run(self, delivery: deliveries.Delivery) -> int:
        """Run one delivery; returns how many messages succeeded. A sweep raises the error
        when the connection breaks (its rows stay stored); the others set ``catch_up_needed``."""
        kind = delivery.kind
        if delivery.channel.database not in (None, self.using):
            return self.for_channel(delivery.channel).run(delivery)
        if kind is deliveries.Kind.PLAIN:
            return self._run_plain(delivery.channel, delivery.callbacks, delivery.payload)
        if kind is deliveries.Kind.ROWS:
            return self.process_stored_rows(delivery.channel, delivery.row_ids, delivery.callbacks)
        return self.process_stored_channel(delivery.channel)

    def _run_plain(
        self, channel_cls: type[BaseChannel], callbacks: list[Callable], payload: str
    ) -> int:
        """Run the callbacks of a plain message in a transaction (their writes commit together,
        or not at all)."""
        started = time.perf_counter()
        debug = logger.isEnabledFor(logging.DEBUG)
        try:
            message = channel_cls.build_from_payload(payload, callbacks)
        except Exception as error:
            logger.error(
                "Dropping a message of %s that cannot be read: %s",
                channel_cls.name(),
                retries.describe(error),
                extra={"pgpubsub_error": error, **message_fields(channel_cls, None, 1)},
            )
            if debug:
                _log_ran(
                    channel_cls, None, 1, time.perf_counter() - started, "failed", ", unreadable"
                )
            self._signal_failure(channel_cls, None, error, started, 1, True)
            self.record_failure(error, invalid=True)
            return 0
        try:
            with transaction.atomic(using=self.using):
                message.execute_callbacks()
                _check_not_doomed(connections[self.using])
        except Exception as error:
            # A plain message is not kept, so there is nothing to retry: repair and go on.
            self._connection_lost(None)
            logger.error(
                "Listener of %s failed on message %.200r",
                channel_cls.name(),
                payload,
                exc_info=error,
                extra=message_fields(channel_cls, None, 1),
            )
            if debug:
                _log_ran(channel_cls, None, 1, time.perf_counter() - started, "failed")
            self._signal_failure(channel_cls, None, error, started, 1, True)
            self.record_failure(error)
            return 0
        self._count(processed=1)
        duration = time.perf_counter() - started
        if debug:
            _log_ran(channel_cls, None, 1, duration, "processed")
        signals.send(
            signals.message_processed,
            channel_cls,
            duration=duration,
            row_id=None,
            attempt=1,
        )
        return 1

    def process_stored_row(
        self, channel_cls: type[BaseChannel], callbacks: list[Callable], row_id: int
    ) -> bool:
        """Claim, run and acknowledge stored row ``row_id``. False if it was not processed
        (someone else has it, it is gone or not due, or a listener failed)."""
        return self.process_stored_rows(channel_cls, [row_id], callbacks) == 1

    def process_stored_rows(
        self,
        channel_cls: type[BaseChannel],
        row_ids: list[int],
        callbacks: list[Callable] | None = None,
        raise_on_disconnect: bool = False,
    ) -> int:
        """Claim the due stored rows ``row_ids`` of the channel that no one else holds, then run
        and acknowledge them in one transaction. Returns how many succeeded.

        When the connection breaks, the rows stay stored: the error is raised with
        ``raise_on_disconnect``, else ``catch_up_needed`` is set."""
        if channel_cls.database not in (None, self.using):
            return self.for_channel(channel_cls).process_stored_rows(
                channel_cls, row_ids, callbacks, raise_on_disconnect
            )
        if self.stopping is not None and self.stopping.is_set():
            return 0  # not started: the rows stay due for the next processor
        used = self._open_connection()
        self.give_back_unreturned()
        claim = store.new_claim()
        db = connections[self.using]
        try:
            if db.in_atomic_block:  # a caller's transaction: an error must not doom it
                with transaction.atomic(using=self.using):
                    claimed = self._claim(channel_cls, row_ids, claim)
            else:
                claimed = self._claim(channel_cls, row_ids, claim)
        except store.SchemaBehind:
            raise  # nothing claimed: the caller waits for migrate
        except Exception as error:
            if not self._connection_lost(used):
                logger.error(
                    "Claiming stored notifications %s of %s failed; they stay stored",
                    row_ids,
                    channel_cls.name(),
                    exc_info=error,
                )
                self.record_failure(error)
                return 0
            self._lost(channel_cls, row_ids, claim, error)
            if raise_on_disconnect:
                raise
            return 0
        rows = self._count_died(channel_cls, claimed)
        return self._process_claimed(channel_cls, callbacks, rows, claim, used, raise_on_disconnect)

    def _claim(
        self, channel_cls: type[BaseChannel], row_ids: list[int], claim: str
    ) -> list[store.StoredRow]:
        return store.claim_ids(
            channel_cls, row_ids, claim, retries.max_attempts(channel_cls), self.using
        )

    def _process_claimed(
        self,
        channel_cls: type[BaseChannel],
        callbacks: list[Callable] | None,
        rows: list[store.StoredRow],
        claim: str,
        used: object,
        raise_on_disconnect: bool,
        batch_failed: Exception | None = None,
        exact: bool = False,
    ) -> int:
        """In one transaction: lock the rows of ``claim``, run and acknowledge them. Returns how
        many succeeded. ``batch_failed``: the error that failed the commit of the batch this
        row was part of, a failed attempt to count before running the row again, alone.

        The rows are locked in the round trip that opens the first savepoint, on condition
        that they all still carry the claim; only if not (``exact``), in one of its own that
        tells which do."""
        if not rows:
            return 0
        committed: list[bool] = []
        ran: list[bool] = []  # whether a listener started: then the attempt happened
        exact = exact or batch_failed is not None
        try:
            with transaction.atomic(using=self.using):
                # The first commit hook: tells a failed commit from a hook that failed after it.
                transaction.on_commit(lambda: committed.append(True), self.using, robust=True)
                hold = None
                if exact:
                    held = store.hold([row.pk for row in rows], claim, self.using)
                    rows = [row for row in rows if row.pk in held]
                else:
                    hold = store.hold_all_sql([row.pk for row in rows], claim)
                if batch_failed is not None and rows:
                    (row,) = rows
                    if not self._failed_attempt(
                        channel_cls, row, batch_failed, time.perf_counter(), True, rerun=True
                    ):
                        return 0  # that was its last attempt: marked failed
                    rows = [row._replace(attempts=row.attempts + 1)]
                done = self._run_claimed(channel_cls, callbacks, rows, used, ran, hold)
        except _NotHeld:  # before any listener ran
            return self._process_claimed(
                channel_cls, callbacks, rows, claim, used, raise_on_disconnect, exact=True
            )
        except store.SchemaBehind:
            self._give_back_quietly(rows, claim)
            raise
        except Exception as error:
            if committed:
                logger.error(
                    "An on_commit() function failed after stored notifications of %s were "
                    "processed",
                    channel_cls.name(),
                    exc_info=error,
                )
                return 0
            if self._connection_lost(used):
                self._lost(channel_cls, [row.pk for row in rows], claim, error)
                if raise_on_disconnect:
                    raise
                return 0
            if not ran:  # nothing was attempted: the rows go back as they were
                logger.error(
                    "Processing stored notifications %s of %s failed; they stay stored",
                    [row.pk for row in rows],
                    channel_cls.name(),
                    exc_info=error,
                )
                self.record_failure(error)
                self._give_back_quietly(rows, claim)
                return 0
            if len(rows) > 1:
                # The batch's commit failed: each message counts the failed attempt and runs
                # again in a transaction of its own (the claim still holds the rows).
                logger.error(
                    "Committing %s stored notifications of %s failed; each counts a failed "
                    "attempt and runs again alone",
                    len(rows),
                    channel_cls.name(),
                    exc_info=error,
                )
                return sum(
                    self._process_claimed(
                        channel_cls, callbacks, [row], claim, used, raise_on_disconnect, error
                    )
                    for row in rows
                )
            # Its commit failed: the only failure written after its transaction ended, and
            # only while the row still carries this claim (see store.record_failure).
            self._failed_attempt(
                channel_cls, rows[0], error, time.perf_counter(), True, claim=claim
            )
            return 0
        except BaseException:
            # SystemExit, KeyboardInterrupt, CancelledError...: the process is stopping, not
            # the message failing. Its rows go back, uncounted.
            self._give_back_quietly(rows, claim)
            raise
        self._count(processed=len(done))
        self._tally.losses.forget(row_id for row_id, _, _ in done)
        debug = logger.isEnabledFor(logging.DEBUG)
        for row_id, duration, attempt in done:  # committed: now they count as processed
            if debug:
                _log_ran(channel_cls, row_id, attempt, duration, "processed")
            signals.send(
                signals.message_processed,
                channel_cls,
                duration=duration,
                row_id=row_id,
                attempt=attempt,
            )
        return len(done)

    def _count_died(
        self, channel_cls: type[BaseChannel], claimed: list[store.StoredRow]
    ) -> list[store.StoredRow]:
        """Log, count and signal the attempts of the claimed rows whose process died (the
        claim counted them); returns the rows to run (not those now marked failed)."""
        died = [row for row in claimed if row.died is not None]
        if not died:
            return claimed
        limit = retries.max_attempts(channel_cls)
        for row in died:
            error = ListenerProcessDied(
                f"the process that claimed it ({row.died}) ended while its listeners ran"
            )
            fields = message_fields(channel_cls, row.pk, row.attempts)
            if row.failed:
                logger.error(
                    "Stored notification %s of %s: %s (attempt %s of %s): marked failed, it "
                    "stays stored until retried",
                    row.pk,
                    channel_cls.name(),
                    error,
                    row.attempts,
                    limit,
                    extra=fields,
                )
            else:
                logger.warning(
                    "Stored notification %s of %s: %s (attempt %s of %s); running it again",
                    row.pk,
                    channel_cls.name(),
                    error,
                    row.attempts,
                    limit,
                    extra=fields,
                )
            self._signal_failure(
                channel_cls, row.pk, error, time.perf_counter(), row.attempts, row.failed
            )
            self.record_failure(error)
        return [row for row in claimed if not row.failed]

    def _lost(
        self,
        channel_cls: type[BaseChannel],
        row_ids: list[int],
        claim: str,
        error: BaseException,
    ) -> None:
        """The connection broke while rows of ``claim`` were claimed or processed."""
        self._lost_while_running(channel_cls, row_ids, claim)
        logger.warning(
            "The database connection broke while processing %s; its stored notifications "
            "stay stored for the catch-up",
            channel_cls.name(),
        )
        self.catch_up_needed = True
        if self.first_error is None:
            self.first_error = error

    def _give_back_quietly(self, rows: list[store.StoredRow], claim: str) -> None:
        """Give back rows of ``claim`` after their transaction ended without an outcome."""
        ids = [row.pk for row in rows]
        try:
            held = store.record_lost(ids, claim, self.using)
        except Exception as exc:
            self._connection_lost(None)
            held = ids
            logger.warning("Could not give back stored notifications %s yet: %s", ids, exc)
        self._tally.losses.unreturned(self.using, claim, held)

    def give_back_unreturned(self) -> None:
        """Give back the rows of earlier claims that a lost connection kept from it: the
        server was away, or the broken session still held them. Best before their lease runs
        out, when another claim would count an attempt of each; a sweep after a reconnection
        should call it first."""
        for claim, ids in self._tally.losses.to_give_back(self.using):
            try:
                held = store.record_lost(ids, claim, self.using)
            except store.SchemaBehind:
                raise
            except Exception as exc:
                self._connection_lost(None)
                logger.warning("Could not give back stored notifications %s yet: %s", ids, exc)
                return
            self._tally.losses.unreturned(self.using, claim, held)

    def process_stored_channel(self, channel_cls: type[BaseChannel]) -> int:
        """Process every due stored row of the channel that no one else holds, in batches of
        ``store.BATCH_SIZE`` per transaction, until none is left or ``stopping`` is set.
        Returns how many succeeded. Raises the error when the connection breaks."""
        if channel_cls.database not in (None, self.using):
            return self.for_channel(channel_cls).process_stored_channel(channel_cls)
        total = 0
        last_id = 0
        next_report = time.monotonic() + PROGRESS_INTERVAL
        while not (self.stopping is not None and self.stopping.is_set()):
            ids = store.pending_ids(channel_cls, last_id, self.using)
            if not ids:
                break
            last_id = ids[-1]
            total += self.process_stored_rows(channel_cls, ids, raise_on_disconnect=True)
            if time.monotonic() >= next_report:  # a long recovery says how far it got
                logger.info(
                    "Processed %s stored notifications of %s so far (up to id %s)",
                    total,
                    channel_cls.name(),
                    last_id,
                )
                next_report = time.monotonic() + PROGRESS_INTERVAL
        if total:
            logger.info("Processed %s stored notifications of %s", total, channel_cls.name())
        return total

    def _lost_while_running(
        self, channel_cls: type[BaseChannel], row_ids: list[int], claim: str
    ) -> None:
        """The connection broke while rows ``row_ids`` of ``claim`` were processed. That is no
        failed attempt (the server may have restarted): the process is alive and gives the rows
        back. But a listener may break its own connection (say, by outlasting
        ``idle_in_transaction_session_timeout``): the rows that lost it again and again wait
        longer each time, and from ``LOSSES_PER_ATTEMPT`` in a row on, each loss counts as a
        failed attempt."""
        counts = self._tally.losses.lost(row_ids)
        again = {pk: n for pk, n in counts.items() if n > 1}
        delay = retries.backoff(channel_cls, max(again.values()) - 1) if again else 0.0
        charged = [pk for pk, n in again.items() if n >= LOSSES_PER_ATTEMPT]
        error = (
            "ConnectionLost: the database connection was lost while its listeners ran, "
            f"{max(again.values(), default=1)} times in a row"
        )
        try:
            self._open_connection()  # a new one: the broken one is closed
            held = store.record_lost(
                list(row_ids),
                claim,
                self.using,
                delay,
                list(again),
                charged,
                retries.max_attempts(channel_cls),
                error,
            )
        except Exception as exc:  # the server may be away: given back once it is there
            self._connection_lost(None)
            self._tally.losses.unreturned(self.using, claim, list(row_ids))
            logger.warning("Could not give back stored notifications %s yet: %s", row_ids, exc)
            return
        # Rows the broken session still locks (it may outlive the client for a while).
        self._tally.losses.unreturned(self.using, claim, held)
        if not again:
            return  # the first time: the caller tries once more, or a sweep does
        logger.warning(
            "The database connection was lost while the listeners of %s ran on stored "
            "notification(s) %s, %s times in a row: next attempt in %.1fs%s",
            channel_cls.name(),
            ", ".join(map(str, sorted(again))),
            max(again.values()),
            delay,
            " (counted as a failed attempt)" if charged else "",
        )
        if self._tally.on_retry is not None:
            self._tally.on_retry(channel_cls, delay)

    def _failed_attempt(
        self,
        channel_cls: type[BaseChannel],
        row: store.StoredRow,
        error: Exception,
        started: float,
        read: bool,
        claim: str | None = None,
        rerun: bool = False,
    ) -> bool:
        """Log, count, signal and record a failed attempt of ``row`` (``read``: its message
        could be read, so a listener failed), in the transaction that holds the row, or, given
        its ``claim``, after that transaction failed to commit. ``rerun``: the row runs again
        at once. False when the row was marked failed (or not updated)."""
        locked = claim is None
        attempt = row.attempts + 1
        limit = retries.max_attempts(channel_cls)
        retry_in = retries.backoff(channel_cls, attempt) if read and attempt < limit else None
        name = channel_cls.name()
        fields = message_fields(channel_cls, row.pk, attempt)
        if not read:
            logger.error(
                "Stored notification %s of %s cannot be read, marked failed: %s",
                row.pk,
                name,
                retries.describe(error),
                extra={"pgpubsub_error": error, **fields},
            )
        elif retry_in is None:
            logger.error(
                "Listener of %s failed on stored notification %s (attempt %s of %s): marked "
                "failed, it stays stored until retried",
                name,
                row.pk,
                attempt,
                limit,
                exc_info=error,
                extra=fields,
            )
        else:
            logger.error(
                "Listener of %s failed on stored notification %s (attempt %s of %s); %s",
                name,
                row.pk,
                attempt,
                limit,
                "running it again alone" if rerun else f"next attempt in {retry_in:.1f}s",
                exc_info=error,
                extra=fields,
            )
        if logger.isEnabledFor(logging.DEBUG):
            if retry_in is None:
                detail = ", marked failed" if read else ", unreadable, marked failed"
            else:
                detail = ", running again alone" if rerun else f", next attempt in {retry_in:.1f}s"
            outcome = "failed" if retry_in is None else "retrying"
            _log_ran(channel_cls, row.pk, attempt, time.perf_counter() - started, outcome, detail)
        self._signal_failure(channel_cls, row.pk, error, started, attempt, retry_in is None)
        self.record_failure(error, invalid=not read)
        try:
            recorded = store.record_failure(
                row.pk,
                claim or "",
                retries.describe(error),
                retries.format_traceback(error),
                retry_in,
                self.using,
                locked=locked,
            )
        except Exception as exc:
            if locked:
                raise  # the batch's transaction is broken: its handler decides
            # The row keeps its claim: once its lease runs out, the next claim counts it.
            self._connection_lost(None)
            logger.warning("Could not record the failed attempt of %s: %s", row.pk, exc)
            return False
        if not recorded:
            return False  # claimed again after this claim ran out: that claim counted it
        on_retry = self._tally.on_retry
        if retry_in is not None and on_retry is not None and not rerun:
            if locked:  # due once the batch commits (before, it still holds the row)
                transaction.on_commit(
                    lambda: on_retry(channel_cls, retry_in), self.using, robust=True
                )
            else:
                on_retry(channel_cls, retry_in)
        return retry_in is not None

    def _signal_failure(
        self,
        channel_cls: type[BaseChannel],
        row_id: int | None,
        error: Exception,
        started: float,
        attempt: int,
        final: bool,
    ) -> None:
        if not signals.message_failed.has_listeners(channel_cls):
            return
        kwargs = {
            "duration": time.perf_counter() - started,
            "row_id": row_id,
            "error": error,
            "attempt": attempt,
            "final": final,
        }
        if not connections[self.using].in_atomic_block:
            signals.send(signals.message_failed, channel_cls, **kwargs)
            return
        # Inside a batch's transaction: a receiver's database error must undo only its own work.
        try:
            with transaction.atomic(using=self.using):
                signals.send(signals.message_failed, channel_cls, **kwargs)
        except DatabaseError:
            logger.error("A receiver of message_failed broke the transaction", exc_info=True)

    @staticmethod
    def _callbacks(channel_cls: type[BaseChannel], callbacks: list[Callable] | None) -> list:
        if callbacks is not None:
            return callbacks
        found = BaseChannel.get(channel_cls.listen_safe_name())
        return found[1] if found else []

    def _run_claimed(
        self,
        channel_cls: type[BaseChannel],
        callbacks: list[Callable] | None,
        rows: list[store.StoredRow],
        used: object,
        ran: list[bool],
        hold: str | None = None,
    ) -> list[tuple[int, float, int]]:
        """Inside the transaction that holds ``rows`` (or locks them first with the statement
        ``hold``): run each row's callbacks in a savepoint of its own, then delete the rows
        that succeeded. Returns (id, duration, attempt) of each that did; the failed attempts
        of the others are recorded in the same transaction, and the rows not run because the
        processor stops are given back. ``ran`` gets an item once a listener starts.

        The deferred constraints a message left pending are checked in the statement that
        opens the next message's savepoint (the last message's, in the deleting one): one
        round trip per message for both."""
        db = connections[self.using]
        if not rows or (self.stopping is not None and self.stopping.is_set()):
            if hold is not None:
                _execute_holding(db, hold)
            store.give_back([row.pk for row in rows], self.using)
            return []
        callbacks = self._callbacks(channel_cls, callbacks)
        succeeded: list[tuple[int, float, int]] = []
        unchecked: _Ran | None = None  # the last message that succeeded, not checked yet
        unrun: list[store.StoredRow] = []
        for index, row in enumerate(rows):
            if index and self.stopping is not None and self.stopping.is_set():
                unrun = rows[index:]
                break
            savepoint = f"pgpubsub_{index}"
            opening = f'SAVEPOINT "{savepoint}"'
            if unchecked is not None:
                if not self._check_deferred(channel_cls, unchecked, succeeded, used, opening):
                    _execute(db, opening)
            elif hold is not None:
                _execute_holding(db, f"{hold}; {opening}")
                hold = None
            else:
                _execute(db, opening)
            started = time.perf_counter()
            hooks = len(db.run_on_commit)
            read = False
            if not ran:
                ran.append(True)
            try:
                message = channel_cls.build_from_payload(row.payload, callbacks)
                read = True
                message.execute_callbacks()
                _check_not_doomed(db)
            except Exception as error:
                if self._connection_lost(used):
                    raise
                self._undo(db, savepoint, hooks)
                self._failed_attempt(channel_cls, row, error, started, read)
                unchecked = None
                continue
            # The message's on_commit() functions run after the commit, where one that
            # fails would skip the others': it is logged instead.
            _robust_hooks(db, hooks)
            succeeded.append((row.pk, time.perf_counter() - started, row.attempts + 1))
            unchecked = _Ran(row, started, hooks, savepoint)
        acknowledged = unchecked is not None and self._check_deferred(
            channel_cls,
            unchecked,
            succeeded,
            used,
            store.acknowledge_sql([pk for pk, _, _ in succeeded]),
        )
        if not acknowledged:
            store.acknowledge([pk for pk, _, _ in succeeded], self.using)
        # After the last check, which may roll back to the last message's savepoint.
        store.give_back([row.pk for row in unrun], self.using)
        return succeeded

    def _check_deferred(
        self,
        channel_cls: type[BaseChannel],
        ran: _Ran,
        succeeded: list[tuple[int, float, int]],
        used: object,
        then: str | None = None,
    ) -> bool:
        """Check the deferred constraints the message ``ran`` (the last of ``succeeded``) left
        pending, then run the statement ``then`` in the same round trip. A violation undoes
        that message and records its failed attempt; returns False then (``then`` did not
        run)."""
        db = connections[self.using]
        try:
            _execute(db, _CHECK_DEFERRED if then is None else f"{_CHECK_DEFERRED}; {then}")
        except Exception as error:
            if self._connection_lost(used):
                raise
            self._undo(db, ran.savepoint, ran.hooks)
            succeeded.pop()
            self._failed_attempt(channel_cls, ran.row, error, ran.started, True)
            return False
        return True

    @staticmethod
    def _undo(db: object, savepoint: str, hooks: int) -> None:
        """Roll a message's work back to its savepoint, its on_commit() functions with it."""
        # A listener's database error marked the transaction for rollback, which refuses every
        # query, the rollback to the savepoint included: that rollback is what repairs it.
        db.needs_rollback = False
        db.savepoint_rollback(savepoint)
        del db.run_on_commit[hooks:]


class _Ran(NamedTuple):
    """A message of a batch that succeeded: what undoing it needs."""

    row: store.StoredRow
    started: float
    hooks: int  # its on_commit() functions come after this many
    savepoint: str


def _execute(db: object, sql: str) -> None:
    """Run pgpubsub's own statement ``sql`` (no parameters) on the driver's cursor: no query
    logging or execute wrappers for what users did not write; errors as Django's."""
    with db.wrap_database_errors, db.connection.cursor() as cursor:
        cursor.execute(sql)


def _execute_holding(db: object, sql: str) -> None:
    """:func:`_execute` a statement that starts with ``store.hold_all_sql()``: its division by
    zero (some row no longer carries the claim) is raised as :class:`_NotHeld`."""
    try:
        _execute(db, sql)
    except DatabaseError as error:
        if sqlstate(error) == "22012":
            raise _NotHeld from error
        behind = store.schema_error(error, db.alias)
        if behind is not None:
            raise behind from error
        raise


class _NotHeld(Exception):
    """Some of the claimed rows no longer carry the claim: lock them one by one."""


def _check_not_doomed(db: object) -> None:
    """Raise when the listeners left the transaction marked for rollback (one caught a database
    error inside an ``atomic()`` block without a savepoint): Django would roll it back quietly,
    acknowledgement included, as if the message had succeeded."""
    if db.needs_rollback:
        raise TransactionManagementError(
            "A listener caught a database error inside an atomic block without a savepoint: "
            "its work cannot be committed"
        )


def _broken(raw: object) -> bool:
    """True when the driver connection ``raw`` (psycopg2 or psycopg 3) was closed or found
    broken: both drivers mark it so when an operation on it failed for that reason."""
    return bool(getattr(raw, "closed", False)) or bool(getattr(raw, "broken", False))


def _robust_hooks(db: object, start: int) -> None:
    """Make the on_commit() functions registered on ``db`` since the ``start``-th robust: one
    that fails is logged, and the others still run."""
    hooks = db.run_on_commit
    for index in range(start, len(hooks)):
        entry = hooks[index]
        if len(entry) == 3:  # (savepoint ids, function, robust) since Django 4.2
            hooks[index] = (entry[0], entry[1], True)


class ListenerProcessDied(Exception):
    """The attempt of a stored message whose process ended while its listeners ran (found by
    the next claim of its row)."""
