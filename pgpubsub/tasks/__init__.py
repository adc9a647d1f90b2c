"""Django's tasks framework on pgpubsub: ``TASKS = {"default": {"BACKEND":
"pgpubsub.tasks.DatabaseBackend"}}`` (see docs/tasks.md).

Importing this package needs Django 6.0's ``django.tasks`` (or the ``django-tasks`` backport
on Django 4.2 and 5.2).
"""

from __future__ import annotations

from typing import Any

from pgpubsub.retries import RetryStrategy


def retry(policy: Any = None, **options: Any) -> Any:
    """Give a task a retry policy of its own: ``@retry(max_attempts=5, retry_delay=2)`` (the
    arguments of :class:`~pgpubsub.retries.RetryStrategy`) or ``@retry(policy)``, above or
    below ``@task``."""
    from pgpubsub.tasks import queues

    if policy is None:
        policy = RetryStrategy(**options)
    elif options:
        raise TypeError("retry() takes a policy or RetryStrategy's arguments, not both")
    queues.task_policy(policy)

    def decorate(target: Any) -> Any:
        func = getattr(target, "func", target)  # a Task (frozen), or its function
        setattr(func, queues.TASK_POLICY_ATTRIBUTE, policy)
        return target

    return decorate


def __getattr__(name: str) -> Any:
    if name == "DatabaseBackend":  # imported when used: it needs django.tasks
        from pgpubsub.tasks.backend import DatabaseBackend

        return DatabaseBackend
    raise AttributeError(name)


__all__ = ["DatabaseBackend", "retry"]
