"""Behind a real PgBouncer: a Runtime that LISTENs through transaction pooling finds out that
notifications do not reach it, says so and keeps sweeping; through session pooling (or
directly) all is well; and a notification context set in a transaction stays in it."""

import sys
import time

import pytest
from django.db import connection, transaction
from django.test import override_settings

import pgpubsub
from pgpubsub.listen import process_notifications
from pgpubsub.probes import PROBE_TIMEOUT
from pgpubsub.runtime import Runtime
from pgpubsub.watcher import LOCK_KEY
from tests.pgbouncer import PgBouncer, executable, rerouted
from tests.processes import free_port, outputs, wait_for
from tests.test_health_view import request_json, session_cookie
from tests.testapp import channels
from tests.testapp.listeners import received
from tests.testapp.models import Effect, Post

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(90)]

#: What the Runtime logs when its probe does not arrive.
NOT_RECEIVED = "Notifications do not reach this Runtime"


def _pgbouncer(pool_mode: str, pool_size: int):
    try:
        executable()
    except AssertionError as exc:
        pytest.fail(str(exc), pytrace=False)  # never a skip: the tests need it
    bouncer = PgBouncer(dict(connection.settings_dict), pool_mode, pool_size)
    yield bouncer
    bouncer.stop()


@pytest.fixture
def pgbouncer_transaction(django_db_setup):
    """PgBouncer in transaction pooling mode in front of the test database (one server
    connection: its clients take turns on it)."""
    yield from _pgbouncer("transaction", pool_size=1)


@pytest.fixture
def pgbouncer_session(django_db_setup):
    """PgBouncer in session pooling mode in front of the test database (a server connection
    per client: ten)."""
    yield from _pgbouncer("session", pool_size=10)


def send_jobs(prefix: str, count: int) -> list[str]:
    keys = [f"{prefix}{number}" for number in range(count)]
    with transaction.atomic():
        for key in keys:
            pgpubsub.notify(channels.Job, key=key, text="work")
    return keys


def effects(prefix: str) -> list[str]:
    return list(Effect.objects.filter(key__startswith=prefix).values_list("key", flat=True))


def test_listen_through_transaction_pooling_says_so_and_keeps_sweeping(
    processes, pgbouncer_transaction
):
    listener = processes.start(
        "--threads",
        "1",
        ready=None,
        env={
            "DATABASE_URL": pgbouncer_transaction.url(),
            "PGPUBSUB_TEST_SWEEP_INTERVAL": "1",
        },
    )
    started = time.monotonic()
    wait_for(
        lambda: NOT_RECEIVED in listener.output(),
        PROBE_TIMEOUT + 20,
        "the error that notifications do not arrive",
        watch=[listener],
    )
    assert time.monotonic() - started < PROBE_TIMEOUT + 15
    (line,) = [line for line in listener.output().splitlines() if NOT_RECEIVED in line]
    assert " ERRO " in line  # listen's log format: asctime, levelname[:4], message
    for words in ("alias 'default'", "transaction pooling?", "PGPUBSUB_DATABASE"):
        assert words in line, line
    # Lockable messages are still processed, by the periodic sweep.
    keys = send_jobs("pooled-", 5)
    wait_for(
        lambda: sorted(effects("pooled-")) == sorted(keys),
        20,
        lambda: f"the jobs, swept; have {effects('pooled-')}",
        watch=[listener],
    )
    assert "Traceback" not in listener.output(), outputs([listener])


