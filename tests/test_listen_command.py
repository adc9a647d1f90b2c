"""Acceptance tests of ``manage.py listen``: real processes, signals, the test database."""

import os
import signal
import time
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django.db import connection, transaction

import pgpubsub
from pgpubsub.models import Notification
from tests.processes import (
    ListenProcess,
    backends,
    no_watcher,
    outputs,
    pid_alive,
    wait_for,
)
from tests.testapp import channels
from tests.testapp.models import Author, Effect, Post

pytestmark = pytest.mark.django_db(transaction=True)


def stored(channel=None) -> int:
    rows = Notification.objects.all()
    if channel is not None:
        rows = rows.filter(channel=channel.listen_safe_name())
    return rows.count()


def effects(prefix: str) -> int:
    return Effect.objects.filter(key__startswith=prefix).count()


def send_jobs(prefix: str, count: int, per_transaction: int = 50) -> None:
    for start in range(0, count, per_transaction):
        with transaction.atomic():
            for number in range(start, min(count, start + per_transaction)):
                pgpubsub.notify(channels.Job, key=f"{prefix}{number}", text="work")


def wait_processed(prefix: str, count: int, watch, timeout: float = 30.0) -> None:
    """Wait until ``count`` effects with keys starting with ``prefix`` exist and nothing is stored."""
    wait_for(
        lambda: effects(prefix) == count and stored() == 0,
        timeout,
        lambda: (
            f"{count} {prefix!r} effects and no stored rows; have {effects(prefix)} effects "
            f"and {stored()} stored rows"
        ),
        watch=watch,
    )


def assert_no_traceback(*processes: ListenProcess) -> None:
    for process in processes:
        assert "Traceback" not in process.output(), outputs([process])


#: Sweeps so rare that none is due while a test runs.
NO_SWEEPS = {"PGPUBSUB_TEST_SWEEP_INTERVAL": "300"}


@pytest.mark.timeout(60)
def test_end_to_end_then_sigterm(processes):
    listener = processes.start()

    for number in range(20):
        pgpubsub.notify(channels.Job, key=f"job-{number}", text=f"text {number}")
    authors = [Author.objects.create(name=f"author {number}") for number in range(5)]
    pgpubsub.notify(channels.Message, key="message", text="hello")

    wait_for(
        lambda: effects("job-") == 20 and effects("author-") == 5 and stored() == 0,
        30,
        lambda: (
            f"20 job and 5 author effects, have {effects('job-')} and "
            f"{effects('author-')} ({stored()} stored)"
        ),
        watch=[listener],
    )
    assert set(Effect.objects.filter(channel="AuthorTrigger").values_list("key", flat=True)) == {
        f"author-{author.pk}" for author in authors
    }
    assert Post.objects.filter(author__in=authors).count() == 5
    assert set(Effect.objects.values_list("pid", flat=True)) == {listener.pid}
    assert_no_traceback(listener)

    listener.send(signal.SIGTERM)
    assert listener.wait(10) == 0, outputs([listener])
    listener.wait_no_backends(10)


@pytest.mark.timeout(60)
def test_loglevel_info_logs_the_channels(processes):
    listener = processes.start("--loglevel", "info")
    # Logged just after the LISTEN statements that start() waited for.
    wait_for(
        lambda: "Listening on" in listener.output(), 30, "the 'Listening on' line", watch=[listener]
    )
    assert channels.Job.name() in listener.output()
    listening_lines = [line for line in listener.output().splitlines() if "Listening on" in line]
    assert len(listening_lines) == 1, listening_lines  # one handler: no duplicated lines


@pytest.mark.timeout(60)
def test_a_project_handler_on_the_pgpubsub_logger_prints_each_line_once(processes):
    """A common Django LOGGING puts a handler on the ``pgpubsub`` logger: listen then adds no
    root handler of its own (each line was printed twice, once per handler)."""
    listener = processes.start("--loglevel", "info", env={"PGPUBSUB_TEST_LOG_HANDLER": "1"})
    wait_for(
        lambda: "Listening on" in listener.output(), 30, "the 'Listening on' line", watch=[listener]
    )
    listening_lines = [line for line in listener.output().splitlines() if "Listening on" in line]
    assert len(listening_lines) == 1, listening_lines
    assert listening_lines[0].startswith("project: Listening on"), listening_lines


