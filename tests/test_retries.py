"""Failed lockable messages: attempts recorded on the row, retried with backoff, then marked
failed and kept; retried by hand. In-process Runtimes on a real Postgres."""

import itertools
import logging
import threading
import time
from io import StringIO

import pytest
from django.core.management import call_command
from django.db import connection, connections, transaction
from django.test import override_settings

import pgpubsub
from pgpubsub import retries
from pgpubsub.models import Notification
from pgpubsub.runtime import Runtime
from tests.processes import wait_for
from tests.testapp import channels
from tests.testapp.listeners import flaky_attempts
from tests.testapp.models import Effect

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(60)]


@pytest.fixture(autouse=True)
def _clear_attempts():
    flaky_attempts.clear()
    yield
    flaky_attempts.clear()


def effects(channel: str) -> list[str]:
    return sorted(Effect.objects.filter(channel=channel).values_list("key", flat=True))


def row_of(key: str) -> Notification | None:
    return Notification.objects.filter(payload__kwargs__key=key).first()


def send_together(channel, count: int, prefix: str) -> None:
    """``count`` messages of ``channel`` in one transaction: they arrive, and are claimed,
    together."""
    with transaction.atomic():
        for number in range(count):
            pgpubsub.notify(channel, key=f"{prefix}{number}")


def wait_marked_failed(count: int) -> None:
    wait_for(
        lambda: Notification.objects.filter(failed_at__isnull=False).count() == count,
        30,
        lambda: (
            f"rows marked failed; {list(Notification.objects.values('attempts', 'last_error'))}"
        ),
    )


def test_a_listener_that_fails_once_succeeds_on_its_next_attempt(runtimes):
    runtime = runtimes(channels=[channels.Flaky], workers=2)
    pgpubsub.notify(channels.Flaky, key="once", failures=1)

    wait_for(lambda: effects("Flaky") == ["once"], 30, "the second attempt")
    # The failed attempt's write was rolled back: only the second attempt's Effect exists.
    assert Effect.objects.get(key="once").value == "2"
    assert len(flaky_attempts["once"]) == 2
    assert not Notification.objects.exists()
    status = runtime.status()
    assert (status["processed"], status["failed"], status["invalid"]) == (1, 1, 0)


def test_attempts_back_off_then_the_row_is_marked_failed_and_kept(runtimes, caplog):
    caplog.set_level(logging.ERROR, logger="pgpubsub")
    runtimes(channels=[channels.Flaky], workers=2)
    pgpubsub.notify(channels.Flaky, key="doomed", failures=99)

    row = wait_for(
        lambda: (row := row_of("doomed")) and row.failed_at is not None and row,
        30,
        "the row to be marked failed",
    )
    assert row.attempts == channels.Flaky.max_attempts == 3
    assert row.status == Notification.FAILED
    assert row.last_error == "RuntimeError: flaky doomed failed on attempt 3"
    assert "Traceback (most recent call last)" in row.last_traceback
    assert "in run_flaky" in row.last_traceback
    assert effects("Flaky") == []  # every attempt rolled back
    times = flaky_attempts["doomed"]
    assert len(times) == 3
    # retry_delay 0.2 s, doubled: at least half of 0.2 s, then of 0.4 s (jitter cuts up to half).
    assert times[1] - times[0] >= 0.1
    assert times[2] - times[1] >= 0.2
    logged = [r.getMessage() for r in caplog.records if "doomed" in str(r.exc_info)]
    assert any("attempt 1 of 3); next attempt in" in message for message in logged)
    assert any("attempt 3 of 3): marked failed" in message for message in logged)

    # A failed row is not tried again on its own: not by a sweep, not by its NOTIFY.
    pgpubsub.process_stored_notifications([channels.Flaky])
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_notify(%s, %s)", [channels.Flaky.listen_safe_name(), str(row.pk)])
    pgpubsub.notify(channels.Flaky, key="later", failures=0)
    wait_for(lambda: effects("Flaky") == ["later"], 30, "a later message")
    assert len(flaky_attempts["doomed"]) == 3
    assert row_of("doomed").attempts == 3


def test_a_failing_message_of_a_batch_fails_alone(runtimes):
    runtime = runtimes(channels=[channels.Flaky], workers=1)
    with transaction.atomic():  # arrive together: claimed in one transaction
        for number in range(5):
            pgpubsub.notify(channels.Flaky, key=f"b{number}", failures=99 if number == 2 else 0)

    wait_for(lambda: len(effects("Flaky")) == 4, 30, "the four good messages")
    row = wait_for(lambda: row_of("b2"), 5, "the failed row")
    assert row.attempts >= 1 and row.last_error.startswith("RuntimeError: flaky b2")
    assert Notification.objects.count() == 1
    wait_for(lambda: row_of("b2").failed_at is not None, 30, "b2 to be marked failed")
    assert runtime.status()["processed"] == 4


