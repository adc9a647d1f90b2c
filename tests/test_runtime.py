"""The Runtime in this process: listener thread, bounded queue, worker threads, real Postgres."""

import logging
import os
import threading
import time
from datetime import timedelta

import pytest
from django.db import connection, transaction
from django.utils import timezone

import pgpubsub
from pgpubsub import batch_size
from pgpubsub.models import Notification
from pgpubsub.runtime import Runtime
from tests.processes import LISTEN_SESSION, wait_for
from tests.testapp import channels
from tests.testapp.listeners import received, slow_jobs_started, timings
from tests.testapp.models import Effect

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(60)]


def sessions() -> set[int]:
    """Backend pids of the other sessions on the test database."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pid FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        return {row[0] for row in cursor.fetchall()}


def send_jobs(channel, count: int, prefix: str = "job-", **fields) -> list[str]:
    keys = [f"{prefix}{number}" for number in range(count)]
    with transaction.atomic():
        for key in keys:
            pgpubsub.notify(channel, key=key, **fields)
    return keys


def effects(channel: str) -> list[str]:
    return list(Effect.objects.filter(channel=channel).values_list("key", flat=True))


def test_processes_plain_and_lockable_messages_and_reports_status(runtimes):
    runtime = runtimes(channels=[channels.Job, channels.Message], workers=2)
    keys = send_jobs(channels.Job, 10)
    for number in range(5):
        pgpubsub.notify(channels.Message, key=f"m{number}", text="hello")

    wait_for(lambda: len(effects("Job")) == 10, 30, "10 jobs")
    wait_for(lambda: runtime.status()["processed"] == 15, 30, lambda: str(runtime.status()))
    assert sorted(effects("Job")) == sorted(keys)
    assert sorted(kw["key"] for name, kw in received if name == "Message") == [
        f"m{number}" for number in range(5)
    ]
    assert not Notification.objects.exists()
    status = runtime.status()
    assert status["running"] and status["connected"]
    assert status["failed"] == 0 and status["last_error"] is None
    assert status["queue_depth"] == 0 and status["in_flight"] == 0
    assert status["workers"] == 2
    assert status["last_notification_at"] is not None
    assert set(status["channels"]) == {channels.Message.name(), channels.Job.name()}


def test_connection_budget_idempotent_start_and_stop_closes_everything(runtimes):
    before = sessions()
    runtime = runtimes(channels=[channels.Job], workers=3)
    assert runtime.start() is runtime  # a second start changes nothing
    most = 0

    def all_done() -> bool:
        nonlocal most
        most = max(most, len(sessions() - before))
        return len(effects("Job")) == 300

    send_jobs(channels.Job, 300)
    wait_for(all_done, 30, "300 jobs")
    assert 2 <= most <= 1 + 3, f"{most} sessions for 1 listener + 3 workers"

    assert runtime.stop(10) is True
    assert runtime.stop(10) is True  # a second stop changes nothing
    wait_for(lambda: not (sessions() - before), 10, "the Runtime's sessions to end")
    assert not [t for t in threading.enumerate() if t.name.startswith("pgpubsub-")]
    with pytest.raises(RuntimeError, match="create a new one"):
        runtime.start()


def test_a_full_queue_loses_nothing(runtimes, caplog, write_mode):
    """Queue of 1, one worker, slow callbacks: plain messages wait for room, lockable rows are
    left stored and swept once there is room; each runs exactly once. Either way writers wake
    the listeners."""
    caplog.set_level(logging.DEBUG, logger="pgpubsub.runtime")
    runtime = runtimes(channels=[channels.SlowJob, channels.Timed], workers=1, queue_size=1)
    deepest = 0

    def done() -> bool:
        nonlocal deepest
        deepest = max(deepest, runtime.status()["queue_depth"])
        timed = [key for channel, key, *_ in timings if channel == "Timed"]
        return len(effects("SlowJob")) == 60 and len(timed) == 30

    slow = send_jobs(channels.SlowJob, 30, prefix="a-", seconds=0.01)
    for number in range(30):
        pgpubsub.notify(channels.Timed, key=f"t{number}", seconds=0.01)
    slow += send_jobs(channels.SlowJob, 30, prefix="b-", seconds=0.01)

    wait_for(done, 45, lambda: f"60 slow jobs and 30 messages; {runtime.status()}")
    assert sorted(effects("SlowJob")) == sorted(slow)
    timed = [key for channel, key, *_ in timings if channel == "Timed"]
    assert timed == [f"t{number}" for number in range(30)]  # one worker: arrival order
    assert deepest <= 1
    if write_mode == "notify on write":  # a row's NOTIFY found the queue full
        assert "left for a sweep" in caplog.text
    assert not Notification.objects.exists()
    assert runtime.status()["failed"] == 0


def test_max_concurrency_one_runs_messages_one_at_a_time_in_order(runtimes):
    runtimes(channels=[channels.InOrder, channels.Timed], workers=4)
    for number in range(8):
        pgpubsub.notify(channels.InOrder, key=f"o{number}", seconds=0.05)
        pgpubsub.notify(channels.Timed, key=f"t{number}", seconds=0.3)

    wait_for(lambda: len(timings) == 16, 30, lambda: f"16 messages, have {timings}")
    in_order = [entry for entry in timings if entry[0] == "InOrder"]
    assert [key for _, key, *_ in in_order] == [f"o{number}" for number in range(8)]
    for earlier, later in zip(in_order, in_order[1:], strict=False):
        assert earlier[4] <= later[3], f"{earlier[1]} and {later[1]} overlapped"
    # Without a limit, a channel's messages run side by side on the pool.
    timed = sorted((entry for entry in timings if entry[0] == "Timed"), key=lambda e: e[3])
    assert any(a[4] > b[3] for a, b in zip(timed, timed[1:], strict=False)), timed
    assert len({thread for _, _, thread, *_ in timed}) > 1


def test_a_slow_callback_does_not_hold_up_other_channels(runtimes):
    runtime = runtimes(channels=[channels.SlowJob, channels.Job], workers=2)
    pgpubsub.notify(channels.SlowJob, key="slow", seconds=3.0)
    wait_for(lambda: runtime.status()["in_flight"] == 1, 10, "the slow job to start")

    keys = send_jobs(channels.Job, 20)
    wait_for(lambda: len(effects("Job")) == 20, 10, "20 jobs next to the slow one")
    assert not effects("SlowJob"), "the jobs should have finished while the slow one ran"
    assert sorted(effects("Job")) == sorted(keys)
    wait_for(lambda: effects("SlowJob") == ["slow"], 10, "the slow job")


def test_stop_lets_the_running_callback_finish(runtimes):
    runtime = runtimes(channels=[channels.SlowJob], workers=1)
    slow_jobs_started.clear()
    pgpubsub.notify(channels.SlowJob, key="slow", seconds=1.0)
    # Its listener running, not only its delivery taken: a message whose batch has not
    # started it when the stop comes is given back, stored, for a later listener.
    wait_for(lambda: slow_jobs_started == ["slow"], 10, "the slow job's listener to start")
    started = time.monotonic()
    assert runtime.stop(10) is True
    assert time.monotonic() - started < 5
    assert effects("SlowJob") == ["slow"]
    assert not Notification.objects.exists()


def test_the_listener_reconnects_and_sweeps_what_it_missed(runtimes):
    runtime = runtimes(channels=[channels.Job], workers=1)
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = "
            f"current_database() AND pid <> pg_backend_pid() AND {LISTEN_SESSION}"
        )
        assert cursor.fetchall() == [(True,)]
    keys = send_jobs(channels.Job, 10)  # perhaps while the listener is away
    wait_for(lambda: runtime.status()["reconnects"] == 1, 30, lambda: str(runtime.status()))
    wait_for(lambda: len(effects("Job")) == 10, 30, "10 jobs")
    assert sorted(effects("Job")) == sorted(keys)
    assert runtime.status()["connected"]


def test_recover_processes_what_was_stored_before_the_start(runtimes):
    keys = send_jobs(channels.Job, 45)  # no one listens yet
    runtimes(channels=[channels.Job], workers=2, recover=True)
    wait_for(lambda: len(effects("Job")) == 45, 30, "45 stored jobs")
    assert sorted(effects("Job")) == sorted(keys)
    assert not Notification.objects.exists()


def test_a_sweep_shares_its_pages_with_every_worker(runtimes):
    keys = send_jobs(channels.SlowJob, 300, seconds=0.002)  # stored before anyone listens
    runtime = runtimes(channels=[channels.SlowJob], workers=3, recover=True)
    wait_for(lambda: len(effects("SlowJob")) == 300, 60, lambda: str(runtime.status()))
    assert sorted(effects("SlowJob")) == sorted(keys)
    threads = set(Effect.objects.values_list("value", flat=True))
    assert len(threads) == 3, threads
    assert not Notification.objects.exists()


def test_a_sweep_reports_its_end_also_after_a_full_last_page(runtimes, caplog):
    caplog.set_level(logging.INFO, logger="pgpubsub")
    send_jobs(channels.SlowJob, 80)  # two full pages of 2 workers x 20
    runtimes(channels=[channels.SlowJob], workers=2, recover=True)
    name = channels.SlowJob.name()
    wait_for(
        lambda: f"Swept 80 stored notifications of {name}" in caplog.text,
        30,
        lambda: f"the end of the first sweep; {len(effects('SlowJob'))} effects",
    )
    send_jobs(channels.SlowJob, 41, prefix="later-")
    wait_for(lambda: len(effects("SlowJob")) == 121, 30, "the later jobs")
    pgpubsub.process_stored_notifications([channels.SlowJob])  # a sweep that finds nothing
    Notification.objects.bulk_create(
        Notification(channel=channels.SlowJob.listen_safe_name(), payload={"kwargs": {"key": k}})
        for k in (f"silent-{n}" for n in range(41))
    )
    pgpubsub.process_stored_notifications([channels.SlowJob])
    wait_for(
        lambda: f"Swept 41 stored notifications of {name}" in caplog.text,
        30,
        lambda: f"the end of the second sweep (counted from 0): {caplog.text[-2000:]}",
    )


def test_bad_settings_fail_when_the_runtime_is_made(settings):
    from django.core.exceptions import ImproperlyConfigured

    with pytest.raises(ValueError, match="workers must be a positive int"):
        Runtime(workers=0)
    settings.PGPUBSUB_QUEUE_SIZE = 0
    with pytest.raises(ImproperlyConfigured, match="PGPUBSUB_QUEUE_SIZE must be a positive"):
        Runtime()
    del settings.PGPUBSUB_QUEUE_SIZE
    settings.PGPUBSUB_SHUTDOWN_TIMEOUT = "soon"
    with pytest.raises(ImproperlyConfigured, match="PGPUBSUB_SHUTDOWN_TIMEOUT must be a posit"):
        Runtime()
    del settings.PGPUBSUB_SHUTDOWN_TIMEOUT
    for name in ("PGPUBSUB_MAX_ATTEMPTS", "PGPUBSUB_RETRY_DELAY", "PGPUBSUB_RETRY_MAX_DELAY"):
        setattr(settings, name, 0)
        with pytest.raises(ImproperlyConfigured, match=f"{name} must be a positive"):
            Runtime()
        delattr(settings, name)


# Forking a process whose Runtime threads run is what the test is about (gunicorn --preload
# and multiprocessing's fork do it); Python 3.12 warns about any fork of a threaded process.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_runtime_never_crosses_a_fork(settings):
    """The child of a fork has no Runtime (and may start its own); the parent's keeps its
    connections and goes on processing."""
    from pgpubsub import embedded

    settings.PGPUBSUB_CHANNELS = [channels.Job.name()]
    runtime = embedded.start()
    try:
        wait_for(lambda: runtime.status()["connected"], 30, "the Runtime to listen")
        send_jobs(channels.Job, 5, prefix="before-")
        wait_for(lambda: len(effects("Job")) == 5, 30, "5 jobs before the fork")
        before = sessions()
        connection.close()  # the test's own connection stays with the parent

        read, write = os.pipe()
        child = os.fork()
        if child == 0:  # pragma: no cover - the child reports through the pipe
            report = "inherited a Runtime"
            try:
                if embedded.runtime() is None:
                    own = embedded.start()
                    deadline = time.monotonic() + 20
                    while not own.status()["connected"] and time.monotonic() < deadline:
                        time.sleep(0.05)
                    report = f"own Runtime connected={own.status()['connected']}"
                    embedded.stop(5)
            except BaseException as exc:
                report = repr(exc)
            os.write(write, report.encode())
            os._exit(0)
        os.close(write)
        with os.fdopen(read) as pipe:
            report = pipe.read()
        os.waitpid(child, 0)
        assert report == "own Runtime connected=True"

        assert embedded.runtime() is runtime
        send_jobs(channels.Job, 5, prefix="after-")
        wait_for(lambda: len(effects("Job")) == 10, 30, "5 jobs after the fork")
        assert before <= sessions()  # none of the parent's sessions was closed by the child
        assert runtime.status()["reconnects"] == 0 and runtime.status()["failed"] == 0
    finally:
        embedded.stop(10)


def test_a_base_exception_from_a_callback_does_not_end_the_worker(runtimes):
    """asyncio.CancelledError (a BaseException, as async_to_sync code may raise) is a failed
    message like any other: the only worker goes on."""
    runtime = runtimes(channels=[channels.Cancelled, channels.Job], workers=1)
    pgpubsub.notify(channels.Cancelled, key="x")
    wait_for(lambda: runtime.status()["failed"] == 1, 10, lambda: str(runtime.status()))
    assert "CancelledError" in runtime.status()["last_error"]
    keys = send_jobs(channels.Job, 3)
    wait_for(lambda: len(effects("Job")) == 3, 10, lambda: f"3 jobs; {runtime.status()}")
    assert sorted(effects("Job")) == sorted(keys)
    assert "pgpubsub-worker-0" in {thread.name for thread in threading.enumerate()}


def test_a_failing_on_commit_function_spoils_nothing_else(runtimes, caplog):
    """Messages claimed together commit together: one message's failing on_commit() function
    is logged, and the others' still run; all count as processed."""
    from tests.testapp.listeners import hooks_ran

    hooks_ran.clear()
    runtime = runtimes(channels=[channels.Hooked], workers=1)
    with transaction.atomic():  # they arrive together: one batch, one transaction
        for key in ("good-1", "bad-1", "good-2"):
            pgpubsub.notify(channels.Hooked, key=key)
    pgpubsub.notify(channels.Hooked, key="bad-alone")  # a batch of one
    wait_for(lambda: runtime.status()["processed"] == 4, 10, lambda: str(runtime.status()))
    assert sorted(hooks_ran) == ["good-1", "good-2"]
    assert sorted(effects("Hooked")) == ["bad-1", "bad-alone", "good-1", "good-2"]
    assert not Notification.objects.exists()
    assert runtime.status()["failed"] == 0
    logged = [
        r
        for r in caplog.records
        if r.exc_info and "on_commit function of bad" in str(r.exc_info[1])
    ]
    assert len(logged) == 2, caplog.text
    assert "stays stored" not in caplog.text


