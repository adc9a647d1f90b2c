"""Running one task: what a queue's stored message does when a worker runs it.

A task runs inside the transaction that holds its row, in its own savepoint, like any
lockable message: its database work, its result and the row's deletion commit together, or
not at all. A failed attempt is rolled back; pgpubsub records it on the row (and the retry
policy decides when it runs again), and :func:`record_failure` adds the error to the task's
result in the same transaction.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import socket
import threading
import traceback
from inspect import iscoroutinefunction
from typing import Any

from django.db import transaction
from django.utils import timezone
from django.utils.dateparse import parse_datetime
from django.utils.module_loading import import_string

from pgpubsub import current, event_loop, signals
from pgpubsub.channel import _load_json
from pgpubsub.exceptions import InvalidPayload
from pgpubsub.models import notifications_alias
from pgpubsub.retries import RetryStrategy
from pgpubsub.tasks import compat, queues, rows
from pgpubsub.tasks.results import make_result

_HOST = socket.gethostname()


def worker_id() -> str:
    """Who runs a task: ``host:pid:thread``."""
    return f"{_HOST}:{os.getpid()}:{threading.current_thread().name}"


class TaskNotFound(InvalidPayload):
    """A stored task names a function that cannot be imported, or that is not a task."""


class BadReturnValue(TypeError):
    """A task returned a value that cannot be stored as JSON (it is not tried again)."""


#: The policy of errors another attempt would not fix.
_NO_RETRY = RetryStrategy(max_attempts=1)


def run_task(**kwargs: Any) -> None:
    """The listener every task queue's channel registers (its messages run themselves)."""


def load_task(path: str) -> Any:
    """The task at dotted path ``path``; :class:`TaskNotFound` if there is none."""
    try:
        found = import_string(path)
    except ImportError as exc:
        raise TaskNotFound(f"Task {path!r} cannot be imported: {exc}") from None
    if not isinstance(found, compat.Task):
        raise TaskNotFound(f"{path!r} is not a task (decorate the function with @task)")
    return found


def task_of(payload: dict[str, Any], alias: str) -> Any:
    """The task of a stored ``payload``, with the options it was enqueued with."""
    return _task_with(
        payload["task"],
        payload.get("priority", 0),
        payload.get("queue"),
        payload.get("run_after"),
        payload.get("backend", alias),
    )


@functools.lru_cache(maxsize=1024)
def _task_with(
    path: str, priority: int, queue: str | None, run_after: str | None, backend: str
) -> Any:
    # Cached: making a Task validates it (its function's signature read each time).
    task = load_task(path)
    return dataclasses.replace(
        task,
        priority=priority,
        queue_name=queue or task.queue_name,
        run_after=parse_datetime(run_after) if run_after else None,
        backend=backend,
    )


