"""Django's tasks framework on ``pgpubsub.tasks.DatabaseBackend``, end to end: the public API
(``django.tasks``, or the ``django-tasks`` backport on Django 5.2) in the test process, the
tasks run by real ``manage.py listen`` processes and by the embedded Runtimes of real gunicorn
workers, against the test database.

Each test enqueues with ``Task.enqueue()`` / ``Task.using(...)`` and looks at what a user sees:
the ``TaskResult`` (``task.get_result(id)``, ``result.refresh()``) and the ``Effect`` rows the
tasks write (their ``key`` is unique: a task run twice would fail its second run).
"""

from __future__ import annotations

import datetime
import signal
import socket
from collections import Counter

import pytest
from django.db import transaction
from django.utils import timezone

from pgpubsub.store import CLAIM_LEASE
from tests.processes import ListenProcess, gunicorn_command, outputs, wait_for
from tests.testapp import e2e_tasks, tasks
from tests.testapp.models import Effect, Marker

try:
    from django.tasks import TaskResultStatus
    from django.tasks.exceptions import TaskResultDoesNotExist
except ImportError:  # Django < 6: the backport
    from django_tasks import TaskResultStatus
    from django_tasks.exceptions import TaskResultDoesNotExist

pytestmark = pytest.mark.django_db(transaction=True)

READY = TaskResultStatus.READY
RUNNING = TaskResultStatus.RUNNING
SUCCESSFUL = TaskResultStatus.SUCCESSFUL
FAILED = TaskResultStatus.FAILED

#: Seconds a task gets to finish once something can run it.
FINISH_TIMEOUT = 30.0
#: The latest a deferred task may start after its ``run_after``, in seconds (the aim is ~0.1).
DEFER_LATENESS = 1.0
#: Seconds a task whose process was killed may wait beyond the claim's lease to run again.
RESCUE_MARGIN = 10.0
#: What a listen process says (at ``--loglevel info``) once its watcher has made its first look.
WATCHING = "Watching default for new stored notifications"
#: Seconds a task committed just after a listen process started watching may take to run
#: (the watcher looks at least every PGPUBSUB_WATCH_INTERVAL, 1.5 s; sweeps come every 30 s).
LATE_COMMIT_TIMEOUT = 10.0
#: Processes of the gunicorn server, and worker threads of each one's Runtime.
GUNICORN_WORKERS = 2
EMBEDDED = {
    "PGPUBSUB_TEST_EMBEDDED": "1",
    "PGPUBSUB_TEST_WORKERS": "2",
    "PGPUBSUB_TEST_SHUTDOWN_TIMEOUT": "5",
}


def finished(result, timeout: float = FINISH_TIMEOUT, watch=()):
    """``result``, refreshed until its task has finished (succeeded, or failed for good)."""

    def done() -> bool:
        result.refresh()
        return result.status in (SUCCESSFUL, FAILED)

    wait_for(
        done,
        timeout,
        lambda: f"task {result.task.name} (result {result.id}) to finish; it is {result.status}",
        watch=watch,
    )
    return result


def watching(process) -> None:
    """Wait until ``process`` (started with ``--loglevel info``) says it watches for stored
    rows: its watcher has made its first look. Tests that start a process and then enqueue a
    single task wait for this first, so that they test what they name: a row stored while that
    first look runs is not announced and waits for a periodic sweep (what
    ``test_a_task_committed_while_the_listen_process_starts_runs_soon`` shows)."""
    wait_for(
        lambda: WATCHING in process.output(),
        30,
        f"{process.name} to say {WATCHING!r}",
        watch=[process],
    )


def worker_pid(worker_id: str) -> int:
    """The pid of a worker id (``host:pid:thread``)."""
    return int(worker_id.split(":", 2)[1])


def effect_keys(prefix: str) -> list[str]:
    return list(Effect.objects.filter(key__startswith=prefix).values_list("key", flat=True))


@pytest.fixture(scope="class")
def listener(django_db_setup, django_db_blocker):
    """One ``manage.py listen`` process for the tests of a class; stopped after the last."""
    with django_db_blocker.unblock():
        process = ListenProcess("--loglevel", "info")
        try:
            process.wait_listening()
            watching(process)
        except BaseException:
            process.stop()
            raise
    yield process
    with django_db_blocker.unblock():
        process.stop()