@pytest.mark.parametrize("workers, queue_size", [(2, 2), (1, 1)])
def test_arrival_order_survives_a_full_queue(runtimes, workers, queue_size):
    """One at a time in arrival order (max_concurrency = 1, or a single worker as in `listen`)
    holds when rows wait for a sweep because the queue was full."""
    from tests.testapp.listeners import ledger

    ledger.clear()
    runtimes(channels=[channels.Ledger, channels.Job], workers=workers, queue_size=queue_size)
    for seq in range(30):
        with transaction.atomic():
            pgpubsub.notify(channels.Ledger, seq=seq)
            pgpubsub.notify(channels.Job, key=f"j{seq}")  # splits the ledger's deliveries
    wait_for(lambda: len(ledger) == 30, 30, lambda: f"30 entries, have {ledger}")
    assert ledger == list(range(30))


def test_last_error_is_the_latest(runtimes):
    runtime = runtimes(channels=[channels.Job, channels.FailingJob], workers=1)
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = "
            f"current_database() AND pid <> pg_backend_pid() AND {LISTEN_SESSION}"
        )
    wait_for(
        lambda: runtime.status()["reconnects"] == 1 and runtime.status()["connected"],
        30,
        lambda: str(runtime.status()),
    )
    pgpubsub.notify(channels.FailingJob, key="later")
    # (>= 1: the catch-up sweep after the reconnect may try the stored failure again.)
    wait_for(lambda: runtime.status()["failed"] >= 1, 30, lambda: str(runtime.status()))
    assert "job later failed on purpose" in runtime.status()["last_error"]


