from dataclasses import dataclass

from benchapp.models import Event, Row
from pgpubsub import Channel, TriggerChannel


@dataclass
class EventTrigger(TriggerChannel):
    """Lockable trigger channel: every inserted Event is processed exactly once."""

    model = Event
    lock_notifications = True


@dataclass
class Tick(Channel):
    """Plain channel: ``seq`` numbers the message, ``sent`` is its send time (epoch seconds)."""

    seq: int
    sent: float


@dataclass
class RowTrigger(TriggerChannel):
    """Lockable trigger channel whose listener does nothing: the library builds the ``old`` and
    ``new`` model instances from the row images, runs the callback, acknowledges."""

    model = Row
    lock_notifications = True


@dataclass
class Job(Channel):
    """Lockable plain channel whose listener does nothing (rows stored with ``notify()``)."""

    n: int
    lock_notifications = True


@dataclass
class Ping(Channel):
    """Plain channel whose listener only records the latency in memory (no query)."""

    seq: int
    sent: float
