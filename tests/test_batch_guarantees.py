"""A batch of stored messages runs in one transaction, each message in a savepoint (shared with
the messages before it that did not use the database): whatever Django's transaction API or
connection a listener uses, each message keeps or loses only its own work, and each listener
runs once."""

import pytest
from django.db import connection, connections, transaction
from hypothesis import given
from hypothesis import strategies as st

import pgpubsub
from pgpubsub import batch_size
from pgpubsub.listen import process_notifications
from pgpubsub.models import Notification
from pgpubsub.sweeps import batches
from tests.testapp import channels
from tests.testapp.listeners import GuardedStop, guarded_hooks_ran, guarded_stopped, received
from tests.testapp.models import Effect, Post

pytestmark = pytest.mark.django_db(transaction=True)


def assert_connection_as_before():
    """The batch left nothing installed on Django's connection."""
    db = connections["default"]
    assert db.execute_wrappers == []
    assert "create_cursor" not in db.__dict__


#: Steps after which a message fails (its listener raises, or its work cannot commit).
FAILING = {
    "fail",
    "dangling",
    "atomicfail",
    "nosavepoint",
    "dup",
    "zero",
    "caughtnosavepoint",
    "caughtcursor",
    "rollback",
    "drivererror",
}

#: The Effect keys each step writes (``{key}`` is the message's key).
WRITES = {
    "write": "{key}",
    "atomic": "{key}/atomic",
    "notify": "{key}/job",  # written by the Job listener, once the message committed
    "driverwrite": "{key}/driver",
    "callproc": "{key}/callproc",
}


@pytest.fixture(autouse=True)
def _clean():
    guarded_hooks_ran.clear()
    guarded_stopped.clear()
    batch_size.forget()
    yield
    guarded_hooks_ran.clear()
    guarded_stopped.clear()
    batch_size.forget()


def guarded_keys():
    return [kwargs["key"] for name, kwargs in received if name == "Guarded"]


def run_batch(listening, actions: list[str]) -> dict[str, list[str]]:
    """Store one Guarded message per action in one transaction (so they run as one batch),
    process them, and check what each kept: returns each key's steps."""
    Effect.objects.create(key="taken", channel="Guarded")  # what "dup" steps collide with
    steps = {f"m{index}": action.split("-") for index, action in enumerate(actions)}
    keys = list(steps)
    with transaction.atomic():
        for key, action in zip(keys, actions, strict=True):
            pgpubsub.notify(channels.Guarded, key=key, action=action)
    good = [key for key in keys if not FAILING & set(steps[key])]
    bad = [key for key in keys if key not in good]
    if bad:
        with pytest.raises(Exception):  # noqa: B017 - the first failure, whichever it is
            process_notifications(listening)
    else:
        process_notifications(listening)
    assert_connection_as_before()
    process_notifications(listening)  # the Job messages the good ones sent (notify steps)

    assert not connection.in_atomic_block
    assert guarded_keys() == keys  # each listener ran once, in order
    written = {
        WRITES[step].format(key=key) for key in good for step in steps[key] if step in WRITES
    }
    assert set(Effect.objects.exclude(key="taken").values_list("key", flat=True)) == written
    assert guarded_hooks_ran == [key for key in keys if key in good and "hook" in steps[key]]
    assert not Post.objects.filter(content__in=keys).exists()
    left = {
        row.payload["kwargs"]["key"]: row for row in Notification.from_channel(channels.Guarded)
    }
    assert sorted(left) == sorted(bad)
    assert all(row.attempts == 1 for row in left.values())
    assert not Notification.from_channel(channels.Job).exists()  # the good ones' were processed
    return steps


