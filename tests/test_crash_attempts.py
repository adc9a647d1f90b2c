"""A listener that kills its own process (``os._exit()``, a segmentation fault, the OOM killer)
is charged a failed attempt, so that a poison message ends up marked failed after
``max_attempts`` runs instead of killing every process that claims it, forever.

Real ``manage.py listen`` processes, restarted by the test as a supervisor would; and what the
next claim of a row does with the claim a dead process left on it."""

from __future__ import annotations

import time

import pytest
from django.db import connection, transaction
from django.db.models.functions import Now

import pgpubsub
from pgpubsub.models import Notification
from pgpubsub.signals import message_failed
from tests.processes import outputs, wait_for
from tests.testapp import channels
from tests.testapp.models import Effect

pytestmark = pytest.mark.django_db(transaction=True)

#: Environment of the listen processes: the listener may end them, and they sweep often (a
#: dead process's rows are claimed again once their claim has run out).
ENV = {"PGPUBSUB_TEST_CRASH": "1", "PGPUBSUB_TEST_SWEEP_INTERVAL": "0.5"}
#: Listen processes alive at once: they race for each NOTIFY and sweep.
ALIVE = 2


def start(processes):
    return processes.start(
        "--channels", "tests.testapp.channels.Crashing", "--recover", ready=None, env=ENV
    )


@pytest.mark.timeout(120)
def test_a_listener_that_kills_its_process_ends_marked_failed_after_max_attempts(
    processes, tmp_path
):
    log = tmp_path / "runs"
    limit = channels.Crashing.max_attempts
    alive = [start(processes) for _ in range(ALIVE)]
    for process in alive:
        process.wait_listening()
    pgpubsub.notify(channels.Crashing, key="poison", log=str(log))

    def failed():
        return Notification.objects.filter(failed_at__isnull=False).first()

    def runs() -> list[str]:
        return log.read_text().splitlines() if log.exists() else []

    died = []
    while not failed():
        wait_for(
            lambda: failed() or any(not process.alive for process in alive),
            60,
            lambda: f"a process to die or the row to be marked failed; runs: {runs()}",
        )
        for process in [process for process in alive if not process.alive]:
            assert process.returncode == 1, outputs([process])
            died.append(process)
            alive.remove(process)
            alive.append(start(processes))  # what a supervisor does
        assert len(died) <= limit, f"{len(died)} processes died; {runs()}"

    row = failed()
    assert row.attempts == limit
    assert row.last_error.startswith("ListenerProcessDied: "), row.last_error
    assert len(runs()) == limit, runs()
    assert len(died) == limit
    # The failed row is not run again: not by a sweep, not by its NOTIFY.
    pgpubsub.process_stored_notifications([channels.Crashing])
    time.sleep(2)  # four sweeps of each process: none may claim the row
    assert len(runs()) == limit
    assert all(process.alive for process in alive), outputs(alive)


@pytest.mark.timeout(240)
def test_a_poison_message_in_a_batch_is_charged_its_deaths_and_the_others_are_not(
    processes, tmp_path
):
    """A process that dies running a batch does not say which message killed it: the rows of
    that batch are not charged, and each runs alone next. The poison message, alone, is
    charged each death until it is marked failed; every other message of its batch is
    processed once, whatever its place in the batch."""
    log = tmp_path / "runs"
    limit = channels.Crashing.max_attempts
    keys = [f"innocent-{n}" for n in range(4)] + ["poison"] + [f"innocent-{n}" for n in range(4, 8)]
    with transaction.atomic():  # stored before any process listens: one sweep, one batch
        for key in keys:
            pgpubsub.notify(channels.Crashing, key=key, log=str(log))
    alive = [start(processes) for _ in range(ALIVE)]
    died = []

    def settled() -> bool:
        return Notification.objects.filter(failed_at__isnull=True).count() == 0

    while not settled():
        wait_for(
            lambda: settled() or any(not process.alive for process in alive),
            90,
            lambda: (
                f"a process to die or every row to settle; {Notification.objects.count()} "
                "rows stored"
            ),
        )
        for process in [process for process in alive if not process.alive]:
            assert process.returncode == 1, outputs([process])
            died.append(process)
            alive.remove(process)
            alive.append(start(processes))  # what a supervisor does
        assert len(died) <= limit + 1, f"{len(died)} processes died"

    (row,) = Notification.objects.all()
    assert row.payload["kwargs"]["key"] == "poison"
    assert (row.attempts, row.failed_at is not None) == (limit, True)
    assert row.last_error.startswith("ListenerProcessDied: "), row.last_error
    # The batch's death was nobody's; each of the poison's runs alone was its own.
    assert len(died) == limit + 1
    effects = list(Effect.objects.filter(channel="Crashing").values_list("key", flat=True))
    assert sorted(effects) == sorted(key for key in keys if key != "poison")
    assert all(process.alive for process in alive), outputs(alive)