def test_the_probe_reaches_no_listener(runtimes, listening, caplog):
    """After LISTEN, the Runtime proves that notifications reach it with a NOTIFY on a probe
    channel of its own: no channel's listener gets it, here or in another listener."""
    from pgpubsub.listen import process_notifications

    runtime = runtimes(channels=[channels.Message, channels.Job, channels.Everything], workers=1)
    wait_for(lambda: runtime.status()["notifications_verified"], 10, lambda: str(runtime.status()))
    status = runtime.status()
    assert status["connected"] is True and status["problems"] == []
    assert status["ignored"] == 0 and status["processed"] == 0
    process_notifications(listening)  # a django-pgpubsub 1.x style listener of every channel
    assert received == []
    assert "Ignoring" not in caplog.text and "Notifications do not reach" not in caplog.text


def test_a_listen_process_that_never_connected_says_it_cannot_connect(processes):
    """At start-up with the database down, it is no lost connection (there was none yet)."""
    from tests.processes import free_port

    listener = processes.start(
        ready=None,
        env={
            "PGPUBSUB_TEST_LISTEN_ALIAS": "closed-port-listen",
            "PGPUBSUB_TEST_LISTEN_PORT": str(free_port()),
        },
    )
    message = "Cannot connect to the database to listen ("
    wait_for(
        lambda: listener.output().count(message) >= 2,
        30,
        "two attempts to connect",
        watch=[listener],
    )
    lines = [line for line in listener.output().splitlines() if message in line]
    assert all("); retrying in " in line for line in lines), lines
    assert "Lost the listening connection" not in listener.output()
    assert "Traceback" not in listener.output()


