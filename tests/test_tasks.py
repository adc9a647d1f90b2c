"""pgpubsub.tasks.DatabaseBackend through Django's tasks API, run by a Runtime in this process
(tests/test_tasks_end_to_end.py runs them in listen processes and gunicorn workers)."""

from __future__ import annotations

import datetime
import threading

import pytest
from asgiref.sync import async_to_sync
from django.db import connection, transaction
from django.utils import timezone

from pgpubsub.channel import registry
from pgpubsub.models import Notification, TaskResultRecord
from pgpubsub.tasks import DatabaseBackend, compat, queues, rows
from tests.processes import wait_for
from tests.testapp import async_listeners, tasks
from tests.testapp.models import Effect

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(60)]

Status = compat.TaskResultStatus


def finished(task, result_id: str, timeout: float = 20):
    """The result of ``result_id`` once it finished (SUCCESSFUL or FAILED)."""
    return wait_for(
        lambda: (found := task.get_result(result_id)).is_finished and found,
        timeout,
        lambda: f"task {result_id} to finish: {task.get_result(result_id)}",
    )


def effects() -> dict[str, str]:
    return dict(Effect.objects.filter(channel="task").values_list("key", "value"))


def test_backend_is_configured_with_every_feature():
    backend = compat.task_backends["default"]
    assert isinstance(backend, DatabaseBackend)
    assert backend.supports_defer and backend.supports_async_task
    assert backend.supports_get_result and backend.supports_priority
    assert backend.queues == {"default", "emails", "reports"}
    assert backend.check() == []


def test_enqueue_stores_a_ready_task_that_a_runtime_runs_once(runtimes):
    result = tasks.record.enqueue("one", value="v")
    assert result.status == Status.READY and result.enqueued_at is not None
    assert result.args == ["one"] and result.kwargs == {"value": "v"}
    assert tasks.record.get_result(result.id).status == Status.READY
    runtimes(workers=2)
    done = finished(tasks.record, result.id)
    assert done.status == Status.SUCCESSFUL
    assert done.return_value["key"] == "one"
    assert done.enqueued_at <= done.started_at <= done.last_attempted_at <= done.finished_at
    assert done.attempts == 1 and len(done.worker_ids) == 1 and done.errors == []
    assert done.worker_ids[0].split(":")[-1] == done.return_value["thread"]
    assert effects() == {"one": "v"}
    assert not Notification.objects.exists()  # acknowledged with the result
    result.refresh()  # the object enqueue() returned catches up
    assert result.status == Status.SUCCESSFUL and result.return_value == done.return_value


def test_a_rolled_back_enqueue_never_runs(runtimes):
    with pytest.raises(RuntimeError), transaction.atomic():
        lost = tasks.record.enqueue("rolled-back")
        raise RuntimeError("the request fails")
    with transaction.atomic():
        kept = tasks.record.enqueue("committed")
    runtimes(workers=1)
    finished(tasks.record, kept.id)
    with pytest.raises(compat.TaskResultDoesNotExist):
        tasks.record.get_result(lost.id)
    assert effects() == {"committed": ""}


def test_bad_input_is_refused_at_enqueue_and_nothing_is_stored():
    with pytest.raises(compat.InvalidTask, match="nosuch"):
        tasks.record.using(queue_name="nosuch")
    with pytest.raises(compat.InvalidTask, match="priority"):
        tasks.record.using(priority=101)
    with pytest.raises(compat.InvalidTask, match="aware"):
        tasks.record.using(run_after=datetime.datetime(2030, 1, 1))
    with pytest.raises(TypeError):
        tasks.record.enqueue(object())
    with pytest.raises(ValueError):
        tasks.record.enqueue(float("nan"))
    assert not Notification.objects.exists()
    for unknown in ["nope", "0", "-3", "", "99999999999999999999999"]:
        with pytest.raises(compat.TaskResultDoesNotExist):
            tasks.record.get_result(unknown)


