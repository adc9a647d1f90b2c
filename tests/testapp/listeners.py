"""Listeners of the test app. In-process listeners append to ``received``; the others write
``Effect`` rows, which tests read from any process."""

import asyncio
import os
import threading
import time

import pgtrigger
from django.db import IntegrityError, connection, connections, transaction
from django.db.models import F

import pgpubsub
from pgpubsub.triggers import Notify
from tests.testapp import channels
from tests.testapp.models import Effect, Marker, Post

#: (channel name, keyword arguments) of each in-process delivery, in order.
received: list[tuple[str, dict]] = []


@pgpubsub.listener(channels.PostReads)
def count_read(model_id: int, model_type: str) -> None:
    Post.objects.filter(pk=model_id).update(read_count=F("read_count") + 1)


@pgpubsub.listener(channels.Everything)
def record_everything(**kwargs) -> None:
    received.append(("Everything", kwargs))


@pgpubsub.listener(channels.Message)
def record_message(key: str, text: str) -> None:
    received.append(("Message", {"key": key, "text": text}))
    if text == "write-then-fail":
        Effect.objects.create(key=key, channel="Message")
        raise RuntimeError(f"message {key} failed on purpose")


@pgpubsub.listener(channels.Message)
def record_message_again(key: str, text: str) -> None:
    received.append(("Message.second", {"key": key, "text": text}))


@pgpubsub.listener(channels.Job)
def run_job(key: str, text: str) -> None:
    Effect.objects.create(key=key, channel="Job", value=text[:100], pid=os.getpid())
    if text == "fail":
        raise RuntimeError(f"job {key} failed on purpose")
    if text == "dangling":  # violates a deferred foreign key: fails only at commit
        Post.objects.create(author_id=2_000_000_000, content=key)
    received.append(("Job", {"key": key, "text": text}))


@pgpubsub.listener(channels.FailingJob)
def fail_job(key: str) -> None:
    Effect.objects.create(key=key, channel="FailingJob", pid=os.getpid())
    raise RuntimeError(f"job {key} failed on purpose")


@pgpubsub.post_insert_listener(channels.AuthorTrigger)
def write_first_post(old, new) -> None:
    Post.objects.create(author_id=new.pk, content=f"first post of {new.name}")
    Effect.objects.create(
        key=f"author-{new.pk}", channel="AuthorTrigger", value=new.name, pid=os.getpid()
    )


@pgpubsub.post_save_listener(channels.PostTrigger)
def record_post(old, new, **extra) -> None:
    received.append(("PostTrigger", {"old": old, "new": new, **extra}))


@pgpubsub.post_delete_listener(channels.PostTrigger)
def record_post_delete(old, new, **extra) -> None:
    received.append(("PostTrigger.delete", {"old": old, "new": new, **extra}))


@pgpubsub.post_save_listener(channels.DocumentTrigger)
def record_document(old, new) -> None:
    received.append(("DocumentTrigger", {"old": old, "new": new}))


@pgpubsub.post_insert_listener(channels.LockedDocumentTrigger)
def record_locked_document(old, new) -> None:
    Effect.objects.create(
        key=f"document-{new.pk}",
        channel="LockedDocumentTrigger",
        value=str(len(new.body)),
        pid=os.getpid(),
    )
    received.append(("LockedDocumentTrigger", {"old": old, "new": new}))


@pgpubsub.post_save_listener(channels.ChildTrigger)
def record_child(old, new) -> None:
    received.append(("ChildTrigger", {"old": old, "new": new}))


@pgpubsub.pre_delete_listener(channels.DocumentDeleting)
def record_document_deleting(old, new) -> None:
    received.append(("DocumentDeleting", {"old": old, "new": new}))


@pgpubsub.pre_save_listener(channels.PostTimings)
def record_before_save(old, new, **extra) -> None:
    received.append(("PostTimings.before", {"old": old, "new": new}))


@pgpubsub.post_save_listener(channels.PostTimings)
def record_after_save(old, new, **extra) -> None:
    received.append(("PostTimings.after", {"old": old, "new": new}))


@pgpubsub.post_delete_listener(channels.PostTimings)
def record_after_delete(old, new, **extra) -> None:
    received.append(("PostTimings.delete", {"old": old, "new": new}))


