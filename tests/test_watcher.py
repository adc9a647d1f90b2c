"""Writers of lockable channels only store their rows; one Runtime of the deployment, the
watcher (the holder of a session advisory lock), looks for new rows and wakes the listeners.

Real ``manage.py listen`` processes against the test database, real writers in this process,
and a LISTEN session of the test's own to see which NOTIFYs were sent, by which session: the
election, the takeover when the watcher's process is killed or its session cut, one wake-up
for a bulk insert, the sweeps when nobody can watch, a row that commits late, and the NOTIFY a
writer sends when its channel notifies on write.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator

import pytest
from django.db import connection, transaction
from django.test import override_settings

import pgpubsub
from pgpubsub import wire
from pgpubsub.connection import ListenConnection, wait_any
from pgpubsub.db_functions import install_functions
from pgpubsub.models import Notification
from tests.processes import ListenProcess, outputs, wait_for
from tests.testapp import channels
from tests.testapp.models import Author, Document, Effect

pytestmark = pytest.mark.django_db(transaction=True)

#: The watcher's session advisory lock, ``pg_try_advisory_lock(int, int)``: "pgps" and 1.
LOCK_CLASSID = 0x70677073
LOCK_OBJID = 1
#: What a Runtime logs when it becomes the watcher of the test database.
WATCHING = "Watching default for new stored notifications"
LISTENING = "Listening on"
#: Sweeps so rare that whatever a test sees processed was woken by the watcher.
NO_SWEEPS = {"PGPUBSUB_TEST_SWEEP_INTERVAL": "300"}
#: Seconds within which a stored row counts as processed promptly: far below the 300 s between
#: two sweeps, far above the watcher's looks (every 0.5 s at most) on a busy machine.
PROMPT = 10.0
#: Seconds within which another Runtime holds the lock once the watcher is gone: a try every
#: 1-2 s, a reconnection, and a margin for a busy machine.
TAKEOVER = 15.0

JOB = "tests.testapp.channels.Job"

HOLDER_SQL = """
SELECT a.pid, a.application_name
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.classid = %s::oid AND l.objid = %s::oid
  AND l.objsubid = 2 AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""


def lock_holder() -> tuple[int, str] | None:
    """(backend pid, application_name) of the session holding the watcher's lock, if any."""
    with connection.cursor() as cursor:
        cursor.execute(HOLDER_SQL, [LOCK_CLASSID, LOCK_OBJID])
        rows = cursor.fetchall()
    assert len(rows) <= 1, rows
    return rows[0] if rows else None


def watcher_of(listeners: list[ListenProcess]) -> ListenProcess | None:
    """The process whose session holds the watcher's lock, if one of ``listeners`` does."""
    holder = lock_holder()
    return next((p for p in listeners if holder and holder[1] == p.name), None)


def start_listeners(processes, count: int, *args: str, env: dict) -> list[ListenProcess]:
    """``count`` listen processes, once each LISTENs (and so has tried to become the watcher:
    a Runtime tries as soon as its LISTEN session is up)."""
    started = [
        processes.start("--loglevel", "info", *args, ready=None, env=env) for _ in range(count)
    ]
    wait_for(
        lambda: all(LISTENING in process.output() for process in started),
        60,
        "every listen process to listen",
        watch=started,
    )
    return started


def wait_watcher(listeners: list[ListenProcess], timeout: float = TAKEOVER) -> ListenProcess:
    """The process that holds the watcher's lock and said so, once there is one."""
    return wait_for(
        lambda: (found := watcher_of(listeners)) and WATCHING in found.output() and found,
        timeout,
        lambda: f"one of the listen processes to watch; the lock is held by {lock_holder()}",
        watch=[process for process in listeners if process.alive],
    )


def store_jobs(prefix: str, count: int) -> set[str]:
    """``count`` Job messages, each stored by ``notify()`` in a transaction of its own."""
    keys = {f"{prefix}-{number}" for number in range(count)}
    for key in sorted(keys):
        pgpubsub.notify(channels.Job, key=key, text="work")
    return keys


def done(channel: str) -> set[str]:
    return set(Effect.objects.filter(channel=channel).values_list("key", flat=True))


def wait_processed(
    channel: str, keys: set[str], timeout: float, listeners: list[ListenProcess]
) -> float:
    """Seconds until every message of ``keys`` has had its effect, within ``timeout``."""
    started = time.monotonic()
    wait_for(
        lambda: keys <= done(channel),
        timeout,
        lambda: (
            f"{len(keys)} {channel} messages processed, have {len(keys & done(channel))}; "
            f"{Notification.objects.count()} rows stored"
        ),
        watch=[process for process in listeners if process.alive],
    )
    return time.monotonic() - started


