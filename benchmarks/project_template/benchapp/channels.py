from dataclasses import dataclass

from benchapp.models import Event
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
