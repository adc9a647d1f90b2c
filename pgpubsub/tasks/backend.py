"""``pgpubsub.tasks.DatabaseBackend``: Django's tasks, stored and run by pgpubsub."""

from __future__ import annotations

import json
from typing import Any

from asgiref.sync import sync_to_async
from django.core import checks
from django.utils import timezone

from pgpubsub import conf
from pgpubsub.models import notifications_alias
from pgpubsub.tasks import compat, queues, rows
from pgpubsub.tasks.results import make_result, stored_result


class DatabaseBackend(compat.BaseTaskBackend):
    """Stores each task in the caller's transaction, as a lockable message of its queue's
    channel; pgpubsub's Runtimes (embedded in web processes, or ``manage.py listen``) run it
    exactly once in the database sense, and keep its result for ``OPTIONS["RESULT_TTL"]``
    seconds.

    ``OPTIONS``: ``RESULT_TTL`` (seconds, default 7 days), ``RETRY`` (the retry policy of its
    tasks: a policy object or a dict of :class:`~pgpubsub.retries.RetryStrategy` arguments),
    ``DATABASE`` (the alias tasks are stored in; default: the ``Notification`` model's).
    """

    supports_defer = True
    supports_async_task = True
    supports_get_result = True
    supports_priority = True

    def __init__(self, alias: str, params: dict[str, Any]) -> None:
        super().__init__(alias, params)
        self._problems: list[str] = []
        try:
            self.result_ttl = float(self.options.get("RESULT_TTL", queues.DEFAULT_RESULT_TTL))
            queues.backend_policy(self.options, alias)
        except (TypeError, ValueError) as exc:
            self._problems.append(str(exc))
            return
        for queue in sorted(self.queues):
            queues.channel(alias, queue, self.options)

    @property
    def using(self) -> str:
        return self.options.get("DATABASE") or notifications_alias()

    def enqueue(self, task: Any, args: Any, kwargs: Any) -> Any:
        """Store the task in the current transaction of the tasks' database (at once in
        autocommit): it runs once that commits, never if it rolls back."""
        # The task was validated when it was made (Task.__post_init__, using()); what this
        # backend needs of it now is a queue it runs.
        if task.queue_name not in self.queues:
            self.validate_task(task)  # raises InvalidTask, naming the queue
        enqueued_at = timezone.now()
        # Made first: TaskResult normalises the arguments to JSON types (raising for others),
        # and they are stored as it holds them. Its id comes with the stored row.
        result = make_result(
            task,
            0,
            {"args": args, "kwargs": kwargs},
            compat.TaskResultStatus.READY,
            enqueued_at=enqueued_at,
            started_at=None,
            finished_at=None,
            last_attempted_at=None,
            errors=[],
            worker_ids=[],
        )
        payload = {
            "task": task.module_path,
            "args": result.args,
            "kwargs": result.kwargs,
            "priority": task.priority,
            "queue": task.queue_name,
            "backend": self.alias,
            "run_after": task.run_after.isoformat() if task.run_after else None,
            "enqueued_at": enqueued_at.isoformat(),
        }
        text = json.dumps(payload, allow_nan=False, ensure_ascii=False)
        channel = queues.channel(self.alias, task.queue_name, self.options)
        row_id = rows.store(
            channel.listen_safe_name(),
            text,
            task.run_after,
            wake=conf.notify_on_write(),
            using=self.using,
        )
        object.__setattr__(result, "id", str(row_id))
        compat.task_enqueued.send(type(self), task_result=result)
        return result

    async def aenqueue(self, task: Any, args: Any, kwargs: Any) -> Any:
        return await sync_to_async(self.enqueue, thread_sensitive=True)(task, args, kwargs)

    def get_result(self, result_id: Any) -> Any:
        return stored_result(self.alias, result_id, self.using)

    async def aget_result(self, result_id: Any) -> Any:
        return await sync_to_async(self.get_result, thread_sensitive=True)(result_id)

    def check(self, **kwargs: Any) -> list[checks.CheckMessage]:
        messages = [
            checks.Error(problem, obj=f"TASKS[{self.alias!r}]", id="pgpubsub.E018")
            for problem in self._problems
        ]
        if not self.queues:
            messages.append(
                checks.Error(
                    "QUEUES is empty: pgpubsub runs the queues it is told of",
                    hint="List the queue names, e.g. QUEUES = ['default', 'emails'].",
                    obj=f"TASKS[{self.alias!r}]",
                    id="pgpubsub.E019",
                )
            )
        return messages