@pytest.mark.django_db(transaction=True, databases=["default", "side"])
def test_a_runtime_listening_through_transaction_pooling_reports_it_and_recovers(
    pgbouncer_transaction, caplog, settings
):
    """In-process, LISTEN through an alias of the test database ("side") that goes through
    the transaction-pooling PgBouncer: status() shows the problem; once PgBouncer pools
    sessions, the next probe (on a new connection) arrives."""
    settings.PGPUBSUB_DATABASE = "side"
    with rerouted("side", pgbouncer_transaction.settings()):
        runtime = Runtime([channels.Job, channels.Message], workers=1).start()
        try:
            wait_for(
                lambda: runtime.status()["problems"],
                PROBE_TIMEOUT + 15,
                lambda: f"the probe to fail: {runtime.status()}",
            )
            status = runtime.status()
            assert status["problems"] == ["notifications_not_received"]
            assert status["connected"] is False and status["notifications_verified"] is False
            assert status["last_error"].startswith("NotificationsNotReceived: " + NOT_RECEIVED)
            (record,) = [r for r in caplog.records if NOT_RECEIVED in r.getMessage()]
            assert record.levelname == "ERROR"
            assert "alias 'side'" in record.getMessage()
            assert "PGPUBSUB_DATABASE" in record.getMessage()
            # A session whose notifications do not arrive never becomes the watcher: its
            # advisory lock would stay on a server connection that other clients get.
            assert status["watching"] is False
            assert watcher_locks() == 0

            pgbouncer_transaction.reload(pool_mode="session")
            wait_for(
                lambda: runtime.status()["connected"],
                60,  # the next probe comes after a pause of 4 to 5 s
                lambda: f"the Runtime to recover: {runtime.status()}",
            )
            status = runtime.status()
            assert status["problems"] == [] and status["notifications_verified"] is True
            assert status["last_error"] is None
            assert "reach the LISTEN connection of alias 'side' again" in caplog.text
            # Notifications arrive now.
            pgpubsub.notify(channels.Message, key="after", text="fixed")
            wait_for(lambda: ("Message", {"key": "after", "text": "fixed"}) in received, 20, "it")
            assert status["ignored"] == 0
            # And now it watches: a lockable message is woken and processed.
            wait_for(lambda: runtime.status()["watching"], 20, "the Runtime to watch")
            assert watcher_locks() == 1
            pgpubsub.notify(channels.Job, key="after-watching")
            wait_for(lambda: Effect.objects.filter(key="after-watching").exists(), 20, "the job")
        finally:
            assert runtime.stop(10)


