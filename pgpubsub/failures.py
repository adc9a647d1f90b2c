"""What happens when a message fails: its log lines, its ``message_failed`` signal, its count,
and the failed attempt written on its stored row (:mod:`pgpubsub.retries` decides when it runs
again, or that it is marked failed). (About 400 lines: the failure paths of one message are
read together; lost connections' own state is :mod:`pgpubsub.losses`.)

Also the attempts no listener finished: those of a process that died (counted by the next claim
of their rows) and those that lost their connection (:class:`Losses`).

Each message that ran is logged at DEBUG (channel, row id, attempt, duration, outcome), and the
records about one message carry ``channel``, ``row_id`` and ``attempt`` as attributes
(:func:`message_fields`), for formatters that write them out.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from django.db import DatabaseError, connections, transaction

from pgpubsub import connection, retries, signals, store
from pgpubsub.channel import BaseChannel
from pgpubsub.losses import Losses
from pgpubsub.stats import Stats

logger = logging.getLogger("pgpubsub.processing")

#: Losses of the connection in a row while a stored message was processed from which on each
#: counts as a failed attempt of the message.
LOSSES_PER_ATTEMPT = 3

#: Told when a failed message of a channel is due again, in seconds.
OnRetry = Callable[[type[BaseChannel], float], None]


def message_fields(channel_cls: type[BaseChannel], row_id: int | None, attempt: int) -> dict:
    """The attributes (``extra=``) of a log record about one message: ``channel`` (its dotted
    name), ``row_id`` (its stored row; None for a plain message), ``attempt`` (1 for the
    first)."""
    return {"channel": channel_cls.name(), "row_id": row_id, "attempt": attempt}


def log_ran(
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


class ListenerProcessDied(Exception):
    """The attempt of a stored message whose process ended while its listeners ran (found by
    the next claim of its row)."""


class Failures:
    """Records the failures of the messages processed on database ``using``: logs them, sends
    ``message_failed``, counts them in ``stats`` and writes failed attempts on their rows;
    ``on_retry(channel, seconds)`` is told when a failed message is due again."""

    def __init__(
        self, using: str, stats: Stats, losses: Losses, on_retry: OnRetry | None = None
    ) -> None:
        self.using = using
        self.stats = stats
        self.losses = losses
        self.on_retry = on_retry

    # -- plain messages, and failures with no row to write on ------------------------------

    def plain_failed(
        self,
        channel_cls: type[BaseChannel],
        payload: str,
        error: Exception,
        started: float,
        read: bool,
    ) -> None:
        """A plain message could not be read (``read`` False) or its listener failed: it is not
        kept, so there is nothing to retry."""
        fields = message_fields(channel_cls, None, 1)
        if read:
            logger.error(
                "Listener of %s failed on message %.200r",
                channel_cls.name(),
                payload,
                exc_info=error,
                extra=fields,
            )
        else:
            logger.error(
                "Dropping a message of %s that cannot be read: %s",
                channel_cls.name(),
                retries.describe(error),
                extra={"pgpubsub_error": error, **fields},
            )
        if logger.isEnabledFor(logging.DEBUG):
            detail = "" if read else ", unreadable"
            log_ran(channel_cls, None, 1, time.perf_counter() - started, "failed", detail)
        self.signal(channel_cls, None, error, started, 1, True)
        self.stats.failure(error, invalid=not read)

    def signal(
        self,
        channel_cls: type[BaseChannel],
        row_id: int | None,
        error: Exception,
        started: float,
        attempt: int,
        final: bool,
    ) -> None:
        """Send ``message_failed``; inside a batch's transaction, a receiver's database error
        undoes only its own work."""
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
        try:
            with transaction.atomic(using=self.using):
                signals.send(signals.message_failed, channel_cls, **kwargs)
        except DatabaseError:
            logger.error("A receiver of message_failed broke the transaction", exc_info=True)

    # -- failed attempts of stored messages ------------------------------------------------

    def attempt_failed(
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
        policy = retries.strategy(channel_cls)
        limit = policy.max_attempts
        # An unreadable message fails for good: another attempt would read the same bytes.
        retry_in = policy.next_delay(attempt, error) if read and attempt < limit else None
        self._log_attempt(channel_cls, row, error, started, read, attempt, limit, retry_in, rerun)
        self.signal(channel_cls, row.pk, error, started, attempt, retry_in is None)
        self.stats.failure(error, invalid=not read)
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
            connection.lost(self.using, None)
            logger.warning("Could not record the failed attempt of %s: %s", row.pk, exc)
            return False
        if not recorded:
            return False  # claimed again after this claim ran out: that claim counted it
        on_retry = self.on_retry
        if retry_in is not None and on_retry is not None and not rerun:
            if locked:  # due once the batch commits (before, it still holds the row)
                transaction.on_commit(
                    lambda: on_retry(channel_cls, retry_in), self.using, robust=True
                )
            else:
                on_retry(channel_cls, retry_in)
        return retry_in is not None

    def _log_attempt(
        self,
        channel_cls: type[BaseChannel],
        row: store.StoredRow,
        error: Exception,
        started: float,
        read: bool,
        attempt: int,
        limit: int,
        retry_in: float | None,
        rerun: bool,
    ) -> None:
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
            log_ran(channel_cls, row.pk, attempt, time.perf_counter() - started, outcome, detail)

    def count_died(
        self, channel_cls: type[BaseChannel], claimed: list[store.StoredRow]
    ) -> list[store.StoredRow]:
        """Log, count and signal the attempts of the claimed rows whose process died (the
        claim counted them); returns the rows to run (not those now marked failed)."""
        died = [row for row in claimed if row.died is not None]
        if not died:
            return claimed
        for row in died:
            if row.suspect:
                logger.warning(
                    "Stored notification %s of %s: the process that claimed it with others (%s) "
                    "ended while its listeners ran; running it alone, no attempt counted (which "
                    "message ended the process is not known)",
                    row.pk,
                    channel_cls.name(),
                    row.died,
                    extra=message_fields(channel_cls, row.pk, row.attempts + 1),
                )
        died = [row for row in died if not row.suspect]
        limit = retries.strategy(channel_cls).max_attempts
        for row in died:
            error = ListenerProcessDied(
                f"the process that claimed it ({row.died}) ended while its listeners ran"
            )
            error.claim = row.died  # host:pid:random of the process that died
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
            self.signal(channel_cls, row.pk, error, time.perf_counter(), row.attempts, row.failed)
            self.stats.failure(error)
        return [row for row in claimed if not row.failed]

    # -- lost connections ------------------------------------------------------------------

    def connection_lost(
        self, channel_cls: type[BaseChannel], row_ids: list[int], claim: str, error: BaseException
    ) -> None:
        """The connection broke while rows ``row_ids`` of ``claim`` were claimed or processed.
        That is no failed attempt (the server may have restarted): the process is alive and
        gives the rows back. But a listener may break its own connection (say, by outlasting
        ``idle_in_transaction_session_timeout``): the rows that lost it again and again wait
        longer each time, and from ``LOSSES_PER_ATTEMPT`` in a row on, each loss counts as a
        failed attempt."""
        self._charge_losses(channel_cls, row_ids, claim)
        self._broke(channel_cls, error)

    def _broke(self, channel_cls: type[BaseChannel], error: BaseException) -> None:
        logger.warning(
            "The database connection broke while processing %s; its stored notifications "
            "stay stored for the catch-up",
            channel_cls.name(),
        )
        self.stats.note_error(error)

    def _charge_losses(
        self, channel_cls: type[BaseChannel], row_ids: list[int], claim: str
    ) -> None:
        counts = self.losses.lost(row_ids)
        again = {pk: n for pk, n in counts.items() if n > 1}
        delay = retries.backoff(channel_cls, max(again.values()) - 1) if again else 0.0
        charged = [pk for pk, n in again.items() if n >= LOSSES_PER_ATTEMPT]
        text = (
            "ConnectionLost: the database connection was lost while its listeners ran, "
            f"{max(again.values(), default=1)} times in a row"
        )
        try:
            connection.open_raw(self.using)  # a new one: the broken one is closed
            held = store.record_lost(
                list(row_ids),
                claim,
                self.using,
                delay,
                list(again),
                charged,
                retries.strategy(channel_cls).max_attempts,
                text,
            )
        except Exception as exc:  # the server may be away: given back once it is there
            connection.lost(self.using, None)
            self.losses.unreturned(self.using, claim, list(row_ids))
            logger.warning("Could not give back stored notifications %s yet: %s", row_ids, exc)
            return
        # Rows the broken session still locks (it may outlive the client for a while).
        self.losses.unreturned(self.using, claim, held)
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
        if self.on_retry is not None:
            self.on_retry(channel_cls, delay)

    def claim_lost(
        self, channel_cls: type[BaseChannel], row_ids: list[int], claim: str, error: BaseException
    ) -> None:
        """The connection broke while rows ``row_ids`` were being claimed: no listener ran, so no
        loss is counted (the rows may not even have been claimed); those the claim holds, if it
        committed, go back."""
        self.give_back_quietly(row_ids, claim)
        self._broke(channel_cls, error)

    def give_back_quietly(self, ids: list[int], claim: str) -> None:
        """Give back rows ``ids`` of ``claim`` after their transaction ended without an
        outcome."""
        try:
            held = store.record_lost(ids, claim, self.using)
        except Exception as exc:
            connection.lost(self.using, None)
            held = ids
            logger.warning("Could not give back stored notifications %s yet: %s", ids, exc)
        self.losses.unreturned(self.using, claim, held)

    def give_back_unreturned(self) -> None:
        """Give back the rows of earlier claims that a lost connection kept from it: the
        server was away, or the broken session still held them. Best before their lease runs
        out, when another claim would count an attempt of each."""
        for claim, ids in self.losses.to_give_back(self.using):
            try:
                held = store.record_lost(ids, claim, self.using)
            except store.SchemaBehind:
                raise
            except Exception as exc:
                connection.lost(self.using, None)
                logger.warning("Could not give back stored notifications %s yet: %s", ids, exc)
                return
            self.losses.unreturned(self.using, claim, held)
