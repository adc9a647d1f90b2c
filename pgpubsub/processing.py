"""From a delivery to its listeners: a plain message runs its callbacks; a batch of lockable
messages is claimed, then run and acknowledged in one transaction, so each runs exactly once.
:meth:`Processor.run` does one delivery and returns its :class:`Outcome`.

A batch (up to :func:`pgpubsub.batch_size.size` rows) costs one statement that claims it
(committed at once: the attempt's durable trace, see :mod:`pgpubsub.store`), the transaction
that locks, runs and acknowledges it (:mod:`pgpubsub.batches`), and its commit. A message's effects commit if
and only if its acknowledgement does:

- a message that fails is rolled back alone, its failed attempt written while its row is still
  locked (:mod:`pgpubsub.failures`);
- should the commit still fail, the batch's attempt failed for each of its messages: each
  counts it, and runs again in a transaction of its own (so that one message cannot fail the
  others again and again);
- when the connection breaks, the rows stay stored, and the outcome says so (``lost``): the
  caller has them swept once the connection is back.

Failures never propagate: one bad message or listener cannot stop the thread that processes
messages. The exception is :class:`pgpubsub.store.SchemaBehind` (the database lacks pgpubsub's
migrations): raised as soon as pgpubsub's own statements meet it, with the rows untouched, for
the caller to wait for ``migrate``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import NamedTuple

from django.db import connections, transaction

from pgpubsub import connection, deliveries, retries, signals, store
from pgpubsub.batches import Batch, Done, NotHeld, check_not_doomed
from pgpubsub.channel import BaseChannel
from pgpubsub.failures import Failures, OnRetry, log_ran
from pgpubsub.losses import Losses
from pgpubsub.models import database_for
from pgpubsub.stats import Stats

logger = logging.getLogger(__name__)


class Outcome(NamedTuple):
    """What became of a delivery."""

    processed: int = 0  # messages whose work committed
    lost: BaseException | None = None  # the connection broke: the rows stay stored

    def __add__(self, other: Outcome) -> Outcome:  # type: ignore[override]
        return Outcome(self.processed + other.processed, self.lost or other.lost)


def callbacks_of(channel_cls: type[BaseChannel]) -> list[Callable]:
    """The listeners registered for ``channel_cls``."""
    found = BaseChannel.get(channel_cls.listen_safe_name())
    return found[1] if found else []


class Processor:
    """Runs deliveries on the calling thread's Django connection to database ``using``.

    Counts go to ``stats``; failed messages are recorded by :class:`Failures`. ``stopping``,
    once set, keeps rows not started from running (they stay due for the next processor)."""

    def __init__(
        self,
        using: str = "default",
        stats: Stats | None = None,
        losses: Losses | None = None,
        stopping: threading.Event | None = None,
        on_retry: OnRetry | None = None,
    ) -> None:
        self.using = using
        self.stats = stats or Stats()
        self.stopping = stopping
        self.failures = Failures(using, self.stats, losses or Losses(), on_retry)

    def _stop_wanted(self) -> bool:
        return self.stopping is not None and self.stopping.is_set()

    def run(self, delivery: deliveries.Delivery) -> Outcome:
        """Run a plain message or a batch of stored rows (``Kind.ROWS``)."""
        if delivery.kind is deliveries.Kind.PLAIN:  # the queue may have joined several
            outcome = Outcome()
            for payload in delivery.payloads:
                outcome += self.run_plain(delivery.channel, delivery.callbacks, payload)
            return outcome
        if delivery.kind is deliveries.Kind.ROWS:
            return self.run_rows(delivery.channel, delivery.row_ids, delivery.callbacks)
        raise ValueError(f"A Processor does not run {delivery.kind} deliveries")

    # -- plain messages --------------------------------------------------------------------

    def run_plain(
        self, channel_cls: type[BaseChannel], callbacks: list[Callable], payload: str
    ) -> Outcome:
        """Run the callbacks of a plain message in a transaction (their writes commit together,
        or not at all)."""
        started = time.perf_counter()
        try:
            message = channel_cls.build_from_payload(payload, callbacks)
        except Exception as error:
            self.failures.plain_failed(channel_cls, payload, error, started, read=False)
            return Outcome()
        try:
            with transaction.atomic(using=self.using):
                message.execute_callbacks()
                check_not_doomed(connections[self.using])
        except Exception as error:
            # A plain message is not kept, so there is nothing to retry: repair and go on.
            connection.lost(self.using, None)
            self.failures.plain_failed(channel_cls, payload, error, started, read=True)
            return Outcome()
        self.stats.count(processed=1)
        duration = time.perf_counter() - started
        if logger.isEnabledFor(logging.DEBUG):
            log_ran(channel_cls, None, 1, duration, "processed")
        signals.send(
            signals.message_processed, channel_cls, duration=duration, row_id=None, attempt=1
        )
        return Outcome(1)

    # -- stored rows -----------------------------------------------------------------------

    def process_stored_rows(
        self,
        channel_cls: type[BaseChannel],
        row_ids: list[int],
        callbacks: list[Callable] | None = None,
    ) -> int:
        """Claim, run and acknowledge the due stored rows ``row_ids`` that no one else holds;
        how many succeeded."""
        return self.run_rows(channel_cls, row_ids, callbacks).processed

    def run_rows(
        self,
        channel_cls: type[BaseChannel],
        row_ids: list[int],
        callbacks: list[Callable] | None = None,
    ) -> Outcome:
        """Claim the due stored rows ``row_ids`` of the channel that no one else holds, then run
        and acknowledge them in one transaction."""
        if self._stop_wanted():
            return Outcome()  # not started: the rows stay due for the next processor
        used = connection.open_raw(self.using)
        self.failures.give_back_unreturned()
        claim = store.new_claim(solo=len(row_ids) == 1)
        try:
            if connections[self.using].in_atomic_block:  # a caller's transaction: keep it usable
                with transaction.atomic(using=self.using):
                    claimed = self._claim(channel_cls, row_ids, claim)
            else:
                claimed = self._claim(channel_cls, row_ids, claim)
        except store.SchemaBehind:
            raise  # nothing claimed: the caller waits for migrate
        except Exception as error:
            if connection.lost(self.using, used):
                self.failures.claim_lost(channel_cls, row_ids, claim, error)
                return Outcome(lost=error)
            logger.error(
                "Claiming stored notifications %s of %s failed; they stay stored",
                row_ids,
                channel_cls.name(),
                exc_info=error,
            )
            self.stats.failure(error)
            return Outcome()
        rows = self.failures.count_died(channel_cls, claimed)
        batch = Batch(
            self.using,
            channel_cls,
            callbacks_of(channel_cls) if callbacks is None else callbacks,
            self.failures,
            self.stopping,
            used,
        )
        # Rows whose last claim died run alone, each under a solo claim of its own: should one
        # end this process too, the next claim knows which and counts its attempt.
        alone = [row for row in rows if row.died is not None] if len(row_ids) > 1 else []
        if not alone:
            return self._run_claimed(batch, rows, claim)
        outcome = self._run_claimed(batch, [row for row in rows if row.died is None], claim)
        return outcome + self._run_alone(batch, alone, claim, outcome)

    def _run_alone(
        self, batch: Batch, suspects: list[store.StoredRow], claim: str, before: Outcome
    ) -> Outcome:
        """Run each of the rows ``suspects`` of ``claim`` under a solo claim of its own."""
        outcome = Outcome()
        for index, row in enumerate(suspects):
            if self._stop_wanted() or (before + outcome).lost is not None:
                self.failures.give_back_quietly([row.pk for row in suspects[index:]], claim)
                break
            solo = store.new_claim(solo=True)
            try:
                if not store.reclaim(row.pk, claim, solo, self.using):
                    continue  # its lease ran out meanwhile: another listener has it
            except store.SchemaBehind:
                raise
            except Exception as error:
                ids = [row.pk for row in suspects[index:]]
                if connection.lost(self.using, batch.used):
                    self.failures.claim_lost(batch.channel_cls, ids, claim, error)
                    return outcome + Outcome(lost=error)
                logger.error("Claiming stored notification %s alone failed", row.pk, exc_info=error)
                self.stats.failure(error)
                self.failures.give_back_quietly([row.pk for row in suspects[index:]], claim)
                break
            outcome += self._run_claimed(batch, [row], solo)
        return outcome

    def _claim(
        self, channel_cls: type[BaseChannel], row_ids: list[int], claim: str
    ) -> list[store.StoredRow]:
        return store.claim_ids(
            channel_cls, row_ids, claim, retries.strategy(channel_cls).max_attempts, self.using
        )

    def _run_claimed(
        self,
        batch: Batch,
        rows: list[store.StoredRow],
        claim: str,
        batch_failed: Exception | None = None,
        exact: bool = False,
    ) -> Outcome:
        """In one transaction: lock the rows of ``claim``, run and acknowledge them.
        ``batch_failed``: the error that failed the commit of the batch this row was part of, a
        failed attempt to count before running the row again, alone.

        The rows are locked in the round trip that opens the first savepoint, on condition
        that they all still carry the claim; only if not (``exact``), in one of its own that
        tells which do."""
        if not rows:
            return Outcome()
        committed: list[bool] = []
        batch.started = False
        try:
            with transaction.atomic(using=self.using):
                # The first commit hook: tells a failed commit from a hook that failed after it.
                transaction.on_commit(lambda: committed.append(True), self.using, robust=True)
                rows, hold = self._hold(rows, claim, exact or batch_failed is not None)
                if batch_failed is not None and rows:
                    (row,) = rows
                    if not self.failures.attempt_failed(
                        batch.channel_cls, row, batch_failed, time.perf_counter(), True, rerun=True
                    ):
                        return Outcome()  # that was its last attempt: marked failed
                    rows = [row._replace(attempts=row.attempts + 1)]
                done = batch.run(rows, hold)
        except NotHeld:  # before any listener ran
            return self._run_claimed(batch, rows, claim, exact=True)
        except store.SchemaBehind:
            self.failures.give_back_quietly([row.pk for row in rows], claim)
            raise
        except Exception as error:
            if committed:
                logger.error(
                    "An on_commit() function failed after stored notifications of %s were "
                    "processed",
                    batch.channel_cls.name(),
                    exc_info=error,
                )
                return Outcome()
            return self._not_committed(batch, rows, claim, error)
        except BaseException:
            # SystemExit, KeyboardInterrupt, CancelledError...: the process is stopping, not
            # the message failing. Its rows go back, uncounted.
            self.failures.give_back_quietly([row.pk for row in rows], claim)
            raise
        self._processed(batch.channel_cls, done)
        return Outcome(len(done))

    def _hold(
        self, rows: list[store.StoredRow], claim: str, exact: bool
    ) -> tuple[list[store.StoredRow], str | None]:
        """The rows to run, and the statement that locks them with the first savepoint (None
        when ``exact``: locked here, one round trip, keeping those that still carry the claim)."""
        if not exact:
            return rows, store.hold_all_sql([row.pk for row in rows], claim)
        held = store.hold([row.pk for row in rows], claim, self.using)
        return [row for row in rows if row.pk in held], None

    def _not_committed(
        self, batch: Batch, rows: list[store.StoredRow], claim: str, error: Exception
    ) -> Outcome:
        """The transaction of claimed ``rows`` failed, or its commit did."""
        channel_cls = batch.channel_cls
        if connection.lost(self.using, batch.used):
            self.failures.connection_lost(channel_cls, [row.pk for row in rows], claim, error)
            return Outcome(lost=error)
        if not batch.started:  # nothing was attempted: the rows go back as they were
            logger.error(
                "Processing stored notifications %s of %s failed; they stay stored",
                [row.pk for row in rows],
                channel_cls.name(),
                exc_info=error,
            )
            self.stats.failure(error)
            self.failures.give_back_quietly([row.pk for row in rows], claim)
            return Outcome()
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
            outcome = Outcome()
            for row in rows:
                outcome += self._run_claimed(batch, [row], claim, error)
            return outcome
        # Its commit failed: the only failure written after its transaction ended, and only
        # while the row still carries this claim (see store.record_failure).
        self.failures.attempt_failed(
            channel_cls, rows[0], error, time.perf_counter(), True, claim=claim
        )
        return Outcome()

    def _processed(self, channel_cls: type[BaseChannel], done: list[Done]) -> None:
        """The batch committed: its messages count as processed now."""
        self.stats.count(processed=len(done))
        self.failures.losses.forget(item.row_id for item in done)
        debug = logger.isEnabledFor(logging.DEBUG)
        for row_id, duration, attempt in done:
            if debug:
                log_ran(channel_cls, row_id, attempt, duration, "processed")
            signals.send(
                signals.message_processed,
                channel_cls,
                duration=duration,
                row_id=row_id,
                attempt=attempt,
            )


class Processors:
    """A Processor per database, made as needed, all sharing one ``stats`` and one ``losses``:
    what one thread processes any channel's deliveries with."""

    def __init__(
        self,
        stats: Stats | None = None,
        losses: Losses | None = None,
        stopping: threading.Event | None = None,
        on_retry: OnRetry | None = None,
        using: str | None = None,
    ) -> None:
        self.using = using  # for channels without a database of their own, if not the default
        self.stats = stats or Stats()
        self.losses = losses or Losses()
        self.stopping = stopping
        self.on_retry = on_retry
        self._by_alias: dict[str, Processor] = {}

    def of(self, channel_cls: type[BaseChannel]) -> Processor:
        """The processor of the database of ``channel_cls``'s messages."""
        alias = database_for(channel_cls) if channel_cls.database or not self.using else self.using
        processor = self._by_alias.get(alias)
        if processor is None:
            processor = Processor(alias, self.stats, self.losses, self.stopping, self.on_retry)
            self._by_alias[alias] = processor
        return processor

    def run(self, delivery: deliveries.Delivery) -> Outcome:
        return self.of(delivery.channel).run(delivery)

    def process_many(
        self, notifications: Iterable[tuple[str, str]], raise_errors: bool = False
    ) -> None:
        """Handle whole notifications ``(channel name, payload)`` in arrival order; consecutive
        lockable ones of a channel are claimed and acknowledged together, a request to process
        a channel's stored rows processes them all.

        With ``raise_errors``, the first failure is raised once all of them were handled."""
        from pgpubsub.sweeps import sweep_all

        self.stats.first_error = None
        for delivery in deliveries.plan(notifications):
            if delivery.kind is deliveries.Kind.SWEEP:
                sweep_all(self.of(delivery.channel), delivery.channel)
            else:
                self.run(delivery)
        if raise_errors and self.stats.first_error is not None:
            raise self.stats.first_error
