"""Upgrade in place from django-pgpubsub 1.3.1.

A database with the schema and ``django_migrations`` rows that django-pgpubsub 1.3.1's own
migrations leave (``tests/fixtures/django_pgpubsub_1_3_1.sql``), holding stored notifications in
the forms 1.3.1 wrote them, is upgraded with a plain ``manage.py migrate``; then
``manage.py listen --recover`` processes every stored notification. These tests run the real
commands as subprocesses against databases of their own, so they use psycopg2 directly and not
pytest-django's test database.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path
from urllib.parse import urlparse

import psycopg2
import pytest

from pgpubsub.testing.postgres import database_url

ROOT = Path(__file__).resolve().parent.parent
MANAGE = ROOT / "tests" / "manage.py"
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "django_pgpubsub_1_3_1.sql"

#: How long the listener may take to process the stored rows, in seconds.
PROCESS_DEADLINE = 60.0
#: How long ``listen`` may take to exit after SIGTERM, in seconds.
STOP_DEADLINE = 10.0

#: Authors whose insertion 1.3.1's trigger stored as notifications of AuthorTrigger.
AUTHORS = {11: "Ann", 12: "Bob O'Hara", 13: "Zoë $$ \\"}
#: The ids of those authors whose row has the older format: the payload as a JSON string.
STRING_PAYLOAD_AUTHORS = {13}
#: Jobs that 1.3.1's ``notify()`` stored: key -> text.
JOBS = {"upgrade-job-1": "first", "upgrade-job-2": "zweite Ü"}

AUTHOR_CHANNEL = "tests.testapp.channels.AuthorTrigger"
JOB_CHANNEL = "tests.testapp.channels.Job"


def listen_safe_name(dotted_path: str) -> str:
    """The LISTEN name django-pgpubsub 1.3.1 gave a channel (and stored trigger rows under)."""
    return "pgpubsub_" + hashlib.sha1(dotted_path.encode()).hexdigest()[:5]


def url_for(dbname: str) -> str:
    return urlparse(database_url())._replace(path=f"/{dbname}").geturl()


def connect(dbname: str):
    conn = psycopg2.connect(url_for(dbname))
    conn.autocommit = True
    return conn


def execute(conn, sql: str, params=None) -> None:
    with conn.cursor() as cursor:
        cursor.execute(sql, params)


def fetch(conn, sql: str, params=None) -> list[tuple]:
    with conn.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall()


def manage(dbname: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "DATABASE_URL": url_for(dbname), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, str(MANAGE), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(process: subprocess.Popen, timeout: float = 120.0) -> tuple[int, str]:
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        pytest.fail(f"{process.args} did not finish in {timeout}s:\n{output}")
    return process.returncode, output


def author_payload(author_id: int, name: str) -> dict:
    """What 1.3.1's trigger built for an INSERT into testapp_author."""
    return {
        "app": "testapp",
        "model": "Author",
        "old": None,
        "new": {"id": author_id, "name": name, "age": None, "active": True},
        "context": {},
    }


def store_rows_as_1_3_1(conn) -> None:
    """Insert the stored notifications the way 1.3.1 wrote them (its BEFORE INSERT trigger,
    from the fixture, sets created_at and db_version)."""
    author_channel = listen_safe_name(AUTHOR_CHANNEL)
    for author_id, name in AUTHORS.items():
        payload = json.dumps(author_payload(author_id, name))
        if author_id in STRING_PAYLOAD_AUTHORS:
            payload = json.dumps(payload)  # older rows: a JSON string holding the JSON text
        fetch(
            conn,
            "INSERT INTO pgpubsub_notification (channel, payload) VALUES (%s, %s::jsonb) "
            "RETURNING id",
            [author_channel, payload],
        )
    for key, text in JOBS.items():
        # 1.3.1's notify(): Notification.objects.create(channel=name(), payload=serialized),
        # where serialized is the JSON text of {"kwargs": ...}, so the JSONField holds a string.
        serialized = json.dumps({"kwargs": {"key": key, "text": text}})
        fetch(
            conn,
            "INSERT INTO pgpubsub_notification (channel, payload) VALUES (%s, %s::jsonb) "
            "RETURNING id",
            [JOB_CHANNEL, json.dumps(serialized)],
        )


STORED_ROWS_SQL = (
    "SELECT id, channel, payload::text, created_at, db_version FROM pgpubsub_notification "
    "ORDER BY id"
)