@pytest.mark.timeout(60)
def test_a_bad_pgpubsub_workers_does_not_stop_listen(processes):
    """Only embedded Runtimes read PGPUBSUB_WORKERS (listen takes --threads): listen warns
    and runs (a system check error stopped it)."""
    listener = processes.start("--threads", "2", env={"PGPUBSUB_TEST_WORKERS": "0"})
    pgpubsub.notify(channels.Job, key="workers-0")
    wait_for(
        lambda: Effect.objects.filter(key="workers-0").exists(),
        30,
        "the job to be processed",
        watch=[listener],
    )
    assert "pgpubsub.W004" in listener.output()


def test_unknown_loglevel_is_a_clear_error():
    with pytest.raises(CommandError, match="'loud' is not a logging level"):
        call_command("listen", "--loglevel", "loud")


@pytest.mark.timeout(60)
def test_recover_processes_what_was_stored_while_nobody_listened(processes):
    send_jobs("stored-", 10)
    assert stored(channels.Job) == 10

    listener = processes.start("--recover")
    wait_processed("stored-", 10, [listener])
    assert_no_traceback(listener)


@pytest.mark.timeout(60)
def test_process_stored_notifications_wakes_a_running_listener(processes):
    # With no watcher (the test holds its lock) and no sweep due, rows stored without any
    # NOTIFY stay stored, as if every listener had missed their notification.
    with no_watcher():
        listener = processes.start(env=NO_SWEEPS)
        for number in range(5):
            Notification.objects.create(
                channel=channels.Job.listen_safe_name(),
                payload={"kwargs": {"key": f"silent-{number}", "text": ""}},
            )
        # A plain message sent after them is processed: the listener runs, the rows stay.
        post = Post.objects.create(content="marker")
        pgpubsub.notify(channels.PostReads, model_id=post.pk, model_type="post")
        wait_for(
            lambda: Post.objects.get(pk=post.pk).read_count == 1,
            30,
            "the marker message to be processed",
            watch=[listener],
        )
        assert stored(channels.Job) == 5

        pgpubsub.process_stored_notifications()
        wait_processed("silent-", 5, [listener])
    assert_no_traceback(listener)


@pytest.mark.timeout(60)
def test_channels_option_selects_what_is_processed(processes):
    listener = processes.start("--loglevel", "info", "--channels", "tests.testapp.channels.Job")
    wait_for(
        lambda: "Listening on" in listener.output(), 30, "the 'Listening on' line", watch=[listener]
    )
    [listening] = [line for line in listener.output().splitlines() if "Listening on" in line]
    assert listening.endswith(f"Listening on {channels.Job.name()}"), listening

    Author.objects.create(name="unprocessed")
    send_jobs("only-job-", 5)
    wait_for(
        lambda: effects("only-job-") == 5 and stored(channels.Job) == 0,
        30,
        lambda: f"5 jobs processed, have {effects('only-job-')}",
        watch=[listener],
    )
    assert stored(channels.AuthorTrigger) == 1
    assert effects("author-") == 0
    assert_no_traceback(listener)


@pytest.mark.timeout(60)
def test_unknown_channel_is_an_error(processes):
    path = "tests.testapp.channels.NoSuchChannel"
    listener = processes.start("--channels", path, ready=None)
    code = listener.wait(30)
    assert code != 0, outputs([listener])
    assert path in listener.output(), outputs([listener])
    assert not listener.backends()