class TestOneListenProcess:
    """Tasks run by one ``manage.py listen`` process (the same for every test of the class)."""

    @pytest.mark.timeout(60)
    def test_a_task_runs_and_its_result_says_what_when_and_where(self, listener):
        result = tasks.record.enqueue("e2e-basic", value="v")
        assert result.status == READY
        assert result.enqueued_at is not None and result.started_at is None

        finished(result, watch=[listener])

        assert result.status == SUCCESSFUL, result.errors
        assert result.return_value["key"] == "e2e-basic"
        assert result.return_value["pid"] == listener.pid
        assert result.enqueued_at <= result.started_at <= result.finished_at
        assert result.attempts == 1
        host, pid, thread = result.worker_ids[0].split(":", 2)
        assert (host, int(pid), thread) == (
            socket.gethostname(),
            listener.pid,
            result.return_value["thread"],
        )
        effect = Effect.objects.get(key="e2e-basic")
        assert (effect.value, effect.pid) == ("v", listener.pid)
        # A TaskResult fetched afresh says the same.
        fetched = tasks.record.get_result(result.id)
        assert fetched.status == SUCCESSFUL
        assert fetched.return_value == result.return_value
        assert (list(fetched.args), dict(fetched.kwargs)) == (["e2e-basic"], {"value": "v"})
        assert fetched.worker_ids == result.worker_ids
        assert fetched.enqueued_at == result.enqueued_at
        assert fetched.started_at == result.started_at
        assert fetched.finished_at == result.finished_at

    @pytest.mark.timeout(60)
    def test_a_deferred_task_starts_at_its_run_after_not_before(self, listener):
        run_after = timezone.now() + datetime.timedelta(seconds=2)
        result = tasks.record.using(run_after=run_after).enqueue("e2e-deferred")
        assert result.task.run_after == run_after

        finished(result, watch=[listener])

        assert result.status == SUCCESSFUL, result.errors
        assert result.started_at >= run_after
        lateness = (result.started_at - run_after).total_seconds()
        assert lateness < DEFER_LATENESS, f"started {lateness:.3f}s after its run_after"
        assert Effect.objects.filter(key="e2e-deferred").count() == 1

    @pytest.mark.timeout(60)
    def test_failed_attempts_are_retried_by_the_policy_then_fail_for_good(self, listener):
        flaky = tasks.flaky.enqueue("e2e-flaky", 2)
        doomed = tasks.always_fails.enqueue("e2e-doomed")
        once = tasks.fails_once_for_all.enqueue("e2e-once")
        for result in (flaky, doomed, once):
            finished(result, watch=[listener])

        # Failed twice, then succeeded: each failure is in its errors.
        assert flaky.status == SUCCESSFUL, flaky.errors
        assert flaky.return_value == 3
        assert flaky.attempts == 3
        assert [error.exception_class_path for error in flaky.errors] == ["builtins.ValueError"] * 2
        for attempt, error in enumerate(flaky.errors, 1):
            assert f"ValueError: attempt {attempt} of e2e-flaky fails" in error.traceback
        assert Effect.objects.get(key="e2e-flaky").value == "3"
        assert {worker_pid(worker) for worker in flaky.worker_ids} == {listener.pid}

        # The test settings' RETRY: 3 attempts; each one's write was rolled back.
        assert doomed.status == FAILED
        assert doomed.attempts == 3
        assert len(doomed.errors) == 3
        for error in doomed.errors:
            assert error.exception_class_path == "builtins.RuntimeError"
            assert "RuntimeError: e2e-doomed always fails" in error.traceback
        assert doomed.finished_at is not None
        with pytest.raises(ValueError):
            doomed.return_value  # noqa: B018
        assert not Effect.objects.filter(key="e2e-doomed").exists()

        # The task's own policy (@retry(max_attempts=1)): no second attempt.
        assert once.status == FAILED
        assert once.attempts == 1
        assert [error.exception_class_path for error in once.errors] == ["builtins.RuntimeError"]
        assert "e2e-once is not tried again" in once.errors[0].traceback

    @pytest.mark.timeout(60)
    def test_an_async_task_runs_on_the_runtimes_event_loop(self, listener):
        result = tasks.async_record.enqueue("e2e-async")

        finished(result, watch=[listener])

        assert result.status == SUCCESSFUL, result.errors
        assert result.return_value == {"key": "e2e-async", "thread": "pgpubsub-event-loop"}
        effect = Effect.objects.get(key="e2e-async")
        assert (effect.value, effect.pid) == ("async", listener.pid)
        assert result.attempts == 1 and worker_pid(result.worker_ids[0]) == listener.pid

    @pytest.mark.timeout(60)
    def test_a_task_enqueued_in_a_rolled_back_transaction_never_runs(self, listener):
        class RolledBack(Exception):
            pass

        with pytest.raises(RolledBack):
            with transaction.atomic():
                lost = tasks.record.enqueue("e2e-rolled-back")
                raise RolledBack
        with transaction.atomic():
            kept = tasks.record.enqueue("e2e-committed")
        assert int(kept.id) > int(lost.id)

        # The committed one, enqueued after, runs; by then the rolled-back one is nowhere.
        finished(kept, watch=[listener])
        assert kept.status == SUCCESSFUL, kept.errors
        assert Effect.objects.filter(key="e2e-committed").count() == 1
        with pytest.raises(TaskResultDoesNotExist):
            tasks.record.get_result(lost.id)
        assert not Effect.objects.filter(key="e2e-rolled-back").exists()