SCHEMA_QUERIES = {
    "columns": """
        SELECT column_name, ordinal_position, data_type, character_maximum_length, is_nullable,
               column_default, is_identity, identity_generation
        FROM information_schema.columns
        WHERE table_schema = 'public' AND table_name = 'pgpubsub_notification'
        ORDER BY ordinal_position""",
    "indexes": """
        SELECT indexname, indexdef FROM pg_indexes
        WHERE schemaname = 'public' AND tablename = 'pgpubsub_notification'
        ORDER BY indexname""",
    "constraints": """
        SELECT conname, contype, pg_get_constraintdef(oid) FROM pg_constraint
        WHERE conrelid = 'public.pgpubsub_notification'::regclass
        ORDER BY conname""",
    "triggers": """
        SELECT t.tgname, t.tgenabled, pg_get_triggerdef(t.oid), p.prosrc,
               obj_description(t.oid, 'pg_trigger')
        FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid
        WHERE t.tgrelid = 'public.pgpubsub_notification'::regclass AND NOT t.tgisinternal
        ORDER BY t.tgname""",
    "functions": """
        SELECT proname, pg_get_function_identity_arguments(oid), prosrc FROM pg_proc
        WHERE proname IN ('pgpubsub_notify', 'pgpubsub_store', '_pgtrigger_should_ignore')
        ORDER BY proname""",
}


def schema_of(conn) -> dict[str, list[tuple]]:
    return {name: fetch(conn, sql) for name, sql in SCHEMA_QUERIES.items()}


@pytest.fixture(scope="module")
def scratch_databases():
    """Creates scratch databases on the test server; drops them (and their sessions) at the end."""
    created: list[str] = []

    def create(kind: str) -> str:
        name = f"pgpubsub_{kind}_{os.getpid()}_{secrets.token_hex(3)}"
        with closing(connect("postgres")) as conn:
            execute(conn, f'CREATE DATABASE "{name}"')
        created.append(name)
        return name

    yield create
    with closing(connect("postgres")) as conn:
        for name in created:
            fetch(
                conn,
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                [name],
            )
            execute(conn, f'DROP DATABASE IF EXISTS "{name}"')


@pytest.fixture(scope="module")
def migrated(scratch_databases):
    """A 1.3.1 database with stored rows, and an empty one, both migrated by our code.

    Returns (upgraded db, fresh db, stored rows before the upgrade, output of its migrate).
    """
    upgraded = scratch_databases("upgraded")
    fresh = scratch_databases("fresh")
    with closing(connect(upgraded)) as conn:
        search_path = fetch(conn, "SHOW search_path")
        execute(conn, FIXTURE.read_text())
        # Loading the dump leaves the session as it was (pg_dump output would empty search_path).
        assert fetch(conn, "SHOW search_path") == search_path
        store_rows_as_1_3_1(conn)
        before = fetch(conn, STORED_ROWS_SQL)
    upgrading = manage(upgraded, "migrate", "--noinput")
    migrating = manage(fresh, "migrate", "--noinput")
    code, output = finish(upgrading)
    fresh_code, fresh_output = finish(migrating)
    assert code == 0, f"migrate of the 1.3.1 database failed:\n{output}"
    assert fresh_code == 0, f"migrate of an empty database failed:\n{fresh_output}"
    return upgraded, fresh, before, output


@pytest.mark.timeout(180)
def test_migrate_applies_only_the_new_migrations(migrated):
    upgraded, _fresh, _before, output = migrated
    assert "Applying pgpubsub.0007_functions_and_channel_index... OK" in output
    assert "Applying pgpubsub.0008_notification_attempts... OK" in output
    assert "Applying pgpubsub.0009_notification_claimed_by... OK" in output
    assert "Applying pgpubsub.0010_set_db_version_without_django_migrations... OK" in output
    assert "Applying pgpubsub.0012_task_results... OK" in output
    for old in ("0001", "0002", "0003", "0004", "0005", "0006"):
        assert f"Applying pgpubsub.{old}" not in output
    assert "Applying contenttypes." not in output
    assert "Applying auth." not in output
    with closing(connect(upgraded)) as conn:
        rows = fetch(conn, "SELECT id, app, name FROM django_migrations WHERE id <= 20 ORDER BY id")
        pgpubsub_rows = fetch(
            conn, "SELECT id, name FROM django_migrations WHERE app = 'pgpubsub' ORDER BY id"
        )
    # The 20 rows 1.3.1's project had are untouched; 0007 to 0010 are recorded once, after them.
    assert len(rows) == 20
    assert rows[0] == (1, "contenttypes", "0001_initial")
    assert [row[0] for row in pgpubsub_rows[:6]] == [15, 16, 17, 18, 19, 20]
    assert [name for _, name in pgpubsub_rows] == [
        "0001_initial",
        "0002_notification_created_at",
        "0003_notification_db_version",
        "0004_notification_pgpubsub_notification_set_db_version",
        "0005_alter_notification_options",
        "0006_payload_stores_proper_jsonb",
        "0007_functions_and_channel_index",
        "0008_notification_attempts",
        "0009_notification_claimed_by",
        "0010_set_db_version_without_django_migrations",
        "0011_drop_db_version_fk",
        "0012_task_results",
    ]
    assert pgpubsub_rows[6][0] > 20