def assert_processed_once(expected: dict[str, set[str]], listeners: list[ListenProcess]) -> None:
    """Every expected message had its effect once (the effect's key is unique: a second run
    fails loudly), nothing else did, and no row is left stored."""
    logs = outputs(listeners)
    for channel, keys in expected.items():
        assert done(channel) == keys, logs
    assert Effect.objects.count() == sum(len(keys) for keys in expected.values()), logs
    assert not Notification.objects.exists(), logs
    for process in listeners:
        output = process.output()
        assert "Traceback" not in output and "duplicate key" not in output, outputs([process])


class Ear:
    """A LISTEN session of the test's own: the NOTIFYs sent on some channels, with the backend
    pid of the session that sent each."""

    def __init__(self) -> None:
        self.conn = ListenConnection("default")
        self.conn.connect()
        self.heard: list[tuple[str, str, int]] = []  # (channel, payload, sender's pid)

    def listen(self, *channel_classes) -> None:
        self.conn.listen([channel.listen_safe_name() for channel in channel_classes])

    def hear(self, timeout: float = 0.0) -> list[tuple[str, str, int]]:
        """Everything heard so far, after waiting up to ``timeout`` seconds for more."""
        for item in wait_any([self.conn], timeout):
            self.heard.append((item.channel, item.payload, item.pid))
        return self.heard

    def on(self, channel_cls) -> list[tuple[str, int]]:
        """(payload, sender's pid) of what was heard on ``channel_cls``."""
        name = channel_cls.listen_safe_name()
        return [(payload, pid) for heard, payload, pid in self.hear() if heard == name]

    def close(self) -> None:
        self.conn.close()


def heard_from(ear: Ear, channel_cls, sender: int) -> None:
    """Wait until ``ear`` has heard a wake-up of ``channel_cls`` from backend ``sender``."""
    wait_for(
        lambda: (wire.WAKE, sender) in ear.on(channel_cls),
        PROMPT,
        lambda: f"a wake-up from session {sender}, heard {ear.on(channel_cls)}",
    )


@pytest.fixture
def ear():
    heard = Ear()
    yield heard
    heard.close()


@pytest.mark.timeout(120)
def test_one_listen_process_watches_and_stored_rows_are_processed_promptly_once(processes, ear):
    ear.listen(channels.Job, channels.AuthorTrigger)
    listeners = start_listeners(
        processes, 2, "--channels", JOB, "tests.testapp.channels.AuthorTrigger", env=NO_SWEEPS
    )
    watcher = wait_watcher(listeners, 30)
    watcher_pid, _ = lock_holder()

    jobs = store_jobs("job", 20)
    authors = {
        f"author-{Author.objects.create(name=f'author {number}').pk}" for number in range(10)
    }
    elapsed = wait_processed("Job", jobs, PROMPT, listeners)
    elapsed += wait_processed("AuthorTrigger", authors, PROMPT, listeners)

    assert elapsed < PROMPT, f"processed after {elapsed:.1f}s"
    assert_processed_once({"Job": jobs, "AuthorTrigger": authors}, listeners)
    # One watcher for the two processes, still the same one.
    assert [WATCHING in process.output() for process in listeners].count(True) == 1, outputs(
        listeners
    )
    assert watcher_of(listeners) is watcher
    # The writers sent no NOTIFY: every one heard is a wake-up ("sweep this channel", the
    # wake-up payload) from the watcher's session.
    wait_for(
        lambda: ear.on(channels.Job) and ear.on(channels.AuthorTrigger),
        PROMPT,
        lambda: f"a wake-up on each channel, heard {ear.heard}",
    )
    heard = ear.on(channels.Job) + ear.on(channels.AuthorTrigger)
    assert {(payload, sender) for payload, sender in heard} == {(wire.WAKE, watcher_pid)}, heard


