"""What the listener hands to the workers: deliveries, and the bounded queue they wait in.

A delivery is one unit of work for a worker: plain messages of one channel (run in arrival
order, each in a transaction of its own), a batch of stored rows of one lockable channel
(claimed together, each in its own savepoint), or a sweep of a lockable channel's stored rows.
:func:`plan` turns received notifications into deliveries; :class:`DeliveryQueue` holds them
until a worker is free, and keeps a channel's deliveries to at most ``max_concurrency`` running
at once, in arrival order.

A plain message joins the delivery queued just before it when that one holds plain messages of
the same channel and no worker has taken it yet (up to ``batch_size.size()`` messages): a busy
Runtime hands its workers many messages at a time, a hand-off costing a lock, a wake-up and the
worker's bookkeeping, while an idle one still hands each message over as it comes.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from pgpubsub import batch_size, wire
from pgpubsub.channel import BaseChannel

logger = logging.getLogger(__name__)


class Kind(enum.Enum):
    PLAIN = "plain"  # a plain channel's message: run its callbacks
    ROWS = "rows"  # stored rows of a lockable channel, by id: claim, run, acknowledge
    SWEEP = "sweep"  # every stored row of a lockable channel that no one holds


@dataclass
class Delivery:
    kind: Kind
    channel: type[BaseChannel]
    callbacks: list[Callable] = field(default_factory=list)
    payloads: list[str] = field(default_factory=list)  # plain messages, in arrival order
    row_ids: list[int] = field(default_factory=list)
    after_id: int = 0  # a sweep: the stored rows above this id

    @property
    def payload(self) -> str:
        """The first plain message (a delivery that :func:`plan` made has one)."""
        return self.payloads[0] if self.payloads else ""

    @classmethod
    def plain(cls, channel: type[BaseChannel], callbacks: list[Callable], payload: str) -> Delivery:
        return cls(Kind.PLAIN, channel, callbacks, payloads=[payload])

    @classmethod
    def sweep(cls, channel: type[BaseChannel]) -> Delivery:
        found = BaseChannel.get(channel.listen_safe_name())
        return cls(Kind.SWEEP, channel, found[1] if found else [])


def plan(
    notifications: Iterable[tuple[str, str]],
    ignored: Callable[[str, str, str], None] | None = None,
) -> list[Delivery]:
    """Deliveries for whole notifications ``(channel name, payload)``, in arrival order: one
    for each plain message (the queue joins them), one for each request to sweep.

    Consecutive stored-row notifications of one lockable channel share a delivery (up to
    ``batch_size.size()``). Notifications that lead nowhere (a channel without listeners here,
    a lockable channel's payload that is neither a row id nor a request to sweep) are logged,
    told to ``ignored(channel name, payload, reason)`` if given, and dropped.
    """
    deliveries: list[Delivery] = []
    batch: Delivery | None = None
    for channel_name, payload in notifications:
        found = BaseChannel.get(channel_name)
        if found is None:
            _ignore(ignored, channel_name, payload, "no listener for that channel here")
            continue
        channel, callbacks = found
        if not channel.lock_notifications:
            batch = None
            if payload != wire.RECOVER:
                deliveries.append(Delivery.plain(channel, callbacks, payload))
            continue
        row_id = wire.row_id(payload)
        if row_id is None or payload == wire.WAKE:
            batch = None
            if payload in (wire.RECOVER, wire.WAKE) or payload.startswith("{"):
                # The recovery request, the watcher's wake-up, or a whole payload from a
                # trigger of an older version (which stored the row too): the table has the
                # messages.
                deliveries.append(Delivery(Kind.SWEEP, channel, callbacks))
            else:
                _ignore(ignored, channel_name, payload, "not a stored notification id")
            continue
        if (
            batch is None
            or batch.channel is not channel
            or len(batch.row_ids) >= batch_size.size(channel)
        ):
            batch = Delivery(Kind.ROWS, channel, callbacks)
            deliveries.append(batch)
        batch.row_ids.append(row_id)
    return deliveries


def _ignore(
    ignored: Callable[[str, str, str], None] | None, channel_name: str, payload: str, reason: str
) -> None:
    found = BaseChannel.get(channel_name)
    logger.warning(
        "Ignoring a notification on %s (%s): %.100r",
        found[0].name() if found else channel_name,
        reason,
        payload,
    )
    if ignored is not None:
        ignored(channel_name, payload, reason)


class _Lane:
    """The deliveries of one channel with a ``max_concurrency``: waiting ones, in order."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.admitted = 0  # handed to the ready queue or running
        self.waiting: deque[Delivery] = deque()


class DeliveryQueue:
    """A bounded FIFO of deliveries shared by the listener (``put``/``offer``) and the workers
    (``get``, then ``done`` once the delivery ran).

    ``maxsize`` bounds the deliveries not started yet, including those held back because their
    channel already runs ``max_concurrency`` of them. A plain delivery may join the one queued
    last (see the module's docstring): it then takes no room.

    Workers wait for deliveries and the listener for room on two conditions of one lock, and
    each change wakes one thread that can use it: not every worker and the listener for each
    message.
    """

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be at least 1, got {maxsize}")
        self.maxsize = maxsize
        self._ready: deque[Delivery] = deque()
        self._lanes: dict[type[BaseChannel], _Lane] = {}
        self._waiting = 0
        self._closed = False
        # The delivery queued last, while no worker has taken it: a plain one may be joined.
        self._last: Delivery | None = None
        lock = threading.Lock()
        self._not_empty = threading.Condition(lock)  # workers wait here
        self._not_full = threading.Condition(lock)  # the listener waits here

    def __len__(self) -> int:
        with self._not_empty:
            return self._waiting

    def put(self, delivery: Delivery, timeout: float) -> bool:
        """Add ``delivery``, waiting up to ``timeout`` seconds for room. False if none came."""
        deadline = time.monotonic() + timeout
        with self._not_full:
            if self._closed:
                return False
            if self._joined(delivery):
                return True
            while self._waiting >= self.maxsize:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._not_full.wait(remaining)
                if self._closed:
                    return False
            self._add(delivery)
            return True

    def offer(self, delivery: Delivery) -> bool:
        """Add ``delivery`` if there is room now; False otherwise."""
        return self.put(delivery, 0.0)

    def _joined(self, delivery: Delivery) -> bool:
        """Plain ``delivery`` joined the last queued delivery, of the same channel, not taken."""
        last = self._last
        if (
            delivery.kind is not Kind.PLAIN
            or last is None
            or last.kind is not Kind.PLAIN
            or last.channel is not delivery.channel
            or len(last.payloads) + len(delivery.payloads) > batch_size.size(delivery.channel)
        ):
            return False
        last.payloads.extend(delivery.payloads)
        return True

    def _add(self, delivery: Delivery) -> None:
        self._waiting += 1
        self._last = delivery
        limit = delivery.channel.max_concurrency  # checked when the channel was defined
        if limit is None:
            self._ready.append(delivery)
            self._not_empty.notify()
        else:
            lane = self._lanes.get(delivery.channel)
            if lane is None:
                lane = self._lanes[delivery.channel] = _Lane(limit)
            lane.waiting.append(delivery)
            self._admit(lane)

    def _admit(self, lane: _Lane) -> None:
        while lane.waiting and lane.admitted < lane.limit:
            self._ready.append(lane.waiting.popleft())
            lane.admitted += 1
            self._not_empty.notify()

    def get(self, timeout: float) -> Delivery | None:
        """The oldest delivery a worker may run now, waiting up to ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._not_empty:
            while not self._ready:
                if self._closed:
                    return None
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._not_empty.wait(remaining)
            self._waiting -= 1
            self._not_full.notify()  # room for the listener
            delivery = self._ready.popleft()
            if delivery is self._last:
                self._last = None  # taken: nothing joins it any more
            return delivery

    def done(self, delivery: Delivery) -> None:
        """``delivery`` finished: the next of its channel may run."""
        lane = self._lanes.get(delivery.channel)
        if lane is None:
            return
        with self._not_empty:
            lane.admitted -= 1
            self._admit(lane)

    def close(self) -> list[Delivery]:
        """Take no more deliveries, wake every waiting thread (``put`` returns False, ``get``
        None), and remove and return the deliveries not started yet."""
        with self._not_empty:
            self._closed = True
            self._last = None
            dropped = list(self._ready)
            self._ready.clear()
            for lane in self._lanes.values():
                dropped.extend(lane.waiting)
                lane.waiting.clear()
            self._waiting = 0
            self._not_empty.notify_all()
            self._not_full.notify_all()
            return dropped