@pytest.mark.parametrize(
    "actions",
    [
        # nested atomic blocks: Django's SAVEPOINT is the message's first statement
        ["atomic", "atomicfail", "atomic-hook", "nothing", "hook-atomicfail"],
        # atomic(savepoint=False): a failure in it dooms the transaction, not the batch
        ["nosavepoint", "write-hook", "caughtnosavepoint", "hook", "hook-caughtnosavepoint"],
        # the first statement fails (the lazily opened savepoint, then the statement)
        ["dup", "write", "zero", "hook-write", "hook-zero", "hook-dup"],
        # errors caught inside a savepoint of the listener's own, or on a bare cursor
        ["caughtsavepoint-write-hook", "caughtcursor", "hook", "write-caughtcursor"],
        ["caughtcursor", "nothing", "hook"],
        ["hook-caughtcursor"],
        # set_rollback(True), before or after any statement
        ["hook-rollback", "write-hook", "write-rollback", "hook", "rollback"],
        # notify() from a listener: its message exists only if the listener's work commits
        ["notify", "notify-fail", "hook-notify", "write-notify-dangling", "notify-hook"],
        # deferred constraints, around messages that use the database or do not
        ["write", "hook", "dangling", "hook", "write-dangling"],
        ["dangling", "hook-fail", "hook", "dangling", "dangling"],
    ],
)
def test_each_message_keeps_or_loses_only_its_own_work(listening, actions):
    run_batch(listening, actions)


def test_a_listener_draining_other_stored_messages_keeps_them_only_if_it_succeeds(listening):
    """A Processor inside a listener (on the same connection, inside the batch): what it
    processed is processed only if that message commits."""
    for key in ("j1", "j2"):
        Notification.objects.create(
            channel=channels.Job.listen_safe_name(), payload={"kwargs": {"key": key}}
        )
    with transaction.atomic():
        pgpubsub.notify(channels.Guarded, key="m0", action="drain-fail")
        pgpubsub.notify(channels.Guarded, key="m1", action="write-hook")
    with pytest.raises(RuntimeError, match="guarded m0 failed on purpose"):
        process_notifications(listening)
    assert sorted(Effect.objects.values_list("key", flat=True)) == ["m1"]
    assert Notification.from_channel(channels.Job).count() == 2
    assert guarded_hooks_ran == ["m1"]
    assert_connection_as_before()

    pgpubsub.notify(channels.Guarded, key="m2", action="hook-drain-write")
    process_notifications(listening)
    assert sorted(Effect.objects.values_list("key", flat=True)) == ["j1", "j2", "m1", "m2"]
    assert not Notification.from_channel(channels.Job).exists()
    assert guarded_hooks_ran == ["m1", "m2"]
    assert_connection_as_before()


def test_a_listener_raising_a_base_exception_gives_the_batch_back_uncounted(listening):
    """Not an Exception (the process is being stopped): nothing of the batch commits, its rows
    stay stored, uncounted, and the connection is left as it was, execute wrappers included."""
    with transaction.atomic():
        for key, action in [("m0", "write-hook"), ("m1", "hook-stop"), ("m2", "write")]:
            pgpubsub.notify(channels.Guarded, key=key, action=action)
    with pytest.raises(GuardedStop):
        process_notifications(listening)
    assert_connection_as_before()
    assert not connection.in_atomic_block
    assert not Effect.objects.exists()
    assert guarded_hooks_ran == []
    rows = Notification.from_channel(channels.Guarded)
    assert sorted(row.payload["kwargs"]["key"] for row in rows) == ["m0", "m1", "m2"]
    assert all(row.attempts == 0 for row in rows)

    # Started again, each message runs once more and commits.
    received.clear()
    pgpubsub.process_stored_notifications([channels.Guarded])
    process_notifications(listening)
    assert sorted(Effect.objects.values_list("key", flat=True)) == ["m0", "m2"]
    assert sorted(guarded_hooks_ran) == ["m0", "m1"]
    assert sorted(guarded_keys()) == ["m0", "m1", "m2"]
    assert not Notification.from_channel(channels.Guarded).exists()