@pytest.mark.timeout(120)
def test_another_process_takes_over_when_the_watcher_is_killed(processes, ear):
    ear.listen(channels.Job)
    listeners = start_listeners(processes, 2, "--channels", JOB, env=NO_SWEEPS)
    watcher = wait_watcher(listeners, 30)
    (survivor,) = [process for process in listeners if process is not watcher]
    before = store_jobs("before", 5)
    wait_processed("Job", before, PROMPT, listeners)

    watcher.send(signal.SIGKILL)
    watcher.wait(10)
    killed_at = time.monotonic()
    after = store_jobs("after", 10)  # while the lock may still be held by the dead session
    assert wait_watcher([survivor]) is survivor
    took_over = time.monotonic() - killed_at
    elapsed = wait_processed("Job", after, PROMPT, [survivor])

    assert took_over < TAKEOVER and took_over + elapsed < PROMPT + 5, (took_over, elapsed)
    assert_processed_once({"Job": before | after}, listeners)
    assert set(Effect.objects.filter(key__in=after).values_list("pid", flat=True)) == {survivor.pid}
    # The new watcher woke the listeners of the channel that had rows.
    heard_from(ear, channels.Job, lock_holder()[0])


@pytest.mark.timeout(120)
def test_a_process_takes_over_when_the_watchers_session_is_cut(processes, ear):
    ear.listen(channels.Job)
    listeners = start_listeners(processes, 2, "--channels", JOB, env=NO_SWEEPS)
    watcher = wait_watcher(listeners, 30)
    cut_pid, _ = lock_holder()
    before = store_jobs("before", 5)
    wait_processed("Job", before, PROMPT, listeners)

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(%s)", [cut_pid])
        assert cursor.fetchone()[0]
    meanwhile = store_jobs("meanwhile", 10)
    wait_for(
        lambda: (holder := lock_holder()) and holder[0] != cut_pid,
        TAKEOVER,
        "a new session to hold the watcher's lock",
        watch=listeners,
    )
    new_watcher = wait_watcher(listeners)
    wait_processed("Job", meanwhile, PROMPT, listeners)
    after = store_jobs("after", 10)
    wait_processed("Job", after, PROMPT, listeners)

    assert_processed_once({"Job": before | meanwhile | after}, listeners)
    # The process whose session was cut said so, and listens again; both are up.
    wait_for(
        lambda: (
            (output := watcher.output()).count(LISTENING) >= 2
            and "Lost the listening connection" in output
        ),
        TAKEOVER,
        "the cut process to say so and listen again",
        watch=listeners,
    )
    assert all(process.alive for process in listeners), outputs(listeners)
    assert new_watcher in listeners
    heard_from(ear, channels.Job, lock_holder()[0])


BULK = 20_000


@pytest.mark.timeout(180)
def test_a_bulk_insert_wakes_the_listeners_once_or_a_few_times(processes, ear):
    channel = channels.LockedDocumentTrigger
    ear.listen(channel)
    listeners = start_listeners(
        processes,
        2,
        "--channels",
        "tests.testapp.channels.LockedDocumentTrigger",
        env=NO_SWEEPS,
    )
    wait_watcher(listeners, 30)

    with transaction.atomic():
        documents = Document.objects.bulk_create(
            [Document(title=f"document {number}") for number in range(BULK)], batch_size=2000
        )
    keys = {f"document-{document.pk}" for document in documents}
    assert len(keys) == BULK
    wait_processed("LockedDocumentTrigger", keys, 120, listeners)

    assert_processed_once({"LockedDocumentTrigger": keys}, listeners)
    wakeups = wait_for(lambda: ear.on(channel), PROMPT, "a wake-up")
    assert 1 <= len(wakeups) <= 10, f"{len(wakeups)} NOTIFYs on the channel"
    assert {payload for payload, _ in wakeups} == {wire.WAKE}, wakeups[:10]


@contextlib.contextmanager
def held_lock() -> Iterator[ListenConnection]:
    """The watcher's lock, held by a session of the test's own while in the block."""
    session = ListenConnection("default")
    session.connect()
    try:
        with session.raw.cursor() as cursor:
            cursor.execute("SELECT pg_try_advisory_lock(%s, %s)", [LOCK_CLASSID, LOCK_OBJID])
            assert cursor.fetchone()[0], f"the lock is held by {lock_holder()}"
        yield session
    finally:
        session.close()


#: Seconds between two sweeps of the processes of the sweep test.
SWEEP_INTERVAL = 2.0


