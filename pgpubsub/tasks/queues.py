"""Task queues as lockable channels: one channel per (backend alias, queue name), so that tasks
are stored, woken, claimed, retried and swept by the same Runtime as every lockable message.

What differs from a message channel, and lives here:

- the channel's name is ``pgpubsub_task_`` and a hash of the backend alias and queue name
  (the index of migration 0012 covers these rows only);
- its pages come highest priority first, then oldest (:func:`pgpubsub.tasks.rows.ready_page`);
- after each sweep, the Runtime sweeps again when the next deferred task is due (``run_after``
  is honoured without polling), and every ``PRUNE_INTERVAL`` prunes old results;
- its retry policy is the backend's (``OPTIONS["RETRY"]``), or the task's own
  (:func:`pgpubsub.tasks.retry`).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar

from django.conf import settings

from pgpubsub.channel import BaseChannel
from pgpubsub.retries import RetryStrategy

logger = logging.getLogger("pgpubsub.tasks")

#: Seconds between two prunes of old results by one process.
PRUNE_INTERVAL = 60.0
#: Seconds results are kept after their task finished, unless ``OPTIONS["RESULT_TTL"]`` says.
DEFAULT_RESULT_TTL = 7 * 24 * 3600.0
#: The backend class whose queues these are, as ``TASKS`` names it.
BACKEND_PATH = "pgpubsub.tasks.DatabaseBackend"

#: An error attribute: the retry policy of the task that raised it.
POLICY_ATTRIBUTE = "_pgpubsub_task_retry"
#: A task function attribute: its own retry policy (:func:`pgpubsub.tasks.retry`).
TASK_POLICY_ATTRIBUTE = "pgpubsub_retry"

# Every per-task policy declared so far: the channel's limit is the highest of them.
_task_policies: list[Any] = []


class TaskRetry:
    """A queue's retry policy: the failing task's own (set on the error by the runner), else
    the backend's."""

    def __init__(self, default: Any) -> None:
        self.default = default

    @property
    def max_attempts(self) -> int:
        return max([self.default.max_attempts, *(p.max_attempts for p in _task_policies)])

    def next_delay(self, attempt: int, error: BaseException) -> float | None:
        policy = getattr(error, POLICY_ATTRIBUTE, None) or self.default
        if attempt >= policy.max_attempts:
            return None
        return policy.next_delay(attempt, error)


def task_policy(policy: Any) -> Any:
    """Remember a per-task policy (the queues' limit covers it)."""
    if policy not in _task_policies:
        _task_policies.append(policy)
    return policy


def backend_policy(options: dict[str, Any], alias: str) -> Any:
    """The retry policy ``OPTIONS["RETRY"]`` names: a policy object, or the keyword arguments
    of a :class:`~pgpubsub.retries.RetryStrategy` (a dict); pgpubsub's default without it."""
    value = options.get("RETRY")
    if value is None:
        return RetryStrategy()
    if isinstance(value, dict):
        return RetryStrategy(**value)
    if not (hasattr(value, "next_delay") and hasattr(value, "max_attempts")):
        raise TypeError(
            f"TASKS[{alias!r}]['OPTIONS']['RETRY'] must be a retry policy (e.g. "
            f"pgpubsub.retries.RetryStrategy(max_attempts=5)) or a dict of its arguments, "
            f"not {value!r}"
        )
    return value


class TaskQueue(BaseChannel):
    """The channel of one queue of one backend. Its messages are tasks: see
    :mod:`pgpubsub.tasks.runner`."""

    lock_notifications = True
    # Writers only store the row: the watcher wakes the listeners (a NOTIFY per task would
    # serialise every enqueuing commit), and a wake-up makes a sweep, which takes the
    # priorities into account.
    notify_on_write = False
    backend_alias: ClassVar[str] = ""
    queue_name: ClassVar[str] = ""
    result_ttl: ClassVar[float] = DEFAULT_RESULT_TTL
    _pgpubsub_listen_name: ClassVar[str] = "pgpubsub_task_"  # each queue's class has its own

    @classmethod
    def name(cls) -> str:
        return f"pgpubsub.tasks.{cls.backend_alias}.{cls.queue_name}"

    @classmethod
    def listen_safe_name(cls) -> str:
        return cls._pgpubsub_listen_name

    @classmethod
    def build_from_payload(cls, notification_payload: Any, callbacks: list[Callable]) -> Any:
        from pgpubsub.tasks.runner import TaskRun

        return TaskRun.from_payload(cls, notification_payload)

    @classmethod
    def read_page(cls, channel: Any, after_id: int, using: str, limit: int) -> list[int]:
        from pgpubsub.tasks import rows

        return rows.ready_page(cls.listen_safe_name(), after_id, using, limit)

    @classmethod
    def batch_done(cls, succeeded: list[int], using: str) -> None:
        """The results of a batch's successful tasks, written in one statement before the
        batch commits (a statement per task would also cost each a savepoint of its own)."""
        from pgpubsub.tasks.runner import write_results

        write_results(succeeded, using)

    @classmethod
    def after_sweep(cls, using: str, retry_in: Callable[[Any, float], None]) -> None:
        """Sweep again when the next waiting task is due; prune old results now and then."""
        from pgpubsub.tasks import rows

        due = rows.next_due(cls.listen_safe_name(), using)
        if due is not None:
            retry_in(cls, due)
        _prune_now_and_then(using)