def test_a_batch_after_a_failed_batch_opens_its_savepoints_again(listening):
    """The batch's state (the savepoint to open, the message to check) does not leak from
    one batch to the next, whether the previous one ended in a listener's failure or not."""
    run_batch(listening, ["write", "dangling"])
    received.clear()
    guarded_hooks_ran.clear()
    with transaction.atomic():
        pgpubsub.notify(channels.Guarded, key="n0", action="hook")
        pgpubsub.notify(channels.Guarded, key="n1", action="write-fail")
        pgpubsub.notify(channels.Guarded, key="n2", action="write-hook")
    with pytest.raises(RuntimeError, match="guarded n1 failed"):
        process_notifications(listening)
    assert sorted(Effect.objects.exclude(key="taken").values_list("key", flat=True)) == [
        "m0",
        "n2",
    ]
    assert guarded_hooks_ran == ["n0", "n2"]
    assert_connection_as_before()


@given(
    page=st.lists(st.integers(1, 10**9), unique=True, max_size=400).map(sorted),
    size=st.integers(1, batch_size.MAX_BATCH),
    workers=st.integers(1, 16),
)
def test_a_page_is_cut_into_batches_of_at_most_the_batch_size(page, size, workers):
    parts = batches(page, size, workers)
    assert [row for part in parts for row in part] == page  # every row once, in order
    assert all(1 <= len(part) <= size for part in parts)
    assert len(parts) >= min(workers, len(page))  # a short page feeds every worker


def _stored_together(*actions):
    with transaction.atomic():
        for index, action in enumerate(actions):
            pgpubsub.notify(channels.Guarded, key=f"m{index}", action=action)


def _ran():
    return [kwargs["key"] for name, kwargs in received if name == "Guarded"]


def _left():
    return {
        row.payload["kwargs"]["key"]: row.attempts
        for row in Notification.from_channel(channels.Guarded)
    }


def test_a_failing_driver_statement_fails_only_its_own_message(listening):
    """A listener whose first statement goes to the driver's connection and fails (the
    transaction is aborted, no savepoint to roll back to): the others of the batch must keep
    their work and not run again."""
    guarded_hooks_ran.clear()
    _stored_together("hook", "drivererror", "write")  # the first does not use the database
    with pytest.raises(Exception):  # noqa: B017
        process_notifications(listening)
    assert _ran() == ["m0", "m1", "m2"]  # each listener once
    assert sorted(Effect.objects.values_list("key", flat=True)) == ["m2"]
    assert guarded_hooks_ran == ["m0"]
    assert _left() == {"m1": 1}


def test_a_failing_listener_s_driver_writes_are_undone(listening):
    """Its statements on the driver's connection, before any through Django's cursor, then a
    failure: its effects must not commit while its row stays (it would run, and write, again).
    """
    _stored_together("driverwrite-fail", "write")
    with pytest.raises(RuntimeError):
        process_notifications(listening)
    assert sorted(Effect.objects.values_list("key", flat=True)) == ["m1"]
    assert _left() == {"m0": 1}


def _create_guarded_write():
    """The function the ``callproc`` step calls (Django's cursor has ``callproc()`` with either
    driver)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "CREATE OR REPLACE FUNCTION guarded_write(k text) RETURNS void LANGUAGE sql AS "
            "$$ INSERT INTO testapp_effect (key, channel, value) VALUES (k, 'Guarded', '') $$"
        )


def test_a_failing_listener_s_callproc_writes_are_undone(listening):
    """Django's cursor.callproc() goes past Django's execute wrappers."""
    _create_guarded_write()
    _stored_together("callproc-fail", "write")
    with pytest.raises(RuntimeError):
        process_notifications(listening)
    assert sorted(Effect.objects.values_list("key", flat=True)) == ["m1"]
    assert _left() == {"m0": 1}


def test_a_message_using_callproc_keeps_its_work_when_the_next_one_fails(listening):
    """A message that used the database only through callproc() gets a savepoint of its own
    after it: the next message's failure does not undo its work."""
    _create_guarded_write()
    _stored_together("callproc", "fail", "write")
    with pytest.raises(RuntimeError):
        process_notifications(listening)
    assert sorted(Effect.objects.values_list("key", flat=True)) == ["m0/callproc", "m2"]
    assert _left() == {"m1": 1}
