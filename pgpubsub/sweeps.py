"""Sweeps: processing a lockable channel's stored rows page by page, in id (arrival) order
(or the channel's own order: tasks come by priority).

One pager (:func:`read_page`) serves both ways of sweeping: :func:`sweep_all` processes every
due row of a channel on the calling thread (``listen --recover`` without a Runtime,
``process_stored_notifications`` received by a synchronous listener), and a Runtime's
:class:`Sweeper` spreads a page's batches over its workers through the queue, each page handing
on to the next. Either way a long sweep logs its progress every ``PROGRESS_INTERVAL`` seconds.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from pgpubsub import batch_size, store
from pgpubsub.channel import BaseChannel
from pgpubsub.deliveries import Delivery, DeliveryQueue, Kind
from pgpubsub.processing import Outcome, Processor
from pgpubsub.scheduler import Scheduler

logger = logging.getLogger(__name__)

#: Seconds between progress lines while a channel's backlog is processed.
PROGRESS_INTERVAL = 5.0

#: A sweep that read at most this many rows ends without a line in the log.
QUIET_SWEEP = 20


def read_page(
    processor: Processor, channel: type[BaseChannel], after_id: int, limit: int
) -> list[int]:
    """Ids of up to ``limit`` due stored rows of ``channel`` above ``after_id`` that no one
    holds. Rows whose giving back a lost connection kept from this process go back first: they
    are then in the page, and uncounted (once their lease runs out, another process' claim
    would count an attempt of each)."""
    processor.failures.give_back_unreturned()
    # A channel may order its pages itself (tasks: by priority, see pgpubsub.tasks.queues).
    pager = getattr(channel, "read_page", None) or store.pending_ids
    return pager(channel, after_id, processor.using, limit=limit)


def batches(page: list[int], size: int, workers: int = 1) -> list[list[int]]:
    """``page`` cut into the batches claimed and committed together: of at most ``size`` rows
    (:func:`pgpubsub.batch_size.size`), and at least as many as ``workers`` (while there are
    rows), so that a short page of slow messages keeps every worker busy too."""
    total = len(page)
    count = max(-(-total // size), min(workers, total))
    return [page[i * total // count : (i + 1) * total // count] for i in range(count)]


def sweep_all(processor: Processor, channel: type[BaseChannel]) -> int:
    """Process every due stored row of ``channel`` that no one else holds, a batch per
    transaction, until none is left or the processor stops. Returns how many succeeded; raises
    the error when the connection breaks (the rows stay stored)."""
    total = 0
    last_id = 0
    next_report = time.monotonic() + PROGRESS_INTERVAL
    while not (processor.stopping is not None and processor.stopping.is_set()):
        page = read_page(processor, channel, last_id, batch_size.size(channel))
        if not page:
            break
        last_id = page[-1]
        outcome = processor.run_rows(channel, page)
        if outcome.lost is not None:
            raise outcome.lost
        total += outcome.processed
        if time.monotonic() >= next_report:  # a long recovery says how far it got
            logger.info(
                "Processed %s stored notifications of %s so far (up to id %s)",
                total,
                channel.name(),
                last_id,
            )
            next_report = time.monotonic() + PROGRESS_INTERVAL
    if total:
        logger.info("Processed %s stored notifications of %s", total, channel.name())
    return total


class SweepTally:
    """What one sweep of a lockable channel read and processed, over its pages and batches
    (which run on several workers): its end is logged once the last of them is done."""

    def __init__(self) -> None:
        self.read = 0  # stored rows its pages listed
        self.processed = 0  # rows this Runtime processed (not those another took, or failed)
        self.parts = 1  # its deliveries not done yet (the first page's included)
        self.last_id = 0  # of the last page read
        self.reading = True  # more pages may come


@dataclass
class SweepPart(Delivery):
    """A page (``Kind.SWEEP``) or batch of rows (``Kind.ROWS``) of a sweep in progress."""

    tally: SweepTally | None = None


class Sweeper:
    """A Runtime's sweeps: a sweep delivery reads a page of ``workers`` batches, runs one batch
    itself and queues the others and the next page, so that the workers share a backlog."""

    def __init__(
        self, queue: DeliveryQueue, scheduler: Scheduler, workers: int, stopping: threading.Event
    ) -> None:
        self.queue = queue
        self.scheduler = scheduler
        self.workers = workers
        self.stopping = stopping
        self._lock = threading.Lock()
        # When the next progress line of a channel's sweeps is due (time.monotonic()): one
        # every PROGRESS_INTERVAL, also when a sweep follows another.
        self._next_report: dict[type[BaseChannel], float] = {}

    @staticmethod
    def first_part(delivery: Delivery) -> Delivery:
        """The delivery a worker runs: the first page of a sweep gets the tally its pages and
        batches add up in."""
        if delivery.kind is Kind.SWEEP and not isinstance(delivery, SweepPart):
            return SweepPart(
                Kind.SWEEP,
                delivery.channel,
                delivery.callbacks,
                after_id=delivery.after_id,
                tally=SweepTally(),
            )
        return delivery

    def run_page(self, processor: Processor, delivery: Delivery) -> tuple[Outcome, bool]:
        """Process a page of the channel's stored rows above ``delivery.after_id``: one batch
        here, the others handed to the pool as row deliveries (this thread runs those that
        find no room), then queue the next page. Returns the outcome of the batches run here,
        and whether the next page was queued (the sweep goes on)."""
        channel = delivery.channel
        tally = (delivery.tally if isinstance(delivery, SweepPart) else None) or SweepTally()
        size = batch_size.size(channel)
        page_size = size * self.workers
        page = read_page(processor, channel, delivery.after_id, page_size)
        if not page or self.stopping.is_set():
            self.count(tally, reading=False)
            return Outcome(), False
        full = len(page) == page_size  # there may be more
        # Counted before the next page can be read (by another worker), so pages add up in order.
        self.count(tally, read=len(page), last_id=page[-1], reading=full)
        parts = batches(page, size, self.workers)
        here = parts[:1]
        for batch in parts[1:]:
            if not self._offer(
                tally, SweepPart(Kind.ROWS, channel, delivery.callbacks, row_ids=batch)
            ):
                here.append(batch)
        continued = False
        if full:
            next_page = SweepPart(Kind.SWEEP, channel, delivery.callbacks, after_id=page[-1])
            continued = self._offer(tally, next_page)
            if not continued:
                self.count(tally, reading=False)  # this sweep ends here
                self.scheduler.want_sweep([channel])  # another, once this one is done
        outcome = Outcome()
        for batch in here:
            done = processor.run_rows(channel, batch, delivery.callbacks)
            self.count(tally, processed=done.processed)
            outcome += done
            if done.lost is not None:
                break  # the rows stay stored: the caller has them swept again
        return outcome, continued

    def _offer(self, tally: SweepTally, part: SweepPart) -> bool:
        """Queue a page or batch of the sweep of ``tally`` if there is room now."""
        part.tally = tally
        with self._lock:
            tally.parts += 1  # before a worker can take it (and finish it)
        if self.queue.offer(part):
            return True
        with self._lock:
            tally.parts -= 1
        return False

    def count(
        self,
        tally: SweepTally,
        read: int = 0,
        processed: int = 0,
        last_id: int | None = None,
        reading: bool | None = None,
    ) -> None:
        with self._lock:
            tally.read += read
            tally.processed += processed
            if last_id is not None:
                tally.last_id = last_id
            if reading is not None:
                tally.reading = tally.reading and reading

    def count_part(self, delivery: Delivery, outcome: Outcome) -> None:
        """A batch of rows ran: add what it processed to its sweep's tally, if it is part of one."""
        if isinstance(delivery, SweepPart) and delivery.tally is not None:
            self.count(delivery.tally, processed=outcome.processed)

    def ends(self, delivery: Delivery) -> None:
        """A part of a sweep ends it (no more pages): no progress line for it."""
        if isinstance(delivery, SweepPart) and delivery.tally is not None:
            self.count(delivery.tally, reading=False)

    def part_done(self, delivery: Delivery) -> bool:
        """A page or batch of a sweep is done: log the sweep's progress every
        ``PROGRESS_INTERVAL`` seconds while it reads pages, and its end once every part is
        done (rows another Runtime took, or that failed, are not counted as processed).
        True when that was the sweep's last part: the sweep has ended."""
        if not isinstance(delivery, SweepPart) or delivery.tally is None:
            return False
        tally, channel = delivery.tally, delivery.channel
        now = time.monotonic()
        with self._lock:
            tally.parts -= 1
            ended = tally.parts == 0 and not tally.reading
            progress = tally.reading and now >= self._next_report.get(channel, 0.0)
            if progress:
                self._next_report[channel] = now + PROGRESS_INTERVAL
            read, processed, last_id = tally.read, tally.processed, tally.last_id
        if progress:
            logger.info(
                "Sweeping %s: %s stored notifications processed so far (read up to id %s)",
                channel.name(),
                processed,
                last_id,
            )
        elif ended and read > QUIET_SWEEP:
            if processed == read:
                logger.info("Swept %s stored notifications of %s", processed, channel.name())
            else:
                logger.info(
                    "Swept %s stored notifications of %s (of %s found: the others failed, or "
                    "another listener took them)",
                    processed,
                    channel.name(),
                    read,
                )
        return ended