def test_retry_delay_and_max_attempts_default_to_the_settings():
    with override_settings(PGPUBSUB_MAX_ATTEMPTS=7, PGPUBSUB_RETRY_DELAY=1.5):
        assert retries.max_attempts(channels.Job) == 7
        assert retries.retry_delay(channels.Job) == 1.5
        assert retries.max_attempts(channels.Flaky) == 3  # the channel's own
    assert retries.max_attempts(channels.Job) == 5
    assert retries.retry_delay(channels.Job) == 2.0
    for failures in range(1, 12):
        wait = retries.backoff(channels.Job, failures)
        longest = min(300.0, 2.0 * 2 ** (failures - 1))
        assert longest / 2 <= wait <= longest
    with override_settings(PGPUBSUB_RETRY_MAX_DELAY=5):
        assert retries.backoff(channels.Job, 30) <= 5


@pytest.mark.parametrize(
    ("attribute", "value", "message"),
    [
        ("max_attempts", 0, "max_attempts must be a positive int or None, not 0"),
        ("max_attempts", True, "max_attempts must be a positive int or None, not True"),
        ("retry_delay", -1, "retry_delay must be a positive number of seconds or None, not -1"),
        ("retry_delay", "2", "retry_delay must be a positive number of seconds or None, not '2'"),
    ],
)
def test_bad_retry_attributes_fail_when_the_runtime_is_made(attribute, value, message):
    setattr(channels.Flaky, attribute, value)
    try:
        with pytest.raises(ValueError, match=message):
            Runtime(channels=[channels.Flaky])
    finally:
        setattr(channels.Flaky, attribute, {"max_attempts": 3, "retry_delay": 0.2}[attribute])


def fail_for_good(key: str) -> Notification:
    pgpubsub.notify(channels.Flaky, key=key, failures=3)
    return wait_for(
        lambda: (row := row_of(key)) and row.failed_at is not None and row,
        30,
        f"{key} to be marked failed",
    )


def test_retry_failed_gives_failed_rows_new_attempts(runtimes):
    runtimes(channels=[channels.Flaky], workers=2)
    failed = fail_for_good("fixed-later")
    # Before: the listener fails 3 times, so its 4th attempt (the first after a retry) succeeds.

    assert pgpubsub.retry_failed() == 1
    wait_for(lambda: effects("Flaky") == ["fixed-later"], 30, "the retried message")
    assert not Notification.objects.filter(pk=failed.pk).exists()
    assert len(flaky_attempts["fixed-later"]) == 4
    assert pgpubsub.retry_failed() == 0


def test_retry_failed_by_channel_and_by_id(runtimes):
    runtimes(channels=[channels.Flaky], workers=2)
    first, second = fail_for_good("one"), fail_for_good("two")

    assert pgpubsub.retry_failed(channels=[channels.Job]) == 0  # none of that channel
    assert pgpubsub.retry_failed(ids=[first.pk]) == 1
    wait_for(lambda: effects("Flaky") == ["one"], 30, "the retried message")
    assert Notification.objects.get(pk=second.pk).status == Notification.FAILED
    assert pgpubsub.retry_failed(channels=[channels.Flaky]) == 1
    wait_for(lambda: effects("Flaky") == ["one", "two"], 30, "the other one")


def test_retry_command(runtimes):
    runtimes(channels=[channels.Flaky], workers=2)
    failed = fail_for_good("by-command")
    out = StringIO()

    call_command("pgpubsub", "retry", "--ids", str(failed.pk), stdout=out)
    assert out.getvalue().strip() == "Retried 1 stored notification(s)."
    wait_for(lambda: effects("Flaky") == ["by-command"], 30, "the retried message")
    call_command("pgpubsub", "retry", stdout=out)
    assert out.getvalue().splitlines()[-1] == "Retried 0 stored notification(s)."


@pytest.mark.parametrize("together", [1, 3], ids=["own-transaction", "batch"])
def test_a_database_error_in_a_listener_is_a_failed_attempt_not_a_lost_connection(
    runtimes, together
):
    runtime = runtimes(channels=[channels.Duplicating], workers=1)
    send_together(channels.Duplicating, together, "dup-")
    wait_marked_failed(together)
    for row in Notification.objects.all():
        assert row.attempts == 2
        assert row.last_error.startswith("IntegrityError: duplicate key value")
    status = runtime.status()
    assert status["failed"] == 2 * together and status["reconnects"] == 0