@pytest.mark.timeout(60)
def test_failing_callback_does_not_stop_the_listener(processes):
    listener = processes.start()
    pgpubsub.notify(channels.FailingJob, key="doomed")
    pgpubsub.notify(channels.Job, key="after-failure")

    wait_for(
        lambda: effects("after-failure") == 1,
        30,
        "the job sent after the failing one to be processed",
        watch=[listener],
    )
    # Another channel: its wake-up may be swept after Job's.
    wait_for(
        lambda: "job doomed failed on purpose" in listener.output(),
        30,
        "the failing job's failure",
        watch=[listener],
    )
    assert listener.alive, outputs([listener])
    assert stored(channels.FailingJob) == 1
    assert not Effect.objects.filter(key="doomed").exists()  # rolled back with the failure
    assert listener.wait_listening(1)


def terminate_backends(process: ListenProcess) -> int:
    pids = [pid for pid, _ in process.backends()]
    with connection.cursor() as cursor:
        for pid in pids:
            cursor.execute("SELECT pg_terminate_backend(%s)", [pid])
    return len(pids)


@pytest.mark.timeout(90)
def test_listener_reconnects_after_its_sessions_are_terminated(processes):
    listener = processes.start()
    send_jobs("before-", 5)
    wait_processed("before-", 5, [listener])
    (old_session,) = listener.wait_listening(1)

    # Both sessions (LISTEN and processing) go, as on a failover or an idle-session reaper.
    assert terminate_backends(listener) == 2
    wait_for(
        lambda: old_session[0] not in {pid for pid, _ in listener.backends()},
        10,
        "the terminated LISTEN session to end",
    )
    # Stored without a NOTIFY: only the catch-up after the reconnection can find these.
    for number in range(5):
        Notification.objects.create(
            channel=channels.Job.listen_safe_name(),
            payload={"kwargs": {"key": f"meanwhile-{number}", "text": "work"}},
        )
    listener.wait_listening(1)
    send_jobs("after-", 5)

    wait_processed("meanwhile-", 5, [listener])
    wait_processed("after-", 5, [listener])
    assert listener.alive, outputs([listener])
    assert "Lost the listening connection" in listener.output(), outputs([listener])
    assert Effect.objects.filter(key__startswith="meanwhile-").count() == 5  # each once


def processing_sessions(listener: ListenProcess) -> list[int]:
    (listening_pid, _) = listener.wait_listening(1)[0]
    return [pid for pid, _ in listener.backends() if pid != listening_pid]


@pytest.mark.timeout(60)
def test_the_processing_connection_is_kept_between_batches(processes):
    """With Django's default CONN_MAX_AGE = 0 (meant for requests) the listener keeps its
    processing connection, as django-pgpubsub 1.x did, instead of reconnecting per batch."""
    listener = processes.start()
    send_jobs("one-", 1)
    wait_processed("one-", 1, [listener])
    first = processing_sessions(listener)
    send_jobs("two-", 1)
    wait_processed("two-", 1, [listener])
    assert processing_sessions(listener) == first and len(first) == 1


def start_and_kill_the_processing_session(processes, conn_max_age: str) -> ListenProcess:
    """A listen process whose processing session, opened for a first job, was terminated."""
    listener = processes.start(env={"PGPUBSUB_TEST_CONN_MAX_AGE": conn_max_age})
    send_jobs("warm-", 1)
    wait_processed("warm-", 1, [listener])
    (listening_pid, _) = listener.wait_listening(1)[0]
    processing = [pid for pid, _ in listener.backends() if pid != listening_pid]
    assert len(processing) == 1, listener.backends()
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(%s)", processing)
    return listener


