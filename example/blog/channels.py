from dataclasses import dataclass

from blog.models import Author
from pgpubsub import Channel, TriggerChannel


@dataclass
class PostReads(Channel):
    """Sent from Python each time something is read; every listening process receives it."""

    model_id: int
    model_type: str


@dataclass
class AuthorTriggerChannel(TriggerChannel):
    """Fed by a database trigger on the author table. Lockable: each message is stored in the
    transaction that inserted the author and processed exactly once, even by many listeners."""

    model = Author
    lock_notifications = True