def watcher_locks() -> int:
    """Sessions of the test database holding the watcher's advisory lock."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
            "WHERE l.locktype = 'advisory' AND l.granted AND l.classid = %s AND l.objid = %s "
            "AND d.datname = current_database()",
            list(LOCK_KEY),
        )
        return cursor.fetchone()[0]


def gunicorn(processes, database_url: str, **env: str):
    port = free_port()
    server = processes.start_command(
        [sys.executable, "-m", "gunicorn", "tests.wsgi:application", "-w", "1"]
        + ["-b", f"127.0.0.1:{port}"],
        env={"PGPUBSUB_TEST_EMBEDDED": "1", "DATABASE_URL": database_url, **env},
    )
    return server, f"http://127.0.0.1:{port}/pgpubsub/health/"


def runtime_health(url: str, headers: dict, ready) -> object:
    """The health view's answer once its Runtime's status is ``ready``."""
    try:
        got = request_json(url, headers)
    except OSError:  # the server is starting
        return None
    runtimes = got[1].get("runtimes")
    return got if runtimes and ready(runtimes[0]) else None


@pytest.mark.timeout(120)
def test_a_web_worker_listening_through_transaction_pooling_is_failing(
    processes, pgbouncer_transaction, django_user_model
):
    server, url = gunicorn(processes, pgbouncer_transaction.url())
    staff = session_cookie(
        django_user_model.objects.create_user("ops", password="x", is_staff=True)
    )
    code, body, _ = wait_for(
        lambda: runtime_health(url, staff, lambda runtime: runtime["problems"]),
        60,
        "a health answer with the Runtime's problem",
        watch=[server],
    )
    assert code == 503, body
    assert body["problems"] == ["notifications_not_received"]
    (runtime,) = body["runtimes"]
    assert runtime["pid"] in server.children()
    assert runtime["connected"] is False
    assert runtime["last_error"].startswith("NotificationsNotReceived: " + NOT_RECEIVED)
    assert body["details"] == [
        f"Runtime of process {runtime['pid']}: notifications sent to the database do not reach "
        "its LISTEN connection (transaction pooling? see its last_error)"
    ]
    code, body, _ = request_json(url)
    assert (code, body) == (
        503,
        {"status": "failing", "problems": ["notifications_not_received"]},
    )
    assert NOT_RECEIVED in server.output()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("path", ["session pooling", "direct"])
def test_through_session_pooling_or_directly_notifications_arrive(
    processes, pgbouncer_session, django_user_model, path
):
    from tests.processes import database_url

    url_of_database = pgbouncer_session.url() if path == "session pooling" else database_url()
    server, url = gunicorn(processes, url_of_database)
    staff = session_cookie(
        django_user_model.objects.create_user("ops", password="x", is_staff=True)
    )
    code, body, _ = wait_for(
        lambda: runtime_health(url, staff, lambda runtime: runtime["notifications_verified"]),
        60,
        "a health answer once the probe arrived",
        watch=[server],
    )
    assert code == 200 and body["problems"] == [], body
    (runtime,) = body["runtimes"]
    assert runtime["connected"] is True and runtime["problems"] == []
    # A plain message reaches the web worker at once (no sweep brings it).
    pgpubsub.notify(channels.Broadcast, key=f"hello-{path}")
    wait_for(
        lambda: Effect.objects.filter(key=f"hello-{path}@{runtime['pid']}").exists(),
        20,
        "the broadcast",
        watch=[server],
    )
    assert NOT_RECEIVED not in server.output(), outputs([server])


# -- the notification context through transaction pooling (pgpubsub.W005) ------------------


@pytest.fixture
def pooled_side(pgbouncer_transaction):
    """The alias "side" (the test database) goes through the transaction-pooling PgBouncer,
    declared as Django advises."""
    with rerouted("side", pgbouncer_transaction.settings(DISABLE_SERVER_SIDE_CURSORS=True)):
        yield pgbouncer_transaction


def write_post_as_another_client(bouncer: PgBouncer, content: str) -> None:
    """A post written by another client of the PgBouncer (of one server connection)."""
    conn = bouncer.connect()
    try:
        with conn.cursor() as cursor:
            cursor.execute(
                f"INSERT INTO {Post._meta.db_table} (content, date, read_count) "
                "VALUES (%s, now(), 0)",
                [content],
            )
    finally:
        conn.close()


def trigger_contexts(listening, count: int) -> list:
    """(content, context) of the first ``count`` posts' trigger notifications, once they have
    arrived (from other sessions: they come when those commit)."""

    def arrived() -> list | None:
        process_notifications(listening)
        found = [
            (kwargs["new"].content, kwargs["context"])
            for name, kwargs in received
            if name == "PostTrigger"
        ]
        return found if len(found) >= count else None

    return wait_for(arrived, 10, f"{count} trigger notifications")


@pytest.mark.django_db(transaction=True, databases=["default", "side"])
@override_settings(PGPUBSUB_PASS_CONTEXT_TO_LISTENERS=True)
def test_a_context_set_in_a_transaction_does_not_reach_the_next_client(pooled_side, listening):
    with transaction.atomic(using="side"):
        pgpubsub.set_notification_context({"request_id": "r-a"}, using="side")
        Post.objects.using("side").create(content="by a")
    write_post_as_another_client(pooled_side, "by b")  # on the same server connection
    assert trigger_contexts(listening, 2) == [("by a", {"request_id": "r-a"}), ("by b", {})]


@pytest.mark.django_db(transaction=True, databases=["default", "side"])
@override_settings(PGPUBSUB_PASS_CONTEXT_TO_LISTENERS=True)
def test_a_session_bound_context_reaches_the_next_client(pooled_side, listening):
    """Why W005 warns (and what the test above would see if the context were not bound to
    the transaction): set outside a transaction, it stays on the server connection."""
    pgpubsub.set_notification_context({"request_id": "r-a"}, using="side")
    Post.objects.using("side").create(content="by a")
    write_post_as_another_client(pooled_side, "by b")
    assert trigger_contexts(listening, 2) == [
        ("by a", {"request_id": "r-a"}),
        ("by b", {"request_id": "r-a"}),
    ]