def channel_name(alias: str, queue: str) -> str:
    digest = hashlib.sha1(f"{alias}\0{queue}".encode()).hexdigest()[:16]
    return f"pgpubsub_task_{digest}"


_channels: dict[tuple[str, str], type[TaskQueue]] = {}
_lock = threading.Lock()


def channel(alias: str, queue: str, options: dict[str, Any] | None = None) -> type[TaskQueue]:
    """The channel of queue ``queue`` of the backend ``alias`` (made and registered once)."""
    found = _channels.get((alias, queue))
    if found is not None:
        return found
    with _lock:
        found = _channels.get((alias, queue))
        if found is not None:
            return found
        options = options if options is not None else _options(alias)
        ttl = float(options.get("RESULT_TTL", DEFAULT_RESULT_TTL))
        attributes = {
            "__module__": __name__,
            "_pgpubsub_listen_name": channel_name(alias, queue),
            "backend_alias": alias,
            "queue_name": queue,
            "result_ttl": ttl,
            "retry": TaskRetry(backend_policy(options, alias)),
            "database": options.get("DATABASE"),
        }
        made = type(f"TaskQueue[{alias}:{queue}]", (TaskQueue,), attributes)
        from pgpubsub.tasks.runner import run_task

        made.register(run_task)
        _channels[(alias, queue)] = made
        return made


def _options(alias: str) -> dict[str, Any]:
    return dict(getattr(settings, "TASKS", {}).get(alias, {}).get("OPTIONS", {}))


def configured() -> dict[str, dict[str, Any]]:
    """The ``TASKS`` backends that are pgpubsub's, by alias."""
    return {
        alias: params
        for alias, params in (getattr(settings, "TASKS", None) or {}).items()
        if isinstance(params, dict) and params.get("BACKEND") == BACKEND_PATH
    }


def register_configured() -> list[type[TaskQueue]]:
    """Make the channel of every queue of every pgpubsub backend in ``TASKS`` (at start-up, so
    that Runtimes listen to them)."""
    backends = configured()
    if not backends:
        return []  # and django.tasks is not imported: a project without tasks may lack it
    from pgpubsub.tasks.compat import DEFAULT_TASK_QUEUE_NAME

    made = []
    for alias, params in backends.items():
        for queue in params.get("QUEUES") or [DEFAULT_TASK_QUEUE_NAME]:
            made.append(channel(alias, queue, dict(params.get("OPTIONS", {}))))
    return made


def channels_named(names: list[str]) -> list[type[TaskQueue]]:
    """The channels of the queues called ``names`` (in any pgpubsub backend); raises
    ``LookupError`` naming those that no backend has."""
    register_configured()
    found = [cls for (alias, queue), cls in _channels.items() if queue in names]
    missing = sorted(set(names) - {cls.queue_name for cls in found})
    if missing:
        known = sorted({queue for (_, queue) in _channels})
        raise LookupError(
            f"No pgpubsub task backend has the queue(s) {', '.join(missing)} (its QUEUES in "
            f"TASKS); known: {', '.join(known) or 'none'}"
        )
    return found


_last_prune: dict[str, float] = {}


def _prune_now_and_then(using: str) -> None:
    now = time.monotonic()
    if now < _last_prune.get(using, 0.0) + PRUNE_INTERVAL:
        return
    _last_prune[using] = now
    from pgpubsub.tasks import rows

    by_ttl: dict[float, list[str]] = {}
    for cls in list(_channels.values()):
        by_ttl.setdefault(cls.result_ttl, []).append(cls.listen_safe_name())
    for ttl, names in by_ttl.items():
        pruned = rows.prune(names, ttl, using)
        if pruned:
            logger.info("Pruned %s task results older than %ss", pruned, ttl)