class TaskRun:
    """One stored task, read and ready to run."""

    def __init__(self, queue: type[queues.TaskQueue], payload: dict[str, Any], text: str) -> None:
        self.queue = queue
        self.payload = payload
        self.text = text  # the payload as stored (JSON)
        self.task: Any = None

    @classmethod
    def from_payload(cls, queue: type[queues.TaskQueue], payload: Any) -> TaskRun:
        """Read a stored task; an unreadable one (not JSON, its arguments not a list and a
        dict) raises :class:`~pgpubsub.exceptions.InvalidPayload`: it fails for good (another
        attempt would read the same bytes), and its result says why."""
        data = _load_json(payload)
        if not isinstance(data, dict) or not isinstance(data.get("task"), str):
            raise InvalidPayload(f"Not a stored task: {payload!r:.200}")
        if not isinstance(data.get("args", []), list) or not isinstance(
            data.get("kwargs", {}), dict
        ):
            raise InvalidPayload(f"The arguments of task {data['task']!r} cannot be read")
        return cls(queue, data, payload if isinstance(payload, str) else json.dumps(data))

    def execute_callbacks(self) -> None:
        running = current.running()
        if running is None:
            raise RuntimeError("A task runs only as a stored message (pgpubsub's workers)")
        # A task this process cannot import is a failed attempt, retried as any: during a
        # deploy, a process of the old code may meet a task of the new one.
        try:
            self.task = task_of(self.payload, self.queue.backend_alias)
        except compat.InvalidTask as exc:
            raise TaskNotFound(f"Task {self.payload['task']!r} cannot run here: {exc}") from None
        using = self.queue.database or notifications_alias()
        started = timezone.now()
        me = worker_id()
        workers, errors, first_started = (
            rows.earlier_attempts(running.row_id, using) if running.attempt > 1 else ([], [], None)
        )
        result = make_result(
            self.task,
            running.row_id,
            self.payload,
            compat.TaskResultStatus.RUNNING,
            enqueued_at=None,
            started_at=first_started or started,
            finished_at=None,
            last_attempted_at=started,
            errors=errors,
            worker_ids=[*workers, me],
        )
        sender = self._sender()
        compat.task_started.send(sender=sender, task_result=result)
        args, kwargs = self.payload.get("args", []), self.payload.get("kwargs", {})
        if self.task.takes_context:
            args = [compat.TaskContext(task_result=result), *args]
        try:
            value = self._call(args, kwargs)
        except Exception as error:
            policy = getattr(self.task.func, queues.TASK_POLICY_ATTRIBUTE, None)
            _mark(error, policy, started, me)
            raise
        try:
            value = compat.normalize_json(value)
            text = json.dumps(value, allow_nan=False)
            finished = timezone.now()
        except (TypeError, ValueError) as exc:
            error = BadReturnValue(f"Task {self.task.module_path} returned {exc}")
            _mark(error, _NO_RETRY, started, me)
            raise error from exc
        # The same TaskResult, finished (as Django's own backends do).
        object.__setattr__(result, "status", compat.TaskResultStatus.SUCCESSFUL)
        object.__setattr__(result, "finished_at", finished)
        object.__setattr__(result, "_return_value", value)
        _results().append(
            rows.Success(
                running.row_id, self.text, first_started or started, started, finished, me, text
            )
        )
        transaction.on_commit(
            lambda: compat.task_finished.send(sender=sender, task_result=result), using=using
        )

    def _call(self, args: list, kwargs: dict) -> Any:
        func = self.task.func
        if iscoroutinefunction(func):
            return event_loop.run(func(*args, **kwargs))
        return func(*args, **kwargs)

    def _sender(self) -> type:
        return type(compat.task_backends[self.queue.backend_alias])


# The successful tasks of the batch running on this thread, written when it is done.
_local = threading.local()


def _results() -> list[rows.Success]:
    found = getattr(_local, "results", None)
    if found is None:
        found = _local.results = []
    return found


def write_results(succeeded: list[int], using: str) -> None:
    """Write the results of the tasks ``succeeded`` of the batch that ran on this thread
    (those of tasks whose work was undone since, by a deferred constraint, are dropped)."""
    pending, _local.results = _results(), []
    kept = set(succeeded)
    rows.write_successes([result for result in pending if result.row_id in kept], using)


def _mark(error: BaseException, policy: Any, started: datetime.datetime, worker: str) -> None:
    """Tell :func:`record_failure` (and the queue's policy) about the attempt that raised."""
    try:
        error._pgpubsub_task_attempt = (started, worker)  # type: ignore[attr-defined]
        if policy is not None:
            setattr(error, queues.POLICY_ATTRIBUTE, policy)
    except AttributeError:  # an exception with __slots__: the defaults apply
        pass


def record_failure(sender: type, row_id: int, error: BaseException, final: bool, **kwargs: Any):
    """A receiver of ``message_failed``: a task's failed attempt (or a task that could not be
    read) goes into its result, in the transaction that records it on the row."""
    if not (isinstance(sender, type) and issubclass(sender, queues.TaskQueue)) or row_id is None:
        return
    now = timezone.now()
    started, worker = getattr(error, "_pgpubsub_task_attempt", (now, worker_id()))
    died = getattr(error, "claim", None)
    if died:  # the attempt of a process that died: its host and pid, when it started unknown
        started, worker = None, ":".join(died.split(":")[:2])
    kind = type(error)
    described = {
        "exception_class_path": f"{kind.__module__}.{kind.__qualname__}",
        "traceback": "".join(traceback.format_exception(error)),
    }
    using = sender.database or notifications_alias()
    rows.write_failure(row_id, final, started, now, worker, described, using)
    if final:
        _finished_failed(sender, row_id, using)


def _finished_failed(queue: type[queues.TaskQueue], row_id: int, using: str) -> None:
    """Send ``task_finished`` for a task that failed for good, once that commits."""
    from pgpubsub.tasks.results import stored_result

    def send() -> None:
        try:
            result = stored_result(queue.backend_alias, row_id, using)
        except Exception:  # its task cannot be imported: no TaskResult can be made
            return
        sender = type(compat.task_backends[queue.backend_alias])
        compat.task_finished.send(sender=sender, task_result=result)

    transaction.on_commit(send, using=using)


signals.message_failed.connect(record_failure, dispatch_uid="pgpubsub.tasks.record_failure")