@pytest.mark.django_db(transaction=True, databases=["default", "side"])
def test_a_sweep_reports_the_rows_it_processed_not_those_it_read(runtimes, caplog):
    """Rows another listener holds, and rows whose listener fails, are read by the sweep but
    not processed: "Swept N" counts only those this Runtime processed."""
    caplog.set_level(logging.INFO, logger="pgpubsub")
    Notification.objects.bulk_create(
        [
            Notification(channel=channels.Job.listen_safe_name(), payload={"kwargs": {"key": k}})
            for k in (f"swept-{n}" for n in range(60))
        ]
        + [
            Notification(
                channel=channels.FailingJob.listen_safe_name(), payload={"kwargs": {"key": k}}
            )
            for k in (f"failing-{n}" for n in range(30))
        ]
    )
    held = list(
        Notification.objects.filter(channel=channels.Job.listen_safe_name())
        .order_by("pk")
        .values_list("pk", flat=True)[:10]
    )
    job, failing = channels.Job.name(), channels.FailingJob.name()
    with transaction.atomic(using="side"):  # another listener holds 10 of the jobs
        list(Notification.objects.using("side").select_for_update().filter(pk__in=held))
        runtimes(channels=[channels.Job, channels.FailingJob], workers=2, recover=True)
        wait_for(
            lambda: f"of {job} (" in caplog.text and f"of {failing} (" in caplog.text,
            30,
            lambda: f"the end of both sweeps: {caplog.text[-3000:]}",
        )
    assert (
        f"Swept 50 stored notifications of {job} (of 60 found: the others failed, or another "
        "listener took them)"
    ) in caplog.text
    assert f"Swept 0 stored notifications of {failing} (of 30 found" in caplog.text


