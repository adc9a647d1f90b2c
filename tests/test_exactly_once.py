"""Lockable notifications are processed exactly once, however many listeners compete for them:
real ``listen`` processes, and threads of one process each on its own connection."""

import logging
import threading
from collections import Counter

import pytest
from django.db import connection, transaction
from django.db.models import Count

import pgpubsub
from pgpubsub.listen import listen_to_channels, process_notifications
from pgpubsub.models import Notification
from tests.processes import outputs, wait_for
from tests.testapp import channels
from tests.testapp.models import Author, Effect, Post

pytestmark = pytest.mark.django_db(transaction=True)


def send_jobs(prefix: str, count: int, per_transaction: int) -> set[str]:
    keys = [f"{prefix}{number}" for number in range(count)]
    for start in range(0, count, per_transaction):
        with transaction.atomic():
            for key in keys[start : start + per_transaction]:
                pgpubsub.notify(channels.Job, key=key, text=key)
    return set(keys)


def state() -> str:
    by_channel = dict(Effect.objects.values_list("channel").annotate(n=Count("id")))
    return f"effects per channel {by_channel}, {Notification.objects.count()} stored rows"


@pytest.mark.timeout(120)
def test_two_listen_processes_share_the_work(processes):
    first = processes.start()
    second = processes.start()
    listeners = [first, second]

    job_keys = set()
    authors = []
    for batch in range(5):
        job_keys |= send_jobs(f"job-{batch}-", 100, per_transaction=100)
        with transaction.atomic():
            authors += [Author.objects.create(name=f"author {batch}.{n}") for n in range(20)]

    wait_for(
        lambda: Effect.objects.count() == 600 and not Notification.objects.exists(),
        90,
        lambda: f"600 effects and no stored rows; {state()}",
        watch=listeners,
    )
    logs = outputs(listeners)
    jobs = Effect.objects.filter(channel="Job")
    assert set(jobs.values_list("key", flat=True)) == job_keys, logs
    assert jobs.count() == 500, logs
    assert set(Effect.objects.filter(channel="AuthorTrigger").values_list("key", flat=True)) == {
        f"author-{author.pk}" for author in authors
    }, logs
    posts = Counter(Post.objects.values_list("author_id", flat=True))
    assert posts == Counter(author.pk for author in authors), logs

    split = Counter(Effect.objects.values_list("pid", flat=True))
    print(f"work split between listener pids {first.pid} and {second.pid}: {dict(split)}")
    assert set(split) <= {first.pid, second.pid}, (split, logs)
    for listener in listeners:
        assert listener.alive, logs
        assert "Traceback" not in listener.output(), logs


@pytest.mark.timeout(90)
def test_threads_with_their_own_connections(notify_on_write, caplog):
    """django-pgpubsub 1.x's synchronous API (``listen_to_channels()`` and
    ``process_notifications()``) on two threads, each with its own connection, competing for
    jobs written by the test thread's session. No Runtime runs, so no watcher wakes them: the
    writes reach them by the NOTIFY each stored row sends with ``PGPUBSUB_NOTIFY_ON_WRITE =
    True``, the setting such a deployment needs (docs/migrating.md)."""
    stop = threading.Event()
    ready = threading.Barrier(3, timeout=30)
    errors: list[BaseException] = []

    def listen_until_stopped() -> None:
        wrapper = None
        try:
            wrapper = listen_to_channels()
            ready.wait()
            while not stop.is_set():
                process_notifications(wrapper)
                stop.wait(0.02)
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)
            ready.abort()
        finally:
            if wrapper is not None:
                wrapper.stop()
            connection.close()

    threads = [
        threading.Thread(target=listen_until_stopped, name=f"listener-{n}") for n in range(2)
    ]
    for thread in threads:
        thread.start()
    try:
        try:
            ready.wait()
        except threading.BrokenBarrierError:
            pytest.fail(f"a listener thread failed to start: {errors!r}")
        keys = send_jobs("threaded-", 300, per_transaction=60)
        wait_for(
            lambda: errors or (Effect.objects.count() == 300 and not Notification.objects.exists()),
            60,
            lambda: f"300 effects and no stored rows; {state()}",
        )
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert not [thread.name for thread in threads if thread.is_alive()]
    assert not errors, errors
    # A second run of a job fails on the unique key and is rolled back, leaving the same
    # effects behind: only the log tells.
    failures = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not failures, failures
    assert set(Effect.objects.values_list("key", flat=True)) == keys
    assert Effect.objects.count() == 300