def test_results_of_another_task_are_refused():
    result = tasks.record.enqueue("x")
    with pytest.raises(compat.TaskResultMismatch):
        tasks.noop.get_result(result.id)


def test_async_enqueue_and_results(runtimes):
    result = async_to_sync(tasks.record.aenqueue)("async-enqueued")
    runtimes(workers=1)
    finished(tasks.record, result.id)
    fetched = async_to_sync(tasks.record.aget_result)(result.id)
    assert fetched.status == Status.SUCCESSFUL
    async_to_sync(result.arefresh)()
    assert result.status == Status.SUCCESSFUL


def test_retries_keep_every_error_and_worker_then_succeed(runtimes):
    result = tasks.flaky.enqueue("flaky", 2)
    runtimes(workers=1)
    done = finished(tasks.flaky, result.id)
    assert done.status == Status.SUCCESSFUL and done.return_value == 3
    assert done.attempts == 3 and len(done.errors) == 2
    assert {error.exception_class_path for error in done.errors} == {"builtins.ValueError"}
    assert done.errors[0].exception_class is ValueError
    assert "attempt 1 of flaky fails" in done.errors[0].traceback
    assert effects() == {"flaky": "3"}


def test_a_task_that_keeps_failing_is_failed_with_its_errors_and_no_effect(runtimes):
    failing = tasks.always_fails.enqueue("doomed")
    once = tasks.fails_once_for_all.enqueue("once")  # its own policy: one attempt
    bad_value = tasks.returns_object.enqueue()
    runtimes(workers=2)
    done = finished(tasks.always_fails, failing.id)
    assert done.status == Status.FAILED and done.attempts == 3 and len(done.errors) == 3
    assert "doomed always fails" in done.errors[-1].traceback
    with pytest.raises(ValueError):
        done.return_value  # noqa: B018
    assert done.finished_at is not None
    assert finished(tasks.fails_once_for_all, once.id).attempts == 1
    bad = finished(tasks.returns_object, bad_value.id)
    assert bad.status == Status.FAILED and bad.attempts == 1
    assert bad.errors[0].exception_class_path.endswith("BadReturnValue")
    assert effects() == {}  # each attempt's writes were rolled back
    # The failed tasks stay stored (an operator may retry them), marked failed.
    assert Notification.objects.failed().count() == 3


def test_a_task_that_cannot_be_imported_or_read_fails_with_the_error_stored(runtimes):
    channel = queues.channel("default", "default").listen_safe_name()
    with connection.cursor() as cursor:
        for payload in [
            '{"task": "tests.testapp.tasks.gone", "args": [], "kwargs": {}, "priority": 0}',
            '{"task": "tests.testapp.tasks._effect", "args": [], "kwargs": {}, "priority": 0}',
            '{"task": "tests.testapp.tasks.record", "args": {"a": 1}, "priority": 0}',
        ]:
            cursor.execute(
                "INSERT INTO pgpubsub_notification (channel, payload) VALUES (%s, %s::jsonb)",
                [channel, payload],
            )
    runtimes(workers=1)
    wait_for(lambda: Notification.objects.failed().count() == 3, 20, "3 failed tasks")
    errors = sorted(Notification.objects.values_list("last_error", flat=True))
    assert any("cannot be imported" in error for error in errors)
    assert any("cannot be read" in error for error in errors)
    records = {record.task_path: record for record in TaskResultRecord.objects.all()}
    assert {record.status for record in records.values()} == {"FAILED"}
    # A task that cannot be imported may be one of a deploy in progress: retried, then failed.
    assert len(records["tests.testapp.tasks.gone"].errors) == 3
    assert len(records["tests.testapp.tasks._effect"].errors) == 3  # not a task
    assert "is not a task" in records["tests.testapp.tasks._effect"].errors[0]["traceback"]
    # Arguments that cannot be read fail at once: another attempt would read the same bytes.
    assert len(records["tests.testapp.tasks.record"].errors) == 1