@pytest.mark.timeout(180)
def test_upgraded_schema_matches_a_fresh_one(migrated):
    upgraded, fresh, _before, _output = migrated
    with closing(connect(upgraded)) as conn:
        upgraded_schema = schema_of(conn)
    with closing(connect(fresh)) as conn:
        fresh_schema = schema_of(conn)
    for part in SCHEMA_QUERIES:
        assert upgraded_schema[part] == fresh_schema[part], part
    # And both have what the code relies on.
    assert [row[0] for row in fresh_schema["columns"]] == [
        "id",
        "channel",
        "payload",
        "created_at",
        "db_version",
        "attempts",
        "next_attempt_at",
        "failed_at",
        "last_error",
        "last_traceback",
        "claimed_by",
    ]
    # Rows are stored by INSERTs that name channel and payload only.
    defaults = {row[0]: row[5] for row in fresh_schema["columns"]}
    assert defaults["attempts"] == "0"
    indexes = dict(fresh_schema["indexes"])
    assert (
        "(channel, id) WHERE ((failed_at IS NULL) AND (next_attempt_at IS NULL))"
        in (indexes["pgpubsub_pending_idx"])
    )
    assert (
        "(channel, next_attempt_at) WHERE ((failed_at IS NULL) AND (next_attempt_at IS NOT NULL))"
        in indexes["pgpubsub_retry_idx"]
    )
    # No foreign key to django_migrations: checking it share-locked one row in every store.
    constraints = {name: definition for name, _, definition in fresh_schema["constraints"]}
    assert not [c for c in constraints.values() if "django_migrations" in c], constraints
    assert [row[0] for row in fresh_schema["triggers"]] == [
        "pgtrigger_pgpubsub_notification_set_db_version_ac4cd"
    ]
    assert {row[0] for row in fresh_schema["functions"]} >= {"pgpubsub_notify", "pgpubsub_store"}


@pytest.mark.timeout(180)
def test_stored_rows_survive_and_are_processed(migrated, tmp_path):
    upgraded, _fresh, before, _output = migrated
    assert len(before) == len(AUTHORS) + len(JOBS)
    assert all(created_at is not None for _, _, _, created_at, _ in before)
    with closing(connect(upgraded)) as conn:
        # Ids, channels, payloads, created_at and db_version are kept through the migration.
        assert fetch(conn, STORED_ROWS_SQL) == before
        # The authors the stored payloads describe, written without firing today's triggers.
        with conn.cursor() as cursor:
            cursor.execute("SET session_replication_role = replica")
            for author_id, name in AUTHORS.items():
                cursor.execute(
                    "INSERT INTO testapp_author (id, name, age, active) VALUES (%s, %s, NULL, true)",
                    [author_id, name],
                )
            cursor.execute("RESET session_replication_role")
        assert fetch(conn, "SELECT count(*) FROM pgpubsub_notification") == [(len(before),)]
        assert fetch(conn, "SELECT count(*) FROM testapp_effect") == [(0,)]

        log_path = tmp_path / "listen.log"
        with log_path.open("w") as log:
            listener = subprocess.Popen(
                [sys.executable, str(MANAGE), "listen", "--recover"],
                cwd=ROOT,
                env={**os.environ, "DATABASE_URL": url_for(upgraded), "PYTHONUNBUFFERED": "1"},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            expected = {f"author-{author_id}": name for author_id, name in AUTHORS.items()}
            expected.update(JOBS)
            deadline = time.monotonic() + PROCESS_DEADLINE
            while True:
                effects = dict(fetch(conn, "SELECT key, value FROM testapp_effect"))
                remaining = fetch(conn, "SELECT id, channel FROM pgpubsub_notification")
                if effects.keys() >= expected.keys() and not remaining:
                    break
                if listener.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(
                        f"stored rows not processed (listen exit code {listener.poll()}); "
                        f"effects {effects}, still stored {remaining}:\n{log_path.read_text()}"
                    )
                time.sleep(0.1)
            assert effects == expected
            posts = fetch(conn, "SELECT author_id, content FROM testapp_post ORDER BY author_id")
            assert posts == [
                (author_id, f"first post of {name}") for author_id, name in AUTHORS.items()
            ]

            listener.send_signal(signal.SIGTERM)
            try:
                code = listener.wait(timeout=STOP_DEADLINE)
            except subprocess.TimeoutExpired:
                pytest.fail(
                    f"listen did not exit within {STOP_DEADLINE}s of SIGTERM:\n"
                    f"{log_path.read_text()}"
                )
            assert code == 0, log_path.read_text()
        finally:
            if listener.poll() is None:
                listener.kill()
                listener.wait()