@pytest.mark.parametrize("together", [1, 3], ids=["own-transaction", "batch"])
def test_a_listener_that_dooms_its_transaction_fails_instead_of_vanishing(runtimes, together):
    runtimes(channels=[channels.Swallowing, channels.Job], workers=1)
    with transaction.atomic():
        for number in range(together):
            pgpubsub.notify(channels.Swallowing, key=f"doomed-{number}")
        pgpubsub.notify(channels.Job, key="bystander")

    wait_marked_failed(together)
    for row in Notification.objects.all():
        assert row.last_error.startswith("TransactionManagementError: A listener caught")
    assert list(Effect.objects.values_list("key", flat=True)) == ["bystander"]


@pytest.fixture
def listener_runs():
    from tests.testapp.listeners import runs

    runs.clear()
    yield runs
    runs.clear()


@pytest.mark.parametrize("together", [1, 3], ids=["own-transaction", "batch"])
def test_an_error_whose_text_postgres_cannot_store_is_recorded_all_the_same(
    runtimes, listener_runs, together
):
    runtimes(channels=[channels.Garbled], workers=1)
    send_together(channels.Garbled, together, "g")
    wait_marked_failed(together)
    for row in Notification.objects.all():
        assert row.attempts == 2
        assert row.last_error.startswith("ValueError: upstream said: \\x00binary \\ud800 for g")
    # Recording did not break the batch: each message ran once per attempt.
    assert sorted(listener_runs) == sorted(f"g{n}" for n in range(together) for _ in range(2))


def test_backoff_counts_from_the_failure_not_from_the_start_of_the_batch():
    from pgpubsub.processing import Processor

    pgpubsub.notify(channels.Flaky, key="slow", failures=0, seconds=1.5)
    pgpubsub.notify(channels.Flaky, key="late-failure", failures=1)
    ids = list(Notification.objects.order_by("id").values_list("id", flat=True))
    Processor("default").process_stored_rows(channels.Flaky, ids)  # one batch
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT attempts, extract(epoch FROM next_attempt_at - clock_timestamp()) "
            "FROM pgpubsub_notification"
        )
        ((attempts, wait),) = cursor.fetchall()
    assert attempts == 1
    assert wait > 0.05  # retry_delay 0.2 s, cut by up to a half, after the batch committed


@override_settings(PGPUBSUB_SWEEP_INTERVAL=30)
def test_a_retry_comes_after_its_delay_once_the_batch_that_recorded_it_committed(runtimes):
    runtimes(channels=[channels.Flaky], workers=2)
    with transaction.atomic():  # one batch: the slow message holds it for 1.5 s
        pgpubsub.notify(channels.Flaky, key="early-failure", failures=1)
        pgpubsub.notify(channels.Flaky, key="slow", failures=0, seconds=1.5)

    wait_for(lambda: len(flaky_attempts.get("early-failure", [])) == 2, 20, "the retry")
    first, second = flaky_attempts["early-failure"]
    assert second - first < 1.5 + 3.0  # not the 30 s of the periodic sweep


@override_settings(PGPUBSUB_SWEEP_INTERVAL=30)
def test_each_failed_message_is_retried_after_its_own_delay(runtimes):
    runtimes(channels=[channels.Flaky], workers=2)
    pgpubsub.notify(channels.Flaky, key="a", failures=1)
    wait_for(lambda: "a" in flaky_attempts, 10, "a's first attempt")
    pgpubsub.notify(channels.Flaky, key="b", failures=1, seconds=0.1)

    wait_for(
        lambda: len(flaky_attempts.get("a", [])) == 2 and len(flaky_attempts.get("b", [])) == 2,
        20,
        lambda: f"both retries; {flaky_attempts}",
    )
    for key in "ab":
        first, second = flaky_attempts[key]
        assert second - first < 3.0, (key, second - first)