@pgpubsub.pre_insert_listener(channels.AuthorEvents)
def record_author_pre_insert(old, new, **extra) -> None:
    received.append(("AuthorEvents.pre_insert", {"old": old, "new": new}))


@pgpubsub.pre_update_listener(channels.AuthorEvents)
def record_author_pre_update(old, new, **extra) -> None:
    received.append(("AuthorEvents.pre_update", {"old": old, "new": new}))


@pgpubsub.post_update_listener(channels.AuthorEvents)
def record_author_post_update(old, new, **extra) -> None:
    received.append(("AuthorEvents.post_update", {"old": old, "new": new}))


@pgpubsub.trigger_listener(
    channels.AuthorRenamed,
    Notify(
        name=channels.AuthorRenamed.listen_safe_name(),
        when=pgtrigger.After,
        operation=pgtrigger.Update,
        condition=pgtrigger.Condition('OLD."name" IS DISTINCT FROM NEW."name"'),
    ),
)
def record_author_renamed(old, new, **extra) -> None:
    received.append(("AuthorRenamed", {"old": old, "new": new}))


@pgpubsub.listener(channels.Broadcast)
def record_broadcast(key: str) -> None:
    # The unique key makes a second delivery of one message to one process fail loudly.
    Effect.objects.create(key=f"{key}@{os.getpid()}", channel="Broadcast", pid=os.getpid())


#: Keys of the SlowJob messages whose listener has started, in-process.
slow_jobs_started: list[str] = []


@pgpubsub.listener(channels.SlowJob)
def run_slow_job(key: str, seconds: float) -> None:
    slow_jobs_started.append(key)
    time.sleep(seconds)
    thread = threading.current_thread().name
    Effect.objects.create(key=key, channel="SlowJob", value=thread, pid=os.getpid())


#: (channel, key, thread name, started, ended) of each Timed / InOrder message, in-process.
timings: list[tuple[str, str, str, float, float]] = []


def _timed(channel: str, key: str, seconds: float) -> None:
    started = time.monotonic()
    time.sleep(seconds)
    timings.append((channel, key, threading.current_thread().name, started, time.monotonic()))


@pgpubsub.listener(channels.Timed)
def record_timed(key: str, seconds: float) -> None:
    _timed("Timed", key, seconds)


@pgpubsub.listener(channels.InOrder)
def record_in_order(key: str, seconds: float) -> None:
    _timed("InOrder", key, seconds)


#: The ``seq`` of each Ledger message, in the order they ran (in-process).
ledger: list[int] = []


@pgpubsub.listener(channels.Ledger)
def record_ledger(seq: int) -> None:
    time.sleep(0.02)
    ledger.append(seq)


@pgpubsub.listener(channels.Cancelled)
def cancel(key: str) -> None:
    raise asyncio.CancelledError(key)


#: Keys of the Hooked messages whose on_commit() function ran (in-process).
hooks_ran: list[str] = []


@pgpubsub.listener(channels.Hooked)
def hook_on_commit(key: str) -> None:
    Effect.objects.create(key=key, channel="Hooked", pid=os.getpid())

    def after_commit() -> None:
        if key.startswith("bad"):
            raise RuntimeError(f"on_commit function of {key} failed on purpose")
        hooks_ran.append(key)

    transaction.on_commit(after_commit)


#: Key -> monotonic time of each attempt of a Flaky message, in-process.
flaky_attempts: dict[str, list[float]] = {}


@pgpubsub.listener(channels.Flaky)
def run_flaky(key: str, failures: int, seconds: float) -> None:
    attempts = flaky_attempts.setdefault(key, [])
    attempts.append(time.monotonic())
    time.sleep(seconds)
    # Written before failing: the failed attempt's rollback must undo it (the key is unique).
    Effect.objects.create(key=key, channel="Flaky", value=str(len(attempts)), pid=os.getpid())
    if len(attempts) <= failures:
        raise RuntimeError(f"flaky {key} failed on attempt {len(attempts)}")


@pgpubsub.listener(channels.ChaosJob)
def run_chaos_job(key: str, fail: str) -> None:
    if fail == "always":
        raise RuntimeError(f"chaos job {key} always fails")
    if fail == "once":
        # The marker commits on a connection of its own, whatever this attempt does next.
        _, first = Marker.objects.using("side").get_or_create(key=key)
        if first:
            raise RuntimeError(f"chaos job {key} fails on its first attempt")
    Effect.objects.create(key=key, channel="ChaosJob", pid=os.getpid())