@pytest.mark.timeout(90)
@pytest.mark.parametrize("conn_max_age", ["0", "600"])
def test_a_lost_processing_connection_is_replaced_and_nothing_stays_stored(processes, conn_max_age):
    """The processing session outlives a message; when it dies, the stored job that finds it
    dead (woken by the watcher) is not counted as a listener failure and left behind, and the
    messages after it, plain and lockable, are processed on a new connection."""
    listener = start_and_kill_the_processing_session(processes, conn_max_age)

    pgpubsub.notify(channels.Job, key="met-dead", text="work")
    wait_processed("met-dead", 1, [listener])
    assert "The database connection broke while processing tests.testapp.channels.Job" in (
        listener.output()
    ), outputs([listener])

    post = Post.objects.create(content="read me")
    pgpubsub.notify(channels.PostReads, model_id=post.pk, model_type="post")
    send_jobs("next-", 5)
    wait_processed("next-", 5, [listener])
    wait_for(
        lambda: Post.objects.get(pk=post.pk).read_count == 1,
        30,
        "the plain message to be processed",
        watch=[listener],
    )
    assert effects("met-dead") == 1
    assert "failed on" not in listener.output(), outputs([listener])
    assert listener.alive


@pytest.mark.timeout(90)
@pytest.mark.parametrize("conn_max_age", ["0", "600"])
def test_a_plain_message_after_a_lockable_one_that_met_a_dead_connection_is_processed(
    processes, notify_on_write, conn_max_age
):
    """With a NOTIFY per stored row, one transaction's lockable message and plain message
    reach the listener together, in that order: the lockable one finds the processing
    session dead and stays stored (then caught up), and the plain one is not lost."""
    listener = start_and_kill_the_processing_session(processes, conn_max_age)

    post = Post.objects.create(content="read me")
    with transaction.atomic():  # one batch: a lockable message, then a plain one
        pgpubsub.notify(channels.Job, key="in-batch", text="work")
        pgpubsub.notify(channels.PostReads, model_id=post.pk, model_type="post")
    send_jobs("next-", 5)
    wait_processed("next-", 5, [listener])
    assert effects("in-batch") == 1  # kept stored when its connection broke, then caught up
    assert "The database connection broke while processing tests.testapp.channels.Job" in (
        listener.output()
    ), outputs([listener])
    # The plain message after the lockable one that met the dead connection was not lost.
    assert Post.objects.get(pk=post.pk).read_count == 1, outputs([listener])
    assert "failed on stored notification" not in listener.output(), outputs([listener])
    assert listener.alive


@pytest.mark.timeout(60)
def test_pgpubsub_database_names_the_listen_connection_only(processes):
    """With PGPUBSUB_DATABASE = "listen", LISTEN runs on that alias; messages are claimed and
    processed on "default", where listeners write (so both commit together)."""
    listener = processes.start(ready=None, env={"PGPUBSUB_TEST_LISTEN_ALIAS": "listen-alias"})
    listening = "listen-alias"
    wait_for(
        lambda: len(backends(listening, listening=True)) == 1,
        30,
        "a LISTEN session on the 'listen' alias",
        watch=[listener],
    )
    send_jobs("aliased-", 5)
    wait_processed("aliased-", 5, [listener])
    assert not listener.backends(listening=True)  # nothing LISTENs on the default alias
    assert listener.backends()  # ... which processed the messages
    assert len(backends(listening)) == 1


@pytest.mark.timeout(120)
def test_supervisor_replaces_a_killed_child(processes):
    supervisor = processes.start("--processes", "2", ready=2)
    children = supervisor.children()
    assert len(children) == 2, (children, outputs([supervisor]))
    for pid in children:  # started through the project's manage.py, as the supervisor was
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert command[1].endswith(b"tests/manage.py") and b"--worker" in command, command

    send_jobs("first-", 200)
    wait_processed("first-", 200, [supervisor])
    pids = set(Effect.objects.values_list("pid", flat=True))
    assert pids <= children, (pids, children)

    killed = min(children)
    os.kill(killed, signal.SIGKILL)
    wait_for(
        lambda: (now := supervisor.children()) and len(now) == 2 and killed not in now,
        30,
        lambda: f"a replacement child; children now {supervisor.children()}",
        watch=[supervisor],
    )
    replaced = supervisor.children()
    assert replaced & children == children - {killed}
    supervisor.wait_listening(2)

    send_jobs("second-", 20)
    wait_processed("second-", 20, [supervisor])
    assert set(Effect.objects.filter(key__startswith="second-").values_list("pid", flat=True)) <= (
        replaced
    )

    supervisor.send(signal.SIGTERM)
    # The killed child was replaced: a clean stop afterwards is a success.
    assert supervisor.wait(40) == 0, outputs([supervisor])
    wait_for(
        lambda: not any(pid_alive(pid) for pid in replaced),
        10,
        lambda: f"children {[pid for pid in replaced if pid_alive(pid)]} to exit",
    )
    supervisor.wait_no_backends(10)