def test_context_gives_the_attempt_and_signals_are_sent(runtimes):
    seen = []
    lock = threading.Lock()

    def receiver(signal_name):
        def receive(sender, task_result, **kwargs):
            with lock:
                seen.append((signal_name, task_result.id, task_result.status))

        return receive

    receivers = {
        name: receiver(name) for name in ["task_enqueued", "task_started", "task_finished"]
    }
    for name, function in receivers.items():
        getattr(compat, name).connect(function)
    try:
        result = tasks.context_info.enqueue()
        runtimes(workers=1)
        done = finished(tasks.context_info, result.id)
        wait_for(lambda: len(seen) == 3, 10, lambda: str(seen))
    finally:
        for name, function in receivers.items():
            getattr(compat, name).disconnect(function)
    assert done.return_value == {"attempt": 1, "id": result.id, "workers": done.worker_ids}
    assert seen == [
        ("task_enqueued", result.id, Status.READY),
        ("task_started", result.id, Status.RUNNING),
        ("task_finished", result.id, Status.SUCCESSFUL),
    ]


def test_run_after_is_honoured_without_polling(runtimes):
    runtimes(workers=1)
    run_after = timezone.now() + datetime.timedelta(seconds=1.5)
    result = tasks.record.using(run_after=run_after).enqueue("later")
    assert tasks.record.get_result(result.id).status == Status.READY
    done = finished(tasks.record, result.id, timeout=20)
    assert done.started_at >= run_after
    # Woken by the Runtime's timer, not by the periodic sweep (30 s by default).
    assert done.started_at - run_after < datetime.timedelta(seconds=1)
    assert done.task.run_after == run_after


def test_ready_tasks_run_highest_priority_first(runtimes):
    low = [tasks.record.using(priority=-10).enqueue(f"low-{n}") for n in range(30)]
    high = tasks.record.using(priority=50).enqueue("high")
    middle = tasks.record.enqueue("middle")
    runtimes(workers=1)
    results = [finished(tasks.record, result.id) for result in [high, middle, *low]]
    started = [result.started_at for result in results]
    assert started[0] < started[1] < min(started[2:])
    assert results[0].task.priority == 50
    # Same priority: oldest first.
    assert started[2:] == sorted(started[2:])


def test_results_are_pruned_by_the_runtime_after_their_time(runtimes, monkeypatch):
    old = tasks.record.enqueue("old")
    runtime = runtimes(workers=1)
    finished(tasks.record, old.id)
    queue = queues.channel("default", "default")
    monkeypatch.setattr(queue, "result_ttl", 0.2)
    monkeypatch.setattr(queues, "_last_prune", {})
    wait_for(
        lambda: (
            timezone.now() - tasks.record.get_result(old.id).finished_at
            > datetime.timedelta(seconds=0.3)
        ),
        5,
        "the result to age",
    )
    tasks.record.enqueue("trigger")  # its sweep prunes
    wait_for(lambda: not TaskResultRecord.objects.filter(pk=old.id).exists(), 20, "a prune")
    with pytest.raises(compat.TaskResultDoesNotExist):
        tasks.record.get_result(old.id)
    assert runtime.status()["running"]


def test_rows_prune_keeps_tasks_that_wait():
    waiting = tasks.record.enqueue("waiting")
    assert rows.prune([queues.channel("default", "default").listen_safe_name()], 0, "default") == 0
    assert tasks.record.get_result(waiting.id).status == Status.READY


def test_async_task_runs_on_the_runtime_loop(runtimes):
    result = tasks.async_record.enqueue("coroutine")
    runtimes(workers=1)
    done = finished(tasks.async_record, result.id)
    assert done.status == Status.SUCCESSFUL
    assert done.return_value["thread"] == "pgpubsub-event-loop"
    assert effects() == {"coroutine": "async"}