def test_a_listener_that_keeps_losing_its_connection_is_put_off_then_marked_failed(
    runtimes, listener_runs
):
    runtime = runtimes(channels=[channels.Outlasting], workers=1)
    started = time.monotonic()
    pgpubsub.notify(channels.Outlasting, key="outlasting")

    row = wait_for(
        lambda: (row := Notification.objects.first()) and row.failed_at and row,
        45,
        lambda: f"the row to be marked failed; {list(Notification.objects.values())}",
    )
    assert row.attempts == channels.Outlasting.max_attempts
    assert row.last_error.startswith("ConnectionLost: the database connection was lost")
    # Two losses in a row before the first one counts (the server may just have restarted),
    # then one per attempt; not a loop.
    assert 2 + channels.Outlasting.max_attempts <= len(listener_runs) <= 8, len(listener_runs)
    assert time.monotonic() - started < 45
    assert not Effect.objects.exists()
    assert runtime.status()["running"]


def test_a_failure_receiver_s_database_error_changes_nothing_in_a_batch():
    from pgpubsub.processing import Processor
    from pgpubsub.signals import message_failed

    def broken_metrics(sender, **kwargs):
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1/0")

    for key, failures in [("ok1", 0), ("bad", 1), ("ok2", 0)]:
        pgpubsub.notify(channels.Flaky, key=key, failures=failures)
    ids = list(Notification.objects.order_by("id").values_list("id", flat=True))
    message_failed.connect(broken_metrics)
    try:
        done = Processor("default").process_stored_rows(channels.Flaky, ids)
    finally:
        message_failed.disconnect(broken_metrics)
    assert done == 2
    assert {key: len(times) for key, times in flaky_attempts.items()} == {
        "ok1": 1,
        "bad": 1,
        "ok2": 1,
    }
    assert effects("Flaky") == ["ok1", "ok2"]
    assert Notification.objects.get().attempts == 1


def test_no_other_listener_runs_a_message_while_its_failed_attempt_is_recorded():
    """Listener A's attempt of a message fails. Until A has recorded the attempt, listener B
    cannot claim the row: otherwise B runs the message a time more than is counted (and, on
    its last attempt, once more than ``max_attempts``)."""
    from pgpubsub.processing import Processor
    from pgpubsub.signals import message_failed

    pgpubsub.notify(channels.Flaky, key="raced", failures=99)
    row = row_of("raced")
    last = channels.Flaky.max_attempts - 1
    Notification.objects.filter(pk=row.pk).update(attempts=last)  # the last attempt is next
    other_attempts: list[bool] = []

    def listener_b() -> None:
        try:
            other_attempts.append(Processor().process_stored_rows(channels.Flaky, [row.pk]) == 1)
        finally:
            connections.close_all()

    def meanwhile(sender, row_id, **kwargs):
        if threading.current_thread().name != "listener-b" and not other_attempts:
            thread = threading.Thread(target=listener_b, name="listener-b")
            thread.start()
            thread.join(30)
            assert not thread.is_alive()

    message_failed.connect(meanwhile, sender=channels.Flaky)
    try:
        assert Processor().process_stored_rows(channels.Flaky, [row.pk]) == 0
    finally:
        message_failed.disconnect(meanwhile, sender=channels.Flaky)
    assert other_attempts == [False]  # B found the row held
    assert len(flaky_attempts["raced"]) == 1
    row.refresh_from_db()
    assert row.failed_at is not None
    assert row.attempts == channels.Flaky.max_attempts


@pytest.fixture
def failing_runs():
    from tests.testapp.listeners import failing_runs

    failing_runs.clear()
    yield failing_runs
    failing_runs.clear()


def assert_runs_apart(runs: list[tuple[str, str, float, float]], keys: list[str], each: int):
    """Each message of ``keys`` ran ``each`` times, and never twice at once."""
    by_key: dict[str, list[tuple[float, float]]] = {key: [] for key in keys}
    for key, _, started, ended in runs:
        by_key[key].append((started, ended))
    assert {key: len(times) for key, times in by_key.items()} == dict.fromkeys(keys, each)
    for key, times in by_key.items():
        times.sort()
        for (_, ended), (started, _) in itertools.pairwise(times):
            assert started >= ended, f"{key} ran twice at once: {times}"