@pytest.mark.timeout(90)
def test_supervisor_with_forked_children(processes):
    supervisor = processes.start("--processes", "2", "--worker-start-method", "fork", ready=2)
    assert len(supervisor.children()) == 2, outputs([supervisor])

    send_jobs("forked-", 50)
    wait_processed("forked-", 50, [supervisor])
    assert_no_traceback(supervisor)

    supervisor.send(signal.SIGTERM)
    assert supervisor.wait(40) == 0, outputs([supervisor])
    supervisor.wait_no_backends(10)


@pytest.mark.timeout(60)
def test_worker_with_several_processes_is_an_error(processes):
    listener = processes.start("--worker", "--processes", "2", ready=None)
    assert listener.wait(30) != 0, outputs([listener])
    assert "--worker" in listener.output(), outputs([listener])
    assert not listener.backends()


@pytest.mark.timeout(150)
def test_processes_and_threads_exactly_once_when_a_child_is_killed_mid_run(processes):
    supervisor = processes.start("--processes", "2", "--threads", "4", ready=2)
    children = supervisor.children()
    assert len(children) == 2, outputs([supervisor])

    send_jobs("run-", 1500, per_transaction=100)
    wait_for(
        lambda: effects("run-") >= 100,
        30,
        lambda: f"work to start; {effects('run-')} effects",
        watch=[supervisor],
    )
    killed = min(children)
    os.kill(killed, signal.SIGKILL)  # mid-run: it may hold claimed rows
    wait_for(
        lambda: (now := supervisor.children()) and len(now) == 2 and killed not in now,
        30,
        lambda: f"a replacement child; children now {supervisor.children()}",
        watch=[supervisor],
    )
    # Exactly once: 1,500 distinct effects (the key is unique), nothing left stored.
    wait_processed("run-", 1500, [supervisor], timeout=90)
    keys = set(Effect.objects.filter(key__startswith="run-").values_list("key", flat=True))
    assert keys == {f"run-{number}" for number in range(1500)}
    assert "failed" not in supervisor.output(), outputs([supervisor])

    supervisor.send(signal.SIGTERM)
    assert supervisor.wait(40) == 0, outputs([supervisor])
    supervisor.wait_no_backends(10)


@pytest.mark.timeout(60)
def test_sigterm_leaves_a_callback_that_outlasts_the_shutdown_timeout_stored(processes):
    listener = processes.start("--threads", "2", env={"PGPUBSUB_TEST_SHUTDOWN_TIMEOUT": "1"})
    pgpubsub.notify(channels.SlowJob, key="too-slow", seconds=60.0)
    pgpubsub.notify(channels.Job, key="quick", text="work")
    # The slow job's transaction stays open while its callback sleeps.
    wait_for(
        lambda: any(state == "idle in transaction" for state in listener.session_states()),
        30,
        "the slow job to be claimed",
        watch=[listener],
    )
    wait_for(lambda: effects("quick") == 1, 30, "the quick job", watch=[listener])

    started = time.monotonic()
    listener.send(signal.SIGTERM)
    assert listener.wait(10) == 0, outputs([listener])
    assert time.monotonic() - started < 1 + 4, outputs([listener])
    assert "still running" in listener.output(), outputs([listener])
    listener.wait_no_backends(10)
    # Its row is stored and free for the next listener; its effect never happened.
    assert effects("too-slow") == 0
    with transaction.atomic():
        free = Notification.objects.select_for_update(skip_locked=True).filter(
            channel=channels.SlowJob.listen_safe_name()
        )
        assert free.count() == 1