@pytest.mark.timeout(60)
def test_a_task_committed_while_the_listen_process_starts_runs_soon(processes):
    # The transaction that enqueues the task is still open when the only listen process
    # starts watching an empty table; once it commits, the task runs without waiting for a
    # periodic sweep (PGPUBSUB_SWEEP_INTERVAL, 30 s).
    with transaction.atomic():
        result = tasks.record.enqueue("e2e-late-commit")
        process = processes.start("--loglevel", "info", ready=None)
        watching(process)
    finished(result, LATE_COMMIT_TIMEOUT, watch=[process])
    assert result.status == SUCCESSFUL, result.errors
    assert worker_pid(result.worker_ids[0]) == process.pid


@pytest.mark.timeout(60)
def test_the_highest_priority_task_runs_first(processes):
    # Stored while nothing runs: the listen process finds them all waiting.
    low = [tasks.record.using(priority=-10).enqueue(f"e2e-low-{n}") for n in range(30)]
    high = tasks.record.using(priority=50).enqueue("e2e-high")

    process = processes.start("--threads", "1")
    for result in [*low, high]:
        finished(result, watch=[process])

    assert {result.status for result in [*low, high]} == {SUCCESSFUL}
    order = sorted([*low, high], key=lambda result: result.started_at)
    assert order[0].id == high.id, (
        f"the priority 50 task started {order.index(high) + 1}th of 31: "
        f"{[(r.args[0], r.started_at.isoformat()) for r in order[:12]]}"
    )


@pytest.mark.timeout(60)
def test_listen_queues_runs_only_those_queues(processes):
    process = processes.start("--queues", "emails")
    with transaction.atomic():
        other = tasks.record.enqueue("e2e-default-queue")
        welcome = tasks.send_welcome.enqueue("ann@example.com")

    finished(welcome, watch=[process])
    assert welcome.status == SUCCESSFUL, welcome.errors
    assert welcome.return_value == "sent to ann@example.com"
    assert worker_pid(welcome.worker_ids[0]) == process.pid
    # Another emails task, enqueued later, runs too; the default queue's still waits.
    later = finished(tasks.send_welcome.enqueue("bob@example.com"), watch=[process])
    assert later.status == SUCCESSFUL, later.errors
    other.refresh()
    assert other.status == READY
    assert other.worker_ids == [] and other.started_at is None
    assert not Effect.objects.filter(key="e2e-default-queue").exists()
    assert set(effect_keys("welcome:")) == {"welcome:ann@example.com", "welcome:bob@example.com"}


@pytest.mark.timeout(60)
def test_listen_with_an_unknown_queue_exits_with_an_error(processes):
    process = processes.start("--queues", "nosuch", ready=None)
    code = process.wait(30)
    output = process.output()
    assert code != 0, output
    assert "nosuch" in output, output
    assert "Traceback" not in output, output


