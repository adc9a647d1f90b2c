"""Tasks of tests/test_tasks_end_to_end.py beyond those of tests/testapp/tasks.py."""

import os
import time

from tests.testapp.models import Effect, Marker

try:
    from django.tasks import task
except ImportError:  # Django < 6: the backport
    from django_tasks import task


@task(takes_context=True)
def stalls_first_run(context, key: str, seconds: float) -> dict:
    """The first attempt to start says so (a ``Marker`` written through the ``side`` alias,
    which commits whatever becomes of the attempt) and then stalls for ``seconds``; any later
    attempt runs at once. Writes an effect; returns where it ran and which attempt it was."""
    _, first = Marker.objects.using("side").get_or_create(key=f"{key}:started")
    if first:
        time.sleep(seconds)
    Effect.objects.create(key=key, channel="task", value=str(context.attempt), pid=os.getpid())
    return {"pid": os.getpid(), "attempt": context.attempt}
