import datetime
import enum
import uuid
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from pgpubsub.channel import Channel, TriggerChannel
from tests.testapp.models import Author, Child, Document, Post


class Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclass
class PostReads(Channel):
    model_id: int
    model_type: str


@dataclass
class Everything(Channel):
    text: str
    number: int
    ratio: float
    flag: bool
    price: Decimal
    day: datetime.date
    moment: datetime.datetime
    clock: datetime.time
    ident: uuid.UUID
    colour: Colour
    numbers: list[int]
    pair: tuple[str, int]
    names: set[str]
    prices: dict[str, Decimal]
    calendar: dict[int, datetime.date]
    maybe: int | None = None
    anything: Any = None
    extra: list[str] = field(default_factory=list)


@dataclass
class Message(Channel):
    """A plain channel carrying text."""

    key: str
    text: str = ""


@dataclass
class Job(Channel):
    """A lockable channel: each job runs exactly once."""

    lock_notifications = True
    key: str
    text: str = ""


@dataclass
class FailingJob(Channel):
    lock_notifications = True
    key: str


@dataclass
class AuthorTrigger(TriggerChannel):
    """Lockable trigger channel: a post is written for each new author."""

    model = Author
    lock_notifications = True


@dataclass
class PostTrigger(TriggerChannel):
    """Plain trigger channel on posts."""

    model = Post


@dataclass
class DocumentTrigger(TriggerChannel):
    model = Document


@dataclass
class LockedDocumentTrigger(TriggerChannel):
    model = Document
    lock_notifications = True


@dataclass
class ChildTrigger(TriggerChannel):
    model = Child


@dataclass
class DocumentDeleting(TriggerChannel):
    """Plain trigger channel that fires BEFORE a document is deleted."""

    model = Document


@dataclass
class PostTimings(TriggerChannel):
    """Plain trigger channel with listeners before and after the same writes."""

    model = Post


@dataclass
class AuthorEvents(TriggerChannel):
    """Plain trigger channel for the decorators the other channels do not use."""

    model = Author


@dataclass
class AuthorRenamed(TriggerChannel):
    """Fed by a trigger of its own (``trigger_listener``): updates that change the name."""

    model = Author


@dataclass
class Broadcast(Channel):
    """A plain channel every Runtime receives: its listener records which process got it."""

    key: str


@dataclass
class SlowJob(Channel):
    """A lockable channel whose listener takes ``seconds`` before writing its effect."""

    lock_notifications = True
    key: str
    seconds: float = 0.0


@dataclass
class Timed(Channel):
    """A plain channel whose listener records when it started and ended (in-process)."""

    key: str
    seconds: float = 0.0


@dataclass
class InOrder(Channel):
    """Like ``Timed``, one message at a time in arrival order."""

    max_concurrency = 1
    key: str
    seconds: float = 0.0


@dataclass
class Unheard(Channel):
    """A channel no listener is registered for."""

    key: str


@dataclass
class Ledger(Channel):
    """A lockable channel whose messages must run one at a time, in arrival order."""

    lock_notifications = True
    max_concurrency = 1
    seq: int


@dataclass
class Cancelled(Channel):
    """A plain channel whose listener raises a BaseException (as async_to_sync code may)."""

    key: str


@dataclass
class Hooked(Channel):
    """A lockable channel whose listener registers an on_commit() function."""

    lock_notifications = True
    key: str


@dataclass
class Flaky(Channel):
    """A lockable channel retried quickly, whose listener fails the first ``failures``
    attempts of each message (counted in-process)."""

    lock_notifications = True
    max_attempts = 3
    retry_delay = 0.2
    key: str
    failures: int = 1
    seconds: float = 0.0  # spent before failing or succeeding


@dataclass
class ChaosJob(Channel):
    """A lockable channel for fault-injection runs across processes: ``fail`` is ``""``,
    ``"once"`` (the first attempt fails, wherever it runs) or ``"always"``."""

    lock_notifications = True
    max_attempts = 3
    retry_delay = 0.1
    key: str
    fail: str = ""


@dataclass
class Relay(Channel):
    """A plain channel whose listener publishes a ``Job`` (and, if ``again``, a ``Relay``)."""

    key: str
    again: int = 0


@dataclass
class LockedRelay(Channel):
    """A lockable channel whose listener publishes a ``Job`` and a ``Message``."""

    lock_notifications = True
    key: str


@dataclass
class Duplicating(Channel):
    """A lockable channel whose listener fails with a database error (a duplicate key), which
    leaves its transaction aborted."""

    lock_notifications = True
    max_attempts = 2
    retry_delay = 0.1
    key: str


@dataclass
class Swallowing(Channel):
    """A lockable channel whose listener catches a database error inside an atomic block
    without a savepoint, which dooms the transaction."""

    lock_notifications = True
    max_attempts = 1
    key: str


@dataclass
class Garbled(Channel):
    """A lockable channel whose listener raises an error whose text PostgreSQL cannot store
    as it is (a NUL, a lone surrogate)."""

    lock_notifications = True
    max_attempts = 2
    retry_delay = 0.1
    key: str


@dataclass
class Outlasting(Channel):
    """A lockable channel whose listener outlasts its session's
    ``idle_in_transaction_session_timeout``: the server closes its connection every time."""

    lock_notifications = True
    max_attempts = 3
    retry_delay = 0.2
    key: str


@dataclass
class PlainSwallowing(Channel):
    """A plain channel whose listener catches a database error inside an atomic block without
    a savepoint."""

    key: str


@dataclass
class AlwaysFailing(Channel):
    """A lockable channel retried quickly whose listener always fails after ``seconds``,
    recording when each of its runs started and ended (in-process)."""

    lock_notifications = True
    max_attempts = 3
    retry_delay = 0.05
    key: str
    seconds: float = 0.02


@dataclass
class Crashing(Channel):
    """A lockable channel whose listener appends a line to the file ``log``, then ends its
    process with ``os._exit(1)`` (only where ``PGPUBSUB_TEST_CRASH=1``; it raises elsewhere)."""

    lock_notifications = True
    max_attempts = 3
    key: str
    log: str


@dataclass
class Disconnecting(Channel):
    """A lockable channel whose listener ends its own database session on its first run of a
    message (a lost connection), then fails on every later run."""

    lock_notifications = True
    max_attempts = 2
    retry_delay = 0.05
    key: str


@dataclass
class Mixed(Channel):
    """A lockable channel whose listener uses the database or not, and fails or not, as told:
    the messages of one batch each keep or lose their own work."""

    lock_notifications = True
    key: str
    action: str = "nothing"


@dataclass
class Guarded(Channel):
    """A lockable channel whose listener uses Django's transaction API in the ways listeners do
    (nested atomic blocks, caught database errors, set_rollback(), notify(), a Processor of
    its own...), as told: each message of a batch keeps or loses only its own work."""

    lock_notifications = True
    key: str
    action: str = "nothing"