@pytest.mark.timeout(90)
def test_gunicorn_workers_embedded_runtimes_run_each_task_once(processes):
    server = processes.start_command(
        gunicorn_command(GUNICORN_WORKERS), ready=GUNICORN_WORKERS, env=EMBEDDED
    )
    workers = wait_for(
        lambda: (found := server.children()) and len(found) == GUNICORN_WORKERS and found,
        30,
        lambda: f"{GUNICORN_WORKERS} gunicorn workers, have {server.children()}",
        watch=[server],
    )

    count = 40
    results = [tasks.record.enqueue(f"e2e-web-{n}") for n in range(count)]
    for result in results:
        finished(result, watch=[server])

    assert {result.status for result in results} == {SUCCESSFUL}
    assert {result.attempts for result in results} == {1}
    assert sorted(effect_keys("e2e-web-")) == sorted(f"e2e-web-{n}" for n in range(count))
    ran_in = {worker_pid(result.worker_ids[0]) for result in results}
    assert ran_in <= workers, (ran_in, workers, server.pid)
    assert set(Effect.objects.values_list("pid", flat=True)) <= workers
    assert "Traceback" not in server.output(), outputs([server])


@pytest.mark.timeout(120)
def test_two_listen_processes_run_each_task_exactly_once(processes):
    both = [processes.start(), processes.start()]
    count = 200
    results = [tasks.record.enqueue(f"e2e-many-{n}") for n in range(count)]

    wait_for(
        lambda: len(effect_keys("e2e-many-")) >= count,
        60,
        lambda: f"{count} effects, have {len(effect_keys('e2e-many-'))}",
        watch=both,
    )
    for result in results:
        finished(result, watch=both)

    assert Counter(result.status for result in results) == {SUCCESSFUL: count}
    assert Counter(result.attempts for result in results) == {1: count}
    keys = effect_keys("e2e-many-")
    assert len(keys) == count and set(keys) == {f"e2e-many-{n}" for n in range(count)}
    ran_in = Counter(worker_pid(result.worker_ids[0]) for result in results)
    assert set(ran_in) <= {process.pid for process in both}, ran_in
    for process in both:
        assert "Traceback" not in process.output(), outputs([process])


@pytest.mark.timeout(90)
def test_a_task_whose_process_was_killed_runs_again_elsewhere_once(processes):
    doomed = processes.start("--loglevel", "info")
    watching(doomed)
    result = e2e_tasks.stalls_first_run.enqueue("e2e-killed", 60)

    # Its first attempt has started (and stalls): kill the process running it.
    wait_for(
        lambda: Marker.objects.filter(key="e2e-killed:started").exists(),
        FINISH_TIMEOUT,
        "the task's first attempt to start",
        watch=[doomed],
    )
    result.refresh()
    assert result.status == RUNNING
    killed_at = timezone.now()
    doomed.send(signal.SIGKILL)
    doomed.wait(10)
    doomed.wait_no_backends(10)
    assert not Effect.objects.filter(key="e2e-killed").exists()

    # Its claim keeps the row from others for CLAIM_LEASE seconds; then the other process,
    # which found it waiting, runs it.
    rescuer = processes.start("--loglevel", "debug")
    finished(result, CLAIM_LEASE + RESCUE_MARGIN, watch=[rescuer])

    assert result.status == SUCCESSFUL, result.errors
    effect = Effect.objects.get(key="e2e-killed")
    assert effect.pid == rescuer.pid
    assert result.return_value == {"pid": rescuer.pid, "attempt": 2}
    # The attempt that died counts, and says where it ran.
    assert result.attempts == 2, result.worker_ids
    assert [error.exception_class_path for error in result.errors] == [
        "pgpubsub.failures.ListenerProcessDied"
    ]
    assert f":{doomed.pid}:" in result.errors[0].traceback, result.errors[0].traceback
    assert [worker_pid(worker) for worker in result.worker_ids] == [doomed.pid, rescuer.pid], (
        f"worker_ids {result.worker_ids}; the killed process was {doomed.pid}"
    )
    # When the attempt that died started is not known (its process wrote nothing): started_at
    # is the rescuer's.
    assert result.started_at >= killed_at, (result.started_at, killed_at)
