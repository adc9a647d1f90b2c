"""What the listener hands to the workers: deliveries, and the bounded queue they wait in.

A delivery is one unit of work for a worker: a plain message, a batch of stored rows of one
lockable channel (claimed together, each in its own savepoint), or a sweep of a lockable
channel's stored rows. :func:`plan` turns received notifications into deliveries;
:class:`DeliveryQueue` holds them until a worker is free, and keeps a channel's deliveries to
at most ``max_concurrency`` running at once, in arrival order.
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
    payload: str = ""
    row_ids: list[int] = field(default_factory=list)
    after_id: int = 0  # a sweep: the stored rows above this id

    @classmethod
    def sweep(cls, channel: type[BaseChannel]) -> Delivery:
        found = BaseChannel.get(channel.listen_safe_name())
        return cls(Kind.SWEEP, channel, found[1] if found else [])


def plan(
    notifications: Iterable[tuple[str, str]],
    ignored: Callable[[str, str, str], None] | None = None,
) -> list[Delivery]:
    """Deliveries for whole notifications ``(channel name, payload)``, in arrival order.

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
                deliveries.append(Delivery(Kind.PLAIN, channel, callbacks, payload=payload))
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
    channel already runs ``max_concurrency`` of them.
    """

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be at least 1, got {maxsize}")
        self.maxsize = maxsize
        self._ready: deque[Delivery] = deque()
        self._lanes: dict[type[BaseChannel], _Lane] = {}
        self._waiting = 0
        self._closed = False
        self._changed = threading.Condition()

    def __len__(self) -> int:
        with self._changed:
            return self._waiting

    def put(self, delivery: Delivery, timeout: float) -> bool:
        """Add ``delivery``, waiting up to ``timeout`` seconds for room. False if none came."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self._waiting >= self.maxsize or self._closed:
                if self._closed:
                    return False
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(remaining)
            self._add(delivery)
            return True

    def offer(self, delivery: Delivery) -> bool:
        """Add ``delivery`` if there is room now; False otherwise."""
        return self.put(delivery, 0.0)

    def _add(self, delivery: Delivery) -> None:
        self._waiting += 1
        limit = delivery.channel.max_concurrency  # checked when the channel was defined
        if limit is None:
            self._ready.append(delivery)
        else:
            lane = self._lanes.get(delivery.channel)
            if lane is None:
                lane = self._lanes[delivery.channel] = _Lane(limit)
            lane.waiting.append(delivery)
            self._admit(lane)
        self._changed.notify_all()

    def _admit(self, lane: _Lane) -> None:
        while lane.waiting and lane.admitted < lane.limit:
            self._ready.append(lane.waiting.popleft())
            lane.admitted += 1

    def get(self, timeout: float) -> Delivery | None:
        """The oldest delivery a worker may run now, waiting up to ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not self._ready:
                if self._closed:
                    return None
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._changed.wait(remaining)
            self._waiting -= 1
            self._changed.notify_all()  # room for the listener
            return self._ready.popleft()

    def done(self, delivery: Delivery) -> None:
        """``delivery`` finished: the next of its channel may run."""
        lane = self._lanes.get(delivery.channel)
        if lane is None:
            return
        with self._changed:
            lane.admitted -= 1
            self._admit(lane)
            self._changed.notify_all()

    def close(self) -> list[Delivery]:
        """Take no more deliveries, wake every waiting thread (``put`` returns False, ``get``
        None), and remove and return the deliveries not started yet."""
        with self._changed:
            self._closed = True
            dropped = list(self._ready)
            self._ready.clear()
            for lane in self._lanes.values():
                dropped.extend(lane.waiting)
                lane.waiting.clear()
            self._waiting = 0
            self._changed.notify_all()
            return dropped