def test_a_sweep_first_gives_back_the_rows_a_lost_connection_kept(runtimes):
    """A lost connection's session may still hold its rows when the Runtime gives them back:
    they keep their claim, not due before its lease ends, and the Runtime remembers them. The
    next sweep gives them back before it reads its page, so it processes them at once, with no
    attempt counted (rather than leaving them until another claim counts one of each)."""
    (key,) = send_jobs(channels.Job, 1)  # no one listens yet: stored only
    row = Notification.objects.get()
    claim = "host:1:0123456789ab"  # what the broken session's claim left on the row
    # A lease far longer than CLAIM_LEASE: without the giving back, no sweep finds it due.
    Notification.objects.filter(pk=row.pk).update(
        claimed_by=claim, next_attempt_at=timezone.now() + timedelta(hours=1)
    )
    runtime = runtimes(channels=[channels.Job], workers=1)
    runtime._workers.losses.unreturned("default", claim, [row.pk])  # as a lost connection does

    pgpubsub.process_stored_notifications([channels.Job])  # a sweep, as after a reconnection
    wait_for(lambda: effects("Job") == [key], 20, lambda: f"the job; {runtime.status()}")
    assert not Notification.objects.exists()
    assert runtime.status()["failed"] == 0


def test_plain_messages_queued_behind_a_busy_worker_run_in_order_each_on_its_own(runtimes):
    """Messages that arrive while the only worker is busy wait together (a queue of one has
    room for all of them); they run in arrival order, each in a transaction of its own: the one
    that fails is rolled back alone, and the next ones still run."""
    runtime = runtimes(channels=[channels.Timed, channels.Message], workers=1, queue_size=1)
    pgpubsub.notify(channels.Timed, key="busy", seconds=1.0)
    wait_for(lambda: runtime.status()["in_flight"] == 1, 10, "the busy message to start")
    keys = [f"m{number}" for number in range(30)]
    for key in keys:
        pgpubsub.notify(channels.Message, key=key, text="write-then-fail" if key == "m7" else "")
    wait_for(
        lambda: runtime.status()["processed"] + runtime.status()["failed"] == 31,
        20,
        lambda: str(runtime.status()),
    )
    assert [kw["key"] for name, kw in received if name == "Message"] == keys
    assert runtime.status()["failed"] == 1
    assert "message m7 failed on purpose" in runtime.status()["last_error"]
    assert not effects("Message")  # m7's write was rolled back


def test_stop_drops_the_plain_messages_not_started_and_says_how_many(runtimes, caplog):
    """A stop lets the running message finish; the messages that were queued together with it
    are not run, and the log says how many of them there were."""
    batch_size.forget(channels.Timed)  # 0.3 s messages, measured: a delivery would hold one
    runtime = runtimes(channels=[channels.Timed], workers=1)
    pgpubsub.notify(channels.Timed, key="busy", seconds=0.5)
    wait_for(lambda: runtime.status()["in_flight"] == 1, 10, "the busy message to start")
    for number in range(5):
        pgpubsub.notify(channels.Timed, key=f"t{number}", seconds=0.3)
    wait_for(lambda: len(timings) >= 2, 10, lambda: f"t0 to run, have {timings}")
    assert runtime.stop(10) is True
    ran = [key for _, key, *_ in timings]
    assert ran == ["busy", *(f"t{number}" for number in range(len(ran) - 1))]
    assert f"{6 - len(ran)} plain message(s) of {channels.Timed.name()} not processed" in (
        caplog.text
    )