@pgpubsub.listener(channels.Relay)
def relay(key: str, again: int) -> None:
    pgpubsub.notify(channels.Job, key=f"{key}-relayed", text="relayed")
    if again:
        pgpubsub.notify(channels.Relay, key=f"{key}+", again=again - 1)


@pgpubsub.listener(channels.LockedRelay)
def locked_relay(key: str) -> None:
    Effect.objects.create(key=key, channel="LockedRelay", pid=os.getpid())
    pgpubsub.notify(channels.Job, key=f"{key}-relayed", text="relayed")
    pgpubsub.notify(channels.Message, key=f"{key}-relayed", text="relayed")


@pgpubsub.listener(channels.Duplicating)
def duplicate(key: str) -> None:
    Effect.objects.create(key=key, channel="Duplicating")
    Effect.objects.create(key=key, channel="Duplicating")


@pgpubsub.listener(channels.Swallowing)
def swallow(key: str) -> None:
    Effect.objects.create(key=key, channel="Swallowing")
    try:
        with transaction.atomic(savepoint=False):
            Effect.objects.create(key=key, channel="Swallowing")
    except IntegrityError:
        pass  # the transaction is doomed all the same


#: Keys of the Garbled / Outlasting messages, once per run of their listener (in-process).
runs: list[str] = []


@pgpubsub.listener(channels.Garbled)
def garble(key: str) -> None:
    runs.append(key)
    raise ValueError(f"upstream said: \x00binary \ud800 for {key}")


@pgpubsub.listener(channels.Outlasting)
def outlast(key: str) -> None:
    runs.append(key)
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL idle_in_transaction_session_timeout = '200ms'")
    time.sleep(0.5)  # a slow call to another service, in the middle of the transaction
    Effect.objects.create(key=key, channel="Outlasting")


@pgpubsub.listener(channels.PlainSwallowing)
def swallow_plain(key: str) -> None:
    Effect.objects.create(key=key, channel="PlainSwallowing")
    try:
        with transaction.atomic(savepoint=False):
            Effect.objects.create(key=key, channel="PlainSwallowing")
    except IntegrityError:
        pass


#: (key, thread name, started, ended) of each run of an AlwaysFailing message (in-process).
failing_runs: list[tuple[str, str, float, float]] = []


@pgpubsub.listener(channels.AlwaysFailing)
def always_fail(key: str, seconds: float) -> None:
    started = time.monotonic()
    try:
        time.sleep(seconds)
    finally:
        failing_runs.append((key, threading.current_thread().name, started, time.monotonic()))
    raise RuntimeError(f"{key} always fails")


@pgpubsub.listener(channels.Crashing)
def crash(key: str, log: str) -> None:
    with open(log, "a") as file:  # what the test counts: each run, before the process dies
        file.write(f"{key} {os.getpid()}\n")
        file.flush()
        os.fsync(file.fileno())
    if key.startswith("innocent"):  # the others of a poison message's batch
        Effect.objects.create(key=key, channel="Crashing")
        return
    if os.environ.get("PGPUBSUB_TEST_CRASH") != "1":
        raise RuntimeError("Crashing ends only processes started with PGPUBSUB_TEST_CRASH=1")
    os._exit(1)


@pgpubsub.listener(channels.Disconnecting)
def disconnect_then_fail(key: str) -> None:
    runs.append(key)
    if runs.count(key) == 1:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            (pid,) = cursor.fetchone()
        with connections["side"].cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(%s, 5000)", [pid])
        Effect.objects.create(key=key, channel="Disconnecting")  # fails: the session is gone
    raise RuntimeError(f"{key} fails after its connection was lost")


#: Keys of the Mixed messages whose on_commit() function ran (in-process).
mixed_hooks_ran: list[str] = []


@pgpubsub.listener(channels.Mixed)
def run_mixed(key: str, action: str) -> None:
    """``action``: words joined by ``-``, done in order: ``write`` (an Effect), ``hook`` (an
    on_commit() function), ``dangling`` (a deferred foreign key violated), ``fail``."""
    received.append(("Mixed", {"key": key, "action": action}))
    for step in action.split("-"):
        if step == "write":
            Effect.objects.create(key=key, channel="Mixed", pid=os.getpid())
        elif step == "hook":
            transaction.on_commit(lambda: mixed_hooks_ran.append(key))
        elif step == "dangling":
            Post.objects.create(author_id=2_000_000_000, content=key)
        elif step == "fail":
            raise RuntimeError(f"mixed {key} failed on purpose")


