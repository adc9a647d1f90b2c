"""The one place that knows where Django's tasks framework comes from: ``django.tasks``
(Django 6.0 and later) or, on Django 4.2 and 5.2, the ``django-tasks`` backport package
(``django_tasks``), whose API is the same but for two exception names. Everything else in
:mod:`pgpubsub.tasks` imports these names from here."""

from __future__ import annotations

try:
    from django.tasks import (
        DEFAULT_TASK_QUEUE_NAME,
        Task,
        TaskContext,
        TaskResult,
        TaskResultStatus,
        task_backends,
    )
    from django.tasks.backends.base import BaseTaskBackend
    from django.tasks.base import TaskError
    from django.tasks.exceptions import InvalidTask, TaskResultDoesNotExist, TaskResultMismatch
    from django.tasks.signals import task_enqueued, task_finished, task_started
    from django.utils.json import normalize_json

    SOURCE = "django.tasks"
except ImportError:  # Django < 6.0: the backport, if installed
    try:
        from django_tasks import (
            DEFAULT_TASK_QUEUE_NAME,
            TaskContext,
            TaskResult,
            TaskResultStatus,
            task_backends,
        )

        # Registers the system check of every task backend (the backport registers it in its
        # own AppConfig, which a project need not install).
        from django_tasks import checks as _checks  # noqa: F401
        from django_tasks.backends.base import BaseTaskBackend
        from django_tasks.base import Task, TaskError
        from django_tasks.exceptions import InvalidTaskError as InvalidTask
        from django_tasks.exceptions import TaskResultDoesNotExist, TaskResultMismatch
        from django_tasks.signals import task_enqueued, task_finished, task_started
        from django_tasks.utils import normalize_json
    except ImportError as exc:
        raise ImportError(
            "pgpubsub.tasks needs Django's tasks framework: Django 6.0 or later, or on Django "
            "4.2 and 5.2 the backport (pip install 'pgpubsub-django[tasks]', i.e. django-tasks)."
        ) from exc

    SOURCE = "django_tasks"

__all__ = [
    "DEFAULT_TASK_QUEUE_NAME",
    "SOURCE",
    "BaseTaskBackend",
    "InvalidTask",
    "Task",
    "TaskContext",
    "TaskError",
    "TaskResult",
    "TaskResultDoesNotExist",
    "TaskResultMismatch",
    "TaskResultStatus",
    "normalize_json",
    "task_backends",
    "task_enqueued",
    "task_finished",
    "task_started",
]