@override_settings(PGPUBSUB_SWEEP_INTERVAL=0.2)
def test_runtimes_racing_for_failing_messages_run_each_max_attempts_times_never_at_once(
    runtimes, failing_runs
):
    """Two Runtimes (as two web processes) receive every NOTIFY and sweep often; messages
    always fail, and a receiver of message_failed takes a while (a slow metrics call). Each
    message runs exactly ``max_attempts`` times, one run at a time; after ``retry_failed()``
    (the admin's "Retry now"), as many times again."""
    from pgpubsub.signals import message_failed

    def slow_metrics(sender, **kwargs):
        time.sleep(0.05)

    for _ in range(2):
        runtimes(channels=[channels.AlwaysFailing], workers=2)
    keys = [f"alone{n}" for n in range(4)] + [f"together{n}" for n in range(4)]
    limit = channels.AlwaysFailing.max_attempts
    message_failed.connect(slow_metrics, sender=channels.AlwaysFailing)
    try:
        for key in keys[:4]:  # each in a transaction of its own
            pgpubsub.notify(channels.AlwaysFailing, key=key)
        send_together(channels.AlwaysFailing, 4, "together")
        wait_marked_failed(len(keys))
        assert_runs_apart(failing_runs, keys, limit)
        assert [row.attempts for row in Notification.objects.all()] == [limit] * len(keys)

        assert pgpubsub.retry_failed() == len(keys)
        wait_for(
            lambda: (
                len(failing_runs) >= 2 * limit * len(keys)
                and Notification.objects.filter(failed_at__isnull=False).count() == len(keys)
            ),
            30,
            lambda: f"the retried rows to fail again; {len(failing_runs)} runs",
        )
        assert_runs_apart(failing_runs, keys, 2 * limit)
        assert [row.attempts for row in Notification.objects.all()] == [limit] * len(keys)
    finally:
        message_failed.disconnect(slow_metrics, sender=channels.AlwaysFailing)


def test_a_batch_stopped_midway_gives_its_other_messages_back_uncharged():
    from pgpubsub.processing import Processor

    for key, seconds in [("first", 0.3), ("second", 0), ("third", 0)]:
        pgpubsub.notify(channels.Flaky, key=key, failures=0, seconds=seconds)
    ids = list(Notification.objects.order_by("id").values_list("id", flat=True))
    stopping = threading.Event()

    def stop_once_started() -> None:
        wait_for(lambda: "first" in flaky_attempts, 10, "the first message to start")
        stopping.set()

    thread = threading.Thread(target=stop_once_started)
    thread.start()
    try:
        done = Processor("default", stopping=stopping).process_stored_rows(channels.Flaky, ids)
    finally:
        thread.join(10)
    assert done == 1  # the one that was running finished; the others did not start
    assert set(flaky_attempts) == {"first"}
    rows = list(Notification.objects.order_by("id").values("attempts", "next_attempt_at"))
    assert rows == [{"attempts": 0, "next_attempt_at": None}] * 2
    assert Processor("default").process_stored_rows(channels.Flaky, ids) == 2  # due at once
    assert effects("Flaky") == ["first", "second", "third"]


@pytest.mark.django_db(transaction=True, databases=["default", "side"])
def test_a_lost_connection_is_not_counted_as_an_attempt(runtimes, listener_runs):
    """The process lives and knows what it claimed: it gives the row back uncounted (not left
    claimed, which the next claim would count as the attempt of a process that died)."""
    runtime = runtimes(channels=[channels.Disconnecting], workers=1)
    pgpubsub.notify(channels.Disconnecting, key="cut")

    row = wait_for(
        lambda: (row := row_of("cut")) and row.failed_at and row,
        30,
        lambda: f"the row to be marked failed; {list(Notification.objects.values())}",
    )
    assert listener_runs == ["cut"] * 3  # the lost run, then max_attempts (2) failed ones
    assert row.attempts == channels.Disconnecting.max_attempts
    assert row.last_error == "RuntimeError: cut fails after its connection was lost"
    assert runtime.status()["failed"] == 2


@pytest.mark.django_db(transaction=True, databases=["default", "side"])
def test_a_connection_lost_while_claiming_counts_no_loss():
    """Losing the connection at the claim is neither an attempt nor a loss: no listener ran,
    and the rows may not even have been claimed. A row whose listeners lost the connection
    twice in a row is not charged a third time there."""
    from pgpubsub.losses import Losses
    from pgpubsub.processing import Processor

    pgpubsub.notify(channels.Flaky, key="claimed-after-losses", failures=0)
    row = Notification.objects.get()
    losses = Losses()
    losses.lost([row.pk])
    losses.lost([row.pk])  # two losses in a row while its listeners ran
    processor = Processor("default", losses=losses)
    connection.ensure_connection()
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (pid,) = cursor.fetchone()
    with connections["side"].cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(%s, 5000)", [pid])
    assert processor.process_stored_rows(channels.Flaky, [row.pk]) == 0  # the claim failed
    row.refresh_from_db()
    assert (row.attempts, row.last_error, row.claimed_by, row.failed_at) == (0, None, None, None)
    assert processor.process_stored_rows(channels.Flaky, [row.pk]) == 1  # on a new connection
    assert flaky_attempts["claimed-after-losses"]