#: Keys of the Guarded messages whose on_commit() function ran (in-process).
guarded_hooks_ran: list[str] = []

#: Keys of the Guarded messages that already raised GuardedStop once (in-process).
guarded_stopped: set[str] = set()


class GuardedStop(BaseException):
    """Not an Exception: what a process that is being stopped raises in a listener."""


def _guarded_step(key: str, step: str) -> None:
    if step == "write":
        Effect.objects.create(key=key, channel="Guarded")
    elif step == "hook":
        transaction.on_commit(lambda: guarded_hooks_ran.append(key))
    elif step == "fail":
        raise RuntimeError(f"guarded {key} failed on purpose")
    elif step == "dangling":  # a deferred foreign key violated: fails at the check
        Post.objects.create(author_id=2_000_000_000, content=key)
    elif step == "atomic":  # a nested atomic block: its savepoint is the first statement
        with transaction.atomic():
            Effect.objects.create(key=f"{key}/atomic", channel="Guarded")
    elif step == "atomicfail":
        with transaction.atomic():
            Effect.objects.create(key=f"{key}/atomic", channel="Guarded")
            raise RuntimeError(f"guarded {key} failed inside atomic")
    elif step == "nosavepoint":  # atomic(savepoint=False) around a write, then failing in it
        with transaction.atomic(savepoint=False):
            Effect.objects.create(key=f"{key}/nosavepoint", channel="Guarded")
            raise RuntimeError(f"guarded {key} failed inside atomic(savepoint=False)")
    elif step == "dup":  # a first statement that fails (the key "taken" exists)
        Effect.objects.create(key="taken", channel="Guarded")
    elif step == "zero":  # a first statement that fails, through Django's cursor
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1 / 0")
    elif step == "caughtnosavepoint":  # caught inside atomic(savepoint=False): doomed
        with transaction.atomic(savepoint=False):
            try:
                Effect.objects.create(key="taken", channel="Guarded")
            except IntegrityError:
                pass
    elif step == "caughtsavepoint":  # Django's own pattern: the inner savepoint undoes it
        try:
            with transaction.atomic():
                Effect.objects.create(key="taken", channel="Guarded")
        except IntegrityError:
            pass
    elif step == "caughtcursor":  # caught outside any atomic block: the transaction is aborted
        from django.db import DatabaseError

        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1 / 0")
        except DatabaseError:
            pass
    elif step == "rollback":
        transaction.set_rollback(True)
    elif step == "notify":  # through Django's cursor: a message of the message's own
        pgpubsub.notify(channels.Job, key=f"{key}/job")
    elif step == "drain":  # a Processor of its own, on the same connection, inside the batch
        from pgpubsub.models import Notification
        from pgpubsub.processing import Processor

        ids = list(Notification.from_channel(channels.Job).values_list("pk", flat=True))
        Processor().process_stored_rows(channels.Job, ids)
    elif step == "driverwrite":  # on the driver's connection, past Django's cursors
        with connection.connection.cursor() as cursor:
            cursor.execute(
                "INSERT INTO testapp_effect (key, channel, value) VALUES (%s, 'Guarded', '')",
                [f"{key}/driver"],
            )
    elif step == "drivererror":  # a failing statement on the driver's connection
        with connection.connection.cursor() as cursor:
            cursor.execute("SELECT 1 / 0")
    elif step == "callproc":  # Django's cursor, but callproc(), past its execute wrappers
        with connection.cursor() as cursor:
            cursor.callproc("guarded_write", [f"{key}/callproc"])
    elif step == "stop" and key not in guarded_stopped:
        guarded_stopped.add(key)
        raise GuardedStop(key)


@pgpubsub.listener(channels.Guarded)
def run_guarded(key: str, action: str) -> None:
    """``action``: steps joined by ``-``, done in order (see ``_guarded_step``)."""
    received.append(("Guarded", {"key": key, "action": action}))
    for step in action.split("-"):
        _guarded_step(key, step)