def test_task_queues_are_channels_of_the_runtime(runtimes):
    runtime = runtimes(workers=1)
    names = set(runtime.status()["channels"])
    assert {"pgpubsub.tasks.default.default", "pgpubsub.tasks.default.emails"} <= names


@pytest.fixture
def async_listeners_registered():
    for channel, listener in async_listeners.LISTENERS:
        channel.register(listener)
    yield
    for channel, _ in async_listeners.LISTENERS:
        registry.pop(channel, None)


def test_async_listeners_run_on_the_loop_beside_sync_ones(runtimes, async_listeners_registered):
    import pgpubsub

    runtimes(channels=[async_listeners.AsyncJob, async_listeners.AsyncNews], workers=2)
    pgpubsub.notify(async_listeners.AsyncJob, key="job")
    pgpubsub.notify(async_listeners.AsyncJob, key="bad", fail=True)
    pgpubsub.notify(async_listeners.AsyncNews, key="news")
    wait_for(lambda: Effect.objects.filter(channel="AsyncNews").count() == 2, 20, "both listeners")
    wait_for(lambda: Effect.objects.filter(key="job").exists(), 20, "the async job")
    values = dict(Effect.objects.values_list("key", "value"))
    assert values["async:news"] == "pgpubsub-event-loop"
    assert values["sync:news"].startswith("pgpubsub-worker-")
    assert values["job"] == "pgpubsub-event-loop"
    # The failing one raised after its write: the message is retried (its row stays).
    wait_for(lambda: Notification.objects.filter(attempts__gte=1).exists(), 20, "a failed attempt")
    assert Notification.objects.get().payload["kwargs"]["key"] == "bad"


def test_waiting_and_failed_tasks_show_in_status_and_results_in_the_admin(runtimes, admin_client):
    from io import StringIO

    from django.core.management import call_command

    waiting = tasks.send_welcome.enqueue("ann@example.com")
    out = StringIO()
    call_command("pgpubsub", "status", stdout=out)
    assert "pgpubsub.tasks.default.emails" in out.getvalue()
    runtimes(workers=1)
    done = finished(tasks.send_welcome, waiting.id)
    failed = finished(tasks.always_fails, tasks.always_fails.enqueue("admin").id)
    listing = admin_client.get("/admin/pgpubsub/taskresultrecord/").content.decode()
    assert "tests.testapp.tasks.send_welcome" in listing and "SUCCESSFUL" in listing
    detail = admin_client.get(f"/admin/pgpubsub/taskresultrecord/{done.id}/change/")
    assert detail.status_code == 200 and "sent to ann@example.com" in detail.content.decode()
    failed_page = admin_client.get(f"/admin/pgpubsub/taskresultrecord/{failed.id}/change/")
    assert "admin always fails" in failed_page.content.decode()
    # The failed task waits among the stored notifications, where it can be retried.
    stored = admin_client.get("/admin/pgpubsub/notification/").content.decode()
    assert "pgpubsub.tasks.default.default" in stored


def test_task_queues_can_be_named_as_channels():
    from pgpubsub.channel import locate_channel

    queue = queues.channel("default", "emails")
    assert locate_channel("pgpubsub.tasks.default.emails") is queue
    assert locate_channel(queue.listen_safe_name()) is queue


def test_system_checks_refuse_bad_task_settings(settings):
    from django.core.checks import run_checks

    settings.TASKS = {
        "bad": {
            "BACKEND": "pgpubsub.tasks.DatabaseBackend",
            "QUEUES": [],
            "OPTIONS": {"RESULT_TTL": "soon"},
        }
    }
    settings.PGPUBSUB_ASYNC_CONCURRENCY = 0
    found = {message.id for message in run_checks()}
    assert {"pgpubsub.E018", "pgpubsub.E019", "pgpubsub.E011"} <= found