def dead_claim(key: str, attempts: int = 0) -> Notification:
    """A Job row as a process leaves it when it dies while its listeners run: claimed, its
    lease run out, nothing else written."""
    from pgpubsub import store

    pgpubsub.notify(channels.Job, key=key)
    row = Notification.objects.get(payload__kwargs__key=key)
    Notification.objects.filter(pk=row.pk).update(attempts=attempts)
    (claimed,) = store.claim_ids(
        channels.Job, [row.pk], "dead-host:4242:0123456789ab:1", 5, "default"
    )
    assert claimed.died is None
    Notification.objects.filter(pk=row.pk).update(next_attempt_at=Now())  # the lease ran out
    return row


def test_the_next_claim_counts_the_attempt_of_a_process_that_died():
    from pgpubsub.processing import Processor

    row = dead_claim("survivor")
    failures = []

    def record(sender, **kwargs):
        failures.append((kwargs["row_id"], kwargs["attempt"], kwargs["final"]))

    message_failed.connect(record, sender=channels.Job)
    try:
        assert Processor().process_stored_rows(channels.Job, [row.pk]) == 1
    finally:
        message_failed.disconnect(record, sender=channels.Job)
    assert failures == [(row.pk, 1, False)]
    assert Effect.objects.filter(key="survivor").exists()
    assert not Notification.objects.exists()


def test_a_process_that_died_on_the_last_attempt_leaves_the_row_marked_failed():
    from pgpubsub.processing import Processor

    row = dead_claim("poison", attempts=4)  # Job: 5 attempts
    other = dead_claim("fine")
    assert Processor().process_stored_rows(channels.Job, [row.pk, other.pk]) == 1
    row.refresh_from_db()
    assert (row.attempts, row.failed_at is not None, row.claimed_by) == (5, True, None)
    assert row.last_error == (
        "ListenerProcessDied: the process that claimed it (dead-host:4242:0123456789ab:1) ended "
        "while its listeners ran"
    )
    assert list(Effect.objects.values_list("key", flat=True)) == ["fine"]


def test_the_rows_of_a_batch_whose_process_died_are_not_charged():
    """Which message of a batch ended its process is not known: none is charged, and each
    runs alone."""
    from pgpubsub import store
    from pgpubsub.processing import Processor

    for key in ("first", "second"):
        pgpubsub.notify(channels.Job, key=key)
    ids = sorted(Notification.objects.values_list("id", flat=True))
    assert len(store.claim_ids(channels.Job, ids, "dead-host:4242:0123456789ab", 5, "default")) == 2
    Notification.objects.update(next_attempt_at=Now())  # the lease ran out
    failures = []

    def record(sender, **kwargs):
        failures.append(kwargs["row_id"])

    message_failed.connect(record, sender=channels.Job)
    try:
        assert Processor().process_stored_rows(channels.Job, ids) == 2
    finally:
        message_failed.disconnect(record, sender=channels.Job)
    assert failures == []
    assert sorted(Effect.objects.values_list("key", flat=True)) == ["first", "second"]
    assert not Notification.objects.exists()


def test_rows_claimed_again_by_another_listener_are_left_to_it():
    """A claim whose lease ran out before its rows were locked (a process frozen for that
    long): another listener claimed some of them. This one runs only the others."""
    from pgpubsub import store
    from pgpubsub.batches import Batch
    from pgpubsub.processing import Processor, callbacks_of

    for key in ("kept", "taken"):
        pgpubsub.notify(channels.Job, key=key)
    ids = list(Notification.objects.order_by("id").values_list("id", flat=True))
    processor = Processor()
    claim = store.new_claim()
    rows = store.claim_ids(channels.Job, ids, claim, 5, "default")
    Notification.objects.filter(pk=ids[1]).update(claimed_by="other-host:1:aaaaaaaaaaaa")

    batch = Batch(
        "default",
        channels.Job,
        callbacks_of(channels.Job),
        processor.failures,
        None,
        connection.connection,
    )
    assert processor._run_claimed(batch, rows, claim).processed == 1
    assert list(Effect.objects.values_list("key", flat=True)) == ["kept"]
    assert Notification.objects.get().claimed_by == "other-host:1:aaaaaaaaaaaa"
