"""Tasks of the test project (Django's tasks framework on pgpubsub.tasks.DatabaseBackend).

Each task that succeeds writes an ``Effect`` row (``key`` is unique: a task run twice would
fail its second run), so that tests see what ran, where and how often."""

import os
import threading
import time

from pgpubsub.tasks import retry
from tests.testapp.models import Effect

try:
    from django.tasks import task
except ImportError:  # Django < 6: the backport
    from django_tasks import task


def _effect(key: str, value: str = "") -> None:
    Effect.objects.create(key=key, channel="task", value=value, pid=os.getpid())


@task
def record(key: str, value: str = "") -> dict:
    """Write an effect; return where it ran."""
    _effect(key, value)
    return {"key": key, "pid": os.getpid(), "thread": threading.current_thread().name}


@task
def noop() -> None:
    """Nothing (the benchmark's task)."""


@task(queue_name="emails")
def send_welcome(address: str) -> str:
    _effect(f"welcome:{address}", "emails")
    return f"sent to {address}"


@task(takes_context=True)
def flaky(context, key: str, failures: int) -> int:
    """Fail the first ``failures`` attempts, then write an effect; return the attempt."""
    if context.attempt <= failures:
        raise ValueError(f"attempt {context.attempt} of {key} fails")
    _effect(key, str(context.attempt))
    return context.attempt


@task
def always_fails(key: str) -> None:
    _effect(key)  # rolled back with the attempt
    raise RuntimeError(f"{key} always fails")


@retry(max_attempts=1)
@task
def fails_once_for_all(key: str) -> None:
    raise RuntimeError(f"{key} is not tried again")


@task
def returns_object() -> object:
    return object()


@task
def slow(key: str, seconds: float) -> str:
    time.sleep(seconds)
    _effect(key)
    return key


@task
async def async_record(key: str) -> dict:
    """An async task: its ORM work through Django's async API."""
    await Effect.objects.acreate(key=key, channel="task", value="async", pid=os.getpid())
    return {"key": key, "thread": threading.current_thread().name}


@task(takes_context=True)
def context_info(context) -> dict:
    result = context.task_result
    return {"attempt": context.attempt, "id": result.id, "workers": result.worker_ids}