@pytest.mark.timeout(120)
def test_stored_rows_are_swept_while_no_process_can_watch(processes, ear):
    ear.listen(channels.Job)
    env = {"PGPUBSUB_TEST_SWEEP_INTERVAL": str(SWEEP_INTERVAL)}
    with held_lock() as session:
        test_session, _ = lock_holder()
        listeners = start_listeners(processes, 2, "--channels", JOB, env=env)
        swept = store_jobs("swept", 10)
        elapsed = wait_processed("Job", swept, SWEEP_INTERVAL + PROMPT, listeners)

        # Nobody watched: the sweeps found the rows, no NOTIFY was sent.
        assert lock_holder()[0] == test_session
        assert not any(WATCHING in process.output() for process in listeners), outputs(listeners)
        assert ear.on(channels.Job) == []
        with session.raw.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_unlock(%s, %s)", [LOCK_CLASSID, LOCK_OBJID])
            assert cursor.fetchone()[0]

        # The lock released, a process takes it and wakes the listeners again.
        watcher = wait_watcher(listeners)
        watcher_pid, _ = lock_holder()
        woken = store_jobs("woken", 10)
        wait_processed("Job", woken, PROMPT, listeners)
        heard_from(ear, channels.Job, watcher_pid)

    assert elapsed < SWEEP_INTERVAL + PROMPT
    assert watcher in listeners
    assert_processed_once({"Job": swept | woken}, listeners)


@pytest.mark.timeout(120)
def test_a_row_that_commits_late_is_processed_promptly_after_its_commit(processes, ear):
    listeners = start_listeners(processes, 2, "--channels", JOB, env=NO_SWEEPS)
    wait_watcher(listeners, 30)
    late = ListenConnection("default")
    late.connect()
    try:
        with late.raw.cursor() as cursor:
            cursor.execute("BEGIN")
            cursor.execute(
                "SELECT pgpubsub_store(%s, %s::jsonb)",
                [channels.Job.listen_safe_name(), channels.Job(key="late").serialize()],
            )
            opened_at = time.monotonic()
            # Rows stored after it (higher ids) commit and are processed meanwhile.
            others: set[str] = set()
            while time.monotonic() - opened_at < 1.5:
                batch = store_jobs(f"other-{len(others)}", 2)
                wait_processed("Job", batch, PROMPT, listeners)
                others |= batch
            assert "late" not in done("Job")
            cursor.execute("COMMIT")
        elapsed = wait_processed("Job", {"late"}, PROMPT, listeners)
    finally:
        late.close()

    assert elapsed < PROMPT
    assert_processed_once({"Job": others | {"late"}}, listeners)


@contextlib.contextmanager
def notify_on_write(enabled: bool) -> Iterator[None]:
    """``PGPUBSUB_NOTIFY_ON_WRITE = enabled`` baked into the database's functions while in
    the block; the functions of the test settings after."""
    try:
        with override_settings(PGPUBSUB_NOTIFY_ON_WRITE=enabled):
            install_functions("default")
            yield
    finally:
        install_functions("default")


def backend_pid() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return cursor.fetchone()[0]


def stored_id(channel_cls) -> int:
    return Notification.objects.filter(channel=channel_cls.listen_safe_name()).latest("id").pk


def test_a_channel_that_notifies_on_write_sends_the_row_id_from_the_writers_transaction(ear):
    ear.listen(channels.Job, channels.LockedDocumentTrigger)
    with notify_on_write(True):
        with transaction.atomic():
            pgpubsub.notify(channels.Job, key="loud")
            Document.objects.create(title="loud")
            job_id = stored_id(channels.Job)
            document_id = stored_id(channels.LockedDocumentTrigger)
            writer = backend_pid()
        wait_for(lambda: len(ear.hear()) >= 2, 10, lambda: f"two NOTIFYs, heard {ear.heard}")
    assert ear.on(channels.Job) == [(str(job_id), writer)]
    assert ear.on(channels.LockedDocumentTrigger) == [(str(document_id), writer)]


def test_by_default_a_writer_sends_no_notify(ear):
    ear.listen(channels.Job, channels.LockedDocumentTrigger)
    with transaction.atomic():
        pgpubsub.notify(channels.Job, key="quiet")
        Document.objects.create(title="quiet")
    assert stored_id(channels.Job) and stored_id(channels.LockedDocumentTrigger)
    # A NOTIFY of the writer's session committed after them: once it is heard, whatever those
    # writes sent would have been heard before it.
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_notify(%s, 'marker')", [channels.Job.listen_safe_name()])
    wait_for(lambda: ear.on(channels.Job), 10, "the marker NOTIFY")
    assert ear.on(channels.Job) == [("marker", backend_pid())]
    assert ear.on(channels.LockedDocumentTrigger) == []
